/* elementwise.cu - element-wise and data-movement kernels of the CUDA backend.
 *
 * All memory bound: grid-stride loops, 16-byte (8 x BF16) accesses when every pointer
 * involved is 16-byte aligned and the row widths allow it, a scalar path otherwise. Math
 * is F32 (values widened, rounded back to BF16 to nearest even once). Host index arrays
 * (ids, rows) go through the metadata ring (cu_upload); the pixels of patchify, a one-off
 * per image, through the F32 conversion scratch.
 */
#include "kernels/cuda/elementwise.cuh"

#include <math.h>

#define EW_THREADS 256

/* ---- add / gelu: flat arrays ------------------------------------------------------------- */

__global__ void k_add_vec(uint4 *y, const uint4 *x, size_t n8)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n8;
         i += (size_t)gridDim.x * blockDim.x) {
        float a[8], b[8];
        cu_unpack8(y[i], a);
        cu_unpack8(x[i], b);
        for (int j = 0; j < 8; j++)
            a[j] += b[j];
        y[i] = cu_pack8(a);
    }
}

__global__ void k_add(bf16 *y, const bf16 *x, size_t from, size_t n)
{
    for (size_t i = from + blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = __float2bfloat16_rn(__bfloat162float(y[i]) + __bfloat162float(x[i]));
}

void cu_add(struct cvlm_backend *be, void *y, const void *x, size_t n)
{
    struct cuda_backend *cb = cu_of(be);
    if (n == 0 || !cu_enter(cb))
        return;
    size_t done = 0;
    if (cu_aligned16(y) && cu_aligned16(x) && n >= 8) {
        size_t n8 = n / 8;
        k_add_vec<<<cu_blocks(n8, EW_THREADS), EW_THREADS, 0, cb->stream>>>((uint4 *)y,
                                                                            (const uint4 *)x, n8);
        done = n8 * 8;
    }
    if (done < n)
        k_add<<<cu_blocks(n - done, EW_THREADS), EW_THREADS, 0, cb->stream>>>(
            (bf16 *)y, (const bf16 *)x, done, n);
    CU_LAUNCHED(cb, "add");
}

__device__ __forceinline__ float gelu_erf(float v)
{
    return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
}

__global__ void k_gelu_vec(uint4 *x, size_t n8)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n8;
         i += (size_t)gridDim.x * blockDim.x) {
        float a[8];
        cu_unpack8(x[i], a);
        for (int j = 0; j < 8; j++)
            a[j] = gelu_erf(a[j]);
        x[i] = cu_pack8(a);
    }
}

__global__ void k_gelu(bf16 *x, size_t from, size_t n)
{
    for (size_t i = from + blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] = __float2bfloat16_rn(gelu_erf(__bfloat162float(x[i])));
}

void cu_gelu(struct cvlm_backend *be, void *x, size_t n)
{
    struct cuda_backend *cb = cu_of(be);
    if (n == 0 || !cu_enter(cb))
        return;
    size_t done = 0;
    if (cu_aligned16(x) && n >= 8) {
        size_t n8 = n / 8;
        k_gelu_vec<<<cu_blocks(n8, EW_THREADS), EW_THREADS, 0, cb->stream>>>((uint4 *)x, n8);
        done = n8 * 8;
    }
    if (done < n)
        k_gelu<<<cu_blocks(n - done, EW_THREADS), EW_THREADS, 0, cb->stream>>>((bf16 *)x, done, n);
    CU_LAUNCHED(cb, "gelu");
}

/* ---- row ops ----------------------------------------------------------------------------------
 */

__global__ void k_add_row(bf16 *y, const void *b, int dt, int M, int D)
{
    size_t n = (size_t)M * D;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = __float2bfloat16_rn(__bfloat162float(y[i]) + cu_ldw(b, dt, i % (size_t)D));
}

bool cu_add_bias(struct cuda_backend *cb, bf16 *y, const void *b, int b_dtype, int M, int D)
{
    size_t n = (size_t)M * D;
    if (n == 0)
        return true;
    k_add_row<<<cu_blocks(n, EW_THREADS), EW_THREADS, 0, cb->stream>>>(y, b, b_dtype, M, D);
    return CU_LAUNCHED(cb, "add_row");
}

