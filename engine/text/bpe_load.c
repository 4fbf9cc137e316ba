/* bpe_load.c - reads a HF tokenizer.json (+ tokenizer_config.json) into struct cvlm_bpe.
 *
 * What is read (bpe.h says how it is used):
 *   model             type "BPE"; vocab {piece: id}; merges ["a b", ...] or [["a","b"], ...]
 *                     (rank = index; a pair listed twice keeps its later rank, as HF's
 *                     map does); ignore_merges; unk_token. dropout, byte_fallback,
 *                     continuing_subword_prefix and end_of_word_suffix are refused.
 *   added_tokens      [{id, content, special}]: ids beyond the vocab, or a vocab id
 *                     whose key is the same string. Encoding never produces them.
 *   pre_tokenizer     ByteLevel alone (use_regex: GPT-2's pattern), or a Sequence of
 *                     Split (Regex or String pattern, Isolated, not inverted) then
 *                     ByteLevel without regex: LLaMA-3's form. The pattern is compiled
 *                     with PCRE2 (UTF + UCP; JIT when the platform allows it).
 *   normalizer        must be absent; decoder absent or ByteLevel.
 *   tokenizer_config  bos_token / eos_token (a string or {"content": ...}) -> ids.
 * Every token must be a valid id (0 <= id < 2^24); the 256 single-byte tokens must exist
 * (text with a byte that no token covers would lose it silently). Special tokens are
 * taken out of the merge table and the byte-string table, so that no text, however it
 * is spelled, encodes to one. Order of the build: vocab, its piece table, added tokens
 * (flags), merges (vocab lookups only), added tokens into the piece table, byte table.
 */
#include "engine/text/bpe.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/buf.h"
#include "engine/error.h"

#define MAX_ID (1 << 24) /* far above any real vocabulary, keeps tables in int32 */

/* GPT-2's byte pre-tokenizer: the pattern ByteLevel applies when use_regex is true. */
static const char gpt2_pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

struct loader {
    struct cvlm_bpe *b;
    struct cvlm_buf strs;
    int16_t byte_of[512]; /* code point -> byte of the byte-level alphabet, -1 if none */
};

static int oom(void)
{
    return cvlm_errf(CVLM_ENOMEM, "tokenizer.json: out of memory");
}

/* GPT-2's byte-to-unicode table: the bytes that are printable Latin-1 characters
 * ('!'..'~', U+00A1..U+00AC, U+00AE..U+00FF) stand for themselves; the other 68 (C0
 * controls, space, DEL, C1 controls, no-break space, soft hyphen) get U+0100, U+0101, ...
 * in increasing byte order. Only the inverse is kept. */
static void byte_alphabet(int16_t byte_of[512])
{
    int next = 256;
    for (int i = 0; i < 512; i++)
        byte_of[i] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || b >= 0xae;
        byte_of[printable ? b : next++] = (int16_t)b;
    }
}

/* The bytes a vocab piece stands for, appended to out: each character's byte when all of
 * them are in the alphabet (returns 1), else the piece's own UTF-8 (returns 0). The piece
 * is valid UTF-8 (jansson checks it). */
static int piece_bytes(const struct loader *L, const char *s, size_t n, struct cvlm_buf *out)
{
    size_t start = out->len;
    for (size_t i = 0; i < n;) {
        uint32_t c = (uint8_t)s[i];
        int k = c < 0x80 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
        if (k == 2 && i + 1 < n)
            c = (c & 0x1f) << 6 | ((uint8_t)s[i + 1] & 0x3f);
        if (k > 2 || i + (size_t)k > n || c >= 512 || L->byte_of[c] < 0) {
            out->len = start;
            return cvlm_buf_append(out, s, n) ? -1 : 0;
        }
        uint8_t byte = (uint8_t)L->byte_of[c];
        if (cvlm_buf_append(out, &byte, 1))
            return -1;
        i += (size_t)k;
    }
    return 1;
}

