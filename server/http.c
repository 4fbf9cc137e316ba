/* http.c - libmicrohttpd driven by the libuv loop, and the life of a connection.
 *
 * MHD runs without threads of its own in epoll mode: its epoll fd is a uv_poll_t and its
 * timeout a uv_timer_t. A generation request is a small state machine (server.h):
 * the body is received (bounded while reading), the connection is suspended while the
 * work pool parses it and prepares the engine requests, then while the engine works.
 * The engine's wake hook queues the connection on the wake list and pokes a uv_async_t;
 * the loop then drains outputs, resumes the connection and runs MHD. A streaming
 * response is a content-reader callback that suspends the connection when it has
 * nothing to send. A periodic tick notices clients that hung up on a suspended
 * connection, enforces the request timeout and drives draining.
 *
 * A request with an http(s) image URL (server/fetch.h) has one more step: after the first
 * job the loop fetches the image (CONN_FETCH), then a second job prepares the engine
 * requests from it. A client that leaves, the request timeout and draining stop the fetch
 * (fetch_stop); so does MHD completing the connection.
 */
#include "server/server.h"

#include "base/clock.h"
#include "server/log.h"

#include <arpa/inet.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

/* ---- connection lifetime ------------------------------------------------------------ */

static int all_done(const struct conn *c)
{
    for (int i = 0; i < c->n_ch; i++)
        if (c->ch[i].r && !c->ch[i].done)
            return 0;
    return 1;
}

static void conn_free(struct conn *c)
{
    struct cvlm_srv *s = c->s;
    cvlm_fetch_cancel(c->fetch); /* none by now (fetch_stop ran): kept for robustness */
    cvlm_api_pending_free(c);
    for (int i = 0; i < c->n_ch; i++) {
        cvlm_request_unref(c->ch[i].r);
        cvlm_buf_free(&c->ch[i].text);
        for (int k = 0; k < 4; k++)
            cvlm_buf_free(&c->ch[i].lp[k]);
    }
    free(c->ch);
    cvlm_buf_free(&c->body);
    cvlm_buf_free(&c->sse);
    free(c->reply);
    if (c->prev)
        c->prev->next = c->next;
    else
        s->live = c->next;
    if (c->next)
        c->next->prev = c->prev;
    free(c);
}

/* Frees the connection once MHD, the work pool and the engine are all done with it. */
static void conn_maybe_free(struct conn *c)
{
    int queued;
    if (!c->mhd_done || c->state == CONN_PREP || c->fetch || !all_done(c))
        return;
    pthread_mutex_lock(&c->s->wake_mu);
    queued = c->wake_queued;
    pthread_mutex_unlock(&c->s->wake_mu);
    if (!queued)
        conn_free(c);
}

static void resume(struct conn *c);

/* A connection whose image is being fetched: stops the fetch, drops the parsed request
 * and hands the connection back to MHD with the error the caller set (a client that left
 * needs none: its connection is closed). */
static void fetch_stop(struct conn *c)
{
    cvlm_fetch_cancel(c->fetch);
    c->fetch = NULL;
    cvlm_api_pending_free(c);
    c->state = CONN_REPLY;
    if (!c->status && !c->client_gone)
        cvlm_api_error(c, 503, "service_unavailable", NULL, "request_cancelled",
                       "the request was cancelled");
    if (!c->mhd_done)
        resume(c);
}

/* Cancels every running choice. A connection being prepared is left alone: the work
 * pool writes c->ch / c->n_ch until after_work runs on this thread (which then submits
 * or drops them, and a later tick can cancel them). One being fetched stops its fetch. */
static void cancel_all(struct conn *c)
{
    if (c->state == CONN_PREP)
        return;
    if (c->state == CONN_FETCH) {
        fetch_stop(c);
        return;
    }
    for (int i = 0; i < c->n_ch; i++)
        if (c->ch[i].r && !c->ch[i].done)
            cvlm_engine_cancel(c->s->engine, c->ch[i].r);
}

static void resume(struct conn *c)
{
    if (c->suspended) {
        c->suspended = 0;
        MHD_resume_connection(c->mc);
    }
}

static void suspend(struct conn *c)
{
    if (!c->suspended) {
        c->suspended = 1;
        MHD_suspend_connection(c->mc);
    }
}

/* The client's X-Request-Id when it is safe to echo and log: 1..128 visible ASCII
 * characters (no space, no control byte, nothing past 0x7e, so it can neither end nor
 * extend a header or a log line); else NULL, and the response carries our id instead. */