void cu_add_row(struct cvlm_backend *be, void *y, const struct cvlm_tensor *b, int M, int D)
{
    struct cuda_backend *cb = cu_of(be);
    if (!cu_enter(cb))
        return;
    CU_REQUIRE(cb, b && b->data && cvlm_tensor_numel(b) == D, "add_row: bias of %lld, D %d",
               b ? (long long)cvlm_tensor_numel(b) : -1LL, D);
    cu_add_bias(cb, (bf16 *)y, b->data, b->dtype, M, D);
}

__device__ __forceinline__ float silu_mul1(float g, float u)
{
    return g / (1.0f + __expf(-g)) * u;
}

/* one block row per output row; 8-wide when the strides keep 16-byte alignment */
__global__ void k_silu_mul(bf16 *out, const bf16 *gate, const bf16 *up, int g_stride, int M, int N,
                           int vec)
{
    for (int r = blockIdx.x; r < M; r += gridDim.x) {
        const bf16 *g = gate + (size_t)r * g_stride, *u = up + (size_t)r * g_stride;
        bf16 *o = out + (size_t)r * N;
        int c0 = 0;
        if (vec) {
            for (int c = threadIdx.x * 8; c + 8 <= N; c += blockDim.x * 8) {
                float a[8], b[8];
                cu_unpack8(*(const uint4 *)(g + c), a);
                cu_unpack8(*(const uint4 *)(u + c), b);
                for (int j = 0; j < 8; j++)
                    a[j] = silu_mul1(a[j], b[j]);
                *(uint4 *)(o + c) = cu_pack8(a);
            }
            c0 = N / 8 * 8;
        }
        for (int c = c0 + threadIdx.x; c < N; c += blockDim.x)
            o[c] = __float2bfloat16_rn(silu_mul1(__bfloat162float(g[c]), __bfloat162float(u[c])));
    }
}

void cu_silu_mul(struct cvlm_backend *be, void *out, const void *gate, const void *up, int g_stride,
                 int M, int N)
{
    struct cuda_backend *cb = cu_of(be);
    if (M <= 0 || N <= 0 || !cu_enter(cb))
        return;
    CU_REQUIRE(cb, g_stride >= N, "silu_mul: g_stride %d < N %d", g_stride, N);
    int vec = cu_aligned16(out) && cu_aligned16(gate) && cu_aligned16(up) && g_stride % 8 == 0 &&
              N % 8 == 0;
    unsigned grid = (unsigned)(M < 65535 ? M : 65535);
    k_silu_mul<<<grid, EW_THREADS, 0, cb->stream>>>((bf16 *)out, (const bf16 *)gate,
                                                    (const bf16 *)up, g_stride, M, N, vec);
    CU_LAUNCHED(cb, "silu_mul");
}

/* ---- gathers -------------------------------------------------------------------------------- */

__global__ void k_embed(bf16 *out, const void *table, int dt, const int32_t *ids, int M, int D)
{
    for (int r = blockIdx.x; r < M; r += gridDim.x) {
        size_t base = (size_t)ids[r] * D;
        for (int c = threadIdx.x; c < D; c += blockDim.x)
            out[(size_t)r * D + c] = __float2bfloat16_rn(cu_ldw(table, dt, base + c));
    }
}

void cu_embed(struct cvlm_backend *be, void *out, const struct cvlm_tensor *table,
              const int32_t *ids, int M, int D)
{
    struct cuda_backend *cb = cu_of(be);
    if (M <= 0 || !cu_enter(cb))
        return;
    CU_REQUIRE(cb,
               table && table->data && table->ndim >= 1 &&
                   cvlm_tensor_numel(table) % (D > 0 ? D : 1) == 0,
               "embed: table does not have rows of %d", D);
    const int32_t *dids = (const int32_t *)cu_upload(cb, ids, (size_t)M * sizeof(int32_t));
    if (!dids)
        return;
    unsigned grid = (unsigned)(M < 65535 ? M : 65535);
    unsigned threads = D < EW_THREADS ? 64 : EW_THREADS;
    k_embed<<<grid, threads, 0, cb->stream>>>((bf16 *)out, table->data, table->dtype, dids, M, D);
    CU_LAUNCHED(cb, "embed");
}