/* Appends s[0..n) and a NUL to the string pool; *off gets its offset. */
static int pool_put(struct loader *L, const char *s, size_t n, uint32_t *off)
{
    if (L->strs.len + n + 1 > UINT32_MAX)
        return cvlm_errf(CVLM_ETOOBIG, "tokenizer.json: token strings exceed 4 GiB");
    *off = (uint32_t)L->strs.len;
    if (cvlm_buf_append(&L->strs, s, n) || cvlm_buf_append(&L->strs, "", 1))
        return oom();
    return 0;
}

static const char *tok_str(const struct cvlm_bpe *b, int which, int32_t id)
{
    return b->strs + b->toks[id].off[which];
}

/* The slot of table `which` that holds s[0..n) (hash h), or the empty slot where it
 * would go. */
static struct cvlm_bpe_slot *find_slot(const struct cvlm_bpe *b, int which, const char *s, size_t n,
                                       uint32_t h)
{
    struct cvlm_bpe_slot *t = b->table[which];
    uint32_t mask = b->mask[which];
    for (uint32_t i = h & mask;; i = (i + 1) & mask)
        if (t[i].id < 0 || (t[i].hash == h && t[i].len == n && !memcmp(b->strs + t[i].off, s, n)))
            return &t[i];
}

int32_t cvlm_bpe_lookup(const struct cvlm_bpe *b, int which, const char *s, size_t n)
{
    return find_slot(b, which, s, n, cvlm_bpe_hash(s, n))->id;
}

/* Puts id into table `which` under its spelling. Returns -1, or the id that was there
 * under the same string (then, with `replace`, id takes its place). */
static int32_t table_put(struct cvlm_bpe *b, int which, int32_t id, int replace)
{
    const char *s = tok_str(b, which, id);
    size_t n = b->toks[id].len[which];
    uint32_t h = cvlm_bpe_hash(s, n);
    struct cvlm_bpe_slot *slot = find_slot(b, which, s, n, h);
    int32_t old = slot->id;
    if (old < 0 || replace)
        *slot = (struct cvlm_bpe_slot){h, id, b->toks[id].off[which], (uint32_t)n};
    return old;
}

static int table_alloc(struct cvlm_bpe *b, int which, size_t count)
{
    size_t cap = 16;
    while (cap < 2 * count)
        cap *= 2;
    b->table[which] = malloc(cap * sizeof(*b->table[which]));
    if (!b->table[which])
        return oom();
    memset(b->table[which], 0xff, cap * sizeof(*b->table[which]));
    b->mask[which] = (uint32_t)(cap - 1);
    return 0;
}

/* An id of the file: an integer in [0, MAX_ID). */
static int get_id(json_t *v, const char *what, const char *name, int32_t *id)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= MAX_ID)
        return cvlm_errf(CVLM_EFORMAT,
                         "tokenizer.json: %s '%.80s': the id is not an integer "
                         "in [0, %d)",
                         what, name, MAX_ID);
    *id = (int32_t)json_integer_value(v);
    return 0;
}

/* First pass over vocab and added_tokens: types, ids, and the table size n. */
static int count_ids(struct cvlm_bpe *b, json_t *vocab, json_t *added)
{
    const char *key;
    json_t *v;
    int32_t id;
    int rc;
    if (!json_is_object(vocab))
        return cvlm_errf(CVLM_EFORMAT, "tokenizer.json: model.vocab is not an object");
    if (added && !json_is_array(added) && !json_is_null(added))
        return cvlm_errf(CVLM_EFORMAT, "tokenizer.json: added_tokens is not an array");
    json_object_foreach (vocab, key, v) {
        if ((rc = get_id(v, "model.vocab", key, &id)))
            return rc;
        b->n = id + 1 > b->n ? id + 1 : b->n;
    }
    for (size_t i = 0; i < json_array_size(added); i++) {
        json_t *a = json_array_get(added, i), *c = json_object_get(a, "content");
        if (!json_is_string(c) || !json_string_length(c))
            return cvlm_errf(CVLM_EFORMAT, "tokenizer.json: added_tokens[%zu] has no content", i);
        if ((rc = get_id(json_object_get(a, "id"), "added token", json_string_value(c), &id)))
            return rc;
        b->n = id + 1 > b->n ? id + 1 : b->n;
    }
    size_t count = json_object_size(vocab) + json_array_size(added);
    if (b->n == 0)
        return cvlm_errf(CVLM_EFORMAT, "tokenizer.json: the vocabulary is empty");
    if ((size_t)b->n > 2 * count + 1024) /* keeps the tables proportional to the file */
        return cvlm_errf(CVLM_EFORMAT, "tokenizer.json: ids up to %d for only %zu tokens", b->n - 1,
                         count);
    b->toks = calloc((size_t)b->n, sizeof(*b->toks));
    return b->toks ? 0 : oom();
}

