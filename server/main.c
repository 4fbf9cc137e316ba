/* main.c - build/cogvlm-server: options, logging, the loop, model loading, signals.
 *
 * The HTTP listener starts first so that /health answers 503 "loading" while the model
 * loads on the work pool; SIGTERM/SIGINT start draining (health 503, new generations
 * 503, in-flight ones finish within --drain-timeout), a second signal stops at once.
 */
#include "server/daemon.h"
#include "server/fetch.h"
#include "server/fetch_addr.h"
#include "server/log.h"
#include "server/server.h"

#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* The model load on the work pool. It owns copies of the strings it reads and its own
 * engine pointer, so that nothing main frees or writes is shared with it while it runs
 * (a signal during the load ends the process without waiting for it). */
static struct {
    uv_work_t work;
    struct cvlm_engine_opts opts;
    char *model, *tokenizer;
    struct cvlm_engine *engine;
    int rc;
    char err[512];
    atomic_int finished; /* set by the worker when cvlm_engine_create returned */
    int done_ran;        /* load_done ran on the loop */
} load;

/* --kv-cache-dtype as the engine's kv_cache_dtype: 0 auto, 1 f32, 2 f16, 3 bf16, 4 int8;
 * -1 for any other value (main refuses it before loading). */
static int kv_cache_dtype(const char *s)
{
    static const char *const names[] = {"auto", "f32", "f16", "bf16", "int8"};
    for (int i = 0; i < 5; i++)
        if (!strcmp(s, names[i]))
            return i;
    return -1;
}

static int load_prepare(const struct cvlm_server_options *c)
{
    load.model = strdup(c->model);
    load.tokenizer = *c->tokenizer ? strdup(c->tokenizer) : NULL;
    if (!load.model || (*c->tokenizer && !load.tokenizer))
        return -1;
    load.opts = (struct cvlm_engine_opts){.model_dir = load.model,
                                          .tokenizer = load.tokenizer,
                                          .threads = c->threads,
                                          .backend = !strcmp(c->backend, "cuda"),
                                          .tp = c->tp,
                                          .device = c->device,
                                          .dummy_weights = c->dummy_weights,
                                          .quantize = !strcmp(c->quantize, "int8")   ? 1
                                                      : !strcmp(c->quantize, "int4") ? 2
                                                                                     : 0,
                                          .quantize_vision = c->quantize_vision,
                                          .lm_head_16bit = !c->quantize_lm_head,
                                          .kv_bytes = c->kv_memory,
                                          .kv_cache_dtype = kv_cache_dtype(c->kv_cache_dtype),
                                          .block_size = c->block_size,
                                          .max_batched_tokens = c->max_batched_tokens,
                                          .max_seqs = c->max_seqs,
                                          .queue_limit = c->queue_limit,
                                          .vision_cache_bytes = c->vision_cache_memory,
                                          .no_prefix_cache = !c->prefix_cache,
                                          .max_image_pixels = c->max_image_pixels,
                                          .max_context = c->max_context,
                                          .max_images_per_step =
                                              c->max_images_per_step ? c->max_images_per_step : -1};
    return 0;
}

static void load_cb(uv_work_t *w)
{
    (void)w;
    load.rc = cvlm_engine_create(&load.opts, &load.engine);
    if (load.rc)
        snprintf(load.err, sizeof(load.err), "%s", cvlm_last_error());
    atomic_store(&load.finished, 1);
}

static void load_done(uv_work_t *w, int status)
{
    struct cvlm_srv *s = w->data;
    (void)status;
    load.done_ran = 1;
    free(load.model);
    free(load.tokenizer);
    load.model = load.tokenizer = NULL;
    if (load.rc) {
        LOG_ERROR("cannot load the model from %s: %s", s->cfg->model, load.err);
        s->exit_code = 1;
        uv_stop(s->loop);
        return;
    }
    s->engine = load.engine;
    if (s->draining && !s->ready) /* a signal came during the load: never serve */
        return;
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
    if (!s->ready) { /* still loading: nothing in flight */
        s->draining = 1;
        uv_stop(s->loop);
        return;
    }
    cvlm_http_begin_drain(s);
}

