/* error.h - error codes and the per-thread error detail of the engine.
 *
 * Every fallible engine function returns 0 or a negative CVLM_E* code. Where the code
 * alone would not tell a user what went wrong (which tensor, which byte offset), the
 * failing function also records a human-readable detail with cvlm_errf(); the caller
 * reads it with cvlm_last_error() on the same thread. The detail buffer is thread-local,
 * so concurrent requests never see each other's messages.
 */
#ifndef CVLM_ERROR_H
#define CVLM_ERROR_H

enum {
    CVLM_OK = 0,
    CVLM_EINVAL = -1,       /* bad argument or request */
    CVLM_ENOMEM = -2,       /* allocation failed */
    CVLM_EIO = -3,          /* open/read/mmap failed */
    CVLM_EFORMAT = -4,      /* malformed file or data */
    CVLM_EUNSUPPORTED = -5, /* well-formed but not supported (dtype, image format, ...) */
    CVLM_ETOOBIG = -6,      /* exceeds a configured or hard limit */
    CVLM_ENOENT = -7,       /* file or named item not found */
    CVLM_ESHAPE = -8,       /* tensor shape, dtype or size does not match the model */
    CVLM_EBUSY = -9,        /* queue full: retry later */
    CVLM_ECANCELED = -10,   /* the request was cancelled */
    CVLM_ESTATE = -11,      /* not possible in the current state (draining, not loaded) */
};

/* Static description of a code ("malformed data", ...). Never NULL. */
const char *cvlm_strerror(int code);

/* Records a printf-style detail for the calling thread and returns `code`, so that a
 * failing path reads `return cvlm_errf(CVLM_EFORMAT, "tensor %s: ...", name);`. */
int cvlm_errf(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The detail recorded last on this thread, or the strerror text if there is none. */
const char *cvlm_last_error(void);

/* Forgets the detail of this thread (called before an operation whose error is shown). */
void cvlm_clear_error(void);

#endif
