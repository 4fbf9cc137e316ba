/* fetch.c - http(s) image URLs fetched by libcurl on the libuv loop (see fetch.h).
 *
 * The multi socket API: curl tells us which sockets to watch (on_socket: one uv_poll_t
 * per socket, a `struct watch` freed when its handle has closed) and when to call it back
 * (on_timer_set: one uv_timer_t); we tell curl what happened (curl_multi_socket_action)
 * and then collect finished transfers (collect). No curl call is made from inside a curl
 * callback except curl_easy_getinfo.
 *
 * One fetch is one easy handle reused for each hop: redirects are followed here (never by
 * curl), so that each hop's URL goes through check_url (scheme, address literal, host
 * allow-list) before its transfer starts. The callbacks of a transfer only record a
 * verdict and stop it (returning a short count); the verdict becomes the status when
 * curl reports the transfer done.
 */
#include "server/fetch.h"

#include "base/buf.h"
#include "base/clock.h"
#include "server/fetch_addr.h"
#include "server/log.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#define CURLM_CHECK(call) cvlm_log_call_failed((call) != CURLM_OK, #call, __FILE__, __LINE__)
#define MAX_LOCATION 8192 /* a longer Location header is not followed */
#define MAX_PORTS 16      /* ports of the test-only loopback switch */

struct cvlm_fetcher {
    uv_loop_t *loop;
    CURLM *multi;
    uv_timer_t timer;
    const struct cvlm_server_options *cfg;
    struct curl_slist *headers; /* Accept: image types */
    /* test only (COGVLM_TEST_ALLOW_LOOPBACK_MEDIA): loopback addresses may be connected
     * to, on these ports (n_ports 0: on any port); no other forbidden class ever */
    int loopback, n_ports;
    unsigned ports[MAX_PORTS];
    struct cvlm_fetch *live;
    int n_live;
};

/* A socket curl asked us to watch; freed when its poll handle has closed. */
struct watch {
    uv_poll_t poll;
    curl_socket_t fd;
    struct cvlm_fetcher *f;
};

struct cvlm_fetch {
    struct cvlm_fetcher *f;
    CURL *easy;
    char *url;      /* this hop's URL, as curl_url normalized it (curl_free) */
    char host[256]; /* this hop's host, for messages */
    int hops;       /* redirects followed so far */
    double deadline;
    /* this hop's answer */
    long code;
    char *location; /* its Location header (malloc'd) */
    struct cvlm_buf body;
    size_t discarded; /* body bytes of a non-2xx answer, read and dropped */
    int magic_checked;
    /* set by a callback that stopped the transfer: the status to report */
    enum cvlm_fetch_status verdict;
    char msg[320];
    char refused[96]; /* the open-socket callback refused this address ("10.0.0.1 (private)") */
    void (*done)(void *ctx, enum cvlm_fetch_status status, const char *msg, unsigned char *data,
                 size_t len);
    void *ctx;
    struct cvlm_fetch *prev, *next;
};

const char *cvlm_fetch_code(enum cvlm_fetch_status st)
{
    switch (st) {
    case CVLM_FETCH_OK: return "";
    case CVLM_FETCH_BAD_URL: return "image_url_invalid";
    case CVLM_FETCH_BAD_SCHEME: return "image_url_bad_scheme";
    case CVLM_FETCH_DOMAIN_NOT_ALLOWED: return "image_domain_not_allowed";
    case CVLM_FETCH_FORBIDDEN_ADDRESS: return "image_forbidden_address";
    case CVLM_FETCH_UNREACHABLE: return "image_unreachable";
    case CVLM_FETCH_TIMED_OUT: return "image_fetch_timeout";
    case CVLM_FETCH_TOO_LARGE: return "image_fetch_too_large";
    case CVLM_FETCH_TRUNCATED: return "image_fetch_truncated";
    case CVLM_FETCH_NOT_IMAGE: return "invalid_image";
    case CVLM_FETCH_TOO_MANY_REDIRECTS: return "image_too_many_redirects";
    case CVLM_FETCH_INTERNAL: return "image_fetch_failed";
    }
    return "image_fetch_failed";
}

