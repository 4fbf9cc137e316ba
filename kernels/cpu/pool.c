/* pool.c - persistent worker threads (see pool.h).
 *
 * A decode step issues a few hundred parallel loops of tens of microseconds each, so the
 * hand-off must cost far less than that, and it must not collapse when the machine is
 * oversubscribed (a descheduled worker must not hold the caller up).
 *
 * One 64-bit atomic word carries a run: generation (24 bits) | task count (20) | next
 * task index (20). The caller writes fn/ctx, then publishes the word; participants claim
 * indices by compare-and-swap on it, so a claim succeeds only for the generation (and
 * task count) it was read with. A worker counts itself in `active` before claiming and
 * out after; the caller runs tasks too, then waits only until `active` is 0. Why that is
 * enough: a task index is claimed before the caller can see the run drained, so the
 * claimer's `active` increment (made before the claim) is visible to the caller's wait;
 * and a worker that wakes late fails its claim (the generation moved on) without ever
 * reading fn/ctx. So nobody waits for a worker that has not started, and fn/ctx are
 * stable while anyone runs a task of their generation.
 *
 * Idle workers spin on the word (pause hint) for about a millisecond, then sleep on a
 * condition variable. No lost wake-up: a worker increments `sleepers` and re-reads the
 * word under the mutex, the caller publishes the word before reading `sleepers` (both
 * sequentially consistent), so either the worker sees the run or the caller broadcasts
 * under the mutex.
 */
#include "kernels/cpu/pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#define SPIN_BEFORE_SLEEP (1 << 15) /* pause iterations: roughly 0.5-2 ms */
#define TASK_BITS 20
#define TASK_MASK ((1u << TASK_BITS) - 1)
#define MAX_TASKS ((int)TASK_MASK) /* per published run; larger runs are split */

static inline uint64_t word(uint32_t gen, uint32_t n, uint32_t next)
{
    return (uint64_t)(gen & 0xffffffu) << 40 | (uint64_t)n << TASK_BITS | next;
}
static inline uint32_t gen_of(uint64_t w)
{
    return (uint32_t)(w >> 40);
}
static inline uint32_t n_of(uint64_t w)
{
    return (uint32_t)(w >> TASK_BITS) & TASK_MASK;
}
static inline uint32_t next_of(uint64_t w)
{
    return (uint32_t)w & TASK_MASK;
}

struct cvlm_pool {
    int n_threads; /* including the caller */
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t wake;
    cvlm_pool_fn fn; /* of the current generation; see the invariant above */
    void *ctx;
    int base;            /* task index of the run's first task (split runs) */
    _Atomic uint64_t w;  /* generation | task count | next index */
    atomic_int active;   /* workers between counting in and out */
    atomic_int sleepers; /* workers blocked (or about to block) on `wake` */
    atomic_int stop;
};

struct worker_arg {
    struct cvlm_pool *p;
    int id;
};

/* Claims and runs tasks of generation `gen` until none is left. */
static void drain(struct cvlm_pool *p, uint32_t gen, int thread)
{
    uint64_t w = atomic_load(&p->w);
    while (gen_of(w) == gen && next_of(w) < n_of(w)) {
        if (atomic_compare_exchange_weak(&p->w, &w, w + 1)) {
            p->fn(p->ctx, p->base + (int)next_of(w), thread);
            w = atomic_load(&p->w);
        }
    }
}

/* Returns a generation other than `seen`, spinning first, then sleeping. */
static uint32_t wait_generation(struct cvlm_pool *p, uint32_t seen)
{
    for (int i = 0; i < SPIN_BEFORE_SLEEP; i++) {
        uint32_t g = gen_of(atomic_load_explicit(&p->w, memory_order_acquire));
        if (g != seen)
            return g;
        CPU_RELAX();
    }
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add(&p->sleepers, 1);
    while (gen_of(atomic_load(&p->w)) == seen && !atomic_load(&p->stop))
        pthread_cond_wait(&p->wake, &p->mu);
    atomic_fetch_sub(&p->sleepers, 1);
    pthread_mutex_unlock(&p->mu);
    return gen_of(atomic_load(&p->w));
}

static void *worker(void *arg)
{
    struct worker_arg *wa = arg;
    struct cvlm_pool *p = wa->p;
    int id = wa->id;
    uint32_t seen = 0;
    free(wa);
    for (;;) {
        seen = wait_generation(p, seen);
        if (atomic_load(&p->stop))
            return NULL;
        atomic_fetch_add(&p->active, 1);
        drain(p, seen, id);
        atomic_fetch_sub(&p->active, 1);
    }
}

struct cvlm_pool *cvlm_pool_create(int n_threads)
{
    struct cvlm_pool *p = calloc(1, sizeof(*p));
    if (!p)
        return NULL;
    p->n_threads = n_threads < 1 ? 1 : n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    p->threads = calloc((size_t)p->n_threads, sizeof(pthread_t));
    if (!p->threads) {
        pthread_cond_destroy(&p->wake);
        pthread_mutex_destroy(&p->mu);
        free(p);
        return NULL;
    }
    for (int i = 1; i < p->n_threads; i++) {
        struct worker_arg *wa = malloc(sizeof(*wa));
        if (wa) {
            wa->p = p;
            wa->id = i;
        }
        if (!wa || pthread_create(&p->threads[i], NULL, worker, wa)) {
            free(wa);
            p->n_threads = i; /* run with the threads we have */
            break;
        }
    }
    return p;
}

int cvlm_pool_size(const struct cvlm_pool *p)
{
    return p->n_threads;
}

/* Publishes tasks [base, base + n) as a new generation, runs them, waits for helpers. */
static void run_part(struct cvlm_pool *p, int base, int n, cvlm_pool_fn fn, void *ctx)
{
    uint32_t gen = (gen_of(atomic_load(&p->w)) + 1) & 0xffffffu;
    /* active == 0 and the last run drained: nobody reads fn/ctx/base now */
    p->fn = fn;
    p->ctx = ctx;
    p->base = base;
    atomic_store(&p->w, word(gen, (uint32_t)n, 0)); /* seq_cst: publishes the fields */
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->wake);
        pthread_mutex_unlock(&p->mu);
    }
    drain(p, gen, 0);
    /* only workers inside a task of this run can be counted in now */
    for (unsigned i = 0; atomic_load(&p->active) > 0; i++) {
        CPU_RELAX();
        if (i >= SPIN_BEFORE_SLEEP) /* a worker was descheduled mid-task: let it run */
            sched_yield();
    }
}

void cvlm_pool_run(struct cvlm_pool *p, int n_tasks, cvlm_pool_fn fn, void *ctx)
{
    if (n_tasks <= 0)
        return;
    if (p->n_threads == 1 || n_tasks == 1) {
        for (int t = 0; t < n_tasks; t++)
            fn(ctx, t, 0);
        return;
    }
    for (int base = 0; base < n_tasks; base += MAX_TASKS)
        run_part(p, base, n_tasks - base < MAX_TASKS ? n_tasks - base : MAX_TASKS, fn, ctx);
}

void cvlm_pool_destroy(struct cvlm_pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    atomic_store(&p->w, word(gen_of(atomic_load(&p->w)) + 1, 0, 0));
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n_threads; i++)
        pthread_join(p->threads[i], NULL);
    pthread_cond_destroy(&p->wake);
    pthread_mutex_destroy(&p->mu);
    free(p->threads);
    free(p);
}
