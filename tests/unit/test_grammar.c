/* test_grammar.c - structured outputs: the JSON / JSON Schema grammars accept exactly the
 * documents they should, refuse what they do not support by name, and their token masks
 * agree with the matcher token by token on real vocabularies (SentencePiece and
 * byte-level BPE); random walks under the masks always end in documents jansson parses. */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "engine/error.h"
#include "engine/grammar/grammar.h"
#include "engine/sched/sampler.h"
#include "engine/text/tokenizer.h"
#include "tests/unit/harness.h"

static struct cvlm_grammar *compile(enum cvlm_rformat kind, const char *schema)
{
    struct cvlm_grammar *g = NULL;
    int rc = cvlm_grammar_compile(kind, schema, schema ? strlen(schema) : 0, &g);
    CHECKF(rc == 0, "compile %s: %s", schema ? schema : "json_object", cvlm_last_error());
    return rc ? NULL : g;
}

/* 1 if text is a whole document of g. */
static int accepts(const struct cvlm_grammar *g, const char *text)
{
    struct cvlm_gstate s;
    if (cvlm_gstate_init(g, &s))
        return -1;
    int alive = cvlm_gstate_advance(g, &s, (const unsigned char *)text, strlen(text));
    int ok = alive > 0 && cvlm_gstate_complete(g, &s);
    cvlm_gstate_free(&s);
    return ok;
}

static void expect(const struct cvlm_grammar *g, const char *const *good, const char *const *bad)
{
    for (; good && *good; good++)
        CHECKF(accepts(g, *good) == 1, "should accept: %s", *good);
    for (; bad && *bad; bad++)
        CHECKF(accepts(g, *bad) == 0, "should reject: %s", *bad);
}

TEST(grammar_json_object)
{
    struct cvlm_grammar *g = compile(CVLM_RFORMAT_JSON_OBJECT, NULL);
    REQUIRE(g);
    static const char *const good[] = {
        "{}", " {\"a\": 1}", "{\"a\":[1,2.5e3,-0.25E-2,\"x\\n\\\"\",true,false,null,{\"b\":{}}]}",
        "{\n  \"k\":\n\t\"caf\xc3\xa9 \xe4\xb8\xad \xf0\x9f\x98\x80\",\n  \"e\": []\n}", NULL};
    static const char *const bad[] = {"[]",
                                      "\"s\"",
                                      "{\"a\":}",
                                      "{\"a\" 1}",
                                      "{} x",
                                      "{'a':1}",
                                      "{\"a\":1,}",
                                      "{\"a\":01}",
                                      "{\"a\":1",
                                      "{\"a\":\"\x01\"}",
                                      "{\"a\":\"\xc0\xaf\"}",
                                      "{\"a\":\"\xed\xa0\x80\"}",
                                      "{\"a\":tru}",
                                      "{\"a\":-}",
                                      "{\"a\":1.}",
                                      "{\"a\":3e834}",
                                      "\n             {}",
                                      "  {}",
                                      "{\"a\":1 \n}",
                                      "\t{}",
                                      NULL};
    expect(g, good, bad);
    cvlm_grammar_unref(g);
}

static const char PERSON[] =
    "{\"type\":\"object\",\"title\":\"P\",\"properties\":{"
    "\"name\":{\"type\":\"string\",\"maxLength\":5},"
    "\"age\":{\"type\":\"integer\"},"
    "\"tags\":{\"type\":\"array\",\"items\":{\"enum\":[\"a\",\"b\"]},\"minItems\":1,"
    "\"maxItems\":2},"
    "\"opt\":{\"anyOf\":[{\"type\":\"null\"},{\"type\":\"boolean\"}],\"default\":null}},"
    "\"required\":[\"name\",\"age\",\"tags\"],\"additionalProperties\":false}";

