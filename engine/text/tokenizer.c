/* tokenizer.c - the tokenizer API: SentencePiece BPE (here) or byte-level BPE (bpe.c).
 *
 * cvlm_tokenizer_load() picks the kind from the file: a HF tokenizer.json (it starts with
 * '{') is a byte-level BPE, built by bpe_load.c and served by bpe.c, to which every public
 * function below dispatches on tok->kind; anything else is read as a SentencePiece
 * `tokenizer.model`. The rest of this file is the SentencePiece implementation.
 *
 * Reproduces SentencePiece (src/normalizer.cc, bpe_model.cc, sentencepiece_processor.cc)
 * behaviour for BPE models, byte for byte:
 *   normalize  user-defined symbols pass through; otherwise the longest rule of the
 *              precompiled charsmap (Darts double-array trie) or one UTF-8 character
 *              (an invalid byte becomes U+FFFD); optional removal of extra whitespace,
 *              dummy prefix, ' ' -> U+2581.
 *   encode     split into characters (user-defined symbols whole and frozen), merge the
 *              adjacent pair whose concatenation is the highest-scoring piece (ties: the
 *              leftmost), re-segment UNUSED pieces, then unknown symbols become byte pieces
 *              (byte_fallback) or one <unk> per run.
 *   decode     control -> "", unknown -> unk_surface, runs of byte pieces -> bytes with
 *              U+FFFD per invalid byte, U+2581 -> ' ', and the leading U+2581 of the first
 *              visible piece dropped (the is_bos_ws rule).
 * The model file is read and turned into tables by sp_model.c (see sp_model.h). A loaded
 * tokenizer is immutable: every function below takes it const, so threads share it.
 * encode/decode return malloc'd buffers that the caller frees.
 */
#include "engine/text/tokenizer.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "base/buf.h"
#include "engine/error.h"
#include "engine/text/bpe.h"
#include "engine/text/sp_model.h"
#include "engine/text/utf8.h"
#include "engine/util/fileio.h"

#define WS "\xe2\x96\x81" /* U+2581, SentencePiece's whitespace symbol */
#define WS_LEN 3
#define FFFD "\xef\xbf\xbd" /* U+FFFD REPLACEMENT CHARACTER */
#define MAX_MODEL_FILE (1u << 30)
#define MAX_CONFIG_FILE (16u << 20)
#define SP_FILE "tokenizer.model"
#define BPE_FILE "tokenizer.json"
#define BPE_CONFIG "tokenizer_config.json"
#define CHARSMAP_MAX_RESULTS 32 /* Normalizer::kMaxTrieResultsSize */
#define USER_MAX_RESULTS 64     /* PrefixMatcher::PrefixMatch's kResultSize */

/* ---- small helpers ------------------------------------------------------------------ */

/* The growable buffer of base/buf.h with the tokenizer's error codes. */
static int buf_reserve(struct cvlm_buf *b, size_t extra)
{
    return cvlm_buf_reserve(b, extra) ? cvlm_errf(CVLM_ENOMEM, "tokenizer: out of memory") : 0;
}

static int buf_put(struct cvlm_buf *b, const void *data, size_t n)
{
    return cvlm_buf_append(b, data, n) ? cvlm_errf(CVLM_ENOMEM, "tokenizer: out of memory") : 0;
}

/* ---- loading and accessors ----------------------------------------------------------- */

/* A byte-level BPE from tokenizer.json (+ tokenizer_config.json) bytes. */
static int load_bpe(const void *json, size_t len, const void *config, size_t config_len,
                    struct cvlm_tokenizer **out)
{
    struct cvlm_bpe *bpe;
    int rc = cvlm_bpe_build(json, len, config, config_len, &bpe);
    if (rc)
        return rc;
    if (!(*out = calloc(1, sizeof(**out)))) {
        cvlm_bpe_free(bpe);
        return cvlm_errf(CVLM_ENOMEM, "tokenizer: out of memory");
    }
    (*out)->kind = CVLM_TOK_BYTE_BPE;
    (*out)->bpe = bpe;
    return 0;
}

static int is_json(const void *data, size_t len)
{
    return len && *(const unsigned char *)data == '{';
}

int cvlm_tokenizer_load_mem(const void *data, size_t len, struct cvlm_tokenizer **out)
{
    *out = NULL;
    return is_json(data, len) ? load_bpe(data, len, NULL, 0, out) : cvlm_sp_build(data, len, out);
}