static const char *client_request_id(struct MHD_Connection *mc)
{
    const char *h = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "X-Request-Id");
    size_t n = 0;
    if (!h)
        return NULL;
    for (; h[n]; n++)
        if (n >= 128 || (unsigned char)h[n] < 0x21 || (unsigned char)h[n] > 0x7e)
            return NULL;
    return n ? h : NULL;
}

static struct conn *conn_new(struct cvlm_srv *s, struct MHD_Connection *mc, const char *route)
{
    struct conn *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->s = s;
    c->mc = mc;
    c->route = route;
    c->t_start = cvlm_now_ms();
    c->created = (long long)time(NULL);
    snprintf(c->id, sizeof(c->id), "%016llx%08x", (unsigned long long)++s->next_id,
             (unsigned)(c->t_start * 1000) ^ (unsigned)rand());
    const char *rid = client_request_id(mc);
    snprintf(c->rid, sizeof(c->rid), "%s", rid ? rid : c->id);
    c->next = s->live;
    if (s->live)
        s->live->prev = c;
    s->live = c;
    return c;
}

/* ---- responses ------------------------------------------------------------------------ */

static enum MHD_Result queue(struct conn *c, int status, char *body, size_t len, const char *ctype)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    enum MHD_Result ok;
    if (!r) {
        free(body);
        return MHD_NO;
    }
    MHD_CHECK(MHD_add_response_header(r, "Content-Type", ctype));
    MHD_CHECK(MHD_add_response_header(r, "X-Request-Id", c->rid));
    if (status == 429)
        MHD_CHECK(MHD_add_response_header(r, "Retry-After", "1"));
    if (status == 405)
        MHD_CHECK(MHD_add_response_header(r, "Allow", strstr(c->route, "/v1/c") ? "POST" : "GET"));
    if (status == 401)
        MHD_CHECK(MHD_add_response_header(r, "WWW-Authenticate", "Bearer"));
    ok = MHD_queue_response(c->mc, (unsigned)status, r);
    MHD_CHECK(ok);
    MHD_destroy_response(r);
    c->status = status;
    c->state = CONN_SENT;
    return ok;
}

static enum MHD_Result queue_error(struct conn *c)
{
    size_t len;
    char *body = cvlm_api_error_body(c, &len);
    if (!body)
        return MHD_NO;
    return queue(c, c->status, body, len, "application/json");
}

static enum MHD_Result reply_error(struct conn *c, int status, const char *type, const char *code,
                                   const char *msg)
{
    cvlm_api_error(c, status, type, NULL, code, "%s", msg);
    return queue_error(c);
}

/* Streaming body: hands over what the engine produced, suspends when there is nothing.
 * A stream whose buffer could not grow ends with an error (the client sees a cut chunked
 * body, never a stream with events silently missing). */
static ssize_t sse_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    struct conn *c = cls;
    (void)pos;
    if (c->sse.failed)
        return MHD_CONTENT_READER_END_WITH_ERROR;
    if (c->sse_off < c->sse.len) {
        size_t n = c->sse.len - c->sse_off < max ? c->sse.len - c->sse_off : max;
        memcpy(buf, c->sse.p + c->sse_off, n);
        c->sse_off += n;
        if (c->sse_off == c->sse.len)
            c->sse_off = c->sse.len = 0;
        return (ssize_t)n;
    }
    if (c->sse_end)
        return MHD_CONTENT_READER_END_OF_STREAM;
    suspend(c); /* resumed by the wake-up that brings more output */
    return 0;
}

static enum MHD_Result queue_stream(struct conn *c)
{
    struct MHD_Response *r =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, sse_reader, c, NULL);
    enum MHD_Result ok;
    if (!r)
        return MHD_NO;
    MHD_CHECK(MHD_add_response_header(r, "Content-Type", "text/event-stream; charset=utf-8"));
    MHD_CHECK(MHD_add_response_header(r, "Cache-Control", "no-cache"));
    /* nginx: do not buffer SSE */
    MHD_CHECK(MHD_add_response_header(r, "X-Accel-Buffering", "no"));
    MHD_CHECK(MHD_add_response_header(r, "X-Request-Id", c->rid));
    ok = MHD_queue_response(c->mc, 200, r);
    MHD_CHECK(ok);
    MHD_destroy_response(r);
    c->status = 200;
    c->state = CONN_SENT;
    return ok;
}

