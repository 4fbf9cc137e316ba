/* grammar.h - structured outputs: grammars over the bytes of the output text, and the
 * token masks that keep a generated sequence inside them.
 *
 * A grammar is a compiled byte-level pushdown automaton (a program of BYTES / SPLIT / JMP /
 * CALL / RET / MATCH instructions, Thompson-style: a set of threads runs it, each thread a
 * program counter and a stack of return addresses). json_schema.c compiles OpenAI's
 * `response_format` into one: `json_object` (any JSON object) or `json_schema` (a
 * JSON Schema subset, see docs/API.md). The whole document is the output: leading
 * whitespace, then the value, then nothing but EOS.
 *
 * A matcher state (struct cvlm_gstate) is the set of live threads after the bytes so far,
 * in a canonical order, so that equal states have equal encodings: the per-grammar mask
 * cache is keyed by it. A token may come next iff its whole text (as the detokenizer
 * writes it mid-text) leaves at least one thread alive; an EOS token iff a thread has
 * reached MATCH (cvlm_gstate_complete).
 *
 * Threads: compile and the grammar cache are thread-safe; a compiled grammar is immutable
 * except for its mask cache, which only the engine thread touches (cvlm_grammar_mask).
 */
#ifndef CVLM_GRAMMAR_H
#define CVLM_GRAMMAR_H

#include <stddef.h>
#include <stdint.h>

struct cvlm_tokenizer;

enum cvlm_rformat {
    CVLM_RFORMAT_TEXT = 0,        /* no constraint */
    CVLM_RFORMAT_JSON_OBJECT = 1, /* any JSON object */
    CVLM_RFORMAT_JSON_SCHEMA = 2, /* a JSON value valid under the schema */
};

/* Bounds of a matcher: return-address stack depth (nesting of CALLs: JSON nesting is
 * bounded by it) and live threads (the ambiguity of anyOf / enum prefixes). */
#define CVLM_GRAMMAR_MAX_DEPTH 48
#define CVLM_GRAMMAR_MAX_THREADS 64
/* Whitespace the grammar allows between JSON tokens (and before the value): nothing, one
 * space, or a newline and at most this many spaces / tabs of indentation (bounded, so a
 * model cannot loop on blanks; compact and pretty-printed JSON both fit). */
#define CVLM_GRAMMAR_MAX_WS 12

struct cvlm_grammar;

/* Compiles `schema` (JSON text, len bytes; JSON_SCHEMA only, NULL for JSON_OBJECT).
 * CVLM_EINVAL with a message naming the keyword and where it is (a JSON pointer) for
 * anything outside the supported subset; CVLM_ETOOBIG for a schema whose program would
 * be too large; CVLM_ENOMEM. The grammar starts with one reference. */
int cvlm_grammar_compile(enum cvlm_rformat kind, const char *schema, size_t len,
                         struct cvlm_grammar **out);
void cvlm_grammar_ref(struct cvlm_grammar *g);
void cvlm_grammar_unref(struct cvlm_grammar *g);
/* Instructions in the program (for tests and the size bound). */
int cvlm_grammar_size(const struct cvlm_grammar *g);

/* A matcher state: threads encoded as int32 runs [pc, depth, stack[0..depth)], sorted. */
struct cvlm_gstate {
    int32_t *v;
    int n, cap; /* int32s used / allocated */
    int n_threads;
};

/* The state before any byte. 0 or CVLM_ENOMEM. */
int cvlm_gstate_init(const struct cvlm_grammar *g, struct cvlm_gstate *s);
/* s after `n` more bytes, in place. 1 if threads remain, 0 if none (s is then empty), or
 * CVLM_ENOMEM. */
int cvlm_gstate_advance(const struct cvlm_grammar *g, struct cvlm_gstate *s,
                        const unsigned char *bytes, size_t n);
/* 1 if the bytes so far are a whole document (EOS may come next). */
int cvlm_gstate_complete(const struct cvlm_grammar *g, const struct cvlm_gstate *s);
int cvlm_gstate_copy(struct cvlm_gstate *dst, const struct cvlm_gstate *src);
void cvlm_gstate_free(struct cvlm_gstate *s);

/* The vocabulary as a trie of token texts (cvlm_tokenizer_piece_text of every id below V
 * with a non-empty text, the unknown piece left out): built once per engine. */
struct cvlm_vocab;
int cvlm_vocab_create(const struct cvlm_tokenizer *tok, int V, struct cvlm_vocab **out);
void cvlm_vocab_destroy(struct cvlm_vocab *v);
int cvlm_vocab_size(const struct cvlm_vocab *v);

/* The tokens that may come next in state s: bit i of the returned words set = token i
 * keeps the text inside the grammar (EOS and other empty-text tokens are never set: the
 * caller allows EOS when cvlm_gstate_complete). Served from the grammar's cache of
 * masks by state when it can (bounded: CVLM_GRAMMAR_CACHE_BYTES), else computed by one
 * walk of the vocabulary trie. Valid until the next call on g. NULL: CVLM_ENOMEM.
 * Engine thread only (the cache is not locked). */
#define CVLM_GRAMMAR_CACHE_BYTES (16u << 20)
const uint64_t *cvlm_grammar_mask(struct cvlm_grammar *g, const struct cvlm_vocab *v,
                                  const struct cvlm_gstate *s);
/* Cache statistics of g (tests, benchmarks). */
void cvlm_grammar_cache_stats(const struct cvlm_grammar *g, long *hits, long *misses);

/* A process-wide table of compiled grammars by (kind, schema text), so that the n choices
 * of a request and every request with the same schema share one program and one mask
 * cache. Returns a new reference; compiles on a miss (errors as cvlm_grammar_compile).
 * Keeps up to CVLM_GRAMMAR_TABLE entries, least recently used out. Thread-safe. */
#define CVLM_GRAMMAR_TABLE 16
struct cvlm_grammar_table;
int cvlm_grammar_table_create(struct cvlm_grammar_table **out);
void cvlm_grammar_table_destroy(struct cvlm_grammar_table *t);
int cvlm_grammar_table_get(struct cvlm_grammar_table *t, enum cvlm_rformat kind, const char *schema,
                           size_t len, struct cvlm_grammar **out);

#endif