/* model.vocab into toks (piece, bytes, mergeable) and the piece table. */
static int read_vocab(struct loader *L, json_t *vocab, size_t n_added)
{
    struct cvlm_bpe *b = L->b;
    const char *key;
    json_t *v;
    int rc;
    if ((rc = table_alloc(b, BPE_PIECE, json_object_size(vocab) + n_added)))
        return rc;
    json_object_foreach (vocab, key, v) {
        int32_t id = (int32_t)json_integer_value(v);
        struct cvlm_bpe_token *t = &b->toks[id];
        size_t n = strlen(key), at = L->strs.len;
        if (t->present)
            return cvlm_errf(CVLM_EFORMAT,
                             "tokenizer.json: model.vocab gives id %d to both "
                             "'%.80s' and '%.80s'",
                             id, tok_str(b, 0, id), key);
        if (!n)
            return cvlm_errf(CVLM_EFORMAT, "tokenizer.json: model.vocab has an empty key");
        if ((rc = pool_put(L, key, n, &t->off[BPE_PIECE])))
            return rc;
        int mapped = piece_bytes(L, key, n, &L->strs);
        if (mapped < 0 || cvlm_buf_append(&L->strs, "", 1))
            return oom();
        t->off[BPE_BYTES] = (uint32_t)(at + n + 1);
        t->len[BPE_PIECE] = (uint32_t)n;
        t->len[BPE_BYTES] = (uint32_t)(L->strs.len - 1 - t->off[BPE_BYTES]);
        t->present = 1;
        t->mergeable = (uint8_t)mapped;
        b->strs = L->strs.p; /* tok_str reads the pool while it grows */
        if (table_put(b, BPE_PIECE, id, 0) >= 0)
            return cvlm_errf(CVLM_EFORMAT, "tokenizer.json: model.vocab has '%.80s' twice", key);
    }
    return 0;
}

/* added_tokens: flags, and the strings of ids that the vocab lacks. An id the vocab has
 * must carry the same string (the two could not both be its piece). */
static int read_added(struct loader *L, json_t *added)
{
    struct cvlm_bpe *b = L->b;
    int rc;
    for (size_t i = 0; i < json_array_size(added); i++) {
        json_t *a = json_array_get(added, i);
        const char *s = json_string_value(json_object_get(a, "content"));
        size_t n = json_string_length(json_object_get(a, "content"));
        int32_t id = (int32_t)json_integer_value(json_object_get(a, "id"));
        struct cvlm_bpe_token *t = &b->toks[id];
        if (t->added)
            return cvlm_errf(CVLM_EFORMAT, "tokenizer.json: added_tokens has id %d twice", id);
        if (memchr(s, 0, n))
            return cvlm_errf(CVLM_EFORMAT, "tokenizer.json: added token %d contains NUL", id);
        if (t->present && (t->len[BPE_PIECE] != n || memcmp(tok_str(b, 0, id), s, n)))
            return cvlm_errf(CVLM_EFORMAT,
                             "tokenizer.json: added token '%.80s' has id %d of "
                             "the vocab token '%.80s'",
                             s, id, tok_str(b, 0, id));
        if (!t->present) {
            if ((rc = pool_put(L, s, n, &t->off[BPE_PIECE])))
                return rc;
            t->off[BPE_BYTES] = t->off[BPE_PIECE];
            t->len[BPE_PIECE] = t->len[BPE_BYTES] = (uint32_t)n;
            b->strs = L->strs.p;
        }
        t->present = t->added = 1;
        t->special = json_is_true(json_object_get(a, "special"));
        if (t->special)
            t->mergeable = 0;
    }
    return 0;
}

