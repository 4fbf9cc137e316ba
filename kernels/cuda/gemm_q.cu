/* gemm_q.cu - y[M,N] = x[M,K] . W[N,K]^T (+ bias[N]) with quantized weights on the CUDA
 * backend: W8A16 (Q8) and W4A16 (Q4), activations BF16, accumulation F32.
 *
 * Weights are in the format of engine/backend.h (enum cvlm_dtype, struct cvlm_tensor), as
 * upload_weights leaves them in device memory: the codes (Q8 int8 [N][K]; Q4 K/2 bytes per
 * row, every 16 bytes 32 weights, byte j = weight j low nibble, weight j + 16 high nibble,
 * value nibble - 8), scales F32 [N][groups] (Q8 one group per row, Q4 groups of
 * CVLM_Q4_GROUP along K, the last one of a row maybe shorter), and optionally mins (value
 * = q * scale + mins[same index]) and perm (stored column k multiplies x[perm[k]]).
 *
 * Two paths:
 * - M <= QV_MAX_M (decode and small decode batches), k_qgemv: the weights are streamed
 *   from memory once per launch, 16 bytes per lane per load, dequantized in registers;
 *   x is staged in shared memory as F32, one K tile of QV_KT columns at a time, gathered
 *   through perm on the way in (so the hot loop never sees perm); blocks of one weight
 *   slice for different M tiles are adjacent in the grid, so a second M tile of rows
 *   finds the slice in L2.
 * - otherwise (prefill, the vision tower), and wherever the GEMV cannot take the shape
 *   (Q8 with K % 16 != 0, unaligned codes): W is dequantized to BF16 in chunks of rows
 *   into grow-only scratch (CU_SCRATCH_QDEQ, at most QDEQ_ELEMS elements; replaced
 *   buffers are freed at the next safe point, never inside a step), columns scattered
 *   back to x's order through perm, and each chunk is one cublasGemmEx writing its columns
 *   of y; the bias is added after the last chunk. The chunks run in stream order, so
 *   one scratch buffer serves them all.
 */
#include "kernels/cuda/elementwise.cuh"
#include "kernels/cuda/gemm.cuh"

#define QV_WARPS 8                   /* warps per GEMV block */
#define QV_KT 1024                   /* stored columns per K tile */
#define QV_XLD (QV_KT + QV_KT / 8)   /* floats per staged x row: 4 of padding per 32 */
#define QV_MAX_M 64                  /* the GEMV's largest M (8 tiles of 8 rows) */
#define QDEQ_ELEMS ((size_t)1 << 24) /* BF16 elements of one dequantized chunk (32 MiB) */

/* A quantized W as the kernels see it (device pointers). */
struct qw {
    const unsigned char *q; /* codes */
    const float *s, *mn;    /* scales, mins (NULL: none) [N][ng] */
    const int32_t *perm;    /* [K] or NULL */
    int N, K, ng, q4;
};

/* Index of stored column k (within a K tile) in a staged x row: 4 floats of padding after
 * every 32 keep the float4 reads of a warp free of bank conflicts (see tile_q4/tile_q8). */
__device__ __forceinline__ int qv_xi(int k)
{
    return k + (k >> 5) * 4;
}

/* dot of 32 Q4 weights (one 16-byte word) with 32 consecutive staged floats at xs
 * (16-byte aligned): byte j of the word holds weight j (low nibble) and j + 16 (high). */
__device__ __forceinline__ float dot_q4(uint4 wv, const float *xs)
{
    const uint32_t u[4] = {wv.x, wv.y, wv.z, wv.w};
    float d = 0;
#pragma unroll
    for (int h = 0; h < 2; h++) /* h 0: weights 0..15 (low nibbles), 1: 16..31 (high) */
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float4 xv = *(const float4 *)(xs + 16 * h + 4 * i);
            uint32_t b = u[i] >> (4 * h);
            d = fmaf((float)((int)(b & 15u) - 8), xv.x, d);
            d = fmaf((float)((int)((b >> 8) & 15u) - 8), xv.y, d);
            d = fmaf((float)((int)((b >> 16) & 15u) - 8), xv.z, d);
            d = fmaf((float)((int)((b >> 24) & 15u) - 8), xv.w, d);
        }
    return d;
}