/* Records why the fetch failed, unless a reason was recorded first; returns the reason
 * recorded. A curl callback records it and returns a short count, which stops the
 * transfer (CURLE_WRITE_ERROR: the recorded reason is what is reported). */
static enum cvlm_fetch_status fail(struct cvlm_fetch *x, enum cvlm_fetch_status st, const char *fmt,
                                   ...) __attribute__((format(printf, 3, 4)));
static enum cvlm_fetch_status fail(struct cvlm_fetch *x, enum cvlm_fetch_status st, const char *fmt,
                                   ...)
{
    va_list ap;
    if (x->verdict)
        return x->verdict;
    x->verdict = st;
    va_start(ap, fmt);
    vsnprintf(x->msg, sizeof(x->msg), fmt, ap);
    va_end(ap);
    return st;
}

/* ---- what may be connected to ------------------------------------------------------------ */

static int loopback_port_ok(const struct cvlm_fetcher *f, unsigned port)
{
    if (!f->n_ports)
        return 1;
    for (int i = 0; i < f->n_ports; i++)
        if (f->ports[i] == port)
            return 1;
    return 0;
}

/* Whether an address of this class (and port) may be connected to. */
static int class_ok(const struct cvlm_fetcher *f, enum cvlm_addr_class cls, unsigned port)
{
    return cls == CVLM_ADDR_PUBLIC ||
           (cls == CVLM_ADDR_LOOPBACK && f->loopback && loopback_port_ok(f, port));
}

/* curl is about to connect: the address it resolved, before any packet is sent. This
 * runs for every address tried, on every hop (the one place that sees what is really
 * connected to, whatever DNS said before). */
static curl_socket_t on_open_socket(void *ud, curlsocktype purpose, struct curl_sockaddr *a)
{
    struct cvlm_fetch *x = ud;
    char ip[INET6_ADDRSTRLEN] = "?";
    unsigned port = 0;
    enum cvlm_addr_class cls = CVLM_ADDR_RESERVED;
    (void)purpose;
    if (a->family == AF_INET && a->addrlen >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)&a->addr;
        cls = cvlm_addr_classify(&a->addr);
        port = ntohs(in->sin_port);
        inet_ntop(AF_INET, &in->sin_addr, ip, sizeof(ip));
    } else if (a->family == AF_INET6 && a->addrlen >= sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)&a->addr;
        cls = cvlm_addr_classify(&a->addr);
        port = ntohs(in6->sin6_port);
        inet_ntop(AF_INET6, &in6->sin6_addr, ip, sizeof(ip));
    }
    if (!class_ok(x->f, cls, port)) {
        snprintf(x->refused, sizeof(x->refused), "%s (%s)", ip, cvlm_addr_class_name(cls));
        return CURL_SOCKET_BAD; /* curl tries the name's next address, if any */
    }
    return socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);
}

/* Parses url (absolute, or relative to base when base is not NULL) and checks it: http or
 * https, an address literal of an allowed class, a host on the allow-list. On success
 * *norm is the normalized URL (curl_free) and host its host. */