/* ---- routing ---------------------------------------------------------------------------- */

static const char *route_of(const char *url)
{
    static const char *const routes[] = {"/v1/chat/completions", "/v1/completions", "/v1/models",
                                         "/health", "/metrics"};
    for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); i++)
        if (!strcmp(url, routes[i]))
            return routes[i];
    if (!strncmp(url, "/v1/models/", 11))
        return "/v1/models/{id}";
    return NULL;
}

/* Constant-time comparison of the bearer token with the configured key. */
static int authorized(struct cvlm_srv *s, struct MHD_Connection *mc)
{
    const char *h = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Authorization");
    size_t kl = strlen(s->api_key);
    unsigned char diff = 0;
    if (!kl)
        return 1;
    if (!h || strncmp(h, "Bearer ", 7))
        return 0;
    h += 7;
    size_t hl = strlen(h);
    for (size_t i = 0; i < kl; i++)
        diff |= (unsigned char)s->api_key[i] ^ (unsigned char)(i < hl ? h[i] : 0);
    return diff == 0 && hl == kl;
}

/* ---- the request state machine ----------------------------------------------------------- */

static void work_cb(uv_work_t *w)
{
    cvlm_api_prepare(w->data);
}

static void image_work_cb(uv_work_t *w)
{
    cvlm_api_prepare_image(w->data);
}

static void after_work(uv_work_t *w, int status);

static void on_engine_wake(void *ctx)
{
    struct conn *c = ctx;
    struct cvlm_srv *s = c->s;
    pthread_mutex_lock(&s->wake_mu);
    if (!c->wake_queued) {
        c->wake_queued = 1;
        c->wake_next = s->wake_head;
        s->wake_head = c;
    }
    pthread_mutex_unlock(&s->wake_mu);
    UV_CHECK(uv_async_send(&s->wake)); /* engine thread: the logger is thread-safe */
}

/* The image URL's fetch ended (loop): its bytes go to the second job, or its error is
 * the reply (a 400 naming the reason). */
static void on_fetched(void *ctx, enum cvlm_fetch_status st, const char *msg, unsigned char *data,
                       size_t len)
{
    struct conn *c = ctx;
    c->fetch = NULL;
    if (st != CVLM_FETCH_OK) {
        LOG_INFO("%s: image_url refused: %s", c->id, msg);
        cvlm_api_error(c, 400, "invalid_request_error", c->image_param, cvlm_fetch_code(st), "%s",
                       msg);
        fetch_stop(c);
        cvlm_http_kick(c->s);
        return;
    }
    cvlm_api_set_image(c, data, len);
    c->state = CONN_PREP;
    c->work.data = c;
    if (UV_CHECK(uv_queue_work(c->s->loop, &c->work, image_work_cb, after_work))) {
        c->state = CONN_FETCH; /* fetch_stop's state: nothing is running */
        cvlm_api_error(c, 500, "server_error", NULL, NULL, "cannot queue work");
        fetch_stop(c);
        cvlm_http_kick(c->s);
    }
}

/* The first job left an image URL to fetch: starts it (returns 1), or sets the error the
 * reply carries (returns 0): the URL refused before any connection, or draining. */
static int start_fetch(struct conn *c)
{
    struct cvlm_srv *s = c->s;
    char msg[320];
    enum cvlm_fetch_status st = CVLM_FETCH_INTERNAL;
    if (s->draining || s->stopping) {
        cvlm_api_error(c, 503, "service_unavailable", NULL, NULL, "the server is draining");
    } else if (!s->fetcher) { /* the parser refuses image URLs then: not reached */
        cvlm_api_error(c, 400, "invalid_request_error", c->image_param, "remote_images_disabled",
                       "image_url: this server does not fetch http(s) image URLs");
    } else if ((st = cvlm_fetch_start(s->fetcher, c->image_url, on_fetched, c, &c->fetch, msg,
                                      sizeof(msg)))) {
        LOG_INFO("%s: image_url refused: %s", c->id, msg);
        cvlm_api_error(c, 400, "invalid_request_error", c->image_param, cvlm_fetch_code(st), "%s",
                       msg);
    }
    if (st != CVLM_FETCH_OK) {
        cvlm_api_pending_free(c);
        return 0;
    }
    c->state = CONN_FETCH; /* still suspended: on_fetched or fetch_stop goes on */
    return 1;
}

