/* weights.cuh - upload_weights of the CUDA backend (weights.cu). */
#ifndef CVLM_CUDA_WEIGHTS_CUH
#define CVLM_CUDA_WEIGHTS_CUH

#include "kernels/cuda/common.cuh"

int cu_upload_weights(struct cvlm_backend *be, struct cvlm_tensor *const *ts, int n, uint64_t seed);

#endif