static enum cvlm_fetch_status check_url(struct cvlm_fetcher *f, const char *base, const char *url,
                                        char **norm, char *host, size_t hcap, char *msg, size_t cap)
{
    CURLU *u = curl_url();
    char *scheme = NULL, *h = NULL, *port = NULL;
    enum cvlm_fetch_status st = CVLM_FETCH_OK;
    unsigned char addr[16];
    *norm = NULL;
    if (!u) {
        snprintf(msg, cap, "image_url: out of memory");
        return CVLM_FETCH_INTERNAL;
    }
    if ((base && curl_url_set(u, CURLUPART_URL, base, 0)) ||
        curl_url_set(u, CURLUPART_URL, url, CURLU_NON_SUPPORT_SCHEME)) {
        st = CVLM_FETCH_BAD_URL;
        snprintf(msg, cap, "image_url: not a valid URL");
        goto out;
    }
    if (curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) ||
        (strcmp(scheme, "http") && strcmp(scheme, "https"))) {
        st = CVLM_FETCH_BAD_SCHEME;
        snprintf(msg, cap, "image_url: bad scheme '%.20s': only http and https are fetched",
                 scheme ? scheme : "");
        goto out;
    }
    if (curl_url_get(u, CURLUPART_HOST, &h, 0) ||
        curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT)) {
        st = CVLM_FETCH_BAD_URL;
        snprintf(msg, cap, "image_url: not a valid URL (no host)");
        goto out;
    }
    snprintf(host, hcap, "%s", h);
    /* an address literal is judged now (a name when curl connects: on_open_socket) */
    size_t hl = strlen(h);
    char lit[64];
    int v6 = hl > 2 && h[0] == '[' && hl - 2 < sizeof(lit);
    snprintf(lit, sizeof(lit), "%.*s", v6 ? (int)(hl - 2) : (int)hl, v6 ? h + 1 : h);
    enum cvlm_addr_class cls = CVLM_ADDR_PUBLIC;
    if (v6 && inet_pton(AF_INET6, lit, addr) == 1)
        cls = cvlm_addr_classify_v6(addr);
    else if (!v6 && inet_pton(AF_INET, lit, addr) == 1)
        cls = cvlm_addr_classify_v4(addr);
    if (!class_ok(f, cls, (unsigned)atoi(port))) {
        st = CVLM_FETCH_FORBIDDEN_ADDRESS;
        snprintf(msg, cap, "image_url: forbidden address: %.64s is %s", lit,
                 cvlm_addr_class_name(cls));
        goto out;
    }
    if (!f->cfg->allow_any_media_domain && !cvlm_host_allowed(f->cfg->allowed_media_domains, h)) {
        st = CVLM_FETCH_DOMAIN_NOT_ALLOWED;
        snprintf(msg, cap,
                 "image_url: domain not allowed: %.100s is not in the server's "
                 "--allowed-media-domains",
                 h);
        goto out;
    }
    if (curl_url_get(u, CURLUPART_URL, norm, 0)) {
        st = CVLM_FETCH_BAD_URL;
        snprintf(msg, cap, "image_url: not a valid URL");
    }
out:
    curl_free(scheme);
    curl_free(h);
    curl_free(port);
    curl_url_cleanup(u);
    return st;
}

/* ---- what is accepted as an image -------------------------------------------------------- */

/* The magic numbers engine/image/ decodes: JPEG, PNG, GIF87a/89a, RIFF....WEBP (all
 * within the first 12 bytes). */
static int looks_like_image(const unsigned char *p, size_t n)
{
    return (n >= 3 && !memcmp(p, "\xff\xd8\xff", 3)) ||
           (n >= 8 && !memcmp(p, "\x89PNG\r\n\x1a\n", 8)) ||
           (n >= 6 && (!memcmp(p, "GIF87a", 6) || !memcmp(p, "GIF89a", 6))) ||
           (n >= 12 && !memcmp(p, "RIFF", 4) && !memcmp(p + 8, "WEBP", 4));
}

/* A Content-Type that is present and clearly not an image: anything but image types and the
 * generic binary types some stores send for everything. */
static int content_type_ok(const char *ct)
{
    while (*ct == ' ' || *ct == '\t')
        ct++;
    size_t n = strcspn(ct, "; \t");
    return n == 0 || !strncasecmp(ct, "image/", 6) ||
           (n == 24 && !strncasecmp(ct, "application/octet-stream", n)) ||
           (n == 19 && !strncasecmp(ct, "binary/octet-stream", n));
}

/* The end of an answer's headers: refuse early what cannot be an image. Returns 0 to
 * stop the transfer. */
