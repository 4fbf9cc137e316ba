/* json_schema.c - OpenAI response_format into a grammar: `json_object` (any JSON object)
 * and `json_schema` (the subset of JSON Schema the established servers take).
 *
 * Supported (anything else is refused, naming the keyword and where it is):
 *   type (a name or a list), enum, const, anyOf, oneOf (taken as anyOf: alternatives that
 *   overlap may both be produced), allOf with one schema, $ref to "#" or "#/..." inside
 *   the document ($defs / definitions; recursion allowed), true / {} (any value);
 *   objects: properties (produced in schema order), required, additionalProperties
 *   (listed properties only when there are properties; a map of free keys to its schema
 *   when there are none, `false`: {} only);
 *   arrays: items, prefixItems, minItems, maxItems, uniqueItems false;
 *   strings: minLength, maxLength, pattern (json_regex.c), format date, time, date-time,
 *   uuid, email, ipv4;
 *   integers (at most 16 digits) and numbers (16 digits, fraction of 16, exponent of 2:
 *   always a finite double);
 *   annotations (title, description, default, examples, $schema, $id, $comment,
 *   deprecated, readOnly, writeOnly, $defs, definitions) are ignored.
 * The produced documents are a subset of the valid ones (bounded whitespace and number
 * lengths, escapes limited to \" \\ \n \r \t, optional properties in order), so every
 * output that ends at EOS validates.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/error.h"
#include "engine/grammar/grammar_internal.h"

#define MAX_UNROLL 4096 /* minLength / maxLength / minItems / maxItems bound */
#define INT_DIGITS 16

struct memo {
    json_t *node;
    int32_t rule;
};

struct sc {
    struct cvlm_grammar *g;
    json_t *root;
    struct memo *memo;
    int n_memo, cap_memo;
    int32_t ret, any, obj, arr; /* the shared RET; generic rules (-1 until needed) */
    char path[512];
    int nest; /* recursion of the compiler itself (nested schemas, not $ref cycles) */
};

static int32_t fail(struct sc *c, const char *fmt, const char *what)
{
    char msg[200];
    snprintf(msg, sizeof(msg), fmt, what);
    return gram_fail(c->g, CVLM_EINVAL, "json_schema: %s (at %s)", msg, c->path[0] ? c->path : "/");
}

/* Appends "/seg" to the path; returns the old length to restore. */
static size_t push(struct sc *c, const char *seg)
{
    size_t n = strlen(c->path);
    snprintf(c->path + n, sizeof(c->path) - n, "/%s", seg);
    return n;
}

static int32_t value(struct sc *c, json_t *s, int32_t next);

static int32_t rule_of(struct sc *c, json_t *s)
{
    for (int i = 0; i < c->n_memo; i++)
        if (c->memo[i].node == s)
            return c->memo[i].rule;
    if (c->n_memo == c->cap_memo) {
        int nc = c->cap_memo ? c->cap_memo * 2 : 32;
        struct memo *m = realloc(c->memo, (size_t)nc * sizeof(*m));
        if (!m)
            return gram_fail(c->g, CVLM_ENOMEM, "out of memory compiling a schema");
        c->memo = m;
        c->cap_memo = nc;
    }
    int32_t id = gram_rule_new(c->g);
    if (id < 0)
        return -1;
    c->memo[c->n_memo++] = (struct memo){s, id};
    int32_t entry = value(c, s, c->ret);
    if (entry < 0)
        return -1;
    c->g->rules[id] = entry;
    return id;
}

static int32_t call(struct sc *c, int32_t rule, int32_t next)
{
    return rule < 0 ? -1 : gram_emit(c->g, GOP_CALL, rule, next);
}

/* ---- scalars ------------------------------------------------------------------------ */

/* Up to n optional digits, then next. */
static int32_t opt_digits(struct sc *c, int n, int32_t next)
{
    int32_t t = next;
    for (int i = 0; i < n && t >= 0; i++)
        t = gram_split(c->g, gram_range(c->g, '0', '9', t), next);
    return t;
}

