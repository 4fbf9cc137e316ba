/* comm.h - collectives between tensor-parallel ranks (cogvlm-model.md §8).
 *
 * A TP group of n ranks is n struct cvlm_comm, one per rank, each used by that rank's
 * worker thread only. The model needs one collective: a sum all-reduce of an activation
 * buffer (act_dtype elements in the rank's backend memory) after every row-parallel GEMM.
 * Every rank must call it with the same n, in the same order; it returns once the sum of
 * all ranks' buffers is in every rank's buffer.
 *
 * Three implementations (architecture page, "Tensor parallelism"):
 * - single rank: a no-op (tp = 1),
 * - in-process CPU ranks: threads exchanging through shared host buffers; the sum is taken
 *   in rank order, so every rank gets bit-identical results and runs are deterministic,
 * - NCCL (kernels/cuda/comm_nccl.cu, one process driving all GPUs); a build without CUDA
 *   links a stub that fails with "not built with CUDA".
 */
#ifndef CVLM_COMM_H
#define CVLM_COMM_H

#include "engine/backend.h"

#include <stddef.h>

#define CVLM_COMM_MAX_RANKS 8

struct cvlm_comm;

struct cvlm_comm_i {
    /* buf[0..n) = sum over ranks of buf[0..n); buf in this rank's backend memory */
    int (*allreduce)(struct cvlm_comm *c, void *buf, size_t n);
    /* frees this rank's handle; the group's shared state goes with the last one */
    void (*destroy)(struct cvlm_comm *c);
};

struct cvlm_comm {
    const struct cvlm_comm_i *ops;
    int rank, size;
    struct cvlm_backend *be; /* this rank's backend */
};

static inline int cvlm_comm_allreduce(struct cvlm_comm *c, void *buf, size_t n)
{
    return c->size > 1 ? c->ops->allreduce(c, buf, n) : 0;
}

/* Creates the n handles of one group over the ranks' backends be[0..n): out[r] for rank r.
 * n == 1 gives the no-op (for any backend). Returns 0 or a negative CVLM_E* code (nothing
 * created). */
int cvlm_comm_cpu_group_create(struct cvlm_backend *const *be, int n, struct cvlm_comm **out);
int cvlm_comm_nccl_group_create(struct cvlm_backend *const *be, int n, struct cvlm_comm **out);

void cvlm_comm_destroy(struct cvlm_comm *c);

#endif
