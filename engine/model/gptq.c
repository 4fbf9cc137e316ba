/* gptq.c - GPTQ int4 checkpoints into Q4 matrices (see gptq.h for the format and the
 * mapping). Written from the format's description: codes, zeros and g_idx are read
 * element by element with explicit bounds, nothing in the file is trusted. */
#include "engine/model/gptq.h"

#include "engine/error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int cvlm_gptq_parse_config(json_t *root, struct cvlm_gptq_config *g)
{
    json_t *qc = json_object_get(root, "quantization_config"), *v;
    const char *m;
    memset(g, 0, sizeof(*g));
    if (!qc || json_is_null(qc))
        return 0;
    m = json_string_value(json_object_get(qc, "quant_method"));
    if (!json_is_object(qc) || !m)
        return cvlm_errf(CVLM_EFORMAT, "config.json: quantization_config needs a quant_method");
    if (strcmp(m, "gptq"))
        return cvlm_errf(CVLM_EUNSUPPORTED,
                         "config.json: quant_method '%s' (only GPTQ checkpoints are read)", m);
    g->enabled = 1;
    v = json_object_get(qc, "bits");
    g->bits = json_is_integer(v) ? (int)json_integer_value(v) : -1;
    if (g->bits != 4)
        return cvlm_errf(CVLM_EUNSUPPORTED, "config.json: GPTQ bits %d (only 4 is read)", g->bits);
    v = json_object_get(qc, "group_size");
    g->group_size = json_is_integer(v) ? (int)json_integer_value(v) : 0;
    if (g->group_size != CVLM_Q4_GROUP && g->group_size != -1)
        return cvlm_errf(CVLM_EUNSUPPORTED,
                         "config.json: GPTQ group_size %d (%d or -1 are read: the Q4 layout's "
                         "groups are %d wide)",
                         g->group_size, CVLM_Q4_GROUP, CVLM_Q4_GROUP);
    g->desc_act = json_is_true(json_object_get(qc, "desc_act"));
    v = json_object_get(qc, "sym");
    g->sym = !v || json_is_true(v);
    v = json_object_get(qc, "checkpoint_format");
    m = v && !json_is_null(v) ? json_string_value(v) : "gptq";
    if (!m || (strcmp(m, "gptq") && strcmp(m, "gptq_v2")))
        return cvlm_errf(CVLM_EUNSUPPORTED,
                         "config.json: GPTQ checkpoint_format '%s' (gptq or gptq_v2)",
                         m ? m : "(not a string)");
    g->v2 = !strcmp(m, "gptq_v2");
    return 0;
}

int cvlm_gptq_is_part(const char *name)
{
    static const char *const sfx[] = {".qweight", ".qzeros", ".scales", ".g_idx"};
    size_t n = strlen(name);
    for (int i = 0; i < 4; i++) {
        size_t s = strlen(sfx[i]);
        if (n > s && !strcmp(name + n - s, sfx[i]))
            return 1;
    }
    return 0;
}

static int32_t i32_at(const struct cvlm_tensor *t, int64_t i)
{
    int32_t v;
    memcpy(&v, (const unsigned char *)t->data + (size_t)i * 4, 4);
    return v;
}

/* base.part of st, marked claimed, checked to be `dt` (I32) or a float dtype (dt F32) of
 * shape [d0, d1] (d1 0: [d0]). */
