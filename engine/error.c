/* error.c - error strings and the thread-local error detail (see error.h). */
#include "engine/error.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char err_detail[512];
static _Thread_local int err_code;

const char *cvlm_strerror(int code)
{
    switch (code) {
    case CVLM_OK: return "success";
    case CVLM_EINVAL: return "invalid argument";
    case CVLM_ENOMEM: return "out of memory";
    case CVLM_EIO: return "I/O error";
    case CVLM_EFORMAT: return "malformed data";
    case CVLM_EUNSUPPORTED: return "unsupported";
    case CVLM_ETOOBIG: return "too large";
    case CVLM_ENOENT: return "not found";
    case CVLM_ESHAPE: return "shape mismatch";
    case CVLM_EBUSY: return "busy";
    case CVLM_ECANCELED: return "cancelled";
    case CVLM_ESTATE: return "not possible in the current state";
    default: return "unknown error";
    }
}

int cvlm_errf(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_detail, sizeof(err_detail), fmt, ap);
    va_end(ap);
    err_code = code;
    return code;
}

const char *cvlm_last_error(void)
{
    if (err_detail[0])
        return err_detail;
    return cvlm_strerror(err_code);
}

void cvlm_clear_error(void)
{
    err_detail[0] = '\0';
    err_code = 0;
}
