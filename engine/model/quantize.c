/* quantize.c - weights to int8 / int4 at load (see quantize.h). */
#include "engine/model/quantize.h"

#include "engine/error.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int cvlm_quant_parse(const char *s, enum cvlm_quant *out)
{
    static const char *const names[] = {"none", "int8", "int4"};
    for (int i = 0; i < 3; i++)
        if (s && !strcmp(s, names[i])) {
            *out = (enum cvlm_quant)i;
            return 0;
        }
    return cvlm_errf(CVLM_EINVAL, "quantize: '%s' is not none, int8 or int4", s ? s : "");
}

const char *cvlm_quant_name(enum cvlm_quant q)
{
    return q == CVLM_QUANT_INT8 ? "int8" : q == CVLM_QUANT_INT4 ? "int4" : "none";
}

size_t cvlm_quant_bytes(enum cvlm_dtype dt, int64_t N, int64_t K)
{
    int64_t g = dt == CVLM_DTYPE_Q4 ? CVLM_Q4_GROUP : K;
    return cvlm_dtype_bytes(dt, (size_t)(N * K)) + (size_t)(N * ((K + g - 1) / g)) * sizeof(float);
}

/* Round to nearest, ties away from zero (roundf's rule, without its call: in double the
 * sum is exact for |v| < 2^52 and the truncation is the rounding), clamped to [lo, hi]. */
static int quant_round(float v, int lo, int hi)
{
    double r = trunc((double)v + copysign(0.5, (double)v));
    return r < (double)lo ? lo : r > (double)hi ? hi : (int)r;
}

/* The scale of a group: int8 max|w| / 127; int4 the one of 16 candidates c max|w| / 7,
 * c in [0.625, 1] (codes clamped to -8..7), with the least squared error over the group
 * (clipping a few large weights often lowers the error of all the others). */
static float group_scale(const float *w, int n, float amax, enum cvlm_dtype dt)
{
    if (dt == CVLM_DTYPE_Q8 || amax == 0)
        return amax / 127.0f;
    float best = amax / 7.0f;
    double best_err = -1;
    for (int c = 0; c < 16; c++) {
        float s = amax / 7.0f * (1.0f - 0.025f * (float)c), inv = 1.0f / s;
        double err = 0;
        for (int i = 0; i < n; i++) {
            double e = w[i] - (double)quant_round(w[i] * inv, -8, 7) * s;
            err += e * e;
        }
        if (best_err < 0 || err < best_err) {
            best_err = err;
            best = s;
        }
    }
    return best;
}

/* Rows [n0, n1) of a quantization (rows are independent: the result does not depend on
 * how they are split). */
struct qrows {
    const struct cvlm_tensor *t;
    enum cvlm_dtype dt;
    void *codes;
    float *scales;
    int64_t n0, n1;
};

static void *quantize_rows(void *arg)
{
    const struct qrows *a = arg;
    const struct cvlm_tensor *t = a->t;
    const enum cvlm_dtype dt = a->dt;
    const int64_t K = t->shape[1];
    const int64_t G = dt == CVLM_DTYPE_Q4 ? CVLM_Q4_GROUP : K, ng = (K + G - 1) / G;
    float *row = malloc((size_t)K * sizeof(float)), *scales = a->scales;
    signed char *q8 = a->codes;
    unsigned char *q4 = a->codes;
    for (int64_t n = a->n0; row && n < a->n1; n++) {
        for (int64_t k = 0; k < K; k++)
            row[k] = cvlm_tensor_get_f32(t, n * K + k);
        for (int64_t g = 0; g < ng; g++) {
            int64_t k0 = g * G, k1 = k0 + G < K ? k0 + G : K;
            float amax = 0;
            for (int64_t k = k0; k < k1; k++)
                amax = fabsf(row[k]) > amax ? fabsf(row[k]) : amax;
            float s = group_scale(row + k0, (int)(k1 - k0), amax, dt);
            float inv = s > 0 ? 1.0f / s : 0;
            scales[n * ng + g] = s;
            for (int64_t k = k0; k < k1; k++) {
                int q = quant_round(row[k] * inv, dt == CVLM_DTYPE_Q4 ? -8 : -127,
                                    dt == CVLM_DTYPE_Q4 ? 7 : 127);
                if (dt == CVLM_DTYPE_Q8) {
                    q8[n * K + k] = (signed char)q;
                } else {
                    unsigned char *b = &q4[n * (K / 2) + k / 32 * 16 + k % 16];
                    *b = k % 32 < 16 ? (unsigned char)((*b & 0xf0) | (q + 8))
                                     : (unsigned char)((*b & 0x0f) | ((q + 8) << 4));
                }
            }
        }
    }
    free(row);
    return NULL;
}

/* Quantizes on every online CPU (at most 64 threads; the int4 scale search is ~50
 * operations per weight, minutes for a 17B decoder on one core). */
