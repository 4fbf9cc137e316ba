/* norm.cuh - RMSNorm (plain and fused with the residual add) and LayerNorm of the CUDA
 * backend (norm.cu). */
#ifndef CVLM_CUDA_NORM_CUH
#define CVLM_CUDA_NORM_CUH

#include "kernels/cuda/common.cuh"

void cu_rmsnorm(struct cvlm_backend *be, void *y, const void *x, const struct cvlm_tensor *w, int M,
                int D, float eps);
void cu_add_rmsnorm(struct cvlm_backend *be, void *y, void *x, const void *r,
                    const struct cvlm_tensor *w, int M, int D, float eps);
void cu_layernorm(struct cvlm_backend *be, void *y, const void *x, const struct cvlm_tensor *w,
                  const struct cvlm_tensor *b, int M, int D, float eps);

#endif