/* Prepared (or failed): submit every choice, or turn the error into the reply. */
static void after_work(uv_work_t *w, int status)
{
    struct conn *c = w->data;
    (void)status;
    c->state = CONN_RUN;
    if (c->mhd_done) { /* gone while being prepared: nothing was submitted */
        for (int i = 0; i < c->n_ch; i++) {
            cvlm_request_unref(c->ch[i].r);
            c->ch[i].r = NULL;
        }
        cvlm_api_pending_free(c);
        conn_maybe_free(c);
        return;
    }
    if (!c->status && c->pending && start_fetch(c))
        return;
    if (!c->status) { /* the choices go in together: all or none */
        struct cvlm_request *rs[c->n_ch > 0 ? c->n_ch : 1];
        for (int i = 0; i < c->n_ch; i++)
            rs[i] = c->ch[i].r;
        int rc = cvlm_engine_submit_group(c->s->engine, rs, c->n_ch, on_engine_wake, c);
        if (rc)
            cvlm_api_error(c, rc == CVLM_EBUSY ? 429 : 503,
                           rc == CVLM_EBUSY ? "rate_limit_error" : "service_unavailable", NULL,
                           rc == CVLM_EBUSY ? "queue_full" : NULL, "%s", cvlm_last_error());
    }
    if (c->status) { /* nothing was submitted: drop the prepared requests */
        for (int i = 0; i < c->n_ch; i++) {
            cvlm_request_unref(c->ch[i].r);
            c->ch[i].r = NULL;
        }
        c->state = CONN_REPLY;
    }
    if (c->state == CONN_REPLY || c->o.stream)
        resume(c); /* the handler queues the error or the stream */
    cvlm_http_kick(c->s);
}

/* First call for a request: route, method, auth and body-size checks. Everything that can
 * be refused from the headers alone is refused here, before a byte of the body is read
 * (a 413 for a declared Content-Length over the limit; a 503 while loading or draining),
 * so a refused client costs no memory. */
static enum MHD_Result start_request(struct cvlm_srv *s, struct MHD_Connection *mc, const char *url,
                                     const char *method, void **con_cls)
{
    const char *route = route_of(url);
    struct conn *c = conn_new(s, mc, route ? route : "other");
    int post = !strcmp(method, "POST"), get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
    if (!c)
        return MHD_NO;
    *con_cls = c;
    if (!route)
        return reply_error(c, 404, "not_found_error", "not_found", "no such route");
    int gen = !strncmp(route, "/v1/c", 5);
    if ((gen && !post) || (!gen && !get))
        return reply_error(c, 405, "invalid_request_error", "method_not_allowed",
                           "method not allowed on this route");
    if (!strncmp(route, "/v1/", 4) && !authorized(s, mc))
        return reply_error(c, 401, "authentication_error", "invalid_api_key",
                           "missing or invalid API key");
    if (!gen) {
        int status = 200;
        struct MHD_Response *r = cvlm_api_misc(s, url, &status);
        if (!r)
            return MHD_NO;
        MHD_CHECK(MHD_add_response_header(r, "X-Request-Id", c->rid));
        enum MHD_Result ok = MHD_queue_response(mc, (unsigned)status, r);
        MHD_CHECK(ok);
        MHD_destroy_response(r);
        c->status = status;
        c->state = CONN_SENT;
        return ok;
    }
    if (s->draining || !s->ready)
        return reply_error(c, 503, "service_unavailable", NULL,
                           s->draining ? "the server is draining" : "the model is loading");
    const char *cl = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Content-Length");
    if (cl && strtoull(cl, NULL, 10) > s->cfg->max_body_bytes)
        return reply_error(c, 413, "invalid_request_error", "body_too_large",
                           "request body too large");
    return MHD_YES;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *mc, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls)
{
    struct cvlm_srv *s = cls;
    struct conn *c = *con_cls;
    (void)version;
    if (!c)
        return start_request(s, mc, url, method, con_cls);
    /* MHD calls this handler again for every piece of body and once more after the end
     * of it; the connection's state says which call this is */
    if (c->state == CONN_SENT)
        return MHD_YES; /* a reply was queued on the first call; discard any body */
    if (c->state == CONN_BODY && *upload_size) {
        size_t n = *upload_size;
        *upload_size = 0;
        c->received += n;
        if (c->too_big || c->received > s->cfg->max_body_bytes) {
            c->too_big = 1; /* keep reading (and dropping) so the 413 can be delivered; */
            /* past 4x the limit, give up and close */
            return c->received > 4 * s->cfg->max_body_bytes ? MHD_NO : MHD_YES;
        }
        if (cvlm_buf_append(&c->body, upload, n)) {
            LOG_ERROR("%s: out of memory for a %zu-byte body", c->id, c->received);
            return MHD_NO;
        }
        return MHD_YES;
    }
    if (c->state == CONN_BODY) { /* the whole body is here */
        if (c->too_big)
            return reply_error(c, 413, "invalid_request_error", "body_too_large",
                               "request body too large");
        c->state = CONN_PREP;
        c->work.data = c;
        suspend(c);
        if (UV_CHECK(uv_queue_work(s->loop, &c->work, work_cb, after_work))) {
            resume(c);
            return reply_error(c, 500, "server_error", NULL, "cannot queue work");
        }
        return MHD_YES;
    }
    if (c->state == CONN_REPLY && c->client_gone)
        return MHD_NO; /* nobody to answer: close (counted as 499, not as a reply) */
    if (c->state == CONN_REPLY) {
        char *body = c->reply; /* MHD owns it from here */
        c->reply = NULL;
        return body ? queue(c, 200, body, c->reply_len, "application/json") : queue_error(c);
    }
    if (c->state == CONN_RUN && c->o.stream)
        return queue_stream(c);
    return MHD_YES;
}

