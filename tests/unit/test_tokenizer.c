/* test_tokenizer.c - SentencePiece BPE tokenizer: encode/decode against reference data,
 * the incremental detokenizer, the `cogvlm tokenize` CLI, and hostile model files.
 *
 * Expected ids and texts come from SentencePiece itself: the shared golden file, and the
 * files under tests/unit/data/ that tools/tokenizer/make_test_data.py writes with the
 * python sentencepiece package (a tiny model with a precompiled charsmap, and extra
 * LLaMA-2 cases with invalid UTF-8 and byte-piece runs).
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
#include <unistd.h>

#define LLAMA "llama2-tokenizer.model"
#define GOLDEN "tokenizer-golden.jsonl"
#define LOCAL_DATA "tests/unit/data/"
#define CHARSMAP_MODEL LOCAL_DATA "tok-charsmap.model"
#define CHARSMAP_CASES LOCAL_DATA "tok-charsmap.jsonl"
#define LLAMA_EXTRA LOCAL_DATA "llama2-extra.jsonl"

/* ---- helpers ------------------------------------------------------------------------ */

static struct cvlm_tokenizer *load_or_null(const char *path)
{
    struct cvlm_tokenizer *tok = NULL;
    int rc = cvlm_tokenizer_load(path, &tok);
    if (rc)
        cvlm_test_fail(__FILE__, __LINE__, "load %s: %s", path, cvlm_last_error());
    return tok;
}

/* Every line of a JSONL file, parsed; NULL entries never (a bad line fails the test). */
struct jsonl {
    json_t **v;
    size_t n;
};

static struct jsonl read_jsonl(const char *path)
{
    struct jsonl j = {0};
    size_t len;
    char *data = (char *)cvlm_test_read_file(path, &len);
    if (!data) {
        cvlm_test_fail(__FILE__, __LINE__, "cannot read %s", path);
        return j;
    }
    for (char *p = data, *nl; p < data + len; p = nl + 1) {
        nl = memchr(p, '\n', (size_t)(data + len - p));
        if (!nl)
            nl = data + len;
        json_error_t err;
        json_t *v = json_loadb(p, (size_t)(nl - p), JSON_ALLOW_NUL, &err);
        if (!v) {
            cvlm_test_fail(__FILE__, __LINE__, "%s line %zu: %s", path, j.n + 1, err.text);
            continue;
        }
        j.v = realloc(j.v, (j.n + 1) * sizeof(*j.v));
        j.v[j.n++] = v;
    }
    free(data);
    return j;
}

static void free_jsonl(struct jsonl *j)
{
    for (size_t i = 0; i < j->n; i++)
        json_decref(j->v[i]);
    free(j->v);
}

/* The "ids" array of a case as int32s (malloc'd, never NULL). */
static int32_t *case_ids(json_t *c, size_t *n)
{
    json_t *a = json_object_get(c, "ids");
    *n = json_array_size(a);
    int32_t *ids = malloc((*n + 1) * sizeof(*ids));
    for (size_t i = 0; i < *n; i++)
        ids[i] = (int32_t)json_integer_value(json_array_get(a, i));
    return ids;
}

/* The input bytes of an encode case ("text" or "text_hex"); 0 if it is decode-only. */
static int case_text(json_t *c, char **text, size_t *len)
{
    json_t *t = json_object_get(c, "text"), *h = json_object_get(c, "text_hex");
    if (json_is_string(t)) {
        *len = json_string_length(t);
        *text = malloc(*len + 1);
        memcpy(*text, json_string_value(t), *len);
        return 1;
    }
    if (!json_is_string(h))
        return 0;
    const char *x = json_string_value(h);
    *len = strlen(x) / 2;
    *text = malloc(*len + 1);
    for (size_t i = 0; i < *len; i++) {
        unsigned v = 0;
        sscanf(x + 2 * i, "%2x", &v);
        (*text)[i] = (char)v;
    }
    return 1;
}

static int same_ids(const int32_t *a, size_t na, const int32_t *b, size_t nb)
{
    return na == nb && (na == 0 || !memcmp(a, b, na * sizeof(*a)));
}