static int headers_end(struct cvlm_fetch *x)
{
    const uint64_t max = x->f->cfg->max_image_bytes;
    curl_off_t cl = -1;
    char *ct = NULL;
    curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &x->code);
    if (x->code < 200 || (x->code >= 300 && x->code < 400))
        return 1; /* an interim answer, or a redirect (followed once it is read) */
    if (x->code >= 400) {
        fail(x, CVLM_FETCH_UNREACHABLE, "image_url: unreachable: %.100s answered HTTP %ld", x->host,
             x->code);
        return 0;
    }
    curl_easy_getinfo(x->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
    if (cl > 0 && (uint64_t)cl > max) {
        fail(x, CVLM_FETCH_TOO_LARGE,
             "image_url: too large: %.100s announces %lld bytes, over the server's "
             "--max-image-bytes (%llu)",
             x->host, (long long)cl, (unsigned long long)max);
        return 0;
    }
    curl_easy_getinfo(x->easy, CURLINFO_CONTENT_TYPE, &ct);
    if (ct && !content_type_ok(ct)) {
        fail(x, CVLM_FETCH_NOT_IMAGE, "image_url: not an image: %.100s sent Content-Type '%.60s'",
             x->host, ct);
        return 0;
    }
    return 1;
}

static size_t on_header(char *p, size_t size, size_t n, void *ud)
{
    struct cvlm_fetch *x = ud;
    size_t len = size * n;
    if (len >= 5 && !memcmp(p, "HTTP/", 5)) { /* a new answer (after an interim one) */
        free(x->location);
        x->location = NULL;
    } else if (len > 9 && !strncasecmp(p, "location:", 9) && len < MAX_LOCATION) {
        size_t b = 9, e = len;
        while (b < e && (p[b] == ' ' || p[b] == '\t'))
            b++;
        while (e > b && (p[e - 1] == '\r' || p[e - 1] == '\n' || p[e - 1] == ' '))
            e--;
        free(x->location);
        if ((x->location = malloc(e - b + 1))) {
            memcpy(x->location, p + b, e - b);
            x->location[e - b] = 0;
        }
    } else if (len <= 2 && (p[0] == '\r' || p[0] == '\n')) {
        return headers_end(x) ? len : 0;
    }
    return len;
}

static size_t on_body(char *p, size_t size, size_t n, void *ud)
{
    struct cvlm_fetch *x = ud;
    const uint64_t max = x->f->cfg->max_image_bytes;
    size_t len = size * n;
    if (x->code < 200 || x->code >= 300) { /* a redirect's body: read and dropped, bounded */
        x->discarded += len;
        if (x->discarded <= max)
            return len;
        fail(x, CVLM_FETCH_TOO_LARGE,
             "image_url: too large: the redirect from %.100s has a body over --max-image-bytes",
             x->host);
        return 0;
    }
    if (x->body.len + len > max) {
        fail(x, CVLM_FETCH_TOO_LARGE,
             "image_url: too large: %.100s sent more than the server's --max-image-bytes "
             "(%llu bytes)",
             x->host, (unsigned long long)max);
        return 0;
    }
    if (cvlm_buf_append(&x->body, p, len)) {
        fail(x, CVLM_FETCH_INTERNAL, "image_url: out of memory for the image");
        return 0;
    }
    if (!x->magic_checked && x->body.len >= 12) { /* as soon as every signature fits */
        x->magic_checked = 1;
        if (!looks_like_image((unsigned char *)x->body.p, x->body.len)) {
            fail(x, CVLM_FETCH_NOT_IMAGE,
                 "image_url: not an image: what %.100s sent is not JPEG, PNG, GIF or WebP",
                 x->host);
            return 0;
        }
    }
    return len;
}

/* ---- the multi handle on the loop --------------------------------------------------------- */

static void collect(struct cvlm_fetcher *f);

static void watch_closed(uv_handle_t *h)
{
    free(h->data);
}

static void on_poll(uv_poll_t *p, int status, int events)
{
    struct watch *w = p->data;
    struct cvlm_fetcher *f = w->f;
    int flags = status < 0 ? CURL_CSELECT_ERR : 0, running;
    flags |= (events & UV_READABLE ? CURL_CSELECT_IN : 0) |
             (events & UV_WRITABLE ? CURL_CSELECT_OUT : 0);
    CURLM_CHECK(curl_multi_socket_action(f->multi, w->fd, flags, &running));
    collect(f);
}

