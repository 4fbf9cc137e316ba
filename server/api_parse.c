/* api_parse.c - request bodies to engine requests (runs on the libuv work pool).
 *
 * Validates the JSON of /v1/chat/completions and /v1/completions field by field (a wrong
 * type is a 400 naming the field; unknown fields are ignored as OpenAI does), decodes
 * data-URL images (base64 alphabet checked first: libb64 silently skips bad characters),
 * turns the conversation into the template's history + query, and prepares one engine
 * request per choice. Everything it writes lives in the conn, which the loop does not
 * touch until the job completes.
 *
 * An http(s) image URL (when the server fetches them, server/fetch.h) splits this in two
 * jobs: the first parses and validates everything and leaves the parsed request in
 * c->pending (with the JSON tree its strings point into) and the URL in c->image_url;
 * the loop fetches the image and hands it over (cvlm_api_set_image); the second job
 * (cvlm_api_prepare_image) makes the engine requests from it exactly as from a data URL.
 */
#include "server/server.h"

#include "server/fetch.h"

#include <b64/cdecode.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>

#define MAX_STOP 16
#define MAX_LOGIT_BIAS 300 /* OpenAI's limit */

/* Everything parsed before the engine requests are made; owns its strings. */
struct parsed {
    struct cvlm_request_params p;
    char *system, *query, **users, **assistants;
    struct cvlm_chat_turn *turns;
    int n_turns;
    const char *stops[MAX_STOP];
    unsigned char *image;
    size_t image_len;
    const char *remote_url; /* an http(s) image URL (inside the JSON tree), to be fetched */
    int have_seed;
    struct cvlm_logit_bias bias[MAX_LOGIT_BIAS];
    char *schema; /* response_format's JSON schema, compact JSON (malloc'd) */
};

/* A parsed request whose image the loop fetches: the JSON tree (the parsed strings point
 * into it) and what was parsed from it. */
struct api_pending {
    json_t *root;
    struct parsed pp;
};

static int bad(struct conn *c, const char *param, const char *fmt, const char *arg)
{
    cvlm_api_error(c, 400, "invalid_request_error", param, NULL, fmt, arg);
    return -1;
}

/* Optional number field in [lo, hi]; absent/null leaves *out. */
static int num(struct conn *c, json_t *o, const char *k, double lo, double hi, double *out)
{
    json_t *v = json_object_get(o, k);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_number(v))
        return bad(c, k, "'%s' must be a number", k);
    double d = json_number_value(v);
    if (!(d >= lo && d <= hi)) {
        cvlm_api_error(c, 400, "invalid_request_error", k, NULL, "'%s' must be between %g and %g",
                       k, lo, hi);
        return -1;
    }
    *out = d;
    return 0;
}

static int integer(struct conn *c, json_t *o, const char *k, long long lo, long long hi,
                   long long *out)
{
    json_t *v = json_object_get(o, k);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_integer(v))
        return bad(c, k, "'%s' must be an integer", k);
    long long x = json_integer_value(v);
    if (x < lo || x > hi) {
        cvlm_api_error(c, 400, "invalid_request_error", k, NULL,
                       "'%s' must be between %lld and %lld", k, lo, hi);
        return -1;
    }
    *out = x;
    return 0;
}

static int boolean(struct conn *c, json_t *o, const char *k, int *out)
{
    json_t *v = json_object_get(o, k);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_boolean(v))
        return bad(c, k, "'%s' must be a boolean", k);
    *out = json_is_true(v);
    return 0;
}

/* Strict base64: alphabet, padding only at the end, length consistent. */
static int b64_valid(const char *s, size_t n)
{
    size_t pad = 0;
    if (n == 0 || n % 4 == 1)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        int ok = (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
                 ch == '+' || ch == '/';
        if (ch == '=') {
            pad++;
            continue;
        }
        if (!ok || pad)
            return 0;
    }
    return pad <= 2 && (pad == 0 || n % 4 == 0);
}