/* Strict UTF-8 validity (independent of the tokenizer's own checker). */
static int valid_utf8(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
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

/* Checks encode and decode of every case of `cases` with `tok`; returns cases checked. */
static size_t check_cases(const struct cvlm_tokenizer *tok, const struct jsonl *cases,
                          const char *what)
{
    size_t checked = 0;
    for (size_t i = 0; i < cases->n; i++) {
        json_t *c = cases->v[i], *dec = json_object_get(c, "decoded");
        size_t n_exp, n_got, len, tlen;
        int32_t *exp = case_ids(c, &n_exp), *got = NULL;
        char *text = NULL, *out = NULL;
        if (case_text(c, &text, &len)) {
            int rc = cvlm_tokenizer_encode(tok, text, len, &got, &n_got);
            CHECKF(rc == 0 && same_ids(got, n_got, exp, n_exp),
                   "%s line %zu: encode gives %zu ids (rc %d), expected %zu", what, i + 1, n_got,
                   rc, n_exp);
            free(got);
            /* the cheap bound the engine refuses over-long prompts with never overshoots */
            size_t lo = 0;
            rc = cvlm_tokenizer_min_ids(tok, text, len, &lo);
            CHECKF(rc == 0 && lo <= n_exp, "%s line %zu: min_ids %zu > %zu ids", what, i + 1, lo,
                   n_exp);
        }
        int rc = cvlm_tokenizer_decode(tok, exp, n_exp, &out, &tlen);
        CHECKF(rc == 0 && json_is_string(dec) && tlen == json_string_length(dec) &&
                   !memcmp(out, json_string_value(dec), tlen) && out[tlen] == '\0',
               "%s line %zu: decode gives '%s', expected '%s'", what, i + 1, out ? out : "",
               json_string_value(dec));
        free(out);
        free(text);
        free(exp);
        checked++;
    }
    return checked;
}

/* Streams `ids` through a detok; checks chunk validity and equality with decode(). */
static void check_detok(const struct cvlm_tokenizer *tok, const int32_t *ids, size_t n,
                        const char *what, size_t idx)
{
    struct cvlm_detok d;
    char chunk[256], *full = NULL;
    size_t cn, flen, at = 0;
    REQUIRE(cvlm_tokenizer_decode(tok, ids, n, &full, &flen) == 0);
    char *cat = malloc(flen + 1);
    int ok = 1;
    cvlm_detok_init(&d, tok);
    for (size_t i = 0; ok && i <= n; i++) {
        int rc = i < n ? cvlm_detok_push(&d, ids[i], chunk, sizeof(chunk), &cn)
                       : cvlm_detok_flush(&d, chunk, sizeof(chunk), &cn);
        ok = rc == 0 && at + cn <= flen && chunk[cn] == '\0';
        CHECKF(ok, "%s %zu: push %zu failed or overran (rc %d)", what, idx, i, rc);
        CHECKF(!ok || valid_utf8((unsigned char *)chunk, cn), "%s %zu: chunk %zu not UTF-8", what,
               idx, i);
        if (ok)
            memcpy(cat + at, chunk, cn);
        at += ok ? cn : 0;
    }
    CHECKF(!ok || (at == flen && !memcmp(cat, full, flen)),
           "%s %zu: detok text differs from decode", what, idx);
    free(cat);
    free(full);
}

/* xorshift64*: a fixed-seed generator so failures reproduce. */
static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}

/* ---- reference data ----------------------------------------------------------------- */

TEST(tokenizer_llama_golden)
{
    struct cvlm_tokenizer *tok = load_or_null(cvlm_test_data(LLAMA));
    REQUIRE(tok);
    CHECK(cvlm_tokenizer_vocab_size(tok) == 32000);
    CHECK(cvlm_tokenizer_unk_id(tok) == 0);
    CHECK(cvlm_tokenizer_bos_id(tok) == 1);
    CHECK(cvlm_tokenizer_eos_id(tok) == 2);
    CHECK(!strcmp(cvlm_tokenizer_piece(tok, 1), "<s>"));
    CHECK(!strcmp(cvlm_tokenizer_piece(tok, 3), "<0x00>"));
    CHECK(cvlm_tokenizer_piece(tok, 32000) == NULL && cvlm_tokenizer_piece(tok, -1) == NULL);
    struct jsonl g = read_jsonl(cvlm_test_data(GOLDEN));
    CHECK(g.n >= 200);
    CHECK(check_cases(tok, &g, "golden") == g.n);
    free_jsonl(&g);
    cvlm_tokenizer_destroy(tok);
}