TEST(grammar_schema_objects)
{
    struct cvlm_grammar *g = compile(CVLM_RFORMAT_JSON_SCHEMA, PERSON);
    REQUIRE(g);
    static const char *const good[] = {
        "{\"name\":\"bob\",\"age\":42,\"tags\":[\"a\"]}",
        "{ \"name\" : \"\" , \"age\" : -7 , \"tags\" : [ \"a\" , \"b\" ] , \"opt\" : null }",
        "{\n  \"name\": \"x\",\n  \"age\": 1,\n  \"tags\": [\n    \"a\"\n  ]\n}",
        "{\"name\":\"\\\"\\\\\\n\xc3\xa9x\",\"age\":0,\"tags\":[\"b\"],\"opt\":true}", NULL};
    static const char *const bad[] = {
        "{\"name\":\"abcdef\",\"age\":1,\"tags\":[\"a\"]}", /* maxLength */
        "{\"name\":\"a\",\"age\":1,\"tags\":[]}",           /* minItems */
        "{\"name\":\"a\",\"age\":1,\"tags\":[\"a\",\"a\",\"b\"]}",
        "{\"name\":\"a\",\"age\":1,\"tags\":[\"c\"]}", /* enum */
        "{\"name\":\"a\",\"tags\":[\"a\"]}",           /* required */
        "{\"name\":\"a\",\"age\":1.5,\"tags\":[\"a\"]}",
        "{\"name\":\"a\",\"age\":1,\"tags\":[\"a\"],\"x\":1}", /* additional */
        "{\"name\":\"a\",\"age\":1,\"tags\":[\"a\"],\"opt\":0}",
        NULL};
    expect(g, good, bad);
    cvlm_grammar_unref(g);

    /* recursion through $defs, prefixItems, type lists, const */
    g = compile(CVLM_RFORMAT_JSON_SCHEMA,
                "{\"$defs\":{\"node\":{\"type\":\"object\",\"properties\":{"
                "\"v\":{\"type\":[\"integer\",\"null\"]},\"kids\":{\"type\":\"array\","
                "\"items\":{\"$ref\":\"#/$defs/node\"}}},\"required\":[\"v\",\"kids\"]}},"
                "\"type\":\"object\",\"properties\":{\"root\":{\"$ref\":\"#/$defs/node\"},"
                "\"pair\":{\"type\":\"array\",\"prefixItems\":[{\"type\":\"string\"},"
                "{\"const\":{\"k\":[1,true]}}],\"items\":false}},"
                "\"required\":[\"root\",\"pair\"]}");
    REQUIRE(g);
    static const char *const good2[] = {
        "{\"root\":{\"v\":1,\"kids\":[{\"v\":null,\"kids\":[{\"v\":3,\"kids\":[]}]}]},"
        "\"pair\":[\"x\",{\"k\":[1,true]}]}",
        NULL};
    static const char *const bad2[] = {
        "{\"root\":{\"v\":1,\"kids\":[{\"v\":\"s\",\"kids\":[]}]},\"pair\":[\"x\",{\"k\":[1,true]}]"
        "}",
        "{\"root\":{\"v\":1,\"kids\":[]},\"pair\":[\"x\",2]}",
        "{\"root\":{\"v\":1,\"kids\":[]},\"pair\":[\"x\",{\"k\":[1,true]},1]}", NULL};
    expect(g, good2, bad2);
    cvlm_grammar_unref(g);
}