/* The file a path names: itself, or for a directory its tokenizer.model if it has one,
 * else its tokenizer.json. */
static int tokenizer_file(const char *path, char *buf, size_t cap, const char **file)
{
    struct stat st;
    *file = path;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode))
        return 0;
    *file = buf;
    const char *names[] = {SP_FILE, BPE_FILE};
    for (int i = 0; i < 2; i++) {
        if (snprintf(buf, cap, "%s/%s", path, names[i]) >= (int)cap)
            return cvlm_errf(CVLM_ETOOBIG, "%s: path too long", path);
        if (stat(buf, &st) == 0)
            return 0;
    }
    return cvlm_errf(CVLM_ENOENT, "%s: a directory with neither %s nor %s", path, SP_FILE,
                     BPE_FILE);
}

/* The tokenizer_config.json beside a tokenizer.json; *data stays NULL without one. */
static int read_config_beside(const char *json_path, unsigned char **data, size_t *len)
{
    char path[4096];
    const char *slash = strrchr(json_path, '/');
    int dir = slash ? (int)(slash - json_path + 1) : 0;
    *data = NULL;
    if (snprintf(path, sizeof(path), "%.*s%s", dir, json_path, BPE_CONFIG) >= (int)sizeof(path))
        return cvlm_errf(CVLM_ETOOBIG, "%s: path too long", json_path);
    int rc = cvlm_read_file(path, MAX_CONFIG_FILE, data, len);
    if (rc == CVLM_ENOENT) {
        cvlm_clear_error();
        return 0;
    }
    return rc;
}

int cvlm_tokenizer_load(const char *path, struct cvlm_tokenizer **out)
{
    unsigned char *data = NULL, *config = NULL;
    size_t len, config_len = 0;
    char buf[4096];
    *out = NULL;
    int rc = tokenizer_file(path, buf, sizeof(buf), &path);
    if (rc || (rc = cvlm_read_file(path, MAX_MODEL_FILE, &data, &len)))
        return rc;
    if (!is_json(data, len))
        rc = cvlm_sp_build(data, len, out);
    else if (!(rc = read_config_beside(path, &config, &config_len)))
        rc = load_bpe(data, len, config, config_len, out);
    if (rc) {
        char detail[256]; /* cvlm_errf must not read the buffer it writes */
        snprintf(detail, sizeof(detail), "%s", cvlm_last_error());
        cvlm_errf(rc, "%s: %s", path, detail);
    }
    free(data);
    free(config);
    return rc;
}

void cvlm_tokenizer_destroy(struct cvlm_tokenizer *t)
{
    if (t && t->kind == CVLM_TOK_BYTE_BPE) {
        cvlm_bpe_free(t->bpe);
        free(t);
        return;
    }
    cvlm_sp_free(t);
}

int cvlm_tokenizer_vocab_size(const struct cvlm_tokenizer *t)
{
    return t->kind == CVLM_TOK_BYTE_BPE ? t->bpe->n : t->n;
}

int cvlm_tokenizer_bos_id(const struct cvlm_tokenizer *t)
{
    return t->kind == CVLM_TOK_BYTE_BPE ? t->bpe->bos_id : t->bos_id;
}

int cvlm_tokenizer_eos_id(const struct cvlm_tokenizer *t)
{
    return t->kind == CVLM_TOK_BYTE_BPE ? t->bpe->eos_id : t->eos_id;
}

int cvlm_tokenizer_unk_id(const struct cvlm_tokenizer *t)
{
    return t->kind == CVLM_TOK_BYTE_BPE ? t->bpe->unk_id : t->unk_id;
}

const char *cvlm_tokenizer_piece(const struct cvlm_tokenizer *t, int32_t id)
{
    if (t->kind == CVLM_TOK_BYTE_BPE) {
        const struct cvlm_bpe *b = t->bpe;
        if (id < 0 || id >= b->n)
            return NULL;
        return b->toks[id].present ? b->strs + b->toks[id].off[BPE_PIECE] : "";
    }
    if (id < 0 || id >= t->n)
        return NULL;
    return t->strs + t->pieces[id].off;
}

