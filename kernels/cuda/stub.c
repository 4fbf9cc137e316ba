/* stub.c - the CUDA entry points of a build without CUDA (the default `make`).
 *
 * The engine and server call these unconditionally (no #ifdef CUDA outside headers and
 * the backend registry, see the architecture page); here they fail with a message that
 * says how to get the real ones. `make cuda` links the .cu files instead of this.
 */
#include "engine/comm.h"
#include "engine/error.h"
#include "kernels/cuda/cuda_api.h"

#include <stddef.h>

#define NOT_BUILT "not built with CUDA (build with `make cuda` on a machine with the CUDA toolkit)"

struct cvlm_backend *cvlm_backend_cuda_create(int device)
{
    cvlm_errf(CVLM_EUNSUPPORTED, "CUDA device %d: " NOT_BUILT, device);
    return NULL;
}

int cvlm_comm_nccl_group_create(struct cvlm_backend *const *be, int n, struct cvlm_comm **out)
{
    (void)be, (void)n, (void)out;
    return cvlm_errf(CVLM_EUNSUPPORTED, "NCCL: " NOT_BUILT);
}

int cvlm_backend_cuda_status(struct cvlm_backend *be, int clear)
{
    (void)be, (void)clear;
    return cvlm_errf(CVLM_EUNSUPPORTED, NOT_BUILT);
}

int cvlm_cuda_device_count(void)
{
    return 0;
}