static int32_t integer(struct sc *c, int32_t next)
{
    struct cvlm_grammar *g = c->g;
    int32_t body = gram_split(g, gram_lit(g, "0", 1, next),
                              gram_range(g, '1', '9', opt_digits(c, INT_DIGITS - 1, next)));
    return gram_split(g, gram_lit(g, "-", 1, body), body);
}

static int32_t number(struct sc *c, int32_t next)
{
    struct cvlm_grammar *g = c->g;
    /* two exponent digits: every number the grammar allows is a finite double (e999
     * overflows, and parsers such as jansson refuse it) */
    int32_t exp_digits = gram_range(g, '0', '9', opt_digits(c, 1, next));
    int32_t exp_sign = gram_split(g, gram_range(g, '+', '+', exp_digits),
                                  gram_split(g, gram_range(g, '-', '-', exp_digits), exp_digits));
    uint64_t e[4] = {0};
    gset_add(e, 'e');
    gset_add(e, 'E');
    int32_t eset = gram_set(g, e);
    int32_t exp = gram_split(g, next, eset < 0 ? -1 : gram_emit(g, GOP_BYTES, eset, exp_sign));
    int32_t frac = gram_split(
        g, exp, gram_lit(g, ".", 1, gram_range(g, '0', '9', opt_digits(c, INT_DIGITS - 1, exp))));
    return integer(c, frac);
}

static const uint64_t ANY_ASCII[2] = {~0ull, ~0ull};

/* A JSON string of any content: '"' char* '"'. */
static int32_t any_string(struct sc *c, int32_t next)
{
    struct cvlm_grammar *g = c->g;
    return gram_lit(g, "\"", 1, gram_json_chars(g, ANY_ASCII, 1, gram_lit(g, "\"", 1, next)));
}

static int32_t lengths(struct sc *c, long lo, long hi, int32_t next)
{
    struct cvlm_grammar *g = c->g;
    int32_t close = gram_lit(g, "\"", 1, next), t;
    if (hi < 0) {
        t = gram_json_chars(g, ANY_ASCII, 1, close);
    } else {
        t = close;
        for (long i = lo; i < hi && t >= 0; i++)
            t = gram_split(g, gram_json_char(g, ANY_ASCII, 1, t), close);
    }
    for (long i = 0; i < lo && t >= 0; i++)
        t = gram_json_char(g, ANY_ASCII, 1, t);
    return gram_lit(g, "\"", 1, t);
}

static const struct {
    const char *name, *pattern;
} FORMATS[] = {
    {"date", "^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"},
    {"time",
     "^([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})?$"},
    {"date-time", "^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5]"
                  "[0-9]:[0-5][0-9](\\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})$"},
    {"uuid", "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"},
    {"email", "^[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(\\.[A-Za-z0-9-]{1,63}){0,4}"
              "\\.[A-Za-z]{2,24}$"},
    {"ipv4", "^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}"
             "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$"},
};

static long bound(struct sc *c, json_t *s, const char *key, long dflt, int *err)
{
    json_t *v = json_object_get(s, key);
    if (!v)
        return dflt;
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > MAX_UNROLL) {
        fail(c, "'%s' must be an integer from 0 to 4096", key);
        *err = 1;
        return 0;
    }
    return (long)json_integer_value(v);
}

