/* fetch.h - fetching http(s) image URLs with libcurl on the server's libuv loop.
 *
 * One fetcher per loop: a curl multi handle driven by the multi socket API (each socket
 * curl wants watched is a uv_poll_t, curl's timeout one uv_timer_t), so a fetch never
 * blocks the loop and needs no thread of ours. Everything here runs on the loop thread.
 *
 * The rules a fetch obeys (docs/SECURITY.md, "What is fetched"):
 * - off unless --allowed-media-domains or --allow-any-media-domain enables it;
 * - http and https only; the host of the URL and of every redirect hop must be on the
 *   allow-list (unless any host is allowed); at most CVLM_FETCH_MAX_REDIRECTS redirects,
 *   followed here, hop by hop, never by curl;
 * - every address curl is about to connect to (each address of each hop) is classified
 *   first (server/fetch_addr.h) and refused unless public: the check is on the very
 *   address connected to, so DNS rebinding has no window; no proxy is ever used;
 * - --max-image-bytes bounds the body (a larger Content-Length is refused at the headers,
 *   a body that grows past it is cut), --media-connect-timeout and --media-timeout the
 *   time (the total covers every hop);
 * - a 2xx answer whose Content-Type is present and not an image type, or whose bytes do
 *   not start like JPEG, PNG, GIF or WebP, is refused before anyone decodes it.
 * Every refusal has a status below and a message naming the reason.
 *
 * Ownership: the caller holds the fetch until its done callback runs (once, on the loop)
 * or until it cancels it; after either, the fetch is gone.
 */
#ifndef CVLM_SERVER_FETCH_H
#define CVLM_SERVER_FETCH_H

#include "server/options.h"

#include <stddef.h>
#include <uv.h>

#define CVLM_FETCH_MAX_REDIRECTS 3

enum cvlm_fetch_status {
    CVLM_FETCH_OK = 0,
    CVLM_FETCH_BAD_URL,            /* not a URL curl can parse */
    CVLM_FETCH_BAD_SCHEME,         /* not http/https (the URL or a redirect) */
    CVLM_FETCH_DOMAIN_NOT_ALLOWED, /* host not on --allowed-media-domains */
    CVLM_FETCH_FORBIDDEN_ADDRESS,  /* the host's address is loopback, private, ... */
    CVLM_FETCH_UNREACHABLE,        /* name, connection, TLS or HTTP status failed */
    CVLM_FETCH_TIMED_OUT,          /* connect or total timeout */
    CVLM_FETCH_TOO_LARGE,          /* over --max-image-bytes */
    CVLM_FETCH_TRUNCATED,          /* the body ended before its Content-Length */
    CVLM_FETCH_NOT_IMAGE,          /* Content-Type or magic bytes */
    CVLM_FETCH_TOO_MANY_REDIRECTS,
    CVLM_FETCH_INTERNAL, /* out of memory, curl refused an option: still a request error */
};

struct cvlm_fetcher;
struct cvlm_fetch;

/* Whether the options enable fetching at all (an allow-list or any host). Inline: the
 * request parser asks it on the work pool and links no curl. */
static inline int cvlm_fetch_enabled(const struct cvlm_server_options *cfg)
{
    return cfg->allow_any_media_domain ||
           (cfg->allowed_media_domains && cfg->allowed_media_domains[0]);
}

/* Creates the fetcher (cfg must outlive it, its allow-list checked by
 * cvlm_host_list_check); NULL on failure (logged). Reads the test-only
 * COGVLM_TEST_ALLOW_LOOPBACK_MEDIA (docs/SECURITY.md); a malformed value is an error.
 * Initializes libcurl: call it before other threads start. */
struct cvlm_fetcher *cvlm_fetcher_create(uv_loop_t *loop, const struct cvlm_server_options *cfg);
/* Cancels every fetch still running (their callbacks never run) and closes the handles;
 * the loop must run once more (UV_RUN_NOWAIT) for the closes to complete. NULL is fine. */
void cvlm_fetcher_destroy(struct cvlm_fetcher *f);
/* Fetches currently running. */
int cvlm_fetcher_active(const struct cvlm_fetcher *f);

/* Starts fetching url. Returns CVLM_FETCH_OK and the fetch in *out, or another status with
 * the message in msg (a URL refused before any connection: bad URL or scheme, domain, an
 * address literal of a forbidden class).
 * done(ctx, status, msg, data, len) is then called once on the loop: the status, a message
 * naming the reason ("image_url: timed out: ..."; "" on success) and on success the body
 * (data, len: malloc'd, the callee frees it; NULL otherwise). */
enum cvlm_fetch_status cvlm_fetch_start(struct cvlm_fetcher *f, const char *url,
                                        void (*done)(void *ctx, enum cvlm_fetch_status status,
                                                     const char *msg, unsigned char *data,
                                                     size_t len),
                                        void *ctx, struct cvlm_fetch **out, char *msg, size_t cap);
/* Stops a running fetch and frees it; its callback never runs. Closes its connection. */
void cvlm_fetch_cancel(struct cvlm_fetch *x);

/* The error `code` of a status for the API ("image_fetch_timeout", ...). */
const char *cvlm_fetch_code(enum cvlm_fetch_status status);

#endif
