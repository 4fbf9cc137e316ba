/* api_render.c - OpenAI-shaped response bodies: errors, completions, SSE chunks.
 *
 * Runs on the loop thread (cvlm_api_error also on the work pool, before the loop looks
 * at the conn). Output text from the engine is whole UTF-8 already; token strings for
 * logprobs may be partial byte sequences, so they are made valid (U+FFFD) for JSON and
 * carried exactly in `bytes`.
 */
#include "server/server.h"

#include "server/boxes.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void cvlm_api_error(struct conn *c, int status, const char *type, const char *param,
                    const char *code, const char *fmt, ...)
{
    va_list ap;
    if (c->status) /* keep the first error */
        return;
    c->status = status;
    va_start(ap, fmt);
    vsnprintf(c->err_msg, sizeof(c->err_msg), fmt, ap);
    va_end(ap);
    snprintf(c->err_type, sizeof(c->err_type), "%s", type);
    snprintf(c->err_param, sizeof(c->err_param), "%s", param ? param : "");
    snprintf(c->err_code, sizeof(c->err_code), "%s", code ? code : "");
}

/* Replaces invalid UTF-8 with U+FFFD (the engine's messages and token pieces may carry
 * arbitrary bytes; JSON strings may not). */
static char *utf8_clean(const char *s, size_t n)
{
    char *o = malloc(n * 3 + 1), *p = o;
    if (!o)
        return NULL;
    for (size_t i = 0; i < n;) {
        unsigned char b = (unsigned char)s[i];
        int len = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 0;
        int ok = len > 0 && i + (size_t)len <= n;
        for (int k = 1; ok && k < len; k++)
            ok = ((unsigned char)s[i + k] >> 6) == 2;
        if (ok && len == 2)
            ok = b >= 0xc2;
        if (ok && len == 3) {
            unsigned cp = (b & 15u) << 12 | ((unsigned char)s[i + 1] & 63u) << 6 |
                          ((unsigned char)s[i + 2] & 63u);
            ok = cp >= 0x800 && (cp < 0xd800 || cp > 0xdfff);
        }
        if (ok && len == 4) {
            unsigned cp = (b & 7u) << 18 | ((unsigned char)s[i + 1] & 63u) << 12;
            ok = cp >= 0x10000 && cp <= 0x10ffff;
        }
        if (!ok) {
            memcpy(p, "\xef\xbf\xbd", 3);
            p += 3;
            i++;
            continue;
        }
        memcpy(p, s + i, (size_t)len);
        p += len;
        i += (size_t)len;
    }
    *p = 0;
    return o;
}

static json_t *jstr(const char *s, size_t n)
{
    char *clean = utf8_clean(s, n);
    json_t *j = clean ? json_string(clean) : NULL;
    free(clean);
    return j ? j : json_string("");
}

static char *dump(json_t *j, size_t *len)
{
    char *s = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    *len = s ? strlen(s) : 0;
    return s;
}

char *cvlm_api_error_body(const struct conn *c, size_t *len)
{
    json_t *e = json_object();
    json_object_set_new(e, "message", jstr(c->err_msg, strlen(c->err_msg)));
    json_object_set_new(e, "type", json_string(c->err_type[0] ? c->err_type : "server_error"));
    json_object_set_new(e, "param", c->err_param[0] ? json_string(c->err_param) : json_null());
    json_object_set_new(e, "code", c->err_code[0] ? json_string(c->err_code) : json_null());
    return dump(json_pack("{so}", "error", e), len);
}

/* The finish_reason of a choice that ended on its own; a cancelled or failed choice has
 * none (its request ends in an error instead). */
static const char *finish_name(enum cvlm_finish f)
{
    return f == CVLM_FINISH_LENGTH ? "length" : f == CVLM_FINISH_STOP ? "stop" : NULL;
}

/* A choice that did not end on its own: a non-streaming request becomes this error
 * reply; a stream (whose 200 and earlier chunks are sent) ends with this error event
 * instead of a finish chunk. The first failure wins. */