/* dot of 16 Q8 weights (one 16-byte word) with 16 consecutive staged floats */
__device__ __forceinline__ float dot_q8(uint4 wv, const float *xs)
{
    const uint32_t u[4] = {wv.x, wv.y, wv.z, wv.w};
    float d = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float4 xv = *(const float4 *)(xs + 4 * i);
        d = fmaf((float)(signed char)(u[i] & 0xffu), xv.x, d);
        d = fmaf((float)(signed char)((u[i] >> 8) & 0xffu), xv.y, d);
        d = fmaf((float)(signed char)((u[i] >> 16) & 0xffu), xv.z, d);
        d = fmaf((float)(signed char)(u[i] >> 24), xv.w, d);
    }
    return d;
}

__device__ __forceinline__ float sum_n(const float *xs, int n)
{
    float s = 0;
    for (int i = 0; i < n; i += 4) {
        float4 xv = *(const float4 *)(xs + i);
        s += (xv.x + xv.y) + (xv.z + xv.w);
    }
    return s;
}

/* y rows m0 .. m0 + MT - 1 (those < M) times W rows n0 .. n0 + R - 1 (those < N), one warp.
 * Launch contract (qgemv below): blockDim.x = QV_WARPS * 32; gridDim.x = n_mt * ceil(N /
 * (QV_WARPS * R)), block b taking M tile b % n_mt and W slice b / n_mt; n_mt * MT >= M;
 * static shared memory MT * QV_XLD floats (<= 36 KiB); codes 16-byte aligned with rows of
 * 16-byte multiples (Q4: K % 32 == 0; Q8: K % 16 == 0); x rows ldx elements apart. */
template <int MT, int R>
__global__ void __launch_bounds__(QV_WARPS * 32)
    k_qgemv(bf16 *y, const bf16 *x, int ldx, int M, struct qw w, const void *bias, int bdt,
            int n_mt)
{
    __shared__ __align__(16) float xs[MT * QV_XLD];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int m0 = (int)(blockIdx.x % (unsigned)n_mt) * MT;
    const int n0 = ((int)(blockIdx.x / (unsigned)n_mt) * QV_WARPS + warp) * R;
    const size_t row_bytes = w.q4 ? (size_t)w.K / 2 : (size_t)w.K;
    float acc[MT][R];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int r = 0; r < R; r++)
            acc[m][r] = 0;
    for (int k0 = 0; k0 < w.K; k0 += QV_KT) {
        const int kn = min(QV_KT, w.K - k0);
        __syncthreads(); /* every warp is done with the previous tile */
        for (int i = threadIdx.x; i < MT * QV_KT; i += blockDim.x) {
            int m = i / QV_KT, k = i % QV_KT;
            float v = 0;
            if (k < kn && m0 + m < M) {
                int src = w.perm ? w.perm[k0 + k] : k0 + k;
                v = __bfloat162float(x[(size_t)(m0 + m) * ldx + src]);
            }
            xs[m * QV_XLD + qv_xi(k)] = v;
        }
        __syncthreads();
        if (w.q4) {
            /* lane l: stored columns k0 + 32 l .. + 31, one word per W row */
            const int kk = 32 * lane;
            if (kk < kn) {
                const int g = (k0 + kk) / CVLM_Q4_GROUP;
                uint4 wv[R];
                float sc[R], mn[R];
#pragma unroll
                for (int r = 0; r < R; r++) {
                    int n = n0 + r < w.N ? n0 + r : w.N - 1; /* a clamped row is not stored */
                    size_t si = (size_t)n * w.ng + g;
                    wv[r] = __ldg((const uint4 *)(w.q + (size_t)n * row_bytes + (k0 + kk) / 2));
                    sc[r] = __ldg(w.s + si);
                    mn[r] = w.mn ? __ldg(w.mn + si) : 0.0f;
                }
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    const float *xm = xs + m * QV_XLD + qv_xi(kk);
                    float xsum = w.mn ? sum_n(xm, 32) : 0.0f;
#pragma unroll
                    for (int r = 0; r < R; r++)
                        acc[m][r] += sc[r] * dot_q4(wv[r], xm) + mn[r] * xsum;
                }
            }
        } else {
            /* lane l: stored columns k0 + 512 c + 16 l .. + 15 for c = 0, 1 */
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const int kk = 512 * c + 16 * lane;
                if (kk >= kn)
                    continue;
                uint4 wv[R];
                float sc[R], mn[R];
#pragma unroll
                for (int r = 0; r < R; r++) {
                    int n = n0 + r < w.N ? n0 + r : w.N - 1;
                    wv[r] = __ldg((const uint4 *)(w.q + (size_t)n * row_bytes + k0 + kk));
                    sc[r] = __ldg(w.s + n); /* one group per row */
                    mn[r] = w.mn ? __ldg(w.mn + n) : 0.0f;
                }
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    const float *xm = xs + m * QV_XLD + qv_xi(kk);
                    float xsum = w.mn ? sum_n(xm, 16) : 0.0f;
#pragma unroll
                    for (int r = 0; r < R; r++)
                        acc[m][r] += sc[r] * dot_q8(wv[r], xm) + mn[r] * xsum;
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        int n = n0 + r;
        float b = bias && n < w.N ? cu_ldw(bias, bdt, (size_t)n) : 0.0f;
#pragma unroll
        for (int m = 0; m < MT; m++) {
            float s = cu_warp_sum(acc[m][r]);
            if (lane == 0 && n < w.N && m0 + m < M)
                y[(size_t)(m0 + m) * w.N + n] = __float2bfloat16_rn(s + b);
        }
    }
}

