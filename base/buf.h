/* buf.h - the growable byte buffer every layer uses (base/ includes nothing of the
 * project, and every layer may include it).
 *
 * The bytes are always NUL-terminated (p[len] == 0 once anything was added), so a buffer
 * of text is also a C string. Growth doubles the capacity. A failed allocation leaves the
 * contents as they were, sets `failed` (sticky: later appends do nothing and fail too) and
 * returns -1: a caller may check each call or only `failed` at the end, and never emits
 * output with a silent hole in it.
 */
#ifndef CVLM_BASE_BUF_H
#define CVLM_BASE_BUF_H

#include <stddef.h>

struct cvlm_buf {
    char *p;    /* NULL until the first byte */
    size_t len; /* bytes held, not counting the terminating NUL */
    size_t cap; /* bytes allocated */
    int failed; /* an allocation failed */
};

/* Room for `extra` more bytes (and the NUL). 0, or -1 when memory ran out. */
int cvlm_buf_reserve(struct cvlm_buf *b, size_t extra);
/* Appends n bytes. 0 or -1. */
int cvlm_buf_append(struct cvlm_buf *b, const void *data, size_t n);
/* Appends a NUL-terminated string (without its NUL). 0 or -1. */
int cvlm_buf_puts(struct cvlm_buf *b, const char *s);
/* Appends printf-style text. 0 or -1. */
int cvlm_buf_printf(struct cvlm_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Hands the bytes to the caller (malloc'd, NUL-terminated; "" when nothing was added;
 * NULL only when an allocation failed) and leaves the buffer empty. *len gets the length
 * when len is not NULL. */
char *cvlm_buf_take(struct cvlm_buf *b, size_t *len);
/* Frees the bytes; the buffer is empty (and usable) again. */
void cvlm_buf_free(struct cvlm_buf *b);

#endif
