/* test_sampler.c - greedy, seeded sampling and every filter/penalty, statistically. */
#include "engine/sched/sampler.h"
#include "tests/unit/harness.h"

#include <math.h>
#include <string.h>

/* Draws `n` samples from fresh copies of logits; fills counts[3]. */
static void histogram(const struct cvlm_sampling *sp, const float *l, int n, int counts[3])
{
    struct cvlm_rng rng;
    float buf[3];
    cvlm_rng_seed(&rng, sp->seed);
    memset(counts, 0, 3 * sizeof(int));
    for (int i = 0; i < n; i++) {
        memcpy(buf, l, sizeof(buf));
        int id = cvlm_sample(sp, buf, 3, NULL, 0, 0, &rng);
        if (id >= 0 && id < 3)
            counts[id]++;
    }
}

TEST(sampler_greedy_and_ties)
{
    struct cvlm_sampling sp;
    struct cvlm_rng rng;
    float l[4] = {0.5f, 2.0f, 2.0f, -1.0f};
    cvlm_sampling_defaults(&sp);
    cvlm_rng_seed(&rng, 1);
    CHECK(cvlm_sample(&sp, l, 4, NULL, 0, 0, &rng) == 1); /* lowest index wins a tie */
    sp.temperature = 5.0f;
    sp.top_k = 1; /* top-k 1 is greedy whatever the temperature */
    float l2[4] = {0.5f, 2.0f, 2.5f, -1.0f};
    CHECK(cvlm_sample(&sp, l2, 4, NULL, 0, 0, &rng) == 2);
}

TEST(sampler_distribution_and_filters)
{
    const float l[3] = {logf(0.5f), logf(0.3f), logf(0.2f)};
    struct cvlm_sampling sp;
    int c[3], n = 20000;
    cvlm_sampling_defaults(&sp);
    sp.temperature = 1.0f;
    sp.seed = 7;
    histogram(&sp, l, n, c);
    CHECKF(fabs(c[0] / (double)n - 0.5) < 0.02 && fabs(c[2] / (double)n - 0.2) < 0.02,
           "plain: %d %d %d", c[0], c[1], c[2]);
    sp.top_k = 2;
    histogram(&sp, l, n, c);
    CHECKF(c[2] == 0 && fabs(c[0] / (double)n - 0.625) < 0.02, "top_k: %d %d %d", c[0], c[1], c[2]);
    sp.top_k = 0;
    sp.top_p = 0.7f; /* 0.5 < 0.7, 0.5 + 0.3 >= 0.7: keeps two */
    histogram(&sp, l, n, c);
    CHECKF(c[2] == 0 && c[1] > 0, "top_p: %d %d %d", c[0], c[1], c[2]);
    sp.top_p = 0.4f; /* the first token alone reaches it */
    histogram(&sp, l, n, c);
    CHECK(c[0] == n);
    sp.top_p = 1.0f;
    sp.min_p = 0.5f; /* keeps p >= 0.25 */
    histogram(&sp, l, n, c);
    CHECKF(c[2] == 0 && fabs(c[0] / (double)n - 0.625) < 0.02, "min_p: %d %d %d", c[0], c[1], c[2]);
    sp.min_p = 0;
    sp.temperature = 0.01f; /* cold: almost always the best */
    histogram(&sp, l, 2000, c);
    CHECK(c[0] == 2000);
}

TEST(sampler_seed_determinism)
{
    const float l[3] = {0.1f, 0.2f, 0.3f};
    struct cvlm_sampling sp;
    int a[3], b[3], d[3];
    cvlm_sampling_defaults(&sp);
    sp.temperature = 1.0f;
    sp.seed = 42;
    histogram(&sp, l, 1000, a);
    histogram(&sp, l, 1000, b);
    sp.seed = 43;
    histogram(&sp, l, 1000, d);
    CHECK(!memcmp(a, b, sizeof(a)));
    CHECK(memcmp(a, d, sizeof(a)) != 0);
}

TEST(sampler_penalties)
{
    struct cvlm_sampling sp;
    struct cvlm_rng rng;
    cvlm_sampling_defaults(&sp);
    cvlm_rng_seed(&rng, 0);
    /* repetition (HF): positive logits divided, negative multiplied, prompt included */
    float l[3] = {2.0f, 1.9f, -1.0f};
    int32_t hist[2] = {0, 2};
    sp.repetition_penalty = 2.0f;
    CHECK(cvlm_sample(&sp, l, 3, hist, 2, 2, &rng) == 1);
    CHECK(l[0] == 1.0f && l[2] == -2.0f);
    /* frequency counts occurrences in the output only; presence once per token */
    sp.repetition_penalty = 1.0f;
    sp.frequency_penalty = 0.1f;
    float f[3] = {1.0f, 0.9f, 0.0f};
    int32_t out[3] = {1, 0, 0}; /* prompt [1], output [0, 0] */
    CHECK(cvlm_sample(&sp, f, 3, out, 3, 1, &rng) == 1);
    CHECK(fabsf(f[0] - 0.8f) < 1e-6f && f[1] == 0.9f);
    sp.frequency_penalty = 0;
    sp.presence_penalty = 0.05f;
    float p[3] = {1.0f, 0.9f, 0.0f};
    CHECK(cvlm_sample(&sp, p, 3, out, 3, 1, &rng) == 0);
    CHECK(fabsf(p[0] - 0.95f) < 1e-6f);
}

/* A temperature so small that 1/T overflows a float (anything up to ~3e-39) once made
 * every probability NaN and the draw fell through to id 0 (<unk>) on every step. Below
 * CVLM_GREEDY_TEMPERATURE the sampler is greedy; just above it, it still samples. */
TEST(sampler_tiny_temperature_is_greedy)
{
    static const float temps[] = {1e-39f, 3e-39f, 1e-20f, 1e-6f, 9e-6f};
    struct cvlm_sampling sp;
    struct cvlm_rng rng;
    cvlm_sampling_defaults(&sp);
    cvlm_rng_seed(&rng, 5);
    for (size_t k = 0; k < sizeof(temps) / sizeof(temps[0]); k++) {
        sp.temperature = temps[k];
        for (int i = 0; i < 50; i++) {
            float l[5] = {0.1f, -2.0f, 3.0f, 2.9999f, -7.0f};
            int id = cvlm_sample(&sp, l, 5, NULL, 0, 0, &rng);
            CHECKF(id == 2, "temperature %g: id %d, want the argmax 2", (double)temps[k], id);
            if (id != 2)
                break;
        }
    }
    /* 1e-4: a logit gap of 1e-5 is 0.1 in units of T, so both ends get drawn */
    int c[5] = {0};
    sp.temperature = 1e-4f;
    for (int i = 0; i < 400; i++) {
        float l[5] = {0.1f, -2.0f, 3.0f, 3.0f - 1e-5f * 3.0f, -7.0f};
        int id = cvlm_sample(&sp, l, 5, NULL, 0, 0, &rng);
        CHECKF(id >= 0 && id < 5 && isfinite(l[id]), "temperature 1e-4: id %d", id);
        if (id >= 0 && id < 5)
            c[id]++;
    }
    CHECKF(c[2] > 0 && c[3] > 0 && c[2] + c[3] == 400, "temperature 1e-4: %d %d %d %d %d", c[0],
           c[1], c[2], c[3], c[4]);
}