/* curl: watch fd for `what` (or stop watching it). */
static int on_socket(CURL *easy, curl_socket_t fd, int what, void *ud, void *sockp)
{
    struct cvlm_fetcher *f = ud;
    struct watch *w = sockp;
    (void)easy;
    if (what == CURL_POLL_REMOVE) {
        if (w) { /* before curl closes fd: the poll is off epoll at once */
            UV_CHECK(uv_poll_stop(&w->poll));
            uv_close((uv_handle_t *)&w->poll, watch_closed);
            curl_multi_assign(f->multi, fd, NULL);
        }
        return 0;
    }
    if (!w) {
        if (!(w = calloc(1, sizeof(*w))))
            return -1;
        if (UV_CHECK(uv_poll_init_socket(f->loop, &w->poll, fd))) {
            free(w);
            return -1;
        }
        w->fd = fd;
        w->f = f;
        w->poll.data = w;
        curl_multi_assign(f->multi, fd, w);
    }
    int ev = (what & CURL_POLL_IN ? UV_READABLE : 0) | (what & CURL_POLL_OUT ? UV_WRITABLE : 0);
    return UV_CHECK(uv_poll_start(&w->poll, ev, on_poll)) ? -1 : 0;
}

static void on_timeout(uv_timer_t *t)
{
    struct cvlm_fetcher *f = t->data;
    int running;
    CURLM_CHECK(curl_multi_socket_action(f->multi, CURL_SOCKET_TIMEOUT, 0, &running));
    collect(f);
}

/* curl: call back in ms milliseconds (-1: never). Run from the timer, never from here. */
static int on_timer_set(CURLM *multi, long ms, void *ud)
{
    struct cvlm_fetcher *f = ud;
    (void)multi;
    if (ms < 0)
        return UV_CHECK(uv_timer_stop(&f->timer)) ? -1 : 0;
    return UV_CHECK(uv_timer_start(&f->timer, on_timeout, (uint64_t)ms, 0)) ? -1 : 0;
}

/* ---- one fetch ------------------------------------------------------------------------------ */

static void fetch_free(struct cvlm_fetch *x)
{
    struct cvlm_fetcher *f = x->f;
    if (x->prev)
        x->prev->next = x->next;
    else
        f->live = x->next;
    if (x->next)
        x->next->prev = x->prev;
    f->n_live--;
    curl_easy_cleanup(x->easy);
    curl_free(x->url);
    free(x->location);
    cvlm_buf_free(&x->body);
    free(x);
}

/* Hands the outcome to the caller and frees the fetch. */
static void complete(struct cvlm_fetch *x, enum cvlm_fetch_status st, const char *msg)
{
    size_t len = 0;
    unsigned char *data = NULL;
    if (st == CVLM_FETCH_OK && !(data = (unsigned char *)cvlm_buf_take(&x->body, &len))) {
        st = CVLM_FETCH_INTERNAL;
        msg = "image_url: out of memory for the image";
    }
    void (*done)(void *, enum cvlm_fetch_status, const char *, unsigned char *, size_t) = x->done;
    void *ctx = x->ctx;
    char text[sizeof(x->msg)];
    snprintf(text, sizeof(text), "%s", msg);
    fetch_free(x);
    done(ctx, st, text, data, len);
}

/* Starts the transfer of x->url, within what is left of the total time. */
static enum cvlm_fetch_status start_hop(struct cvlm_fetch *x)
{
    const struct cvlm_server_options *cfg = x->f->cfg;
    double left = x->deadline - cvlm_now_ms();
    long connect_ms = (long)cfg->media_connect_timeout * 1000;
    if (left < 1)
        return fail(x, CVLM_FETCH_TIMED_OUT, "image_url: timed out after %d s (%d redirects)",
                    cfg->media_timeout, x->hops);
    x->code = 0;
    x->discarded = 0;
    x->magic_checked = 0;
    x->refused[0] = 0;
    free(x->location);
    x->location = NULL;
    cvlm_buf_free(&x->body);
    if (curl_easy_setopt(x->easy, CURLOPT_URL, x->url) ||
        curl_easy_setopt(x->easy, CURLOPT_TIMEOUT_MS, (long)left) ||
        curl_easy_setopt(x->easy, CURLOPT_CONNECTTIMEOUT_MS,
                         connect_ms < (long)left ? connect_ms : (long)left) ||
        CURLM_CHECK(curl_multi_add_handle(x->f->multi, x->easy)))
        return fail(x, CVLM_FETCH_INTERNAL, "image_url: the transfer could not start");
    return CVLM_FETCH_OK;
}

