/* test_engine.c - the scheduler through the public engine API: batch invariance,
 * preemption, caches, stop conditions, limits and a random submit/cancel soak. */
#include "engine/engine.h"
#include "engine/hash.h"
#include "tests/unit/harness.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* A request as the test sees it: output accumulated from wake-ups. */
struct job {
    struct cvlm_request *r;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done, signals;
    char text[4096];
    size_t len;
    int32_t ids[512];
    int n_ids;
    struct cvlm_output last;
};

static void on_wake(void *ctx)
{
    struct job *j = ctx;
    pthread_mutex_lock(&j->mu);
    j->signals++;
    pthread_cond_signal(&j->cv);
    pthread_mutex_unlock(&j->mu);
}

/* Drains the request's output; returns 1 once finished. */
static int drain(struct job *j)
{
    struct cvlm_output o;
    while (cvlm_request_take(j->r, &o)) {
        if (o.text_len && j->len + o.text_len < sizeof(j->text)) {
            memcpy(j->text + j->len, o.text, o.text_len);
            j->len += o.text_len;
        }
        for (int i = 0; i < o.n_tokens && j->n_ids < 512; i++)
            j->ids[j->n_ids++] = o.tokens[i].id;
        if (o.finish) {
            j->done = 1;
            j->last = o;
            j->last.text = NULL;
            j->last.tokens = NULL;
        }
        cvlm_output_free(&o);
    }
    return j->done;
}

/* Waits for wake-ups and drains; never holds j->mu while calling into the engine (the
 * wake hook takes j->mu under the request's lock). */
static void wait_job(struct job *j)
{
    int seen = 0;
    while (!drain(j)) {
        pthread_mutex_lock(&j->mu);
        while (j->signals == seen) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 50 * 1000 * 1000;
            if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
            }
            if (pthread_cond_timedwait(&j->cv, &j->mu, &ts))
                break;
        }
        seen = j->signals;
        pthread_mutex_unlock(&j->mu);
    }
}

static struct cvlm_engine *open_engine_tp(size_t kv_bytes, int max_seqs, int batched, int tp)
{
    struct cvlm_engine_opts o = {.model_dir = cvlm_test_data("golden-tiny/model"),
                                 .tokenizer = cvlm_test_data("llama2-tokenizer.model"),
                                 .threads = 2, .kv_bytes = kv_bytes, .block_size = 4,
                                 .max_seqs = max_seqs, .max_batched_tokens = batched,
                                 .vision_cache_bytes = 1 << 20, .queue_limit = 64, .tp = tp};
    struct cvlm_engine *e = NULL;
    if (cvlm_engine_create(&o, &e))
        printf("  engine: %s\n", cvlm_last_error());
    return e;
}

static struct cvlm_engine *open_engine(size_t kv_bytes, int max_seqs, int batched)
{
    return open_engine_tp(kv_bytes, max_seqs, batched, 1);
}

static unsigned char *png_bytes(size_t *len)
{
    return cvlm_test_read_file(cvlm_test_data("golden-tiny/image.png"), len);
}

static const char *const prompts[] = {
    "What is in this image?", "Describe it.", "How many shapes are there in the picture?",
    "Where is the red square?", "Tell me a long story about a llama and a mountain.",
    "Hi", "What color is the circle?", "Count to ten.",
};

/* Starts job k of a family: varied prompts, every third with the image. */
static int start(struct cvlm_engine *e, struct job *j, int k, const void *img, size_t img_len,
                 int max_tokens)
{
    struct cvlm_request_params p = {0};
    memset(j, 0, sizeof(*j));
    pthread_mutex_init(&j->mu, NULL);
    pthread_cond_init(&j->cv, NULL);
    cvlm_sampling_defaults(&p.sampling);
    p.prompt = prompts[k % 8];
    p.image = k % 3 == 0 ? img : NULL;
    p.image_len = k % 3 == 0 ? img_len : 0;
    p.max_tokens = max_tokens + k % 5;
    p.logprobs = 0;
    p.ignore_eos = 1;
    if (cvlm_request_create(e, &p, &j->r))
        return -1;
    return cvlm_engine_submit(e, j->r, on_wake, j);
}

static void end(struct job *j)
{
    cvlm_request_unref(j->r);
    pthread_mutex_destroy(&j->mu);
    pthread_cond_destroy(&j->cv);
}

#define NJOBS 12

/* Stats once the engine thread has published its final step (it publishes after every
 * step, a moment after the last wake-up). */