/* The two halves of merges[i]: "a b" (one space) or ["a", "b"]. */
static int merge_halves(json_t *m, size_t i, const char **a, size_t *na, const char **bb,
                        size_t *nb)
{
    if (json_is_string(m)) {
        const char *s = json_string_value(m), *sp = strchr(s, ' ');
        if (sp && !strchr(sp + 1, ' ') && sp > s && sp[1]) {
            *a = s;
            *na = (size_t)(sp - s);
            *bb = sp + 1;
            *nb = strlen(sp + 1);
            return 0;
        }
    } else if (json_is_array(m) && json_array_size(m) == 2 &&
               json_is_string(json_array_get(m, 0)) && json_is_string(json_array_get(m, 1))) {
        *a = json_string_value(json_array_get(m, 0));
        *na = json_string_length(json_array_get(m, 0));
        *bb = json_string_value(json_array_get(m, 1));
        *nb = json_string_length(json_array_get(m, 1));
        return 0;
    }
    return cvlm_errf(CVLM_EFORMAT,
                     "tokenizer.json: model.merges[%zu] is neither \"a b\" nor "
                     "[\"a\", \"b\"]",
                     i);
}

static void merge_put(struct cvlm_bpe *b, int32_t l, int32_t r, int32_t rank, int32_t id)
{
    uint32_t i = cvlm_bpe_pair_hash(l, r) & b->merge_mask;
    while (b->merges[i].left >= 0 && !(b->merges[i].left == l && b->merges[i].right == r))
        i = (i + 1) & b->merge_mask;
    b->merges[i] = (struct cvlm_bpe_merge){l, r, rank, id};
}

/* model.merges into the merge table: both halves and their concatenation must be vocab
 * keys. Merges that touch a special token are left out. */
static int read_merges(struct cvlm_bpe *b, json_t *merges)
{
    struct cvlm_buf cat = {0};
    int rc = 0;
    size_t n = json_array_size(merges), cap = 16;
    if (!json_is_array(merges))
        return cvlm_errf(CVLM_EFORMAT, "tokenizer.json: model.merges is not an array");
    if (n >= MAX_ID)
        return cvlm_errf(CVLM_EFORMAT, "tokenizer.json: %zu merges", n);
    while (cap < n + n / 2 + 2)
        cap *= 2;
    if (!(b->merges = malloc(cap * sizeof(*b->merges))))
        return oom();
    memset(b->merges, 0xff, cap * sizeof(*b->merges));
    b->merge_mask = (uint32_t)(cap - 1);
    for (size_t i = 0; i < n && !rc; i++) {
        const char *s[2] = {"", ""};
        size_t len[2] = {0, 0};
        if ((rc = merge_halves(json_array_get(merges, i), i, &s[0], &len[0], &s[1], &len[1])))
            break;
        cat.len = 0;
        if (cvlm_buf_append(&cat, s[0], len[0]) || cvlm_buf_append(&cat, s[1], len[1])) {
            rc = oom();
            break;
        }
        int32_t l = cvlm_bpe_lookup(b, BPE_PIECE, s[0], len[0]);
        int32_t r = cvlm_bpe_lookup(b, BPE_PIECE, s[1], len[1]);
        int32_t m = cvlm_bpe_lookup(b, BPE_PIECE, cat.p, cat.len);
        if (l < 0 || r < 0 || m < 0)
            rc = cvlm_errf(CVLM_EFORMAT,
                           "tokenizer.json: model.merges[%zu]: '%.80s' is not "
                           "in the vocabulary",
                           i,
                           l < 0   ? s[0]
                           : r < 0 ? s[1]
                                   : cat.p);
        else if (!b->toks[l].special && !b->toks[r].special && !b->toks[m].special)
            merge_put(b, l, r, (int32_t)i, m);
    }
    cvlm_buf_free(&cat);
    return rc;
}