int32_t cvlm_tokenizer_token_id(const struct cvlm_tokenizer *t, const char *piece)
{
    if (t->kind == CVLM_TOK_BYTE_BPE)
        return cvlm_bpe_lookup(t->bpe, BPE_PIECE, piece, strlen(piece));
    return cvlm_sp_lookup(t, piece, strlen(piece));
}

/* ---- normalization ----------------------------------------------------------------- */

/* PrefixMatcher::PrefixMatch over the user-defined symbols: the length of the longest
 * symbol that prefixes s, 0 if none. Like SentencePiece, only the first 64 matches count. */
static size_t user_match(const struct cvlm_tokenizer *t, const uint8_t *s, size_t n)
{
    size_t best = 0;
    int found = 0;
    int32_t node = 0;
    if (!t->unodes)
        return 0;
    for (size_t i = 0; i < n && found < USER_MAX_RESULTS; i++) {
        int32_t c = t->unodes[node].child;
        while (c >= 0 && t->unodes[c].byte != s[i])
            c = t->unodes[c].sibling;
        if (c < 0)
            break;
        node = c;
        if (t->unodes[c].term) {
            best = i + 1;
            found++;
        }
    }
    return best;
}

/* Darts-clone double-array unit accessors. */
static uint32_t unit_offset(uint32_t u)
{
    return (u >> 10) << ((u & (1u << 9)) >> 6);
}

static uint32_t unit_label(uint32_t u)
{
    return u & ((1u << 31) | 0xffu);
}

/* Darts::DoubleArray::commonPrefixSearch + Normalizer's "longest rule": length of the
 * longest charsmap key that prefixes s (0 if none) and its replacement in *rep. Every index
 * is bounds-checked, so a corrupt trie can only give wrong (never unsafe) matches. */
static size_t charsmap_match(const struct cvlm_tokenizer *t, const uint8_t *s, size_t n,
                             const char **rep)
{
    const uint32_t *u = t->units;
    size_t best = 0;
    int count = 0;
    if (!t->n_units)
        return 0;
    uint32_t pos = unit_offset(u[0]);
    for (size_t i = 0; i < n; i++) {
        pos ^= s[i];
        if (pos >= t->n_units)
            break;
        uint32_t unit = u[pos];
        if (unit_label(unit) != s[i])
            break;
        pos ^= unit_offset(unit);
        if (!((unit >> 8) & 1)) /* has_leaf */
            continue;
        if (count++ >= CHARSMAP_MAX_RESULTS || pos >= t->n_units)
            continue;
        uint32_t value = u[pos] & 0x7fffffffu;
        if (value < t->norm_len) {
            best = i + 1;
            *rep = t->norm + value;
        }
    }
    return best;
}

/* Normalizer::NormalizePrefix: consumes a prefix of `in` (returns its length, >= 1) and
 * sets (*s, *sl) to what it normalizes to. */
static size_t norm_prefix(const struct cvlm_tokenizer *t, const uint8_t *in, size_t len,
                          const char **s, size_t *sl)
{
    size_t n = user_match(t, in, len);
    if (n) { /* user-defined symbols are never normalized */
        *s = (const char *)in;
        *sl = n;
        return n;
    }
    if (t->units && (n = charsmap_match(t, in, len, s)) > 0) {
        *sl = strlen(*s);
        return n;
    }
    int k = cvlm_utf8_scan(in, len);
    if (k <= 0) { /* malformed (or truncated) UTF-8: one byte becomes U+FFFD */
        *s = FFFD;
        *sl = 3;
        return 1;
    }
    *s = (const char *)in;
    *sl = (size_t)k;
    return (size_t)k;
}

static int put_ws(const struct cvlm_tokenizer *t, struct cvlm_buf *out)
{
    return t->escape_ws ? buf_put(out, WS, WS_LEN) : buf_put(out, " ", 1);
}

static int put_escaped(const struct cvlm_tokenizer *t, struct cvlm_buf *out, const char *s,
                       size_t n)
{
    int rc = buf_reserve(out, n * WS_LEN);
    for (size_t i = 0; !rc && i < n; i++) {
        if (t->escape_ws && s[i] == ' ') {
            memcpy(out->p + out->len, WS, WS_LEN);
            out->len += WS_LEN;
        } else {
            out->p[out->len++] = s[i];
        }
    }
    return rc;
}

