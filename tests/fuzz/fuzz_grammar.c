/* fuzz_grammar.c - libFuzzer target: response_format grammars (engine/grammar/).
 * Input: a JSON Schema text, a NUL byte, then document bytes (no NUL: the text is the
 * schema alone; an empty schema means json_object). The schema is compiled (any refusal
 * is fine); the document is fed byte by byte. Oracles: a document the matcher calls
 * complete is JSON that jansson parses (an object for json_object), and the mask of the
 * start state and of the state after the document agrees with the matcher token by token
 * on the embedded model's 512-token vocabulary. */
#include "engine/grammar/grammar.h"
#include "engine/text/tokenizer.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static struct cvlm_tokenizer *tok;
static struct cvlm_vocab *voc;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    if (cvlm_tokenizer_load("models/cogvlm-tiny-shapes/tokenizer.model", &tok) ||
        cvlm_vocab_create(tok, cvlm_tokenizer_vocab_size(tok), &voc)) {
        fprintf(stderr, "fuzz_grammar: cannot load models/cogvlm-tiny-shapes/tokenizer.model\n");
        abort();
    }
    return 0;
}

static void check_mask(struct cvlm_grammar *g, const struct cvlm_gstate *s)
{
    const uint64_t *m = cvlm_grammar_mask(g, voc, s);
    struct cvlm_gstate t = {0};
    if (!m)
        return; /* out of memory: allowed */
    for (int id = 0; id < cvlm_vocab_size(voc); id++) {
        const char *p;
        size_t n = cvlm_tokenizer_piece_text(tok, id, &p);
        int want = 0;
        if (n && id != cvlm_tokenizer_unk_id(tok) && !cvlm_gstate_copy(&t, s))
            want = cvlm_gstate_advance(g, &t, (const unsigned char *)p, n) > 0;
        if ((int)((m[id >> 6] >> (id & 63)) & 1) != want) {
            fprintf(stderr, "fuzz_grammar: token %d: mask %d, matcher %d\n", id, !want, want);
            abort();
        }
    }
    cvlm_gstate_free(&t);
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size)
{
    const unsigned char *nul = memchr(data, 0, size);
    size_t slen = nul ? (size_t)(nul - data) : size;
    const unsigned char *doc = nul ? nul + 1 : data + size;
    size_t dlen = nul ? size - slen - 1 : 0;
    enum cvlm_rformat kind = slen ? CVLM_RFORMAT_JSON_SCHEMA : CVLM_RFORMAT_JSON_OBJECT;
    struct cvlm_grammar *g;
    if (cvlm_grammar_compile(kind, (const char *)data, slen, &g))
        return 0;
    struct cvlm_gstate s;
    if (cvlm_gstate_init(g, &s)) {
        cvlm_grammar_unref(g);
        return 0;
    }
    check_mask(g, &s);
    int alive = 1;
    for (size_t i = 0; i < dlen && alive > 0; i++)
        alive = cvlm_gstate_advance(g, &s, doc + i, 1);
    if (alive > 0) {
        check_mask(g, &s);
        if (cvlm_gstate_complete(g, &s)) {
            json_error_t err;
            json_t *v = json_loadb((const char *)doc, dlen, JSON_DECODE_ANY, &err);
            if (!v || (kind == CVLM_RFORMAT_JSON_OBJECT && !json_is_object(v))) {
                fprintf(stderr, "fuzz_grammar: accepted but not JSON: %.*s (%s)\n", (int)dlen,
                        (const char *)doc, err.text);
                abort();
            }
            json_decref(v);
        }
    }
    cvlm_gstate_free(&s);
    cvlm_grammar_unref(g);
    return 0;
}
