/* backend_check.h - the op table's entry checks, one backend-neutral layer over any backend.
 *
 * cvlm_backend_check_wrap() returns a backend whose op table checks every call against
 * the contract stated in engine/backend.h (dimensions, dtypes, weight shapes, alignment,
 * buffer extents, aliasing, per-token metadata) and then calls the wrapped backend's op.
 * Both the CPU and the CUDA backend get the same checks, because they sit above the table.
 *
 * A violation skips the op (a wrong extent would write out of bounds), records the first
 * message ("cpu op gemm: w is [64, 32], the call needs [N=64, K=48]") and makes the next
 * status() call return it, which fails the step; status() then clears it, so one bad step
 * does not poison the ones after it. Ops after a violation are skipped until then, as the
 * CUDA backend does after a failed launch. Nothing aborts the process.
 *
 * Enabled by model_group.c when cvlm_backend_check_enabled(): the build defines
 * CVLM_CHECK_OPS=1 (the SAN=1 build does; CFLAGS=-DCVLM_CHECK_OPS=1 elsewhere), or the
 * environment says COGVLM_CHECK_OPS=1; COGVLM_CHECK_OPS=0 turns a build's default off.
 * When disabled the model calls the backend's own table: no cost at all.
 *
 * Ownership: the wrapper owns the wrapped backend (its destroy destroys both). It keeps
 * the threading rules of the backend it wraps (one thread drives it at a time).
 */
#ifndef CVLM_BACKEND_CHECK_H
#define CVLM_BACKEND_CHECK_H

#include "engine/backend.h"

/* 1 if the checks are on for this process (see above). */
int cvlm_backend_check_enabled(void);

/* The checked backend over `inner` (same name, activation dtype and threads), owning it;
 * NULL if out of memory (inner is then still the caller's). Memory that ops receive must
 * come from the wrapper's alloc: the checks know every live allocation and its size. */
struct cvlm_backend *cvlm_backend_check_wrap(struct cvlm_backend *inner);

/* The backend a checked one wraps, or `be` itself if it is not a checked backend (for
 * code that must reach the real one, e.g. NCCL reading the CUDA device). */
struct cvlm_backend *cvlm_backend_check_inner(struct cvlm_backend *be);

#endif