template <int MT, int R>
static bool qgemv_launch(struct cuda_backend *cb, bf16 *y, const bf16 *x, int ldx, int M,
                         const struct qw &w, const void *bias, int bdt)
{
    unsigned n_mt = (unsigned)((M + MT - 1) / MT);
    unsigned slices = (unsigned)((w.N + QV_WARPS * R - 1) / (QV_WARPS * R));
    k_qgemv<MT, R>
        <<<n_mt * slices, QV_WARPS * 32, 0, cb->stream>>>(y, x, ldx, M, w, bias, bdt, (int)n_mt);
    return CU_LAUNCHED(cb, "quantized gemv");
}

/* 1 <= M <= QV_MAX_M: the smallest M tile that holds M, 8-row tiles beyond 4 rows. */
static bool qgemv(struct cuda_backend *cb, bf16 *y, const bf16 *x, int ldx, int M,
                  const struct qw &w, const void *bias, int bdt)
{
    if (M == 1)
        return qgemv_launch<1, 2>(cb, y, x, ldx, M, w, bias, bdt);
    if (M == 2)
        return qgemv_launch<2, 2>(cb, y, x, ldx, M, w, bias, bdt);
    if (M <= 4)
        return qgemv_launch<4, 2>(cb, y, x, ldx, M, w, bias, bdt);
    return qgemv_launch<8, 2>(cb, y, x, ldx, M, w, bias, bdt);
}

/* ---- dequantize + cuBLAS ---------------------------------------------------------------- */

/* Stored weight (n, k) as float: q * scale (+ min). */
__device__ __forceinline__ float qval(const struct qw &w, int n, int k)
{
    int q;
    size_t si = (size_t)n * w.ng + (w.q4 ? k / CVLM_Q4_GROUP : 0);
    if (w.q4) {
        unsigned char b = w.q[(size_t)n * (w.K / 2) + k / 32 * 16 + k % 16];
        q = (k % 32 < 16 ? b & 15 : b >> 4) - 8;
    } else {
        q = (signed char)w.q[(size_t)n * w.K + k];
    }
    return (float)q * w.s[si] + (w.mn ? w.mn[si] : 0.0f);
}

