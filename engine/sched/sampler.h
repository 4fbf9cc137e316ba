/* sampler.h - next-token selection from logits, per request.
 *
 * Order of operations (as vLLM/HF apply them): the logit bias (cvlm_logit_bias_apply,
 * called by the engine before cvlm_sample, so that it steers greedy decoding too), the
 * repetition penalty (HF: over prompt and output), presence and frequency penalties
 * (OpenAI: over the output so far), then temperature, top-k, top-p and min-p filtering,
 * then a draw from the request's own random stream. A temperature below
 * CVLM_GREEDY_TEMPERATURE (0 included) means greedy (argmax, lowest id wins ties). A
 * request's stream depends only on its seed, so its output does not depend on what else
 * runs.
 */
#ifndef CVLM_SAMPLER_H
#define CVLM_SAMPLER_H

#include <stdint.h>

/* Temperatures below this are greedy, as in vLLM (_SAMPLING_EPS): dividing logits by
 * them loses every distinction but the argmax anyway, and below ~3e-39 1/T overflows a
 * float, which made every probability NaN. */
#define CVLM_GREEDY_TEMPERATURE 1e-5f

struct cvlm_sampling {
    float temperature;        /* < CVLM_GREEDY_TEMPERATURE (e.g. 0) = greedy */
    int top_k;                /* 0 = off */
    float top_p;              /* 1 = off */
    float min_p;              /* 0 = off */
    float repetition_penalty; /* 1 = off */
    float presence_penalty;   /* 0 = off */
    float frequency_penalty;  /* 0 = off */
    uint64_t seed;
};

/* One entry of OpenAI's logit_bias: `bias` (in [-100, 100]) is added to token `id`'s logit
 * before anything else (see cvlm_logit_bias_apply). */
struct cvlm_logit_bias {
    int32_t id;
    float bias;
};

#define CVLM_MAX_LOGIT_BIAS 300 /* entries per request, as OpenAI allows */

/* Defaults: greedy, every filter off. */
void cvlm_sampling_defaults(struct cvlm_sampling *s);

struct cvlm_rng {
    uint64_t s[4];
};

void cvlm_rng_seed(struct cvlm_rng *r, uint64_t seed);
uint64_t cvlm_rng_next(struct cvlm_rng *r);
double cvlm_rng_uniform(struct cvlm_rng *r); /* [0, 1) */

/* Adds each entry's bias to logits[id] (entries with an id outside [0, V) are skipped;
 * requests are validated before they get here). */
void cvlm_logit_bias_apply(float *logits, int V, const struct cvlm_logit_bias *b, int n);

/* Picks the next token. `logits` [V] is modified in place. tokens[0..n) are the
 * sequence so far, of which the first n_prompt are the prompt. Returns the id, or a
 * negative CVLM_E* code (out of memory). */
int cvlm_sample(const struct cvlm_sampling *sp, float *logits, int V, const int32_t *tokens, int n,
                int n_prompt, struct cvlm_rng *rng);

#endif
