/* bpe.c - byte-level BPE on the tables of bpe_load.c: encode, decode, streaming detok.
 *
 *   encode  the text as valid UTF-8 (one U+FFFD per maximal invalid subpart: a caller's
 *           bytes are never refused), ' ' prepended if add_prefix_space and it lacks one,
 *           split by the pre-tokenizer pattern into chunks (the matches and the gaps
 *           between them, each a chunk: HF's "Isolated"), and each chunk's bytes turned
 *           into ids: the chunk's own token when ignore_merges and the vocab has it, else
 *           BPE from single bytes, always merging the adjacent pair of lowest rank (the
 *           leftmost of equals) through a min-heap of (rank, position) with stale entries
 *           skipped when popped. Added tokens are not looked for in the text: text that
 *           spells "<|eot_id|>" is encoded as the characters it is.
 *   decode  bytes of every id (special ids: none), then UTF-8 with U+FFFD for each
 *           maximal invalid subpart (bpe.h).
 *   detok   the same, incrementally: held back are at most 3 bytes of a sequence that the
 *           next id may complete; each push emits only whole, decided sequences.
 * Everything here reads the tokenizer const; per-call state lives on the stack / heap of
 * the call, so any number of threads may encode at once.
 */
#include "engine/text/bpe.h"
#include "engine/text/utf8.h"

#include <stdlib.h>
#include <string.h>

#include "base/buf.h"
#include "engine/error.h"

#define FFFD "\xef\xbf\xbd" /* U+FFFD REPLACEMENT CHARACTER */

static int oom(void)
{
    return cvlm_errf(CVLM_ENOMEM, "tokenizer: out of memory");
}

/* Appends s[0..n) to out as UTF-8: valid runs as they are, one U+FFFD per maximal
 * invalid subpart and for an incomplete sequence at the end. */
static int put_lossy(struct cvlm_buf *out, const uint8_t *s, size_t n)
{
    size_t run = 0, at = 0;
    if (!n)
        return 0; /* s may be NULL */
    while (at < n) {
        int c = cvlm_utf8_scan(s + at, n - at);
        if (c > 0) {
            at += (size_t)c;
            continue;
        }
        if (cvlm_buf_append(out, s + run, at - run) || cvlm_buf_append(out, FFFD, 3))
            return oom();
        at += c < 0 ? (size_t)-c : n - at;
        run = at;
    }
    return cvlm_buf_append(out, s + run, at - run) ? oom() : 0;
}

/* ---- encoding ---------------------------------------------------------------------- */

struct sym {
    int32_t id;         /* -1: merged into the symbol on its left */
    int32_t prev, next; /* live neighbours, -1 at the ends */
};

struct enc {
    const struct cvlm_bpe *b;
    struct cvlm_buf ids;
    struct sym *sym;
    uint64_t *heap; /* min-heap of rank << 32 | position of the pair's left symbol */
    size_t cap;     /* symbols sym and heap (3 per symbol) have room for */
    size_t n_heap;
    pcre2_match_data *md;
    pcre2_match_context *mctx; /* with a large JIT stack, made when the default overflows */
    pcre2_jit_stack *jstack;
};

static int put_id(struct enc *e, int32_t id)
{
    return cvlm_buf_append(&e->ids, &id, sizeof(id)) ? oom() : 0;
}

static void heap_push(struct enc *e, uint64_t v)
{
    size_t i = e->n_heap++;
    while (i > 0 && e->heap[(i - 1) / 2] > v) {
        e->heap[i] = e->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    e->heap[i] = v;
}

static uint64_t heap_pop(struct enc *e)
{
    uint64_t top = e->heap[0], last = e->heap[--e->n_heap];
    size_t i = 0, n = e->n_heap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && e->heap[c + 1] < e->heap[c])
            c++;
        if (e->heap[c] >= last)
            break;
        e->heap[i] = e->heap[c];
        i = c;
    }
    if (n)
        e->heap[i] = last;
    return top;
}

/* Queues the pair (pos, its right neighbour) if the two tokens merge. */
static void queue_pair(struct enc *e, int32_t pos)
{
    const struct cvlm_bpe_merge *m =
        cvlm_bpe_find_merge(e->b, e->sym[pos].id, e->sym[e->sym[pos].next].id);
    if (m)
        heap_push(e, (uint64_t)(uint32_t)m->rank << 32 | (uint32_t)pos);
}

