/* server.h - shared state of the HTTP front end (loop thread) and its modules.
 *
 * Thread rules: everything here belongs to the libuv loop thread except
 * - conn fields written by the work-pool job (parse + request preparation) before its
 *   completion callback runs on the loop, and
 * - the wake list (wake_mu), which the engine thread's wake hook appends to before
 *   uv_async_send().
 * A request with an http(s) image URL is prepared in two work-pool jobs with the fetch
 * (server/fetch.h, on the loop) between them: CONN_PREP, CONN_FETCH, CONN_PREP again.
 * A conn is freed when MHD is done with it and no engine request can still wake it
 * (every choice's finish has been taken).
 */
#ifndef CVLM_SERVER_H
#define CVLM_SERVER_H

#include "base/buf.h"
#include "engine/engine.h"
#include "server/fetch.h"
#include "server/metrics.h"
#include "server/options.h"

#include <jansson.h>
#include <microhttpd.h>
#include <pthread.h>
#include <uv.h>

enum conn_state {
    CONN_BODY = 0, /* receiving the body */
    CONN_PREP,     /* parse + request preparation on the work pool (suspended) */
    CONN_FETCH,    /* the loop fetches the request's image URL (suspended) */
    CONN_RUN,      /* generating (suspended between outputs) */
    CONN_REPLY,    /* a response is ready to be queued when resumed */
    CONN_SENT,     /* response queued (MHD writes it; mhd_done once it is all sent) */
};

/* Why the server itself ended a request before its natural end (not the client). */
enum conn_cut {
    CUT_NONE = 0,
    CUT_TIMEOUT, /* --request-timeout: 504 (or an error event in a stream) */
    CUT_DRAIN,   /* still running at the --drain-timeout deadline: 503 / error event */
};

struct choice {
    struct cvlm_request *r;
    int done; /* its finish has been taken */
    enum cvlm_finish finish;
    struct cvlm_buf text; /* accumulated (non-streaming, or a stream's for its boxes) */
    /* non-streaming logprobs, kept as compact JSON text (a jansson tree of them costs
     * ~8x the text), the items of each array comma-separated without the brackets: chat:
     * lp[0] = content entries; completions: lp[0..3] = tokens, token_logprobs,
     * top_logprobs, text_offset. lp_off: the next token's text offset (characters). */
    struct cvlm_buf lp[4];
    size_t lp_off;
    int prompt_tokens, completion_tokens;
    int role_sent; /* streaming: first delta sent */
};

/* What the client asked for, beyond the engine's parameters. */
struct api_opts {
    int chat; /* chat.completions vs completions */
    int stream, include_usage;
    int n;
    int logprobs; /* -1 none, else top-N */
    char model[256];
    int boxes;       /* "cogvlm": {"boxes": "pixels"}: message.boxes (server/boxes.h) */
    int image_wh[2]; /* the request's image as sent (width, height); 0 x 0 without one */
    char user[257];  /* the `user` field, for the log line (at most 256 bytes of it) */
};

struct api_pending; /* api_parse.c: a parsed request waiting for its fetched image */

struct conn {
    struct cvlm_srv *s;
    struct MHD_Connection *mc;
    const char *route; /* for metrics: "/v1/chat/completions", ... */
    char id[48];       /* ours: in completion ids and log lines */
    /* X-Request-Id of every response: the client's (when it is 1..128 visible ASCII
     * characters, so never anything that could break a header) or id */
    char rid[129];
    long long created;
    double t_start;
    struct cvlm_buf body; /* the request body as received */
    size_t received;      /* body bytes received (also those dropped past the limit) */
    int too_big;
    enum conn_state state;
    int suspended, mhd_done, refs;
    /* set by the work-pool job */
    struct api_opts o;
    struct choice *ch;
    int n_ch;
    int stale_ticks;   /* ticks that saw output pending with no wake-up queued */
    int gen_failed;    /* a stream's choice failed: an error event ends the stream */
    int fail_status;   /* ... with this status in the metrics and the log */
    enum conn_cut cut; /* set before the server cancels the choices itself */
    int client_gone;   /* the tick saw the peer close a suspended connection */
    int status;        /* error reply: HTTP status, message, type, param, code */
    char err_msg[512], err_type[40], err_param[96], err_code[40];
    /* streaming output not yet handed to MHD: sse.p[sse_off..sse.len) */
    struct cvlm_buf sse;
    size_t sse_off;
    int sse_end; /* [DONE] appended: end of stream after sse drains */
    uv_work_t work;
    /* an http(s) image URL: written by the first job, then the loop's until the fetch
     * ends (the fetched bytes then go to the second job with the parsed request) */
    struct api_pending *pending;
    const char *image_url; /* inside pending's JSON tree */
    char image_param[96];  /* its place: "messages[0].content[1].image_url.url" */
    struct cvlm_fetch *fetch;
    int wake_queued;          /* wake_mu */
    struct conn *wake_next;   /* wake_mu */
    struct conn *prev, *next; /* live list */
    char *reply;              /* CONN_REPLY: body to send */
    size_t reply_len;
};

struct cvlm_srv {
    struct cvlm_server_options *cfg;
    uv_loop_t *loop;
    struct MHD_Daemon *mhd;
    uv_poll_t mhd_poll;
    uv_timer_t mhd_timer, tick;
    uv_async_t wake;
    uv_signal_t sig_term, sig_int;
    struct cvlm_engine *engine;
    struct cvlm_fetcher *fetcher; /* NULL unless image URLs are fetched */
    struct cvlm_engine_info info;
    char model_id[256];
    char api_key[512];
    int ready, draining, exit_code;
    int drain_cutting; /* the drain deadline passed: what ran was cancelled */
    int stopping;      /* MHD is being stopped: completions now are our cuts */
    long long started; /* unix time the server started (model "created") */
    double drain_deadline;
    struct cvlm_metrics metrics;
    pthread_mutex_t wake_mu;
    struct conn *wake_head;
    struct conn *live;
    uint64_t next_id;
};

/* http.c */
int cvlm_http_start(struct cvlm_srv *s);
void cvlm_http_stop(struct cvlm_srv *s);
void cvlm_http_kick(struct cvlm_srv *s); /* run MHD now and re-arm its timer */
void cvlm_http_begin_drain(struct cvlm_srv *s);

/* api_parse.c (work pool): body -> options + prepared engine requests, or an error; or,
 * for an http(s) image URL, the parsed request in c->pending and the URL in c->image_url */
void cvlm_api_prepare(struct conn *c);
/* (loop) The fetched image for the pending request; takes data (malloc'd). */
void cvlm_api_set_image(struct conn *c, unsigned char *data, size_t len);
/* (work pool) The pending request with its image -> prepared engine requests, or an error;
 * c->pending is freed. */
void cvlm_api_prepare_image(struct conn *c);
/* Frees c->pending (no-op without one). */
void cvlm_api_pending_free(struct conn *c);

/* api_render.c (loop) */
void cvlm_api_error(struct conn *c, int status, const char *type, const char *param,
                    const char *code, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
char *cvlm_api_error_body(const struct conn *c, size_t *len);
/* Drains new engine output of every choice into the stream buffer (stream) or the
 * choices' accumulators; returns 1 when all choices are finished. */
int cvlm_api_collect(struct conn *c);
/* The final non-streaming body. */
char *cvlm_api_final_body(struct conn *c, size_t *len);

/* api_misc.c (loop) */
struct MHD_Response *cvlm_api_misc(struct cvlm_srv *s, const char *url, int *status);

#endif