/* The byte table over mergeable tokens, and the 256 single-byte tokens. */
static int byte_tables(struct cvlm_bpe *b)
{
    int rc;
    size_t count = 0;
    for (int32_t id = 0; id < b->n; id++)
        count += b->toks[id].mergeable;
    if ((rc = table_alloc(b, BPE_BYTES, count)))
        return rc;
    for (int32_t id = 0; id < b->n; id++) {
        if (!b->toks[id].mergeable)
            continue;
        table_put(b, BPE_BYTES, id, 0); /* pieces are unique, so are their byte forms */
        if (b->toks[id].len[BPE_BYTES] > b->max_bytes)
            b->max_bytes = b->toks[id].len[BPE_BYTES];
    }
    for (int c = 0; c < 256; c++) {
        char byte = (char)c;
        if ((b->byte_id[c] = cvlm_bpe_lookup(b, BPE_BYTES, &byte, 1)) < 0)
            return cvlm_errf(CVLM_EFORMAT,
                             "tokenizer.json: no token for the byte 0x%02x "
                             "(a byte-level vocabulary has all 256)",
                             c);
    }
    return 0;
}

/* The options of model that change the algorithm: only plain byte-level BPE is done. */
static int check_model(struct cvlm_bpe *b, json_t *model)
{
    json_t *type = json_object_get(model, "type"), *v;
    if (type && !(json_is_string(type) && !strcmp(json_string_value(type), "BPE")))
        return cvlm_errf(CVLM_EUNSUPPORTED, "tokenizer.json: model type %.40s is not BPE",
                         json_is_string(type) ? json_string_value(type) : "(not a string)");
    if ((v = json_object_get(model, "dropout")) && !json_is_null(v) && json_number_value(v) != 0)
        return cvlm_errf(CVLM_EUNSUPPORTED, "tokenizer.json: BPE dropout is not supported");
    if (json_is_true(json_object_get(model, "byte_fallback")))
        return cvlm_errf(CVLM_EUNSUPPORTED, "tokenizer.json: byte_fallback is not supported "
                                            "(not a byte-level BPE)");
    const char *affix[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int i = 0; i < 2; i++)
        if ((v = json_object_get(model, affix[i])) && !json_is_null(v) &&
            !(json_is_string(v) && !json_string_length(v)))
            return cvlm_errf(CVLM_EUNSUPPORTED, "tokenizer.json: %s is not supported", affix[i]);
    b->ignore_merges = json_is_true(json_object_get(model, "ignore_merges"));
    return 0;
}

static int is_type(json_t *o, const char *type)
{
    json_t *t = json_object_get(o, "type");
    return json_is_string(t) && !strcmp(json_string_value(t), type);
}

/* The pattern with \s and \S spelled \p{White_Space} and \P{White_Space}. HF (Oniguruma)
 * and Meta's tiktoken (Rust regex) read \s as the Unicode White_Space property; PCRE2's
 * \s with UCP also matches U+180E MONGOLIAN VOWEL SEPARATOR (a format character since
 * Unicode 6.3), which would split text differently around it. \Q...\E is copied as is. */
static int respell_spaces(const char *pat, size_t n, struct cvlm_buf *out)
{
    int quoted = 0, rc = 0;
    for (size_t i = 0, k; i < n && !rc; i += k) {
        const char *rep = NULL;
        k = 1;
        if (pat[i] == '\\' && i + 1 < n) {
            char c = pat[i + 1];
            k = quoted && c != 'E' ? 1 : 2; /* inside \Q, only \E means anything */
            if (quoted)
                quoted = c != 'E';
            else if (c == 'Q')
                quoted = 1;
            else if (c == 's' || c == 'S')
                rep = c == 's' ? "\\p{White_Space}" : "\\P{White_Space}";
        }
        rc = rep ? cvlm_buf_puts(out, rep) : cvlm_buf_append(out, pat + i, k);
    }
    return rc ? oom() : 0;
}