static int reserve_syms(struct enc *e, size_t n)
{
    if (n <= e->cap)
        return 0;
    size_t cap = 2 * e->cap > n ? 2 * e->cap : n < 64 ? 64 : n;
    struct sym *s = realloc(e->sym, cap * sizeof(*s));
    if (s)
        e->sym = s;
    uint64_t *h = realloc(e->heap, 3 * cap * sizeof(*h)); /* n-1 pairs + 2 per merge */
    if (h)
        e->heap = h;
    if (!s || !h)
        return oom();
    e->cap = cap;
    return 0;
}

/* BPE over the bytes of one chunk: single-byte tokens, merged by lowest rank. */
static int merge_chunk(struct enc *e, const uint8_t *s, size_t n)
{
    int rc;
    if ((rc = reserve_syms(e, n)))
        return rc;
    struct sym *sym = e->sym;
    for (size_t i = 0; i < n; i++)
        sym[i] = (struct sym){e->b->byte_id[s[i]], (int32_t)i - 1, (int32_t)i + 1};
    sym[n - 1].next = -1;
    e->n_heap = 0;
    for (size_t i = 0; i + 1 < n; i++)
        queue_pair(e, (int32_t)i);
    while (e->n_heap) {
        uint64_t top = heap_pop(e);
        int32_t pos = (int32_t)(uint32_t)top, rank = (int32_t)(top >> 32);
        struct sym *l = &sym[pos];
        if (l->id < 0 || l->next < 0)
            continue; /* merged away, or its right neighbour was */
        struct sym *r = &sym[l->next];
        const struct cvlm_bpe_merge *m = cvlm_bpe_find_merge(e->b, l->id, r->id);
        if (!m || m->rank != rank)
            continue; /* stale: the pair it was queued for no longer exists */
        l->id = m->id;
        l->next = r->next;
        r->id = -1;
        if (l->next >= 0)
            sym[l->next].prev = pos;
        if (l->prev >= 0)
            queue_pair(e, l->prev);
        if (l->next >= 0)
            queue_pair(e, pos);
    }
    for (int32_t i = 0; i >= 0; i = sym[i].next) /* symbol 0 is never merged away */
        if ((rc = put_id(e, sym[i].id)))
            return rc;
    return 0;
}

static int encode_chunk(struct enc *e, const char *s, size_t n)
{
    const struct cvlm_bpe *b = e->b;
    if (n == 1)
        return put_id(e, b->byte_id[(uint8_t)s[0]]);
    if (b->ignore_merges && n <= b->max_bytes) {
        int32_t id = cvlm_bpe_lookup(b, BPE_BYTES, s, n);
        if (id >= 0)
            return put_id(e, id);
    }
    return merge_chunk(e, (const uint8_t *)s, n);
}

/* pcre2_match from `from`; on a JIT stack overflow, once more with a stack of up to
 * 64 MiB (the default 32 KiB suffices for LLaMA-3's pattern on any text seen so far). */
static int match_at(struct enc *e, const char *s, size_t n, size_t from)
{
    int rc = pcre2_match(e->b->re, (PCRE2_SPTR)s, n, from, PCRE2_NO_UTF_CHECK, e->md, e->mctx);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT && !e->jstack) {
        e->jstack = pcre2_jit_stack_create(256 * 1024, 64 << 20, NULL);
        e->mctx = pcre2_match_context_create(NULL);
        if (!e->jstack || !e->mctx)
            return oom();
        pcre2_jit_stack_assign(e->mctx, NULL, e->jstack);
        rc = pcre2_match(e->b->re, (PCRE2_SPTR)s, n, from, PCRE2_NO_UTF_CHECK, e->md, e->mctx);
    }
    if (rc >= 0 || rc == PCRE2_ERROR_NOMATCH)
        return rc;
    PCRE2_UCHAR msg[160];
    pcre2_get_error_message(rc, msg, sizeof(msg));
    return cvlm_errf(CVLM_ETOOBIG, "tokenizer: the pre-tokenizer pattern failed at byte %zu: %s",
                     from, (const char *)msg);
}