TEST(tokenizer_llama_extra)
{
    struct cvlm_tokenizer *tok = load_or_null(cvlm_test_data(LLAMA));
    REQUIRE(tok);
    struct jsonl g = read_jsonl(LLAMA_EXTRA);
    CHECK(g.n >= 300);
    CHECK(check_cases(tok, &g, "llama2-extra") == g.n);
    free_jsonl(&g);
    cvlm_tokenizer_destroy(tok);
}

TEST(tokenizer_charsmap_model)
{
    struct cvlm_tokenizer *tok = load_or_null(CHARSMAP_MODEL);
    REQUIRE(tok);
    struct jsonl g = read_jsonl(CHARSMAP_CASES);
    CHECK(g.n >= 300);
    CHECK(check_cases(tok, &g, "tok-charsmap") == g.n);
    free_jsonl(&g);
    cvlm_tokenizer_destroy(tok);
}

/* The bound is useful: megabytes of text are known to be too long without BPE. */
TEST(tokenizer_min_ids_bound)
{
    struct cvlm_tokenizer *tok = load_or_null(cvlm_test_data(LLAMA));
    REQUIRE(tok);
    size_t len = 3u << 20, lo = 0, n = 0;
    char *big = malloc(len + 1);
    int32_t *ids = NULL;
    REQUIRE(big);
    for (size_t i = 0; i < len; i++)
        big[i] = "hello "[i % 6];
    big[len] = 0;
    CHECK(cvlm_tokenizer_min_ids(tok, big, len, &lo) == 0 && lo > 4096);
    /* and on a text short enough to encode: bound <= actual */
    CHECK(cvlm_tokenizer_min_ids(tok, big, 6000, &lo) == 0);
    CHECK(cvlm_tokenizer_encode(tok, big, 6000, &ids, &n) == 0 && lo > 0 && lo <= n);
    free(ids);
    free(big);
    cvlm_tokenizer_destroy(tok);
}

TEST(tokenizer_api_errors)
{
    struct cvlm_tokenizer *tok = load_or_null(cvlm_test_data(LLAMA));
    REQUIRE(tok);
    int32_t bad[] = {15043, 32000};
    char *text = NULL, buf[64];
    size_t len, n;
    int32_t *ids = (int32_t *)1;
    CHECK(cvlm_tokenizer_decode(tok, bad, 2, &text, &len) == CVLM_EINVAL && text == NULL);
    CHECK(cvlm_tokenizer_encode(tok, "", 0, &ids, &n) == 0 && n == 0);
    free(ids);
    struct cvlm_detok d;
    cvlm_detok_init(&d, tok);
    CHECK(cvlm_detok_push(&d, -1, buf, sizeof(buf), &n) == CVLM_EINVAL);
    /* Too small a buffer: CVLM_ETOOBIG, and the id is not consumed. 15043 = "▁Hello". */
    CHECK(cvlm_detok_push(&d, 15043, buf, 3, &n) == CVLM_ETOOBIG);
    CHECK(cvlm_detok_push(&d, 15043, buf, sizeof(buf), &n) == 0 && n == 5 &&
          !memcmp(buf, "Hello", 6));
    CHECK(cvlm_detok_push(&d, 243, buf, 0, &n) == CVLM_ETOOBIG); /* <0xF0> */
    cvlm_tokenizer_destroy(tok);
}

/* ---- incremental detokenizer --------------------------------------------------------- */

TEST(tokenizer_detok_reference_ids)
{
    struct cvlm_tokenizer *tok = load_or_null(cvlm_test_data(LLAMA));
    REQUIRE(tok);
    const char *files[] = {cvlm_test_data(GOLDEN), LLAMA_EXTRA};
    for (size_t f = 0; f < 2; f++) {
        struct jsonl g = read_jsonl(files[f]);
        for (size_t i = 0; i < g.n; i++) {
            size_t n;
            int32_t *ids = case_ids(g.v[i], &n);
            check_detok(tok, ids, n, files[f], i + 1);
            free(ids);
        }
        free_jsonl(&g);
    }
    cvlm_tokenizer_destroy(tok);
}

/* Random sequences weighted towards byte pieces (to split UTF-8 sequences across ids and
 * make invalid ones) and control/unknown ids, for both models. */