static int part(const struct cvlm_safetensors *st, const char *base, const char *sfx,
                enum cvlm_dtype dt, int64_t d0, int64_t d1, unsigned char *claimed,
                const struct cvlm_tensor **out)
{
    char name[200];
    snprintf(name, sizeof(name), "%s.%s", base, sfx);
    const struct cvlm_st_tensor *t = cvlm_st_find(st, name);
    *out = NULL;
    if (!t)
        return cvlm_errf(CVLM_ENOENT, "GPTQ checkpoint lacks tensor %s", name);
    claimed[t - st->tensors] = 1;
    int dt_ok = dt == CVLM_DTYPE_I32
                    ? t->t.dtype == CVLM_DTYPE_I32
                    : t->t.dtype != CVLM_DTYPE_I32 && !cvlm_dtype_is_quant(t->t.dtype);
    int nd = d1 ? 2 : 1;
    if (!dt_ok || t->t.ndim != nd || t->t.shape[0] != d0 || (d1 && t->t.shape[1] != d1))
        return cvlm_errf(CVLM_ESHAPE, "GPTQ tensor %s: %s [%lld%s%lld] expected (%s%s)", name,
                         dt == CVLM_DTYPE_I32 ? "I32" : "F16", (long long)d0, d1 ? ", " : "",
                         (long long)(d1 ? d1 : 0), cvlm_dtype_name(t->t.dtype),
                         t->t.ndim == nd ? "" : ", other rank");
    *out = &t->t;
    return 0;
}

/* The stable sort of the input rows by group (counting sort): perm[j] = input row of stored
 * column j, inv its inverse. Group g must hold exactly min(gs, K - g gs) rows (gs = K when
 * there is one group per row). *identity: perm is 0..K-1. */
static int sort_rows(const struct cvlm_tensor *gi, int64_t K, int64_t gs, int64_t ng, int32_t *perm,
                     int32_t *inv, int *identity, const char *base)
{
    int64_t *at = calloc((size_t)ng + 1, sizeof(int64_t));
    if (!at)
        return cvlm_errf(CVLM_ENOMEM, "out of memory reading %s", base);
    for (int64_t k = 0; k < K; k++) {
        int64_t g = gi ? i32_at(gi, k) : k / gs;
        if (g < 0 || g >= ng) {
            free(at);
            return cvlm_errf(CVLM_EFORMAT, "GPTQ tensor %s.g_idx: row %lld in group %lld of %lld",
                             base, (long long)k, (long long)g, (long long)ng);
        }
        at[g + 1]++;
    }
    for (int64_t g = 0; g < ng; g++) {
        int64_t want = K - g * gs < gs ? K - g * gs : gs;
        if (at[g + 1] != want) {
            int64_t got = at[g + 1];
            free(at);
            return cvlm_errf(CVLM_EUNSUPPORTED,
                             "GPTQ tensor %s.g_idx: group %lld has %lld rows, %lld expected "
                             "(groups must be whole to be stored contiguously)",
                             base, (long long)g, (long long)got, (long long)want);
        }
        at[g + 1] += at[g];
    }
    *identity = 1;
    for (int64_t k = 0; k < K; k++) {
        int64_t j = at[gi ? i32_at(gi, k) : k / gs]++;
        perm[j] = (int32_t)k;
        inv[k] = (int32_t)j;
        *identity &= j == k;
    }
    free(at);
    return 0;
}

/* codes[n][j] (the Q4 layout, zeroed) = q[perm[j]][n]: the same nibble (q - 8 is what the
 * layout stores as nibble - 8). Columns in tiles of 64 so that the rows written stay in
 * cache while qweight is read row by row. */
static void move_codes(unsigned char *codes, const struct cvlm_tensor *qw, const int32_t *inv,
                       int64_t N, int64_t K)
{
    const unsigned char *src = qw->data;
    for (int64_t n0 = 0; n0 < N; n0 += 64) {
        int64_t n1 = n0 + 64 < N ? n0 + 64 : N;
        for (int64_t k = 0; k < K; k++) {
            const unsigned char *row = src + (size_t)(k / 8) * (size_t)N * 4;
            int64_t j = inv[k], off = j / 32 * 16 + j % 16, sh = 4 * (k % 8);
            int hi = j % 32 >= 16;
            for (int64_t n = n0; n < n1; n++) {
                uint32_t v;
                memcpy(&v, row + n * 4, 4);
                unsigned nib = (v >> sh) & 15u;
                codes[n * (K / 2) + off] |= (unsigned char)(hi ? nib << 4 : nib);
            }
        }
    }
}