/* Normalizer::Normalize (without the offset mapping). Leaves out->len == 0 for input that
 * normalizes to nothing. */
static int normalize(const struct cvlm_tokenizer *t, const uint8_t *in, size_t len,
                     struct cvlm_buf *out)
{
    const char *s;
    size_t sl, step;
    int rc = 0;

    while (t->remove_extra_ws && len) { /* leading whitespace */
        step = norm_prefix(t, in, len, &s, &sl);
        if (sl != 1 || s[0] != ' ')
            break;
        in += step;
        len -= step;
    }
    if (!len)
        return 0;
    if (!t->ws_suffix && t->add_dummy_prefix && (rc = put_ws(t, out)))
        return rc;
    int prev_space = t->remove_extra_ws;
    while (len) {
        step = norm_prefix(t, in, len, &s, &sl);
        while (prev_space && sl && s[0] == ' ') {
            s++;
            sl--;
        }
        if (sl) {
            if ((rc = put_escaped(t, out, s, sl)))
                return rc;
            prev_space = s[sl - 1] == ' ';
        }
        in += step;
        len -= step;
        if (!t->remove_extra_ws)
            prev_space = 0;
    }
    if (t->remove_extra_ws) { /* trailing whitespace */
        const char *ws = t->escape_ws ? WS : " ";
        size_t wl = t->escape_ws ? WS_LEN : 1;
        while (out->len >= wl && !memcmp(out->p + out->len - wl, ws, wl))
            out->len -= wl;
    }
    if (t->ws_suffix && t->add_dummy_prefix)
        rc = put_ws(t, out);
    return rc;
}

/* ---- BPE --------------------------------------------------------------------------- */

struct sym {
    int32_t prev, next;  /* linked list of live symbols, -1 at the ends */
    uint32_t start, len; /* bytes of the normalized text; len 0 = merged away */
    uint8_t freeze;      /* a user-defined symbol: never merged */
};

struct cand {
    float score;
    int32_t left, right;
    uint32_t size; /* len(left) + len(right) when queued; a mismatch later means stale */
};

struct bpe {
    const struct cvlm_tokenizer *t;
    const char *text;
    struct sym *sym;
    struct cand *heap; /* binary max-heap by cand_before */
    size_t n_heap;
    /* "rev_merge": for UNUSED pieces, the split of the latest pair queued with that
     * string (id -> length of its left part); open addressing, grown on demand. */
    int32_t *rm_id;
    uint32_t *rm_left, rm_mask;
    size_t rm_n;
    struct cvlm_buf stack; /* re-segmentation work list of (start, len) pairs */
    struct cvlm_buf ids;
    int prev_unk;
};

/* Priority order of SentencePiece's agenda: higher score first, then the leftmost pair. */
static int cand_before(const struct cand *a, const struct cand *b)
{
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static void heap_push(struct bpe *b, struct cand c)
{
    size_t i = b->n_heap++;
    while (i > 0) {
        size_t up = (i - 1) / 2;
        if (!cand_before(&c, &b->heap[up]))
            break;
        b->heap[i] = b->heap[up];
        i = up;
    }
    b->heap[i] = c;
}

static struct cand heap_pop(struct bpe *b)
{
    struct cand top = b->heap[0], last = b->heap[--b->n_heap];
    size_t i = 0, n = b->n_heap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && cand_before(&b->heap[c + 1], &b->heap[c]))
            c++;
        if (!cand_before(&b->heap[c], &last))
            break;
        b->heap[i] = b->heap[c];
        i = c;
    }
    if (n)
        b->heap[i] = last;
    return top;
}

