/* pool.c - persistent worker threads (see pool.h).
 *
 * A decode step issues a few hundred parallel loops of tens of microseconds each, so the
 * hand-off must cost far less than that. The fast path takes no lock and makes no system
 * call: the caller publishes (fn, ctx, n_tasks), resets the task counter and bumps a
 * generation number; workers spin on the generation (with the CPU's pause hint) and claim
 * task indices from an atomic counter; the caller runs tasks too, then spins until every
 * worker has checked out of the generation.
 * A worker that sees no new generation for a while (about a millisecond of spinning)
 * sleeps on a condition variable; the caller only takes the mutex to wake sleepers.
 * Lost wake-ups are impossible: a worker increments `sleepers` and re-checks the
 * generation under the mutex, the caller bumps the generation before reading `sleepers`
 * (both sequentially consistent), so either the worker sees the new generation or the
 * caller sees the sleeper and broadcasts under the mutex.
 */
#include "kernels/cpu/pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#define SPIN_BEFORE_SLEEP (1 << 15) /* pause iterations: roughly 0.5-2 ms */

struct cvlm_pool {
    int n_threads; /* including the caller */
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t wake;
    cvlm_pool_fn fn;
    void *ctx;
    int n_tasks;
    atomic_int next;
    atomic_uint gen;
    atomic_int busy;     /* workers still inside the current generation */
    atomic_int sleepers; /* workers blocked (or about to block) on `wake` */
    atomic_int stop;
};

struct worker_arg {
    struct cvlm_pool *p;
    int id;
};

static void drain(struct cvlm_pool *p, int thread)
{
    int t;
    while ((t = atomic_fetch_add(&p->next, 1)) < p->n_tasks)
        p->fn(p->ctx, t, thread);
}

/* Returns the next generation after `seen`, sleeping if it is long in coming. */
static unsigned wait_generation(struct cvlm_pool *p, unsigned seen)
{
    for (int i = 0; i < SPIN_BEFORE_SLEEP; i++) {
        unsigned g = atomic_load_explicit(&p->gen, memory_order_acquire);
        if (g != seen)
            return g;
        CPU_RELAX();
    }
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add(&p->sleepers, 1);
    while (atomic_load(&p->gen) == seen && !atomic_load(&p->stop))
        pthread_cond_wait(&p->wake, &p->mu);
    atomic_fetch_sub(&p->sleepers, 1);
    pthread_mutex_unlock(&p->mu);
    return atomic_load(&p->gen);
}

static void *worker(void *arg)
{
    struct worker_arg *wa = arg;
    struct cvlm_pool *p = wa->p;
    int id = wa->id;
    unsigned seen = 0;
    free(wa);
    for (;;) {
        seen = wait_generation(p, seen);
        if (atomic_load(&p->stop))
            return NULL;
        drain(p, id);
        atomic_fetch_sub_explicit(&p->busy, 1, memory_order_release);
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

void cvlm_pool_run(struct cvlm_pool *p, int n_tasks, cvlm_pool_fn fn, void *ctx)
{
    if (n_tasks <= 0)
        return;
    if (p->n_threads == 1 || n_tasks == 1) {
        for (int t = 0; t < n_tasks; t++)
            fn(ctx, t, 0);
        return;
    }
    /* the previous run ended with busy == 0: no worker reads these fields now */
    p->fn = fn;
    p->ctx = ctx;
    p->n_tasks = n_tasks;
    atomic_store_explicit(&p->next, 0, memory_order_relaxed);
    atomic_store_explicit(&p->busy, p->n_threads - 1, memory_order_relaxed);
    atomic_fetch_add(&p->gen, 1); /* seq_cst: publishes the fields above */
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->wake);
        pthread_mutex_unlock(&p->mu);
    }
    drain(p, 0);
    /* wait until every worker has left this generation (they may still be claiming) */
    for (unsigned i = 0; atomic_load_explicit(&p->busy, memory_order_acquire) > 0; i++) {
        CPU_RELAX();
        if (i >= SPIN_BEFORE_SLEEP) /* a worker is descheduled: let it run */
            sched_yield();
    }
}

void cvlm_pool_destroy(struct cvlm_pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    atomic_fetch_add(&p->gen, 1);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n_threads; i++)
        pthread_join(p->threads[i], NULL);
    pthread_cond_destroy(&p->wake);
    pthread_mutex_destroy(&p->mu);
    free(p->threads);
    free(p);
}