static int32_t string(struct sc *c, json_t *s, int32_t next)
{
    struct cvlm_grammar *g = c->g;
    int err = 0;
    long lo = bound(c, s, "minLength", 0, &err), hi = bound(c, s, "maxLength", -1, &err);
    if (err)
        return -1;
    if (hi >= 0 && lo > hi)
        return fail(c, "%s", "minLength is above maxLength");
    json_t *pat = json_object_get(s, "pattern"), *fmt = json_object_get(s, "format");
    const char *p = NULL;
    if (fmt) {
        if (!json_is_string(fmt))
            return fail(c, "%s", "'format' must be a string");
        for (size_t i = 0; i < sizeof(FORMATS) / sizeof(FORMATS[0]) && !p; i++)
            if (!strcmp(json_string_value(fmt), FORMATS[i].name))
                p = FORMATS[i].pattern;
        if (!p)
            return fail(c,
                        "format '%.40s' is not supported (date, time, date-time, uuid, "
                        "email, ipv4 are)",
                        json_string_value(fmt));
    }
    if (pat) {
        if (!json_is_string(pat))
            return fail(c, "%s", "'pattern' must be a string");
        if (p)
            return fail(c, "%s", "'pattern' together with 'format' is not supported");
        p = json_string_value(pat);
    }
    if (p && (lo > 0 || hi >= 0))
        return fail(c, "%s",
                    "'pattern' or 'format' together with minLength / maxLength is "
                    "not supported");
    if (!p)
        return lo == 0 && hi < 0 ? any_string(c, next) : lengths(c, lo, hi, next);
    return gram_lit(g, "\"", 1, gram_regex(g, p, c->path, gram_lit(g, "\"", 1, next)));
}

/* The JSON text of v, then next. */
static int32_t literal(struct sc *c, json_t *v, int32_t next)
{
    char *t = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
    if (!t)
        return gram_fail(c->g, CVLM_ENOMEM, "out of memory compiling a schema");
    int32_t r = gram_lit(c->g, t, strlen(t), next);
    free(t);
    return r;
}

/* ---- containers --------------------------------------------------------------------- */

static int32_t any_rule(struct sc *c);

/* {"key": value, ...} with free keys: '{' ws ('}' | kv (ws ',' ws kv)* ws '}'). */
static int32_t map(struct sc *c, int32_t val_rule, int32_t next)
{
    struct cvlm_grammar *g = c->g;
    int32_t close = gram_lit(g, "}", 1, next);
    int32_t loop = gram_emit(g, GOP_SPLIT, -2, -2);
    int32_t kv = any_string(
        c, gram_ws(g, gram_lit(g, ":", 1, gram_ws(g, call(c, val_rule, gram_ws(g, loop))))));
    if (loop < 0 || kv < 0 || close < 0)
        return -1;
    g->ins[loop].a = gram_lit(g, ",", 1, gram_ws(g, kv));
    g->ins[loop].b = close;
    if (g->ins[loop].a < 0)
        return -1;
    return gram_lit(g, "{", 1, gram_ws(g, gram_split(g, close, kv)));
}

