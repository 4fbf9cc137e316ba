/* test_model.c - engine invariants beyond the fixture's single-sequence cases:
 * chunked prefill and token-by-token decoding give the same logits as one full prefill
 * (the paged KV cache and slot/position bookkeeping are right), and two sequences in one
 * mixed batch over scattered KV blocks give exactly what each gives alone. */
#include "engine/error.h"
#include "engine/image/image.h"
#include "engine/model/model.h"
#include "engine/text/template.h"
#include "tests/unit/harness.h"

#include <stdlib.h>
#include <string.h>

struct fx {
    struct cvlm_weights *w;
    struct cvlm_model *m;
    struct cvlm_tokenizer *tok;
    int V;
};

static int fx_open(struct fx *f, int threads)
{
    struct cvlm_model_opts o = {
        .max_tokens = 64, .block_size = 4, .kv_blocks = 64, .threads = threads};
    memset(f, 0, sizeof(*f));
    if (cvlm_weights_load(cvlm_test_data("golden-tiny/model"), &f->w) ||
        cvlm_tokenizer_load(cvlm_test_data("llama2-tokenizer.model"), &f->tok) ||
        cvlm_model_create(f->w, &o, &f->m))
        return -1;
    f->V = f->w->cfg.vocab_size;
    return 0;
}

static void fx_close(struct fx *f)
{
    cvlm_model_destroy(f->m);
    cvlm_weights_destroy(f->w);
    cvlm_tokenizer_destroy(f->tok);
}

/* A deterministic synthetic image (gradient), normalized, as the model's input. */
static struct cvlm_feats *image_feats(struct fx *f)
{
    const struct cvlm_config *c = &f->w->cfg;
    int S = c->vision.image_size;
    struct cvlm_image img = {S, S, malloc((size_t)S * S * 3)};
    float *px = malloc((size_t)3 * S * S * sizeof(float));
    struct cvlm_feats *feats = cvlm_model_feats_alloc(f->m);
    for (int i = 0; i < S * S * 3; i++)
        img.rgb[i] = (uint8_t)(i * 7 % 251);
    cvlm_image_normalize(&img, px);
    if (cvlm_model_encode_image(f->m, px, feats, NULL) != 0) {
        cvlm_model_feats_free(f->m, feats);
        feats = NULL;
    }
    free(img.rgb);
    free(px);
    return feats;
}

/* Runs slots [from, to) of prompt p of sequence `s` (block table bt) with all logits. */
static int step(struct fx *f, const struct cvlm_prompt *p, const int32_t *bt, int nb, int from,
                int to, struct cvlm_feats *feats, float *logits)
{
    int n = to - from, img_len = cvlm_config_image_tokens(&f->w->cfg);
    int32_t seq[64] = {0}, slot[64], img[64];
    uint8_t want[64];
    struct cvlm_seq_kv kv = {bt, nb};
    for (int i = 0; i < n; i++) {
        int at = from + i, rel = at - p->image_start;
        slot[i] = at;
        img[i] = p->image_start >= 0 && rel >= 0 && rel < img_len ? rel : -1;
        want[i] = 1;
    }
    struct cvlm_batch b = {.n_tokens = n,
                           .ids = p->ids + from,
                           .pos = p->pos + from,
                           .expert = p->expert + from,
                           .seq = seq,
                           .slot = slot,
                           .img_row = img,
                           .img_feats = (const struct cvlm_feats *const *)&feats,
                           .seqs = &kv,
                           .n_seqs = 1,
                           .want_logits = want};
    return cvlm_model_forward(f->m, &b, logits);
}

TEST(model_chunked_prefill_matches_full)
{
    struct fx f;
    struct cvlm_prompt p;
    REQUIRE(fx_open(&f, 2) == 0);
    struct cvlm_feats *feats = image_feats(&f);
    REQUIRE(feats);
    REQUIRE(cvlm_prompt_build(&f.w->cfg, f.tok, CVLM_TEMPLATE_CHAT, NULL, 0,
                              "Describe the picture in detail.", 1, &p) == 0);
    int T = p.n, V = f.V;
    int32_t bt[16] = {5, 2, 9, 0, 7, 1, 3, 4, 6, 8};
    float *full = malloc((size_t)T * V * 4), *part = malloc((size_t)T * V * 4);
    REQUIRE(step(&f, &p, bt, 10, 0, T, feats, full) == 0);
    /* the same prompt in chunks of 3 (crossing the image and block boundaries) */
    for (int from = 0; from < T; from += 3)
        REQUIRE(step(&f, &p, bt, 10, from, from + 3 < T ? from + 3 : T, feats,
                     part + (size_t)from * V) == 0);
    CHECKF(cvlm_test_max_rel(part, full, (size_t)T * V) < 1e-5, "chunks of 3: %g",
           cvlm_test_max_rel(part, full, (size_t)T * V));
    /* and one token at a time */
    for (int t = 0; t < T; t++)
        REQUIRE(step(&f, &p, bt, 10, t, t + 1, feats, part + (size_t)t * V) == 0);
    CHECKF(cvlm_test_max_rel(part, full, (size_t)T * V) < 1e-5, "token by token: %g",
           cvlm_test_max_rel(part, full, (size_t)T * V));
    free(full);
    free(part);
    cvlm_prompt_free(&p);
    cvlm_model_feats_free(f.m, feats);
    fx_close(&f);
}

