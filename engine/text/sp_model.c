/* sp_model.c - reads a SentencePiece model file into struct cvlm_tokenizer (sp_model.h).
 *
 * Two stages. (1) A protobuf wire-format reader fills struct proto_model with the fields
 * of ModelProto that matter; field numbers follow sentencepiece_model.proto: follow
 * sentencepiece_model.proto: ModelProto      pieces=1 trainer_spec=2 normalizer_spec=3
 * denormalizer_spec=5 SentencePiece   piece=1 (string) score=2 (float) type=3 (enum) TrainerSpec
 * model_type=3 treat_whitespace_as_suffix=24 byte_fallback=35 unk_surface=44 unk_piece=45
 * bos_piece=46 eos_piece=47 pad_piece=48 NormalizerSpec  name=1 precompiled_charsmap=2
 * add_dummy_prefix=3 remove_extra_whitespaces=4 escape_whitespaces=5 Unknown fields are skipped. A
 * sub-message that appears twice is merged the protobuf way (later scalar values win) because both
 * occurrences are parsed into the same struct. Every read is bounds-checked against the end of the
 * enclosing message; any violation is CVLM_EFORMAT with the absolute byte offset in the detail. (2)
 * Validation (what SentencePiece's ModelInterface::InitializePieces checks, plus: no duplicate
 * strings of any type, pieces are valid UTF-8, BPE only) and the lookup tables. A file is either
 * rejected with a detail or yields tables on which encode/decode cannot go out of bounds.
 */
#include "engine/text/sp_model.h"
#include "engine/text/utf8.h"

#include <stdlib.h>
#include <string.h>

#include "engine/error.h"

/* TrainerSpec.ModelType */
enum { MODEL_UNIGRAM = 1, MODEL_BPE = 2, MODEL_WORD = 3, MODEL_CHAR = 4 };

/* A byte string owned by the parsed proto (NUL-terminated; may contain NULs). `set` tells
 * an absent field (use the proto default) from an empty one. */
struct proto_str {
    char *s;
    size_t len;
    int set;
};

struct proto_piece {
    uint32_t off; /* into the input while parsing, then into proto_model.strs */
    uint32_t len;
    float score;
    int type; /* CVLM_SP_* */
};

struct proto_norm {
    struct proto_str name;
    struct proto_str charsmap; /* precompiled_charsmap, empty for identity */
    int add_dummy_prefix;      /* proto defaults: true, true, true */
    int remove_extra_whitespaces;
    int escape_whitespaces;
};

/* The fields of ModelProto that the tokenizer uses. */
struct proto_model {
    struct proto_piece *pieces; /* index = id */
    size_t n_pieces;
    char *strs; /* all piece strings back to back, each NUL-terminated */
    int model_type;
    int byte_fallback;
    int treat_whitespace_as_suffix;
    struct proto_str unk_piece, bos_piece, eos_piece, pad_piece, unk_surface;
    struct proto_norm normalizer;   /* ModelProto.normalizer_spec */
    struct proto_norm denormalizer; /* ModelProto.denormalizer_spec */
};

#define MAX_PIECES (1u << 24) /* far above any real vocabulary, keeps ids in int32 */
#define WS "\xe2\x96\x81"     /* U+2581, SentencePiece's whitespace symbol */
#define WS_LEN 3
#define DEFAULT_UNK_SURFACE " \xe2\x81\x87 " /* kDefaultUnknownSymbol, U+2047 */

enum { WT_VARINT = 0, WT_I64 = 1, WT_LEN = 2, WT_I32 = 5 };

/* A window [p, end) of the input; base is the start of the whole buffer (for offsets). */
struct pb {
    const uint8_t *p, *end, *base;
};

static size_t pb_off(const struct pb *r)
{
    return (size_t)(r->p - r->base);
}

static int pb_varint(struct pb *r, uint64_t *v)
{
    uint64_t x = 0;
    size_t start = pb_off(r);
    for (int shift = 0; shift < 70; shift += 7) {
        if (r->p >= r->end)
            return cvlm_errf(CVLM_EFORMAT, "tokenizer model: truncated varint at byte %zu", start);
        uint8_t b = *r->p++;
        x |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = x;
            return 0;
        }
    }
    return cvlm_errf(CVLM_EFORMAT, "tokenizer model: varint longer than 10 bytes at byte %zu",
                     start);
}