static int32_t object(struct sc *c, json_t *s, int32_t next)
{
    struct cvlm_grammar *g = c->g;
    json_t *props = json_object_get(s, "properties"), *req = json_object_get(s, "required");
    json_t *addl = json_object_get(s, "additionalProperties");
    if (props && !json_is_object(props))
        return fail(c, "%s", "'properties' must be an object");
    if (req && !json_is_array(req))
        return fail(c, "%s", "'required' must be an array");
    if (addl && !json_is_boolean(addl) && !json_is_object(addl))
        return fail(c, "%s", "'additionalProperties' must be a boolean or a schema");
    size_t i, n = props ? json_object_size(props) : 0;
    json_t *r;
    json_array_foreach (req, i, r) {
        if (!json_is_string(r))
            return fail(c, "%s", "'required' must list strings");
        if (!props || !json_object_get(props, json_string_value(r)))
            return fail(c, "required property '%.60s' is not in 'properties'",
                        json_string_value(r));
    }
    if (n == 0) { /* a map, or {} only */
        if (json_is_false(addl))
            return gram_lit(g, "{", 1, gram_ws(g, gram_lit(g, "}", 1, next)));
        return map(c, addl && json_is_object(addl) ? rule_of(c, addl) : any_rule(c), next);
    }
    /* properties in order; first[i] / more[i]: continue with properties i.. when none /
     * some were written */
    const char **keys = malloc(n * sizeof(*keys));
    int32_t *first = malloc((n + 1) * sizeof(*first)), *more = malloc((n + 1) * sizeof(*more));
    int32_t res = -1;
    if (!keys || !first || !more) {
        gram_fail(g, CVLM_ENOMEM, "out of memory compiling a schema");
        goto out;
    }
    const char *k;
    json_t *v;
    i = 0;
    json_object_foreach (props, k, v)
        keys[i++] = k;
    first[n] = more[n] = gram_ws(g, gram_lit(g, "}", 1, next));
    for (size_t j = n; j-- > 0;) {
        int required = 0;
        size_t q;
        json_array_foreach (req, q, r)
            required |= !strcmp(json_string_value(r), keys[j]);
        size_t old = push(c, "properties");
        push(c, keys[j]);
        int32_t rule = rule_of(c, json_object_get(props, keys[j]));
        c->path[old] = 0;
        json_t *key = json_string(keys[j]);
        int32_t after = gram_ws(g, gram_lit(g, ":", 1, gram_ws(g, call(c, rule, more[j + 1]))));
        int32_t kv = key ? literal(c, key, after) : -1;
        json_decref(key);
        int32_t with_comma = gram_ws(g, gram_lit(g, ",", 1, gram_ws(g, kv)));
        more[j] = required ? with_comma : gram_split(g, with_comma, more[j + 1]);
        first[j] = required ? gram_ws(g, kv) : gram_split(g, gram_ws(g, kv), first[j + 1]);
        if (more[j] < 0 || first[j] < 0)
            goto out;
    }
    res = gram_lit(g, "{", 1, first[0]);
out:
    free(keys);
    free(first);
    free(more);
    return res;
}

static int32_t array(struct sc *c, json_t *s, int32_t next)
{
    struct cvlm_grammar *g = c->g;
    json_t *items = json_object_get(s, "items"), *prefix = json_object_get(s, "prefixItems");
    json_t *uniq = json_object_get(s, "uniqueItems");
    int err = 0;
    long lo = bound(c, s, "minItems", 0, &err), hi = bound(c, s, "maxItems", -1, &err);
    if (err)
        return -1;
    if (uniq && !json_is_false(uniq))
        return fail(c, "%s", "'uniqueItems' is not supported");
    if (items && !json_is_object(items) && !json_is_boolean(items))
        return fail(c, "%s", "'items' must be a schema");
    if (prefix && !json_is_array(prefix))
        return fail(c, "%s", "'prefixItems' must be an array of schemas");
    long k = prefix ? (long)json_array_size(prefix) : 0;
    int more_ok = !json_is_false(items);
    if (!more_ok && (hi < 0 || hi > k))
        hi = k;
    if (hi >= 0 && lo > hi)
        return fail(c, "%s", "minItems is above what maxItems / items allow");
    int32_t item_rule =
        more_ok ? (items && json_is_object(items) ? rule_of(c, items) : any_rule(c)) : 0;
    if (item_rule < 0)
        return -1;
    /* t = what may follow i elements, from i = top down to 0; an element starts with its
     * whitespace (and comma), so '[' needs none of its own */
    int32_t close = gram_ws(g, gram_lit(g, "]", 1, next)), t;
    long top = lo > k ? lo : k;
    if (hi < 0) { /* after `top` elements: any number more */
        int32_t loop = gram_emit(g, GOP_SPLIT, -2, -2);
        int32_t el = gram_ws(g, gram_lit(g, ",", 1, gram_ws(g, call(c, item_rule, loop))));
        if (loop < 0 || el < 0 || close < 0)
            return -1;
        g->ins[loop].a = el;
        g->ins[loop].b = close;
        t = top > 0 ? loop : gram_split(g, close, gram_ws(g, call(c, item_rule, loop)));
    } else {
        t = close;
        top = hi;
    }
    for (long i = top; i-- > 0 && t >= 0;) { /* t: after i + 1 elements -> after i */
        int32_t rule = item_rule;
        if (i < k) {
            char seg[48];
            snprintf(seg, sizeof(seg), "prefixItems/%ld", i);
            size_t old = push(c, seg);
            rule = rule_of(c, json_array_get(prefix, (size_t)i));
            c->path[old] = 0;
        }
        int32_t el = gram_ws(g, call(c, rule, t));
        if (i > 0)
            el = gram_ws(g, gram_lit(g, ",", 1, el));
        t = i >= lo ? gram_split(g, el, close) : el;
    }
    return gram_lit(g, "[", 1, t);
}

