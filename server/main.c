/* main.c - build/cogvlm-server: options, logging, the loop, model loading, signals.
 *
 * The HTTP listener starts first so that /health answers 503 "loading" while the model
 * loads on the work pool; SIGTERM/SIGINT start draining (health 503, new generations
 * 503, in-flight ones finish within --drain-timeout), a second signal stops at once.
 */
#include "server/daemon.h"
#include "server/log.h"
#include "server/server.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uv_work_t load_work;
static int load_rc;
static char load_err[512];

static void load_cb(uv_work_t *w)
{
    struct cvlm_srv *s = w->data;
    const struct cvlm_server_config *c = s->cfg;
    struct cvlm_engine_opts o = {
        .model_dir = c->model, .tokenizer = *c->tokenizer ? c->tokenizer : NULL,
        .threads = c->threads, .backend = !strcmp(c->backend, "cuda"), .tp = c->tp,
        .device = c->device, .dummy_weights = c->dummy_weights, .kv_bytes = c->kv_memory, .block_size = c->block_size,
        .max_batched_tokens = c->max_batched_tokens, .max_seqs = c->max_seqs,
        .queue_limit = c->queue_limit, .vision_cache_bytes = c->vision_cache_memory,
        .no_prefix_cache = !c->prefix_cache, .max_image_pixels = c->max_image_pixels,
        .max_context = c->max_context};
    load_rc = cvlm_engine_create(&o, &s->engine);
    if (load_rc)
        snprintf(load_err, sizeof(load_err), "%s", cvlm_last_error());
}

static void load_done(uv_work_t *w, int status)
{
    struct cvlm_srv *s = w->data;
    (void)status;
    if (load_rc) {
        LOG_ERROR("cannot load the model from %s: %s", s->cfg->model, load_err);
        s->exit_code = 1;
        uv_stop(s->loop);
        return;
    }
    cvlm_engine_get_info(s->engine, &s->info);
    s->ready = 1;
    cvlm_notifyf("READY=1\nSTATUS=serving %s", s->model_id); /* systemd Type=notify */
    LOG_INFO("model %s ready: context %d tokens, %d KV blocks of %d, %s, %s backend, tp %d%s",
             s->model_id, s->info.context_length, s->info.kv_blocks, s->info.block_size,
             s->info.has_vision ? "vision" : "text only", s->cfg->backend, s->cfg->tp,
             s->cfg->dummy_weights ? ", DUMMY WEIGHTS (benchmark only)" : "");
    if (s->draining)
        cvlm_engine_drain(s->engine);
}

static void on_signal(uv_signal_t *h, int signum)
{
    struct cvlm_srv *s = h->data;
    if (s->draining) {
        LOG_WARN("second signal %d: stopping now", signum);
        uv_stop(s->loop);
        return;
    }
    LOG_INFO("signal %d: draining", signum);
    cvlm_notify("STOPPING=1\nSTATUS=draining");
    if (!s->engine) { /* still loading: nothing in flight */
        s->draining = 1;
        uv_stop(s->loop);
        return;
    }
    cvlm_http_begin_drain(s);
}

/* API key from --api-key or the first line of --api-key-file. */
static int load_api_key(struct cvlm_srv *s)
{
    const struct cvlm_server_config *c = s->cfg;
    if (strlen(c->api_key) >= sizeof(s->api_key)) {
        LOG_ERROR("the API key is longer than %zu bytes", sizeof(s->api_key) - 1);
        return -1;
    }
    snprintf(s->api_key, sizeof(s->api_key), "%s", c->api_key);
    if (!*c->api_key_file)
        return 0;
    FILE *f = fopen(c->api_key_file, "r");
    if (!f || !fgets(s->api_key, sizeof(s->api_key), f)) {
        LOG_ERROR("cannot read the API key from %s", c->api_key_file);
        if (f)
            fclose(f);
        return -1;
    }
    fclose(f);
    size_t n = strcspn(s->api_key, "\r\n");
    if (!n || (!s->api_key[n] && n == sizeof(s->api_key) - 1)) {
        LOG_ERROR("%s: the first line must hold the API key (1 to %zu bytes)", c->api_key_file,
                  sizeof(s->api_key) - 2);
        return -1;
    }
    s->api_key[n] = 0;
    return 0;
}

static void model_id(struct cvlm_srv *s)
{
    const char *m = s->cfg->model;
    size_t n = strlen(m);
    if (*s->cfg->served_model_name) {
        snprintf(s->model_id, sizeof(s->model_id), "%s", s->cfg->served_model_name);
        return;
    }
    while (n > 1 && m[n - 1] == '/')
        n--;
    size_t b = n;
    while (b > 0 && m[b - 1] != '/')
        b--;
    snprintf(s->model_id, sizeof(s->model_id), "%.*s", (int)(n - b), m + b);
}

int main(int argc, char **argv)
{
    static struct cvlm_server_config cfg;
    static struct cvlm_srv s;
    char err[512];
    int rc = cvlm_config_parse_all(&cfg, argc, argv, err, sizeof(err));
    if (rc) {
        if (rc < 0)
            fprintf(stderr, "cogvlm-server: %s\n", err);
        cvlm_config_free(&cfg);
        return rc < 0 ? 2 : 0;
    }
    if (cvlm_log_setup(cfg.log_level, cfg.log_format)) {
        fprintf(stderr, "cogvlm-server: bad --log-level or --log-format\n");
        cvlm_config_free(&cfg);
        return 2;
    }
    if ((strcmp(cfg.backend, "cpu") && strcmp(cfg.backend, "cuda")) || cfg.tp < 1 ||
        cfg.tp > 8 || cfg.device < 0) {
        fprintf(stderr, "cogvlm-server: --backend must be cpu or cuda, --tp 1..8, --device >= 0\n");
        cvlm_config_free(&cfg);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    s.cfg = &cfg;
    s.started = (long long)time(NULL);
    s.loop = uv_default_loop();
    cvlm_metrics_init(&s.metrics);
    pthread_mutex_init(&s.wake_mu, NULL);
    model_id(&s);
    if (load_api_key(&s) || cvlm_http_start(&s)) {
        cvlm_config_free(&cfg);
        return 1;
    }
    uv_signal_init(s.loop, &s.sig_term);
    uv_signal_init(s.loop, &s.sig_int);
    s.sig_term.data = s.sig_int.data = &s;
    uv_signal_start(&s.sig_term, on_signal, SIGTERM);
    uv_signal_start(&s.sig_int, on_signal, SIGINT);
    cvlm_watchdog_start(s.loop); /* WATCHDOG=1 every WATCHDOG_USEC/2 when systemd asks */
    load_work.data = &s;
    uv_queue_work(s.loop, &load_work, load_cb, load_done);
    LOG_INFO("loading %s as '%s'", cfg.model, s.model_id);
    uv_run(s.loop, UV_RUN_DEFAULT);
    cvlm_http_stop(&s);
    uv_close((uv_handle_t *)&s.sig_term, NULL);
    uv_close((uv_handle_t *)&s.sig_int, NULL);
    cvlm_watchdog_stop();
    uv_run(s.loop, UV_RUN_NOWAIT);
    cvlm_engine_destroy(s.engine);
    uv_loop_close(s.loop);
    cvlm_config_free(&cfg);
    LOG_INFO("exit %d", s.exit_code);
    return s.exit_code;
}