/* A 3xx answer: the next hop, checked like the first. Returns OK when it runs. */
static enum cvlm_fetch_status follow(struct cvlm_fetch *x)
{
    char *next = NULL, host[256], msg[sizeof(x->msg)];
    if (!x->location || !*x->location)
        return fail(x, CVLM_FETCH_UNREACHABLE,
                    "image_url: unreachable: %.100s answered HTTP %ld without a Location", x->host,
                    x->code);
    if (x->hops >= CVLM_FETCH_MAX_REDIRECTS)
        return fail(x, CVLM_FETCH_TOO_MANY_REDIRECTS,
                    "image_url: too many redirects: more than %d (the last from %.100s)",
                    CVLM_FETCH_MAX_REDIRECTS, x->host);
    enum cvlm_fetch_status st =
        check_url(x->f, x->url, x->location, &next, host, sizeof(host), msg, sizeof(msg));
    if (st)
        return fail(x, st, "%s (redirect %d, from %.100s)", msg, x->hops + 1, x->host);
    curl_free(x->url);
    x->url = next;
    snprintf(x->host, sizeof(x->host), "%s", host);
    x->hops++;
    return start_hop(x);
}

/* curl's result of a transfer that our callbacks did not stop, as a status. */
static enum cvlm_fetch_status curl_status(struct cvlm_fetch *x, CURLcode rc)
{
    const struct cvlm_server_options *cfg = x->f->cfg;
    double connect_s = 0;
    if (x->refused[0] && rc == CURLE_COULDNT_CONNECT) /* no address left that may be tried */
        return fail(x, CVLM_FETCH_FORBIDDEN_ADDRESS,
                    "image_url: forbidden address: %.100s is %s; refused before connecting",
                    x->host, x->refused);
    switch (rc) {
    case CURLE_OPERATION_TIMEDOUT:
        curl_easy_getinfo(x->easy, CURLINFO_CONNECT_TIME, &connect_s);
        if (connect_s <= 0)
            return fail(x, CVLM_FETCH_TIMED_OUT,
                        "image_url: timed out: no connection to %.100s within %d s", x->host,
                        cfg->media_connect_timeout);
        return fail(x, CVLM_FETCH_TIMED_OUT,
                    "image_url: timed out: the image from %.100s took over %d s", x->host,
                    cfg->media_timeout);
    case CURLE_FILESIZE_EXCEEDED: /* curl's own check of the Content-Length */
        return fail(x, CVLM_FETCH_TOO_LARGE,
                    "image_url: too large: %.100s announces more than the server's "
                    "--max-image-bytes (%llu bytes)",
                    x->host, (unsigned long long)cfg->max_image_bytes);
    case CURLE_PARTIAL_FILE:
        return fail(x, CVLM_FETCH_TRUNCATED,
                    "image_url: truncated: the connection to %.100s closed before the whole "
                    "body arrived",
                    x->host);
    case CURLE_UNSUPPORTED_PROTOCOL:
        return fail(x, CVLM_FETCH_BAD_SCHEME, "image_url: bad scheme: only http and https");
    case CURLE_COULDNT_RESOLVE_HOST:
        return fail(x, CVLM_FETCH_UNREACHABLE, "image_url: unreachable: cannot resolve %.100s",
                    x->host);
    default:
        return fail(x, CVLM_FETCH_UNREACHABLE, "image_url: unreachable: %.100s: %s", x->host,
                    curl_easy_strerror(rc));
    }
}

/* A hop's transfer ended: follow a redirect, or complete the fetch. */
static void hop_done(struct cvlm_fetch *x, CURLcode rc)
{
    enum cvlm_fetch_status st = x->verdict;
    CURLM_CHECK(curl_multi_remove_handle(x->f->multi, x->easy));
    if (!st && rc != CURLE_OK)
        st = curl_status(x, rc);
    else if (!st && x->code >= 300 && x->code < 400) {
        if (!(st = follow(x)))
            return; /* the next hop runs */
    } else if (!st && !looks_like_image((unsigned char *)x->body.p, x->body.len))
        st = fail(x, CVLM_FETCH_NOT_IMAGE,
                  "image_url: not an image: what %.100s sent (%zu bytes) is not JPEG, PNG, GIF "
                  "or WebP",
                  x->host, x->body.len);
    size_t n = strlen(x->msg);
    if (st && x->hops && !strstr(x->msg, "(redirect") && n < sizeof(x->msg))
        snprintf(x->msg + n, sizeof(x->msg) - n, " (after %d redirect%s)", x->hops,
                 x->hops > 1 ? "s" : "");
    complete(x, st, st ? x->msg : "");
}