/* ---- the generic value -------------------------------------------------------------- */

static int32_t any_rule(struct sc *c)
{
    struct cvlm_grammar *g = c->g;
    if (c->any >= 0)
        return c->any;
    if ((c->any = gram_rule_new(g)) < 0 || (c->obj = gram_rule_new(g)) < 0 ||
        (c->arr = gram_rule_new(g)) < 0)
        return -1;
    int32_t ret = c->ret;
    int32_t v = gram_split(g, gram_split(g, call(c, c->obj, ret), call(c, c->arr, ret)),
                           gram_split(g, gram_split(g, any_string(c, ret), number(c, ret)),
                                      gram_split(g, gram_lit(g, "true", 4, ret),
                                                 gram_split(g, gram_lit(g, "false", 5, ret),
                                                            gram_lit(g, "null", 4, ret)))));
    int32_t o = map(c, c->any, ret);
    /* '[' ws (']' | v (ws ',' ws v)* ws ']') */
    int32_t close = gram_lit(g, "]", 1, ret), loop = gram_emit(g, GOP_SPLIT, -2, -2);
    int32_t el = call(c, c->any, gram_ws(g, loop));
    if (v < 0 || o < 0 || close < 0 || loop < 0 || el < 0)
        return -1;
    g->ins[loop].a = gram_lit(g, ",", 1, gram_ws(g, el));
    g->ins[loop].b = close;
    int32_t a = gram_lit(g, "[", 1, gram_ws(g, gram_split(g, close, el)));
    if (a < 0 || g->ins[loop].a < 0)
        return -1;
    g->rules[c->any] = v;
    g->rules[c->obj] = o;
    g->rules[c->arr] = a;
    return c->any;
}

/* ---- one schema --------------------------------------------------------------------- */

static const char *const ANNOTATIONS[] = {
    "title",      "description", "default",   "examples", "$schema",     "$id", "$comment",
    "deprecated", "readOnly",    "writeOnly", "$defs",    "definitions", NULL};
static const char *const KEYWORDS[] = {
    "$ref",      "anyOf",       "oneOf",      "allOf",    "enum",
    "const",     "type",        "properties", "required", "additionalProperties",
    "items",     "prefixItems", "minItems",   "maxItems", "uniqueItems",
    "minLength", "maxLength",   "pattern",    "format",   NULL};

static int listed(const char *const *l, const char *k)
{
    for (; *l; l++)
        if (!strcmp(*l, k))
            return 1;
    return 0;
}

static json_t *resolve(struct sc *c, const char *ref)
{
    if (ref[0] != '#')
        return NULL;
    json_t *at = c->root;
    for (const char *p = ref + 1; *p == '/' && at;) {
        char seg[256];
        size_t n = 0;
        for (p++; *p && *p != '/' && n + 1 < sizeof(seg); p++) {
            if (*p == '~' && (p[1] == '0' || p[1] == '1'))
                seg[n++] = *++p == '0' ? '~' : '/';
            else
                seg[n++] = *p;
        }
        seg[n] = 0;
        if (json_is_object(at)) {
            at = json_object_get(at, seg);
        } else if (json_is_array(at)) {
            char *end;
            long idx = strtol(seg, &end, 10);
            at = *end || end == seg ? NULL : json_array_get(at, (size_t)idx);
        } else {
            at = NULL;
        }
        if (*p && *p != '/')
            return NULL;
    }
    return at;
}

