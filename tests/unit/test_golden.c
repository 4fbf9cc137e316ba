/* test_golden.c - the engine against the reference fixture, through the CLI
 * (`cogvlm golden`): every case within 1e-4 relative, all greedy tokens equal. */
#include "tests/unit/harness.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

TEST(golden_tiny_fixture)
{
    const char *bin = getenv("COGVLM_BIN");
    char cmd[2048], line[512];
    int pass = 0, fail = 0;
    REQUIRE(bin);
    snprintf(cmd, sizeof(cmd), "%s golden --fixture %s 2>&1", bin, cvlm_test_data("golden-tiny"));
    FILE *p = popen(cmd, "r");
    REQUIRE(p);
    while (fgets(line, sizeof(line), p)) {
        pass += strstr(line, "=> PASS") != NULL;
        fail += strstr(line, "FAIL") != NULL || strstr(line, "MISMATCH") != NULL;
        if (strstr(line, "FAIL") || strstr(line, "error"))
            printf("  golden: %s", line);
    }
    int st = pclose(p);
    CHECKF(WIFEXITED(st) && WEXITSTATUS(st) == 0, "golden exit status %d", st);
    CHECKF(pass == 6 && fail == 0, "%d cases passed, %d failures", pass, fail);
}