TEST(grammar_schema_strings)
{
    struct cvlm_grammar *g = compile(
        CVLM_RFORMAT_JSON_SCHEMA, "{\"type\":\"string\",\"pattern\":\"^[A-Z][a-z]+-\\\\d{2,3}$\"}");
    REQUIRE(g);
    static const char *const good[] = {"\"Abc-12\"", "\"Xy-123\"", NULL};
    static const char *const bad[] = {"\"abc-12\"", "\"Abc-1\"", "\"Abc-1234\"", "\"A-12\"", NULL};
    expect(g, good, bad);
    cvlm_grammar_unref(g);

    g = compile(CVLM_RFORMAT_JSON_SCHEMA, "{\"pattern\":\"a(b|cd)*e?\"}"); /* unanchored */
    REQUIRE(g);
    static const char *const good2[] = {"\"xxabcdyy\"", "\"a\"", "\"\\\"a\\n\"", NULL};
    static const char *const bad2[] = {"\"xxyy\"", "\"\"", NULL};
    expect(g, good2, bad2);
    cvlm_grammar_unref(g);

    g = compile(CVLM_RFORMAT_JSON_SCHEMA,
                "{\"type\":\"object\",\"properties\":{\"d\":{\"type\":\"string\",\"format\":"
                "\"date\"},\"u\":{\"type\":\"string\",\"format\":\"uuid\"},\"s\":{\"type\":"
                "\"string\",\"minLength\":2,\"maxLength\":3}},\"required\":[\"d\",\"u\",\"s\"]}");
    REQUIRE(g);
    static const char *const good3[] = {"{\"d\":\"2024-02-29\",\"u\":\"123e4567-e89b-12d3-a456-"
                                        "426614174000\",\"s\":\"\xc3\xa9\xc3\xa9\"}",
                                        NULL};
    static const char *const bad3[] = {
        "{\"d\":\"2024-13-01\",\"u\":\"123e4567-e89b-12d3-a456-426614174000\",\"s\":\"ab\"}",
        "{\"d\":\"2024-01-01\",\"u\":\"123e4567-e89b-12d3-a456-42661417400\",\"s\":\"ab\"}",
        "{\"d\":\"2024-01-01\",\"u\":\"123e4567-e89b-12d3-a456-426614174000\",\"s\":\"a\"}",
        "{\"d\":\"2024-01-01\",\"u\":\"123e4567-e89b-12d3-a456-426614174000\",\"s\":\"abcd\"}",
        NULL};
    expect(g, good3, bad3);
    cvlm_grammar_unref(g);
}

TEST(grammar_refuses_unsupported_by_name)
{
    static const struct {
        const char *schema, *needle1, *needle2;
    } cases[] = {
        {"{\"type\":\"integer\",\"minimum\":0}", "minimum", "/"},
        {"{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"string\",\"format\":"
         "\"hostname\"}}}",
         "hostname", "/properties/a"},
        {"{\"type\":\"string\",\"pattern\":\"(?=a)b\"}", "lookaround", "pattern"},
        {"{\"type\":\"string\",\"pattern\":\"(a)\\\\1\"}", "backreference", "pattern"},
        {"{\"$ref\":\"http://example.com/s.json\"}", "$ref", "example.com"},
        {"{\"type\":\"foo\"}", "foo", "type"},
        {"{\"not\":{\"type\":\"string\"}}", "'not'", "/"},
        {"{\"type\":\"array\",\"items\":{\"type\":\"string\"},\"uniqueItems\":true}", "uniqueItems",
         "/"},
        {"{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"string\"}},\"required\":"
         "[\"b\"]}",
         "'b'", "required"},
        {"{\"type\":\"string\",\"maxLength\":100000}", "maxLength", "4096"},
        {"[1,2", "not JSON", ""},
        {"false", "accepts nothing", ""},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct cvlm_grammar *g = NULL;
        int rc = cvlm_grammar_compile(CVLM_RFORMAT_JSON_SCHEMA, cases[i].schema,
                                      strlen(cases[i].schema), &g);
        const char *msg = cvlm_last_error();
        CHECKF(rc == CVLM_EINVAL && !g && strstr(msg, cases[i].needle1) &&
                   strstr(msg, cases[i].needle2),
               "%s: rc %d, message '%s'", cases[i].schema, rc, msg);
        cvlm_grammar_unref(g);
    }
    /* a program too large for the bound */
    char big[400];
    snprintf(big, sizeof(big),
             "{\"type\":\"string\",\"pattern\":\"^((((a{1000}){1000}){1000}){1000})$\"}");
    struct cvlm_grammar *g = NULL;
    CHECK(cvlm_grammar_compile(CVLM_RFORMAT_JSON_SCHEMA, big, strlen(big), &g) == CVLM_ETOOBIG);
    CHECK(!g);
}

/* The mask of a state equals, token by token, what the matcher says of the token's text;
 * random walks under the masks end in documents that parse. */
