/* comm.c - the single-rank and in-process CPU implementations of comm.h.
 *
 * In-process ranks share one struct group: each all-reduce publishes the ranks' buffer
 * pointers, waits at a barrier, then rank r sums chunk r of the vector over all ranks in
 * rank order and writes the sum back into every rank's buffer (chunks are disjoint, so
 * no two ranks touch the same element), and waits at a second barrier. The fixed order
 * makes the result bit-identical on all ranks and from run to run. The CPU backend's
 * activations are host F32, so the buffers are plain float arrays.
 */
#include "engine/comm.h"

#include "engine/error.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

struct group {
    int size;
    atomic_int refs;
    pthread_barrier_t bar;
    float *bufs[CVLM_COMM_MAX_RANKS];
};

struct cpu_comm {
    struct cvlm_comm c; /* first: the public handle */
    struct group *g;
};

static int cpu_allreduce(struct cvlm_comm *c, void *buf, size_t n)
{
    struct group *g = ((struct cpu_comm *)c)->g;
    size_t lo = n * (size_t)c->rank / (size_t)c->size;
    size_t hi = n * (size_t)(c->rank + 1) / (size_t)c->size;
    g->bufs[c->rank] = buf;
    pthread_barrier_wait(&g->bar);
    for (size_t i = lo; i < hi; i++) {
        float s = 0.0f;
        for (int r = 0; r < g->size; r++)
            s += g->bufs[r][i];
        for (int r = 0; r < g->size; r++)
            g->bufs[r][i] = s;
    }
    pthread_barrier_wait(&g->bar);
    return 0;
}

static void cpu_destroy(struct cvlm_comm *c)
{
    struct group *g = ((struct cpu_comm *)c)->g;
    if (atomic_fetch_sub(&g->refs, 1) == 1) {
        pthread_barrier_destroy(&g->bar);
        free(g);
    }
    free(c);
}

static const struct cvlm_comm_i cpu_ops = {cpu_allreduce, cpu_destroy};

static void single_destroy(struct cvlm_comm *c)
{
    free(c);
}

static int single_allreduce(struct cvlm_comm *c, void *buf, size_t n)
{
    (void)c, (void)buf, (void)n;
    return 0;
}

static const struct cvlm_comm_i single_ops = {single_allreduce, single_destroy};

int cvlm_comm_cpu_group_create(struct cvlm_backend *const *be, int n, struct cvlm_comm **out)
{
    struct group *g;
    if (n < 1 || n > CVLM_COMM_MAX_RANKS)
        return cvlm_errf(CVLM_EINVAL, "%d ranks (1..%d)", n, CVLM_COMM_MAX_RANKS);
    for (int r = 0; n > 1 && r < n; r++)
        if (be[r]->act_dtype != CVLM_DTYPE_F32)
            return cvlm_errf(CVLM_EINVAL, "in-process ranks need host F32 activations (%s)",
                             be[r]->ops->name);
    if (n == 1) {
        struct cvlm_comm *c = calloc(1, sizeof(*c));
        if (!c)
            return cvlm_errf(CVLM_ENOMEM, "out of memory");
        *c = (struct cvlm_comm){&single_ops, 0, 1, be[0]};
        out[0] = c;
        return 0;
    }
    if (!(g = calloc(1, sizeof(*g))))
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    g->size = n;
    if (pthread_barrier_init(&g->bar, NULL, (unsigned)n)) {
        free(g);
        return cvlm_errf(CVLM_ENOMEM, "cannot create a barrier");
    }
    for (int r = 0; r < n; r++) {
        struct cpu_comm *c = calloc(1, sizeof(*c));
        if (!c) {
            for (int k = 0; k < r; k++)
                cvlm_comm_destroy(out[k]);
            if (!r) {
                pthread_barrier_destroy(&g->bar);
                free(g);
            }
            return cvlm_errf(CVLM_ENOMEM, "out of memory");
        }
        c->c = (struct cvlm_comm){&cpu_ops, r, n, be[r]};
        c->g = g;
        atomic_fetch_add(&g->refs, 1);
        out[r] = &c->c;
    }
    return 0;
}

void cvlm_comm_destroy(struct cvlm_comm *c)
{
    if (c)
        c->ops->destroy(c);
}