TEST(tokenizer_detok_random)
{
    const char *paths[] = {cvlm_test_data(LLAMA), CHARSMAP_MODEL};
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    for (size_t m = 0; m < 2; m++) {
        struct cvlm_tokenizer *tok = load_or_null(paths[m]);
        REQUIRE(tok);
        int32_t v = cvlm_tokenizer_vocab_size(tok), ids[48];
        for (size_t iter = 0; iter < 3000; iter++) {
            size_t n = rng_next(&seed) % 48;
            for (size_t i = 0; i < n; i++) {
                uint64_t r = rng_next(&seed);
                if (r % 10 < 5 && v == 32000)
                    ids[i] = 3 + (int32_t)((r >> 8) % 256); /* <0x00>..<0xFF> */
                else if (r % 10 < 7)
                    ids[i] = (int32_t)((r >> 8) % 4); /* unk, bos, eos, ... */
                else
                    ids[i] = (int32_t)((r >> 8) % (uint64_t)v);
            }
            check_detok(tok, ids, n, paths[m], iter);
        }
        cvlm_tokenizer_destroy(tok);
    }
}

/* ---- CLI ---------------------------------------------------------------------------- */

static const char *cli_bin(void)
{
    const char *b = getenv("COGVLM_BIN");
    return b && *b ? b : "build/cogvlm";
}

