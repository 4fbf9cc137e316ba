/* bpe.h - internal: the byte-level BPE tokenizer (LLaMA-3 / GPT-2 kind) of a HF tokenizer.json.
 *
 * engine/text/bpe_load.c turns a HuggingFace `tokenizer.json` (and, optionally, the
 * `tokenizer_config.json` beside it) into struct cvlm_bpe: the tokens, hash tables from
 * byte string / piece string to id, the merge ranks and the compiled pre-tokenizer
 * regex. engine/text/bpe.c encodes and decodes on those tables. engine/text/tokenizer.c
 * wraps a struct cvlm_bpe in struct cvlm_tokenizer and dispatches every public function
 * to it; only these three files include this header. The struct is immutable after
 * cvlm_bpe_build() returns (threads share it) and owns every buffer it points to.
 *
 * Two spellings of a token. Its *piece* is the string of the file: a vocab key in the
 * GPT-2 byte-to-unicode alphabet ("\xc4\xa0the" for " the") or an added token's content.
 * Its *bytes* are what it stands for in text: the piece mapped back through the inverse
 * byte table (a piece with a character outside that table stands for its own UTF-8, as
 * HF's ByteLevel decoder does it), an added token's content as it is.
 *
 * Decoding follows HF `decode(ids, skip_special_tokens=True)` without
 * clean_up_tokenization_spaces: special tokens produce nothing, every other id its bytes,
 * and the concatenated bytes become UTF-8 with one U+FFFD per maximal invalid subpart
 * (Rust's String::from_utf8_lossy, Python's errors="replace").
 */
#ifndef CVLM_BPE_H
#define CVLM_BPE_H

#ifndef PCRE2_CODE_UNIT_WIDTH
#define PCRE2_CODE_UNIT_WIDTH 8
#endif
#include <pcre2.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/text/tokenizer.h"

enum { BPE_PIECE = 0, BPE_BYTES = 1 }; /* index of a token's two spellings */

struct cvlm_bpe_token {
    uint32_t off[2], len[2]; /* piece / bytes in bpe->strs (each NUL-terminated there) */
    uint8_t present;         /* some token has this id (ids may have holes) */
    uint8_t added;           /* from added_tokens */
    uint8_t special;         /* an added token marked special: decodes to nothing */
    uint8_t mergeable;       /* a vocab token whose piece is all byte-alphabet characters:
                              * the only kind encoding can produce */
};

/* A slot of a string -> id table. The hash and the string's place are kept in the slot, so
 * that a probe touches the token strings only on a probable hit (the tables are far
 * larger than the caches; each miss avoided is one cache miss less per chunk). */
struct cvlm_bpe_slot {
    uint32_t hash; /* cvlm_bpe_hash of the string */
    int32_t id;    /* -1: empty */
    uint32_t off, len;
};

/* (left id, right id) -> rank (index in model.merges) and the merged token's id. */
struct cvlm_bpe_merge {
    int32_t left, right; /* left == -1: empty slot */
    int32_t rank, id;
};

struct cvlm_bpe {
    int32_t n; /* max id + 1 over vocab and added tokens */
    struct cvlm_bpe_token *toks;
    char *strs;
    /* open addressing, load <= 1/2: [BPE_BYTES] the bytes of mergeable tokens -> id;
     * [BPE_PIECE] piece -> id of every token (an added token wins) */
    struct cvlm_bpe_slot *table[2];
    uint32_t mask[2];
    struct cvlm_bpe_merge *merges; /* open addressing, load <= 2/3 */
    uint32_t merge_mask;
    int32_t byte_id[256];           /* the single-byte tokens (all 256 are required) */
    uint32_t max_bytes;             /* bytes of the longest mergeable token */
    int ignore_merges;              /* a chunk that is a token whole is that token */
    int add_prefix_space;           /* ByteLevel: prepend ' ' to a text that lacks it */
    pcre2_code *re;                 /* the pre-tokenizer's split pattern; NULL: no split */
    int32_t bos_id, eos_id, unk_id; /* -1 when absent */
};

/* Builds the tokenizer from the bytes of tokenizer.json and, when config is not NULL,
 * of tokenizer_config.json (bos_token / eos_token). 0, or CVLM_EFORMAT (malformed: the
 * detail says where), CVLM_EUNSUPPORTED (a well-formed file of a kind not handled:
 * another model type, a normalizer, ...), CVLM_ENOMEM. */
int cvlm_bpe_build(const void *json, size_t len, const void *config, size_t config_len,
                   struct cvlm_bpe **out);
void cvlm_bpe_free(struct cvlm_bpe *b);

/* Id of the token whose piece is s[0..n) exactly (an added token's content, a vocab key
 * such as "\xc4\xa0the"), or -1. */
int32_t cvlm_bpe_lookup(const struct cvlm_bpe *b, int which, const char *s, size_t n);

/* The cvlm_tokenizer_* operations (tokenizer.h documents them). */
int cvlm_bpe_encode(const struct cvlm_bpe *b, const char *text, size_t len, int32_t **ids,
                    size_t *n_ids);
int cvlm_bpe_decode(const struct cvlm_bpe *b, const int32_t *ids, size_t n, char **text,
                    size_t *len);
size_t cvlm_bpe_piece_text(const struct cvlm_bpe *b, int32_t id, const char **s);
int cvlm_bpe_detok_push(struct cvlm_detok *d, const struct cvlm_bpe *b, int32_t id, char *out,
                        size_t cap, size_t *n);
int cvlm_bpe_detok_flush(struct cvlm_detok *d, char *out, size_t cap, size_t *n);

static inline uint32_t cvlm_bpe_hash(const char *s, size_t n)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)s[i]) * 16777619u;
    return h;
}

static inline uint32_t cvlm_bpe_pair_hash(int32_t l, int32_t r)
{
    uint64_t k = ((uint64_t)(uint32_t)l << 32 | (uint32_t)r) * 0x9e3779b97f4a7c15ull;
    return (uint32_t)(k >> 32);
}

/* The merge of the adjacent tokens (l, r), NULL if there is none. */
static inline const struct cvlm_bpe_merge *cvlm_bpe_find_merge(const struct cvlm_bpe *b, int32_t l,
                                                               int32_t r)
{
    for (uint32_t i = cvlm_bpe_pair_hash(l, r) & b->merge_mask;; i = (i + 1) & b->merge_mask) {
        const struct cvlm_bpe_merge *m = &b->merges[i];
        if (m->left < 0)
            return NULL;
        if (m->left == l && m->right == r)
            return m;
    }
}

#endif
