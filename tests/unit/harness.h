/* harness.h - the project's minimal C test harness.
 *
 * A test is `TEST(name) { ... }` in any tests/unit/ source file; it registers itself at
 * start-up. CHECK(cond) records a failure and goes on, REQUIRE(cond) records it and
 * returns from the test. The runner (harness.c) runs every test, or those whose name
 * contains argv[1], and ends with the single line "N passed, N failed".
 *
 * Tests find the shared reference data through cvlm_test_data("tokenizer-golden.jsonl"):
 * $COGVLM_SHARED_DATA if set, else ../shared/data relative to the repository root (the
 * runner is started from there).
 */
#ifndef CVLM_TEST_HARNESS_H
#define CVLM_TEST_HARNESS_H

#include <stddef.h>
#include <stdio.h>

struct cvlm_test {
    const char *name;
    void (*fn)(void);
    struct cvlm_test *next;
};

void cvlm_test_register(struct cvlm_test *t);
void cvlm_test_fail(const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Path of a file under the shared reference data folder (static buffer per call slot). */
const char *cvlm_test_data(const char *rel);
/* A fresh per-run scratch directory (created on first use, removed at exit). */
const char *cvlm_test_tmpdir(void);
/* Reads a whole file; returns a malloc'd buffer (NUL-terminated) or NULL. */
unsigned char *cvlm_test_read_file(const char *path, size_t *len);
/* Writes a whole file; returns 0 on success. */
int cvlm_test_write_file(const char *path, const void *data, size_t len);
/* max_i |a_i - b_i| / max(1, |b_i|) over n floats (b is the reference); NaN if any term is
 * NaN, so a NaN output can never pass a `< tol` check. */
double cvlm_test_max_rel(const float *a, const float *b, size_t n);

#define TEST(name)                                                         \
    static void test_##name(void);                                         \
    static struct cvlm_test test_desc_##name = {#name, test_##name, NULL}; \
    __attribute__((constructor)) static void test_reg_##name(void)         \
    {                                                                      \
        cvlm_test_register(&test_desc_##name);                             \
    }                                                                      \
    static void test_##name(void)

#define CHECK(cond)                                          \
    do {                                                     \
        if (!(cond))                                         \
            cvlm_test_fail(__FILE__, __LINE__, "%s", #cond); \
    } while (0)

#define CHECKF(cond, ...)                                    \
    do {                                                     \
        if (!(cond))                                         \
            cvlm_test_fail(__FILE__, __LINE__, __VA_ARGS__); \
    } while (0)

#define REQUIRE(cond)                                        \
    do {                                                     \
        if (!(cond)) {                                       \
            cvlm_test_fail(__FILE__, __LINE__, "%s", #cond); \
            return;                                          \
        }                                                    \
    } while (0)

#endif