/* Splits valid UTF-8 s[0..n) into chunks, the matches of the pattern and the gaps between
 * them, and encodes each. An empty match splits nothing (the search moves one character
 * on). */
static int split_encode(struct enc *e, const char *s, size_t n)
{
    size_t gap = 0, from = 0;
    int rc;
    if (!e->b->re)
        return encode_chunk(e, s, n);
    if (!(e->md = pcre2_match_data_create_from_pattern(e->b->re, NULL)))
        return oom();
    while (from < n) {
        if ((rc = match_at(e, s, n, from)) == PCRE2_ERROR_NOMATCH)
            break;
        if (rc < 0)
            return rc;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md);
        size_t ms = ov[0], me = ov[1];
        if (ms < from || me < ms || me > n)
            return cvlm_errf(CVLM_EINVAL,
                             "tokenizer: the pre-tokenizer pattern matched "
                             "[%zu, %zu) searching from %zu",
                             ms, me, from);
        if (me == ms) {
            from = ms + 1;
            while (from < n && ((uint8_t)s[from] & 0xc0) == 0x80)
                from++;
            continue;
        }
        if ((ms > gap && (rc = encode_chunk(e, s + gap, ms - gap))) ||
            (rc = encode_chunk(e, s + ms, me - ms)))
            return rc;
        gap = from = me;
    }
    return gap < n ? encode_chunk(e, s + gap, n - gap) : 0;
}

/* The text to pre-tokenize: valid UTF-8, with the prefix space if the model asks for it.
 * The input itself when it needs neither (*s points at it), else a copy in `copy`. */
static int prepare(const struct cvlm_bpe *b, const char *text, size_t len, struct cvlm_buf *copy,
                   const char **s, size_t *n)
{
    const uint8_t *u = (const uint8_t *)text;
    size_t at = 0;
    int c = 1;
    while (at < len && (c = cvlm_utf8_scan(u + at, len - at)) > 0)
        at += (size_t)c;
    int prefix = b->add_prefix_space && len && text[0] != ' ';
    *s = text;
    *n = len;
    if (at == len && !prefix)
        return 0;
    if (cvlm_buf_reserve(copy, len + 1) || (prefix && cvlm_buf_append(copy, " ", 1)) ||
        cvlm_buf_append(copy, text, at))
        return oom();
    int rc = put_lossy(copy, u + at, len - at);
    *s = copy->p;
    *n = copy->len;
    return rc;
}

int cvlm_bpe_encode(const struct cvlm_bpe *b, const char *text, size_t len, int32_t **ids,
                    size_t *n_ids)
{
    struct cvlm_buf copy = {0};
    struct enc e = {.b = b};
    const char *s;
    size_t n;
    int rc = 0;
    *ids = NULL;
    *n_ids = 0;
    if (len > INT32_MAX / 4)
        return cvlm_errf(CVLM_ETOOBIG, "tokenizer: input of %zu bytes is too long", len);
    if (len && !(rc = prepare(b, text, len, &copy, &s, &n)))
        rc = split_encode(&e, s, n);
    cvlm_buf_free(&copy);
    free(e.sym);
    free(e.heap);
    pcre2_match_data_free(e.md);
    pcre2_match_context_free(e.mctx);
    pcre2_jit_stack_free(e.jstack);
    if (rc) {
        cvlm_buf_free(&e.ids);
        return rc;
    }
    *ids = (int32_t *)(void *)e.ids.p;
    *n_ids = e.ids.len / sizeof(int32_t);
    return 0;
}

/* ---- decoding ---------------------------------------------------------------------- */

size_t cvlm_bpe_piece_text(const struct cvlm_bpe *b, int32_t id, const char **s)
{
    *s = "";
    if (id < 0 || id >= b->n || !b->toks[id].present || b->toks[id].special)
        return 0;
    *s = b->strs + b->toks[id].off[BPE_BYTES];
    return b->toks[id].len[BPE_BYTES];
}

static int out_of_range(int32_t id, size_t at, int32_t n)
{
    return cvlm_errf(CVLM_EINVAL,
                     "tokenizer: id %d at position %zu is out of range "
                     "(vocabulary of %d)",
                     id, at, n);
}

