/* norm.cu - RMSNorm (also fused with the residual add) and LayerNorm over rows of BF16
 * activations (weights of any dtype).
 *
 * One block per row. The row is read once into shared memory as F32 (D <= NORM_SMEM_MAX,
 * every CogVLM width), the statistics are block reductions in F32, and LayerNorm's
 * variance is taken around the mean in a second pass over the cached row (the one-pass
 * E[x^2] - mean^2 form loses digits when |mean| >> std). Wider rows fall back to reading
 * x from global memory in each pass. y may alias x: every thread writes only the elements
 * it read, after the reductions.
 *
 * Shared memory: the row cache is dynamic, the reduction scratch (`red`, 128 bytes) static.
 * A block may take 48 KiB of the two together without opting in, and at most the device's
 * opt-in limit with it: norm_smem() asks the runtime for the kernel's static size, opts
 * in when the sum passes 48 KiB, and drops the cache when it would not fit at all.
 */
#include "kernels/cuda/norm.cuh"

#define NORM_THREADS 256
#define NORM_SMEM_MAX 16384 /* floats of row cache: 64 KiB */

/* Loads row x into cache (when given) and returns the sum (or the sum of squares). */
__device__ float row_sum(const bf16 *x, float *cache, int D, float *red, bool squares)
{
    float s = 0;
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
        float v = __bfloat162float(x[c]);
        if (cache)
            cache[c] = v;
        s += squares ? v * v : v;
    }
    return cu_block_reduce(s, red, false);
}

/* y = RMSNorm(x) * w; with r, first x += r (rounded to BF16, exactly as the add op
 * stores it), the residual step between sub-layers. Every thread reads r and writes x and
 * y only at its own columns, so y may alias x or r. */
__global__ void k_rmsnorm(bf16 *y, bf16 *x, const bf16 *r, const void *w, int wdt, int M, int D,
                          float eps, int use_cache)
{
    extern __shared__ float cache[];
    __shared__ float red[32];
    for (int row = blockIdx.x; row < M; row += gridDim.x) {
        bf16 *xr = x + (size_t)row * D, *yr = y + (size_t)row * D;
        const bf16 *rr = r ? r + (size_t)row * D : NULL;
        float ss = 0;
        for (int c = threadIdx.x; c < D; c += blockDim.x) {
            float v = __bfloat162float(xr[c]);
            if (rr) {
                bf16 sum = __float2bfloat16_rn(v + __bfloat162float(rr[c]));
                v = __bfloat162float(sum);
                xr[c] = sum;
            }
            if (use_cache)
                cache[c] = v;
            ss += v * v;
        }
        float inv = rsqrtf(cu_block_reduce(ss, red, false) / (float)D + eps);
        for (int c = threadIdx.x; c < D; c += blockDim.x) {
            float v = use_cache ? cache[c] : __bfloat162float(xr[c]);
            yr[c] = __float2bfloat16_rn(v * inv * cu_ldw(w, wdt, c));
        }
        __syncthreads(); /* the cache is reused by the next row */
    }
}

__global__ void k_layernorm(bf16 *y, const bf16 *x, const void *w, int wdt, const void *b, int bdt,
                            int M, int D, float eps, int use_cache)
{
    extern __shared__ float cache[];
    __shared__ float red[32];
    for (int r = blockIdx.x; r < M; r += gridDim.x) {
        const bf16 *xr = x + (size_t)r * D;
        bf16 *yr = y + (size_t)r * D;
        float *cr = use_cache ? cache : NULL;
        float mean = row_sum(xr, cr, D, red, false) / (float)D, ss = 0;
        for (int c = threadIdx.x; c < D; c += blockDim.x) {
            float d = (cr ? cr[c] : __bfloat162float(xr[c])) - mean;
            ss += d * d;
        }
        float inv = rsqrtf(cu_block_reduce(ss, red, false) / (float)D + eps);
        for (int c = threadIdx.x; c < D; c += blockDim.x) {
            float v = cr ? cr[c] : __bfloat162float(xr[c]);
            float o = (v - mean) * inv * cu_ldw(w, wdt, c);
            yr[c] = __float2bfloat16_rn(b ? o + cu_ldw(b, bdt, c) : o);
        }
        __syncthreads();
    }
}

static unsigned norm_threads(int D)
{
    return D >= 2048 ? NORM_THREADS : D >= 512 ? 128 : 64;
}

