/* grammar_internal.h - the program of a compiled grammar, shared by the matcher
 * (grammar.c), the masks (grammar_mask.c) and the compilers (json_schema.c, json_regex.c).
 *
 * Instructions (Thompson NFA with calls; programs are generated back to front, each
 * generator taking the pc to continue at and returning its own entry):
 *   BYTES a b   consume one byte in set a, continue at b
 *   SPLIT a b   continue at both a and b
 *   JMP a       continue at a
 *   CALL a b    push return address b, continue at the entry of rule a
 *   RET         pop, continue at the popped address
 *   MATCH       the document is complete (consumes nothing; no byte may follow)
 */
#ifndef CVLM_GRAMMAR_INTERNAL_H
#define CVLM_GRAMMAR_INTERNAL_H

#include <stdatomic.h>
#include <stdint.h>

#include "engine/grammar/grammar.h"

enum { GOP_BYTES, GOP_SPLIT, GOP_JMP, GOP_CALL, GOP_RET, GOP_MATCH };

struct ginst {
    int32_t op, a, b;
};

struct gmask_cache;

struct cvlm_grammar {
    atomic_int refs;
    struct ginst *ins;
    int n_ins, cap_ins;
    uint64_t (*sets)[4]; /* 256-bit byte sets */
    int n_sets, cap_sets;
    int32_t *rules; /* rule id -> entry pc */
    int n_rules, cap_rules;
    int32_t start;
    int err;                   /* while compiling: the CVLM_E* code of the first failure */
    struct gmask_cache *cache; /* grammar_mask.c; engine thread only */
};

/* Upper bound on a program's instructions (a schema past it is CVLM_ETOOBIG). */
#define GRAMMAR_MAX_INS (1 << 20)

/* Builders; each returns the new pc / id, or -1 after recording the error (cvlm_errf and
 * g->err: CVLM_ENOMEM, CVLM_ETOOBIG or CVLM_EINVAL); callers propagate -1. */
int32_t gram_fail(struct cvlm_grammar *g, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int32_t gram_emit(struct cvlm_grammar *g, int op, int32_t a, int32_t b);
int32_t gram_set(struct cvlm_grammar *g, const uint64_t set[4]);
int32_t gram_rule_new(struct cvlm_grammar *g);
/* BYTES of the set [lo, hi] / of one byte / of a literal string, then next. */
int32_t gram_range(struct cvlm_grammar *g, int lo, int hi, int32_t next);
int32_t gram_lit(struct cvlm_grammar *g, const char *s, size_t n, int32_t next);
int32_t gram_split(struct cvlm_grammar *g, int32_t a, int32_t b);
/* Up to CVLM_GRAMMAR_MAX_WS whitespace bytes, then next. */
int32_t gram_ws(struct cvlm_grammar *g, int32_t next);

static inline void gset_add(uint64_t s[4], int c)
{
    s[c >> 6] |= 1ull << (c & 63);
}
static inline int gset_has(const uint64_t s[4], int c)
{
    return (int)(s[c >> 6] >> (c & 63)) & 1;
}

/* The characters a JSON string may hold, by their JSON text: `ascii` (bits of 0..127:
 * printable ones are written as themselves, '"' and '\\' escaped, '\n' '\r' '\t' as
 * escapes, other control characters never) and, if `non_ascii`, any UTF-8 sequence of a
 * character >= U+0080 (well-formed: no overlongs, no surrogates). Then next. */
int32_t gram_json_char(struct cvlm_grammar *g, const uint64_t ascii[2], int non_ascii,
                       int32_t next);

/* Any number of such characters, then next. */
int32_t gram_json_chars(struct cvlm_grammar *g, const uint64_t ascii[2], int non_ascii,
                        int32_t next);

/* Regular expressions (json_regex.c): the JSON text of a string's content that matches
 * `pattern` (ECMA-262 subset: see json_regex.c), then next. `where` names the place for
 * errors. */
int32_t gram_regex(struct cvlm_grammar *g, const char *pattern, const char *where, int32_t next);

#endif