void cvlm_quantize_into(struct cvlm_tensor *t, enum cvlm_dtype dt, void *codes, float *scales)
{
    const int64_t N = t->shape[0];
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int T = ncpu < 1 ? 1 : ncpu > 64 ? 64 : (int)ncpu;
    if (N < 64 * T)
        T = N >= 64 ? (int)(N / 64) : 1;
    struct qrows a[64];
    pthread_t th[64];
    int started[64] = {0};
    for (int i = 0; i < T; i++) {
        a[i] = (struct qrows){t, dt, codes, scales, N * i / T, N * (i + 1) / T};
        started[i] = i > 0 && pthread_create(&th[i], NULL, quantize_rows, &a[i]) == 0;
    }
    quantize_rows(&a[0]);
    for (int i = 1; i < T; i++) {
        if (started[i])
            pthread_join(th[i], NULL);
        else
            quantize_rows(&a[i]); /* no thread: do it here */
    }
    t->dtype = dt;
    t->data = codes;
    t->scales = scales;
}

/* Random codes with the dummy weights' spread (uniform, std 0.02): Q8 codes uniform in
 * -127..127 (std 73.3), Q4 nibbles uniform in 0..15 (std 4.61). */
static void random_into(struct cvlm_tensor *t, enum cvlm_dtype dt, void *codes, float *scales,
                        uint64_t seed)
{
    const int64_t N = t->shape[0], K = t->shape[1];
    const int64_t ng = dt == CVLM_DTYPE_Q4 ? (K + CVLM_Q4_GROUP - 1) / CVLM_Q4_GROUP : 1;
    size_t nb = cvlm_dtype_bytes(dt, (size_t)(N * K));
    uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
    unsigned char *b = codes;
    for (size_t i = 0; i < nb; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        unsigned v = (unsigned)(x >> 32);
        b[i] = dt == CVLM_DTYPE_Q4 ? (unsigned char)v : (unsigned char)(v % 255 + 129);
    }
    float s = dt == CVLM_DTYPE_Q4 ? 0.02f / 4.61f : 0.02f / 73.3f;
    for (int64_t i = 0; i < N * ng; i++)
        scales[i] = s;
    t->dtype = dt;
    t->data = codes;
    t->scales = scales;
}

struct quant_ctx {
    struct cvlm_weights *w;
    enum cvlm_quant q;
    int rc;
    uint64_t index;
};

/* t to int4 (q int4, K a multiple of 32) or int8; `int8_only`: int8 whatever q is. */
static void quant_as(struct quant_ctx *c, struct cvlm_tensor *t, int int8_only)
{
    c->index++;
    if (c->rc || t->ndim != 2 || cvlm_dtype_is_quant(t->dtype))
        return;
    enum cvlm_dtype dt = c->q == CVLM_QUANT_INT4 && !int8_only && t->shape[1] % 32 == 0
                             ? CVLM_DTYPE_Q4
                             : CVLM_DTYPE_Q8;
    const int64_t N = t->shape[0], K = t->shape[1];
    size_t cb = cvlm_dtype_bytes(dt, (size_t)(N * K)), all = cvlm_quant_bytes(dt, N, K);
    cb = (cb + 63) / 64 * 64;
    unsigned char *buf = cvlm_weights_own(c->w, all);
    if (!buf) {
        c->rc = cvlm_errf(CVLM_ENOMEM, "out of memory quantizing a [%lld, %lld] matrix",
                          (long long)N, (long long)K);
        return;
    }
    memset(buf, 0, cb);
    const void *src = t->data;
    size_t src_bytes = src ? cvlm_tensor_bytes(t) : 0;
    if (src)
        cvlm_quantize_into(t, dt, buf, (float *)(buf + cb));
    else
        random_into(t, dt, buf, (float *)(buf + cb), c->index);
    t->fill = CVLM_FILL_NONE;
    if (src)
        cvlm_weights_release(c->w, src, src_bytes);
}

static void quant_one(struct quant_ctx *c, struct cvlm_tensor *t)
{
    quant_as(c, t, 0);
}

int cvlm_weights_quantize(struct cvlm_weights *w, enum cvlm_quant q, int vision, int lm_head)
{
    struct quant_ctx c = {.w = w, .q = q};
    if (q == CVLM_QUANT_NONE)
        return 0;
    if (w->cfg.gptq.enabled) /* one format at a time: no second rounding of GPTQ's codes */
        return cvlm_errf(CVLM_EINVAL,
                         "--quantize %s: the checkpoint is already quantized (GPTQ int4); load "
                         "it with --quantize none",
                         cvlm_quant_name(q));
    for (int l = 0; l < w->cfg.num_layers; l++) {
        struct cvlm_lm_layer *L = &w->layers[l];
        for (int e = 0; e < 2; e++) {
            quant_one(&c, &L->qkv[e]);
            quant_one(&c, &L->dense[e]);
            quant_one(&c, &L->gate[e]);
            quant_one(&c, &L->up[e]);
            quant_one(&c, &L->down[e]);
        }
    }
    for (int l = 0; vision && w->cfg.has_vision && l < w->cfg.vision.num_layers; l++) {
        struct cvlm_vit_layer *V = &w->vit[l];
        quant_one(&c, &V->qkv_w);
        quant_one(&c, &V->dense_w);
        quant_one(&c, &V->fc1_w);
        quant_one(&c, &V->fc2_w);
    }
    if (vision && w->cfg.has_vision) {
        quant_one(&c, &w->proj);
        quant_one(&c, &w->glu_gate);
        quant_one(&c, &w->glu_up);
        quant_one(&c, &w->glu_down);
    }
    if (lm_head) /* int8 at int4 too (llama.cpp keeps its output matrix at 6-8 bits) */
        quant_as(&c, &w->lm_head, 1);
    return c.rc;
}