/* alternatives: CALL each schema of the list, then next. */
static int32_t alternatives(struct sc *c, json_t *list, const char *kw, int32_t next)
{
    if (!json_is_array(list) || json_array_size(list) == 0)
        return fail(c, "'%s' must be a non-empty array of schemas", kw);
    int32_t t = -1;
    for (size_t i = json_array_size(list); i-- > 0;) {
        char seg[48];
        snprintf(seg, sizeof(seg), "%s/%zu", kw, i);
        size_t old = push(c, seg);
        int32_t alt = call(c, rule_of(c, json_array_get(list, i)), next);
        c->path[old] = 0;
        if (alt < 0)
            return -1;
        t = t < 0 ? alt : gram_split(c->g, alt, t);
    }
    return t;
}

static int32_t typed(struct sc *c, json_t *s, const char *type, int32_t next)
{
    struct cvlm_grammar *g = c->g;
    if (!strcmp(type, "string"))
        return string(c, s, next);
    if (!strcmp(type, "integer"))
        return integer(c, next);
    if (!strcmp(type, "number"))
        return number(c, next);
    if (!strcmp(type, "boolean"))
        return gram_split(g, gram_lit(g, "true", 4, next), gram_lit(g, "false", 5, next));
    if (!strcmp(type, "null"))
        return gram_lit(g, "null", 4, next);
    if (!strcmp(type, "object"))
        return object(c, s, next);
    if (!strcmp(type, "array"))
        return array(c, s, next);
    return fail(c, "type '%.40s' is not a JSON Schema type", type);
}

static int32_t value(struct sc *c, json_t *s, int32_t next)
{
    struct cvlm_grammar *g = c->g;
    if (json_is_true(s))
        return call(c, any_rule(c), next);
    if (!json_is_object(s))
        return fail(c, "%s",
                    json_is_false(s) ? "the schema 'false' accepts nothing"
                                     : "a schema must be an object");
    if (++c->nest > 64) {
        c->nest--;
        return fail(c, "%s", "schemas nested deeper than 64");
    }
    const char *k;
    json_t *v;
    int n_kw = 0;
    int32_t res = -1;
    json_object_foreach (s, k, v) {
        if (listed(KEYWORDS, k))
            n_kw++;
        else if (!listed(ANNOTATIONS, k)) {
            fail(c, "'%.60s' is not supported", k);
            goto out;
        }
    }
    json_t *ref = json_object_get(s, "$ref"), *e = json_object_get(s, "enum");
    json_t *cn = json_object_get(s, "const"), *type = json_object_get(s, "type");
    json_t *any =
        json_object_get(s, "anyOf") ? json_object_get(s, "anyOf") : json_object_get(s, "oneOf");
    json_t *all = json_object_get(s, "allOf");
    if (ref) {
        if (n_kw > 1) {
            fail(c, "%s", "'$ref' together with other keywords is not supported");
            goto out;
        }
        json_t *t = json_is_string(ref) ? resolve(c, json_string_value(ref)) : NULL;
        if (!t) {
            fail(c, "$ref '%.80s' does not point into this schema",
                 json_is_string(ref) ? json_string_value(ref) : "?");
            goto out;
        }
        res = call(c, rule_of(c, t), next);
    } else if (json_object_get(s, "anyOf") && json_object_get(s, "oneOf")) {
        fail(c, "%s", "'anyOf' and 'oneOf' together are not supported");
    } else if (any || all) {
        if (n_kw > 1) {
            fail(c, "'%s' together with other keywords is not supported",
                 any ? (json_object_get(s, "anyOf") ? "anyOf" : "oneOf") : "allOf");
            goto out;
        }
        if (all && json_array_size(all) != 1) {
            fail(c, "%s", "'allOf' with more than one schema is not supported");
            goto out;
        }
        res = alternatives(c, any ? any : all,
                           any ? (json_object_get(s, "anyOf") ? "anyOf" : "oneOf") : "allOf", next);
    } else if (e || cn) {
        if (cn) {
            res = literal(c, cn, next);
        } else if (!json_is_array(e) || json_array_size(e) == 0) {
            fail(c, "%s", "'enum' must be a non-empty array");
        } else {
            for (size_t i = json_array_size(e); i-- > 0;) {
                int32_t alt = literal(c, json_array_get(e, i), next);
                res = i + 1 == json_array_size(e) ? alt : gram_split(g, alt, res);
                if (res < 0)
                    break;
            }
        }
    } else if (json_is_string(type)) {
        res = typed(c, s, json_string_value(type), next);
    } else if (json_is_array(type) && json_array_size(type) > 0) {
        for (size_t i = json_array_size(type); i-- > 0;) {
            json_t *t = json_array_get(type, i);
            if (!json_is_string(t)) {
                fail(c, "%s", "'type' must be a string or a list of strings");
                res = -1;
                break;
            }
            int32_t alt = typed(c, s, json_string_value(t), next);
            res = i + 1 == json_array_size(type) ? alt : gram_split(g, alt, res);
            if (res < 0)
                break;
        }
    } else if (type) {
        fail(c, "%s", "'type' must be a string or a list of strings");
    } else if (json_object_get(s, "properties") || json_object_get(s, "required") ||
               json_object_get(s, "additionalProperties")) {
        res = object(c, s, next);
    } else if (json_object_get(s, "items") || json_object_get(s, "prefixItems") ||
               json_object_get(s, "minItems") || json_object_get(s, "maxItems")) {
        res = array(c, s, next);
    } else if (json_object_get(s, "pattern") || json_object_get(s, "format") ||
               json_object_get(s, "minLength") || json_object_get(s, "maxLength")) {
        res = string(c, s, next);
    } else {
        res = call(c, any_rule(c), next); /* {}: any value */
    }
out:
    c->nest--;
    return res;
}

