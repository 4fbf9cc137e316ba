/* gemm.cuh - y = x . W^T (+ bias) of the CUDA backend (gemm.cu). */
#ifndef CVLM_CUDA_GEMM_CUH
#define CVLM_CUDA_GEMM_CUH

#include "kernels/cuda/common.cuh"

void cu_gemm(struct cvlm_backend *be, void *y, const void *x, int x_stride,
             const struct cvlm_tensor *w, const struct cvlm_tensor *bias, int M, int N, int K);

/* The same with a Q8 / Q4 W (gemm_q.cu; the entry checks of cu_gemm done): the
 * quantized GEMV for small M when use_gemv, else dequantize + cuBLAS. */
void cu_gemm_q(struct cuda_backend *cb, bf16 *y, const bf16 *x, int ldx,
               const struct cvlm_tensor *w, const struct cvlm_tensor *bias, int M, int N, int K,
               bool use_gemv);

/* The cuBLASLt plan cache of a backend: created with it, destroyed with it. */
int cu_gemm_cache_create(struct cuda_backend *cb);
void cu_gemm_cache_destroy(struct cuda_backend *cb);

#endif
