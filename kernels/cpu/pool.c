/* pool.c - persistent worker threads (see pool.h).
 *
 * Workers sleep on a condition variable between runs and spin briefly first, because a
 * decode step issues hundreds of small parallel loops back to back. A run publishes
 * (fn, ctx, n_tasks) under the mutex with a new generation number; every participant
 * claims task indices from an atomic counter; the caller waits until all workers have
 * checked out of the generation.
 */
#include "kernels/cpu/pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

struct cvlm_pool {
    int n_threads; /* including the caller */
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    cvlm_pool_fn fn;
    void *ctx;
    int n_tasks;
    atomic_int next;
    atomic_uint gen;
    atomic_int busy; /* workers still inside the current generation */
    int stop;
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

static void *worker(void *arg)
{
    struct worker_arg *wa = arg;
    struct cvlm_pool *p = wa->p;
    int id = wa->id;
    unsigned seen = 0;
    free(wa);
    for (;;) {
        /* spin a little before sleeping: back-to-back runs are the common case */
        for (int i = 0; i < 20000 && atomic_load(&p->gen) == seen; i++)
            sched_yield();
        pthread_mutex_lock(&p->mu);
        while (atomic_load(&p->gen) == seen && !p->stop)
            pthread_cond_wait(&p->wake, &p->mu);
        if (p->stop) {
            pthread_mutex_unlock(&p->mu);
            return NULL;
        }
        seen = atomic_load(&p->gen);
        pthread_mutex_unlock(&p->mu);
        drain(p, id);
        if (atomic_fetch_sub(&p->busy, 1) == 1) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->done);
            pthread_mutex_unlock(&p->mu);
        }
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
    pthread_cond_init(&p->done, NULL);
    p->threads = calloc((size_t)p->n_threads, sizeof(pthread_t));
    if (!p->threads) {
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
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->ctx = ctx;
    p->n_tasks = n_tasks;
    atomic_store(&p->next, 0);
    atomic_store(&p->busy, p->n_threads - 1);
    atomic_fetch_add(&p->gen, 1);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    drain(p, 0);
    /* wait until every worker has left this generation (they may still be claiming) */
    if (atomic_load(&p->busy) > 0) {
        pthread_mutex_lock(&p->mu);
        while (atomic_load(&p->busy) > 0)
            pthread_cond_wait(&p->done, &p->mu);
        pthread_mutex_unlock(&p->mu);
    }
}

void cvlm_pool_destroy(struct cvlm_pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n_threads; i++)
        pthread_join(p->threads[i], NULL);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->done);
    pthread_mutex_destroy(&p->mu);
    free(p->threads);
    free(p);
}