/* data:image/...;base64,XXXX -> decoded bytes in pp->image. */
static int data_url(struct conn *c, const char *url, struct parsed *pp)
{
    const char *comma = strchr(url, ',');
    if (!comma || (size_t)(comma - url) < 12 || strncmp(comma - 7, ";base64", 7))
        return bad(c, "messages", "%s",
                   "image_url data URL must be base64 (data:image/...;base64,)");
    if (strncmp(url + 5, "image/", 6))
        return bad(c, "messages", "%s", "image_url data URL must have an image/* media type");
    const char *b = comma + 1;
    size_t n = strlen(b);
    if (!b64_valid(b, n))
        return bad(c, "messages", "%s", "image_url: invalid base64 data");
    if (!(pp->image = malloc(n / 4 * 3 + 4)))
        return bad(c, NULL, "%s", "out of memory");
    base64_decodestate st;
    base64_init_decodestate(&st);
    pp->image_len = (size_t)base64_decode_block(b, (int)n, (char *)pp->image, &st);
    return 0;
}

/* An image part's URL: a data: URL is decoded here; an http(s) URL is kept for the loop to
 * fetch when the server fetches them, else refused with how to enable it; any other
 * scheme is refused. param: the URL's place in the request, for the error. */
static int image_url(struct conn *c, const char *url, const char *param, struct parsed *pp)
{
    int enabled = cvlm_fetch_enabled(c->s->cfg);
    if (!strncmp(url, "data:", 5))
        return data_url(c, url, pp);
    if (!strncasecmp(url, "http://", 7) || !strncasecmp(url, "https://", 8)) {
        if (!enabled) {
            cvlm_api_error(c, 400, "invalid_request_error", param, "remote_images_disabled",
                           "image_url: this server does not fetch http(s) image URLs: send the "
                           "image as a data: URL (data:image/png;base64,...), or start the "
                           "server with --allowed-media-domains HOST,*.DOMAIN or "
                           "--allow-any-media-domain");
            return -1;
        }
        pp->remote_url = url;
        snprintf(c->image_param, sizeof(c->image_param), "%s", param);
        return 0;
    }
    /* the scheme, when it is one (RFC 3986 characters only: it is echoed in the error) */
    size_t n = strspn(url, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-");
    cvlm_api_error(c, 400, "invalid_request_error", param, "image_url_bad_scheme",
                   "image_url: bad scheme '%.*s': the URL must be a data: URL%s",
                   url[n] == ':' && n <= 20 ? (int)n : 0, url, enabled ? " or an http(s) URL" : "");
    return -1;
}

/* Joins a to *dst with a newline (*dst may be NULL); returns 0 or -1 (no memory). */
static int join(char **dst, const char *a)
{
    struct cvlm_buf b = {0};
    if (*dst && **dst) {
        cvlm_buf_puts(&b, *dst);
        cvlm_buf_append(&b, "\n", 1);
    }
    cvlm_buf_puts(&b, a);
    char *n = cvlm_buf_take(&b, NULL);
    if (!n)
        return -1;
    free(*dst);
    *dst = n;
    return 0;
}

/* A message's content (messages[mi]): a string, null, or a list of text / image_url
 * parts. */
static int content(struct conn *c, json_t *m, size_t mi, int is_user, struct parsed *pp,
                   char **text)
{
    json_t *ct = json_object_get(m, "content"), *part;
    size_t i;
    *text = strdup("");
    if (!*text)
        return bad(c, NULL, "%s", "out of memory");
    if (!ct || json_is_null(ct))
        return is_user ? bad(c, "messages", "%s", "a user message needs 'content'") : 0;
    if (json_is_string(ct)) {
        free(*text);
        *text = strdup(json_string_value(ct));
        return *text ? 0 : -1;
    }
    if (!json_is_array(ct))
        return bad(c, "messages", "%s", "message content must be a string or a list of parts");
    free(*text);
    *text = NULL;
    json_array_foreach (ct, i, part) {
        const char *type = json_string_value(json_object_get(part, "type"));
        if (type && !strcmp(type, "text") && json_is_string(json_object_get(part, "text"))) {
            if (join(text, json_string_value(json_object_get(part, "text"))))
                return -1;
        } else if (type && !strcmp(type, "image_url") && is_user) {
            json_t *iu = json_object_get(part, "image_url");
            const char *url = json_is_string(iu) ? json_string_value(iu)
                                                 : json_string_value(json_object_get(iu, "url"));
            char param[96];
            if (!url)
                return bad(c, "messages", "%s", "image_url part needs image_url.url");
            if (pp->image || pp->remote_url)
                return bad(c, "messages", "%s",
                           "CogVLM takes one image per conversation; "
                           "this request has more than one");
            snprintf(param, sizeof(param), "messages[%zu].content[%zu].image_url.url", mi, i);
            if (image_url(c, url, param, pp))
                return -1;
        } else {
            return bad(c, "messages", "%s",
                       "content parts must be {type: text} or "
                       "{type: image_url} (images in user messages only)");
        }
    }
    if (!*text && !(*text = strdup("")))
        return -1;
    return 0;
}

/* messages -> system text, history turns and the final query. */
static int conversation(struct conn *c, json_t *msgs, struct parsed *pp)
{
    size_t n = json_array_size(msgs), i;
    json_t *m;
    /* pp->query collects the user text since the last assistant turn (pp owns it, so
     * every error path frees it) */
    if (!json_is_array(msgs) || n == 0)
        return bad(c, "messages", "%s", "'messages' must be a non-empty array");
    pp->turns = calloc(n, sizeof(*pp->turns));
    pp->users = calloc(n, sizeof(char *));
    pp->assistants = calloc(n, sizeof(char *));
    if (!pp->turns || !pp->users || !pp->assistants)
        return bad(c, NULL, "%s", "out of memory");
    json_array_foreach (msgs, i, m) {
        const char *role = json_string_value(json_object_get(m, "role"));
        char *text = NULL;
        if (!json_is_object(m) || !role)
            return bad(c, "messages", "%s", "each message needs a string 'role'");
        int user = !strcmp(role, "user"), asst = !strcmp(role, "assistant");
        int sys = !strcmp(role, "system") || !strcmp(role, "developer");
        if (!user && !asst && !sys)
            return bad(c, "messages", "unsupported message role '%s'", role);
        if (content(c, m, i, user, pp, &text)) {
            free(text);
            return -1;
        }
        int rc = 0;
        if (sys)
            rc = join(&pp->system, text);
        else if (user)
            rc = join(&pp->query, text);
        else { /* an assistant turn closes the exchange */
            int t = pp->n_turns++;
            pp->users[t] = pp->query ? pp->query : strdup("");
            pp->assistants[t] = text;
            pp->turns[t] = (struct cvlm_chat_turn){pp->users[t], text};
            pp->query = NULL;
            text = NULL;
        }
        free(text);
        if (rc)
            return bad(c, NULL, "%s", "out of memory");
    }
    if (!pp->query)
        return bad(c, "messages", "%s", "the last message must be from the user");
    if (pp->system) { /* CogVLM's templates have no system slot: it opens the first question */
        char **first = pp->n_turns ? &pp->users[0] : &pp->query;
        char *joined = strdup(pp->system);
        if (!joined || join(&joined, *first))
            return bad(c, NULL, "%s", "out of memory");
        free(*first);
        *first = joined;
        if (pp->n_turns)
            pp->turns[0].user = joined;
    }
    return 0;
}

static int stops(struct conn *c, json_t *root, struct parsed *pp)
{
    json_t *v = json_object_get(root, "stop"), *s;
    size_t i;
    if (!v || json_is_null(v))
        return 0;
    if (json_is_string(v)) {
        pp->stops[0] = json_string_value(v);
        pp->p.n_stop = *pp->stops[0] ? 1 : 0;
        return 0;
    }
    if (!json_is_array(v) || json_array_size(v) > MAX_STOP)
        return bad(c, "stop", "%s", "'stop' must be a string or a list of up to 16 strings");
    json_array_foreach (v, i, s) {
        if (!json_is_string(s))
            return bad(c, "stop", "%s", "'stop' must be a string or a list of strings");
        if (*json_string_value(s))
            pp->stops[pp->p.n_stop++] = json_string_value(s);
    }
    return 0;
}

/* Sampling and output-shape fields shared by both routes. Ranges are OpenAI's where it
 * has one (temperature 0..2, penalties -2..2), else what the sampler accepts; a value
 * outside is a 400 naming the field, never clamped silently. max_completion_tokens (the
 * newer name) wins over max_tokens when both are set. */
static int sampling(struct conn *c, json_t *r, struct parsed *pp)
{
    struct cvlm_request_params *p = &pp->p;
    double temp = 1.0, top_p = 1.0, min_p = 0, rep = 1.0, pres = 0, freq = 0;
    long long top_k = 0, n = 1, seed = 0, max_tokens = c->o.chat ? 0 : 16, mct = 0;
    json_t *so = json_object_get(r, "stream_options");
    if (num(c, r, "temperature", 0, 2, &temp) || num(c, r, "top_p", 0, 1, &top_p) ||
        integer(c, r, "top_k", -1, 1000000, &top_k) || num(c, r, "min_p", 0, 1, &min_p) ||
        num(c, r, "repetition_penalty", 0.01, 10, &rep) ||
        num(c, r, "presence_penalty", -2, 2, &pres) ||
        num(c, r, "frequency_penalty", -2, 2, &freq) ||
        integer(c, r, "n", 1, c->s->cfg->max_n, &n) ||
        integer(c, r, "seed", INT64_MIN, INT64_MAX, &seed) ||
        integer(c, r, "max_tokens", 1, 1 << 30, &max_tokens) ||
        integer(c, r, "max_completion_tokens", 1, 1 << 30, &mct) ||
        boolean(c, r, "stream", &c->o.stream) || stops(c, r, pp))
        return -1;
    if (top_p <= 0)
        return bad(c, "top_p", "%s", "'top_p' must be greater than 0");
    if (so && !json_is_null(so) &&
        (!json_is_object(so) || boolean(c, so, "include_usage", &c->o.include_usage)))
        return c->status ? -1
                         : bad(c, "stream_options", "%s", "'stream_options' must be an object");
    if (so && !json_is_null(so) && !c->o.stream) /* as OpenAI answers it */
        return bad(c, "stream_options", "%s",
                   "'stream_options' is only allowed with 'stream': true");
    pp->have_seed = json_is_integer(json_object_get(r, "seed"));
    cvlm_sampling_defaults(&p->sampling);
    p->sampling.temperature = (float)temp;
    p->sampling.top_p = (float)top_p;
    p->sampling.top_k = top_k < 0 ? 0 : (int)top_k;
    p->sampling.min_p = (float)min_p;
    p->sampling.repetition_penalty = (float)rep;
    p->sampling.presence_penalty = (float)pres;
    p->sampling.frequency_penalty = (float)freq;
    p->sampling.seed = (uint64_t)seed;
    p->max_tokens = (int)(mct ? mct : max_tokens);
    p->stop = pp->stops;
    c->o.n = (int)n;
    return 0;
}

/* logit_bias: {"token id": bias in [-100, 100], ...}; the engine checks the ids against
 * the vocabulary. */
static int logit_bias(struct conn *c, json_t *r, struct parsed *pp)
{
    json_t *v = json_object_get(r, "logit_bias"), *b;
    const char *key;
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_object(v))
        return bad(c, "logit_bias", "%s", "'logit_bias' must be an object of token id -> bias");
    if (json_object_size(v) > MAX_LOGIT_BIAS)
        return bad(c, "logit_bias", "%s", "'logit_bias' may hold at most 300 tokens");
    json_object_foreach (v, key, b) {
        char *end;
        long id = strtol(key, &end, 10);
        if (!*key || *end || id < 0 || id > INT32_MAX)
            return bad(c, "logit_bias", "logit_bias: '%.40s' is not a token id", key);
        if (!json_is_number(b) || !(json_number_value(b) >= -100 && json_number_value(b) <= 100))
            return bad(c, "logit_bias",
                       "logit_bias: the bias of token %.40s must be a number "
                       "between -100 and 100",
                       key);
        pp->bias[pp->p.n_logit_bias++] =
            (struct cvlm_logit_bias){(int32_t)id, (float)json_number_value(b)};
    }
    pp->p.logit_bias = pp->bias;
    return 0;
}

