/* fuzz_conf.c - libFuzzer target: the server's config file parser (key = value lines,
 * comments, quotes, sizes, booleans) through the real entry point. */
#include "server/options.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char path[64];
    char flag[80], err[256];
    struct cvlm_server_options c;
    if (!path[0])
        snprintf(path, sizeof(path), "/tmp/cvlm-fuzz-conf-%d", (int)getpid());
    FILE *f = fopen(path, "wb");
    if (!f)
        return 0;
    fwrite(data, 1, size, f);
    fclose(f);
    snprintf(flag, sizeof(flag), "--config=%s", path);
    char *argv[] = {"cogvlm-server", flag};
    cvlm_options_parse(&c, 2, argv, err, sizeof(err));
    cvlm_options_free(&c);
    return 0;
}