int cvlm_grammar_compile(enum cvlm_rformat kind, const char *schema, size_t len,
                         struct cvlm_grammar **out)
{
    *out = NULL;
    if (kind != CVLM_RFORMAT_JSON_OBJECT && kind != CVLM_RFORMAT_JSON_SCHEMA)
        return cvlm_errf(CVLM_EINVAL, "no grammar for response format %d", (int)kind);
    struct cvlm_grammar *g = calloc(1, sizeof(*g));
    struct sc c = {.g = g, .any = -1, .obj = -1, .arr = -1};
    if (!g)
        return cvlm_errf(CVLM_ENOMEM, "out of memory compiling a schema");
    atomic_init(&g->refs, 1);
    json_error_t jerr;
    if (kind == CVLM_RFORMAT_JSON_SCHEMA &&
        !(c.root = json_loadb(schema ? schema : "", schema ? len : 0, JSON_DECODE_ANY, &jerr))) {
        cvlm_grammar_unref(g);
        return cvlm_errf(CVLM_EINVAL, "json_schema: not JSON: %s", jerr.text);
    }
    int32_t match = gram_emit(g, GOP_MATCH, 0, 0), root;
    c.ret = gram_emit(g, GOP_RET, 0, 0);
    if (kind == CVLM_RFORMAT_JSON_OBJECT)
        root = any_rule(&c) < 0 ? -1 : c.obj;
    else
        root = rule_of(&c, c.root);
    g->start = gram_ws(g, call(&c, root, match));
    int rc = g->start < 0 ? (g->err ? g->err : CVLM_EINVAL) : 0;
    for (int i = 0; !rc && i < g->n_rules; i++)
        if (g->rules[i] < 0)
            rc = cvlm_errf(CVLM_EINVAL, "json_schema: an unresolved rule (internal)");
    json_decref(c.root);
    free(c.memo);
    if (rc) {
        cvlm_grammar_unref(g);
        return rc;
    }
    *out = g;
    return 0;
}
