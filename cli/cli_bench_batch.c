/* cli_bench_batch.c - `cogvlm bench-batch`: the engine's batched throughput.
 *
 * Runs the scheduler through the engine API (no HTTP): for each concurrency level, submits
 * that many requests at once (ignore_eos, fixed output length) and reports generated
 * tokens/s over the wall time, mean time to first token and steps; then, with --image,
 * the time to first token of an image request cold, with a vision-cache hit (prefix
 * cache off) and with a prefix-cache hit.
 */
#include "base/clock.h"
#include "cli/cli.h"
#include "engine/engine.h"
#include "engine/model/model.h"
#include "engine/util/fileio.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct waiter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int signals;
};

static void on_wake(void *ctx)
{
    struct waiter *w = ctx;
    pthread_mutex_lock(&w->mu);
    w->signals++;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

struct result {
    double wall_ms, ttft_ms;
    long tokens;
};

/* Submits n requests, waits for all; sums tokens and TTFT. */
static int run_batch(struct cvlm_engine *e, const struct cvlm_request_params *base, int n,
                     struct result *res)
{
    struct waiter w = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};
    struct cvlm_request **r = calloc((size_t)n, sizeof(*r));
    char(*text)[128] = calloc((size_t)n, 128);
    int *done = calloc((size_t)n, sizeof(int)), left = n, seen = 0, rc = 0;
    memset(res, 0, sizeof(*res));
    if (!r || !text || !done)
        return -1;
    double t0 = cvlm_now_ms();
    for (int i = 0; i < n && !rc; i++) {
        struct cvlm_request_params p = *base;
        snprintf(text[i], 128, "%s (request %d)", base->prompt, i); /* no shared prefix */
        p.prompt = text[i];
        if ((rc = cvlm_request_create(e, &p, &r[i])) ||
            (rc = cvlm_engine_submit(e, r[i], on_wake, &w)))
            fprintf(stderr, "bench-batch: %s\n", cvlm_last_error());
    }
    while (!rc && left > 0) {
        pthread_mutex_lock(&w.mu);
        while (w.signals == seen)
            pthread_cond_wait(&w.cv, &w.mu);
        seen = w.signals;
        pthread_mutex_unlock(&w.mu);
        for (int i = 0; i < n; i++) {
            struct cvlm_output o;
            while (!done[i] && cvlm_request_take(r[i], &o)) {
                if (o.finish) {
                    done[i] = 1;
                    left--;
                    res->tokens += o.completion_tokens;
                    res->ttft_ms += o.ttft_ms / n;
                }
                cvlm_output_free(&o);
            }
        }
    }
    res->wall_ms = cvlm_now_ms() - t0;
    for (int i = 0; i < n; i++)
        cvlm_request_unref(r[i]);
    free(r);
    free(text);
    free(done);
    return rc;
}

/* TTFT of one image request on engine e (after what e has already seen). */
static double image_ttft(struct cvlm_engine *e, const struct cvlm_request_params *base,
                         const void *img, size_t len)
{
    struct cvlm_request_params p = *base;
    struct result r = {0};
    p.image = img;
    p.image_len = len;
    p.max_tokens = 1;
    struct cvlm_request *q;
    struct waiter w = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};
    if (cvlm_request_create(e, &p, &q) || cvlm_engine_submit(e, q, on_wake, &w)) {
        fprintf(stderr, "bench-batch: %s\n", cvlm_last_error());
        return -1;
    }
    struct cvlm_output o = {0};
    for (int seen = 0;;) {
        pthread_mutex_lock(&w.mu);
        while (w.signals == seen)
            pthread_cond_wait(&w.cv, &w.mu);
        seen = w.signals;
        pthread_mutex_unlock(&w.mu);
        int fin = 0;
        while (cvlm_request_take(q, &o)) {
            fin |= o.finish != 0;
            r.ttft_ms = o.ttft_ms;
            cvlm_output_free(&o);
        }
        if (fin)
            break;
    }
    cvlm_request_unref(q);
    return r.ttft_ms;
}