enum { NORM_RMS = 0, NORM_LAYER = 1 }; /* index of cb->norm_static / norm_dyn_max */

/* The dynamic shared memory of a norm launch with a row cache of D floats: D * 4 bytes,
 * or 0 (no cache) when D > NORM_SMEM_MAX or cache + static would pass the device's
 * limit. Where cache + static passes 48 KiB, raises the kernel's dynamic limit (to all
 * the device allows, so that another backend on the device never sees it lowered). false
 * on a runtime error (recorded). */
static bool norm_smem(struct cuda_backend *cb, const void *kernel, int which, int D, size_t *smem)
{
    size_t dyn = (size_t)D * sizeof(float);
    *smem = 0;
    if (D > NORM_SMEM_MAX)
        return true;
    if (!cb->norm_static[which]) {
        cudaFuncAttributes fa;
        if (!CU_RT(cb, cudaFuncGetAttributes(&fa, kernel)))
            return false;
        /* a kernel without static shared memory counts 1 byte: 0 means "not asked" */
        cb->norm_static[which] = fa.sharedSizeBytes ? fa.sharedSizeBytes : 1;
        cb->norm_dyn_max[which] = (size_t)fa.maxDynamicSharedSizeBytes;
    }
    size_t stat = cb->norm_static[which];
    if (dyn + stat > cb->smem_optin)
        return true; /* the uncached path */
    /* raised to the device's limit at once: never lowered later */
    if (dyn > cb->norm_dyn_max[which]) {
        size_t lim = cb->smem_optin - stat;
        if (!CU_RT(cb, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            (int)lim)))
            return false;
        cb->norm_dyn_max[which] = lim;
    }
    *smem = dyn;
    return true;
}

/* x is written only when r is given (the add). */
static void rmsnorm_launch(struct cvlm_backend *be, void *y, void *x, const void *r,
                           const struct cvlm_tensor *w, int M, int D, float eps)
{
    struct cuda_backend *cb = cu_of(be);
    if (M <= 0 || !cu_enter(cb))
        return;
    CU_REQUIRE(cb, D > 0 && w && w->data && cvlm_tensor_numel(w) == D,
               "rmsnorm: weight of %lld elements for D %d",
               w ? (long long)cvlm_tensor_numel(w) : -1LL, D);
    size_t smem;
    if (!norm_smem(cb, (const void *)k_rmsnorm, NORM_RMS, D, &smem))
        return;
    int use_cache = smem > 0;
    unsigned grid = (unsigned)(M < 65535 ? M : 65535);
    k_rmsnorm<<<grid, norm_threads(D), smem, cb->stream>>>((bf16 *)y, (bf16 *)x, (const bf16 *)r,
                                                           w->data, w->dtype, M, D, eps, use_cache);
    CU_LAUNCHED(cb, r ? "add_rmsnorm" : "rmsnorm");
}

void cu_rmsnorm(struct cvlm_backend *be, void *y, const void *x, const struct cvlm_tensor *w, int M,
                int D, float eps)
{
    rmsnorm_launch(be, y, (void *)x, NULL, w, M, D, eps); /* x only read without r */
}

void cu_add_rmsnorm(struct cvlm_backend *be, void *y, void *x, const void *r,
                    const struct cvlm_tensor *w, int M, int D, float eps)
{
    rmsnorm_launch(be, y, x, r, w, M, D, eps);
}

void cu_layernorm(struct cvlm_backend *be, void *y, const void *x, const struct cvlm_tensor *w,
                  const struct cvlm_tensor *b, int M, int D, float eps)
{
    struct cuda_backend *cb = cu_of(be);
    if (M <= 0 || !cu_enter(cb))
        return;
    CU_REQUIRE(cb,
               D > 0 && w && w->data && cvlm_tensor_numel(w) == D &&
                   (!b || (b->data && cvlm_tensor_numel(b) == D)),
               "layernorm: weight/bias do not have %d elements", D);
    size_t smem;
    if (!norm_smem(cb, (const void *)k_layernorm, NORM_LAYER, D, &smem))
        return;
    int use_cache = smem > 0;
    unsigned grid = (unsigned)(M < 65535 ? M : 65535);
    k_layernorm<<<grid, norm_threads(D), smem, cb->stream>>>(
        (bf16 *)y, (const bf16 *)x, w->data, w->dtype, b ? b->data : NULL, b ? (int)b->dtype : 0, M,
        D, eps, use_cache);
    CU_LAUNCHED(cb, "layernorm");
}