/* Reads a field key. Returns 1 with the field number and wire type set, 0 at the end of the window,
 * or <0. */
static int pb_key(struct pb *r, uint32_t *field, int *wt)
{
    uint64_t k;
    *field = 0;
    *wt = 0;
    if (r->p >= r->end)
        return 0;
    size_t at = pb_off(r);
    int rc = pb_varint(r, &k);
    if (rc)
        return rc;
    if ((k >> 3) == 0 || (k >> 3) > 0x1fffffff)
        return cvlm_errf(CVLM_EFORMAT, "tokenizer model: bad field number at byte %zu", at);
    *field = (uint32_t)(k >> 3);
    *wt = (int)(k & 7);
    return 1;
}

static int pb_bytes(struct pb *r, struct pb *sub)
{
    uint64_t n;
    size_t at = pb_off(r);
    int rc = pb_varint(r, &n);
    if (rc)
        return rc;
    if (n > (uint64_t)(r->end - r->p))
        return cvlm_errf(CVLM_EFORMAT,
                         "tokenizer model: length %llu at byte %zu runs past the end of its "
                         "message (%zu bytes left)",
                         (unsigned long long)n, at, (size_t)(r->end - r->p));
    sub->p = r->p;
    sub->end = r->p + n;
    sub->base = r->base;
    r->p += n;
    return 0;
}

static int pb_fixed(struct pb *r, size_t n, uint8_t *out)
{
    if ((size_t)(r->end - r->p) < n)
        return cvlm_errf(CVLM_EFORMAT, "tokenizer model: truncated fixed%zu at byte %zu", n * 8,
                         pb_off(r));
    if (out)
        memcpy(out, r->p, n);
    r->p += n;
    return 0;
}

static int pb_skip(struct pb *r, uint32_t field, int wt)
{
    uint64_t v;
    struct pb sub;
    switch (wt) {
    case WT_VARINT: return pb_varint(r, &v);
    case WT_I64: return pb_fixed(r, 8, NULL);
    case WT_LEN: return pb_bytes(r, &sub);
    case WT_I32: return pb_fixed(r, 4, NULL);
    default:
        return cvlm_errf(CVLM_EFORMAT,
                         "tokenizer model: field %u has unsupported wire type %d at byte %zu",
                         field, wt, pb_off(r));
    }
}

static int want_wt(const struct pb *r, uint32_t field, int wt, int want)
{
    if (wt == want)
        return 0;
    return cvlm_errf(CVLM_EFORMAT,
                     "tokenizer model: field %u has wire type %d, expected %d (byte %zu)", field,
                     wt, want, pb_off(r));
}

/* Reads a varint field (checking its wire type) into *v. */
static int pb_field_varint(struct pb *r, uint32_t field, int wt, uint64_t *v)
{
    int rc = want_wt(r, field, wt, WT_VARINT);
    return rc ? rc : pb_varint(r, v);
}

/* Replaces *dst with a NUL-terminated copy of a length-delimited field. */
static int pb_field_str(struct pb *r, uint32_t field, int wt, struct proto_str *dst)
{
    struct pb sub;
    int rc = want_wt(r, field, wt, WT_LEN);
    if (!rc)
        rc = pb_bytes(r, &sub);
    if (rc)
        return rc;
    size_t n = (size_t)(sub.end - sub.p);
    char *s = malloc(n + 1);
    if (!s)
        return cvlm_errf(CVLM_ENOMEM, "tokenizer model: out of memory");
    memcpy(s, sub.p, n);
    s[n] = '\0';
    free(dst->s);
    dst->s = s;
    dst->len = n;
    dst->set = 1;
    return 0;
}

static void str_free(struct proto_str *s)
{
    free(s->s);
    memset(s, 0, sizeof(*s));
}

/* ModelProto.SentencePiece -> a piece whose `off` is, for now, an offset into the input
 * buffer (parse_model rewrites it into the owned string table). */
