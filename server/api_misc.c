/* api_misc.c - GET routes: /health, /metrics, /v1/models, /v1/models/{id}.
 *
 * They run on the loop thread and answer at once: nothing here waits for the engine
 * (the stats are a snapshot the engine thread publishes after each step), so a load
 * balancer's health checks and Prometheus' scrapes are answered even while every engine
 * step is busy. /health is 503 while loading or draining so that a balancer stops
 * sending work before the daemon refuses it. */
#include "server/server.h"

#include "server/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static struct MHD_Response *text(char *body, size_t len, const char *ctype)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body);
        return NULL;
    }
    MHD_CHECK(MHD_add_response_header(r, "Content-Type", ctype));
    return r;
}

static struct MHD_Response *json_body(json_t *j)
{
    char *s = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    return s ? text(s, strlen(s), "application/json") : NULL;
}

/* OpenAI's Model object; `created` is when this daemon started (the checkpoint carries
 * no date), `owned_by` names the server, as other self-hosted servers do. */
static json_t *model_obj(const struct cvlm_srv *s)
{
    return json_pack("{sssssIss}", "id", s->model_id, "object", "model", "created",
                     (json_int_t)s->started, "owned_by", "cogvlm-server");
}

struct MHD_Response *cvlm_api_misc(struct cvlm_srv *s, const char *url, int *status)
{
    *status = 200;
    if (!strcmp(url, "/health")) {
        const char *st = s->draining ? "draining" : s->ready ? "ok" : "loading";
        *status = !s->draining && s->ready ? 200 : 503;
        return json_body(json_pack("{ss}", "status", st));
    }
    if (!strcmp(url, "/metrics")) {
        struct cvlm_engine_stats st = {0};
        size_t len = 0;
        if (s->engine)
            cvlm_engine_get_stats(s->engine, &st);
        char *body = cvlm_metrics_render(&s->metrics, &st, &len);
        return body ? text(body, len, "text/plain; version=0.0.4; charset=utf-8") : NULL;
    }
    if (!strcmp(url, "/v1/models"))
        return json_body(json_pack("{sss[o]}", "object", "list", "data", model_obj(s)));
    /* /v1/models/{id} */
    if (!strcmp(url + 11, s->model_id))
        return json_body(model_obj(s));
    /* OpenAI's answer for an unknown model; the id quoted as printable ASCII (the path
     * may hold any bytes, a JSON string only valid UTF-8) */
    char id[81], msg[400];
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)url + 11; *p && n + 1 < sizeof(id); p++)
        id[n++] = *p >= 0x20 && *p < 0x7f ? (char)*p : '?';
    id[n] = 0;
    snprintf(msg, sizeof(msg), "The model '%s%s' does not exist (this server serves '%.200s')", id,
             url[11 + n] ? "..." : "", s->model_id);
    *status = 404;
    return json_body(json_pack("{s{sssssnss}}", "error", "message", msg, "type",
                               "invalid_request_error", "param", "code", "model_not_found"));
}