static int rm_set(struct bpe *b, int32_t id, uint32_t left)
{
    if (2 * (b->rm_n + 1) > (size_t)b->rm_mask + 1 || !b->rm_id) {
        uint32_t cap = b->rm_id ? 2 * (b->rm_mask + 1) : 64;
        int32_t *nid = malloc(cap * sizeof(*nid));
        uint32_t *nleft = malloc(cap * sizeof(*nleft));
        if (!nid || !nleft) {
            free(nid);
            free(nleft);
            return cvlm_errf(CVLM_ENOMEM, "tokenizer: out of memory");
        }
        memset(nid, 0xff, cap * sizeof(*nid));
        for (uint32_t i = 0; b->rm_id && i <= b->rm_mask; i++) {
            if (b->rm_id[i] < 0)
                continue;
            uint32_t h = ((uint32_t)b->rm_id[i] * 2654435761u) & (cap - 1);
            while (nid[h] >= 0)
                h = (h + 1) & (cap - 1);
            nid[h] = b->rm_id[i];
            nleft[h] = b->rm_left[i];
        }
        free(b->rm_id);
        free(b->rm_left);
        b->rm_id = nid;
        b->rm_left = nleft;
        b->rm_mask = cap - 1;
    }
    uint32_t h = ((uint32_t)id * 2654435761u) & b->rm_mask;
    while (b->rm_id[h] >= 0 && b->rm_id[h] != id)
        h = (h + 1) & b->rm_mask;
    if (b->rm_id[h] < 0)
        b->rm_n++;
    b->rm_id[h] = id;
    b->rm_left[h] = left;
    return 0;
}

static uint32_t rm_get(const struct bpe *b, int32_t id)
{
    if (!b->rm_id)
        return 0;
    uint32_t h = ((uint32_t)id * 2654435761u) & b->rm_mask;
    while (b->rm_id[h] >= 0) {
        if (b->rm_id[h] == id)
            return b->rm_left[h];
        h = (h + 1) & b->rm_mask;
    }
    return 0;
}

/* MaybeAddNewSymbolPair: queues (l, r) if their concatenation is a mergeable piece. */
static int try_pair(struct bpe *b, int32_t l, int32_t r)
{
    if (l < 0 || r < 0 || b->sym[l].freeze || b->sym[r].freeze)
        return 0;
    uint32_t size = b->sym[l].len + b->sym[r].len;
    int32_t id = cvlm_sp_lookup(b->t, b->text + b->sym[l].start, size);
    if (id < 0)
        return 0;
    const struct cvlm_sp_piece *p = &b->t->pieces[id];
    if (p->type != CVLM_SP_NORMAL && p->type != CVLM_SP_USER_DEFINED && p->type != CVLM_SP_UNUSED)
        return 0;
    heap_push(b, (struct cand){p->score, l, r, size});
    return p->type == CVLM_SP_UNUSED ? rm_set(b, id, b->sym[l].len) : 0;
}

/* Splits the normalized text into symbols: user-defined symbols (frozen) or one UTF-8
 * character (by its lead byte, as OneCharLen). Returns the number of symbols. */
