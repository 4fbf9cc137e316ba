/* test_bpe.c - byte-level BPE tokenizer (LLaMA-3 tokenizer.json): encode and decode against
 * Meta's reference tokenizer, the streaming detokenizer, special tokens, hostile files.
 *
 * Reference data: ../shared/data/llama3-tokenizer/ (tokenizer.json, tokenizer_config.json,
 * golden.jsonl: {"text", "ids"} lines produced by Meta's reference tokenizer). Small
 * tokenizer.json files made here (the 256 byte tokens plus a few) pin down the merge
 * order, ignore_merges and the refusals of malformed files.
 *
 * COGVLM_BPE_BENCH=1 makes bpe_bench print the encode throughput (MB/s, one thread) on
 * about 4 MB of English (the repository's Markdown documents, repeated);
 * COGVLM_BPE_BENCH=FILE on that file's text, repeated to as much. The benchmark of record
 * is `cogvlm bench-tokenizer` (both tokenizers, whole text and prompt-sized calls), which
 * bpe_bench_cli runs briefly.
 */
#include "engine/error.h"
#include "engine/text/tokenizer.h"
#include "tests/unit/harness.h"

#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

#define L3_DIR "llama3-tokenizer"
#define L3_JSON L3_DIR "/tokenizer.json"
#define L3_GOLDEN L3_DIR "/golden.jsonl"
#define L3_FIRST_ADDED 128000 /* ids from here on are LLaMA-3's added (special) tokens */
#define EOT_ID 128009

/* ---- helpers ------------------------------------------------------------------------ */

static struct cvlm_tokenizer *l3_tok;

static void free_l3(void)
{
    cvlm_tokenizer_destroy(l3_tok);
}

/* The LLaMA-3 tokenizer, loaded once (from its directory: with tokenizer_config.json). */
static const struct cvlm_tokenizer *l3(void)
{
    if (!l3_tok) {
        if (cvlm_tokenizer_load(cvlm_test_data(L3_DIR), &l3_tok)) {
            cvlm_test_fail(__FILE__, __LINE__, "load %s: %s", cvlm_test_data(L3_DIR),
                           cvlm_last_error());
            return NULL;
        }
        atexit(free_l3);
    }
    return l3_tok;
}

struct golden {
    char **text;
    size_t *len;
    int32_t **ids;
    size_t *n_ids;
    size_t n;
};

static struct golden read_golden(void)
{
    struct golden g = {0};
    size_t len;
    char *data = (char *)cvlm_test_read_file(cvlm_test_data(L3_GOLDEN), &len);
    if (!data) {
        cvlm_test_fail(__FILE__, __LINE__, "cannot read %s", cvlm_test_data(L3_GOLDEN));
        return g;
    }
    for (char *p = data, *nl; p < data + len; p = nl + 1) {
        if (!(nl = memchr(p, '\n', (size_t)(data + len - p))))
            nl = data + len;
        json_error_t err;
        json_t *v = json_loadb(p, (size_t)(nl - p), JSON_ALLOW_NUL, &err), *t, *a;
        if (!v || !json_is_string(t = json_object_get(v, "text")) ||
            !json_is_array(a = json_object_get(v, "ids"))) {
            cvlm_test_fail(__FILE__, __LINE__, "golden line %zu unreadable", g.n + 1);
            json_decref(v);
            continue;
        }
        g.text = realloc(g.text, (g.n + 1) * sizeof(*g.text));
        g.len = realloc(g.len, (g.n + 1) * sizeof(*g.len));
        g.ids = realloc(g.ids, (g.n + 1) * sizeof(*g.ids));
        g.n_ids = realloc(g.n_ids, (g.n + 1) * sizeof(*g.n_ids));
        g.len[g.n] = json_string_length(t);
        g.text[g.n] = malloc(g.len[g.n] + 1);
        memcpy(g.text[g.n], json_string_value(t), g.len[g.n] + 1);
        g.n_ids[g.n] = json_array_size(a);
        g.ids[g.n] = malloc((g.n_ids[g.n] + 1) * sizeof(int32_t));
        for (size_t i = 0; i < g.n_ids[g.n]; i++)
            g.ids[g.n][i] = (int32_t)json_integer_value(json_array_get(a, i));
        g.n++;
        json_decref(v);
    }
    free(data);
    return g;
}

static void free_golden(struct golden *g)
{
    for (size_t i = 0; i < g->n; i++) {
        free(g->text[i]);
        free(g->ids[i]);
    }
    free(g->text);
    free(g->len);
    free(g->ids);
    free(g->n_ids);
}

/* Strict UTF-8 validity (independent of the tokenizer's own checker). */
static int valid_utf8(const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        unsigned c = s[i], need, cp, min;
        if (c < 0x80) {
            i++;
            continue;
        }
        if ((c & 0xe0) == 0xc0)
            need = 1, cp = c & 0x1f, min = 0x80;
        else if ((c & 0xf0) == 0xe0)
            need = 2, cp = c & 0x0f, min = 0x800;
        else if ((c & 0xf8) == 0xf0)
            need = 3, cp = c & 0x07, min = 0x10000;
        else
            return 0;
        if (i + need >= n)
            return 0;
        for (unsigned k = 1; k <= need; k++) {
            if ((s[i + k] & 0xc0) != 0x80)
                return 0;
            cp = cp << 6 | (s[i + k] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp < 0xe000))
            return 0;
        i += need + 1;
    }
    return 1;
}

static int same(const char *a, size_t na, const char *b, size_t nb)
{
    return na == nb && (na == 0 || !memcmp(a, b, na));
}

