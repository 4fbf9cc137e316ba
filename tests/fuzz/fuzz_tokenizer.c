/* fuzz_tokenizer.c - libFuzzer target: encode and decode of arbitrary bytes with the
 * LLaMA tokenizer (and the streaming detokenizer), and loading arbitrary model files.
 * First byte: 0-63 encode, 64-127 decode ids, 128-255 load the rest as a model. */
#include "engine/text/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static struct cvlm_tokenizer *tok;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *root = getenv("COGVLM_SHARED_DATA");
    char path[1024];
    (void)argc;
    (void)argv;
    snprintf(path, sizeof(path), "%s/llama2-tokenizer.model", root ? root : "../shared/data");
    if (cvlm_tokenizer_load(path, &tok) &&
        cvlm_tokenizer_load("tests/unit/data/tok-charsmap.model", &tok)) {
        fprintf(stderr, "fuzz_tokenizer: no tokenizer model found\n");
        abort();
    }
    return 0;
}

static void detok_all(const int32_t *ids, size_t n, const char *full, size_t full_len)
{
    struct cvlm_detok d;
    char buf[256], *acc = malloc(full_len + 64);
    size_t len = 0, k;
    cvlm_detok_init(&d, tok);
    for (size_t i = 0; i < n; i++)
        if (cvlm_detok_push(&d, ids[i], buf, sizeof(buf), &k) == 0 && len + k <= full_len + 32) {
            memcpy(acc + len, buf, k);
            len += k;
        }
    if (cvlm_detok_flush(&d, buf, sizeof(buf), &k) == 0 && len + k <= full_len + 32) {
        memcpy(acc + len, buf, k);
        len += k;
    }
    if (len != full_len || memcmp(acc, full, len))
        abort(); /* the stream must equal the full decode */
    free(acc);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    if (data[0] >= 128) {
        struct cvlm_tokenizer *t = NULL;
        if (cvlm_tokenizer_load_mem(data + 1, size - 1, &t) == 0) {
            int32_t *ids = NULL;
            size_t n = 0;
            cvlm_tokenizer_encode(t, "Hello, world!", 13, &ids, &n);
            free(ids);
        }
        cvlm_tokenizer_destroy(t);
        return 0;
    }
    int32_t *ids = NULL;
    size_t n = 0;
    if (data[0] < 64) {
        if (cvlm_tokenizer_encode(tok, (const char *)data + 1, size - 1, &ids, &n))
            return 0;
    } else {
        int V = cvlm_tokenizer_vocab_size(tok);
        n = (size - 1) / 2;
        ids = malloc(n * sizeof(int32_t) + 1);
        for (size_t i = 0; i < n; i++)
            ids[i] = (int32_t)((data[1 + 2 * i] | data[2 + 2 * i] << 8) % V);
    }
    char *text = NULL;
    size_t len = 0;
    if (cvlm_tokenizer_decode(tok, ids, n, &text, &len) == 0)
        detok_all(ids, n, text, len);
    free(text);
    free(ids);
    return 0;
}