static int parse_piece(struct pb *r, struct proto_piece *pc)
{
    uint32_t field = 0;
    int wt = 0, rc;
    uint64_t v;
    struct pb sub;
    size_t start = pb_off(r);

    pc->off = 0;
    pc->len = 0;
    pc->score = 0.0f;
    pc->type = CVLM_SP_NORMAL;
    int have_piece = 0;
    while ((rc = pb_key(r, &field, &wt)) == 1) {
        if (field == 1) {
            if ((rc = want_wt(r, field, wt, WT_LEN)) || (rc = pb_bytes(r, &sub)))
                return rc;
            pc->off = (uint32_t)(sub.p - sub.base);
            pc->len = (uint32_t)(sub.end - sub.p);
            have_piece = 1;
        } else if (field == 2) {
            uint8_t b[4] = {0};
            uint32_t u;
            if ((rc = want_wt(r, field, wt, WT_I32)) || (rc = pb_fixed(r, 4, b)))
                return rc;
            u = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
            memcpy(&pc->score, &u, 4);
        } else if (field == 3) {
            size_t at = pb_off(r);
            if ((rc = pb_field_varint(r, field, wt, &v)))
                return rc;
            if (v < CVLM_SP_NORMAL || v > CVLM_SP_BYTE)
                return cvlm_errf(CVLM_EFORMAT,
                                 "tokenizer model: unknown piece type %llu at byte %zu",
                                 (unsigned long long)v, at);
            pc->type = (int)v;
        } else if ((rc = pb_skip(r, field, wt))) {
            return rc;
        }
    }
    if (rc < 0)
        return rc;
    if (!have_piece)
        return cvlm_errf(CVLM_EFORMAT, "tokenizer model: piece without a string at byte %zu",
                         start);
    return 0;
}

static int parse_trainer(struct pb *r, struct proto_model *m)
{
    uint32_t field = 0;
    int wt = 0, rc;
    uint64_t v;

    while ((rc = pb_key(r, &field, &wt)) == 1) {
        switch (field) {
        case 3:
            rc = pb_field_varint(r, field, wt, &v);
            m->model_type = v > 1000 ? 1000 : (int)v; /* anything unknown is unsupported */
            break;
        case 24:
            rc = pb_field_varint(r, field, wt, &v);
            m->treat_whitespace_as_suffix = v != 0;
            break;
        case 35:
            rc = pb_field_varint(r, field, wt, &v);
            m->byte_fallback = v != 0;
            break;
        case 44: rc = pb_field_str(r, field, wt, &m->unk_surface); break;
        case 45: rc = pb_field_str(r, field, wt, &m->unk_piece); break;
        case 46: rc = pb_field_str(r, field, wt, &m->bos_piece); break;
        case 47: rc = pb_field_str(r, field, wt, &m->eos_piece); break;
        case 48: rc = pb_field_str(r, field, wt, &m->pad_piece); break;
        default: rc = pb_skip(r, field, wt);
        }
        if (rc)
            return rc;
    }
    return rc;
}

static int parse_normalizer(struct pb *r, struct proto_norm *n)
{
    uint32_t field = 0;
    int wt = 0, rc;
    uint64_t v;

    while ((rc = pb_key(r, &field, &wt)) == 1) {
        switch (field) {
        case 1: rc = pb_field_str(r, field, wt, &n->name); break;
        case 2: rc = pb_field_str(r, field, wt, &n->charsmap); break;
        case 3:
            rc = pb_field_varint(r, field, wt, &v);
            n->add_dummy_prefix = v != 0;
            break;
        case 4:
            rc = pb_field_varint(r, field, wt, &v);
            n->remove_extra_whitespaces = v != 0;
            break;
        case 5:
            rc = pb_field_varint(r, field, wt, &v);
            n->escape_whitespaces = v != 0;
            break;
        default: rc = pb_skip(r, field, wt);
        }
        if (rc)
            return rc;
    }
    return rc;
}

static void normalizer_defaults(struct proto_norm *n)
{
    memset(n, 0, sizeof(*n));
    n->add_dummy_prefix = 1;
    n->remove_extra_whitespaces = 1;
    n->escape_whitespaces = 1;
}