/* API key from --api-key or the first line of --api-key-file. */
static int load_api_key(struct cvlm_srv *s)
{
    const struct cvlm_server_options *c = s->cfg;
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
    static struct cvlm_server_options cfg;
    static struct cvlm_srv s;
    char err[512];
    int rc = cvlm_options_parse(&cfg, argc, argv, err, sizeof(err));
    if (rc) {
        if (rc < 0)
            fprintf(stderr, "cogvlm-server: %s\n", err);
        cvlm_options_free(&cfg);
        return rc < 0 ? 2 : 0;
    }
    if (cvlm_log_setup(cfg.log_level, cfg.log_format)) {
        fprintf(stderr, "cogvlm-server: bad --log-level or --log-format\n");
        cvlm_options_free(&cfg);
        return 2;
    }
    if (strcmp(cfg.quantize, "none") && strcmp(cfg.quantize, "int8") &&
        strcmp(cfg.quantize, "int4")) {
        fprintf(stderr, "cogvlm-server: --quantize must be none, int8 or int4 (got '%s')\n",
                cfg.quantize);
        cvlm_options_free(&cfg);
        return 2;
    }
    if (kv_cache_dtype(cfg.kv_cache_dtype) < 0) {
        fprintf(stderr,
                "cogvlm-server: --kv-cache-dtype must be auto, f32, f16, bf16 or int8 (got "
                "'%s')\n",
                cfg.kv_cache_dtype);
        cvlm_options_free(&cfg);
        return 2;
    }
    if ((strcmp(cfg.backend, "cpu") && strcmp(cfg.backend, "cuda")) || cfg.tp < 1 || cfg.tp > 8 ||
        cfg.device < 0) {
        fprintf(stderr, "cogvlm-server: --backend must be cpu or cuda, --tp 1..8, --device >= 0\n");
        cvlm_options_free(&cfg);
        return 2;
    }
    if (cvlm_host_list_check(cfg.allowed_media_domains, err, sizeof(err))) {
        fprintf(stderr, "cogvlm-server: allowed_media_domains (--allowed-media-domains): %s\n",
                err);
        cvlm_options_free(&cfg);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    s.cfg = &cfg;
    s.started = (long long)time(NULL);
    s.loop = uv_default_loop();
    cvlm_metrics_init(&s.metrics);
    pthread_mutex_init(&s.wake_mu, NULL);
    model_id(&s);
    /* image URLs: the fetcher (and libcurl's global state) before any other thread runs */
    if (cvlm_fetch_enabled(&cfg) && !(s.fetcher = cvlm_fetcher_create(s.loop, &cfg))) {
        cvlm_options_free(&cfg);
        return 1;
    }
    if (load_api_key(&s) || cvlm_http_start(&s)) {
        cvlm_fetcher_destroy(s.fetcher);
        cvlm_options_free(&cfg);
        return 1;
    }
    s.sig_term.data = s.sig_int.data = &s;
    if (UV_CHECK(uv_signal_init(s.loop, &s.sig_term)) ||
        UV_CHECK(uv_signal_init(s.loop, &s.sig_int)) ||
        UV_CHECK(uv_signal_start(&s.sig_term, on_signal, SIGTERM)) ||
        UV_CHECK(uv_signal_start(&s.sig_int, on_signal, SIGINT))) {
        cvlm_options_free(&cfg);
        return 1;
    }
    cvlm_watchdog_start(s.loop); /* WATCHDOG=1 every WATCHDOG_USEC/2 when systemd asks */
    load.work.data = &s;
    if (load_prepare(&cfg) || UV_CHECK(uv_queue_work(s.loop, &load.work, load_cb, load_done))) {
        LOG_ERROR("cannot start loading the model");
        return 1;
    }
    LOG_INFO("loading %s as '%s'", cfg.model, s.model_id);
    uv_run(s.loop, UV_RUN_DEFAULT);
    if (!atomic_load(&load.finished)) {
        /* stopped during the load: the worker cannot be interrupted, and a normal exit
         * would wait for it (libuv joins its pool at exit), so end here; nothing was
         * served, nothing is in flight */
        cvlm_http_stop(&s);
        LOG_INFO("stopped while loading the model: exit 0");
        fflush(NULL);
        _exit(0);
    }
    for (int i = 0; !load.done_ran && i < 1000; i++) /* its completion may be queued */
        uv_run(s.loop, UV_RUN_NOWAIT);
    cvlm_http_stop(&s);
    cvlm_fetcher_destroy(s.fetcher); /* what still runs is cancelled (none after the stop) */
    uv_close((uv_handle_t *)&s.sig_term, NULL);
    uv_close((uv_handle_t *)&s.sig_int, NULL);
    cvlm_watchdog_stop();
    uv_run(s.loop, UV_RUN_NOWAIT);
    cvlm_engine_destroy(s.engine);
    UV_CHECK(uv_loop_close(s.loop)); /* UV_EBUSY: a handle left open (a bug worth a log) */
    cvlm_options_free(&cfg);
    LOG_INFO("exit %d", s.exit_code);
    return s.exit_code;
}
