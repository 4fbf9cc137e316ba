/* image_resize.c - PIL's BICUBIC resampler (Image.resize((w, h), Image.BICUBIC)), bit exact.
 *
 * The arithmetic follows Pillow's libImaging/Resample.c (8 bits per channel):
 *   - separable: a horizontal pass then a vertical pass; a pass is skipped when that
 *     dimension does not change (so no rounding happens on that axis);
 *   - per output index, the filter window is centred at (i + 0.5) * scale with support
 *     2 * max(scale, 1) (antialiasing when downscaling), Keys cubic with a = -0.5; the
 *     weights (doubles) are normalized by their sum, then turned into 22-bit fixed point,
 *     rounding half away from zero;
 *   - accumulation in int32 from 1 << 21 (the rounding half), then clipped to 0..255 after
 *     each pass (>> 22).
 * Every double expression below is written in the same order as Pillow's, since a
 * reordering could flip a coefficient's last bit. The box is PIL's (0, 0, w, h) in float,
 * which matters only for dimensions above 2^24.
 *
 * Unlike Pillow, the vertical pass is streamed: each needed source row is resampled
 * horizontally once, into one row buffer, and immediately added (times its weight) into the
 * int32 accumulators of the few output rows whose window holds it. Integer sums do not
 * depend on order, so the result is the same, and memory stays O(output) even for a very
 * tall input. Coefficient tables are capped (RESIZE_MAX_COEFFS) so that absurd aspect
 * ratios fail with CVLM_ETOOBIG instead of allocating gigabytes.
 */
#include "engine/error.h"
#include "engine/image/image.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define PRECISION_BITS 22 /* 32 - 8 bits of result - 2 bits of headroom, as Pillow */
#define RESIZE_MAX_DIM (1 << 28)
#define RESIZE_MAX_COEFFS (1u << 25) /* per axis: out * ksize int32 weights (128 MiB) */

/* The filter windows of one axis: output index i reads inputs lo[i] .. lo[i] + n[i] - 1 with
 * weights k[i * ksize + 0 .. n[i] - 1]. */
struct axis {
    int ksize;
    int *lo, *n;
    int32_t *k;
};

static double bicubic(double x)
{
    const double a = -0.5;
    if (x < 0.0)
        x = -x;
    if (x < 1.0)
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0)
        return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

static void axis_free(struct axis *a)
{
    free(a->lo);
    free(a->n);
    free(a->k);
    memset(a, 0, sizeof(*a));
}

/* One output index: window bounds and double weights (Pillow's precompute_coeffs), then
 * the fixed-point conversion (normalize_coeffs_8bpc). */
static void axis_window(struct axis *a, int i, int in, double scale, double filterscale,
                        double support, double *w)
{
    double center = 0.0f + (i + 0.5) * scale, ww = 0.0, ss = 1.0 / filterscale;
    int xmin = (int)(center - support + 0.5), xmax = (int)(center + support + 0.5);
    int32_t *k = a->k + (size_t)i * (size_t)a->ksize;

    if (xmin < 0)
        xmin = 0;
    if (xmax > in)
        xmax = in;
    xmax -= xmin;
    for (int x = 0; x < xmax; x++) {
        w[x] = bicubic((x + xmin - center + 0.5) * ss);
        ww += w[x];
    }
    for (int x = 0; x < xmax; x++)
        if (ww != 0.0)
            w[x] /= ww;
    for (int x = 0; x < a->ksize; x++) {
        double v = x < xmax ? w[x] : 0.0;
        k[x] = v < 0 ? (int32_t)(-0.5 + v * (1 << PRECISION_BITS))
                     : (int32_t)(0.5 + v * (1 << PRECISION_BITS));
    }
    a->lo[i] = xmin;
    a->n[i] = xmax;
}

static int axis_init(struct axis *a, int in, int out)
{
    float in1 = (float)in; /* PIL passes the box as floats */
    double scale = (double)(in1 - 0.0f) / out, filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 2.0 * filterscale, *w;

    memset(a, 0, sizeof(*a));
    a->ksize = (int)ceil(support) * 2 + 1;
    if ((uint64_t)out * (uint64_t)a->ksize > RESIZE_MAX_COEFFS)
        return cvlm_errf(CVLM_ETOOBIG, "resize: %d -> %d pixels needs too many filter taps", in,
                         out);
    a->lo = malloc(sizeof(int) * (size_t)out);
    a->n = malloc(sizeof(int) * (size_t)out);
    a->k = malloc(sizeof(int32_t) * (size_t)out * (size_t)a->ksize);
    w = malloc(sizeof(double) * (size_t)a->ksize);
    if (!a->lo || !a->n || !a->k || !w) {
        free(w);
        axis_free(a);
        return cvlm_errf(CVLM_ENOMEM, "resize: out of memory for %d -> %d", in, out);
    }
    for (int i = 0; i < out; i++)
        axis_window(a, i, in, scale, filterscale, support, w);
    free(w);
    return 0;
}