static int32_t split_symbols(struct bpe *b, size_t n)
{
    static const uint8_t one_char_len[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    const uint8_t *s = (const uint8_t *)b->text;
    int32_t k = 0;
    for (size_t pos = 0; pos < n; k++) {
        size_t m = user_match(b->t, s + pos, n - pos);
        b->sym[k].freeze = m > 0;
        if (!m) {
            m = one_char_len[s[pos] >> 4];
            if (m > n - pos)
                m = n - pos;
        }
        b->sym[k].prev = k - 1;
        b->sym[k].next = k + 1;
        b->sym[k].start = (uint32_t)pos;
        b->sym[k].len = (uint32_t)m;
        pos += m;
    }
    b->sym[k - 1].next = -1;
    return k;
}

static int merge_all(struct bpe *b, int32_t n_sym)
{
    int rc;
    for (int32_t i = 1; i < n_sym; i++)
        if ((rc = try_pair(b, i - 1, i)))
            return rc;
    while (b->n_heap) {
        struct cand c = heap_pop(b);
        struct sym *l = &b->sym[c.left], *r = &b->sym[c.right];
        if (!l->len || !r->len || l->len + r->len != c.size)
            continue; /* one side was merged into something else since */
        l->len += r->len;
        l->next = r->next;
        if (r->next >= 0)
            b->sym[r->next].prev = c.left;
        r->len = 0;
        if ((rc = try_pair(b, l->prev, c.left)) || (rc = try_pair(b, c.left, l->next)))
            return rc;
    }
    return 0;
}

/* Appends the id(s) of one final symbol (PopulateSentencePieceText): unknown symbols
 * become byte pieces with byte fallback, else consecutive unknowns share one <unk>. */
static int emit(struct bpe *b, uint32_t start, uint32_t len)
{
    const struct cvlm_tokenizer *t = b->t;
    int32_t id = cvlm_sp_lookup(t, b->text + start, len);
    int rc = 0;
    if (id < 0)
        id = t->unk_id;
    if (t->pieces[id].type != CVLM_SP_UNKNOWN) {
        b->prev_unk = 0;
        return buf_put(&b->ids, &id, sizeof(id));
    }
    if (t->byte_fallback) {
        for (uint32_t i = 0; !rc && i < len; i++)
            rc = buf_put(&b->ids, &t->byte_id[(uint8_t)b->text[start + i]], sizeof(id));
    } else if (!b->prev_unk) {
        rc = buf_put(&b->ids, &id, sizeof(id));
    }
    b->prev_unk = 1;
    return rc;
}

/* The "resegment" step: an UNUSED piece is replaced, recursively, by the two symbols
 * it was last queued from. */
static int resegment(struct bpe *b, uint32_t start, uint32_t len)
{
    uint32_t item[2] = {start, len};
    int rc;
    if (!b->t->has_unused)
        return emit(b, start, len);
    b->stack.len = 0;
    if ((rc = buf_put(&b->stack, item, sizeof(item))))
        return rc;
    while (b->stack.len) {
        b->stack.len -= sizeof(item);
        memcpy(item, b->stack.p + b->stack.len, sizeof(item));
        int32_t id = cvlm_sp_lookup(b->t, b->text + item[0], item[1]);
        uint32_t left = id >= 0 && b->t->pieces[id].type == CVLM_SP_UNUSED ? rm_get(b, id) : 0;
        if (left == 0 || left >= item[1]) {
            if ((rc = emit(b, item[0], item[1])))
                return rc;
            continue;
        }
        uint32_t right[2] = {item[0] + left, item[1] - left}, lft[2] = {item[0], left};
        if ((rc = buf_put(&b->stack, right, sizeof(right))) ||
            (rc = buf_put(&b->stack, lft, sizeof(lft))))
            return rc;
    }
    return 0;
}

static int bpe_encode(struct bpe *b, size_t n)
{
    int rc;
    b->sym = malloc(n * sizeof(*b->sym));
    b->heap = malloc(3 * n * sizeof(*b->heap)); /* n-1 initial pairs + 2 per merge */
    if (!b->sym || !b->heap)
        return cvlm_errf(CVLM_ENOMEM, "tokenizer: out of memory encoding %zu bytes", n);
    int32_t n_sym = split_symbols(b, n);
    if ((rc = merge_all(b, n_sym)))
        return rc;
    for (int32_t i = 0; i >= 0; i = b->sym[i].next)
        if ((rc = resegment(b, b->sym[i].start, b->sym[i].len)))
            return rc;
    return 0;
}

int cvlm_tokenizer_encode(const struct cvlm_tokenizer *t, const char *text, size_t len,
                          int32_t **ids, size_t *n_ids)
{
    struct cvlm_buf norm = {0};
    struct bpe b = {.t = t};
    if (t->kind == CVLM_TOK_BYTE_BPE)
        return cvlm_bpe_encode(t->bpe, text, len, ids, n_ids);
    *ids = NULL;
    *n_ids = 0;
    int rc = normalize(t, (const uint8_t *)text, len, &norm);
    if (!rc && norm.len > INT32_MAX / 4)
        rc = cvlm_errf(CVLM_ETOOBIG, "tokenizer: input of %zu bytes is too long", len);
    if (!rc && norm.len) {
        b.text = norm.p;
        rc = bpe_encode(&b, norm.len);
    }
    free(norm.p);
    free(b.sym);
    free(b.heap);
    free(b.rm_id);
    free(b.rm_left);
    free(b.stack.p);
    if (rc) {
        free(b.ids.p);
        return rc;
    }
    *ids = (int32_t *)(void *)b.ids.p;
    *n_ids = b.ids.len / sizeof(int32_t);
    return 0;
}

int cvlm_tokenizer_min_ids(const struct cvlm_tokenizer *t, const char *text, size_t len,
                           size_t *out)
{
    struct cvlm_buf norm = {0};
    if (t->kind == CVLM_TOK_BYTE_BPE) {
        /* the text encoded is at least as long as the input (U+FFFD for an invalid byte
         * is longer) and each id covers at most max_bytes of it */
        size_t longest = t->bpe->max_bytes ? t->bpe->max_bytes : 1;
        *out = (len + longest - 1) / longest;
        return 0;
    }
    /* a byte-fallback or unknown piece covers one UTF-8 character: up to 4 bytes */
    size_t longest = t->max_piece_len > 4 ? t->max_piece_len : 4;
    int rc = normalize(t, (const uint8_t *)text, len, &norm);
    *out = 0;
    if (rc)
        return rc;
    *out = (norm.len + longest - 1) / longest;
    free(norm.p);
    return 0;
}

/* ---- decoding ---------------------------------------------------------------------- */

/* DecodeSentencePiece for a non-byte piece: its text, with the leading U+2581 dropped
 * when is_bos_ws. *bos_ws tells whether that happened (the rule then stops applying).
 * Returns the bytes dropped from the piece's decoded text (1 for the space, else 0). */
static int piece_text(const struct cvlm_tokenizer *t, int32_t id, int is_bos_ws, const char **s,
                      size_t *n, int *bos_ws)
{
    const struct cvlm_sp_piece *p = &t->pieces[id];
    *bos_ws = 0;
    if (p->type == CVLM_SP_CONTROL) {
        *s = "";
        *n = 0;
    } else if (p->type == CVLM_SP_UNKNOWN) {
        *s = t->unk_surface;
        *n = t->unk_surface_len;
    } else {
        *s = t->dec + p->dec_off;
        *n = p->dec_len;
        if (is_bos_ws && (t->add_dummy_prefix || t->remove_extra_ws) && p->lead_ws) {
            (*s)++;
            (*n)--;
            *bos_ws = !t->remove_extra_ws; /* with it, all leading U+2581 go */
            return 1;
        }
    }
    return 0;
}

size_t cvlm_tokenizer_piece_text(const struct cvlm_tokenizer *t, int32_t id, const char **s)
{
    size_t n;
    int bos_ws;
    if (t->kind == CVLM_TOK_BYTE_BPE)
        return cvlm_bpe_piece_text(t->bpe, id, s);
    *s = "";
    if (id < 0 || id >= t->n)
        return 0;
    if (t->pieces[id].type == CVLM_SP_BYTE) {
        *s = (const char *)&t->pieces[id].byte;
        return 1;
    }
    piece_text(t, id, 0, s, &n, &bos_ws);
    return n;
}

/* ProcessBytePieces: a run of raw bytes, U+FFFD for each byte that does not start a
 * well-formed sequence within the run. */
static int put_byte_run(struct cvlm_buf *out, const uint8_t *s, size_t n)
{
    int rc = 0;
    while (!rc && n) {
        int k = cvlm_utf8_scan(s, n);
        if (k <= 0) {
            rc = buf_put(out, FFFD, 3);
            k = 1;
        } else {
            rc = buf_put(out, s, (size_t)k);
        }
        s += k;
        n -= (size_t)k;
    }
    return rc;
}

static int decode_ids(const struct cvlm_tokenizer *t, const int32_t *ids, size_t n,
                      struct cvlm_buf *out, struct cvlm_buf *run)
{
    int rc, is_bos_ws = 1, bos_ws_seen = 0;
    for (size_t i = 0; i < n; i++) {
        const char *s;
        size_t sl;
        if (t->pieces[ids[i]].type == CVLM_SP_BYTE) {
            uint8_t byte = t->pieces[ids[i]].byte;
            if ((rc = buf_put(run, &byte, 1)))
                return rc;
            continue;
        }
        if ((rc = put_byte_run(out, (const uint8_t *)run->p, run->len)))
            return rc;
        run->len = 0;
        if (bos_ws_seen || out->len)
            is_bos_ws = 0;
        piece_text(t, ids[i], is_bos_ws, &s, &sl, &bos_ws_seen);
        if ((rc = buf_put(out, s, sl)))
            return rc;
    }
    return put_byte_run(out, (const uint8_t *)run->p, run->len);
}

int cvlm_tokenizer_decode(const struct cvlm_tokenizer *t, const int32_t *ids, size_t n, char **text,
                          size_t *len)
{
    struct cvlm_buf out = {0}, run = {0};
    if (t->kind == CVLM_TOK_BYTE_BPE)
        return cvlm_bpe_decode(t->bpe, ids, n, text, len);
    *text = NULL;
    *len = 0;
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= t->n)
            return cvlm_errf(CVLM_EINVAL,
                             "tokenizer: id %d at position %zu is out of range "
                             "(vocabulary of %d)",
                             ids[i], i, t->n);
    int rc = decode_ids(t, ids, n, &out, &run);
    if (!rc)
        rc = buf_put(&out, "", 1); /* NUL */
    free(run.p);
    if (rc) {
        free(out.p);
        return rc;
    }
    *text = out.p;
    *len = out.len - 1;
    return 0;
}