static int add_piece(struct proto_model *m, size_t *cap, struct pb *sub)
{
    if (m->n_pieces == *cap) {
        if (*cap >= MAX_PIECES)
            return cvlm_errf(CVLM_ETOOBIG, "tokenizer model: more than %u pieces", MAX_PIECES);
        size_t nc = *cap ? *cap * 2 : 1024;
        struct proto_piece *np = realloc(m->pieces, nc * sizeof(*np));
        if (!np)
            return cvlm_errf(CVLM_ENOMEM, "tokenizer model: out of memory");
        m->pieces = np;
        *cap = nc;
    }
    int rc = parse_piece(sub, &m->pieces[m->n_pieces]);
    if (rc)
        return rc;
    m->n_pieces++;
    return 0;
}

/* Copies the piece strings (still offsets into `base`) into one owned table. */
static int own_strings(struct proto_model *m, const uint8_t *base)
{
    size_t total = 0;
    for (size_t i = 0; i < m->n_pieces; i++)
        total += (size_t)m->pieces[i].len + 1;
    if (total > UINT32_MAX)
        return cvlm_errf(CVLM_ETOOBIG, "tokenizer model: piece strings too large");
    m->strs = malloc(total ? total : 1);
    if (!m->strs)
        return cvlm_errf(CVLM_ENOMEM, "tokenizer model: out of memory");
    size_t at = 0;
    for (size_t i = 0; i < m->n_pieces; i++) {
        struct proto_piece *pc = &m->pieces[i];
        memcpy(m->strs + at, base + pc->off, pc->len);
        m->strs[at + pc->len] = '\0';
        pc->off = (uint32_t)at;
        at += (size_t)pc->len + 1;
    }
    return 0;
}

static int parse_top(struct pb *r, struct proto_model *m)
{
    uint32_t field = 0;
    int wt = 0, rc;
    size_t cap = 0;
    struct pb sub;

    while ((rc = pb_key(r, &field, &wt)) == 1) {
        if (field == 1 || field == 2 || field == 3 || field == 5) {
            if ((rc = want_wt(r, field, wt, WT_LEN)) || (rc = pb_bytes(r, &sub)))
                return rc;
            if (field == 1)
                rc = add_piece(m, &cap, &sub);
            else if (field == 2)
                rc = parse_trainer(&sub, m);
            else if (field == 3)
                rc = parse_normalizer(&sub, &m->normalizer);
            else
                rc = parse_normalizer(&sub, &m->denormalizer);
        } else {
            rc = pb_skip(r, field, wt);
        }
        if (rc)
            return rc;
    }
    return rc;
}

static void proto_free(struct proto_model *m);

static int proto_parse(const void *data, size_t len, struct proto_model *m)
{
    memset(m, 0, sizeof(*m));
    m->model_type = MODEL_UNIGRAM;
    normalizer_defaults(&m->normalizer);
    normalizer_defaults(&m->denormalizer);
    if (len > INT32_MAX) {
        proto_free(m);
        return cvlm_errf(CVLM_ETOOBIG, "tokenizer model: %zu bytes is too large", len);
    }

    struct pb r = {data, (const uint8_t *)data + len, data};
    int rc = len ? parse_top(&r, m) : 0;
    if (!rc)
        rc = own_strings(m, data);
    if (rc)
        proto_free(m);
    return rc;
}

static void proto_free(struct proto_model *m)
{
    free(m->pieces);
    free(m->strs);
    str_free(&m->unk_piece);
    str_free(&m->bos_piece);
    str_free(&m->eos_piece);
    str_free(&m->pad_piece);
    str_free(&m->unk_surface);
    str_free(&m->normalizer.name);
    str_free(&m->normalizer.charsmap);
    str_free(&m->denormalizer.name);
    str_free(&m->denormalizer.charsmap);
    memset(m, 0, sizeof(*m));
}

/* ---- validation and tables ---------------------------------------------------------- */

static int utf8_valid(const char *s, size_t n)
{
    const uint8_t *p = (const uint8_t *)s;
    while (n) {
        int k = cvlm_utf8_scan(p, n);
        if (k <= 0)
            return 0;
        p += k;
        n -= (size_t)k;
    }
    return 1;
}

/* "<0xXX>" (upper-case hex, as SentencePiece's ByteToPiece writes it) -> 0..255, else -1. */
static int piece_to_byte(const char *s, size_t n)
{
    static const char hex[] = "0123456789ABCDEF";
    if (n != 6 || memcmp(s, "<0x", 3) || s[5] != '>')
        return -1;
    const char *a = memchr(hex, s[3], 16), *b = memchr(hex, s[4], 16);
    if (!a || !b || !s[3] || !s[4])
        return -1;
    return (int)(a - hex) * 16 + (int)(b - hex);
}

