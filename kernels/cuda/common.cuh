/* common.cuh - internals shared by the CUDA backend's files (never included by engine/).
 *
 * The backend (struct cuda_backend) owns one device, one non-blocking stream on which every
 * op is issued in call order, the cuBLAS/cuBLASLt handles bound to that stream, the
 * device memory it hands out (a free list, so that runtime alloc/free does not hit
 * cudaMalloc/cudaFree), the weight allocations made by upload_weights, a ring of pinned
 * + device memory for the small host metadata ops receive (ids, positions, block tables),
 * and grow-only device scratch buffers. One thread drives a backend at a time (the
 * engine thread, or the rank's worker thread with tensor parallelism); alloc/free also
 * take a mutex because model creation may run on another thread.
 *
 * No cudaFree inside a step: with tensor parallelism a peer rank may be waiting in an NCCL
 * kernel, and cudaFree's implicit synchronisation can deadlock against it. Blocks that
 * are replaced while ops may be in flight (grown scratch, the big metadata buffer) go on
 * a deferred list, and the free list is trimmed, only at a safe point: a successful
 * cvlm_backend_cuda_status() (the engine calls it once every rank has finished a step),
 * an alloc when no op was issued since that point, and destroy.
 *
 * Errors: ops return void, so the first failure (a CUDA/cuBLAS error, a bad shape) is
 * recorded in the backend with file:line (sticky; also passed to cvlm_errf on the calling
 * thread) and every later op becomes a no-op until it is cleared. to_host fills its output
 * with NaN and upload_weights returns the code; cvlm_backend_cuda_status() reports it.
 *
 * Activations are BF16 (act_dtype); every kernel accumulates in F32.
 */
#ifndef CVLM_CUDA_COMMON_CUH
#define CVLM_CUDA_COMMON_CUH

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <pthread.h>
#include <stdint.h>

extern "C" {
#include "engine/backend.h"
#include "engine/error.h"
#include "kernels/cuda/cuda_api.h"
}

typedef __nv_bfloat16 bf16;

/* one device allocation handed out by alloc (live) or kept for reuse (free list) */
struct cu_block {
    void *p;
    size_t cap;
    struct cu_block *next;
};

/* Grow-only device scratch, one per purpose (ops of different purposes may overlap in
 * flight; ops of one purpose are ordered by the stream). */
enum cu_scratch_id {
    CU_SCRATCH_CONV = 0, /* F32 staging of to_host / from_host / patchify */
    CU_SCRATCH_ATTN = 1, /* split-K partial results of the decode attention */
    CU_SCRATCH_QDEQ = 2, /* quantized weights dequantized to BF16 for cuBLAS (gemm_q.cu) */
    CU_SCRATCH_N
};

#define CU_META_HALF ((size_t)4 << 20) /* bytes per half of the metadata ring */
#define CU_META_CACHE 8                /* recent uploads remembered by content */

struct cu_meta_entry {
    void *host; /* a copy of the uploaded bytes (malloc'd, cap bytes) */
    size_t n, cap;
    const void *dev;
    int half; /* the ring half holding it; -1 = empty */
};

struct cu_gemm_cache;

struct cuda_backend {
    struct cvlm_backend base;
    int device, sm_count, cc_major, cc_minor;
    size_t smem_optin; /* max dynamic shared memory per block after opt-in */
    cudaStream_t stream;
    cublasHandle_t blas;
    cublasLtHandle_t lt;
    void *lt_ws;
    size_t lt_ws_size;
    /* sticky error */
    int err;
    char err_msg[512];
    /* device memory handed out by alloc */
    pthread_mutex_t mem_mu;
    struct cu_block *live, *free_list;
    size_t free_bytes;
    struct cu_block *deferred; /* blocks to cudaFree at the next safe point */
    int in_step;               /* an op was issued since the last safe point */
    /* allocations made by upload_weights, freed at destroy */
    void **weights;
    int n_weights, cap_weights;
    /* metadata ring: two halves of pinned host + device memory (see cu_upload) */
    char *meta_host, *meta_dev, *meta_big;
    size_t meta_off, meta_big_cap;
    int meta_half;
    cudaEvent_t meta_ev[2];
    struct cu_meta_entry meta_cache[CU_META_CACHE];
    int meta_next;
    /* scratch */
    void *scratch[CU_SCRATCH_N];
    size_t scratch_cap[CU_SCRATCH_N];
    void *host_tmp; /* host scratch for packing metadata */
    size_t host_tmp_cap;
    struct cu_gemm_cache *gemm;
    int attn_simple;  /* COGVLM_CUDA_ATTN=simple: reference attention kernels only */
    int smem_set[16]; /* flash kernel variants whose max dynamic smem was raised */
    /* norm kernels (rmsnorm, layernorm): static shared bytes and the dynamic shared bytes
     * they may take, asked of the runtime at the first launch (0 = not yet asked) */
    size_t norm_static[2], norm_dyn_max[2];
};