int cvlm_cli_bench_batch(int argc, char **argv)
{
    struct cvlm_engine_opts eo = {.kv_bytes = (size_t)1 << 30,
                                  .max_seqs = 64,
                                  .max_batched_tokens = 1024,
                                  .vision_cache_bytes = 64 << 20};
    struct cvlm_request_params p = {0};
    const char *image = NULL, *json = NULL, *rformat = NULL;
    unsigned char *schema = NULL;
    size_t schema_len = 0;
    int levels[8] = {1, 4, 16, 64}, n_levels = 4;
    cvlm_sampling_defaults(&p.sampling);
    p.prompt = "Write a long story about a llama who climbs a mountain";
    p.max_tokens = 64;
    p.ignore_eos = 1;
    p.logprobs = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        struct cvlm_model_opts mo = {.backend = (enum cvlm_backend_kind)eo.backend,
                                     .tp = eo.tp,
                                     .threads = eo.threads,
                                     .device = eo.device,
                                     .kv_cache_dtype = eo.kv_cache_dtype};
        int mrc = cvlm_cli_model_opt(argc, argv, &i, &mo);
        if (mrc < 0)
            return 2;
        if (mrc) {
            eo.backend = (int)mo.backend, eo.tp = mo.tp, eo.threads = mo.threads;
            eo.device = mo.device, eo.kv_cache_dtype = mo.kv_cache_dtype;
            continue;
        }
        if (!strcmp(a, "--dummy-weights")) {
            eo.dummy_weights = 1;
            continue;
        }
        if (!strcmp(a, "--help") || !v) {
            printf("usage: cogvlm bench-batch --model DIR [--tokenizer PATH] [--dummy-weights]\n"
                   "       [--concurrency 1,4,16,64] [--max-tokens 64] [--image PATH] "
                   "[--json FILE]\n       [--response-format "
                   "json_object|SCHEMA.json] " CVLM_CLI_MODEL_USAGE "\n"
                   "--dummy-weights: random weights of DIR/config.json (no "
                   "safetensors).\n"
                   "--response-format: constrain every request (structured outputs) and "
                   "report\n  the sampling phase's share of the step time.\n" CVLM_CLI_MODEL_HELP);
            return strcmp(a, "--help") ? 2 : 0;
        }
        i++;
        if (!strcmp(a, "--model"))
            eo.model_dir = v;
        else if (!strcmp(a, "--tokenizer"))
            eo.tokenizer = v;
        else if (!strcmp(a, "--max-tokens"))
            p.max_tokens = atoi(v);
        else if (!strcmp(a, "--image"))
            image = v;
        else if (!strcmp(a, "--json"))
            json = v;
        else if (!strcmp(a, "--response-format"))
            rformat = v;
        else if (!strcmp(a, "--concurrency")) {
            n_levels = 0;
            for (char *s = (char *)v; *s && n_levels < 8; s += strspn(s, ","))
                levels[n_levels++] = (int)strtol(s, &s, 10);
        } else {
            fprintf(stderr, "bench-batch: unknown option %s\n", a);
            return 2;
        }
    }
    if (rformat && !strcmp(rformat, "json_object")) {
        p.response_format = CVLM_RFORMAT_JSON_OBJECT;
    } else if (rformat) {
        if (cvlm_read_file(rformat, (size_t)1 << 24, &schema, &schema_len)) {
            fprintf(stderr, "bench-batch: %s\n", cvlm_last_error());
            return 1;
        }
        p.response_format = CVLM_RFORMAT_JSON_SCHEMA;
        p.json_schema = (const char *)schema;
        p.json_schema_len = schema_len;
    }
    struct cvlm_engine *e;
    if (cvlm_engine_create(&eo, &e)) {
        fprintf(stderr, "bench-batch: %s\n", cvlm_last_error());
        return 1;
    }
    FILE *jf = json ? fopen(json, "w") : NULL;
    if (jf)
        fprintf(jf, "{\"model\": \"%s\", \"max_tokens\": %d, \"levels\": [", eo.model_dir,
                p.max_tokens);
    printf("%-12s %12s %12s %12s %12s\n", "concurrency", "tokens/s", "mean TTFT ms", "wall s",
           "sampling %");
    for (int k = 0; k < n_levels; k++) {
        struct result r;
        struct cvlm_engine_stats s0, s1;
        cvlm_engine_get_stats(e, &s0);
        if (run_batch(e, &p, levels[k], &r))
            break;
        cvlm_engine_get_stats(e, &s1);
        double tps = r.tokens / (r.wall_ms / 1e3), sample = s1.sample_ms - s0.sample_ms;
        double step = sample + s1.forward_ms - s0.forward_ms + s1.plan_ms - s0.plan_ms;
        printf("%-12d %12.1f %12.1f %12.2f %12.2f\n", levels[k], tps, r.ttft_ms, r.wall_ms / 1e3,
               step > 0 ? 100 * sample / step : 0);
        if (jf)
            fprintf(jf,
                    "%s{\"concurrency\": %d, \"tokens_per_s\": %.2f, \"ttft_ms\": %.2f, "
                    "\"sampling_ms\": %.2f, \"step_ms\": %.2f}",
                    k ? ", " : "", levels[k], tps, r.ttft_ms, sample, step);
    }
    if (jf)
        fprintf(jf, "]");
    cvlm_engine_destroy(e);
    if (image) {
        size_t len = 0;
        unsigned char *img = NULL;
        if (cvlm_read_file(image, (size_t)1 << 30, &img, &len))
            fprintf(stderr, "bench-batch: %s\n", cvlm_last_error());
        struct cvlm_engine *e2;
        eo.no_prefix_cache = 1;
        if (img && !cvlm_engine_create(&eo, &e2)) {
            double cold = image_ttft(e2, &p, img, len), warm = image_ttft(e2, &p, img, len);
            cvlm_engine_destroy(e2);
            eo.no_prefix_cache = 0;
            cvlm_engine_create(&eo, &e2);
            image_ttft(e2, &p, img, len);
            double prefix = image_ttft(e2, &p, img, len);
            cvlm_engine_destroy(e2);
            printf("image TTFT: cold %.1f ms, vision-cache hit %.1f ms, prefix-cache hit %.1f ms\n",
                   cold, warm, prefix);
            if (jf)
                fprintf(jf,
                        ", \"image_ttft_ms\": {\"cold\": %.2f, \"vision_cache_hit\": %.2f, "
                        "\"prefix_cache_hit\": %.2f}",
                        cold, warm, prefix);
        }
        free(img);
    }
    if (jf) {
        fprintf(jf, "}\n");
        fclose(jf);
    }
    free(schema);
    return 0;
}