/* Compiles the split pattern (a regex, or a literal with PCRE2_LITERAL). */
static int compile_pattern(struct cvlm_bpe *b, const char *pat, size_t n, int literal)
{
    struct cvlm_buf re = {0};
    int err, rc;
    PCRE2_SIZE at;
    uint32_t opts = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0);
    if (!literal) {
        if ((rc = respell_spaces(pat, n, &re)))
            return rc;
        pat = re.p ? re.p : "";
        n = re.len;
    }
    b->re = pcre2_compile((PCRE2_SPTR)pat, n, opts, &err, &at, NULL);
    cvlm_buf_free(&re);
    if (!b->re) {
        PCRE2_UCHAR msg[160];
        pcre2_get_error_message(err, msg, sizeof(msg));
        return cvlm_errf(CVLM_EFORMAT,
                         "tokenizer.json: pre_tokenizer pattern at offset %zu: "
                         "%s",
                         (size_t)at, (const char *)msg);
    }
    /* without JIT (unsupported platform, no executable memory) the interpreter runs it */
    (void)pcre2_jit_compile(b->re, PCRE2_JIT_COMPLETE);
    return 0;
}

/* A Split pre-tokenizer: its pattern, which must isolate its matches. */
static int read_split(struct cvlm_bpe *b, json_t *split)
{
    json_t *pat = json_object_get(split, "pattern"), *beh = json_object_get(split, "behavior");
    json_t *re = json_object_get(pat, "Regex"), *lit = json_object_get(pat, "String");
    if (!json_is_string(beh) || strcmp(json_string_value(beh), "Isolated") ||
        json_is_true(json_object_get(split, "invert")))
        return cvlm_errf(CVLM_EUNSUPPORTED, "tokenizer.json: only a Split pre-tokenizer with "
                                            "behavior Isolated, not inverted, is supported");
    if (!json_is_string(re) && !json_is_string(lit))
        return cvlm_errf(CVLM_EFORMAT, "tokenizer.json: the Split pre-tokenizer has no "
                                       "pattern");
    json_t *p = json_is_string(re) ? re : lit;
    return compile_pattern(b, json_string_value(p), json_string_length(p), !json_is_string(re));
}

static int read_pretokenizer(struct cvlm_bpe *b, json_t *pt)
{
    json_t *split = NULL, *bl = pt;
    if (is_type(pt, "Sequence")) {
        json_t *seq = json_object_get(pt, "pretokenizers");
        size_t n = json_array_size(seq);
        bl = n ? json_array_get(seq, n - 1) : NULL;
        split = n == 2 ? json_array_get(seq, 0) : NULL;
        if (n < 1 || n > 2 || (split && !is_type(split, "Split")))
            bl = NULL;
    }
    if (!is_type(bl, "ByteLevel"))
        return cvlm_errf(CVLM_EUNSUPPORTED, "tokenizer.json: the pre_tokenizer is not "
                                            "ByteLevel or Sequence[Split, ByteLevel]");
    json_t *aps = json_object_get(bl, "add_prefix_space"), *ur = json_object_get(bl, "use_regex");
    b->add_prefix_space = !aps || json_is_true(aps); /* HF's defaults: both true */
    int use_regex = !ur || json_is_true(ur);
    if (split && (use_regex || b->add_prefix_space))
        return cvlm_errf(CVLM_EUNSUPPORTED, "tokenizer.json: a Split before a ByteLevel "
                                            "with use_regex or add_prefix_space");
    if (split)
        return read_split(b, split);
    return use_regex ? compile_pattern(b, gpt2_pattern, sizeof(gpt2_pattern) - 1, 0) : 0;
}

/* bos_token / eos_token of tokenizer_config.json: a string or {"content": string}. */
static int config_token(struct cvlm_bpe *b, json_t *cfg, const char *key, int32_t *id)
{
    json_t *v = json_object_get(cfg, key);
    if (json_is_object(v))
        v = json_object_get(v, "content");
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_string(v))
        return cvlm_errf(CVLM_EFORMAT, "tokenizer_config.json: %s is not a string", key);
    *id = cvlm_bpe_lookup(b, BPE_PIECE, json_string_value(v), json_string_length(v));
    if (*id < 0)
        return cvlm_errf(CVLM_EFORMAT, "tokenizer_config.json: %s '%.80s' is not a token", key,
                         json_string_value(v));
    return 0;
}

