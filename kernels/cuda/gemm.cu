/* gemm.cu - y[M,N] = x[M,K] . W[N,K]^T (+ bias[N]) on the CUDA backend.
 *
 * Weights are BF16 in device memory (upload_weights converts F32/F16 checkpoints to BF16,
 * see weights.cu), activations BF16, accumulation F32. Three paths:
 * - M <= GEMV_MAX_M (decode): a matrix-vector kernel that streams every W row once with
 *   16-byte loads, one warp per output column; weight-bandwidth bound by design.
 * - otherwise cuBLASLt: row-major y = x W^T is the column-major product
 *   Y^T[N,M] = W^T(op T on the [K,N] col-major view of W) . X^T([K,M], ld x_stride), with
 *   the bias as the BIAS epilogue. Descriptors and the heuristic's algorithm are cached
 *   per shape and pointer alignment (a plan): building them costs tens of microseconds,
 *   more than a decode-sized GEMM. If Lt offers no algorithm (odd strides) or fails,
 *   cublasGemmEx plus a separate bias kernel does the job.
 * - weights that are not BF16 (not uploaded through upload_weights): a simple tiled F32
 *   kernel that widens any dtype; correct, not fast.
 * - quantized weights (Q8 / Q4): gemm_q.cu.
 */
#include "kernels/cuda/elementwise.cuh"
#include "kernels/cuda/gemm.cuh"

#include <stdlib.h>
#include <string.h>

#define GEMV_MAX_M 4
#define GEMV_WARPS 8
#define GEMM_PLANS 512 /* cache slots (open addressing) */
#define GEMM_PROBE 8

struct gemm_key {
    int M, N, K, ldx, bias;
    int al_w, al_x, al_y; /* alignment of the pointers, bytes (<= 256) */
};

struct gemm_plan {
    struct gemm_key key;
    int state; /* 0 empty, 1 Lt plan ready, 2 Lt has no algorithm: use GemmEx */
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algo;
};

struct cu_gemm_cache {
    struct gemm_plan p[GEMM_PLANS];
    int use_gemv;
};

/* ---- the decode path ------------------------------------------------------------------ */

/* y[m][n] = sum_k x[m][k] w[n][k] (+ b[n]) for m < M: warp per n, lanes over K in 8s. */
template <int M>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
    k_gemv(bf16 *y, const bf16 *x, int ldx, const bf16 *w, const bf16 *bias, int N, int K)
{
    int lane = threadIdx.x & 31;
    int n = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (n >= N)
        return;
    const uint4 *wr = (const uint4 *)(w + (size_t)n * K);
    float acc[M];
    for (int m = 0; m < M; m++)
        acc[m] = 0;
    int k8 = K / 8;
#pragma unroll 4
    for (int i = lane; i < k8; i += 32) {
        float wv[8], xv[8];
        cu_unpack8(__ldg(wr + i), wv);
        for (int m = 0; m < M; m++) {
            cu_unpack8(__ldg((const uint4 *)(x + (size_t)m * ldx) + i), xv);
            for (int j = 0; j < 8; j++)
                acc[m] = fmaf(wv[j], xv[j], acc[m]);
        }
    }
    for (int m = 0; m < M; m++) {
        float s = cu_warp_sum(acc[m]);
        if (lane == 0)
            y[(size_t)m * N + n] = __float2bfloat16_rn(bias ? s + __bfloat162float(bias[n]) : s);
    }
}

static bool gemv(struct cuda_backend *cb, bf16 *y, const bf16 *x, int ldx, const bf16 *w,
                 const bf16 *bias, int M, int N, int K)
{
    unsigned grid = (unsigned)((N + GEMV_WARPS - 1) / GEMV_WARPS), threads = GEMV_WARPS * 32;
    switch (M) {
    case 1: k_gemv<1><<<grid, threads, 0, cb->stream>>>(y, x, ldx, w, bias, N, K); break;
    case 2: k_gemv<2><<<grid, threads, 0, cb->stream>>>(y, x, ldx, w, bias, N, K); break;
    case 3: k_gemv<3><<<grid, threads, 0, cb->stream>>>(y, x, ldx, w, bias, N, K); break;
    default: k_gemv<4><<<grid, threads, 0, cb->stream>>>(y, x, ldx, w, bias, N, K); break;
    }
    return CU_LAUNCHED(cb, "gemv");
}

/* ---- the fallback for non-BF16 weights -------------------------------------------------- */

#define ST 64 /* output tile edge */
#define SK 16 /* k slice */

/* 16x16 threads, each 4x4 outputs of a 64x64 tile; x and W slices staged in shared
 * memory as F32 (W widened from its dtype). */
