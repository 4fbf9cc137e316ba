/* metrics.h - Prometheus metrics of the server: histograms and counters updated on the
 * loop thread, rendered together with the engine's stats on GET /metrics. */
#ifndef CVLM_SERVER_METRICS_H
#define CVLM_SERVER_METRICS_H

#include "engine/engine.h"

#include <stddef.h>
#include <stdint.h>

#define CVLM_HIST_MAX 24

struct cvlm_hist {
    const double *bounds; /* upper bounds in seconds, ascending */
    int n;
    uint64_t counts[CVLM_HIST_MAX]; /* per bucket (not cumulative) + the +Inf bucket */
    double sum;
    uint64_t count;
};

struct cvlm_http_count {
    const char *route;
    int status;
    uint64_t n;
};

struct cvlm_metrics {
    struct cvlm_hist ttft, itl, e2e, vision, queue;
    struct cvlm_http_count http[96];
    int n_http;
};

void cvlm_metrics_init(struct cvlm_metrics *m);
void cvlm_hist_observe(struct cvlm_hist *h, double seconds);
void cvlm_metrics_http(struct cvlm_metrics *m, const char *route, int status);
/* Prometheus text exposition (malloc'd). */
char *cvlm_metrics_render(const struct cvlm_metrics *m, const struct cvlm_engine_stats *st,
                          size_t *len);

#endif
