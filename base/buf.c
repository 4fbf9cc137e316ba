/* buf.c - the growable byte buffer (see buf.h). */
#include "base/buf.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int cvlm_buf_reserve(struct cvlm_buf *b, size_t extra)
{
    if (b->failed)
        return -1;
    if (extra > SIZE_MAX / 2 - b->len - 1) {
        b->failed = 1;
        return -1;
    }
    size_t need = b->len + extra + 1;
    if (need <= b->cap)
        return 0;
    size_t nc = b->cap ? b->cap : 64;
    while (nc < need)
        nc *= 2;
    char *np = realloc(b->p, nc);
    if (!np) {
        b->failed = 1;
        return -1;
    }
    b->p = np;
    b->cap = nc;
    b->p[b->len] = 0;
    return 0;
}

int cvlm_buf_append(struct cvlm_buf *b, const void *data, size_t n)
{
    if (cvlm_buf_reserve(b, n))
        return -1;
    if (n)
        memcpy(b->p + b->len, data, n);
    b->len += n;
    b->p[b->len] = 0;
    return 0;
}

int cvlm_buf_puts(struct cvlm_buf *b, const char *s)
{
    return cvlm_buf_append(b, s, strlen(s));
}

int cvlm_buf_printf(struct cvlm_buf *b, const char *fmt, ...)
{
    va_list ap;
    char small[256];
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof(small), fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->failed = 1;
        return -1;
    }
    if ((size_t)n < sizeof(small))
        return cvlm_buf_append(b, small, (size_t)n);
    if (cvlm_buf_reserve(b, (size_t)n))
        return -1;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

char *cvlm_buf_take(struct cvlm_buf *b, size_t *len)
{
    if (!b->failed && !b->p) /* nothing added: an empty string, not NULL */
        cvlm_buf_reserve(b, 0);
    char *p = b->failed ? NULL : b->p;
    if (len)
        *len = p ? b->len : 0;
    if (!p)
        free(b->p);
    *b = (struct cvlm_buf){0};
    return p;
}

void cvlm_buf_free(struct cvlm_buf *b)
{
    free(b->p);
    *b = (struct cvlm_buf){0};
}
