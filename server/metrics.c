/* metrics.c - histogram/counter bookkeeping and the text exposition format. */
#include "server/metrics.h"

#include "base/buf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const double lat_bounds[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                    1,     2.5,    5,     10,   30,    60,   120, 300};
static const double tok_bounds[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                    0.075,  0.1,   0.25,   0.5,   1,    2.5};

static void hist_init(struct cvlm_hist *h, const double *b, int n)
{
    memset(h, 0, sizeof(*h));
    h->bounds = b;
    h->n = n;
}

void cvlm_metrics_init(struct cvlm_metrics *m)
{
    memset(m, 0, sizeof(*m));
    hist_init(&m->ttft, lat_bounds, (int)(sizeof(lat_bounds) / sizeof(lat_bounds[0])));
    hist_init(&m->e2e, lat_bounds, (int)(sizeof(lat_bounds) / sizeof(lat_bounds[0])));
    hist_init(&m->vision, lat_bounds, (int)(sizeof(lat_bounds) / sizeof(lat_bounds[0])));
    hist_init(&m->queue, lat_bounds, (int)(sizeof(lat_bounds) / sizeof(lat_bounds[0])));
    hist_init(&m->itl, tok_bounds, (int)(sizeof(tok_bounds) / sizeof(tok_bounds[0])));
}

void cvlm_hist_observe(struct cvlm_hist *h, double v)
{
    int i = 0;
    while (i < h->n && v > h->bounds[i])
        i++;
    h->counts[i]++;
    h->sum += v;
    h->count++;
}

void cvlm_metrics_http(struct cvlm_metrics *m, const char *route, int status)
{
    for (int i = 0; i < m->n_http; i++)
        if (m->http[i].status == status && !strcmp(m->http[i].route, route)) {
            m->http[i].n++;
            return;
        }
    if (m->n_http < (int)(sizeof(m->http) / sizeof(m->http[0])))
        m->http[m->n_http++] = (struct cvlm_http_count){route, status, 1};
}

static void gauge(struct cvlm_buf *b, const char *name, const char *help, double v)
{
    cvlm_buf_printf(b, "# HELP %s %s\n# TYPE %s gauge\n%s %.17g\n", name, help, name, name, v);
}

static void counter(struct cvlm_buf *b, const char *name, const char *help, uint64_t v)
{
    cvlm_buf_printf(b, "# HELP %s %s\n# TYPE %s counter\n%s %llu\n", name, help, name, name,
                    (unsigned long long)v);
}

static void hist(struct cvlm_buf *b, const char *name, const char *help, const struct cvlm_hist *h)
{
    uint64_t cum = 0;
    cvlm_buf_printf(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    for (int i = 0; i < h->n; i++) {
        cum += h->counts[i];
        cvlm_buf_printf(b, "%s_bucket{le=\"%g\"} %llu\n", name, h->bounds[i],
                        (unsigned long long)cum);
    }
    cvlm_buf_printf(b, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.9g\n%s_count %llu\n", name,
                    (unsigned long long)h->count, name, h->sum, name, (unsigned long long)h->count);
}

char *cvlm_metrics_render(const struct cvlm_metrics *m, const struct cvlm_engine_stats *st,
                          size_t *len)
{
    struct cvlm_buf b = {0};
    gauge(&b, "cogvlm_requests_running", "Requests running in the engine.", st->running);
    gauge(&b, "cogvlm_requests_waiting", "Requests waiting for admission.", st->waiting);
    gauge(&b, "cogvlm_kv_blocks_used", "KV cache blocks held by requests.", st->kv_used);
    gauge(&b, "cogvlm_kv_blocks_cached", "Free KV blocks still holding a cached prefix.",
          st->kv_cached);
    gauge(&b, "cogvlm_kv_blocks_total", "KV cache blocks in all.", st->kv_blocks);
    gauge(&b, "cogvlm_kv_usage_ratio", "Fraction of KV blocks held by requests.",
          st->kv_blocks ? (double)st->kv_used / st->kv_blocks : 0);
    counter(&b, "cogvlm_prompt_tokens_total", "Prompt tokens computed (prefill).",
            st->prompt_tokens);
    counter(&b, "cogvlm_generation_tokens_total", "Tokens generated.", st->generation_tokens);
    counter(&b, "cogvlm_prefix_cache_hit_tokens_total", "Prompt tokens found in the prefix cache.",
            st->prefix_hit_tokens);
    counter(&b, "cogvlm_prefix_cache_query_tokens_total", "Prompt tokens looked up.",
            st->prefix_query_tokens);
    counter(&b, "cogvlm_vision_cache_hits_total", "Images whose features were cached.",
            st->vision_hits);
    counter(&b, "cogvlm_vision_cache_misses_total", "Images run through the vision tower.",
            st->vision_misses);
    counter(&b, "cogvlm_preemptions_total", "Sequences preempted for lack of KV blocks.",
            st->preemptions);
    counter(&b, "cogvlm_engine_steps_total", "Engine steps run.", st->steps);
    counter(&b, "cogvlm_images_encoded_total", "Images run through the vision tower.",
            st->images_encoded);
    counter(&b, "cogvlm_images_deferred_total",
            "Prefill chunks held back a step by --max-images-per-step.", st->images_deferred);
    cvlm_buf_printf(&b,
                    "# HELP cogvlm_step_phase_seconds_total Engine time by step phase.\n"
                    "# TYPE cogvlm_step_phase_seconds_total counter\n"
                    "cogvlm_step_phase_seconds_total{phase=\"plan\"} %.6f\n"
                    "cogvlm_step_phase_seconds_total{phase=\"encode_images\"} %.6f\n"
                    "cogvlm_step_phase_seconds_total{phase=\"forward\"} %.6f\n"
                    "cogvlm_step_phase_seconds_total{phase=\"sample\"} %.6f\n",
                    st->plan_ms / 1e3, st->encode_ms / 1e3, st->forward_ms / 1e3,
                    st->sample_ms / 1e3);
    cvlm_buf_printf(&b,
                    "# HELP cogvlm_requests_total Requests ended in the engine, by outcome.\n"
                    "# TYPE cogvlm_requests_total counter\n"
                    "cogvlm_requests_total{status=\"finished\"} %llu\n"
                    "cogvlm_requests_total{status=\"cancelled\"} %llu\n"
                    "cogvlm_requests_total{status=\"failed\"} %llu\n",
                    (unsigned long long)st->requests_finished,
                    (unsigned long long)st->requests_cancelled,
                    (unsigned long long)st->requests_failed);
    hist(&b, "cogvlm_time_to_first_token_seconds", "Time to first token.", &m->ttft);
    hist(&b, "cogvlm_inter_token_latency_seconds", "Time between output tokens.", &m->itl);
    hist(&b, "cogvlm_request_duration_seconds", "End-to-end request latency.", &m->e2e);
    hist(&b, "cogvlm_queue_time_seconds", "Time waiting for admission.", &m->queue);
    hist(&b, "cogvlm_vision_tower_seconds", "Vision tower time per image.", &m->vision);
    cvlm_buf_printf(&b, "# HELP cogvlm_http_requests_total HTTP requests by route and status.\n"
                        "# TYPE cogvlm_http_requests_total counter\n");
    for (int i = 0; i < m->n_http; i++)
        cvlm_buf_printf(&b, "cogvlm_http_requests_total{route=\"%s\",status=\"%d\"} %llu\n",
                        m->http[i].route, m->http[i].status, (unsigned long long)m->http[i].n);
    return cvlm_buf_take(&b, len); /* NULL when memory ran out (the connection is closed) */
}