/* Checks one piece and records it in the unk/byte bookkeeping. */
static int check_piece(struct cvlm_tokenizer *t, const struct proto_model *m, int32_t i)
{
    const struct proto_piece *p = &m->pieces[i];
    const char *s = t->strs + p->off;
    if (p->len == 0)
        return cvlm_errf(CVLM_EFORMAT, "tokenizer model: piece %d is empty", i);
    if (!utf8_valid(s, p->len))
        return cvlm_errf(CVLM_EFORMAT, "tokenizer model: piece %d is not valid UTF-8", i);
    if (p->type == CVLM_SP_UNKNOWN) {
        if (t->unk_id >= 0)
            return cvlm_errf(CVLM_EFORMAT, "tokenizer model: pieces %d and %d are both unknown",
                             t->unk_id, i);
        t->unk_id = i;
    } else if (p->type == CVLM_SP_BYTE) {
        int b = piece_to_byte(s, p->len);
        if (!m->byte_fallback)
            return cvlm_errf(CVLM_EFORMAT,
                             "tokenizer model: byte piece %d although byte_fallback is off", i);
        if (b < 0)
            return cvlm_errf(CVLM_EFORMAT, "tokenizer model: byte piece %d (%.16s) is invalid", i,
                             s);
        t->byte_id[b] = i;
        t->pieces[i].byte = (uint8_t)b;
    } else if (p->type == CVLM_SP_UNUSED) {
        t->has_unused = 1;
    }
    return 0;
}

/* Inserts piece i into the hash table; duplicates are a format error. */
static int table_insert(struct cvlm_tokenizer *t, int32_t i)
{
    const struct cvlm_sp_piece *p = &t->pieces[i];
    const char *s = t->strs + p->off;
    int32_t dup = cvlm_sp_lookup(t, s, p->len);
    if (dup >= 0)
        return cvlm_errf(CVLM_EFORMAT, "tokenizer model: piece %d (%.32s) duplicates piece %d", i,
                         s, dup);
    uint32_t h = cvlm_sp_hash(s, p->len) & t->mask;
    while (t->table[h] >= 0)
        h = (h + 1) & t->mask;
    t->table[h] = i;
    return 0;
}

/* Decoded text of every piece: U+2581 -> ' ' (what DecodeSentencePiece's StrReplaceAll
 * does), so decode is a copy. */
static int build_decoded(struct cvlm_tokenizer *t)
{
    size_t total = 0;
    for (int32_t i = 0; i < t->n; i++)
        total += t->pieces[i].len;
    t->dec = malloc(total + 1);
    if (!t->dec)
        return cvlm_errf(CVLM_ENOMEM, "tokenizer: out of memory");
    size_t at = 0;
    for (int32_t i = 0; i < t->n; i++) {
        struct cvlm_sp_piece *p = &t->pieces[i];
        const char *s = t->strs + p->off;
        p->dec_off = (uint32_t)at;
        p->lead_ws = p->len >= WS_LEN && !memcmp(s, WS, WS_LEN);
        for (uint32_t k = 0; k < p->len;) {
            if (p->len - k >= WS_LEN && !memcmp(s + k, WS, WS_LEN)) {
                t->dec[at++] = ' ';
                k += WS_LEN;
            } else {
                t->dec[at++] = s[k++];
            }
        }
        p->dec_len = (uint32_t)(at - p->dec_off);
    }
    return 0;
}

static int user_insert(struct cvlm_tokenizer *t, const char *s, size_t n, int32_t *cap)
{
    int32_t node = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t c = t->unodes[node].child;
        while (c >= 0 && t->unodes[c].byte != (uint8_t)s[i])
            c = t->unodes[c].sibling;
        if (c < 0) {
            if (t->n_unodes == *cap) {
                int32_t nc = *cap * 2;
                struct cvlm_sp_unode *nn = realloc(t->unodes, (size_t)nc * sizeof(*nn));
                if (!nn)
                    return cvlm_errf(CVLM_ENOMEM, "tokenizer: out of memory");
                t->unodes = nn;
                *cap = nc;
            }
            c = t->n_unodes++;
            t->unodes[c] = (struct cvlm_sp_unode){-1, t->unodes[node].child, (uint8_t)s[i], 0};
            t->unodes[node].child = c;
        }
        node = c;
    }
    t->unodes[node].term = 1;
    return 0;
}