static inline uint8_t clip8(int32_t v)
{
    v >>= PRECISION_BITS; /* arithmetic shift: floor, as Pillow's table lookup */
    return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

/* One row, horizontal pass: src has the input width, dst out_w pixels (RGB). */
static void hpass_row(const struct axis *a, const uint8_t *src, uint8_t *dst, int out_w)
{
    for (int xx = 0; xx < out_w; xx++) {
        const int32_t *k = a->k + (size_t)xx * (size_t)a->ksize;
        const uint8_t *p = src + (size_t)a->lo[xx] * 3;
        int32_t s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
        for (int x = 0, n = a->n[xx]; x < n; x++, p += 3) {
            s0 += p[0] * k[x];
            s1 += p[1] * k[x];
            s2 += p[2] * k[x];
        }
        dst[3 * xx + 0] = clip8(s0);
        dst[3 * xx + 1] = clip8(s1);
        dst[3 * xx + 2] = clip8(s2);
    }
}

/* acc[i] += row[i] * c over one output row; the hot loop of the vertical pass. */
static void vpass_add(int32_t *restrict acc, const uint8_t *restrict row, int32_t c, size_t n)
{
    size_t i = 0;
    /* Fixed-size blocks: GCC's -O2 cost model vectorizes these, not the plain loop. */
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++)
            acc[i + j] += row[i + j] * c;
    for (; i < n; i++)
        acc[i] += row[i] * c;
}

/* Vertical pass (streamed, see the file comment), horizontal pass first if `ah`. */
static int resize_vertical(const struct cvlm_image *in, const struct axis *ah,
                           const struct axis *av, struct cvlm_image *out)
{
    size_t rowlen = (size_t)out->width * 3, n = rowlen * (size_t)out->height;
    int32_t *acc = malloc(sizeof(int32_t) * n);
    uint8_t *hrow = ah ? malloc(rowlen) : NULL;
    int first = av->lo[0], last = av->lo[out->height - 1] + av->n[out->height - 1];
    int yy_lo = 0;

    if (!acc || (ah && !hrow)) {
        free(acc);
        free(hrow);
        return cvlm_errf(CVLM_ENOMEM, "resize: out of memory for %dx%d", out->width, out->height);
    }
    for (size_t i = 0; i < n; i++)
        acc[i] = 1 << (PRECISION_BITS - 1);
    for (int y = first; y < last; y++) {
        const uint8_t *src = in->rgb + (size_t)y * (size_t)in->width * 3;
        if (ah) {
            hpass_row(ah, src, hrow, out->width);
            src = hrow;
        }
        while (av->lo[yy_lo] + av->n[yy_lo] <= y)
            yy_lo++;
        for (int yy = yy_lo; yy < out->height && av->lo[yy] <= y; yy++) {
            int32_t c = av->k[(size_t)yy * (size_t)av->ksize + (size_t)(y - av->lo[yy])];
            if (c)
                vpass_add(acc + (size_t)yy * rowlen, src, c, rowlen);
        }
    }
    for (size_t i = 0; i < n; i++)
        out->rgb[i] = clip8(acc[i]);
    free(acc);
    free(hrow);
    return 0;
}

int cvlm_image_resize_bicubic(const struct cvlm_image *in, int out_w, int out_h,
                              struct cvlm_image *out)
{
    struct axis ah = {0}, av = {0};
    int need_h, need_v, rc;
    size_t nbytes;

    if (!in || !out || !in->rgb || in->width <= 0 || in->height <= 0 || out == in)
        return cvlm_errf(CVLM_EINVAL, "resize: bad input image");
    memset(out, 0, sizeof(*out));
    if (out_w <= 0 || out_h <= 0)
        return cvlm_errf(CVLM_EINVAL, "resize: bad output size %dx%d", out_w, out_h);
    if (out_w > RESIZE_MAX_DIM || out_h > RESIZE_MAX_DIM || in->width > RESIZE_MAX_DIM ||
        in->height > RESIZE_MAX_DIM)
        return cvlm_errf(CVLM_ETOOBIG, "resize: %dx%d -> %dx%d is too large", in->width, in->height,
                         out_w, out_h);
    nbytes = (size_t)out_w * (size_t)out_h * 3;
    if (!(out->rgb = malloc(nbytes)))
        return cvlm_errf(CVLM_ENOMEM, "resize: out of memory for %dx%d", out_w, out_h);
    out->width = out_w;
    out->height = out_h;
    need_h = out_w != in->width;
    need_v = out_h != in->height;
    if ((need_h && (rc = axis_init(&ah, in->width, out_w))) ||
        (need_v && (rc = axis_init(&av, in->height, out_h))))
        goto out;
    rc = 0;
    if (need_v) {
        rc = resize_vertical(in, need_h ? &ah : NULL, &av, out);
    } else if (need_h) {
        for (int y = 0; y < out_h; y++)
            hpass_row(&ah, in->rgb + (size_t)y * (size_t)in->width * 3,
                      out->rgb + (size_t)y * (size_t)out_w * 3, out_w);
    } else {
        memcpy(out->rgb, in->rgb, nbytes);
    }
out:
    axis_free(&ah);
    axis_free(&av);
    if (rc)
        cvlm_image_free(out);
    return rc;
}