/* response_format: text, json_object, or json_schema {name, schema, strict, description}
 * (OpenAI's structured outputs). The schema goes to the engine as compact JSON text with
 * its key order kept (properties are produced in that order); the engine compiles it, and
 * refuses what it does not support by keyword (400, param response_format). */
static int response_format(struct conn *c, json_t *r, struct parsed *pp)
{
    json_t *rf = json_object_get(r, "response_format");
    if (!rf || json_is_null(rf))
        return 0;
    const char *type = json_string_value(json_object_get(rf, "type"));
    if (!json_is_object(rf) || !type)
        return bad(c, "response_format", "%s",
                   "'response_format' must be an object with a string 'type'");
    if (!strcmp(type, "text"))
        return 0;
    if (!strcmp(type, "json_object")) {
        pp->p.response_format = CVLM_RFORMAT_JSON_OBJECT;
        return 0;
    }
    if (strcmp(type, "json_schema"))
        return bad(c, "response_format",
                   "response_format type '%.40s' is not supported (text, json_object, "
                   "json_schema are)",
                   type);
    json_t *js = json_object_get(rf, "json_schema");
    if (!json_is_object(js))
        return bad(c, "response_format", "%s",
                   "response_format of type json_schema needs a 'json_schema' object");
    const char *name = json_string_value(json_object_get(js, "name"));
    size_t nlen = name ? strlen(name) : 0;
    if (!name || nlen == 0 || nlen > 64 ||
        strspn(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLM"
                     "NOPQRSTUVWXYZ0123456789_-") != nlen)
        return bad(c, "response_format", "%s",
                   "json_schema.name is required: 1 to 64 of a-z, A-Z, 0-9, _ and -");
    json_t *strict = json_object_get(js, "strict"), *desc = json_object_get(js, "description");
    if (strict && !json_is_boolean(strict) && !json_is_null(strict))
        return bad(c, "response_format", "%s", "json_schema.strict must be a boolean");
    if (desc && !json_is_string(desc) && !json_is_null(desc))
        return bad(c, "response_format", "%s", "json_schema.description must be a string");
    json_t *schema = json_object_get(js, "schema");
    if (schema && !json_is_object(schema) && !json_is_boolean(schema))
        return bad(c, "response_format", "%s", "json_schema.schema must be a JSON Schema object");
    pp->schema = schema ? json_dumps(schema, JSON_COMPACT | JSON_ENCODE_ANY) : strdup("{}");
    if (!pp->schema)
        return bad(c, NULL, "%s", "out of memory");
    pp->p.response_format = CVLM_RFORMAT_JSON_SCHEMA;
    pp->p.json_schema = pp->schema;
    pp->p.json_schema_len = strlen(pp->schema);
    return 0;
}

