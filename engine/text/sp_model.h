/* sp_model.h - internal: a SentencePiece model file turned into the tokenizer's tables.
 *
 * engine/text/sp_model.c reads a `tokenizer.model` (a serialized ModelProto, protobuf wire
 * format, parsed without a protobuf library), validates it, and builds struct
 * cvlm_tokenizer: the pieces, a hash table from piece string to id, a trie of the
 * user-defined symbols and the normalizer's charsmap. engine/text/tokenizer.c does the
 * encoding and decoding on those tables. Only these two files include this header.
 * The struct is immutable after cvlm_sp_build() returns; it owns every buffer it points to.
 */
#ifndef CVLM_SP_MODEL_H
#define CVLM_SP_MODEL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* ModelProto.SentencePiece.Type */
enum {
    CVLM_SP_NORMAL = 1,
    CVLM_SP_UNKNOWN = 2,
    CVLM_SP_CONTROL = 3,
    CVLM_SP_USER_DEFINED = 4,
    CVLM_SP_UNUSED = 5,
    CVLM_SP_BYTE = 6,
};

struct cvlm_sp_piece {
    uint32_t off, len;         /* piece string in tok->strs (NUL-terminated there) */
    uint32_t dec_off, dec_len; /* decoded text (U+2581 -> ' ') in tok->dec */
    float score;
    uint8_t type;    /* CVLM_SP_* */
    uint8_t lead_ws; /* the piece starts with U+2581 */
    uint8_t byte;    /* the byte value of a CVLM_SP_BYTE piece "<0xXX>" */
};

/* Trie node of the user-defined symbols (first-child / next-sibling lists; node 0 is the
 * root). */
struct cvlm_sp_unode {
    int32_t child, sibling;
    uint8_t byte, term;
};

/* Which implementation serves a struct cvlm_tokenizer (zero, calloc's, is SentencePiece). */
enum { CVLM_TOK_SENTENCEPIECE = 0, CVLM_TOK_BYTE_BPE = 1 };

struct cvlm_bpe;

struct cvlm_tokenizer {
    /* CVLM_TOK_BYTE_BPE: `bpe` (engine/text/bpe.h) is the tokenizer and none of the fields
     * after it is used; tokenizer.c dispatches every public function on `kind`. */
    int kind;
    struct cvlm_bpe *bpe;
    int32_t n;              /* vocabulary size; ids are 0..n-1 */
    uint32_t max_piece_len; /* bytes of the longest piece string (normalized text) */
    struct cvlm_sp_piece *pieces;
    char *strs, *dec;
    int32_t *table; /* open addressing, piece string -> id, -1 = empty; load <= 1/2 */
    uint32_t mask;
    struct cvlm_sp_unode *unodes; /* NULL when the model has no user-defined symbols */
    int32_t n_unodes;
    int32_t byte_id[256]; /* id of <0xXX>, -1 without byte fallback */
    int32_t unk_id, bos_id, eos_id, pad_id;
    int byte_fallback, has_unused;
    /* NormalizerSpec (+ TrainerSpec.treat_whitespace_as_suffix) */
    int add_dummy_prefix, remove_extra_ws, escape_ws, ws_suffix;
    uint32_t *units; /* Darts-clone double array of precompiled_charsmap; NULL: identity */
    size_t n_units;
    char *norm; /* NUL-separated replacement strings, plus one NUL at the end */
    size_t norm_len;
    char *unk_surface; /* what decode writes for <unk> (default " \u2047 ") */
    size_t unk_surface_len;
};

/* Parses and validates a model file image (not kept) into *out. 0, or CVLM_EFORMAT (a
 * malformed or inconsistent file; the detail says what and where), CVLM_EUNSUPPORTED (a
 * well-formed model that is not BPE, ...), CVLM_ENOMEM, CVLM_ETOOBIG. */
int cvlm_sp_build(const void *data, size_t len, struct cvlm_tokenizer **out);
void cvlm_sp_free(struct cvlm_tokenizer *tok);

static inline uint32_t cvlm_sp_hash(const char *s, size_t n)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)s[i]) * 16777619u;
    return h;
}

/* Id of the piece whose string is s[0..n), of any type, or -1. */
static inline int32_t cvlm_sp_lookup(const struct cvlm_tokenizer *t, const char *s, size_t n)
{
    for (uint32_t i = cvlm_sp_hash(s, n) & t->mask;; i = (i + 1) & t->mask) {
        int32_t id = t->table[i];
        if (id < 0)
            return -1;
        const struct cvlm_sp_piece *p = &t->pieces[id];
        if (p->len == n && !memcmp(t->strs + p->off, s, n))
            return id;
    }
}

#endif