/* Encodes text; returns the ids (malloc'd) or NULL on failure (recorded). */
static int32_t *enc(const struct cvlm_tokenizer *tok, const char *text, size_t len, size_t *n)
{
    int32_t *ids = NULL;
    *n = 0;
    int rc = cvlm_tokenizer_encode(tok, text, len, &ids, n);
    CHECKF(rc == 0, "encode of %zu bytes: rc %d (%s)", len, rc, cvlm_last_error());
    if (rc == 0 && !ids)
        ids = malloc(sizeof(*ids));
    return ids;
}

/* Decodes ids; returns the text (malloc'd) or NULL on failure (recorded). */
static char *dec(const struct cvlm_tokenizer *tok, const int32_t *ids, size_t n, size_t *len)
{
    char *text = NULL;
    int rc = cvlm_tokenizer_decode(tok, ids, n, &text, len);
    CHECKF(rc == 0, "decode of %zu ids: rc %d (%s)", n, rc, cvlm_last_error());
    return text;
}

/* Streams ids through a detok (out buffer of `cap` bytes): every chunk is whole UTF-8 and
 * the chunks concatenate to the decode. Returns 1 when all held. */
static int check_stream(const struct cvlm_tokenizer *tok, const int32_t *ids, size_t n, size_t cap,
                        const char *what, size_t idx)
{
    struct cvlm_detok d;
    char *chunk = malloc(cap);
    size_t flen, cn, at = 0;
    char *full = dec(tok, ids, n, &flen);
    char *cat = malloc(flen + 1);
    int ok = full != NULL;
    cvlm_detok_init(&d, tok);
    for (size_t i = 0; ok && i <= n; i++) {
        int rc = i < n ? cvlm_detok_push(&d, ids[i], chunk, cap, &cn)
                       : cvlm_detok_flush(&d, chunk, cap, &cn);
        ok = rc == 0 && at + cn <= flen && chunk[cn] == '\0';
        CHECKF(ok, "%s %zu: push %zu failed or overran (rc %d)", what, idx, i, rc);
        ok = ok && valid_utf8((unsigned char *)chunk, cn);
        CHECKF(ok || rc, "%s %zu: chunk %zu is not whole UTF-8", what, idx, i);
        if (ok) {
            memcpy(cat + at, chunk, cn);
            at += cn;
        }
    }
    CHECKF(!ok || same(cat, at, full, flen), "%s %zu: stream differs from decode", what, idx);
    ok = ok && same(cat, at, full, flen);
    free(full);
    free(cat);
    free(chunk);
    return ok;
}

/* The id of the single-byte token of `byte` (the first vocab id whose text is that byte). */
static int32_t byte_token(const struct cvlm_tokenizer *tok, uint8_t byte)
{
    static int32_t table[256];
    static const struct cvlm_tokenizer *for_tok;
    if (for_tok != tok) {
        memset(table, 0xff, sizeof(table));
        for (int32_t id = cvlm_tokenizer_vocab_size(tok) - 1; id >= 0; id--) {
            const char *s;
            if (cvlm_tokenizer_piece_text(tok, id, &s) == 1)
                table[(uint8_t)s[0]] = id;
        }
        for_tok = tok;
    }
    return table[byte];
}

static void expect_l3(const struct cvlm_tokenizer *tok, const char *text, const int32_t *exp,
                      size_t n_exp)
{
    size_t n;
    int32_t *ids = enc(tok, text, strlen(text), &n);
    CHECKF(ids && n == n_exp && !memcmp(ids, exp, n * sizeof(*ids)), "'%s': %zu ids", text, n);
    free(ids);
}

/* ---- against the reference -------------------------------------------------------- */

TEST(bpe_golden_exact)
{
    const struct cvlm_tokenizer *tok = l3();
    REQUIRE(tok);
    struct golden g = read_golden();
    size_t exact = 0;
    for (size_t i = 0; i < g.n; i++) {
        size_t n;
        int32_t *ids = enc(tok, g.text[i], g.len[i], &n);
        int ok = ids && n == g.n_ids[i] && (n == 0 || !memcmp(ids, g.ids[i], n * 4));
        CHECKF(ok, "golden line %zu: %zu ids, expected %zu", i + 1, n, g.n_ids[i]);
        exact += ok;
        free(ids);
    }
    printf("  bpe golden: %zu/%zu exact\n", exact, g.n);
    CHECK(g.n == 254);
    free_golden(&g);
}

TEST(bpe_golden_roundtrip)
{
    const struct cvlm_tokenizer *tok = l3();
    REQUIRE(tok);
    struct golden g = read_golden();
    for (size_t i = 0; i < g.n; i++) {
        size_t n, len, glen;
        int32_t *ids = enc(tok, g.text[i], g.len[i], &n);
        char *text = ids ? dec(tok, ids, n, &len) : NULL;
        CHECKF(text && same(text, len, g.text[i], g.len[i]), "line %zu: decode(encode) differs",
               i + 1);
        char *gtext = dec(tok, g.ids[i], g.n_ids[i], &glen);
        CHECKF(gtext && same(gtext, glen, g.text[i], g.len[i]),
               "line %zu: decode(golden ids) "
               "differs",
               i + 1);
        free(gtext);
        free(text);
        free(ids);
    }
    free_golden(&g);
}

TEST(bpe_golden_min_ids)
{
    const struct cvlm_tokenizer *tok = l3();
    REQUIRE(tok);
    struct golden g = read_golden();
    for (size_t i = 0; i < g.n; i++) {
        size_t lo = 99999;
        CHECK(cvlm_tokenizer_min_ids(tok, g.text[i], g.len[i], &lo) == 0);
        CHECKF(lo <= g.n_ids[i], "line %zu: min_ids %zu > %zu ids", i + 1, lo, g.n_ids[i]);
        CHECKF(g.len[i] == 0 || lo >= 1, "line %zu: min_ids 0 for a non-empty text", i + 1);
    }
    free_golden(&g);
}

