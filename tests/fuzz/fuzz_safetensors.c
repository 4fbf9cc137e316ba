/* fuzz_safetensors.c - libFuzzer target: safetensors headers, and config.json. The first
 * byte picks the parser; every parsed tensor must lie inside the buffer. */
#include "engine/safetensors.h"
#include "engine/weights.h"

#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    if (data[0] & 1) {
        struct cvlm_config cfg;
        cvlm_config_parse((const char *)data + 1, size - 1, &cfg);
        return 0;
    }
    struct cvlm_st_tensor *t = NULL;
    size_t n = 0;
    if (cvlm_st_parse(data + 1, size - 1, 0, &t, &n) == 0)
        for (size_t i = 0; i < n; i++) {
            const uint8_t *p = t[i].t.data;
            if (p < data + 1 || p + t[i].nbytes > data + size)
                abort();
        }
    for (size_t i = 0; i < n; i++)
        free(t[i].name);
    free(t);
    return 0;
}