/* Every transfer curl reports finished. */
static void collect(struct cvlm_fetcher *f)
{
    CURLMsg *m;
    int left;
    while ((m = curl_multi_info_read(f->multi, &left))) {
        char *x = NULL;
        if (m->msg != CURLMSG_DONE)
            continue;
        CURLcode rc = m->data.result; /* m is invalid once the handle is removed */
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, &x);
        if (x)
            hop_done((struct cvlm_fetch *)x, rc);
    }
}

/* The options of every hop. */
static int setup_easy(struct cvlm_fetch *x)
{
    const struct cvlm_server_options *cfg = x->f->cfg;
    CURL *e = x->easy;
    int bad = 0;
    bad |= curl_easy_setopt(e, CURLOPT_PRIVATE, (char *)x) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_PROXY, "") != CURLE_OK; /* never a proxy (env) */
    bad |= curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L) != CURLE_OK;
#if LIBCURL_VERSION_NUM >= 0x075500 /* 7.85: the bitmask options are deprecated */
    bad |= curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https") != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_REDIR_PROTOCOLS_STR, "http,https") != CURLE_OK;
#else
    bad |= curl_easy_setopt(e, CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS)) !=
           CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_REDIR_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS)) !=
           CURLE_OK;
#endif
    bad |= curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, on_open_socket) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_OPENSOCKETDATA, x) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_HEADERDATA, x) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_WRITEDATA, x) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)cfg->max_image_bytes) !=
           CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_HTTPHEADER, x->f->headers) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_USERAGENT, "cogvlm-server") != CURLE_OK;
    /* one connection per hop, closed after it: no pool of idle sockets to account for */
    bad |= curl_easy_setopt(e, CURLOPT_FORBID_REUSE, 1L) != CURLE_OK;
    return bad ? -1 : 0;
}

enum cvlm_fetch_status cvlm_fetch_start(struct cvlm_fetcher *f, const char *url,
                                        void (*done)(void *ctx, enum cvlm_fetch_status status,
                                                     const char *msg, unsigned char *data,
                                                     size_t len),
                                        void *ctx, struct cvlm_fetch **out, char *msg, size_t cap)
{
    char *norm = NULL, host[256];
    struct cvlm_fetch *x;
    enum cvlm_fetch_status st = check_url(f, NULL, url, &norm, host, sizeof(host), msg, cap);
    *out = NULL;
    if (st)
        return st;
    if (!(x = calloc(1, sizeof(*x))) || !(x->easy = curl_easy_init())) {
        free(x);
        curl_free(norm);
        return snprintf(msg, cap, "image_url: out of memory"), CVLM_FETCH_INTERNAL;
    }
    x->f = f;
    x->url = norm;
    snprintf(x->host, sizeof(x->host), "%s", host);
    x->done = done;
    x->ctx = ctx;
    x->deadline = cvlm_now_ms() + f->cfg->media_timeout * 1e3;
    x->next = f->live;
    if (f->live)
        f->live->prev = x;
    f->live = x;
    f->n_live++;
    if (setup_easy(x) || (st = start_hop(x))) {
        snprintf(msg, cap, "%s", x->verdict ? x->msg : "image_url: the transfer could not start");
        fetch_free(x);
        return st ? st : CVLM_FETCH_INTERNAL;
    }
    *out = x;
    return CVLM_FETCH_OK;
}

void cvlm_fetch_cancel(struct cvlm_fetch *x)
{
    if (!x)
        return;
    /* removing a transfer in progress closes its connection (the far end sees it) */
    CURLM_CHECK(curl_multi_remove_handle(x->f->multi, x->easy));
    fetch_free(x);
}