__global__ void k_gemm_simt(bf16 *y, const bf16 *x, int ldx, const void *w, int wdt, const void *b,
                            int bdt, int M, int N, int K)
{
    __shared__ float xs[SK][ST + 1], ws[SK][ST + 1];
    int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    int m0 = blockIdx.y * ST, n0 = blockIdx.x * ST;
    float acc[4][4] = {{0}};
    for (int k0 = 0; k0 < K; k0 += SK) {
        for (int i = threadIdx.x; i < SK * ST; i += 256) {
            int r = i / SK, k = i % SK;
            bool kin = k0 + k < K;
            xs[k][r] = kin && m0 + r < M ? __bfloat162float(x[(size_t)(m0 + r) * ldx + k0 + k]) : 0;
            ws[k][r] = kin && n0 + r < N ? cu_ldw(w, wdt, (size_t)(n0 + r) * K + k0 + k) : 0;
        }
        __syncthreads();
        for (int k = 0; k < SK; k++)
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++)
                    acc[i][j] += xs[k][ty * 4 + i] * ws[k][tx * 4 + j];
        __syncthreads();
    }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) {
            int m = m0 + ty * 4 + i, n = n0 + tx * 4 + j;
            if (m < M && n < N)
                y[(size_t)m * N + n] =
                    __float2bfloat16_rn(acc[i][j] + (b ? cu_ldw(b, bdt, n) : 0.0f));
        }
}

/* ---- cuBLASLt plans ------------------------------------------------------------------------- */

static int align_of(const void *p)
{
    uintptr_t u = (uintptr_t)p;
    int a = 1;
    while (a < 256 && !(u & (uintptr_t)a))
        a <<= 1;
    return a;
}

static void plan_release(struct gemm_plan *p)
{
    if (p->op)
        cublasLtMatmulDescDestroy(p->op);
    if (p->a)
        cublasLtMatrixLayoutDestroy(p->a);
    if (p->b)
        cublasLtMatrixLayoutDestroy(p->b);
    if (p->c)
        cublasLtMatrixLayoutDestroy(p->c);
    memset(p, 0, sizeof(*p));
}

/* Builds descriptors and asks the heuristic for one algorithm; state 1 or 2. */
static void plan_build(struct cuda_backend *cb, struct gemm_plan *p, const struct gemm_key *k)
{
    cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    cublasLtMatmulPreference_t pref = NULL;
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    uint32_t al[4] = {(uint32_t)k->al_w, (uint32_t)k->al_x, (uint32_t)k->al_y, (uint32_t)k->al_y};
    p->key = *k;
    p->state = 2;
    if (cublasLtMatmulDescCreate(&p->op, CUBLAS_COMPUTE_32F, CUDA_R_32F) ||
        cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)) ||
        cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)) ||
        (k->bias &&
         cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi))) ||
        cublasLtMatrixLayoutCreate(&p->a, CUDA_R_16BF, (uint64_t)k->K, (uint64_t)k->N, k->K) ||
        cublasLtMatrixLayoutCreate(&p->b, CUDA_R_16BF, (uint64_t)k->K, (uint64_t)k->M, k->ldx) ||
        cublasLtMatrixLayoutCreate(&p->c, CUDA_R_16BF, (uint64_t)k->N, (uint64_t)k->M, k->N) ||
        cublasLtMatmulPreferenceCreate(&pref))
        goto out;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                         &cb->lt_ws_size, sizeof(cb->lt_ws_size));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al[0],
                                         4);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al[1],
                                         4);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al[2],
                                         4);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al[3],
                                         4);
    if (cublasLtMatmulAlgoGetHeuristic(cb->lt, p->op, p->a, p->b, p->c, p->c, pref, 1, &res,
                                       &found) == CUBLAS_STATUS_SUCCESS &&
        found > 0) {
        p->algo = res.algo;
        p->state = 1;
    }
out:
    if (pref)
        cublasLtMatmulPreferenceDestroy(pref);
}

static unsigned key_hash(const struct gemm_key *k)
{
    const int *v = (const int *)k;
    unsigned h = 2166136261u;
    for (size_t i = 0; i < sizeof(*k) / sizeof(int); i++)
        h = (h ^ (unsigned)v[i]) * 16777619u;
    return h;
}

static struct gemm_plan *plan_get(struct cuda_backend *cb, const struct gemm_key *k)
{
    unsigned h = key_hash(k);
    struct gemm_plan *home = &cb->gemm->p[h % GEMM_PLANS];
    for (int i = 0; i < GEMM_PROBE; i++) {
        struct gemm_plan *p = &cb->gemm->p[(h + i) % GEMM_PLANS];
        if (p->state && !memcmp(&p->key, k, sizeof(*k)))
            return p;
        if (!p->state) {
            plan_build(cb, p, k);
            return p;
        }
    }
    plan_release(home); /* all probed slots taken: evict the home slot */
    plan_build(cb, home, k);
    return home;
}