/* Fields clients send that this server does not implement yet: a clear 400 naming the
 * field, never silently ignored (the client would trust output it did not get). */
static int unsupported(struct conn *c, json_t *r)
{
    json_t *v;
    static const char *const lists[] = {"tools", "functions"};
    for (size_t i = 0; i < 2; i++) {
        v = json_object_get(r, lists[i]);
        if (v && !json_is_null(v) && !(json_is_array(v) && json_array_size(v) == 0))
            return bad(c, lists[i], "'%s' (function calling) is not supported", lists[i]);
    }
    static const char *const choices[] = {"tool_choice", "function_call"};
    for (size_t i = 0; i < 2; i++) {
        v = json_object_get(r, choices[i]);
        if (v && !json_is_null(v) && !(json_is_string(v) && !strcmp(json_string_value(v), "none")))
            return bad(c, choices[i], "'%s' (function calling) is not supported", choices[i]);
    }
    return 0;
}

static int logprob_fields(struct conn *c, json_t *r)
{
    c->o.logprobs = -1;
    if (c->o.chat) {
        int want = 0;
        long long top = -1;
        if (boolean(c, r, "logprobs", &want) || integer(c, r, "top_logprobs", 0, 20, &top))
            return -1;
        if (top >= 0 && !want)
            return bad(c, "top_logprobs", "%s", "'top_logprobs' needs 'logprobs': true");
        c->o.logprobs = want ? (int)(top < 0 ? 0 : top) : -1;
        return 0;
    }
    long long lp = -1;
    json_t *echo = json_object_get(r, "echo"), *suffix = json_object_get(r, "suffix");
    if (integer(c, r, "logprobs", 0, 5, &lp))
        return -1;
    if (echo && json_is_true(echo))
        return bad(c, "echo", "%s", "'echo' is not supported");
    if (suffix && !json_is_null(suffix))
        return bad(c, "suffix", "%s", "'suffix' is not supported");
    c->o.logprobs = (int)lp;
    return 0;
}

