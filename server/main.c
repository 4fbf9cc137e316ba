/* main.c - entry point of build/cogvlm-server, the OpenAI-compatible daemon.
 *
 * The HTTP front end (libuv + libmicrohttpd) is built by the "HTTP front end" issue on
 * top of the engine. Until then this binary validates the model it would serve and
 * says plainly that it cannot serve yet, rather than pretending to.
 */
#include "engine/error.h"
#include "engine/weights.h"

#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
    const char *dir = NULL;
    struct cvlm_weights *w;

    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc) {
            dir = argv[++i];
        } else if (!strcmp(argv[i], "--help")) {
            printf("usage: cogvlm-server --model DIR\n");
            return 0;
        } else {
            fprintf(stderr, "cogvlm-server: unknown argument '%s'\n", argv[i]);
            return 2;
        }
    }
    if (!dir) {
        fprintf(stderr, "cogvlm-server: --model DIR is required\n");
        return 2;
    }
    if (cvlm_weights_load(dir, &w)) {
        fprintf(stderr, "cogvlm-server: %s\n", cvlm_last_error());
        return 1;
    }
    cvlm_weights_destroy(w);
    fprintf(stderr, "cogvlm-server: model %s is valid, but this build has no HTTP front end "
                    "yet; use build/cogvlm\n", dir);
    return 3;
}