static void settle(struct cvlm_engine *e, struct cvlm_engine_stats *st)
{
    for (int i = 0; i < 200; i++) {
        cvlm_engine_get_stats(e, st);
        if (st->running == 0 && st->waiting == 0 && st->kv_used == 0)
            return;
        struct timespec ts = {0, 5 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

/* Reference outputs: every job alone on an otherwise idle engine. */
static void run_alone(struct cvlm_engine *e, struct job *ref, const void *img, size_t len)
{
    for (int k = 0; k < NJOBS; k++) {
        if (start(e, &ref[k], k, img, len, 12) == 0)
            wait_job(&ref[k]);
    }
}

static int same_output(const struct job *a, const struct job *b)
{
    return a->n_ids == b->n_ids && !memcmp(a->ids, b->ids, sizeof(int32_t) * (size_t)a->n_ids) &&
           a->len == b->len && !memcmp(a->text, b->text, a->len) &&
           a->last.finish == b->last.finish;
}

TEST(engine_batch_invariance_and_caches)
{
    size_t len;
    unsigned char *img = png_bytes(&len);
    struct cvlm_engine *e = open_engine(8 << 20, 16, 64);
    static struct job ref[NJOBS], mix[NJOBS];
    struct cvlm_engine_stats st;
    REQUIRE(e && img);
    run_alone(e, ref, img, len);
    for (int k = 0; k < NJOBS; k++)
        CHECKF(ref[k].done && ref[k].n_ids == 12 + k % 5, "job %d: %d tokens", k, ref[k].n_ids);
    /* all at once, then staggered: half now, the rest while those run */
    for (int round = 0; round < 2; round++) {
        for (int k = 0; k < NJOBS; k++) {
            CHECK(start(e, &mix[k], k, img, len, 12) == 0);
            if (round == 1 && k == NJOBS / 2)
                wait_job(&mix[0]);
        }
        for (int k = 0; k < NJOBS; k++) {
            wait_job(&mix[k]);
            CHECKF(same_output(&mix[k], &ref[k]), "round %d job %d differs in a batch", round, k);
            end(&mix[k]);
        }
    }
    settle(e, &st);
    /* the image ran through the vision tower once: later requests with it found its KV
     * in the prefix cache (it sits right after BOS), so they needed no features at all */
    CHECKF(st.vision_misses == 1, "vision tower ran %llu times",
           (unsigned long long)st.vision_misses);
    CHECKF(st.prefix_hit_tokens > 0, "no prefix cache hit");
    CHECK(st.kv_used == 0 && st.running == 0);
    for (int k = 0; k < NJOBS; k++)
        end(&ref[k]);
    cvlm_engine_destroy(e);
    free(img);
}

/* Two in-process tensor-parallel ranks serve the same requests, batched, with the same
 * greedy tokens as one rank serving each alone (per-rank KV: the same budget per rank
 * holds twice the blocks). */
TEST(engine_tp2_matches_tp1)
{
    size_t len;
    unsigned char *img = png_bytes(&len);
    struct cvlm_engine *e1 = open_engine(8 << 20, 16, 64), *e2 = open_engine_tp(8 << 20, 16, 64, 2);
    static struct job ref[NJOBS], tp[NJOBS];
    struct cvlm_engine_info i1, i2;
    struct cvlm_engine_stats st;
    REQUIRE(e1 && e2 && img);
    cvlm_engine_get_info(e1, &i1);
    cvlm_engine_get_info(e2, &i2);
    CHECKF(i2.kv_blocks == 2 * i1.kv_blocks, "KV blocks %d with tp 2, %d with tp 1",
           i2.kv_blocks, i1.kv_blocks);
    run_alone(e1, ref, img, len);
    for (int k = 0; k < NJOBS; k++)
        CHECK(start(e2, &tp[k], k, img, len, 12) == 0);
    for (int k = 0; k < NJOBS; k++) {
        wait_job(&tp[k]);
        CHECKF(tp[k].done && same_output(&tp[k], &ref[k]), "job %d differs with tp 2", k);
        end(&tp[k]);
        end(&ref[k]);
    }
    settle(e2, &st);
    CHECK(st.kv_used == 0 && st.running == 0);
    cvlm_engine_destroy(e1);
    cvlm_engine_destroy(e2);
    free(img);
}

TEST(engine_preemption_keeps_outputs)
{
    size_t len;
    unsigned char *img = png_bytes(&len);
    /* 4 KiB per block of 4 slots on this model: 14 blocks = 56 slots in all */
    struct cvlm_engine *big = open_engine(8 << 20, 16, 64), *small = open_engine(14 * 4096, 8, 64);
    static struct job ref[NJOBS], mix[NJOBS];
    struct cvlm_engine_stats st;
    REQUIRE(big && small && img);
    run_alone(big, ref, img, len);
    for (int k = 0; k < NJOBS; k++)
        CHECK(start(small, &mix[k], k, img, len, 12) == 0);
    for (int k = 0; k < NJOBS; k++) {
        wait_job(&mix[k]);
        CHECKF(same_output(&mix[k], &ref[k]), "job %d differs under preemption", k);
        end(&mix[k]);
        end(&ref[k]);
    }
    settle(small, &st);
    CHECKF(st.preemptions > 0, "no preemption happened (%llu)",
           (unsigned long long)st.preemptions);
    CHECKF(st.kv_used == 0, "%d blocks used, %d cached of %d", st.kv_used, st.kv_cached,
           st.kv_blocks);
    cvlm_engine_destroy(big);
    cvlm_engine_destroy(small);
    free(img);
}

TEST(engine_vision_cache_without_prefix_cache)
{
    size_t len;
    unsigned char *img = png_bytes(&len);
    struct cvlm_engine_opts o = {.model_dir = cvlm_test_data("golden-tiny/model"),
                                 .tokenizer = cvlm_test_data("llama2-tokenizer.model"),
                                 .threads = 2, .kv_bytes = 4 << 20, .no_prefix_cache = 1,
                                 .vision_cache_bytes = 1 << 20};
    struct cvlm_engine *e = NULL;
    struct job j[3];
    struct cvlm_engine_stats st;
    REQUIRE(img && cvlm_engine_create(&o, &e) == 0);
    for (int k = 0; k < 3; k++) {
        CHECK(start(e, &j[k], 0, img, len, 4) == 0); /* k = 0: with the image */
        wait_job(&j[k]);
    }
    CHECK(same_output(&j[0], &j[1]) && same_output(&j[0], &j[2]));
    settle(e, &st);
    CHECKF(st.vision_misses == 1 && st.vision_hits == 2, "vision hits %llu misses %llu",
           (unsigned long long)st.vision_hits, (unsigned long long)st.vision_misses);
    CHECK(st.prefix_hit_tokens == 0);
    for (int k = 0; k < 3; k++)
        end(&j[k]);
    cvlm_engine_destroy(e);
    free(img);
}

TEST(engine_stop_conditions_and_limits)
{
    struct cvlm_engine *e = open_engine(4 << 20, 8, 64);
    struct cvlm_request_params p = {0};
    struct cvlm_request *r = NULL;
    struct job a, b;
    REQUIRE(e);
    /* max_tokens -> length */
    REQUIRE(start(e, &a, 5, NULL, 0, 10) == 0); /* "Hi", 10 tokens */
    wait_job(&a);
    CHECK(a.last.finish == CVLM_FINISH_LENGTH && a.last.completion_tokens == 10 && a.len > 4);
    /* a stop string from the middle of that text: output is the text before it */
    char stop[8] = {0};
    size_t at = a.len / 2;
    memcpy(stop, a.text + at, 3);
    const char *stops[1] = {stop};
    cvlm_sampling_defaults(&p.sampling);
    p.prompt = prompts[5];
    p.max_tokens = 10;
    p.ignore_eos = 1;
    p.stop = stops;
    p.n_stop = 1;
    memset(&b, 0, sizeof(b));
    pthread_mutex_init(&b.mu, NULL);
    pthread_cond_init(&b.cv, NULL);
    REQUIRE(cvlm_request_create(e, &p, &b.r) == 0);
    REQUIRE(cvlm_engine_submit(e, b.r, on_wake, &b) == 0);
    wait_job(&b);
    size_t first = (size_t)(strstr(a.text, stop) - a.text);
    CHECKF(b.last.finish == CVLM_FINISH_STOP && b.len == first && !memcmp(b.text, a.text, first),
           "stop '%s': got %zu bytes, want %zu", stop, b.len, first);
    end(&a);
    end(&b);
    /* up-front rejections */
    p.n_stop = 0;
    p.max_tokens = 1000000;
    CHECK(cvlm_request_create(e, &p, &r) == CVLM_ETOOBIG && strstr(cvlm_last_error(), "context"));
    /* a megabyte prompt is refused from its normalized length, before any BPE */
    {
        const char *keep = p.prompt;
        char *big = malloc(1u << 20);
        REQUIRE(big);
        memset(big, 'x', (1u << 20) - 1);
        big[(1u << 20) - 1] = 0;
        p.prompt = big;
        p.max_tokens = 4;
        CHECK(cvlm_request_create(e, &p, &r) == CVLM_ETOOBIG &&
              strstr(cvlm_last_error(), "at least"));
        p.prompt = keep;
        free(big);
    }
    p.max_tokens = 4;
    p.sampling.top_p = 0;
    CHECK(cvlm_request_create(e, &p, &r) == CVLM_EINVAL && strstr(cvlm_last_error(), "top_p"));
    p.sampling.top_p = 1;
    p.image = "not an image";
    p.image_len = 12;
    CHECK(cvlm_request_create(e, &p, &r) == CVLM_EUNSUPPORTED);
    CHECK(r == NULL);
    /* cancel: a long request finishes as cancelled */
    REQUIRE(start(e, &a, 4, NULL, 0, 400) == 0);
    cvlm_engine_cancel(e, a.r);
    wait_job(&a);
    CHECK(a.last.finish == CVLM_FINISH_CANCELLED && a.n_ids < 400);
    end(&a);
    cvlm_engine_destroy(e);
}

TEST(engine_random_soak)
{
    size_t len;
    unsigned char *img = png_bytes(&len);
    struct cvlm_engine *e = open_engine(64 * 4096, 8, 32); /* tight KV: preemptions too */
    static struct job jobs[64];
    int live[64] = {0}, busy = 0, submitted = 0;
    unsigned s = 99;
    struct cvlm_engine_stats st;
    REQUIRE(e && img);
    for (int ev = 0; ev < 3000; ev++) {
        s = s * 1103515245u + 12345u;
        int k = (int)((s >> 8) % 64), what = (int)((s >> 20) % 10);
        if (!live[k] && what < 6) {
            int rc = start(e, &jobs[k], (int)(s >> 4), img, len, 1 + (int)(s >> 12) % 6);
            if (rc == 0) {
                live[k] = 1;
                submitted++;
            } else {
                busy += rc == CVLM_EBUSY;
                CHECK(rc == CVLM_EBUSY);
                end(&jobs[k]);
            }
        } else if (live[k] && what < 8) {
            cvlm_engine_cancel(e, jobs[k].r);
        } else if (live[k]) {
            wait_job(&jobs[k]);
            end(&jobs[k]);
            live[k] = 0;
        }
    }
    for (int k = 0; k < 64; k++)
        if (live[k]) {
            wait_job(&jobs[k]);
            CHECK(jobs[k].last.finish != CVLM_FINISH_NONE && jobs[k].last.finish != CVLM_FINISH_ERROR);
            end(&jobs[k]);
        }
    settle(e, &st);
    CHECKF(st.kv_used == 0 && st.running == 0 && st.waiting == 0, "used %d running %d waiting %d",
           st.kv_used, st.running, st.waiting);
    CHECKF(st.requests_submitted == (uint64_t)submitted &&
               st.requests_submitted == st.requests_finished + st.requests_cancelled +
                                            st.requests_failed,
           "submitted %d (%llu) != finished %llu + cancelled %llu + failed %llu", submitted,
           (unsigned long long)st.requests_submitted, (unsigned long long)st.requests_finished,
           (unsigned long long)st.requests_cancelled, (unsigned long long)st.requests_failed);
    CHECK(st.requests_failed == 0 && st.requests_cancelled > 0);
    cvlm_engine_destroy(e);
    free(img);
}

/* The caches' keyed hash is SipHash-2-4 (the paper's reference vectors) under a key that
 * is not a constant (two keys give different hashes of the same data). */
TEST(engine_cache_hash_is_siphash)
{
    const uint64_t key[2] = {0x0706050403020100ull, 0x0f0e0d0c0b0a0908ull};
    unsigned char msg[64];
    for (int i = 0; i < 64; i++)
        msg[i] = (unsigned char)i;
    CHECK(cvlm_siphash24(key, msg, 0) == 0x726fdb47dd0e0e31ull);
    CHECK(cvlm_siphash24(key, msg, 15) == 0xa129ca6149be45e5ull);
    CHECK(cvlm_hash64(msg, 15, 0) == cvlm_hash64(msg, 15, 0));
    CHECK(cvlm_hash64(msg, 15, 0) != cvlm_siphash24(key, msg, 15));
    CHECK(cvlm_hash64(msg, 15, 0) != cvlm_hash64(msg, 15, 1));
}

/* --dummy-weights: a config.json is enough to serve (random weights, for benchmarks), and
 * the same config with its real weights gives other tokens (the weights are not read). */
TEST(engine_dummy_weights)
{
    struct cvlm_engine_opts o = {.model_dir = cvlm_test_data("golden-tiny/model"),
                                 .tokenizer = cvlm_test_data("llama2-tokenizer.model"),
                                 .threads = 2, .kv_bytes = 4 << 20, .block_size = 4,
                                 .dummy_weights = 1};
    struct cvlm_engine *d = NULL, *e = open_engine(4 << 20, 4, 64);
    static struct job a, b;
    REQUIRE(cvlm_engine_create(&o, &d) == 0 && e);
    REQUIRE(start(d, &a, 5, NULL, 0, 16) == 0 && start(e, &b, 5, NULL, 0, 16) == 0);
    wait_job(&a);
    wait_job(&b);
    CHECK(a.done && a.n_ids == b.n_ids && a.n_ids > 0);
    CHECK(memcmp(a.ids, b.ids, sizeof(int32_t) * (size_t)a.n_ids) != 0);
    end(&a);
    end(&b);
    cvlm_engine_destroy(d);
    cvlm_engine_destroy(e);
}