static int build_user_trie(struct cvlm_tokenizer *t)
{
    int32_t cap = 64;
    for (int32_t i = 0; i < t->n; i++) {
        if (t->pieces[i].type != CVLM_SP_USER_DEFINED)
            continue;
        if (!t->unodes) {
            t->unodes = malloc((size_t)cap * sizeof(*t->unodes));
            if (!t->unodes)
                return cvlm_errf(CVLM_ENOMEM, "tokenizer: out of memory");
            t->unodes[0] = (struct cvlm_sp_unode){-1, -1, 0, 0};
            t->n_unodes = 1;
        }
        int rc = user_insert(t, t->strs + t->pieces[i].off, t->pieces[i].len, &cap);
        if (rc)
            return rc;
    }
    return 0;
}

/* precompiled_charsmap = <u32 trie size><trie: u32 units><NUL-separated strings>. */
static int load_charsmap(struct cvlm_tokenizer *t, const struct proto_str *blob)
{
    const uint8_t *b = (const uint8_t *)blob->s;
    if (blob->len == 0)
        return 0;
    if (blob->len <= 4)
        return cvlm_errf(CVLM_EFORMAT, "tokenizer model: precompiled_charsmap is broken");
    uint32_t trie =
        (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
    if (trie > blob->len - 4)
        return cvlm_errf(CVLM_EFORMAT,
                         "tokenizer model: charsmap trie of %u bytes exceeds its blob (%zu)", trie,
                         blob->len);
    t->n_units = trie / 4;
    t->norm_len = blob->len - 4 - trie;
    t->units = malloc(t->n_units * 4 + 4);
    t->norm = malloc(t->norm_len + 1);
    if (!t->units || !t->norm)
        return cvlm_errf(CVLM_ENOMEM, "tokenizer: out of memory");
    for (size_t i = 0; i < t->n_units; i++) {
        const uint8_t *u = b + 4 + 4 * i;
        t->units[i] =
            (uint32_t)u[0] | (uint32_t)u[1] << 8 | (uint32_t)u[2] << 16 | (uint32_t)u[3] << 24;
    }
    memcpy(t->norm, b + 4 + trie, t->norm_len);
    t->norm[t->norm_len] = '\0'; /* every replacement string is now NUL-terminated */
    return 0;
}

/* SentencePieceProcessor::{unk,bos,eos,pad}_id: the id of the named piece if it has the
 * expected type, else -1. */
static int32_t special_id(const struct cvlm_tokenizer *t, const struct proto_str *name,
                          const char *dflt, int type)
{
    const char *s = name->s && name->s[0] ? name->s : dflt;
    int32_t id = cvlm_sp_lookup(t, s, strlen(s));
    if (id < 0)
        id = t->unk_id;
    return t->pieces[id].type == type ? id : -1;
}

static int check_model(const struct proto_model *m)
{
    if (m->n_pieces == 0)
        return cvlm_errf(CVLM_EFORMAT,
                         "tokenizer model: no pieces (empty file or not a SentencePiece model)");
    if (m->model_type != MODEL_BPE) {
        static const char *names[] = {"?", "UNIGRAM", "BPE", "WORD", "CHAR"};
        const char *nm = m->model_type >= 1 && m->model_type <= 4 ? names[m->model_type] : "?";
        return cvlm_errf(CVLM_EUNSUPPORTED,
                         "tokenizer model: model_type %s (%d) is not supported, only BPE", nm,
                         m->model_type);
    }
    if (m->denormalizer.charsmap.len)
        return cvlm_errf(CVLM_EUNSUPPORTED,
                         "tokenizer model: a denormalizer_spec charsmap is not supported");
    return 0;
}

static int build_pieces(struct cvlm_tokenizer *t, struct proto_model *m)
{
    uint32_t cap = 16;
    while (cap < 2 * m->n_pieces)
        cap *= 2;
    t->n = (int32_t)m->n_pieces;
    t->mask = cap - 1;
    t->pieces = calloc(m->n_pieces, sizeof(*t->pieces));
    t->table = malloc(cap * sizeof(*t->table));
    if (!t->pieces || !t->table)
        return cvlm_errf(CVLM_ENOMEM, "tokenizer: out of memory");
    memset(t->table, 0xff, cap * sizeof(*t->table));
    t->strs = m->strs; /* take ownership */
    m->strs = NULL;
    for (int32_t i = 0; i < t->n; i++) {
        t->pieces[i].off = m->pieces[i].off;
        t->pieces[i].len = m->pieces[i].len;
        t->pieces[i].score = m->pieces[i].score;
        t->pieces[i].type = (uint8_t)m->pieces[i].type;
        if (m->pieces[i].len > t->max_piece_len)
            t->max_piece_len = m->pieces[i].len;
        int rc = check_piece(t, m, i);
        if (!rc)
            rc = table_insert(t, i);
        if (rc)
            return rc;
    }
    if (t->unk_id < 0)
        return cvlm_errf(CVLM_EFORMAT, "tokenizer model: no unknown (<unk>) piece");
    for (int b = 0; m->byte_fallback && b < 256; b++)
        if (t->byte_id[b] < 0)
            return cvlm_errf(CVLM_EFORMAT,
                             "tokenizer model: byte_fallback is on but piece <0x%02X> is "
                             "missing",
                             b);
    return 0;
}

static int build(struct cvlm_tokenizer *t, struct proto_model *m)
{
    int rc = check_model(m);
    if (!rc)
        rc = build_pieces(t, m);
    if (!rc)
        rc = build_decoded(t);
    if (!rc)
        rc = build_user_trie(t);
    if (!rc)
        rc = load_charsmap(t, &m->normalizer.charsmap);
    if (rc)
        return rc;
    t->byte_fallback = m->byte_fallback;
    t->add_dummy_prefix = m->normalizer.add_dummy_prefix;
    t->remove_extra_ws = m->normalizer.remove_extra_whitespaces;
    t->escape_ws = m->normalizer.escape_whitespaces;
    t->ws_suffix = m->treat_whitespace_as_suffix;
    /* unk_id stays the (unique) UNKNOWN piece: encode needs it even if unk_piece names
     * something else, where SentencePiece's unk_id() would say -1. */
    t->bos_id = special_id(t, &m->bos_piece, "<s>", CVLM_SP_CONTROL);
    t->eos_id = special_id(t, &m->eos_piece, "</s>", CVLM_SP_CONTROL);
    t->pad_id = special_id(t, &m->pad_piece, "<pad>", CVLM_SP_CONTROL);
    const char *us = m->unk_surface.set ? m->unk_surface.s : DEFAULT_UNK_SURFACE;
    t->unk_surface_len = strlen(us); /* SentencePiece uses it as a C string too */
    t->unk_surface = malloc(t->unk_surface_len + 1);
    if (!t->unk_surface)
        return cvlm_errf(CVLM_ENOMEM, "tokenizer: out of memory");
    memcpy(t->unk_surface, us, t->unk_surface_len + 1);
    return 0;
}

int cvlm_sp_build(const void *data, size_t len, struct cvlm_tokenizer **out)
{
    struct proto_model m;
    *out = NULL;
    int rc = proto_parse(data, len, &m);
    if (rc)
        return rc;
    struct cvlm_tokenizer *t = calloc(1, sizeof(*t));
    if (!t) {
        proto_free(&m);
        return cvlm_errf(CVLM_ENOMEM, "tokenizer: out of memory");
    }
    t->unk_id = -1;
    memset(t->byte_id, 0xff, sizeof(t->byte_id));
    rc = build(t, &m);
    proto_free(&m);
    if (rc) {
        cvlm_sp_free(t);
        return rc;
    }
    *out = t;
    return 0;
}

void cvlm_sp_free(struct cvlm_tokenizer *t)
{
    if (!t)
        return;
    free(t->pieces);
    free(t->strs);
    free(t->dec);
    free(t->table);
    free(t->unodes);
    free(t->units);
    free(t->norm);
    free(t->unk_surface);
    free(t);
}