__global__ void k_copy_rows(bf16 *dst, const bf16 *src, const int32_t *rows, int n, int width,
                            int vec)
{
    for (int r = blockIdx.x; r < n; r += gridDim.x) {
        const bf16 *s = src + (size_t)rows[r] * width;
        bf16 *d = dst + (size_t)r * width;
        if (vec)
            for (int c = threadIdx.x; c < width / 8; c += blockDim.x)
                ((uint4 *)d)[c] = ((const uint4 *)s)[c];
        else
            for (int c = threadIdx.x; c < width; c += blockDim.x)
                d[c] = s[c];
    }
}

void cu_copy_rows(struct cvlm_backend *be, void *dst, const void *src, const int32_t *rows, int n,
                  int width)
{
    struct cuda_backend *cb = cu_of(be);
    if (n <= 0 || width <= 0 || !cu_enter(cb))
        return;
    const int32_t *drows = (const int32_t *)cu_upload(cb, rows, (size_t)n * sizeof(int32_t));
    if (!drows)
        return;
    int vec = cu_aligned16(dst) && cu_aligned16(src) && width % 8 == 0;
    unsigned grid = (unsigned)(n < 65535 ? n : 65535);
    k_copy_rows<<<grid, 128, 0, cb->stream>>>((bf16 *)dst, (const bf16 *)src, drows, n, width, vec);
    CU_LAUNCHED(cb, "copy_rows");
}

/* out[(py * gw + px)][(c * P + ky) * P + kx] = pixels[c][py * P + ky][px * P + kx] */
__global__ void k_patchify(bf16 *out, const float *px, int C, int H, int W, int P)
{
    int gw = W / P, gh = H / P, row = C * P * P;
    size_t n = (size_t)gw * gh * row;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        int e = (int)(i % row), p = (int)(i / row);
        int c = e / (P * P), ky = (e / P) % P, kx = e % P, py = p / gw, pxi = p % gw;
        out[i] = __float2bfloat16_rn(
            px[((size_t)c * H + (size_t)py * P + ky) * W + (size_t)pxi * P + kx]);
    }
}

void cu_patchify(struct cvlm_backend *be, void *out, const float *pixels, int C, int H, int W,
                 int P)
{
    struct cuda_backend *cb = cu_of(be);
    if (!cu_enter(cb))
        return;
    CU_REQUIRE(cb, C > 0 && P > 0 && H >= P && W >= P, "patchify: C %d H %d W %d P %d", C, H, W, P);
    size_t npx = (size_t)C * H * W;
    float *tmp = (float *)cu_scratch(cb, CU_SCRATCH_CONV, npx * sizeof(float));
    if (!tmp || !CU_RT(cb, cudaMemcpyAsync(tmp, pixels, npx * sizeof(float), cudaMemcpyHostToDevice,
                                           cb->stream)))
        return;
    size_t n = (size_t)(W / P) * (H / P) * C * P * P;
    k_patchify<<<cu_blocks(n, EW_THREADS), EW_THREADS, 0, cb->stream>>>((bf16 *)out, tmp, C, H, W,
                                                                        P);
    CU_LAUNCHED(cb, "patchify");
}

/* ---- conversions ------------------------------------------------------------------------------
 */

__global__ void k_bf16_to_f32(float *dst, const bf16 *src, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __bfloat162float(src[i]);
}

__global__ void k_to_bf16(bf16 *dst, const void *src, int dt, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __float2bfloat16_rn(cu_ldw(src, dt, i));
}

bool cu_convert_bf16_to_f32(struct cuda_backend *cb, float *dst, const void *src, size_t n)
{
    k_bf16_to_f32<<<cu_blocks(n, EW_THREADS), EW_THREADS, 0, cb->stream>>>(dst, (const bf16 *)src,
                                                                           n);
    return CU_LAUNCHED(cb, "bf16_to_f32");
}

bool cu_convert_to_bf16(struct cuda_backend *cb, bf16 *dst, const void *src, int dt, size_t n)
{
    if (n == 0)
        return true;
    k_to_bf16<<<cu_blocks(n, EW_THREADS), EW_THREADS, 0, cb->stream>>>(dst, src, dt, n);
    return CU_LAUNCHED(cb, "to_bf16");
}

bool cu_convert_f32_to_bf16(struct cuda_backend *cb, void *dst, const float *src, size_t n)
{
    return cu_convert_to_bf16(cb, (bf16 *)dst, src, CVLM_DTYPE_F32, n);
}