static int prompt_field(struct conn *c, json_t *r, struct parsed *pp)
{
    json_t *v = json_object_get(r, "prompt");
    if (json_is_array(v) && json_array_size(v) == 1)
        v = json_array_get(v, 0);
    if (!json_is_string(v))
        return bad(c, "prompt", "%s", "'prompt' must be a string (or a list of one string)");
    pp->query = strdup(json_string_value(v));
    pp->p.raw = 1;
    return pp->query ? 0 : -1;
}

/* The server's own request extensions, all under "cogvlm" (an object): for now only
 * "boxes": "pixels" (chat only: a completion prompt carries no image). An unknown key or
 * value is a 400 naming it, so that a client never trusts an extension it did not get. */
static int extension(struct conn *c, json_t *r)
{
    json_t *ext = json_object_get(r, "cogvlm"), *v;
    const char *key;
    if (!ext || json_is_null(ext))
        return 0;
    if (!json_is_object(ext))
        return bad(c, "cogvlm", "%s", "'cogvlm' must be an object");
    json_object_foreach (ext, key, v) {
        if (strcmp(key, "boxes")) {
            char param[64];
            snprintf(param, sizeof(param), "cogvlm.%.40s", key);
            cvlm_api_error(c, 400, "invalid_request_error", param, NULL,
                           "unknown field 'cogvlm.%.40s' (the extension knows 'boxes')", key);
            return -1;
        }
        if (!json_is_string(v) || strcmp(json_string_value(v), "pixels"))
            return bad(c, "cogvlm.boxes", "%s", "'cogvlm.boxes' must be \"pixels\"");
        if (!c->o.chat)
            return bad(c, "cogvlm.boxes", "%s",
                       "'cogvlm.boxes' is only available on /v1/chat/completions");
        c->o.boxes = 1;
    }
    return 0;
}