/* ---- incremental detokenizer --------------------------------------------------------- */

void cvlm_detok_init(struct cvlm_detok *d, const struct cvlm_tokenizer *tok)
{
    memset(d, 0, sizeof(*d));
    d->tok = tok;
}

/* Emits the held-back bytes as U+FFFD each: they are a proper prefix of a sequence that
 * the next non-byte piece (or the end) cuts short, which decode treats the same way. */
static size_t put_pending(struct cvlm_detok *d, char *out)
{
    size_t n = 0;
    for (int i = 0; i < d->n_pend; i++, n += 3)
        memcpy(out + n, FFFD, 3);
    d->n_pend = 0;
    return n;
}

/* A byte piece: appends the byte to the held-back ones and emits every sequence that is
 * now decided (complete, or certainly invalid). */
static int push_byte(struct cvlm_detok *d, uint8_t byte, char *out, size_t cap, size_t *n)
{
    uint8_t pend[sizeof(d->pend) + 1];
    char tmp[4 * 3 + 1];
    size_t m = (size_t)d->n_pend, k = 0, at = 0;
    memcpy(pend, d->pend, m);
    pend[m++] = byte;
    while (at < m) {
        int c = cvlm_utf8_scan(pend + at, m - at);
        if (c == 0)
            break; /* an incomplete, still possible sequence: hold it back */
        if (c < 0) {
            memcpy(tmp + k, FFFD, 3);
            k += 3;
            c = 1;
        } else {
            memcpy(tmp + k, pend + at, (size_t)c);
            k += (size_t)c;
        }
        at += (size_t)c;
    }
    if (k + 1 > cap)
        return cvlm_errf(CVLM_ETOOBIG, "detok: output buffer of %zu bytes is too small", cap);
    memcpy(out, tmp, k);
    out[k] = '\0';
    *n = k;
    d->n_pend = (int)(m - at);
    memmove(d->pend, pend + at, m - at);
    d->started = 1; /* the byte run will produce text before any later piece */
    return 0;
}