TEST(bpe_golden_detok)
{
    const struct cvlm_tokenizer *tok = l3();
    REQUIRE(tok);
    struct golden g = read_golden();
    for (size_t i = 0; i < g.n; i++)
        check_stream(tok, g.ids[i], g.n_ids[i], 400, "golden line", i + 1);
    free_golden(&g);
}

/* \s is Unicode White_Space, as in the reference: U+180E (a format character) is not a
 * space, U+3000, U+2028, U+205F and U+00A0 are. Ids from a Python reimplementation
 * (regex module) that agrees with the golden file. */
TEST(bpe_unicode_whitespace)
{
    const struct cvlm_tokenizer *tok = l3();
    REQUIRE(tok);
    expect_l3(tok, "k\xe1\xa0\x8e<jx", (int32_t[]){74, 157, 254, 236, 27, 73, 87}, 7);
    expect_l3(tok, "a\xe1\xa0\x8e_K9", (int32_t[]){64, 157, 254, 236, 62, 42, 24}, 7);
    expect_l3(tok, "\xe3\x80\x80\xe2\x80\xa8 \xe1\xa0\x8e\xe2\x81\x9fz",
              (int32_t[]){23249, 378, 101, 87189, 254, 236, 53233, 253, 89}, 9);
    expect_l3(tok, "x\xc2\xa0\xc2\xa0 y", (int32_t[]){87, 9421, 379}, 3);
}

/* ---- special tokens, lookups, accessors ------------------------------------------- */

TEST(bpe_special_text_is_plain_text)
{
    const struct cvlm_tokenizer *tok = l3();
    REQUIRE(tok);
    const char *texts[] = {"<|eot_id|>", "<|begin_of_text|>Hello<|end_of_text|>",
                           "x <|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
                           "<|reserved_special_token_5|><|eot_id|><|eot_id|>"};
    for (size_t t = 0; t < sizeof(texts) / sizeof(*texts); t++) {
        size_t n, len;
        int32_t *ids = enc(tok, texts[t], strlen(texts[t]), &n);
        REQUIRE(ids);
        for (size_t i = 0; i < n; i++)
            CHECKF(ids[i] != EOT_ID && ids[i] < L3_FIRST_ADDED, "'%s': id %d", texts[t], ids[i]);
        char *back = dec(tok, ids, n, &len);
        CHECKF(back && same(back, len, texts[t], strlen(texts[t])), "'%s' decodes to '%s'",
               texts[t], back ? back : "");
        free(back);
        free(ids);
    }
    /* every added token's content, alone: plain text too */
    for (int32_t id = L3_FIRST_ADDED; id < cvlm_tokenizer_vocab_size(tok); id++) {
        const char *piece = cvlm_tokenizer_piece(tok, id);
        size_t n;
        REQUIRE(piece && *piece);
        int32_t *ids = enc(tok, piece, strlen(piece), &n);
        for (size_t i = 0; ids && i < n; i++)
            CHECKF(ids[i] < L3_FIRST_ADDED, "'%s' encodes to the special id %d", piece, ids[i]);
        free(ids);
    }
}

TEST(bpe_lookup_and_accessors)
{
    const struct cvlm_tokenizer *tok = l3();
    const char *s;
    REQUIRE(tok);
    CHECK(cvlm_tokenizer_vocab_size(tok) == 128256);
    CHECK(cvlm_tokenizer_bos_id(tok) == 128000); /* tokenizer_config.json */
    CHECK(cvlm_tokenizer_eos_id(tok) == 128001);
    CHECK(cvlm_tokenizer_unk_id(tok) == -1);
    CHECK(cvlm_tokenizer_token_id(tok, "<|begin_of_text|>") == 128000);
    CHECK(cvlm_tokenizer_token_id(tok, "<|eot_id|>") == EOT_ID);
    CHECK(cvlm_tokenizer_token_id(tok, "<|start_header_id|>") == 128006);
    CHECK(cvlm_tokenizer_token_id(tok, "Hello") == 9906);
    CHECK(cvlm_tokenizer_token_id(tok, "\xc4\xa0Hello") == 22691); /* "ĠHello" */
    CHECK(cvlm_tokenizer_token_id(tok, " Hello") == -1);           /* bytes, not a piece */
    CHECK(cvlm_tokenizer_token_id(tok, "<|eot_id|> ") == -1);
    CHECK(cvlm_tokenizer_token_id(tok, "") == -1);
    CHECK(!strcmp(cvlm_tokenizer_piece(tok, 22691), "\xc4\xa0Hello"));
    CHECK(!strcmp(cvlm_tokenizer_piece(tok, EOT_ID), "<|eot_id|>"));
    CHECK(cvlm_tokenizer_piece(tok, -1) == NULL && cvlm_tokenizer_piece(tok, 128256) == NULL);
    CHECK(cvlm_tokenizer_piece_text(tok, 22691, &s) == 6 && !memcmp(s, " Hello", 6));
    CHECK(cvlm_tokenizer_piece_text(tok, 198, &s) == 1 && s[0] == '\n'); /* "Ċ" */
    CHECK(cvlm_tokenizer_piece_text(tok, EOT_ID, &s) == 0 && *s == '\0');
    CHECK(cvlm_tokenizer_piece_text(tok, 1 << 30, &s) == 0 && *s == '\0');
    int32_t ids[] = {128000, 9906, 1917, EOT_ID, 128001};
    size_t len;
    char *text = dec(tok, ids, 5, &len);
    CHECKF(text && same(text, len, "Hello world", 11), "decode '%s'", text ? text : "");
    free(text);
    int32_t bad[] = {9906, 128256};
    text = (char *)1;
    CHECK(cvlm_tokenizer_decode(tok, bad, 2, &text, &len) == CVLM_EINVAL && text == NULL);
    for (int b = 0; b < 256; b++)
        CHECKF(byte_token(tok, (uint8_t)b) >= 0, "no token for byte %d", b);
}