/* Runs `cogvlm tokenize ARGS < in > out 2> err`; returns the exit status (-1: no exit). */
static int run_cli(const char *args, const char *in, const char *out, const char *err)
{
    char cmd[4096];
    snprintf(cmd, sizeof(cmd), "'%s' tokenize %s < '%s' > '%s' 2> '%s'", cli_bin(), args, in, out,
             err);
    int st = system(cmd);
    return st != -1 && WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* Compares output line i with the "ids" (encode) or "decoded" (decode) of golden line i. */
static void check_cli_output(const struct jsonl *g, const char *out_path, int decode)
{
    struct jsonl out = read_jsonl(out_path);
    CHECKF(out.n == g->n, "cli: %zu output lines for %zu input lines", out.n, g->n);
    for (size_t i = 0; i < out.n && i < g->n; i++) {
        if (decode) {
            json_t *t = json_object_get(out.v[i], "text");
            CHECKF(json_equal(t, json_object_get(g->v[i], "decoded")),
                   "cli --decode line %zu differs", i + 1);
        } else {
            CHECKF(json_equal(json_object_get(out.v[i], "ids"), json_object_get(g->v[i], "ids")),
                   "cli line %zu: ids differ", i + 1);
        }
        CHECKF(json_object_size(out.v[i]) == 1, "cli line %zu: extra keys", i + 1);
    }
    free_jsonl(&out);
}

TEST(tokenizer_cli)
{
    char in[600], out[600], err[600], args[1200];
    const char *tmp = cvlm_test_tmpdir();
    if (access(cli_bin(), X_OK) != 0) {
        cvlm_test_fail(__FILE__, __LINE__, "%s is not executable (set COGVLM_BIN)", cli_bin());
        return;
    }
    snprintf(out, sizeof(out), "%s/tok-cli.out", tmp);
    snprintf(err, sizeof(err), "%s/tok-cli.err", tmp);
    snprintf(args, sizeof(args), "--tokenizer '%s'", cvlm_test_data(LLAMA));
    struct jsonl g = read_jsonl(cvlm_test_data(GOLDEN));

    /* The golden lines carry "text" (and other keys, which are ignored). */
    CHECK(run_cli(args, cvlm_test_data(GOLDEN), out, err) == 0);
    check_cli_output(&g, out, 0);

    /* --decode: the same lines read as {"ids": [...]}. */
    snprintf(args, sizeof(args), "--tokenizer '%s' --decode", cvlm_test_data(LLAMA));
    CHECK(run_cli(args, cvlm_test_data(GOLDEN), out, err) == 0);
    check_cli_output(&g, out, 1);
    free_jsonl(&g);

    /* A bad third line: exit status 1, two good output lines ("a" -> 263, "b" -> 289 per
     * SentencePiece), the line number on stderr. */
    snprintf(in, sizeof(in), "%s/tok-cli-bad.in", tmp);
    const char *bad = "{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"text\": 5}\n{\"text\": \"c\"}\n";
    REQUIRE(cvlm_test_write_file(in, bad, strlen(bad)) == 0);
    snprintf(args, sizeof(args), "--tokenizer '%s'", cvlm_test_data(LLAMA));
    CHECK(run_cli(args, in, out, err) == 1);
    size_t n;
    char *e = (char *)cvlm_test_read_file(err, &n);
    CHECKF(e && strstr(e, "line 3"), "stderr lacks the line number: %s", e ? e : "");
    free(e);
    e = (char *)cvlm_test_read_file(out, &n);
    CHECK(e && !strcmp(e, "{\"ids\":[263]}\n{\"ids\":[289]}\n"));
    free(e);

    /* Usage errors and a missing model. */
    CHECK(run_cli("", in, out, err) == 2);
    CHECK(run_cli("--tokenizer /nonexistent/tokenizer.model", in, out, err) == 1);
    CHECK(run_cli("--help", in, out, err) == 0);
}

/* ---- hostile model files ------------------------------------------------------------ */

/* A minimal protobuf writer for hand-made models. */
struct pbw {
    unsigned char b[4096];
    size_t n;
};

static void pb_varint(struct pbw *w, uint64_t v)
{
    do {
        w->b[w->n++] = (unsigned char)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
        v >>= 7;
    } while (v);
}

static void pb_bytes(struct pbw *w, unsigned field, const void *p, size_t n)
{
    pb_varint(w, (uint64_t)field << 3 | 2);
    pb_varint(w, n);
    memcpy(w->b + w->n, p, n);
    w->n += n;
}

static void pb_uint(struct pbw *w, unsigned field, uint64_t v)
{
    pb_varint(w, (uint64_t)field << 3);
    pb_varint(w, v);
}

/* Appends ModelProto.pieces { piece: s, score: 0, type: type }. */
static void pb_piece(struct pbw *w, const char *s, int type)
{
    struct pbw p = {.n = 0};
    pb_bytes(&p, 1, s, strlen(s));
    p.b[p.n++] = 2 << 3 | 5; /* score, fixed32 0.0f */
    memset(p.b + p.n, 0, 4);
    p.n += 4;
    pb_uint(&p, 3, (uint64_t)type);
    pb_bytes(w, 1, p.b, p.n);
}

/* trainer_spec { model_type: type; byte_fallback: bf } */
static void pb_trainer(struct pbw *w, int type, int bf)
{
    struct pbw t = {.n = 0};
    pb_uint(&t, 3, (uint64_t)type);
    if (bf)
        pb_uint(&t, 35, 1);
    pb_bytes(w, 2, t.b, t.n);
}

static void base_model(struct pbw *w)
{
    w->n = 0;
    pb_piece(w, "<unk>", 2);
    pb_piece(w, "<s>", 3);
    pb_piece(w, "</s>", 3);
    pb_piece(w, "a", 1);
    pb_piece(w, "b", 1);
    pb_piece(w, "ab", 1);
}

static int load_buf(const void *p, size_t n)
{
    struct cvlm_tokenizer *tok = (struct cvlm_tokenizer *)1;
    cvlm_clear_error();
    int rc = cvlm_tokenizer_load_mem(p, n, &tok);
    CHECKF(rc != 0 || tok != NULL, "success without a tokenizer");
    CHECKF(rc == 0 || tok == NULL, "failure (%d) but a tokenizer was returned", rc);
    CHECKF(rc == 0 || strlen(cvlm_last_error()) > 10, "rc %d with a vague detail '%s'", rc,
           cvlm_last_error());
    cvlm_tokenizer_destroy(rc == 0 ? tok : NULL);
    return rc;
}

static void expect_load(const struct pbw *w, int code, const char *needle)
{
    int rc = load_buf(w->b, w->n);
    CHECKF(rc == code, "%s: rc %d (%s), expected %d", needle ? needle : "valid", rc,
           cvlm_last_error(), code);
    CHECKF(!needle || strstr(cvlm_last_error(), needle), "detail '%s' lacks '%s'",
           cvlm_last_error(), needle);
}

TEST(tokenizer_hostile_handmade)
{
    struct pbw w;
    base_model(&w);
    pb_trainer(&w, 2, 0);
    expect_load(&w, 0, NULL); /* the control: this one is valid */

    base_model(&w); /* no trainer_spec: UNIGRAM by default */
    expect_load(&w, CVLM_EUNSUPPORTED, "UNIGRAM");
    base_model(&w);
    pb_trainer(&w, 2, 0);
    pb_trainer(&w, 4, 0); /* a second trainer_spec merges: CHAR */
    expect_load(&w, CVLM_EUNSUPPORTED, "CHAR");

    base_model(&w);
    pb_piece(&w, "ab", 1);
    pb_trainer(&w, 2, 0);
    expect_load(&w, CVLM_EFORMAT, "duplicates");
    base_model(&w);
    pb_piece(&w, "", 1);
    pb_trainer(&w, 2, 0);
    expect_load(&w, CVLM_EFORMAT, "empty");
    base_model(&w);
    pb_piece(&w, "<unk2>", 2);
    pb_trainer(&w, 2, 0);
    expect_load(&w, CVLM_EFORMAT, "unknown");
    w.n = 0;
    pb_piece(&w, "a", 1);
    pb_trainer(&w, 2, 0);
    expect_load(&w, CVLM_EFORMAT, "unknown");
    base_model(&w);
    pb_piece(&w, "<0x41>", 6);
    pb_trainer(&w, 2, 0);
    expect_load(&w, CVLM_EFORMAT, "byte_fallback");
    base_model(&w);
    pb_piece(&w, "<0x41>", 6);
    pb_trainer(&w, 2, 1); /* byte fallback with 1 of the 256 byte pieces */
    expect_load(&w, CVLM_EFORMAT, "missing");
    base_model(&w);
    pb_piece(&w, "<0xZZ>", 6);
    pb_trainer(&w, 2, 1);
    expect_load(&w, CVLM_EFORMAT, "invalid");
    base_model(&w);
    pb_piece(&w, "c", 9);
    pb_trainer(&w, 2, 0);
    expect_load(&w, CVLM_EFORMAT, "type");
    base_model(&w);
    pb_piece(&w, "\xff\xfe", 1);
    pb_trainer(&w, 2, 0);
    expect_load(&w, CVLM_EFORMAT, "UTF-8");
}

TEST(tokenizer_hostile_wire)
{
    struct pbw w;
    static const unsigned char trunc_varint[] = {0x0a, 0x80};
    static const unsigned char long_len[] = {0x0a, 0x05, 'a'};
    static const unsigned char group[] = {0x23, 0x24}; /* field 4 as a (deprecated) group */
    static const unsigned char long_varint[] = {0x20, 0xff, 0xff, 0xff, 0xff, 0xff,
                                                0xff, 0xff, 0xff, 0xff, 0xff, 0x01};
    static const unsigned char field0[] = {0x02, 0x00};
    CHECK(load_buf(trunc_varint, sizeof(trunc_varint)) == CVLM_EFORMAT);
    CHECK(load_buf(long_len, sizeof(long_len)) == CVLM_EFORMAT);
    CHECK(load_buf(group, sizeof(group)) == CVLM_EFORMAT);
    CHECK(load_buf(long_varint, sizeof(long_varint)) == CVLM_EFORMAT);
    CHECK(load_buf(field0, sizeof(field0)) == CVLM_EFORMAT);
    CHECK(load_buf("", 0) == CVLM_EFORMAT);

    /* score with the wrong wire type (varint instead of fixed32) */
    struct pbw p = {.n = 0};
    base_model(&w);
    pb_bytes(&p, 1, "c", 1);
    pb_uint(&p, 2, 7);
    pb_bytes(&w, 1, p.b, p.n);
    pb_trainer(&w, 2, 0);
    expect_load(&w, CVLM_EFORMAT, "wire type");

    /* normalizer_spec.precompiled_charsmap: too short, then a trie larger than the blob */
    static const unsigned char short_map[] = {1, 0, 0};
    static const unsigned char big_trie[] = {0xff, 0, 0, 0, 1, 2, 3, 4};
    const unsigned char *maps[] = {short_map, big_trie};
    size_t map_len[] = {sizeof(short_map), sizeof(big_trie)};
    for (int k = 0; k < 2; k++) {
        struct pbw ns = {.n = 0};
        pb_bytes(&ns, 2, maps[k], map_len[k]);
        base_model(&w);
        pb_trainer(&w, 2, 0);
        pb_bytes(&w, 3, ns.b, ns.n);
        expect_load(&w, CVLM_EFORMAT, "charsmap");
        base_model(&w);
        pb_trainer(&w, 2, 0);
        pb_bytes(&w, 5, ns.b, ns.n); /* any denormalizer_spec charsmap */
        expect_load(&w, CVLM_EUNSUPPORTED, "denormalizer");
    }

    struct cvlm_tokenizer *tok = (struct cvlm_tokenizer *)1;
    CHECK(cvlm_tokenizer_load("/nonexistent/tokenizer.model", &tok) == CVLM_ENOENT);
    CHECK(tok == NULL);
    char path[600];
    snprintf(path, sizeof(path), "%s/empty.model", cvlm_test_tmpdir());
    REQUIRE(cvlm_test_write_file(path, "", 0) == 0);
    CHECK(cvlm_tokenizer_load(path, &tok) == CVLM_EFORMAT && tok == NULL);
}

/* Whether a file cut to `cut` bytes is still a valid model: the cut falls just before a
 * top-level field numbered 3 or more (normalizer_spec, ...), which may all be absent. */
static int valid_cut(const unsigned char *b, size_t len, size_t cut)
{
    size_t at = 0;
    while (at < len && at <= cut) {
        size_t start = at;
        uint64_t key = 0, n = 0;
        for (int s = 0; at < len; s += 7) {
            key |= (uint64_t)(b[at] & 0x7f) << s;
            if (!(b[at++] & 0x80))
                break;
        }
        if ((key >> 3) >= 3 && start == cut)
            return 1;
        for (int s = 0; at < len; s += 7) {
            n |= (uint64_t)(b[at] & 0x7f) << s;
            if (!(b[at++] & 0x80))
                break;
        }
        at += n;
    }
    return 0;
}

/* Truncations: every offset of the tiny model, a spread of offsets of the LLaMA one. */
TEST(tokenizer_hostile_truncated)
{
    const char *paths[] = {CHARSMAP_MODEL, cvlm_test_data(LLAMA)};
    for (int m = 0; m < 2; m++) {
        size_t len;
        unsigned char *b = cvlm_test_read_file(paths[m], &len);
        REQUIRE(b);
        size_t step = m == 0 ? 1 : len / 397;
        CHECK(load_buf(b, len) == 0);
        for (size_t l = 0; l < len; l += (l < 300 ? 1 : step)) {
            int rc = load_buf(b, l);
            CHECKF(rc == CVLM_EFORMAT || rc == CVLM_EUNSUPPORTED ||
                       (rc == 0 && valid_cut(b, len, l)),
                   "%s cut at %zu: rc %d", paths[m], l, rc);
        }
        free(b);
    }
}

/* Loads `b` and, if that works, runs encode/decode on it (must not crash either). */
static void load_and_use(const unsigned char *b, size_t len, uint64_t *seed)
{
    static const char *texts[] = {"hello world", "  ｆｕｌｌ ﬁ ① ABCD\t<img>[[x", "\xff\xc3 é 中"};
    struct cvlm_tokenizer *tok = NULL;
    if (cvlm_tokenizer_load_mem(b, len, &tok) != 0) {
        CHECK(tok == NULL);
        return;
    }
    for (size_t i = 0; i < 3; i++) {
        int32_t *ids = NULL, rnd[16];
        char *out = NULL;
        size_t n, tl;
        CHECK(cvlm_tokenizer_encode(tok, texts[i], strlen(texts[i]), &ids, &n) == 0);
        for (size_t k = 0; k < n; k++)
            CHECK(ids[k] >= 0 && ids[k] < cvlm_tokenizer_vocab_size(tok));
        CHECK(cvlm_tokenizer_decode(tok, ids, n, &out, &tl) == 0);
        free(out);
        free(ids);
        for (size_t k = 0; k < 16; k++)
            rnd[k] = (int32_t)(rng_next(seed) % (uint64_t)cvlm_tokenizer_vocab_size(tok));
        check_detok(tok, rnd, 16, "flipped model", i);
    }
    cvlm_tokenizer_destroy(tok);
}

/* Random byte flips with a fixed seed: 2000 variants of the tiny model, 100 of LLaMA's. */
TEST(tokenizer_hostile_flips)
{
    const char *paths[] = {CHARSMAP_MODEL, cvlm_test_data(LLAMA)};
    uint64_t seed = 12345;
    for (int m = 0; m < 2; m++) {
        size_t len;
        unsigned char *orig = cvlm_test_read_file(paths[m], &len);
        REQUIRE(orig);
        unsigned char *b = malloc(len);
        for (int iter = 0; iter < (m == 0 ? 2000 : 100); iter++) {
            memcpy(b, orig, len);
            int flips = 1 + (int)(rng_next(&seed) % 4);
            for (int f = 0; f < flips; f++) {
                uint64_t r = rng_next(&seed);
                b[(r >> 8) % len] ^= (unsigned char)(1u << (r % 8));
            }
            load_and_use(b, len, &seed);
        }
        free(b);
        free(orig);
    }
}