/* The status a finished connection is counted and logged under: what was sent, except a
 * stream that ended in an error event (its error's status), a connection the server cut
 * (503) and one the client left (499). */
static int conn_outcome(const struct conn *c, int ok, int ours)
{
    if (ours)
        return 503;
    if (!ok)
        return 499;
    if (c->o.stream && c->gen_failed && c->fail_status)
        return c->fail_status;
    return c->status ? c->status : 499;
}

/* ` user="..."` for the log line: the request's `user` field with every byte outside
 * printable ASCII, and the quote and backslash, escaped (nothing a client sends can
 * forge or split a log line); "" without one. */
static void user_for_log(const struct conn *c, char *out, size_t cap)
{
    size_t n = 0;
    out[0] = 0;
    if (c->state == CONN_PREP || !c->o.user[0]) /* the work pool may still be writing it */
        return;
    n += (size_t)snprintf(out, cap, " user=\"");
    for (const unsigned char *p = (const unsigned char *)c->o.user; *p && n + 6 < cap; p++) {
        if (*p == '"' || *p == '\\')
            n += (size_t)snprintf(out + n, cap - n, "\\%c", *p);
        else if (*p < 0x20 || *p > 0x7e)
            n += (size_t)snprintf(out + n, cap - n, "\\x%02x", *p);
        else
            out[n++] = (char)*p;
    }
    snprintf(out + n, cap - n, "\"");
}

static void on_completed(void *cls, struct MHD_Connection *mc, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    struct cvlm_srv *s = cls;
    struct conn *c = *con_cls;
    (void)mc;
    if (!c)
        return;
    *con_cls = NULL;
    c->mhd_done = 1;
    int ok = toe == MHD_REQUEST_TERMINATED_COMPLETED_OK && !c->client_gone;
    /* cut by us: the daemon stopping (drain deadline), never blamed on the client */
    int ours =
        !ok && !c->client_gone && (s->stopping || toe == MHD_REQUEST_TERMINATED_DAEMON_SHUTDOWN);
    if (!ok)
        cancel_all(c); /* the client went away (or the daemon stops): free its KV now */
    int status = conn_outcome(c, ok, ours);
    cvlm_metrics_http(&s->metrics, c->route, status);
    const char *why = ours                    ? " (cut by the server: still being sent at exit)"
                      : !ok                   ? " (client gone)"
                      : c->cut == CUT_DRAIN   ? " (cut by the server: drain timeout)"
                      : c->cut == CUT_TIMEOUT ? " (cut by the server: request timeout)"
                                              : "";
    char user[sizeof(c->o.user) * 4 + 16];
    user_for_log(c, user, sizeof(user));
    /* the request log line: our id, route, status, time, why, the X-Request-Id, user */
    if (*why && !c->client_gone && (ours || c->cut))
        LOG_WARN("%s %s %d %.1fms%s request_id=%s%s", c->id, c->route, status,
                 cvlm_now_ms() - c->t_start, why, c->rid, user);
    else
        LOG_INFO("%s %s %d %.1fms%s request_id=%s%s", c->id, c->route, status,
                 cvlm_now_ms() - c->t_start, why, c->rid, user);
    conn_maybe_free(c);
}