static int read_config(struct cvlm_bpe *b, const void *data, size_t len)
{
    json_error_t err;
    json_t *cfg = json_loadb(data, len, 0, &err);
    int rc;
    if (!cfg)
        return cvlm_errf(CVLM_EFORMAT, "tokenizer_config.json: line %d: %s", err.line, err.text);
    if (!json_is_object(cfg))
        rc = cvlm_errf(CVLM_EFORMAT, "tokenizer_config.json: not a JSON object");
    else if (!(rc = config_token(b, cfg, "bos_token", &b->bos_id)))
        rc = config_token(b, cfg, "eos_token", &b->eos_id);
    json_decref(cfg);
    return rc;
}

static int check_stages(json_t *root)
{
    json_t *norm = json_object_get(root, "normalizer"), *dec = json_object_get(root, "decoder");
    if (norm && !json_is_null(norm))
        return cvlm_errf(CVLM_EUNSUPPORTED, "tokenizer.json: a normalizer is not supported");
    if (dec && !json_is_null(dec) && !is_type(dec, "ByteLevel"))
        return cvlm_errf(CVLM_EUNSUPPORTED, "tokenizer.json: the decoder is not ByteLevel");
    return 0;
}

static int build(struct loader *L, json_t *root)
{
    struct cvlm_bpe *b = L->b;
    json_t *model = json_object_get(root, "model"), *added = json_object_get(root, "added_tokens");
    json_t *unk = json_object_get(model, "unk_token");
    int rc;
    if (!json_is_object(root))
        return cvlm_errf(CVLM_EFORMAT, "tokenizer.json: not a JSON object");
    if (!json_is_object(model))
        return cvlm_errf(CVLM_EFORMAT, "tokenizer.json: no \"model\" object");
    if ((rc = check_stages(root)) || (rc = check_model(b, model)) ||
        (rc = count_ids(b, json_object_get(model, "vocab"), added)) ||
        (rc = read_vocab(L, json_object_get(model, "vocab"), json_array_size(added))) ||
        (rc = read_added(L, added)) || (rc = read_merges(b, json_object_get(model, "merges"))))
        return rc;
    for (size_t i = 0; i < json_array_size(added); i++) /* added tokens win lookups */
        table_put(b, BPE_PIECE,
                  (int32_t)json_integer_value(json_object_get(json_array_get(added, i), "id")), 1);
    if ((rc = byte_tables(b)) ||
        (rc = read_pretokenizer(b, json_object_get(root, "pre_tokenizer"))))
        return rc;
    if (json_is_string(unk))
        b->unk_id = cvlm_bpe_lookup(b, BPE_PIECE, json_string_value(unk), json_string_length(unk));
    return 0;
}

int cvlm_bpe_build(const void *json, size_t len, const void *config, size_t config_len,
                   struct cvlm_bpe **out)
{
    struct loader L = {0};
    json_error_t err;
    int rc;
    *out = NULL;
    if (!(L.b = calloc(1, sizeof(*L.b))))
        return oom();
    L.b->bos_id = L.b->eos_id = L.b->unk_id = -1;
    byte_alphabet(L.byte_of);
    json_t *root = json_loadb(json, len, 0, &err);
    if (!root)
        rc = cvlm_errf(CVLM_EFORMAT, "tokenizer.json: line %d: %s", err.line, err.text);
    else
        rc = build(&L, root);
    json_decref(root);
    L.b->strs = L.strs.p;
    if (!rc && config)
        rc = read_config(L.b, config, config_len);
    if (rc) {
        cvlm_bpe_free(L.b);
        return rc;
    }
    *out = L.b;
    return 0;
}

void cvlm_bpe_free(struct cvlm_bpe *b)
{
    if (!b)
        return;
    free(b->toks);
    free(b->strs);
    free(b->table[0]);
    free(b->table[1]);
    free(b->merges);
    pcre2_code_free(b->re);
    free(b);
}