/* ---- UTF-8 handling --------------------------------------------------------------- */

TEST(bpe_invalid_utf8_input)
{
    const struct cvlm_tokenizer *tok = l3();
    REQUIRE(tok);
    static const struct {
        const char *in, *out;
        size_t in_len;
    } cases[] = {
        {"\xff"
         "abc",
         "\xef\xbf\xbd"
         "abc",
         4},
        {"abc\xe2\x82", "abc\xef\xbf\xbd", 5}, /* cut short at the end */
        {"\xe2\x82"
         "A\xc0\xaf",
         "\xef\xbf\xbd"
         "A\xef\xbf\xbd\xef\xbf\xbd",
         5},
        {"\xed\xa0\x80!", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd!", 4}, /* a surrogate */
        {"a\0b", "a\0b", 3},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(*cases); i++) {
        size_t n, len, out_len = i == 4 ? 3 : strlen(cases[i].out);
        int32_t *ids = enc(tok, cases[i].in, cases[i].in_len, &n);
        char *text = ids ? dec(tok, ids, n, &len) : NULL;
        CHECKF(text && same(text, len, cases[i].out, out_len), "case %zu: decodes to '%s'", i,
               text ? text : "");
        free(text);
        free(ids);
    }
}

TEST(bpe_detok_partial_sequences)
{
    const struct cvlm_tokenizer *tok = l3();
    REQUIRE(tok);
    int32_t e2 = byte_token(tok, 0xe2), x82 = byte_token(tok, 0x82), xac = byte_token(tok, 0xac);
    int32_t f0 = byte_token(tok, 0xf0), x9f = byte_token(tok, 0x9f), A = byte_token(tok, 'A');
    int32_t euro[] = {e2, x82, xac}, cut[] = {e2, x82, A}, tail[] = {A, f0, x9f};
    int32_t around[] = {e2, EOT_ID, x82, 128000, xac}, bad[] = {x82, x82, e2, e2, x82, xac};
    struct {
        const int32_t *ids;
        size_t n;
        const char *text;
    } cases[] = {
        {euro, 3, "\xe2\x82\xac"},
        {cut, 3,
         "\xef\xbf\xbd"
         "A"},
        {tail, 3, "A\xef\xbf\xbd"},  /* the flush writes it */
        {around, 5, "\xe2\x82\xac"}, /* special tokens between the bytes: nothing */
        {bad, 6, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xe2\x82\xac"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(*cases); i++) {
        size_t len;
        char *text = dec(tok, cases[i].ids, cases[i].n, &len);
        CHECKF(text && same(text, len, cases[i].text, strlen(cases[i].text)), "case %zu: '%s'", i,
               text ? text : "");
        free(text);
        check_stream(tok, cases[i].ids, cases[i].n, 64, "partial case", i);
    }
    /* the euro sign arrives whole with its last byte, not before */
    struct cvlm_detok d;
    char out[64];
    size_t n;
    cvlm_detok_init(&d, tok);
    CHECK(cvlm_detok_push(&d, e2, out, sizeof(out), &n) == 0 && n == 0);
    CHECK(cvlm_detok_push(&d, x82, out, sizeof(out), &n) == 0 && n == 0);
    CHECK(cvlm_detok_push(&d, xac, out, sizeof(out), &n) == 0 && n == 3);
    CHECK(cvlm_detok_flush(&d, out, sizeof(out), &n) == 0 && n == 0);
    /* too small a buffer: refused, nothing consumed */
    int32_t hello = 22691;
    cvlm_detok_init(&d, tok);
    CHECK(cvlm_detok_push(&d, hello, out, 4, &n) == CVLM_ETOOBIG);
    CHECK(cvlm_detok_push(&d, hello, out, sizeof(out), &n) == 0 && n == 6);
    CHECK(cvlm_detok_push(&d, 128256, out, sizeof(out), &n) == CVLM_EINVAL);
}

/* ---- robustness ------------------------------------------------------------------- */

static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Random texts (ASCII, multi-byte characters, stray bytes, special-token spellings) and
 * random id sequences, with a fixed seed: encode never yields a special id, valid text
 * round-trips, streams equal decodes. */
TEST(bpe_random_robust)
{
    static const char *bits[] = {"a",        " ",  "\n",   "\t",         "é",    "中",
                                 "😀",        "12", "'s",   "<|eot_id|>", "\xff", "\xe2\x82",
                                 "\xcc\x81", "  ", "\r\n", "!",          "Ab"};
    const struct cvlm_tokenizer *tok = l3();
    REQUIRE(tok);
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    int V = cvlm_tokenizer_vocab_size(tok);
    for (int iter = 0; iter < 300; iter++) {
        char text[512];
        size_t len = 0, n, back_len;
        int valid = 1, parts = (int)(rng_next(&seed) % 40);
        for (int k = 0; k < parts; k++) {
            const char *b = bits[rng_next(&seed) % (sizeof(bits) / sizeof(*bits))];
            valid &= b[0] != '\xff' && b[0] != '\xe2';
            memcpy(text + len, b, strlen(b));
            len += strlen(b);
        }
        int32_t *ids = enc(tok, text, len, &n);
        REQUIRE(ids);
        for (size_t i = 0; i < n; i++)
            CHECKF(ids[i] >= 0 && ids[i] < L3_FIRST_ADDED, "iter %d: id %d", iter, ids[i]);
        char *back = dec(tok, ids, n, &back_len);
        CHECKF(back && valid_utf8((unsigned char *)back, back_len), "iter %d: invalid", iter);
        CHECKF(!valid || (back && same(back, back_len, text, len)), "iter %d: no round trip", iter);
        free(back);
        free(ids);
        int32_t rnd[24];
        for (int k = 0; k < 24; k++) {
            uint64_t r = rng_next(&seed);
            rnd[k] = r % 3 == 0 ? byte_token(tok, (uint8_t)(r >> 8)) : (int32_t)((r >> 8) % V);
        }
        check_stream(tok, rnd, 24, 400, "random ids", (size_t)iter);
    }
}

/* Long runs: one chunk of 256 KiB (BPE over it), as many spaces (the pattern's lookahead),
 * digits, newlines, punctuation; each must round-trip. */
TEST(bpe_long_runs)
{
    const struct cvlm_tokenizer *tok = l3();
    REQUIRE(tok);
    const char fill[] = {'a', ' ', '7', '\n', '.'};
    size_t len = 1 << 18;
    char *text = malloc(len + 2);
    for (size_t f = 0; f < sizeof(fill); f++) {
        memset(text, fill[f], len);
        text[len] = 'x';
        size_t n, back_len;
        int32_t *ids = enc(tok, text, len + 1, &n);
        char *back = ids ? dec(tok, ids, n, &back_len) : NULL;
        CHECKF(back && same(back, back_len, text, len + 1), "run of '%c': no round trip", fill[f]);
        free(back);
        free(ids);
    }
    free(text);
}

/* ---- small handmade tokenizer.json files ------------------------------------------ */

/* The piece (GPT-2 byte alphabet) of byte b, written from the definition. */
static void byte_piece(int b, char out[3])
{
    static int map[256];
    if (!map['!']) {
        int next = 256;
        for (int c = 0; c < 256; c++) {
            int printable = (c >= 0x21 && c <= 0x7e) || (c >= 0xa1 && c <= 0xac) || c >= 0xae;
            map[c] = printable ? c : next++;
        }
    }
    int cp = map[b];
    if (cp < 0x80) {
        out[0] = (char)cp;
        out[1] = 0;
    } else {
        out[0] = (char)(0xc0 | cp >> 6);
        out[1] = (char)(0x80 | (cp & 0x3f));
        out[2] = 0;
    }
}

/* A tokenizer.json: the 256 bytes (ids 0..255), "ab" 256, "bc" 257, "abc" 258, "aa" 259,
 * "\xc4\xa0a" (" a") 260; merges "b c", "a b", "a a", "Ġ a"; added "<|end|>" 261 special,
 * "<x>" 262 not special; LLaMA-3's kind of pre-tokenizer with a simple pattern. */
static json_t *tiny_json(int ignore_merges)
{
    json_t *vocab = json_object(), *merges = json_array(), *added = json_array();
    char p[3];
    for (int b = 0; b < 256; b++) {
        byte_piece(b, p);
        json_object_set_new(vocab, p, json_integer(b));
    }
    const char *more[] = {"ab", "bc", "abc", "aa",
                          "\xc4\xa0"
                          "a"};
    for (int i = 0; i < 5; i++)
        json_object_set_new(vocab, more[i], json_integer(256 + i));
    json_array_append_new(merges, json_string("b c"));
    json_array_append_new(merges, json_pack("[ss]", "a", "b"));
    json_array_append_new(merges, json_string("a a"));
    json_array_append_new(merges, json_string("\xc4\xa0 a"));
    json_array_append_new(added,
                          json_pack("{si s:s s:b}", "id", 261, "content", "<|end|>", "special", 1));
    json_array_append_new(added,
                          json_pack("{si s:s s:b}", "id", 262, "content", "<x>", "special", 0));
    json_t *split = json_pack("{s:s s:{s:s} s:s s:b}", "type", "Split", "pattern", "Regex",
                              " ?\\p{L}+|\\s+|[^\\s\\p{L}]+", "behavior", "Isolated", "invert", 0);
    json_t *bl =
        json_pack("{s:s s:b s:b}", "type", "ByteLevel", "add_prefix_space", 0, "use_regex", 0);
    return json_pack("{s:o s:n s:{s:s s:[o o]} s:{s:s s:o s:o s:b} s:{s:s}}", "added_tokens", added,
                     "normalizer", "pre_tokenizer", "type", "Sequence", "pretokenizers", split, bl,
                     "model", "type", "BPE", "vocab", vocab, "merges", merges, "ignore_merges",
                     ignore_merges, "decoder", "type", "ByteLevel");
}

/* Loads a JSON value as tokenizer.json from memory; rc, with the error contract checked. */
static int load_json(json_t *j, struct cvlm_tokenizer **out)
{
    char *s = json_dumps(j, JSON_COMPACT);
    struct cvlm_tokenizer *tok = (struct cvlm_tokenizer *)1;
    cvlm_clear_error();
    int rc = cvlm_tokenizer_load_mem(s, strlen(s), &tok);
    CHECKF(rc == 0 ? tok != NULL : tok == NULL, "rc %d with tokenizer %p", rc, (void *)tok);
    CHECKF(rc == 0 || strlen(cvlm_last_error()) > 15, "rc %d with a vague detail '%s'", rc,
           cvlm_last_error());
    free(s);
    if (out)
        *out = rc == 0 ? tok : NULL;
    else if (rc == 0)
        cvlm_tokenizer_destroy(tok);
    return rc;
}

static void expect_ids(const struct cvlm_tokenizer *tok, const char *text, const int32_t *exp,
                       size_t n_exp)
{
    size_t n;
    int32_t *ids = enc(tok, text, strlen(text), &n);
    int ok = ids && n == n_exp && (n == 0 || !memcmp(ids, exp, n * sizeof(*ids)));
    CHECKF(ok, "'%s': %zu ids [%d %d ...], expected %zu [%d ...]", text, n,
           n > 0 && ids ? ids[0] : -1, n > 1 && ids ? ids[1] : -1, n_exp, exp[0]);
    free(ids);
}

TEST(bpe_tiny_merge_order)
{
    struct cvlm_tokenizer *tok;
    json_t *j = tiny_json(0);
    REQUIRE(load_json(j, &tok) == 0);
    expect_ids(tok, "abc", (int32_t[]){'a', 257}, 2); /* "b c" has the lower rank */
    expect_ids(tok, "aaa", (int32_t[]){259, 'a'}, 2); /* equal ranks: leftmost first */
    expect_ids(tok, "aaaa", (int32_t[]){259, 259}, 2);
    expect_ids(tok, "ab ab", (int32_t[]){256, ' ', 256}, 3); /* " ab": "a b" before "Ġ a" */
    expect_ids(tok, " a", (int32_t[]){260}, 1);
    expect_ids(tok, " aa", (int32_t[]){' ', 259}, 2);
    expect_ids(tok, "<|end|>", (int32_t[]){'<', '|', 'e', 'n', 'd', '|', '>'}, 7);
    expect_ids(tok, "<x>", (int32_t[]){'<', 'x', '>'}, 3); /* added tokens are not matched */
    CHECK(cvlm_tokenizer_token_id(tok, "<|end|>") == 261);
    CHECK(cvlm_tokenizer_vocab_size(tok) == 263);
    CHECK(cvlm_tokenizer_bos_id(tok) == -1 && cvlm_tokenizer_eos_id(tok) == -1);
    int32_t ids[] = {256, 261, 262, 257};
    size_t len;
    char *text = dec(tok, ids, 4, &len);
    CHECKF(text && !strcmp(text, "ab<x>bc"), "decode '%s'", text ? text : "");
    free(text);
    cvlm_tokenizer_destroy(tok);
    json_decref(j);

    j = tiny_json(1); /* ignore_merges: a chunk that is a token is that token */
    REQUIRE(load_json(j, &tok) == 0);
    expect_ids(tok, "abc", (int32_t[]){258}, 1);
    expect_ids(tok, "aaa", (int32_t[]){259, 'a'}, 2);
    cvlm_tokenizer_destroy(tok);
    json_decref(j);
}

/* Ids no token has (between the vocab and an added token) decode to nothing. */
TEST(bpe_tiny_id_holes)
{
    struct cvlm_tokenizer *tok;
    json_t *j = tiny_json(0);
    json_array_append_new(json_object_get(j, "added_tokens"),
                          json_pack("{si s:s s:b}", "id", 300, "content", "<hi>", "special", 0));
    REQUIRE(load_json(j, &tok) == 0);
    CHECK(cvlm_tokenizer_vocab_size(tok) == 301);
    CHECK(!strcmp(cvlm_tokenizer_piece(tok, 280), ""));
    CHECK(!strcmp(cvlm_tokenizer_piece(tok, 300), "<hi>"));
    int32_t ids[] = {'a', 280, 300};
    size_t len;
    char *text = dec(tok, ids, 3, &len);
    CHECKF(text && !strcmp(text, "a<hi>"), "decode '%s'", text ? text : "");
    free(text);
    CHECK(check_stream(tok, ids, 3, 64, "holes", 0));
    cvlm_tokenizer_destroy(tok);
    json_decref(j);
}

/* One mutation of the tiny file: the value at key path `a`.`b` (b NULL: top level). */
static void expect_refused(const char *a, const char *b, json_t *v, int code, const char *needle)
{
    json_t *j = tiny_json(0);
    json_t *parent = b ? json_object_get(j, a) : j;
    json_object_set_new(parent, b ? b : a, v);
    int rc = load_json(j, NULL);
    CHECKF(rc == code, "%s.%s: rc %d (%s), expected %d", a, b ? b : "", rc, cvlm_last_error(),
           code);
    CHECKF(strstr(cvlm_last_error(), needle), "%s.%s: detail '%s' lacks '%s'", a, b ? b : "",
           cvlm_last_error(), needle);
    json_decref(j);
}

TEST(bpe_malformed_files)
{
    struct cvlm_tokenizer *tok = (struct cvlm_tokenizer *)1;
    const char *texts[] = {"{", "{}", "{\"model\": 3}", "{\"model\": {}}", "{\"model\": []}"};
    const char *needles[] = {"line", "model", "model", "vocab", "model"};
    for (int i = 0; i < 5; i++) {
        CHECKF(cvlm_tokenizer_load_mem(texts[i], strlen(texts[i]), &tok) == CVLM_EFORMAT,
               "'%s' accepted", texts[i]);
        CHECKF(tok == NULL && strstr(cvlm_last_error(), needles[i]), "'%s': detail '%s'", texts[i],
               cvlm_last_error());
    }
    json_t *arr = json_array();
    CHECK(load_json(arr, NULL) == CVLM_EFORMAT); /* "[]": SentencePiece's parser refuses */
    json_decref(arr);

    expect_refused("model", "merges", json_pack("[s]", "ab"), CVLM_EFORMAT, "merges[0]");
    expect_refused("model", "merges", json_pack("[s]", "a zz"), CVLM_EFORMAT, "zz");
    expect_refused("model", "merges", json_pack("[s]", "a b c"), CVLM_EFORMAT, "merges[0]");
    expect_refused("model", "merges", json_pack("[s]", "c a"), CVLM_EFORMAT, "ca");
    expect_refused("model", "merges", json_pack("[i]", 42), CVLM_EFORMAT, "merges[0]");
    expect_refused("model", "merges", json_pack("[[s]]", "a"), CVLM_EFORMAT, "merges[0]");
    expect_refused("model", "merges", json_string("a b"), CVLM_EFORMAT, "merges");
    expect_refused("model", "merges", json_null(), CVLM_EFORMAT, "merges");
    expect_refused("model", "vocab", json_pack("{s:i}", "a", -1), CVLM_EFORMAT, "id");
    expect_refused("model", "vocab", json_pack("{s:s}", "a", "1"), CVLM_EFORMAT, "id");
    expect_refused("model", "vocab", json_pack("{s:i}", "a", 1 << 30), CVLM_EFORMAT, "id");
    expect_refused("model", "vocab", json_pack("{s:i s:i}", "a", 0, "b", 0), CVLM_EFORMAT, "id");
    expect_refused("model", "vocab", json_array(), CVLM_EFORMAT, "vocab");
    expect_refused("model", "type", json_string("WordPiece"), CVLM_EUNSUPPORTED, "WordPiece");
    expect_refused("model", "byte_fallback", json_true(), CVLM_EUNSUPPORTED, "byte_fallback");
    expect_refused("model", "dropout", json_real(0.1), CVLM_EUNSUPPORTED, "dropout");
    expect_refused("normalizer", NULL, json_pack("{s:s}", "type", "NFC"), CVLM_EUNSUPPORTED,
                   "normalizer");
    expect_refused("decoder", NULL, json_pack("{s:s}", "type", "WordPiece"), CVLM_EUNSUPPORTED,
                   "decoder");
    expect_refused("pre_tokenizer", NULL, json_null(), CVLM_EUNSUPPORTED, "pre_tokenizer");
    expect_refused("pre_tokenizer", NULL,
                   json_pack("{s:s s:[{s:s s:{s:s} s:s}, {s:s s:b s:b}]}", "type", "Sequence",
                             "pretokenizers", "type", "Split", "pattern", "Regex", "(", "behavior",
                             "Isolated", "type", "ByteLevel", "add_prefix_space", 0, "use_regex",
                             0),
                   CVLM_EFORMAT, "pattern");
    expect_refused("added_tokens", NULL, json_pack("[{s:i}]", "id", 300), CVLM_EFORMAT, "content");
    expect_refused("added_tokens", NULL, json_pack("[{s:i s:s}]", "id", 256, "content", "zz"),
                   CVLM_EFORMAT, "ab");
    expect_refused(
        "added_tokens", NULL,
        json_pack("[{s:i s:s}, {s:i s:s}]", "id", 300, "content", "x", "id", 300, "content", "y"),
        CVLM_EFORMAT, "twice");
    expect_refused("added_tokens", NULL, json_object(), CVLM_EFORMAT, "added_tokens");
    expect_refused("added_tokens", NULL, json_pack("[{s:i s:s}]", "id", 1 << 20, "content", "x"),
                   CVLM_EFORMAT, "ids up to"); /* a tiny file cannot ask for huge tables */

    /* a vocabulary without the token of one byte */
    json_t *j = tiny_json(0);
    json_object_del(json_object_get(json_object_get(j, "model"), "vocab"), "Z");
    CHECK(load_json(j, NULL) == CVLM_EFORMAT && strstr(cvlm_last_error(), "0x5a"));
    json_decref(j);
}

/* Paths: a directory (tokenizer.json + tokenizer_config.json), the file itself, a bad
 * config beside it, a directory with neither kind of file. */
TEST(bpe_load_paths)
{
    struct cvlm_tokenizer *tok = NULL;
    char dir[600], path[700];
    snprintf(dir, sizeof(dir), "%s/bpe", cvlm_test_tmpdir());
    snprintf(path, sizeof(path), "mkdir -p '%s'", dir);
    REQUIRE(system(path) == 0);
    json_t *j = tiny_json(0);
    char *s = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
    REQUIRE(cvlm_test_write_file(path, s, strlen(s)) == 0);
    free(s);
    CHECK(cvlm_tokenizer_load(dir, &tok) == 0 && cvlm_tokenizer_bos_id(tok) == -1);
    cvlm_tokenizer_destroy(tok);

    const char *cfg = "{\"bos_token\": \"<|end|>\", \"eos_token\": {\"content\": \"ab\"}}";
    snprintf(path, sizeof(path), "%s/tokenizer_config.json", dir);
    REQUIRE(cvlm_test_write_file(path, cfg, strlen(cfg)) == 0);
    snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
    CHECK(cvlm_tokenizer_load(path, &tok) == 0);
    CHECK(tok && cvlm_tokenizer_bos_id(tok) == 261 && cvlm_tokenizer_eos_id(tok) == 256);
    cvlm_tokenizer_destroy(tok);

    cfg = "{\"bos_token\": \"<|nope|>\"}";
    snprintf(path, sizeof(path), "%s/tokenizer_config.json", dir);
    REQUIRE(cvlm_test_write_file(path, cfg, strlen(cfg)) == 0);
    CHECK(cvlm_tokenizer_load(dir, &tok) == CVLM_EFORMAT && tok == NULL);
    CHECKF(strstr(cvlm_last_error(), "<|nope|>"), "detail '%s'", cvlm_last_error());
    REQUIRE(cvlm_test_write_file(path, "[1", 2) == 0);
    CHECK(cvlm_tokenizer_load(dir, &tok) == CVLM_EFORMAT && tok == NULL);

    snprintf(path, sizeof(path), "mkdir -p '%s/empty'", cvlm_test_tmpdir());
    REQUIRE(system(path) == 0);
    snprintf(path, sizeof(path), "%s/empty", cvlm_test_tmpdir());
    CHECK(cvlm_tokenizer_load(path, &tok) == CVLM_ENOENT && tok == NULL);

    /* LLaMA-3 from memory: no tokenizer_config.json, so no BOS/EOS */
    size_t len;
    unsigned char *data = cvlm_test_read_file(cvlm_test_data(L3_JSON), &len);
    REQUIRE(data);
    CHECK(cvlm_tokenizer_load_mem(data, len, &tok) == 0);
    CHECK(tok && cvlm_tokenizer_bos_id(tok) == -1 && cvlm_tokenizer_vocab_size(tok) == 128256);
    cvlm_tokenizer_destroy(tok);
    free(data);
}

/* ---- throughput (on request) ------------------------------------------------------ */

static double now_s(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

TEST(bpe_bench)
{
    if (!getenv("COGVLM_BPE_BENCH"))
        return;
    const struct cvlm_tokenizer *tok = l3();
    REQUIRE(tok);
    const char *docs[] = {
        "README.md",           "docs/ARCHITECTURE.md", "docs/DEPLOY.md",       "docs/MODEL.md",
        "docs/PERFORMANCE.md", "docs/SECURITY.md",     "engine/text/README.md"};
    const char *file = getenv("COGVLM_BPE_BENCH");
    size_t n_docs = sizeof(docs) / sizeof(*docs), cap = 8u << 20, len = 0;
    if (strcmp(file, "1")) {
        docs[0] = file;
        n_docs = 1;
    }
    char *text = malloc(cap);
    while (len < cap / 2) {
        size_t before = len;
        for (size_t i = 0; i < n_docs; i++) {
            size_t n;
            unsigned char *d = cvlm_test_read_file(docs[i], &n);
            if (d && len + n <= cap) {
                memcpy(text + len, d, n);
                len += n;
            }
            free(d);
        }
        REQUIRE(len > before);
    }
    int32_t *ids = NULL;
    size_t n_ids = 0;
    /* wall time, and this thread's CPU time (what it costs where cores are shared) */
    double t0 = now_s(CLOCK_MONOTONIC), c0 = now_s(CLOCK_THREAD_CPUTIME_ID);
    REQUIRE(cvlm_tokenizer_encode(tok, text, len, &ids, &n_ids) == 0);
    double dt = now_s(CLOCK_MONOTONIC) - t0, ct = now_s(CLOCK_THREAD_CPUTIME_ID) - c0;
    printf("  bpe bench: %.1f MB, %.2f bytes per id: %.1f MB/s wall, %.1f MB/s of CPU time\n",
           len / 1e6, (double)len / (double)n_ids, len / 1e6 / dt, len / 1e6 / ct);
    free(ids);
    free(text);
}

/* `cogvlm bench-tokenizer` with both tokenizers on a small text (repeated to 0.2 MB), for
 * a moment: it runs, prints MB/s, and its JSON has both tokenizers' figures. */
TEST(bpe_bench_cli)
{
    const char *cli = getenv("COGVLM_BIN");
    char cmd[4096], line[1024], json[1024];
    REQUIRE(cli);
    snprintf(json, sizeof(json), "%s/bench-tokenizer.json", cvlm_test_tmpdir());
    int n = snprintf(cmd, sizeof(cmd), "%s bench-tokenizer --tokenizer %s", cli,
                     cvlm_test_data(L3_DIR));
    n += snprintf(cmd + n, sizeof(cmd) - (size_t)n, " --tokenizer %s",
                  cvlm_test_data("llama2-tokenizer.model"));
    snprintf(cmd + n, sizeof(cmd) - (size_t)n,
             " --text %s --size 0.2 --seconds 0.01 --chunk 512 --json %s 2>&1",
             cvlm_test_data(L3_GOLDEN), json);
    FILE *p = popen(cmd, "r");
    REQUIRE(p);
    int mbs = 0;
    while (fgets(line, sizeof(line), p))
        mbs += strstr(line, " MB/s ") != NULL;
    int st = pclose(p);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    CHECK(mbs == 4); /* two ways for each of two tokenizers */
    json_error_t err;
    json_t *r = json_load_file(json, 0, &err), *toks = json_object_get(r, "tokenizers");
    REQUIRE(r);
    CHECK(json_integer_value(json_object_get(r, "text_bytes")) >= 200000);
    CHECK(json_array_size(toks) == 2);
    for (size_t i = 0; i < json_array_size(toks); i++) {
        json_t *t = json_array_get(toks, i);
        CHECK(json_real_value(json_object_get(json_object_get(t, "whole"), "mb_s")) > 0);
        CHECK(json_real_value(json_object_get(json_object_get(t, "prompts"), "tok_s")) > 0);
        CHECK(json_integer_value(json_object_get(t, "vocab")) == (i ? 32000 : 128256));
    }
    json_decref(r);
    snprintf(cmd, sizeof(cmd), "%s bench-tokenizer --text /nonexistent 2>&1", cli);
    REQUIRE((p = popen(cmd, "r")));
    while (fgets(line, sizeof(line), p))
        ;
    st = pclose(p);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 2); /* no --tokenizer: usage */
}