/* All choices finished: build the non-streaming reply and hand the connection back. */
static void finish_reply(struct conn *c)
{
    c->reply = cvlm_api_final_body(c, &c->reply_len);
    c->state = CONN_REPLY;
    if (!c->reply)
        cvlm_api_error(c, 500, "server_error", NULL, NULL, "out of memory");
    resume(c);
}

/* Engine output arrived for some connections: move it on, resume, run MHD. */
static void on_wake(uv_async_t *a)
{
    struct cvlm_srv *s = a->data;
    struct conn *list;
    pthread_mutex_lock(&s->wake_mu);
    list = s->wake_head;
    s->wake_head = NULL;
    pthread_mutex_unlock(&s->wake_mu);
    while (list) {
        struct conn *c = list;
        /* Read the link before clearing the flag, both under the lock: once wake_queued
         * is 0 the engine thread may queue c again, which rewrites c->wake_next (reading
         * it afterwards lost the rest of this list, and with it the last wake-up of
         * finished streams, which then hung). The others in the list keep their flag, so
         * nobody touches their links. */
        pthread_mutex_lock(&s->wake_mu);
        list = c->wake_next;
        c->wake_queued = 0;
        pthread_mutex_unlock(&s->wake_mu);
        int done = cvlm_api_collect(c);
        if (!c->mhd_done && c->o.stream && (c->sse.len || c->sse_end || c->sse.failed)) {
            resume(c);
        } else if (!c->mhd_done && !c->o.stream && done && c->state == CONN_RUN) {
            finish_reply(c);
        }
        conn_maybe_free(c);
    }
    cvlm_http_kick(s);
}

/* A suspended connection whose peer has closed: recv(MSG_PEEK) returns 0. */
static int peer_closed(struct conn *c)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c->mc, MHD_CONNECTION_INFO_CONNECTION_FD);
    char b;
    if (!ci)
        return 0;
    return recv(ci->connect_fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}

static int wake_pending(struct conn *c)
{
    pthread_mutex_lock(&c->s->wake_mu);
    int q = c->wake_queued;
    pthread_mutex_unlock(&c->s->wake_mu);
    return q;
}

/* Output pending with no wake-up queued for two ticks in a row (once could be the engine
 * between appending output and waking us) is delivered here; returns 1 if so. */
static int missed_output(struct conn *c)
{
    int pending = 0;
    for (int i = 0; i < c->n_ch; i++)
        pending |= c->ch[i].r && !c->ch[i].done && cvlm_request_pending(c->ch[i].r);
    if (!pending || wake_pending(c)) {
        c->stale_ticks = 0;
        return 0;
    }
    if (++c->stale_ticks < 2)
        return 0;
    c->stale_ticks = 0;
    int done = cvlm_api_collect(c);
    LOG_WARN("%s: output without a wake-up, delivered by the tick", c->id);
    if (c->o.stream && (c->sse.len || c->sse_end || c->sse.failed))
        resume(c);
    else if (!c->o.stream && c->state == CONN_RUN && done)
        finish_reply(c);
    return 1;
}

static void drain_progress(struct cvlm_srv *s);

/* The tick for a connection whose image is being fetched: the client left (the fetch
 * stops, its connection to the image's host closes), or the request timeout passed. */
static void fetch_tick(struct conn *c, double now)
{
    int timeout = c->s->cfg->request_timeout;
    if (c->suspended && peer_closed(c)) {
        c->client_gone = 1;
        LOG_INFO("%s: client gone while its image_url was fetched: fetch cancelled", c->id);
        fetch_stop(c);
    } else if (timeout > 0 && now - c->t_start > timeout * 1e3) {
        c->cut = CUT_TIMEOUT;
        LOG_WARN("%s request timeout after %d s while fetching its image_url: cancelled", c->id,
                 timeout);
        cvlm_api_error(c, 504, "server_error", NULL, "request_timeout",
                       "the request did not finish within the server's request timeout (%d s)",
                       timeout);
        fetch_stop(c);
    }
}

