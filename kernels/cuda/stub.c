/* stub.c - the CUDA entry points of a build without CUDA (the default CPU build).
 *
 * The engine calls the CUDA backend and NCCL through these two functions only, so a CPU
 * build links this file instead of the .cu files and says clearly what is missing.
 */
#include "engine/backend.h"
#include "engine/comm.h"
#include "engine/error.h"

#include <stddef.h>

struct cvlm_backend *cvlm_backend_cuda_create(int device)
{
    cvlm_errf(CVLM_EINVAL, "not built with CUDA (device %d requested; build with `make cuda`)",
              device);
    return NULL;
}

int cvlm_comm_nccl_group_create(struct cvlm_backend *const *be, int n, struct cvlm_comm **out)
{
    (void)be, (void)out;
    return cvlm_errf(CVLM_EINVAL, "not built with CUDA: no NCCL for %d ranks", n);
}
