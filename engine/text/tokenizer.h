/* tokenizer.h - the text tokenizer, encode and decode, of two kinds:
 *
 * - SentencePiece BPE (LLaMA-2 / Vicuna): a `tokenizer.model` (a serialized ModelProto) of
 *   type BPE, with byte fallback; SentencePiece's own encoding and decoding, exactly.
 * - Byte-level BPE (LLaMA-3, CogVLM2): a HuggingFace `tokenizer.json` (with the
 *   `tokenizer_config.json` beside it for BOS/EOS); Meta's / HF's encoding exactly, and
 *   HF's decode(skip_special_tokens=True): special tokens decode to nothing. Text is
 *   encoded as text: special tokens such as <|eot_id|> come only from
 *   cvlm_tokenizer_token_id(), never from the characters of a prompt.
 * A loaded tokenizer is immutable and may be shared by any number of threads.
 * Streaming output uses struct cvlm_detok, one per sequence, which never emits a
 * partial UTF-8 sequence and whose pieces concatenate to the full decode.
 */
#ifndef CVLM_TOKENIZER_H
#define CVLM_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

struct cvlm_tokenizer;

/* Loads from a file / from memory (the buffer is not kept). 0 or CVLM_E*; the error
 * detail (cvlm_last_error) says what is wrong with a bad file. The kind follows the
 * content: a JSON object is a tokenizer.json. A directory path means its tokenizer.model,
 * or its tokenizer.json when it has no tokenizer.model. From memory, a tokenizer.json has
 * no BOS/EOS (no tokenizer_config.json to read them from). */
int cvlm_tokenizer_load(const char *path, struct cvlm_tokenizer **out);
int cvlm_tokenizer_load_mem(const void *data, size_t len, struct cvlm_tokenizer **out);
void cvlm_tokenizer_destroy(struct cvlm_tokenizer *tok);

int cvlm_tokenizer_vocab_size(const struct cvlm_tokenizer *tok);
int cvlm_tokenizer_bos_id(const struct cvlm_tokenizer *tok); /* -1 if the model has none */
int cvlm_tokenizer_eos_id(const struct cvlm_tokenizer *tok);
int cvlm_tokenizer_unk_id(const struct cvlm_tokenizer *tok); /* the UNKNOWN piece */
/* The piece string of an id (e.g. "\xe2\x96\x81Hello", "<0x0A>"; byte-level: the vocab key
 * "\xc4\xa0Hello" or an added token's content "<|eot_id|>"), NULL if out of range. */
const char *cvlm_tokenizer_piece(const struct cvlm_tokenizer *tok, int32_t id);
/* The id whose piece string is exactly `piece` (as cvlm_tokenizer_piece gives it), -1 if
 * none: how prompt templates insert control tokens such as "<|begin_of_text|>". */
int32_t cvlm_tokenizer_token_id(const struct cvlm_tokenizer *tok, const char *piece);

/* The text one id decodes to in the middle of a text: U+2581 as ' ', "" for a control
 * piece, the unknown surface (" \u2047 ") for <unk>, a byte piece's single raw byte;
 * byte-level: the token's bytes (possibly part of a UTF-8 sequence), "" for a special one.
 * Returns its length and points *s into the tokenizer ("" for an id out of range). */
size_t cvlm_tokenizer_piece_text(const struct cvlm_tokenizer *tok, int32_t id, const char **s);

/* Encodes `len` bytes of UTF-8 (may contain NUL; invalid bytes are handled as
 * SentencePiece does, or, byte-level, as U+FFFD per maximal invalid subpart) without
 * BOS/EOS. *ids is malloc'd (free() it); may be NULL when
 * *n_ids is 0. */
int cvlm_tokenizer_encode(const struct cvlm_tokenizer *tok, const char *text, size_t len,
                          int32_t **ids, size_t *n_ids);
/* A lower bound on the number of ids cvlm_tokenizer_encode() returns for text, from the
 * normalization pass alone (linear, no BPE): every piece covers at most as many bytes of
 * normalized text as the longest piece, a byte-fallback or unknown piece at most one
 * character (byte-level: ceil(len / bytes of the longest token), no pass at all). Lets a
 * caller refuse an over-long prompt without paying for its BPE. */
int cvlm_tokenizer_min_ids(const struct cvlm_tokenizer *t, const char *text, size_t len,
                           size_t *out);

/* Decodes ids into malloc'd, NUL-terminated UTF-8 (free() it). Ids out of range are an
 * error (CVLM_EINVAL). Control ids (BOS/EOS) decode to nothing. */
int cvlm_tokenizer_decode(const struct cvlm_tokenizer *tok, const int32_t *ids, size_t n,
                          char **text, size_t *len);

/* Incremental detokenizer for streaming. Push ids one at a time; each push appends the
 * newly complete text to a caller buffer. Text is emitted only in whole UTF-8 sequences;
 * concatenating every push and the final flush equals cvlm_tokenizer_decode() of all
 * pushed ids (byte pieces split across ids, invalid byte runs, BOS/EOS anywhere). */
struct cvlm_detok {
    const struct cvlm_tokenizer *tok;
    int started;           /* text was emitted (or a leading U+2581 dropped): the
                            * leading-space rule no longer applies */
    unsigned char pend[8]; /* bytes of an incomplete UTF-8 sequence held back (<= 3) */
    int n_pend;
    int last_strip; /* bytes of the last pushed id's piece text (as
                            * cvlm_tokenizer_piece_text gives it) left out of the output:
                            * 1 for the leading space dropped at the start, else 0 */
};

void cvlm_detok_init(struct cvlm_detok *d, const struct cvlm_tokenizer *tok);
/* Writes the new text to out (capacity cap, always NUL-terminated) and sets *n to its
 * length. An id needs at most 3 * 3 (held-back bytes) + its piece's length + 1 bytes, so
 * cap >= 64 is enough for LLaMA-2 (longest piece 48 bytes); byte-level, 3 * (3 + its
 * bytes) + 1, so cap >= 400 for LLaMA-3 (longest token 128 bytes). With less,
 * CVLM_ETOOBIG and the id is not consumed. An id out of range is CVLM_EINVAL (nothing
 * consumed). */
int cvlm_detok_push(struct cvlm_detok *d, int32_t id, char *out, size_t cap, size_t *n);
/* Emits whatever is held back (an incomplete sequence becomes U+FFFD as in decode: one per
 * byte for SentencePiece, one in all byte-level); cap >= 64 always suffices. */
int cvlm_detok_flush(struct cvlm_detok *d, char *out, size_t cap, size_t *n);

#endif
