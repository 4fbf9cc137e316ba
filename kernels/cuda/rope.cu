/* rope.cu - rotate-half (NeoX) RoPE in place on BF16 rows, as cogvlm-model.md §4.5 and
 * the CPU backend: angle = pos * inv_freq[k] in F32, then for each head
 * v[k] = a cos - b sin, v[k + half] = b cos + a sin with a = v[k], b = v[k + half].
 *
 * One block per row; thread (k, head group) computes sincos once and rotates pair k of
 * several heads. sincosf is the accurate library version (full range reduction: angles
 * reach thousands of radians at long positions). pos and inv_freq are host arrays sent
 * through the metadata ring; both repeat across layers, so the ring's cache reuses them.
 */
#include "kernels/cuda/rope.cuh"

__global__ void k_rope(bf16 *x, int stride, const int32_t *pos, int M, int H, int hd,
                       const float *inv_freq)
{
    int half = hd / 2;
    for (int r = blockIdx.x; r < M; r += gridDim.x) {
        bf16 *row = x + (size_t)r * stride;
        for (int k = threadIdx.x; k < half; k += blockDim.x) {
            float s, c;
            sincosf((float)pos[r] * inv_freq[k], &s, &c);
            for (int h = threadIdx.y; h < H; h += blockDim.y) {
                bf16 *v = row + (size_t)h * hd;
                float a = __bfloat162float(v[k]), b = __bfloat162float(v[k + half]);
                v[k] = __float2bfloat16_rn(a * c - b * s);
                v[k + half] = __float2bfloat16_rn(b * c + a * s);
            }
        }
    }
}

void cu_rope(struct cvlm_backend *be, void *x, int stride, const int32_t *pos, int M, int n_heads,
             int head_dim, const float *inv_freq)
{
    struct cuda_backend *cb = cu_of(be);
    if (M <= 0 || !cu_enter(cb))
        return;
    CU_REQUIRE(cb, head_dim > 0 && head_dim % 2 == 0 && n_heads > 0 && stride >= n_heads * head_dim,
               "rope: %d heads of %d in rows of %d", n_heads, head_dim, stride);
    int half = head_dim / 2;
    const int32_t *dpos = (const int32_t *)cu_upload(cb, pos, (size_t)M * sizeof(int32_t));
    const float *dfreq = (const float *)cu_upload(cb, inv_freq, (size_t)half * sizeof(float));
    if (!dpos || !dfreq)
        return;
    unsigned tx = (unsigned)(half < 128 ? half : 128), ty = 256 / tx;
    ty = ty > (unsigned)n_heads ? (unsigned)n_heads : ty;
    unsigned grid = (unsigned)(M < 65535 ? M : 65535);
    k_rope<<<grid, dim3(tx, ty), 0, cb->stream>>>((bf16 *)x, stride, dpos, M, n_heads, head_dim,
                                                  dfreq);
    CU_LAUNCHED(cb, "rope");
}
