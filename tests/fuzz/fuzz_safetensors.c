/* fuzz_safetensors.c - libFuzzer target: safetensors headers, and config.json. The first
 * byte picks the parser; every parsed tensor must lie inside the buffer and hold exactly
 * its shape's bytes (counted in 128 bits: a 64-bit product can wrap to a small number). */
#include "engine/model/safetensors.h"
#include "engine/model/weights.h"

#include <stdlib.h>

/* Whether nbytes is the shape's element count times the element size, counted without
 * wrapping: in 128 bits, saturated at 2^80 (the parser caps shape entries at 2^40). */
static int exact_size(const struct cvlm_st_tensor *t)
{
    const unsigned __int128 cap = (unsigned __int128)1 << 80;
    unsigned __int128 bytes = cvlm_dtype_size(t->t.dtype);
    for (int d = 0; d < t->t.ndim; d++) {
        bytes *= (uint64_t)t->t.shape[d];
        bytes = bytes > cap ? cap : bytes;
    }
    return bytes == t->nbytes;
}

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
            if (p < data + 1 || p + t[i].nbytes > data + size || !exact_size(&t[i]))
                abort();
        }
    for (size_t i = 0; i < n; i++)
        free(t[i].name);
    free(t);
    return 0;
}
