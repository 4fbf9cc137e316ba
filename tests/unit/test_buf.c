/* test_buf.c - the growable byte buffer of base/buf.h. */
#include "base/buf.h"
#include "tests/unit/harness.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

TEST(buf_appends_grow_and_stay_terminated)
{
    struct cvlm_buf b = {0};
    char big[1000];
    memset(big, 'x', sizeof(big));
    CHECK(cvlm_buf_puts(&b, "ab") == 0 && b.len == 2 && !strcmp(b.p, "ab"));
    CHECK(cvlm_buf_append(&b, big, sizeof(big)) == 0 && b.len == 1002 && b.p[1002] == 0);
    CHECK(cvlm_buf_printf(&b, "|%d|%.*s", 42, 300, big) == 0); /* past printf's stack buffer */
    CHECK(b.len == 1002 + 4 + 300 && b.p[b.len] == 0 && !memcmp(b.p + 1002, "|42|x", 5));
    CHECK(cvlm_buf_append(&b, "\0z", 2) == 0 && b.len == 1308 && b.p[1307] == 'z');
    size_t n;
    char *p = cvlm_buf_take(&b, &n);
    CHECK(p && n == 1308 && b.p == NULL && b.len == 0);
    free(p);
    p = cvlm_buf_take(&b, &n); /* nothing added: "", not NULL */
    CHECK(p && n == 0 && p[0] == 0);
    free(p);
}

TEST(buf_failure_is_sticky_and_never_partial)
{
    struct cvlm_buf b = {0};
    CHECK(cvlm_buf_puts(&b, "kept") == 0);
    CHECK(cvlm_buf_reserve(&b, SIZE_MAX / 2) == -1 && b.failed);
    CHECK(!strcmp(b.p, "kept") && b.len == 4); /* contents as they were */
    CHECK(cvlm_buf_puts(&b, "more") == -1 && b.len == 4);
    CHECK(cvlm_buf_printf(&b, "%d", 1) == -1 && b.len == 4);
    size_t n = 99;
    CHECK(cvlm_buf_take(&b, &n) == NULL && n == 0 && !b.failed && b.p == NULL);
    cvlm_buf_free(&b);
}
