/* json_regex.c - JSON Schema `pattern` (ECMA-262 syntax) into grammar instructions over the
 * JSON text of a string's content.
 *
 * Supported: literals (UTF-8), `.`, classes `[...]` / `[^...]` with ranges of ASCII
 * characters, \d \D \w \W \s \S, escapes (\n \r \t \f \v \0 \xHH \uHHHH and escaped
 * punctuation), groups ( ), (?: ), (?<name> ), alternation |, quantifiers * + ? {n}
 * {n,} {n,m} (a lazy `?` after them changes nothing here), ^ at the start and $ at the
 * end. A pattern without ^ / $ may have anything before / after its match (JSON Schema
 * patterns are unanchored). Refused: backreferences, lookaround, \b \B, anchors elsewhere,
 * non-ASCII characters inside a class. Characters are written as gram_json_char does
 * (so '"' comes out as \", and control characters other than \n \r \t never match).
 */
#include <stdlib.h>
#include <string.h>

#include "engine/error.h"
#include "engine/grammar/grammar_internal.h"

enum { RX_CLASS, RX_LIT, RX_CAT, RX_ALT, RX_REP };

#define RX_MAX_NODES 4096
#define RX_MAX_REPEAT 1000

struct rx {
    int kind;
    uint64_t ascii[2]; /* RX_CLASS */
    int non_ascii;
    char lit[4]; /* RX_LIT: one UTF-8 character */
    int lit_n;
    int kid, next; /* RX_REP: kid; CAT / ALT: first kid, kids chained by next */
    int min, max;  /* RX_REP; max -1: unbounded */
};

struct rxp {
    struct cvlm_grammar *g;
    const char *s, *where;
    size_t i, n;
    struct rx *nodes;
    int n_nodes;
};

static int err(struct rxp *p, const char *what)
{
    gram_fail(p->g, CVLM_EINVAL, "json_schema: pattern '%.60s': %s (at %s)", p->s, what,
              p->where && p->where[0] ? p->where : "/");
    return -1;
}

static int node(struct rxp *p, int kind)
{
    if (p->n_nodes == RX_MAX_NODES)
        return err(p, "too long");
    struct rx *x = &p->nodes[p->n_nodes];
    memset(x, 0, sizeof(*x));
    x->kind = kind;
    x->kid = x->next = -1;
    return p->n_nodes++;
}

static void cls_add(uint64_t a[2], int c)
{
    a[c >> 6] |= 1ull << (c & 63);
}

static void cls_range(uint64_t a[2], int lo, int hi)
{
    for (int c = lo; c <= hi; c++)
        cls_add(a, c);
}

/* \d \w \s and their complements into a class; 1 if `e` is one of them. */
static int class_escape(char e, uint64_t a[2], int *non_ascii)
{
    uint64_t t[2] = {0, 0};
    switch (e | 0x20) {
    case 'd': cls_range(t, '0', '9'); break;
    case 'w':
        cls_range(t, '0', '9');
        cls_range(t, 'A', 'Z');
        cls_range(t, 'a', 'z');
        cls_add(t, '_');
        break;
    case 's':
        cls_add(t, ' ');
        cls_range(t, '\t', '\r');
        break;
    default: return 0;
    }
    if (e >= 'A' && e <= 'Z') { /* complement */
        t[0] = ~t[0];
        t[1] = ~t[1];
        *non_ascii = 1;
    }
    a[0] |= t[0];
    a[1] |= t[1];
    return 1;
}

static int hexval(char c)
{
    return c >= '0' && c <= '9'                     ? c - '0'
           : (c | 0x20) >= 'a' && (c | 0x20) <= 'f' ? (c | 0x20) - 'a' + 10
                                                    : -1;
}

/* A character escape after '\' (not a class escape): its code point, or -1 (error set). */
static long char_escape(struct rxp *p)
{
    char e = p->s[p->i++];
    int digits = e == 'x' ? 2 : e == 'u' ? 4 : 0;
    if (digits) {
        long v = 0;
        for (int k = 0; k < digits; k++) {
            int h = p->i < p->n ? hexval(p->s[p->i]) : -1;
            if (h < 0)
                return err(p, "a \\x / \\u escape needs hex digits");
            v = v * 16 + h;
            p->i++;
        }
        return v;
    }
    switch (e) {
    case 'n': return '\n';
    case 'r': return '\r';
    case 't': return '\t';
    case 'f': return '\f';
    case 'v': return '\v';
    case '0': return 0;
    case 'b':
    case 'B': return err(p, "word boundaries (\\b, \\B) are not supported");
    default: break;
    }
    if (e >= '1' && e <= '9')
        return err(p, "backreferences are not supported");
    if ((e >= 'a' && e <= 'z') || (e >= 'A' && e <= 'Z'))
        return err(p, "an unknown escape");
    return (unsigned char)e;
}