static inline struct cuda_backend *cu_of(struct cvlm_backend *be)
{
    return (struct cuda_backend *)be;
}

/* ---- error recording (backend_cuda.cu) ------------------------------------------------ */

/* Records the first error of the backend (file:line + message) and passes it to
 * cvlm_errf on this thread. */
void cu_fail(struct cuda_backend *cb, int code, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
bool cu_check_rt(struct cuda_backend *cb, cudaError_t e, const char *what, const char *file,
                 int line);
bool cu_check_blas(struct cuda_backend *cb, cublasStatus_t s, const char *what, const char *file,
                   int line);

#define CU_RT(cb, call) cu_check_rt((cb), (call), #call, __FILE__, __LINE__)
#define CU_BLAS(cb, call) cu_check_blas((cb), (call), #call, __FILE__, __LINE__)
/* after a kernel launch: launch-configuration errors surface here, faults at to_host */
#define CU_LAUNCHED(cb, name) cu_check_rt((cb), cudaGetLastError(), name, __FILE__, __LINE__)
/* a cheap entry assertion of an op: records CVLM_ESHAPE and makes the op return */
#define CU_REQUIRE(cb, cond, ...)                                        \
    do {                                                                 \
        if (!(cond)) {                                                   \
            cu_fail((cb), CVLM_ESHAPE, __FILE__, __LINE__, __VA_ARGS__); \
            return;                                                      \
        }                                                                \
    } while (0)

/* Makes the backend's device current on this thread; false if the backend already holds
 * an error (the op is then skipped). Every op starts with it (and so opens a step: no
 * cudaFree until the next safe point). */
bool cu_enter(struct cuda_backend *cb);

/* ---- memory helpers (backend_cuda.cu) -------------------------------------------------- */

/* Copies n bytes of host metadata into device memory that stays valid for the kernels
 * issued next on the stream (at least the next CU_META_HALF bytes of uploads). The host
 * bytes may change as soon as it returns. Identical recent uploads are reused. NULL on
 * error (recorded). */
const void *cu_upload(struct cuda_backend *cb, const void *host, size_t n);
/* Device scratch of at least `bytes` for purpose id; NULL on error (recorded). */
void *cu_scratch(struct cuda_backend *cb, enum cu_scratch_id id, size_t bytes);
/* Host scratch of at least `bytes` (packing metadata); NULL on error (recorded). */
void *cu_host_tmp(struct cuda_backend *cb, size_t bytes);

/* ---- launch helpers ------------------------------------------------------------------- */

static inline unsigned cu_blocks(size_t n, unsigned threads, unsigned cap = 65535u * 16u)
{
    size_t b = (n + threads - 1) / threads;
    return (unsigned)(b < 1 ? 1 : b > cap ? cap : b);
}

static inline bool cu_aligned16(const void *p)
{
    return ((uintptr_t)p & 15u) == 0;
}

/* ---- device helpers ------------------------------------------------------------------- */

/* Element i of a weight of any stored dtype, widened to float. */
__device__ __forceinline__ float cu_ldw(const void *p, int dtype, size_t i)
{
    if (dtype == CVLM_DTYPE_BF16)
        return __bfloat162float(((const bf16 *)p)[i]);
    if (dtype == CVLM_DTYPE_F16)
        return __half2float(((const __half *)p)[i]);
    return ((const float *)p)[i];
}

__device__ __forceinline__ float cu_warp_sum(float v)
{
    for (int o = 16; o; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float cu_warp_max(float v)
{
    for (int o = 16; o; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Sum (is_max false) or max over the block; every thread gets the result. `red` is
 * shared memory of 32 floats; blockDim.x a multiple of 32. */
__device__ __forceinline__ float cu_block_reduce(float v, float *red, bool is_max)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = is_max ? cu_warp_max(v) : cu_warp_sum(v);
    __syncthreads(); /* red may still be read by a previous reduction */
    if (lane == 0)
        red[warp] = v;
    __syncthreads();
    float r = lane < nw ? red[lane] : (is_max ? -INFINITY : 0.0f);
    return is_max ? cu_warp_max(r) : cu_warp_sum(r);
}

/* 8 BF16 values of a 16-byte word widened to float */
__device__ __forceinline__ void cu_unpack8(uint4 w, float *f)
{
    const __nv_bfloat162 *h = (const __nv_bfloat162 *)&w;
    for (int i = 0; i < 4; i++) {
        float2 t = __bfloat1622float2(h[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}

__device__ __forceinline__ uint4 cu_pack8(const float *f)
{
    uint4 w;
    __nv_bfloat162 *h = (__nv_bfloat162 *)&w;
    for (int i = 0; i < 4; i++)
        h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    return w;
}

#endif
