/* rope.cuh - rotate-half rotary position embedding of the CUDA backend (rope.cu). */
#ifndef CVLM_CUDA_ROPE_CUH
#define CVLM_CUDA_ROPE_CUH

#include "kernels/cuda/common.cuh"

void cu_rope(struct cvlm_backend *be, void *x, int stride, const int32_t *pos, int M, int n_heads,
             int head_dim, const float *inv_freq);

#endif
