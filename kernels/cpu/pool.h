/* pool.h - a persistent thread pool for the CPU backend's parallel loops.
 *
 * cvlm_pool_run() splits tasks 0..n-1 over the pool's threads plus the caller and returns
 * when all are done. Tasks are claimed with an atomic counter, so uneven tasks balance.
 * One run at a time per pool (the backend's ops are issued from one thread).
 */
#ifndef CVLM_CPU_POOL_H
#define CVLM_CPU_POOL_H

struct cvlm_pool;

typedef void (*cvlm_pool_fn)(void *ctx, int task, int thread);

struct cvlm_pool *cvlm_pool_create(int n_threads);
void cvlm_pool_destroy(struct cvlm_pool *p);
int cvlm_pool_size(const struct cvlm_pool *p);
void cvlm_pool_run(struct cvlm_pool *p, int n_tasks, cvlm_pool_fn fn, void *ctx);

#endif