/* `user` (OpenAI: an end-user id for abuse monitoring): a string of at most 256
 * characters; kept (256 bytes at most) for the request's log line, never echoed. */
static int user_field(struct conn *c, json_t *r)
{
    json_t *v = json_object_get(r, "user");
    size_t chars = 0;
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_string(v))
        return bad(c, "user", "%s", "'user' must be a string");
    for (const char *p = json_string_value(v); *p; p++)
        chars += ((unsigned char)*p & 0xc0u) != 0x80u;
    if (chars > 256)
        return bad(c, "user", "%s", "'user' must be at most 256 characters");
    snprintf(c->o.user, sizeof(c->o.user), "%s", json_string_value(v));
    return 0;
}

/* Engine error -> HTTP status and error body. */
static void engine_error(struct conn *c, int rc)
{
    const char *msg = cvlm_last_error();
    if (!strncmp(msg, "json_schema:", 12) && rc != CVLM_ENOMEM) /* the grammar compiler's */
        cvlm_api_error(c, 400, "invalid_request_error", "response_format", NULL, "%s", msg);
    else if (rc == CVLM_ETOOBIG && strstr(msg, "context"))
        cvlm_api_error(c, 400, "invalid_request_error", "max_tokens", "context_length_exceeded",
                       "%s", msg);
    else if (rc == CVLM_ETOOBIG)
        cvlm_api_error(c, 413, "invalid_request_error", "messages", "image_too_large", "%s", msg);
    else if (rc == CVLM_EFORMAT || rc == CVLM_EUNSUPPORTED)
        cvlm_api_error(c, 400, "invalid_request_error", "messages", "invalid_image",
                       "invalid image: %s", msg);
    else if (rc == CVLM_EINVAL)
        cvlm_api_error(c, 400, "invalid_request_error", NULL, NULL, "%s", msg);
    else
        cvlm_api_error(c, 500, "server_error", NULL, NULL, "%s", msg);
}

static void parsed_free(struct parsed *pp)
{
    for (int i = 0; i < pp->n_turns; i++) {
        free(pp->users[i]);
        free(pp->assistants[i]);
    }
    free(pp->users);
    free(pp->assistants);
    free(pp->turns);
    free(pp->system);
    free(pp->query);
    free(pp->image);
    free(pp->schema);
}

/* One engine request per choice; seeds are the request's seed + index, or random. The
 * choices are independent engine requests (each its own KV blocks and sampler) that share
 * one prompt: the prefix cache makes the second to n-th prefill nearly free, and each
 * choice streams and finishes on its own. Seed + index keeps a seeded request with n > 1
 * reproducible while its choices still differ. */