static void on_tick(uv_timer_t *t)
{
    struct cvlm_srv *s = t->data;
    double now = cvlm_now_ms();
    for (struct conn *c = s->live; c; c = c->next) {
        if (!c->mhd_done && c->state == CONN_FETCH) {
            fetch_tick(c, now);
            continue;
        }
        if (c->mhd_done || !(c->state == CONN_RUN || (c->state == CONN_SENT && c->o.stream)) ||
            all_done(c)) /* streams are CONN_SENT once their headers are queued */
            continue;
        /* Output no wake-up announced (a lost wake-up would be a bug; this keeps it from
         * hanging a client, and the warning makes it visible: tests/api fails on it) */
        if (missed_output(c))
            continue;
        int gone = c->suspended && peer_closed(c);
        int late = s->cfg->request_timeout > 0 && now - c->t_start > s->cfg->request_timeout * 1e3;
        if (gone && !c->client_gone) {
            c->client_gone = 1; /* a non-streaming reply then closes instead of answering */
            cancel_all(c);
        } else if (late && !c->cut) {
            c->cut = CUT_TIMEOUT; /* the cancellation becomes a 504 / an error event */
            LOG_WARN("%s request timeout after %d s: cancelled", c->id, s->cfg->request_timeout);
            cancel_all(c);
        }
    }
    if (s->draining)
        drain_progress(s);
    cvlm_http_kick(s);
}

/* Grace after the drain deadline for the cancelled requests' last events (an error event
 * and [DONE], or a 503 body) to be written; cancellations take effect within a step. */
#define DRAIN_CUT_GRACE_MS 2000

/* Draining: every admitted response finishes, up to the deadline: requests being prepared
 * or generated, and bodies and streams still being written to slow readers (a connection
 * is done when MHD reports it completed). At the deadline what still runs is cancelled as
 * cut by the server (503 / an error event); after a short grace the loop stops and
 * cvlm_http_stop closes whatever is left, logged as cut by the server. */
static void drain_progress(struct cvlm_srv *s)
{
    int busy = 0, n = 0;
    for (struct conn *c = s->live; c; c = c->next)
        if (!c->mhd_done || c->state == CONN_PREP) {
            busy = 1;
            n++;
        }
    busy |= s->engine && cvlm_engine_pending(s->engine) > 0;
    if (busy && cvlm_now_ms() < s->drain_deadline)
        return;
    if (busy && !s->drain_cutting) {
        LOG_WARN("drain timeout: cutting %d request(s) still running or being sent", n);
        for (struct conn *c = s->live; c; c = c->next)
            if (!c->mhd_done && c->state != CONN_PREP) {
                if (!c->cut)
                    c->cut = CUT_DRAIN;
                cancel_all(c);
            }
        s->drain_cutting = 1;
        s->drain_deadline = cvlm_now_ms() + DRAIN_CUT_GRACE_MS;
        return;
    }
    LOG_INFO(busy ? "drain grace over; stopping" : "drained; stopping");
    uv_stop(s->loop);
}

static void on_mhd_timer(uv_timer_t *t)
{
    cvlm_http_kick(t->data);
}

static void on_mhd_poll(uv_poll_t *p, int status, int events)
{
    (void)status;
    (void)events;
    cvlm_http_kick(p->data);
}

void cvlm_http_kick(struct cvlm_srv *s)
{
    MHD_UNSIGNED_LONG_LONG to = 0;
    if (!s->mhd)
        return; /* stopping */
    /* twice: MHD moves connections resumed since its last run back to the ready list at
     * the start of a run but only serves them in the next one */
    MHD_CHECK(MHD_run(s->mhd));
    MHD_CHECK(MHD_run(s->mhd));
    if (MHD_get_timeout(s->mhd, &to) == MHD_YES)
        UV_CHECK(uv_timer_start(&s->mhd_timer, on_mhd_timer, to, 0));
    else
        UV_CHECK(uv_timer_stop(&s->mhd_timer));
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    char msg[512];
    (void)cls;
    vsnprintf(msg, sizeof(msg), fmt, ap);
    msg[strcspn(msg, "\n")] = 0;
    LOG_DEBUG("http: %s", msg);
}

/* Listening address from --host: IPv4 or IPv6 literal. */
static int make_addr(const struct cvlm_server_options *cfg, struct sockaddr_storage *ss,
                     unsigned *flags)
{
    memset(ss, 0, sizeof(*ss));
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, cfg->host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)cfg->port);
        return 0;
    }
    if (inet_pton(AF_INET6, cfg->host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)cfg->port);
        *flags |= MHD_USE_IPv6;
        return 0;
    }
    return -1;
}