/* dst[r][perm[k]] = W[n0 + r][k] rounded to BF16, r < rows: a grid-stride loop over the
 * rows * K elements (any grid; 256 threads). dst is [rows][K] in x's column order. */
__global__ void k_dequant(bf16 *dst, struct qw w, int n0, int rows)
{
    size_t total = (size_t)rows * w.K;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        int r = (int)(i / (size_t)w.K), k = (int)(i % (size_t)w.K);
        int col = w.perm ? w.perm[k] : k;
        dst[(size_t)r * w.K + col] = __float2bfloat16_rn(qval(w, n0 + r, k));
    }
}

static void gemm_dequant(struct cuda_backend *cb, bf16 *y, const bf16 *x, int ldx, int M,
                         const struct qw &w, const struct cvlm_tensor *bias)
{
    size_t per = QDEQ_ELEMS / (size_t)w.K;
    int rows = per >= (size_t)w.N ? w.N : per >= 64 ? (int)(per / 64 * 64) : per ? (int)per : 1;
    bf16 *deq = (bf16 *)cu_scratch(cb, CU_SCRATCH_QDEQ, (size_t)rows * w.K * sizeof(bf16));
    const float one = 1.0f, zero = 0.0f;
    if (!deq)
        return;
    for (int n0 = 0; n0 < w.N; n0 += rows) {
        int nr = w.N - n0 < rows ? w.N - n0 : rows;
        size_t n = (size_t)nr * w.K;
        k_dequant<<<cu_blocks(n, 256, 8192), 256, 0, cb->stream>>>(deq, w, n0, nr);
        if (!CU_LAUNCHED(cb, "dequantize"))
            return;
        /* column-major: Y^T[n0 .. n0 + nr, M] (ld N) = deq^T . X^T, as in gemm.cu */
        if (!CU_BLAS(cb, cublasGemmEx(cb->blas, CUBLAS_OP_T, CUBLAS_OP_N, nr, M, w.K, &one, deq,
                                      CUDA_R_16BF, w.K, x, CUDA_R_16BF, ldx, &zero, y + n0,
                                      CUDA_R_16BF, w.N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)))
            return;
    }
    if (bias)
        cu_add_bias(cb, y, bias->data, bias->dtype, M, w.N);
}

/* ---- entry (from cu_gemm) ------------------------------------------------------------------ */

void cu_gemm_q(struct cuda_backend *cb, bf16 *y, const bf16 *x, int ldx,
               const struct cvlm_tensor *w, const struct cvlm_tensor *bias, int M, int N, int K,
               bool use_gemv)
{
    int q4 = w->dtype == CVLM_DTYPE_Q4;
    CU_REQUIRE(cb, w->ndim == 2 && w->shape[0] == N && w->shape[1] == K && w->scales,
               "gemm: a %s W needs shape [N=%d, K=%d] and scales", cvlm_dtype_name(w->dtype), N, K);
    CU_REQUIRE(cb, !q4 || K % 32 == 0, "gemm: Q4 W with K = %d (a multiple of 32 needed)", K);
    /* mins are defined for Q4 (GPTQ sym=false); a Q8 tensor's are applied the same way */
    struct qw qw = {(const unsigned char *)w->data, w->scales, w->mins, w->perm, N, K,
                    (int)cvlm_quant_groups(w),      q4};
    /* the GEMV's 16-byte loads: Q4 rows are K / 2 bytes (K % 32 == 0: whole words) */
    bool words = cu_aligned16(qw.q) && (q4 || K % 16 == 0);
    if (use_gemv && M <= QV_MAX_M && words) {
        qgemv(cb, y, x, ldx, M, qw, bias ? bias->data : NULL, bias ? (int)bias->dtype : 0);
        return;
    }
    gemm_dequant(cb, y, x, ldx, M, qw, bias);
}