static bool lt_gemm(struct cuda_backend *cb, struct gemm_plan *p, bf16 *y, const bf16 *x,
                    const bf16 *w, const bf16 *bias)
{
    const float one = 1.0f, zero = 0.0f;
    if (p->state != 1)
        return false;
    if (bias && cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                               sizeof(bias)))
        return false;
    if (cublasLtMatmul(cb->lt, p->op, &one, w, p->a, x, p->b, &zero, y, p->c, y, p->c, &p->algo,
                       cb->lt_ws, cb->lt_ws_size, cb->stream) != CUBLAS_STATUS_SUCCESS) {
        p->state = 2; /* never again for this plan: GemmEx from now on */
        return false;
    }
    return true;
}

/* ---- entry ----------------------------------------------------------------------------------- */

void cu_gemm(struct cvlm_backend *be, void *y, const void *x, int x_stride,
             const struct cvlm_tensor *w, const struct cvlm_tensor *bias, int M, int N, int K)
{
    struct cuda_backend *cb = cu_of(be);
    if (M <= 0 || N <= 0 || !cu_enter(cb))
        return;
    CU_REQUIRE(cb, K > 0 && x_stride >= K && w && w->data && cvlm_tensor_numel(w) == (int64_t)N * K,
               "gemm: W of %lld elements for N %d K %d (x stride %d)",
               w ? (long long)cvlm_tensor_numel(w) : -1LL, N, K, x_stride);
    CU_REQUIRE(cb, !bias || (bias->data && cvlm_tensor_numel(bias) == N),
               "gemm: bias does not have N = %d elements", N);
    bf16 *yb = (bf16 *)y;
    const bf16 *xb = (const bf16 *)x, *wb = (const bf16 *)w->data;
    const bf16 *bb = bias && bias->dtype == CVLM_DTYPE_BF16 ? (const bf16 *)bias->data : NULL;
    if (cvlm_dtype_is_quant(w->dtype)) {
        cu_gemm_q(cb, yb, xb, x_stride, w, bias, M, N, K, cb->gemm->use_gemv);
        return;
    }
    if (w->dtype != CVLM_DTYPE_BF16) {
        dim3 grid((unsigned)((N + ST - 1) / ST), (unsigned)((M + ST - 1) / ST));
        k_gemm_simt<<<grid, 256, 0, cb->stream>>>(yb, xb, x_stride, w->data, w->dtype,
                                                  bias ? bias->data : NULL,
                                                  bias ? (int)bias->dtype : 0, M, N, K);
        CU_LAUNCHED(cb, "gemm_simt");
        return;
    }
    if (cb->gemm->use_gemv && M <= GEMV_MAX_M && K % 8 == 0 && x_stride % 8 == 0 &&
        cu_aligned16(x) && cu_aligned16(wb) && (!bias || bb)) {
        gemv(cb, yb, xb, x_stride, wb, bb, M, N, K);
        return;
    }
    struct gemm_key key = {M, N, K, x_stride, bb != NULL, align_of(wb), align_of(xb), align_of(yb)};
    if (lt_gemm(cb, plan_get(cb, &key), yb, xb, wb, bb)) {
        if (bias && !bb) /* a bias that is not BF16: the epilogue could not take it */
            cu_add_bias(cb, yb, bias->data, bias->dtype, M, N);
        return;
    }
    const float one = 1.0f, zero = 0.0f;
    if (!CU_BLAS(cb, cublasGemmEx(cb->blas, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, wb,
                                  CUDA_R_16BF, K, xb, CUDA_R_16BF, x_stride, &zero, yb, CUDA_R_16BF,
                                  N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)))
        return;
    if (bias)
        cu_add_bias(cb, yb, bias->data, bias->dtype, M, N);
}

int cu_gemm_cache_create(struct cuda_backend *cb)
{
    const char *env = getenv("COGVLM_CUDA_GEMV");
    cb->gemm = (struct cu_gemm_cache *)calloc(1, sizeof(*cb->gemm));
    if (!cb->gemm)
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    cb->gemm->use_gemv = !(env && !strcmp(env, "0"));
    return 0;
}

void cu_gemm_cache_destroy(struct cuda_backend *cb)
{
    if (!cb->gemm)
        return;
    for (int i = 0; i < GEMM_PLANS; i++)
        if (cb->gemm->p[i].state)
            plan_release(&cb->gemm->p[i]);
    free(cb->gemm);
    cb->gemm = NULL;
}
