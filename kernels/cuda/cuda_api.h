/* cuda_api.h - what the CUDA backend offers beyond the op table of engine/backend.h.
 *
 * Plain C with no CUDA types, so that engine/, server/ and tests may include it in every
 * build: a build without CUDA links kernels/cuda/stub.c, whose functions fail with
 * "not built with CUDA". The backend itself is created with cvlm_backend_cuda_create()
 * (backend.h) and destroyed through its op table.
 */
#ifndef CVLM_CUDA_API_H
#define CVLM_CUDA_API_H

#include "engine/backend.h"

/* Waits for every op issued so far and returns the backend's sticky error: 0, or the
 * negative CVLM_E* code of the first failure since creation (or since the last clear),
 * whose detail (file:line, CUDA/cuBLAS message) is then also the calling thread's
 * cvlm_last_error(). `clear` forgets the error afterwards, so that later ops run again
 * (only sensible after a recoverable error such as out of memory). */
int cvlm_backend_cuda_status(struct cvlm_backend *be, int clear);

/* Number of CUDA devices (0 when there is no driver/device, or without CUDA). */
int cvlm_cuda_device_count(void);

#endif