static void walk_vocab(const char *tok_path, const char *schema, int walks, int check_every)
{
    struct cvlm_tokenizer *tok;
    REQUIRE(cvlm_tokenizer_load(tok_path, &tok) == 0);
    int V = cvlm_tokenizer_vocab_size(tok);
    struct cvlm_vocab *voc;
    REQUIRE(cvlm_vocab_create(tok, V, &voc) == 0);
    struct cvlm_grammar *g =
        compile(schema ? CVLM_RFORMAT_JSON_SCHEMA : CVLM_RFORMAT_JSON_OBJECT, schema);
    REQUIRE(g);
    struct cvlm_rng rng;
    cvlm_rng_seed(&rng, 42);
    int complete_docs = 0, disagreements = 0;
    for (int w = 0; w < walks; w++) {
        struct cvlm_gstate s, t = {0};
        REQUIRE(cvlm_gstate_init(g, &s) == 0);
        char text[4096];
        size_t n = 0;
        for (int step = 0; step < 300; step++) {
            const uint64_t *m = cvlm_grammar_mask(g, voc, &s);
            REQUIRE(m);
            if (step % check_every == 0) /* every token against the matcher */
                for (int id = 0; id < V; id++) {
                    const char *p;
                    size_t k = cvlm_tokenizer_piece_text(tok, id, &p);
                    int want = 0;
                    if (k && id != cvlm_tokenizer_unk_id(tok)) {
                        cvlm_gstate_copy(&t, &s);
                        want = cvlm_gstate_advance(g, &t, (const unsigned char *)p, k) > 0;
                    }
                    if ((int)((m[id >> 6] >> (id & 63)) & 1) != want && disagreements++ < 5)
                        cvlm_test_fail(__FILE__, __LINE__, "token %d '%.*s': mask %d matcher %d",
                                       id, (int)k, p, !want, want);
                }
            int allowed[4096], na = 0;
            for (int id = 0; id < V && na < 4096; id++)
                if ((m[id >> 6] >> (id & 63)) & 1)
                    allowed[na++] = id;
            int done = cvlm_gstate_complete(g, &s);
            /* prefer closing tokens later in a walk so that documents finish */
            if (done && (na == 0 || cvlm_rng_uniform(&rng) < 0.5 + step / 100.0))
                break;
            REQUIRE(na > 0);
            int id = allowed[cvlm_rng_next(&rng) % (uint64_t)na];
            if (step > 40) { /* steer to an end: prefer tokens with '"' ']' '}' or digits */
                for (int tries = 0; tries < 64; tries++) {
                    const char *p;
                    int c = allowed[cvlm_rng_next(&rng) % (uint64_t)na];
                    size_t k = cvlm_tokenizer_piece_text(tok, c, &p);
                    if (k && (memchr(p, '"', k) || memchr(p, ']', k) || memchr(p, '}', k))) {
                        id = c;
                        break;
                    }
                }
            }
            const char *p;
            size_t k = cvlm_tokenizer_piece_text(tok, id, &p);
            REQUIRE(cvlm_gstate_advance(g, &s, (const unsigned char *)p, k) == 1);
            if (n + k < sizeof(text)) {
                memcpy(text + n, p, k);
                n += k;
            }
        }
        if (cvlm_gstate_complete(g, &s)) {
            json_error_t err;
            json_t *doc = json_loadb(text, n, 0, &err);
            CHECKF(doc && (schema || json_is_object(doc)), "walk %d: '%.*s' does not parse: %s", w,
                   (int)n, text, err.text);
            json_decref(doc);
            complete_docs++;
        }
        cvlm_gstate_free(&s);
        cvlm_gstate_free(&t);
    }
    CHECKF(complete_docs * 2 >= walks, "only %d of %d walks finished a document", complete_docs,
           walks);
    long hits, misses;
    cvlm_grammar_cache_stats(g, &hits, &misses);
    CHECKF(hits > 0 && misses > 0, "mask cache: %ld hits, %ld misses", hits, misses);
    cvlm_grammar_unref(g);
    cvlm_vocab_destroy(voc);
    cvlm_tokenizer_destroy(tok);
}

