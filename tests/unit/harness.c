/* harness.c - test runner: runs every registered TEST and prints "N passed, N failed".
 *
 * Tests run in-process, one after another, in name order (deterministic output). A test
 * fails if any CHECK/REQUIRE in it failed. Exit status is 0 only if none failed.
 */
#include "tests/unit/harness.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static struct cvlm_test *tests;
static int cur_failures;
static const char *cur_name;
static char tmpdir[256];

void cvlm_test_register(struct cvlm_test *t)
{
    /* Insert sorted by name so the run order does not depend on link order. */
    struct cvlm_test **p = &tests;
    while (*p && strcmp((*p)->name, t->name) < 0)
        p = &(*p)->next;
    t->next = *p;
    *p = t;
}

void cvlm_test_fail(const char *file, int line, const char *fmt, ...)
{
    va_list ap;
    if (cur_failures < 20) {
        fprintf(stdout, "  %s: %s:%d: ", cur_name, file, line);
        va_start(ap, fmt);
        vfprintf(stdout, fmt, ap);
        va_end(ap);
        fputc('\n', stdout);
    }
    cur_failures++;
}

const char *cvlm_test_data(const char *rel)
{
    static char bufs[8][1024];
    static int slot;
    char *b = bufs[slot++ % 8];
    const char *root = getenv("COGVLM_SHARED_DATA");
    snprintf(b, sizeof(bufs[0]), "%s/%s", root && *root ? root : "../shared/data", rel);
    return b;
}

static void rm_tmpdir(void)
{
    char cmd[300];
    if (!tmpdir[0] || getenv("COGVLM_KEEP_TMP"))
        return;
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmpdir);
}

const char *cvlm_test_tmpdir(void)
{
    if (!tmpdir[0]) {
        const char *base = getenv("TMPDIR");
        snprintf(tmpdir, sizeof(tmpdir), "%s/cvlm-test-XXXXXX", base && *base ? base : "/tmp");
        if (!mkdtemp(tmpdir)) {
            perror("mkdtemp");
            exit(2);
        }
        atexit(rm_tmpdir);
    }
    return tmpdir;
}

unsigned char *cvlm_test_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    unsigned char *buf = NULL;
    long n;
    if (!f)
        return NULL;
    if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0)
        goto out;
    buf = malloc((size_t)n + 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
        goto out;
    }
    if (buf) {
        buf[n] = 0;
        if (len)
            *len = (size_t)n;
    }
out:
    fclose(f);
    return buf;
}

int cvlm_test_write_file(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    int rc = 0;
    if (!f)
        return -1;
    if (len && fwrite(data, 1, len, f) != len)
        rc = -1;
    if (fclose(f) != 0)
        rc = -1;
    return rc;
}

double cvlm_test_max_rel(const float *a, const float *b, size_t n)
{
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]) / fmax(1.0, fabs(b[i]));
        worst = d > worst || d != d ? d : worst;
    }
    return worst;
}

/* COGVLM_TEST_SKIP: comma-separated name fragments of tests not to run (`make test` runs
 * the sanitized suite without the deploy and robust suites, which time real behaviour). */
static int skipped(const char *name)
{
    const char *list = getenv("COGVLM_TEST_SKIP");
    char item[128];
    while (list && *list) {
        size_t n = strcspn(list, ",");
        if (n && n < sizeof(item)) {
            memcpy(item, list, n);
            item[n] = 0;
            if (strstr(name, item))
                return 1;
        }
        list += n + (list[n] == ',');
    }
    return 0;
}

int main(int argc, char **argv)
{
    int passed = 0, failed = 0;
    const char *filter = argc > 1 ? argv[1] : NULL;

    setvbuf(stdout, NULL, _IOLBF, 0);
    for (struct cvlm_test *t = tests; t; t = t->next) {
        if ((filter && !strstr(t->name, filter)) || skipped(t->name))
            continue;
        cur_name = t->name;
        cur_failures = 0;
        t->fn();
        if (cur_failures) {
            printf("FAIL %s (%d checks failed)\n", t->name, cur_failures);
            failed++;
        } else {
            printf("ok   %s\n", t->name);
            passed++;
        }
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
