/* test_blackbox.c - the script suites, as tests of this harness so that the whole run
 * still ends in one "N passed, N failed" line:
 * - tests/api/run.sh: the OpenAI-compatible API over HTTP against the real daemon
 *   (official openai client, OpenAI's JSON schemas, raw SSE, bad requests, lifecycle,
 *   schemathesis against openapi.yaml);
 * - tests/deploy/run.sh: systemd unit and notify protocol, install/uninstall, the
 *   deployment configs, nginx load balancing over two daemons;
 * - tests/robust/run.sh: overload (429s), slow and abusive clients, image bombs, a soak
 *   with cancellations (RSS, KV and counters balance), a valgrind leak check.
 * The daemon under test is COGVLM_SERVER_BIN (set by the Makefile: the ASan build under
 * `make asan`). */
#include "tests/unit/harness.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

/* Runs a script, keeps its output in a log; on failure shows the log's tail. */
static void run_suite(const char *script, const char *name)
{
    char cmd[1024], log[600], line[1024];
    snprintf(log, sizeof(log), "%s/%s.log", cvlm_test_tmpdir(), name);
    snprintf(cmd, sizeof(cmd), "%s > '%s' 2>&1", script, log);
    int st = system(cmd);
    int ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
    FILE *f = fopen(log, "r");
    long lines = 0, n = 0;
    while (f && fgets(line, sizeof(line), f))
        lines++;
    if (f)
        rewind(f);
    while (f && fgets(line, sizeof(line), f))
        if (++n > lines - (ok ? 2 : 60))
            printf("  %s: %s", name, line);
    if (f)
        fclose(f);
    CHECKF(ok, "%s failed (status %d)", script, st);
}

TEST(zz_api_blackbox)
{
    run_suite("tests/api/run.sh", "api");
}

TEST(zz_deploy_suite)
{
    run_suite("tests/deploy/run.sh", "deploy");
}

TEST(zz_robust_suite)
{
    run_suite("tests/robust/run.sh", "robust");
}