TEST(grammar_masks_sentencepiece)
{
    walk_vocab("models/cogvlm-tiny-shapes/tokenizer.model", NULL, 40, 1);
    walk_vocab("models/cogvlm-tiny-shapes/tokenizer.model", PERSON, 40, 1);
    walk_vocab(cvlm_test_data("llama2-tokenizer.model"), PERSON, 6, 7);
}

TEST(grammar_masks_byte_level_bpe)
{
    walk_vocab(cvlm_test_data("llama3-tokenizer/tokenizer.json"), PERSON, 4, 9);
}

TEST(grammar_table_shares_and_evicts)
{
    struct cvlm_grammar_table *t;
    REQUIRE(cvlm_grammar_table_create(&t) == 0);
    struct cvlm_grammar *a, *b, *c;
    REQUIRE(cvlm_grammar_table_get(t, CVLM_RFORMAT_JSON_SCHEMA, PERSON, strlen(PERSON), &a) == 0);
    REQUIRE(cvlm_grammar_table_get(t, CVLM_RFORMAT_JSON_SCHEMA, PERSON, strlen(PERSON), &b) == 0);
    CHECK(a == b);
    REQUIRE(cvlm_grammar_table_get(t, CVLM_RFORMAT_JSON_OBJECT, NULL, 0, &c) == 0);
    CHECK(c != a);
    for (int i = 0; i < CVLM_GRAMMAR_TABLE + 3; i++) { /* evicts PERSON while a holds it */
        char s[64], num[16];
        struct cvlm_grammar *x;
        snprintf(s, sizeof(s), "{\"const\":%d}", i);
        snprintf(num, sizeof(num), "%d", i);
        REQUIRE(cvlm_grammar_table_get(t, CVLM_RFORMAT_JSON_SCHEMA, s, strlen(s), &x) == 0);
        CHECK(accepts(x, num) == 1);
        cvlm_grammar_unref(x);
    }
    CHECK(accepts(a, "{\"name\":\"x\",\"age\":1,\"tags\":[\"a\"]}") == 1);
    int bad = cvlm_grammar_table_get(t, CVLM_RFORMAT_JSON_SCHEMA, "{\"minimum\":1}", 13, &b);
    CHECK(bad == CVLM_EINVAL);
    cvlm_grammar_unref(a);
    cvlm_grammar_unref(a);
    cvlm_grammar_unref(c);
    cvlm_grammar_table_destroy(t);
}

/* A schema made to be ambiguous (40 string alternatives, every position a new state) must
 * not hold the engine thread: past the work bound the mask fails (that request fails);
 * an ordinary schema's walk stays far below the bound (the tests above). */
TEST(grammar_ambiguity_bound)
{
    struct cvlm_tokenizer *tok;
    REQUIRE(cvlm_tokenizer_load(cvlm_test_data("llama2-tokenizer.model"), &tok) == 0);
    struct cvlm_vocab *voc;
    REQUIRE(cvlm_vocab_create(tok, cvlm_tokenizer_vocab_size(tok), &voc) == 0);
    char schema[8192] = "{\"anyOf\":[";
    for (int i = 0; i < 40; i++)
        snprintf(schema + strlen(schema), sizeof(schema) - strlen(schema),
                 "%s{\"type\":\"string\",\"maxLength\":%d}", i ? "," : "", 300 + i);
    strcat(schema, "]}");
    struct cvlm_grammar *g = compile(CVLM_RFORMAT_JSON_SCHEMA, schema);
    REQUIRE(g);
    struct cvlm_gstate s;
    REQUIRE(cvlm_gstate_init(g, &s) == 0);
    REQUIRE(cvlm_gstate_advance(g, &s, (const unsigned char *)"\"ab", 3) == 1);
    CHECK(s.n_threads >= 40);
    const uint64_t *m = cvlm_grammar_mask(g, voc, &s);
    CHECKF(!m && strstr(cvlm_last_error(), "too ambiguous"), "mask %p: %s", (const void *)m,
           cvlm_last_error());
    cvlm_gstate_free(&s);
    cvlm_grammar_unref(g);
    cvlm_vocab_destroy(voc);
    cvlm_tokenizer_destroy(tok);
}