/* A slice of one sequence's tokens inside a mixed batch. */
struct part {
    const struct cvlm_prompt *p;
    int seq, from, to;
};

/* One forward over several sequences' slices; logits of every token, in batch order. */
static int mixed_step(struct fx *f, const struct part *parts, int np,
                      const struct cvlm_seq_kv *seqs, int ns, struct cvlm_feats *feats,
                      float *logits)
{
    int32_t ids[64], pos[64], seq[64], slot[64], img[64];
    uint8_t expert[64], want[64];
    int n = 0, img_len = cvlm_config_image_tokens(&f->w->cfg);
    for (int k = 0; k < np; k++)
        for (int at = parts[k].from; at < parts[k].to; at++, n++) {
            const struct cvlm_prompt *p = parts[k].p;
            int rel = at - p->image_start;
            ids[n] = p->ids[at];
            pos[n] = p->pos[at];
            expert[n] = p->expert[at];
            seq[n] = parts[k].seq;
            slot[n] = at;
            img[n] = p->image_start >= 0 && rel >= 0 && rel < img_len ? rel : -1;
            want[n] = 1;
        }
    const struct cvlm_feats *fs[4] = {feats, feats, feats,
                                      feats}; /* every sequence shows the same image */
    struct cvlm_batch b = {.n_tokens = n,
                           .ids = ids,
                           .pos = pos,
                           .expert = expert,
                           .seq = seq,
                           .slot = slot,
                           .img_row = img,
                           .img_feats = fs,
                           .seqs = seqs,
                           .n_seqs = ns,
                           .want_logits = want};
    return cvlm_model_forward(f->m, &b, logits);
}

TEST(model_mixed_batch_matches_separate_runs)
{
    struct fx f;
    struct cvlm_prompt a, b;
    REQUIRE(fx_open(&f, 2) == 0);
    struct cvlm_feats *feats = image_feats(&f);
    REQUIRE(feats);
    REQUIRE(cvlm_prompt_build(&f.w->cfg, f.tok, CVLM_TEMPLATE_VQA, NULL, 0, "What shape is it?", 1,
                              &a) == 0);
    REQUIRE(cvlm_prompt_build(&f.w->cfg, f.tok, CVLM_TEMPLATE_CHAT, NULL, 0,
                              "Tell me a story about a llama.", 0, &b) == 0);
    int V = f.V, ha = b.n / 2;
    /* interleaved, non-contiguous blocks (block_size 4) */
    int32_t bta[8] = {1, 4, 6, 8, 10, 12}, btb[8] = {0, 2, 3, 5, 7, 9};
    struct cvlm_seq_kv seqs[2] = {{bta, 6}, {btb, 6}};
    float *ref_a = malloc((size_t)a.n * V * 4), *ref_b = malloc((size_t)b.n * V * 4);
    float *mix = malloc((size_t)(a.n + b.n) * V * 4);
    /* separately: each sequence alone (sequence index 0 of a one-sequence batch) */
    struct part pa = {&a, 0, 0, a.n}, pb = {&b, 0, 0, b.n};
    REQUIRE(mixed_step(&f, &pa, 1, &seqs[0], 1, feats, ref_a) == 0);
    REQUIRE(mixed_step(&f, &pb, 1, &seqs[1], 1, feats, ref_b) == 0);
    /* together: b's first half interleaved before all of a, then b's second half */
    struct part p1[2] = {{&b, 1, 0, ha}, {&a, 0, 0, a.n}}, p2[1] = {{&b, 1, ha, b.n}};
    REQUIRE(mixed_step(&f, p1, 2, seqs, 2, feats, mix) == 0);
    REQUIRE(mixed_step(&f, p2, 1, seqs, 2, feats, mix + (size_t)(ha + a.n) * V) == 0);
    CHECKF(cvlm_test_max_rel(mix + (size_t)ha * V, ref_a, (size_t)a.n * V) < 1e-5, "seq a: %g",
           cvlm_test_max_rel(mix + (size_t)ha * V, ref_a, (size_t)a.n * V));
    CHECKF(cvlm_test_max_rel(mix, ref_b, (size_t)ha * V) < 1e-5, "seq b first half");
    CHECKF(cvlm_test_max_rel(mix + (size_t)(ha + a.n) * V, ref_b + (size_t)ha * V,
                             (size_t)(b.n - ha) * V) < 1e-5,
           "seq b second half");
    /* a bad block table is refused, not followed */
    int32_t bad[1] = {999};
    struct cvlm_seq_kv badkv = {bad, 1};
    struct part p3 = {&b, 0, 0, 2};
    CHECK(mixed_step(&f, &p3, 1, &badkv, 1, feats, mix) == CVLM_EINVAL);
    free(ref_a);
    free(ref_b);
    free(mix);
    cvlm_prompt_free(&a);
    cvlm_prompt_free(&b);
    cvlm_model_feats_free(f.m, feats);
    fx_close(&f);
}
