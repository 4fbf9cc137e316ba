/* fuzz_bpe.c - libFuzzer target: the byte-level BPE tokenizer (LLaMA-3 tokenizer.json).
 * First byte: 0-127 encode the rest (never a special id; decode of the ids is valid UTF-8
 * and, for valid input, the input), 128-191 decode ids (3 bytes each) and stream them
 * through the detokenizer (equal to the decode), 192-255 load the rest as a
 * tokenizer.json and use it. */
#include "engine/text/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FIRST_SPECIAL 128000

static struct cvlm_tokenizer *tok;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *root = getenv("COGVLM_SHARED_DATA");
    char path[1024];
    (void)argc;
    (void)argv;
    snprintf(path, sizeof(path), "%s/llama3-tokenizer", root ? root : "../shared/data");
    if (cvlm_tokenizer_load(path, &tok)) {
        fprintf(stderr, "fuzz_bpe: cannot load %s\n", path);
        abort();
    }
    return 0;
}

/* Whether s[0..n) is well-formed UTF-8 (no overlong form, surrogate, or > U+10FFFF). */
static int valid_utf8(const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        unsigned c = s[i], need, lo = 0x80, hi = 0xbf;
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c < 0xc2 || c > 0xf4)
            return 0;
        need = c < 0xe0 ? 1 : c < 0xf0 ? 2 : 3;
        lo = c == 0xe0 ? 0xa0 : c == 0xf0 ? 0x90 : 0x80;
        hi = c == 0xed ? 0x9f : c == 0xf4 ? 0x8f : 0xbf;
        if (i + need >= n)
            return 0;
        for (unsigned k = 1; k <= need; k++, lo = 0x80, hi = 0xbf)
            if (s[i + k] < lo || s[i + k] > hi)
                return 0;
        i += need + 1;
    }
    return 1;
}

static void stream_equals_decode(const struct cvlm_tokenizer *t, const int32_t *ids, size_t n)
{
    char *full = NULL, buf[512];
    size_t len = 0, at = 0, k;
    if (cvlm_tokenizer_decode(t, ids, n, &full, &len))
        return;
    if (!valid_utf8((const unsigned char *)full, len))
        abort();
    struct cvlm_detok d;
    cvlm_detok_init(&d, t);
    for (size_t i = 0; i <= n; i++) {
        int rc = i < n ? cvlm_detok_push(&d, ids[i], buf, sizeof(buf), &k)
                       : cvlm_detok_flush(&d, buf, sizeof(buf), &k);
        if (rc && t == tok)
            abort(); /* LLaMA-3's longest token needs 394 bytes at most */
        if (rc)
            break; /* a fuzzed file's token too long for buf: refused, fine */
        if (at + k > len || memcmp(full + at, buf, k) || !valid_utf8((unsigned char *)buf, k))
            abort(); /* each chunk whole UTF-8, and the chunks are the decode */
        at += k;
        if (i == n && at != len)
            abort();
    }
    free(full);
}

/* Encodes data with t: ids in range and below `special`; the decode is the input when
 * `roundtrip` and the input is valid UTF-8; the stream equals the decode. */
static void use(const struct cvlm_tokenizer *t, const uint8_t *data, size_t size, int special,
                int roundtrip)
{
    int32_t *ids = NULL;
    size_t n = 0;
    if (cvlm_tokenizer_encode(t, (const char *)data, size, &ids, &n))
        return;
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= cvlm_tokenizer_vocab_size(t) || ids[i] >= special)
            abort();
    char *text = NULL;
    size_t len = 0;
    if (roundtrip && cvlm_tokenizer_decode(t, ids, n, &text, &len) == 0) {
        int same = len == size && !memcmp(text, data, size);
        if (same != valid_utf8(data, size))
            abort(); /* valid text round-trips; invalid text comes back with U+FFFD */
    }
    free(text);
    stream_equals_decode(t, ids, n);
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    if (data[0] < 128) {
        use(tok, data + 1, size - 1, FIRST_SPECIAL, 1);
    } else if (data[0] < 192) {
        int V = cvlm_tokenizer_vocab_size(tok);
        size_t n = (size - 1) / 3;
        int32_t *ids = malloc(n * sizeof(int32_t) + 1);
        for (size_t i = 0; i < n; i++) {
            const uint8_t *p = data + 1 + 3 * i;
            ids[i] = (int32_t)((p[0] | p[1] << 8 | (uint32_t)p[2] << 16) % (uint32_t)V);
        }
        stream_equals_decode(tok, ids, n);
        free(ids);
    } else {
        struct cvlm_tokenizer *t = NULL;
        if (cvlm_tokenizer_load_mem(data + 1, size - 1, &t) == 0)
            use(t, (const uint8_t *)"Hello, world! 123 <|x|>\n", 24, 1 << 30, 0);
        cvlm_tokenizer_destroy(t);
    }
    return 0;
}