static void choice_failed(struct conn *c, int status, const char *type, const char *code,
                          const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void choice_failed(struct conn *c, int status, const char *type, const char *code,
                          const char *fmt, ...)
{
    char msg[sizeof(c->err_msg)];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (!c->o.stream) {
        cvlm_api_error(c, status, type, NULL, code, "%s", msg);
        return;
    }
    if (c->gen_failed)
        return;
    c->gen_failed = 1;
    c->fail_status = status;
    snprintf(c->err_msg, sizeof(c->err_msg), "%s", msg);
    snprintf(c->err_type, sizeof(c->err_type), "%s", type);
    snprintf(c->err_code, sizeof(c->err_code), "%s", code ? code : "");
}

/* Why a cancelled choice was cancelled, as the client's error. */
static void choice_cancelled(struct conn *c)
{
    if (c->cut == CUT_TIMEOUT)
        choice_failed(c, 504, "server_error", "request_timeout",
                      "the request did not finish within the server's request timeout (%d s)",
                      c->s->cfg->request_timeout);
    else if (c->cut == CUT_DRAIN)
        choice_failed(c, 503, "service_unavailable", "server_shutting_down",
                      "the server is shutting down and the request did not finish within "
                      "its drain timeout (%d s)",
                      c->s->cfg->drain_timeout);
    else
        choice_failed(c, 503, "service_unavailable", "request_cancelled",
                      "the request was cancelled");
}

/* ---- logprobs ---------------------------------------------------------------------------- */

/* One token's entry. `strip` leading bytes of the token's own text are left out: the
 * ones the detokenizer did not put into the output (the first token's SentencePiece
 * space), so that the chosen tokens' strings concatenate to the content. */
static json_t *token_obj(struct cvlm_srv *s, int32_t id, float lp, int strip, int with_bytes)
{
    char buf[256];
    size_t n = cvlm_engine_token_text(s->engine, id, buf, sizeof(buf));
    size_t k = strip > 0 && (size_t)strip <= n && buf[0] == ' ' ? (size_t)strip : 0;
    json_t *o = json_object(), *bytes = json_array();
    for (size_t i = k; i < n; i++)
        json_array_append_new(bytes, json_integer((unsigned char)buf[i]));
    json_object_set_new(o, "token", jstr(buf + k, n - k));
    json_object_set_new(o, "logprob", json_real(lp));
    if (with_bytes)
        json_object_set_new(o, "bytes", bytes);
    else
        json_decref(bytes);
    return o;
}

/* Chat-format entries for the tokens of one take. */
static json_t *lp_entries(struct cvlm_srv *s, const struct cvlm_output *o)
{
    json_t *arr = json_array();
    for (int i = 0; i < o->n_tokens; i++) {
        const struct cvlm_token_out *t = &o->tokens[i];
        /* the alternatives at this position read as they would have had they been chosen */
        json_t *e = token_obj(s, t->id, t->logprob, t->lead_strip, 1), *top = json_array();
        for (int k = 0; k < t->n_top; k++)
            json_array_append_new(top,
                                  token_obj(s, t->top_id[k], t->top_logprob[k], t->lead_strip, 1));
        json_object_set_new(e, "top_logprobs", top);
        json_array_append_new(arr, e);
    }
    return arr;
}

/* Characters (code points) in n bytes of UTF-8: the bytes that do not continue one. A
 * token that ends inside a character counts it; the token that completes it does not. */
static size_t utf8_chars(json_t *bytes)
{
    size_t i, n = 0;
    json_t *b;
    json_array_foreach (bytes, i, b)
        n += ((unsigned)json_integer_value(b) & 0xc0u) != 0x80u;
    return n;
}

/* Completions format ({tokens, token_logprobs, top_logprobs, text_offset}) from chat
 * entries; offsets count characters of the text from `offset0`, as OpenAI's do. */
static json_t *lp_legacy(json_t *entries, size_t offset0)
{
    json_t *tokens = json_array(), *lps = json_array(), *tops = json_array(), *offs = json_array();
    json_t *e, *t;
    size_t i, k, off = offset0;
    json_array_foreach (entries, i, e) {
        json_t *tok = json_object_get(e, "token"), *top = json_object();
        json_array_append(tokens, tok);
        json_array_append(lps, json_object_get(e, "logprob"));
        json_array_foreach (json_object_get(e, "top_logprobs"), k, t)
            json_object_set(top, json_string_value(json_object_get(t, "token")),
                            json_object_get(t, "logprob"));
        json_array_append_new(tops, top);
        json_array_append_new(offs, json_integer((json_int_t)off));
        off += utf8_chars(json_object_get(e, "bytes"));
    }
    return json_pack("{sosososo}", "tokens", tokens, "token_logprobs", lps, "top_logprobs", tops,
                     "text_offset", offs);
}

/* ---- chunks and bodies ------------------------------------------------------------------- */

static json_t *envelope(const struct conn *c, int chunk)
{
    json_t *j = json_object();
    char id[80];
    snprintf(id, sizeof(id), "%s-%s", c->o.chat ? "chatcmpl" : "cmpl", c->id);
    json_object_set_new(j, "id", json_string(id));
    json_object_set_new(j, "object",
                        json_string(c->o.chat
                                        ? (chunk ? "chat.completion.chunk" : "chat.completion")
                                        : "text_completion"));
    json_object_set_new(j, "created", json_integer(c->created));
    json_object_set_new(j, "model", json_string(c->o.model));
    json_object_set_new(j, "system_fingerprint", json_string("cogvlm-server"));
    return j;
}

static json_t *usage(const struct conn *c)
{
    int p = 0, g = 0;
    for (int i = 0; i < c->n_ch; i++) {
        p += i == 0 ? c->ch[i].prompt_tokens : 0; /* the choices share one prompt */
        g += c->ch[i].completion_tokens;
    }
    return json_pack("{sisisi}", "prompt_tokens", p, "completion_tokens", g, "total_tokens", p + g);
}

/* Appends `data: <json>\n\n` (consumes j). Out of memory fails the stream's buffer, which
 * then ends the stream with an error (http.c), never with a silently missing event. */
static void sse_event(struct conn *c, json_t *j)
{
    size_t n;
    char *s = dump(j, &n);
    if (!s) {
        c->sse.failed = 1;
        return;
    }
    cvlm_buf_append(&c->sse, "data: ", 6);
    cvlm_buf_append(&c->sse, s, n);
    cvlm_buf_append(&c->sse, "\n\n", 2);
    free(s);
}

/* The extension's boxes of choice i's whole text (server/boxes.h); an out-of-memory
 * fails the reply (or the stream), never a list silently short. */
static json_t *boxes_of(struct conn *c, int i)
{
    const struct cvlm_buf *t = &c->ch[i].text;
    json_t *b = t->failed
                    ? NULL
                    : cvlm_boxes_json(t->p ? t->p : "", t->len, c->o.image_wh[0], c->o.image_wh[1]);
    if (!b) {
        c->sse.failed |= c->o.stream;
        cvlm_api_error(c, 500, "server_error", NULL, NULL, "out of memory for the boxes");
    }
    return b ? b : json_array();
}

/* One streamed chunk for choice i: a role/content delta, and/or the finish (with the
 * choice's boxes when the client asked for them). */
static void stream_chunk(struct conn *c, int i, const char *text, size_t len, json_t *lp,
                         const char *finish, int role)
{
    json_t *j = envelope(c, 1), *ch = json_object(), *lpo = json_null();
    json_object_set_new(ch, "index", json_integer(i));
    if (lp && json_array_size(lp))
        lpo = c->o.chat ? json_pack("{sOsn}", "content", lp, "refusal")
                        : lp_legacy(lp, c->ch[i].lp_off);
    if (c->o.chat) {
        json_t *delta = json_object();
        if (role)
            json_object_set_new(delta, "role", json_string("assistant"));
        if (role || len)
            json_object_set_new(delta, "content", jstr(text, len));
        if (finish && c->o.boxes)
            json_object_set_new(delta, "boxes", boxes_of(c, i));
        json_object_set_new(ch, "delta", delta);
    } else {
        json_object_set_new(ch, "text", jstr(text, len));
    }
    json_object_set_new(ch, "logprobs", lpo);
    json_object_set_new(ch, "finish_reason", finish ? json_string(finish) : json_null());
    json_object_set_new(j, "choices", json_pack("[o]", ch));
    if (c->o.include_usage && c->o.chat) /* the completions chunk schema has no null usage */
        json_object_set_new(j, "usage", json_null());
    sse_event(c, j);
}

static void observe(struct cvlm_srv *s, const struct cvlm_output *o)
{
    struct cvlm_metrics *m = &s->metrics;
    if (o->finish == CVLM_FINISH_CANCELLED || o->finish == CVLM_FINISH_ERROR)
        return;
    cvlm_hist_observe(&m->e2e, o->e2e_ms / 1e3);
    cvlm_hist_observe(&m->queue, o->queue_ms / 1e3);
    if (o->completion_tokens > 0)
        cvlm_hist_observe(&m->ttft, o->ttft_ms / 1e3);
    if (o->vision_ms > 0)
        cvlm_hist_observe(&m->vision, o->vision_ms / 1e3);
    for (int k = 1; k < o->completion_tokens; k++) /* each gap, at the request's mean */
        cvlm_hist_observe(&m->itl, (o->e2e_ms - o->ttft_ms) / 1e3 / (o->completion_tokens - 1));
}

/* Appends the items of JSON array `arr` to b as compact text, comma-separated. */
static int json_items(struct cvlm_buf *b, json_t *arr)
{
    size_t i;
    json_t *v;
    json_array_foreach (arr, i, v) {
        char *t = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
        if (!t)
            return -1;
        if (b->len)
            cvlm_buf_append(b, ",", 1);
        cvlm_buf_puts(b, t);
        free(t);
    }
    return b->failed ? -1 : 0;
}

/* Non-streaming: one take's logprobs entries, rendered now and kept as text. */
static void keep_logprobs(struct conn *c, struct choice *ch, json_t *entries)
{
    int rc = 0;
    if (c->o.chat) {
        rc = json_items(&ch->lp[0], entries);
    } else {
        static const char *const keys[4] = {"tokens", "token_logprobs", "top_logprobs",
                                            "text_offset"};
        json_t *leg = lp_legacy(entries, ch->lp_off), *e;
        size_t i;
        for (int k = 0; !rc && k < 4; k++)
            rc = json_items(&ch->lp[k], json_object_get(leg, keys[k]));
        json_array_foreach (entries, i, e)
            ch->lp_off += utf8_chars(json_object_get(e, "bytes"));
        json_decref(leg);
    }
    if (rc)
        cvlm_api_error(c, 500, "server_error", NULL, NULL, "out of memory for logprobs");
}

/* Moves one take of choice i into the stream or the accumulators. */
static void collect_one(struct conn *c, int i, struct cvlm_output *o)
{
    struct choice *ch = &c->ch[i];
    json_t *lp = o->n_tokens && c->o.logprobs >= 0 ? lp_entries(c->s, o) : NULL;
    ch->prompt_tokens = o->prompt_tokens;
    ch->completion_tokens = o->completion_tokens;
    if (c->o.stream) {
        if (c->o.chat && !ch->role_sent) /* the first delta carries the role alone */
            stream_chunk(c, i, "", 0, NULL, NULL, 1);
        ch->role_sent = 1;
        if (c->o.boxes && o->text_len) /* failure: the final chunk then fails the stream */
            cvlm_buf_append(&ch->text, o->text, o->text_len);
        if (o->text_len || lp)
            stream_chunk(c, i, o->text ? o->text : "", o->text_len, lp, NULL, 0);
        for (size_t k = 0; lp && k < json_array_size(lp); k++)
            ch->lp_off += utf8_chars(json_object_get(json_array_get(lp, k), "bytes"));
        if (finish_name(o->finish)) /* a failed or cancelled one ends in an error event */
            stream_chunk(c, i, "", 0, NULL, finish_name(o->finish), 0);
    } else {
        if (o->text_len && cvlm_buf_append(&ch->text, o->text, o->text_len))
            cvlm_api_error(c, 500, "server_error", NULL, NULL, "out of memory for the output");
        if (lp)
            keep_logprobs(c, ch, lp);
    }
    json_decref(lp);
    if (o->finish) {
        ch->done = 1;
        ch->finish = o->finish;
        observe(c->s, o);
        if (o->finish == CVLM_FINISH_ERROR)
            choice_failed(c, 500, "server_error", NULL, "generation failed: %s", o->error);
        else if (o->finish == CVLM_FINISH_CANCELLED)
            choice_cancelled(c);
    }
}

/* The event that ends a stream whose generation failed or was cut: OpenAI's error object
 * (the status it stands for is in the log and the metrics). */
static void sse_error(struct conn *c)
{
    json_t *e = json_object();
    json_object_set_new(e, "message", jstr(c->err_msg, strlen(c->err_msg)));
    json_object_set_new(e, "type", json_string(c->err_type[0] ? c->err_type : "server_error"));
    json_object_set_new(e, "param", json_null());
    json_object_set_new(e, "code", c->err_code[0] ? json_string(c->err_code) : json_null());
    sse_event(c, json_pack("{so}", "error", e));
}

int cvlm_api_collect(struct conn *c)
{
    struct cvlm_output o;
    int was_done = 1;
    for (int i = 0; i < c->n_ch; i++)
        was_done &= !c->ch[i].r || c->ch[i].done;
    if (was_done)
        return 1;
    for (int i = 0; i < c->n_ch; i++)
        while (c->ch[i].r && !c->ch[i].done && cvlm_request_take(c->ch[i].r, &o)) {
            collect_one(c, i, &o);
            cvlm_output_free(&o);
        }
    for (int i = 0; i < c->n_ch; i++)
        if (c->ch[i].r && !c->ch[i].done)
            return 0;
    if (c->o.stream && !c->sse_end) {
        if (c->gen_failed) /* a failed or cut generation: say so in the stream */
            sse_error(c);
        if (c->o.include_usage) {
            json_t *j = envelope(c, 1);
            json_object_set_new(j, "choices", json_array());
            json_object_set_new(j, "usage", usage(c));
            sse_event(c, j);
        }
        cvlm_buf_puts(&c->sse, "data: [DONE]\n\n");
        c->sse_end = 1;
    }
    return 1;
}

/* Placeholder k of choice i: a string no output can produce (the nonce is per body). */
static void marker(char *buf, size_t cap, unsigned long long nonce, int i, int k)
{
    snprintf(buf, cap, "\001cvlm-lp-%016llx-%d-%d", nonce, i, k);
}

/* Replaces each quoted placeholder in body by `[items]` of its buffer. */
static char *splice_logprobs(const struct conn *c, char *body, size_t *len,
                             unsigned long long nonce)
{
    size_t total = *len + 1;
    for (int i = 0; i < c->n_ch; i++)
        for (int k = 0; k < 4; k++)
            total += c->ch[i].lp[k].len + 2;
    char *out = malloc(total), *w = out, *r = body, m[80], q[96];
    if (!out) {
        free(body);
        return NULL;
    }
    for (int i = 0; i < c->n_ch; i++)
        for (int k = 0; k < (c->o.chat ? 1 : 4); k++) {
            marker(m, sizeof(m), nonce, i, k);
            snprintf(q, sizeof(q), "\"\\u0001%s\"", m + 1); /* as json_dumps writes it */
            char *at = strstr(r, q);
            if (!at)
                continue;
            memcpy(w, r, (size_t)(at - r));
            w += at - r;
            *w++ = '[';
            memcpy(w, c->ch[i].lp[k].p ? c->ch[i].lp[k].p : "", c->ch[i].lp[k].len);
            w += c->ch[i].lp[k].len;
            *w++ = ']';
            r = at + strlen(q);
        }
    size_t rest = strlen(r);
    memcpy(w, r, rest + 1);
    *len = (size_t)(w - out) + rest;
    free(body);
    return out;
}

char *cvlm_api_final_body(struct conn *c, size_t *len)
{
    if (c->status)
        return NULL; /* the error reply is built from c->err_* */
    json_t *j = envelope(c, 0), *choices = json_array();
    unsigned long long nonce = ((unsigned long long)(uintptr_t)c << 20) ^
                               (unsigned long long)c->created * 0x9e3779b97f4a7c15ull;
    char m[4][80];
    for (int i = 0; i < c->n_ch; i++) {
        struct choice *ch = &c->ch[i];
        json_t *o = json_object(), *lp = json_null();
        for (int k = 0; k < 4; k++)
            marker(m[k], sizeof(m[k]), nonce, i, k);
        json_object_set_new(o, "index", json_integer(i));
        if (c->o.logprobs >= 0)
            lp = c->o.chat ? json_pack("{sssn}", "content", m[0], "refusal")
                           : json_pack("{ssssssss}", "tokens", m[0], "token_logprobs", m[1],
                                       "top_logprobs", m[2], "text_offset", m[3]);
        if (c->o.chat) {
            json_t *msg = json_pack("{sssosn}", "role", "assistant", "content",
                                    jstr(ch->text.p ? ch->text.p : "", ch->text.len), "refusal");
            if (c->o.boxes)
                json_object_set_new(msg, "boxes", boxes_of(c, i));
            json_object_set_new(o, "message", msg);
        } else
            json_object_set_new(o, "text", jstr(ch->text.p ? ch->text.p : "", ch->text.len));
        json_object_set_new(o, "logprobs", lp);
        json_object_set_new(
            o, "finish_reason",
            json_string(finish_name(ch->finish) ? finish_name(ch->finish) : "stop"));
        json_array_append_new(choices, o);
    }
    json_object_set_new(j, "choices", choices);
    json_object_set_new(j, "usage", usage(c));
    if (c->status) { /* the boxes failed: the error reply instead */
        json_decref(j);
        return NULL;
    }
    char *body = dump(j, len);
    return body && c->o.logprobs >= 0 ? splice_logprobs(c, body, len, nonce) : body;
}