int cvlm_http_start(struct cvlm_srv *s)
{
    struct sockaddr_storage ss;
    unsigned flags = MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
    if (make_addr(s->cfg, &ss, &flags)) {
        LOG_ERROR("--host %s is not an IPv4 or IPv6 address", s->cfg->host);
        return -1;
    }
    s->mhd = MHD_start_daemon(
        flags, (uint16_t)s->cfg->port, NULL, NULL, on_request, s, MHD_OPTION_SOCK_ADDR, &ss,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, s, MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned)s->cfg->connection_timeout, MHD_OPTION_CONNECTION_LIMIT,
        (unsigned)s->cfg->max_connections, MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)64 * 1024,
        MHD_OPTION_EXTERNAL_LOGGER, mhd_log, s, MHD_OPTION_END);
    if (!s->mhd) {
        LOG_ERROR("cannot listen on %s:%d", s->cfg->host, s->cfg->port);
        return -1;
    }
    const union MHD_DaemonInfo *ei = MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_EPOLL_FD);
    const union MHD_DaemonInfo *pi = MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_BIND_PORT);
    if (!ei)
        return -1;
    if (UV_CHECK(uv_poll_init(s->loop, &s->mhd_poll, ei->epoll_fd)) ||
        UV_CHECK(uv_timer_init(s->loop, &s->mhd_timer)) ||
        UV_CHECK(uv_timer_init(s->loop, &s->tick)) ||
        UV_CHECK(uv_async_init(s->loop, &s->wake, on_wake)))
        return -1;
    s->mhd_poll.data = s->mhd_timer.data = s->tick.data = s->wake.data = s;
    if (UV_CHECK(uv_poll_start(&s->mhd_poll, UV_READABLE, on_mhd_poll)) ||
        UV_CHECK(uv_timer_start(&s->tick, on_tick, 250, 250)))
        return -1;
    cvlm_http_kick(s);
    LOG_INFO("listening on http://%s%s%s:%u", strchr(s->cfg->host, ':') ? "[" : "", s->cfg->host,
             strchr(s->cfg->host, ':') ? "]" : "",
             pi ? (unsigned)pi->port : (unsigned)s->cfg->port);
    return 0;
}

void cvlm_http_begin_drain(struct cvlm_srv *s)
{
    if (s->draining)
        return;
    s->draining = 1;
    s->drain_deadline = cvlm_now_ms() + s->cfg->drain_timeout * 1e3;
    cvlm_engine_drain(s->engine);
    /* the engine takes no new request now: an image being fetched would be refused once it
     * arrives, so its fetch stops here (503: nothing was begun, retry elsewhere) */
    for (struct conn *c = s->live; c; c = c->next)
        if (!c->mhd_done && c->state == CONN_FETCH) {
            cvlm_api_error(c, 503, "service_unavailable", NULL, NULL, "the server is draining");
            fetch_stop(c);
        }
    cvlm_http_kick(s);
    LOG_INFO("draining (up to %d s)", s->cfg->drain_timeout);
    drain_progress(s);
}

static void close_cb(uv_handle_t *h)
{
    (void)h;
}

void cvlm_http_stop(struct cvlm_srv *s)
{
    if (!s->mhd)
        return;
    s->stopping = 1; /* connections MHD completes from here on were cut by us */
    /* cancel everything and hand every connection back to MHD, which completes them all */
    for (struct conn *c = s->live; c; c = c->next) {
        cancel_all(c);
        if (!c->mhd_done)
            resume(c);
    }
    UV_CHECK(uv_poll_stop(&s->mhd_poll));
    MHD_stop_daemon(s->mhd);
    s->mhd = NULL;
    /* let the work pool and the engine finish with the remaining connections */
    for (int i = 0; s->live && i < 2000; i++) {
        struct timespec ts = {0, 5 * 1000 * 1000};
        uv_run(s->loop, UV_RUN_NOWAIT);
        nanosleep(&ts, NULL);
    }
    uv_close((uv_handle_t *)&s->mhd_poll, close_cb);
    uv_close((uv_handle_t *)&s->mhd_timer, close_cb);
    uv_close((uv_handle_t *)&s->tick, close_cb);
    uv_close((uv_handle_t *)&s->wake, close_cb);
    uv_run(s->loop, UV_RUN_NOWAIT);
}