int cvlm_fetcher_active(const struct cvlm_fetcher *f)
{
    return f ? f->n_live : 0;
}

/* ---- the fetcher --------------------------------------------------------------------------- */

/* COGVLM_TEST_ALLOW_LOOPBACK_MEDIA: unset or "" off; "1" loopback on any port; a list of
 * ports "8001,8002" loopback on those only. Anything else is an error (a typo must not
 * widen what is allowed). */
static int read_test_switch(struct cvlm_fetcher *f)
{
    const char *v = getenv("COGVLM_TEST_ALLOW_LOOPBACK_MEDIA");
    if (!v || !*v)
        return 0;
    f->loopback = 1;
    if (!strcmp(v, "1"))
        return 0;
    for (const char *p = v; *p;) {
        char *end;
        unsigned long port = strtoul(p, &end, 10);
        if (end == p || port < 1 || port > 65535 || (*end && *end != ',') ||
            f->n_ports == MAX_PORTS) {
            LOG_ERROR("COGVLM_TEST_ALLOW_LOOPBACK_MEDIA must be 1 or a list of up to %d ports, "
                      "not '%.60s'",
                      MAX_PORTS, v);
            return -1;
        }
        f->ports[f->n_ports++] = (unsigned)port;
        p = *end ? end + 1 : end;
    }
    return 0;
}

static void fetcher_closed(uv_handle_t *h)
{
    free(h->data);
}

struct cvlm_fetcher *cvlm_fetcher_create(uv_loop_t *loop, const struct cvlm_server_options *cfg)
{
    struct cvlm_fetcher *f;
    if (curl_global_init(CURL_GLOBAL_DEFAULT)) {
        LOG_ERROR("cannot initialize libcurl");
        return NULL;
    }
    if (!(f = calloc(1, sizeof(*f)))) {
        curl_global_cleanup();
        return NULL;
    }
    f->loop = loop;
    f->cfg = cfg;
    f->timer.data = f;
    if (read_test_switch(f) || !(f->multi = curl_multi_init()) ||
        !(f->headers = curl_slist_append(
              NULL, "Accept: image/png, image/jpeg, image/webp, image/gif, image/*;q=0.8")) ||
        CURLM_CHECK(curl_multi_setopt(f->multi, CURLMOPT_SOCKETFUNCTION, on_socket)) ||
        CURLM_CHECK(curl_multi_setopt(f->multi, CURLMOPT_SOCKETDATA, f)) ||
        CURLM_CHECK(curl_multi_setopt(f->multi, CURLMOPT_TIMERFUNCTION, on_timer_set)) ||
        CURLM_CHECK(curl_multi_setopt(f->multi, CURLMOPT_TIMERDATA, f)) ||
        UV_CHECK(uv_timer_init(loop, &f->timer))) {
        curl_slist_free_all(f->headers);
        if (f->multi)
            curl_multi_cleanup(f->multi);
        free(f);
        curl_global_cleanup();
        return NULL;
    }
    if (f->loopback)
        LOG_WARN("COGVLM_TEST_ALLOW_LOOPBACK_MEDIA is set: image URLs may reach loopback "
                 "addresses (tests only; never in production)");
    LOG_INFO("image URLs: fetched from %s; at most %llu bytes, %d s (connect %d s), %d "
             "redirects",
             cfg->allow_any_media_domain ? "any public host" : cfg->allowed_media_domains,
             (unsigned long long)cfg->max_image_bytes, cfg->media_timeout,
             cfg->media_connect_timeout, CVLM_FETCH_MAX_REDIRECTS);
    return f;
}

void cvlm_fetcher_destroy(struct cvlm_fetcher *f)
{
    if (!f)
        return;
    while (f->live)
        cvlm_fetch_cancel(f->live);
    curl_multi_cleanup(f->multi); /* may still report sockets removed: f is alive */
    curl_slist_free_all(f->headers);
    UV_CHECK(uv_timer_stop(&f->timer));
    uv_close((uv_handle_t *)&f->timer, fetcher_closed);
    curl_global_cleanup();
}