static int make_choices(struct conn *c, struct parsed *pp)
{
    if (!(c->ch = calloc((size_t)c->o.n, sizeof(*c->ch))))
        return bad(c, NULL, "%s", "out of memory");
    c->n_ch = c->o.n;
    pp->p.prompt = pp->query;
    pp->p.history = pp->turns;
    pp->p.n_history = pp->n_turns;
    pp->p.image = pp->image;
    pp->p.image_len = pp->image_len;
    pp->p.logprobs = c->o.logprobs;
    uint64_t base = pp->p.sampling.seed;
    if (!pp->have_seed && getrandom(&base, sizeof(base), 0) != sizeof(base))
        base = (uint64_t)c->t_start * 2654435761u;
    for (int i = 0; i < c->n_ch; i++) {
        pp->p.sampling.seed = base + (uint64_t)i;
        int rc = cvlm_request_create(c->s->engine, &pp->p, &c->ch[i].r);
        if (rc) {
            engine_error(c, rc);
            return -1;
        }
    }
    cvlm_request_image_size(c->ch[0].r, &c->o.image_wh[0], &c->o.image_wh[1]);
    return 0;
}

void cvlm_api_prepare(struct conn *c)
{
    struct api_pending *pend = calloc(1, sizeof(*pend)); /* kept when the image is fetched */
    struct parsed *pp = pend ? &pend->pp : NULL;
    json_error_t jerr;
    json_t *root = NULL, *model;
    c->o.chat = !strcmp(c->route, "/v1/chat/completions");
    if (!pend) {
        bad(c, NULL, "%s", "out of memory");
        return;
    }
    root = json_loadb(c->body.p ? c->body.p : "", c->body.len, 0, &jerr);
    if (!root) {
        cvlm_api_error(c, 400, "invalid_request_error", NULL, "invalid_json",
                       "invalid JSON body: %s (at byte %d)", jerr.text, jerr.position);
        goto out;
    }
    if (!json_is_object(root)) {
        bad(c, NULL, "%s", "the request body must be a JSON object");
        goto out;
    }
    model = json_object_get(root, "model");
    if (!json_is_string(model)) {
        bad(c, "model", "%s", "'model' is required and must be a string");
        goto out;
    }
    if (strcmp(json_string_value(model), c->s->model_id)) { /* as OpenAI answers it */
        cvlm_api_error(c, 404, "invalid_request_error", "model", "model_not_found",
                       "the model '%.200s' does not exist (this server serves '%s')",
                       json_string_value(model), c->s->model_id);
        goto out;
    }
    snprintf(c->o.model, sizeof(c->o.model), "%s", c->s->model_id);
    if (user_field(c, root) || sampling(c, root, pp) || logprob_fields(c, root) ||
        logit_bias(c, root, pp) || unsupported(c, root) || response_format(c, root, pp) ||
        extension(c, root))
        goto out;
    if (c->o.chat ? conversation(c, json_object_get(root, "messages"), pp)
                  : prompt_field(c, root, pp))
        goto out;
    if (pp->remote_url) { /* the loop fetches it; cvlm_api_prepare_image goes on */
        pend->root = root;
        c->pending = pend;
        c->image_url = pp->remote_url;
        return;
    }
    make_choices(c, pp);
out:
    if (c->status && !c->err_msg[0])
        snprintf(c->err_msg, sizeof(c->err_msg), "invalid request");
    parsed_free(pp);
    json_decref(root);
    free(pend);
}

void cvlm_api_set_image(struct conn *c, unsigned char *data, size_t len)
{
    if (!c->pending) {
        free(data);
        return;
    }
    free(c->pending->pp.image);
    c->pending->pp.image = data;
    c->pending->pp.image_len = len;
}

void cvlm_api_prepare_image(struct conn *c)
{
    if (!c->pending) {
        cvlm_api_error(c, 500, "server_error", NULL, NULL, "no parsed request to finish");
        return;
    }
    make_choices(c, &c->pending->pp);
    /* the fetched bytes did not decode: the error points at the URL they came from */
    if (c->status && !strcmp(c->err_code, "invalid_image"))
        snprintf(c->err_param, sizeof(c->err_param), "%s", c->image_param);
    cvlm_api_pending_free(c);
}

void cvlm_api_pending_free(struct conn *c)
{
    struct api_pending *pend = c->pending;
    if (!pend)
        return;
    parsed_free(&pend->pp);
    json_decref(pend->root);
    free(pend);
    c->pending = NULL;
    c->image_url = NULL;
}
