/* elementwise.cuh - the CUDA backend's element-wise and data-movement ops (elementwise.cu):
 * add, add_row, exact GELU, SiLU-mul, embedding gather, row copies, patchify and the
 * BF16 <-> F32 conversions used by to_host / from_host / upload_weights.
 */
#ifndef CVLM_CUDA_ELEMENTWISE_CUH
#define CVLM_CUDA_ELEMENTWISE_CUH

#include "kernels/cuda/common.cuh"

void cu_add(struct cvlm_backend *be, void *y, const void *x, size_t n);
void cu_add_row(struct cvlm_backend *be, void *y, const struct cvlm_tensor *b, int M, int D);
void cu_gelu(struct cvlm_backend *be, void *x, size_t n);
void cu_silu_mul(struct cvlm_backend *be, void *out, const void *gate, const void *up, int g_stride,
                 int M, int N);
void cu_embed(struct cvlm_backend *be, void *out, const struct cvlm_tensor *table,
              const int32_t *ids, int M, int D);
void cu_copy_rows(struct cvlm_backend *be, void *dst, const void *src, const int32_t *rows, int n,
                  int width);
void cu_patchify(struct cvlm_backend *be, void *out, const float *pixels, int C, int H, int W,
                 int P);

/* y[M, D] += b[D] per row, b of any dtype in device memory (GEMM bias fallback). Returns
 * false on error (recorded). */
bool cu_add_bias(struct cuda_backend *cb, bf16 *y, const void *b, int b_dtype, int M, int D);
/* dst[i] = (float)src[i] / (bf16)src[i] on the stream; false on error (recorded). */
bool cu_convert_bf16_to_f32(struct cuda_backend *cb, float *dst, const void *src, size_t n);
bool cu_convert_f32_to_bf16(struct cuda_backend *cb, void *dst, const float *src, size_t n);
/* dst (BF16) = src of dtype `dt` widened and rounded to nearest even */
bool cu_convert_to_bf16(struct cuda_backend *cb, bf16 *dst, const void *src, int dt, size_t n);

#endif