/* A code point as a node: a class of one for ASCII, else a literal of its UTF-8. */
static int char_node(struct rxp *p, long cp)
{
    int x = node(p, cp < 0x80 ? RX_CLASS : RX_LIT);
    if (x < 0)
        return -1;
    struct rx *r = &p->nodes[x];
    if (cp < 0x80) {
        cls_add(r->ascii, (int)cp);
    } else if (cp < 0x800) {
        r->lit[0] = (char)(0xc0 | (cp >> 6));
        r->lit[1] = (char)(0x80 | (cp & 0x3f));
        r->lit_n = 2;
    } else if (cp < 0x10000) {
        r->lit[0] = (char)(0xe0 | (cp >> 12));
        r->lit[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        r->lit[2] = (char)(0x80 | (cp & 0x3f));
        r->lit_n = 3;
    } else {
        r->lit[0] = (char)(0xf0 | (cp >> 18));
        r->lit[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
        r->lit[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
        r->lit[3] = (char)(0x80 | (cp & 0x3f));
        r->lit_n = 4;
    }
    return x;
}

static int parse_alt(struct rxp *p);

static int parse_class(struct rxp *p)
{
    int x = node(p, RX_CLASS);
    if (x < 0)
        return -1;
    uint64_t a[2] = {0, 0};
    int neg = 0, non_ascii = 0, first = 1;
    if (p->i < p->n && p->s[p->i] == '^') {
        neg = 1;
        p->i++;
    }
    for (;;) {
        if (p->i >= p->n)
            return err(p, "an unterminated [");
        char c = p->s[p->i];
        if (c == ']' && !first) {
            p->i++;
            break;
        }
        first = 0;
        long lo;
        if ((unsigned char)c >= 0x80)
            return err(p, "non-ASCII characters in a class are not supported");
        p->i++;
        if (c == '\\') {
            if (p->i >= p->n)
                return err(p, "a trailing \\");
            if (class_escape(p->s[p->i], a, &non_ascii)) {
                p->i++;
                continue;
            }
            if ((lo = char_escape(p)) < 0)
                return -1;
        } else {
            lo = (unsigned char)c;
        }
        long hi = lo;
        if (p->i + 1 < p->n && p->s[p->i] == '-' && p->s[p->i + 1] != ']') {
            p->i++;
            char d = p->s[p->i++];
            if ((unsigned char)d >= 0x80)
                return err(p, "non-ASCII characters in a class are not supported");
            if (d == '\\') {
                if (p->i >= p->n || (hi = char_escape(p)) < 0)
                    return p->i >= p->n ? err(p, "a trailing \\") : -1;
            } else {
                hi = (unsigned char)d;
            }
            if (hi < lo)
                return err(p, "a range out of order");
        }
        if (hi >= 0x80)
            return err(p, "non-ASCII characters in a class are not supported");
        cls_range(a, (int)lo, (int)hi);
    }
    struct rx *r = &p->nodes[x];
    r->ascii[0] = neg ? ~a[0] : a[0];
    r->ascii[1] = neg ? ~a[1] : a[1];
    r->non_ascii = neg ? !non_ascii : non_ascii;
    return x;
}

static int parse_atom(struct rxp *p)
{
    char c = p->s[p->i];
    if (c == '(') {
        p->i++;
        if (p->i < p->n && p->s[p->i] == '?') {
            if (p->i + 1 < p->n && p->s[p->i + 1] == ':') {
                p->i += 2;
            } else if (p->i + 1 < p->n && p->s[p->i + 1] == '<' && p->i + 2 < p->n &&
                       p->s[p->i + 2] != '=' && p->s[p->i + 2] != '!') {
                while (p->i < p->n && p->s[p->i] != '>')
                    p->i++;
                if (p->i++ >= p->n)
                    return err(p, "an unterminated group name");
            } else {
                return err(p, "lookaround and other (? groups are not supported");
            }
        }
        int x = parse_alt(p);
        if (x < 0)
            return -1;
        if (p->i >= p->n || p->s[p->i] != ')')
            return err(p, "an unbalanced (");
        p->i++;
        return x;
    }
    if (c == '[') {
        p->i++;
        return parse_class(p);
    }
    if (c == '.') {
        p->i++;
        int x = node(p, RX_CLASS);
        if (x < 0)
            return -1;
        p->nodes[x].ascii[0] = ~((1ull << '\n') | (1ull << '\r'));
        p->nodes[x].ascii[1] = ~0ull;
        p->nodes[x].non_ascii = 1;
        return x;
    }
    if (c == '\\') {
        if (++p->i >= p->n)
            return err(p, "a trailing \\");
        uint64_t a[2] = {0, 0};
        int non_ascii = 0;
        if (class_escape(p->s[p->i], a, &non_ascii)) {
            p->i++;
            int x = node(p, RX_CLASS);
            if (x >= 0) {
                memcpy(p->nodes[x].ascii, a, sizeof(a));
                p->nodes[x].non_ascii = non_ascii;
            }
            return x;
        }
        long cp = char_escape(p);
        return cp < 0 ? -1 : char_node(p, cp);
    }
    if (c == '^' || c == '$')
        return err(p, "^ and $ are supported only at the start and the end");
    if (c == '*' || c == '+' || c == '?' || c == '{' || c == ')' || c == ']' || c == '}' ||
        c == '|')
        return err(p, "a quantifier or bracket with nothing before it");
    /* a literal, possibly a multi-byte UTF-8 character */
    unsigned char b = (unsigned char)c;
    int len = b < 0x80 ? 1 : b >= 0xf0 ? 4 : b >= 0xe0 ? 3 : 2;
    if (p->i + (size_t)len > p->n || (b >= 0x80 && b < 0xc2))
        return err(p, "invalid UTF-8");
    int x = node(p, len == 1 ? RX_CLASS : RX_LIT);
    if (x < 0)
        return -1;
    if (len == 1)
        cls_add(p->nodes[x].ascii, b);
    else
        memcpy(p->nodes[x].lit, p->s + p->i, (size_t)(p->nodes[x].lit_n = len));
    p->i += (size_t)len;
    return x;
}

/* {n}, {n,}, {n,m}: 1 parsed, 0 not a quantifier (a literal '{'), -1 error. */
static int parse_braces(struct rxp *p, int *min, int *max)
{
    size_t j = p->i + 1;
    long a = 0, b;
    if (j >= p->n || p->s[j] < '0' || p->s[j] > '9')
        return 0;
    while (j < p->n && p->s[j] >= '0' && p->s[j] <= '9' && a <= RX_MAX_REPEAT)
        a = a * 10 + (p->s[j++] - '0');
    b = a;
    if (j < p->n && p->s[j] == ',') {
        j++;
        b = -1;
        if (j < p->n && p->s[j] >= '0' && p->s[j] <= '9')
            for (b = 0; j < p->n && p->s[j] >= '0' && p->s[j] <= '9' && b <= RX_MAX_REPEAT;)
                b = b * 10 + (p->s[j++] - '0');
    }
    if (j >= p->n || p->s[j] != '}')
        return 0;
    if (a > RX_MAX_REPEAT || b > RX_MAX_REPEAT)
        return err(p, "a repetition count over 1000");
    if (b >= 0 && b < a)
        return err(p, "a repetition {n,m} with m < n");
    p->i = j + 1;
    *min = (int)a;
    *max = (int)b;
    return 1;
}

static int parse_cat(struct rxp *p)
{
    int cat = node(p, RX_CAT), last = -1;
    if (cat < 0)
        return -1;
    while (p->i < p->n && p->s[p->i] != '|' && p->s[p->i] != ')') {
        if (p->s[p->i] == '$' && p->i + 1 == p->n)
            break; /* the end anchor: the caller takes it */
        int x = parse_atom(p);
        if (x < 0)
            return -1;
        for (;;) { /* quantifiers, possibly stacked */
            int min, max, q = 0;
            char c = p->i < p->n ? p->s[p->i] : 0;
            if (c == '*' || c == '+' || c == '?') {
                min = c == '+';
                max = c == '?' ? 1 : -1;
                p->i++;
                q = 1;
            } else if (c == '{') {
                if ((q = parse_braces(p, &min, &max)) < 0)
                    return -1;
            }
            if (!q)
                break;
            if (p->i < p->n && p->s[p->i] == '?')
                p->i++; /* lazy: the same language */
            else if (p->i < p->n && p->s[p->i] == '+')
                return err(p, "possessive quantifiers are not supported");
            int r = node(p, RX_REP);
            if (r < 0)
                return -1;
            p->nodes[r].kid = x;
            p->nodes[r].min = min;
            p->nodes[r].max = max;
            x = r;
        }
        if (last < 0)
            p->nodes[cat].kid = x;
        else
            p->nodes[last].next = x;
        last = x;
    }
    return cat;
}

static int parse_alt(struct rxp *p)
{
    int alt = node(p, RX_ALT), last = -1;
    if (alt < 0)
        return -1;
    for (;;) {
        int x = parse_cat(p);
        if (x < 0)
            return -1;
        if (last < 0)
            p->nodes[alt].kid = x;
        else
            p->nodes[last].next = x;
        last = x;
        if (p->i < p->n && p->s[p->i] == '|') {
            p->i++;
            continue;
        }
        return alt;
    }
}

static int32_t gen(struct rxp *p, int x, int32_t next);

/* The kids of a concatenation from k on (chained by next), then next. */
static int32_t gen_cat(struct rxp *p, int k, int32_t next)
{
    return k < 0 ? next : gen(p, k, gen_cat(p, p->nodes[k].next, next));
}

/* One of the alternatives from k on, then next. */
static int32_t gen_alt(struct rxp *p, int k, int32_t next)
{
    int32_t a = gen(p, k, next);
    return p->nodes[k].next < 0 ? a : gram_split(p->g, a, gen_alt(p, p->nodes[k].next, next));
}

static int32_t gen(struct rxp *p, int x, int32_t next)
{
    struct cvlm_grammar *g = p->g;
    const struct rx *r = &p->nodes[x];
    if (next < 0)
        return -1;
    switch (r->kind) {
    case RX_CLASS: return gram_json_char(g, r->ascii, r->non_ascii, next);
    case RX_LIT: return gram_lit(g, r->lit, (size_t)r->lit_n, next);
    case RX_CAT: return gen_cat(p, r->kid, next);
    case RX_ALT: return gen_alt(p, r->kid, next);
    default: { /* RX_REP */
        int32_t t = next;
        if (r->max < 0) {
            t = gram_emit(g, GOP_SPLIT, -2, -2);
            int32_t body = gen(p, r->kid, t);
            if (t < 0 || body < 0)
                return -1;
            g->ins[t].a = body;
            g->ins[t].b = next;
        } else {
            for (int k = r->min; k < r->max && t >= 0; k++)
                t = gram_split(g, gen(p, r->kid, t), next);
        }
        for (int k = 0; k < r->min && t >= 0; k++)
            t = gen(p, r->kid, t);
        return t;
    }
    }
}

int32_t gram_regex(struct cvlm_grammar *g, const char *pattern, const char *where, int32_t next)
{
    struct rxp p = {.g = g, .s = pattern, .where = where, .n = strlen(pattern)};
    if (next < 0)
        return -1;
    if (!(p.nodes = malloc(RX_MAX_NODES * sizeof(*p.nodes))))
        return gram_fail(g, CVLM_ENOMEM, "out of memory compiling a pattern");
    int start = p.n > 0 && pattern[0] == '^';
    p.i = (size_t)start;
    int root = parse_alt(&p), end = 0;
    if (root >= 0 && p.i < p.n && pattern[p.i] == '$' && p.i + 1 == p.n) {
        end = 1;
        p.i++;
    }
    if (root >= 0 && p.i < p.n)
        root = err(&p, pattern[p.i] == ')' ? "an unbalanced )" : "unexpected characters");
    int32_t res = -1;
    if (root >= 0) {
        static const uint64_t all[2] = {~0ull, ~0ull};
        int32_t t = end ? next : gram_json_chars(g, all, 1, next); /* anything after it */
        t = gen(&p, root, t);
        if (!start && t >= 0) /* anything before it */
            t = gram_json_chars(g, all, 1, t);
        res = t;
    }
    free(p.nodes);
    return res;
}