int cvlm_bpe_decode(const struct cvlm_bpe *b, const int32_t *ids, size_t n, char **text,
                    size_t *len)
{
    struct cvlm_buf raw = {0}, out = {0};
    const char *s;
    int rc = 0;
    *text = NULL;
    *len = 0;
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= b->n)
            return out_of_range(ids[i], i, b->n);
    for (size_t i = 0; i < n && !rc; i++) {
        size_t k = cvlm_bpe_piece_text(b, ids[i], &s);
        rc = cvlm_buf_append(&raw, s, k) ? oom() : 0;
    }
    if (!rc)
        rc = put_lossy(&out, (const uint8_t *)raw.p, raw.len);
    cvlm_buf_free(&raw);
    if (!rc && !(*text = cvlm_buf_take(&out, len)))
        rc = oom();
    cvlm_buf_free(&out);
    return rc;
}

/* ---- incremental detokenizer --------------------------------------------------------- */

/* A bounded output: writes past cap are dropped and remembered (the push then fails
 * without consuming anything). */
struct out {
    char *p;
    size_t cap, len;
    int over;
};

static void out_put(struct out *o, const void *s, size_t n)
{
    if (o->over || o->len + n + 1 > o->cap) {
        o->over = 1;
        return;
    }
    memcpy(o->p + o->len, s, n);
    o->len += n;
}

/* Emits the decided prefix of s[0..n) and returns how many bytes at its end are held
 * back: a proper prefix of a well-formed sequence (at most 3). */
static size_t emit_lossy(struct out *o, const uint8_t *s, size_t n)
{
    size_t run = 0, at = 0;
    while (at < n) {
        int c = cvlm_utf8_scan(s + at, n - at);
        if (c > 0) {
            at += (size_t)c;
            continue;
        }
        out_put(o, s + run, at - run);
        if (c == 0)
            return n - at;
        out_put(o, FFFD, 3);
        at += (size_t)-c;
        run = at;
    }
    out_put(o, s + run, at - run);
    return 0;
}

int cvlm_bpe_detok_push(struct cvlm_detok *d, const struct cvlm_bpe *b, int32_t id, char *out,
                        size_t cap, size_t *n)
{
    struct out o = {out, cap, 0, 0};
    uint8_t head[8];
    const char *str;
    size_t hn = (size_t)d->n_pend, take = 0;
    *n = 0;
    if (id < 0 || id >= b->n)
        return cvlm_errf(CVLM_EINVAL, "detok: id %d is out of range (vocabulary of %d)", id, b->n);
    size_t sn = cvlm_bpe_piece_text(b, id, &str);
    const uint8_t *s = (const uint8_t *)str;
    memcpy(head, d->pend, hn);
    /* complete, or refute, the held-back sequence with the first bytes of this token; the
     * held bytes are a well-formed prefix, so a refuting byte comes from s and is read
     * again below */
    while (hn && take < sn) {
        head[hn++] = s[take++];
        int c = cvlm_utf8_scan(head, hn);
        if (c == 0)
            continue;
        out_put(&o, c > 0 ? (const void *)head : FFFD, c > 0 ? (size_t)c : 3);
        take -= c > 0 ? 0 : hn - (size_t)-c;
        hn = 0;
    }
    size_t keep = hn ? 0 : emit_lossy(&o, s + take, sn - take);
    if (o.over || cap == 0)
        return cvlm_errf(CVLM_ETOOBIG,
                         "detok: output buffer of %zu bytes is too small for "
                         "token %d",
                         cap, id);
    if (!hn)
        memcpy(head, s + sn - keep, keep);
    d->n_pend = (int)(hn ? hn : keep);
    memcpy(d->pend, head, (size_t)d->n_pend);
    d->last_strip = 0;
    d->started = 1;
    out[o.len] = '\0';
    *n = o.len;
    return 0;
}

int cvlm_bpe_detok_flush(struct cvlm_detok *d, char *out, size_t cap, size_t *n)
{
    *n = 0;
    if (cap < 4)
        return cvlm_errf(CVLM_ETOOBIG, "detok: output buffer of %zu bytes is too small", cap);
    if (d->n_pend) { /* a sequence cut short by the end: one U+FFFD, as decode writes */
        memcpy(out, FFFD, 3);
        *n = 3;
    }
    d->n_pend = 0;
    out[*n] = '\0';
    return 0;
}