int cvlm_detok_push(struct cvlm_detok *d, int32_t id, char *out, size_t cap, size_t *n)
{
    const struct cvlm_tokenizer *t = d->tok;
    const char *s;
    size_t sl;
    int bos_ws;
    int strip;
    if (t->kind == CVLM_TOK_BYTE_BPE)
        return cvlm_bpe_detok_push(d, t->bpe, id, out, cap, n);
    *n = 0;
    if (id < 0 || id >= t->n)
        return cvlm_errf(CVLM_EINVAL, "detok: id %d is out of range (vocabulary of %d)", id, t->n);
    d->last_strip = 0;
    if (t->pieces[id].type == CVLM_SP_BYTE)
        return push_byte(d, t->pieces[id].byte, out, cap, n);
    strip = piece_text(t, id, !d->started, &s, &sl, &bos_ws);
    if ((size_t)d->n_pend * 3 + sl + 1 > cap)
        return cvlm_errf(CVLM_ETOOBIG,
                         "detok: output buffer of %zu bytes is too small for "
                         "piece %d",
                         cap, id);
    size_t k = put_pending(d, out);
    memcpy(out + k, s, sl);
    k += sl;
    out[k] = '\0';
    *n = k;
    d->last_strip = strip;
    if (sl || bos_ws)
        d->started = 1;
    return 0;
}

int cvlm_detok_flush(struct cvlm_detok *d, char *out, size_t cap, size_t *n)
{
    if (d->tok->kind == CVLM_TOK_BYTE_BPE)
        return cvlm_bpe_detok_flush(d, out, cap, n);
    *n = 0;
    if ((size_t)d->n_pend * 3 + 1 > cap)
        return cvlm_errf(CVLM_ETOOBIG, "detok: output buffer of %zu bytes is too small", cap);
    *n = put_pending(d, out);
    out[*n] = '\0';
    return 0;
}
