/* comm_nccl.cu - the NCCL implementation of engine/comm.h: one process drives all GPUs.
 *
 * cvlm_comm_nccl_group_create makes one NCCL communicator per rank with ncclCommInitAll
 * over the devices of the ranks' CUDA backends. Each rank's worker thread calls
 * allreduce on its own handle: a BF16 sum all-reduce in place, enqueued on that rank's
 * backend stream, so it is ordered after the GEMM that produced the partial sums and
 * before the ops that read the result, with no host synchronisation. Each handle owns its
 * communicator (destroyed with it); the group record goes with the last handle.
 * Built without NCCL headers (CVLM_NO_NCCL), creation fails with a clear message.
 */
#include "kernels/cuda/common.cuh"

extern "C" {
#include "engine/comm.h"
}

#include <stdlib.h>
#include <string.h>

#ifndef CVLM_NO_NCCL
#include <nccl.h>

struct nccl_group {
    int refs;
    pthread_mutex_t mu;
};

struct nccl_comm {
    struct cvlm_comm c; /* first: the public handle */
    struct nccl_group *g;
    ncclComm_t comm;
};

static int nccl_check(ncclResult_t r, const char *what, const char *file, int line)
{
    if (r == ncclSuccess)
        return 0;
    const char *base = strrchr(file, '/');
    return cvlm_errf(r == ncclSystemError ? CVLM_EIO : CVLM_EINVAL, "%s:%d: %s: %s",
                     base ? base + 1 : file, line, what, ncclGetErrorString(r));
}

#define NCCL_CHECK(call) nccl_check((call), #call, __FILE__, __LINE__)

static int nccl_allreduce(struct cvlm_comm *c, void *buf, size_t n)
{
    struct nccl_comm *nc = (struct nccl_comm *)c;
    struct cuda_backend *cb = cu_of(c->be);
    if (!cu_enter(cb))
        return cb->err;
    int rc = NCCL_CHECK(ncclAllReduce(buf, buf, n, ncclBfloat16, ncclSum, nc->comm, cb->stream));
    if (rc) /* also sticky in the backend: the ranks' results are now inconsistent */
        cu_fail(cb, rc, __FILE__, __LINE__, "all-reduce of %zu elements failed", n);
    return rc;
}

static void nccl_destroy(struct cvlm_comm *c)
{
    struct nccl_comm *nc = (struct nccl_comm *)c;
    struct nccl_group *g = nc->g;
    if (nc->comm) {
        cudaSetDevice(cu_of(c->be)->device);
        ncclCommDestroy(nc->comm);
    }
    pthread_mutex_lock(&g->mu);
    int last = --g->refs == 0;
    pthread_mutex_unlock(&g->mu);
    if (last) {
        pthread_mutex_destroy(&g->mu);
        free(g);
    }
    free(nc);
}

static const struct cvlm_comm_i nccl_ops = {nccl_allreduce, nccl_destroy};

/* The devices of the ranks' backends (all must be CUDA backends). */
static int rank_devices(struct cvlm_backend *const *be, int n, int *devs)
{
    for (int r = 0; r < n; r++) {
        if (!be[r] || strcmp(be[r]->ops->name, "cuda"))
            return cvlm_errf(CVLM_EINVAL, "NCCL rank %d: not a CUDA backend", r);
        devs[r] = cu_of(be[r])->device;
    }
    return 0;
}

extern "C" int cvlm_comm_nccl_group_create(struct cvlm_backend *const *be, int n,
                                           struct cvlm_comm **out)
{
    int devs[CVLM_COMM_MAX_RANKS], prev = 0, rc;
    ncclComm_t comms[CVLM_COMM_MAX_RANKS] = {};
    if (n < 1 || n > CVLM_COMM_MAX_RANKS)
        return cvlm_errf(CVLM_EINVAL, "%d ranks (1..%d)", n, CVLM_COMM_MAX_RANKS);
    if ((rc = rank_devices(be, n, devs)))
        return rc;
    struct nccl_group *g = (struct nccl_group *)calloc(1, sizeof(*g));
    struct nccl_comm *h[CVLM_COMM_MAX_RANKS] = {};
    bool mem_ok = g != NULL;
    for (int r = 0; mem_ok && r < n; r++)
        mem_ok = (h[r] = (struct nccl_comm *)calloc(1, sizeof(*h[r]))) != NULL;
    cudaGetDevice(&prev);
    rc = !mem_ok ? cvlm_errf(CVLM_ENOMEM, "out of memory")
         : n > 1 ? NCCL_CHECK(ncclCommInitAll(comms, n, devs))
                 : 0;
    cudaSetDevice(prev); /* ncclCommInitAll leaves another device current */
    /* frees whatever part was allocated (h[] is NULL past a failed calloc) */
    if (rc) {
        for (int r = 0; r < n; r++)
            free(h[r]);
        free(g);
        return rc;
    }
    pthread_mutex_init(&g->mu, NULL);
    g->refs = n;
    for (int r = 0; r < n; r++) {
        h[r]->c.ops = &nccl_ops;
        h[r]->c.rank = r;
        h[r]->c.size = n;
        h[r]->c.be = be[r];
        h[r]->g = g;
        h[r]->comm = comms[r];
        out[r] = &h[r]->c;
    }
    return 0;
}

#else /* CVLM_NO_NCCL */

extern "C" int cvlm_comm_nccl_group_create(struct cvlm_backend *const *be, int n,
                                           struct cvlm_comm **out)
{
    (void)be, (void)n, (void)out;
    return cvlm_errf(CVLM_EUNSUPPORTED, "built without NCCL (nccl.h was not found): "
                                        "tensor parallelism on CUDA is unavailable");
}

#endif