/* scales[n][g] and mins[n][g] of the Q4 layout's ng groups from GPTQ's groups (one group
 * per row: the same for all). Returns 1 if some zero is not 8 (mins needed). */
static int move_scales(float *scales, float *mins, const struct cvlm_tensor *sc,
                       const struct cvlm_tensor *qz, int v2, int64_t N, int64_t ng, int one)
{
    int asym = 0;
    for (int64_t n = 0; n < N; n++)
        for (int64_t g = 0; g < ng; g++) {
            int64_t sg = one ? 0 : g;
            float s = cvlm_tensor_get_f32(sc, sg * N + n);
            int z = (int)(((uint32_t)i32_at(qz, sg * (N / 8) + n / 8) >> (4 * (n % 8))) & 15u);
            z += v2 ? 0 : 1; /* v1 stores zero - 1 */
            scales[n * ng + g] = s;
            mins[n * ng + g] = s * (float)(8 - z); /* exact: see gptq.h */
            asym |= z != 8;
        }
    return asym;
}

int cvlm_gptq_bind(struct cvlm_weights *w, const struct cvlm_safetensors *st, const char *base,
                   int64_t N, int64_t K, struct cvlm_tensor *slot, unsigned char *claimed)
{
    const struct cvlm_gptq_config *g = &w->cfg.gptq;
    const struct cvlm_tensor *qw, *qz, *sc, *gi = NULL;
    const int one = g->group_size == -1;
    const int64_t gs = one ? K : CVLM_Q4_GROUP, gng = (K + gs - 1) / gs;
    const int64_t ng = (K + CVLM_Q4_GROUP - 1) / CVLM_Q4_GROUP;
    char name[200];
    int rc, identity = 1;
    if (K % 32 || N % 8)
        return cvlm_errf(CVLM_EUNSUPPORTED,
                         "GPTQ tensor %s.qweight: a [%lld, %lld] matrix (int4 needs the input "
                         "width a multiple of 32 and the output width of 8)",
                         base, (long long)N, (long long)K);
    if ((rc = part(st, base, "qweight", CVLM_DTYPE_I32, K / 8, N, claimed, &qw)) ||
        (rc = part(st, base, "qzeros", CVLM_DTYPE_I32, gng, N / 8, claimed, &qz)) ||
        (rc = part(st, base, "scales", CVLM_DTYPE_F32, gng, N, claimed, &sc)))
        return rc;
    snprintf(name, sizeof(name), "%s.g_idx", base);
    if (cvlm_st_find(st, name) &&
        (rc = part(st, base, "g_idx", CVLM_DTYPE_I32, K, 0, claimed, &gi)))
        return rc;
    size_t cb = ((size_t)(N * K / 2) + 63) / 64 * 64, sb = (size_t)(N * ng) * sizeof(float);
    unsigned char *buf = cvlm_weights_own(w, cb + 2 * sb + (size_t)K * 4);
    int32_t *inv = malloc((size_t)K * sizeof(int32_t));
    if (!buf || !inv) {
        free(inv);
        return cvlm_errf(CVLM_ENOMEM, "out of memory converting %s", base);
    }
    float *scales = (float *)(buf + cb), *mins = (float *)(buf + cb + sb);
    int32_t *perm = (int32_t *)(buf + cb + 2 * sb);
    if ((rc = sort_rows(gi, K, gs, gng, perm, inv, &identity, base))) {
        free(inv);
        return rc;
    }
    memset(buf, 0, cb);
    move_codes(buf, qw, inv, N, K);
    free(inv);
    int asym = move_scales(scales, mins, sc, qz, g->v2, N, ng, one);
    *slot = (struct cvlm_tensor){.dtype = CVLM_DTYPE_Q4,
                                 .ndim = 2,
                                 .shape = {N, K},
                                 .data = buf,
                                 .scales = scales,
                                 .mins = asym ? mins : NULL,
                                 .perm = identity ? NULL : perm};
    return 0;
}
