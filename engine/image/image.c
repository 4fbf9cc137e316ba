/* image.c - format detection, pixel limits and CLIP normalization (see image.h).
 *
 * The codecs live in image_jpeg.c, image_png.c, image_webp.c and image_gif.c, the resampler
 * in image_resize.c. This file owns the rules every codec shares: what a format's magic
 * bytes are, how large an image may be, and the palette semantics of PIL.
 */
#include "engine/image/image.h"

#include "engine/error.h"
#include "engine/image/image_internal.h"
#include "engine/util/hash.h"

#include <stdlib.h>
#include <string.h>

int cvlm_image_check_dims(uint64_t w, uint64_t h, uint64_t max_pixels, const char *fmt)
{
    if (!max_pixels)
        max_pixels = CVLM_IMAGE_DEFAULT_MAX_PIXELS;
    if (w == 0 || h == 0)
        return cvlm_errf(CVLM_EFORMAT, "%s: image has zero size (%llux%llu)", fmt,
                         (unsigned long long)w, (unsigned long long)h);
    /* Both factors fit in 32 bits for every codec, but be safe against any caller. */
    if (w > UINT32_MAX || h > UINT32_MAX || w * h > max_pixels)
        return cvlm_errf(CVLM_ETOOBIG, "%s: %llux%llu pixels exceeds the limit of %llu pixels", fmt,
                         (unsigned long long)w, (unsigned long long)h,
                         (unsigned long long)max_pixels);
    /* struct cvlm_image holds int dimensions and 3 bytes per pixel must fit size_t. */
    if (w > INT32_MAX || h > INT32_MAX || w * h > SIZE_MAX / 3)
        return cvlm_errf(CVLM_ETOOBIG, "%s: %llux%llu pixels is too large", fmt,
                         (unsigned long long)w, (unsigned long long)h);
    return 0;
}

int cvlm_image_alloc(struct cvlm_image *out, uint64_t w, uint64_t h, uint64_t max_pixels,
                     const char *fmt)
{
    int rc = cvlm_image_check_dims(w, h, max_pixels, fmt);
    if (rc)
        return rc;
    out->rgb = malloc((size_t)(w * h * 3));
    if (!out->rgb)
        return cvlm_errf(CVLM_ENOMEM, "%s: cannot allocate %llux%llu RGB pixels", fmt,
                         (unsigned long long)w, (unsigned long long)h);
    out->width = (int)w;
    out->height = (int)h;
    return 0;
}

void cvlm_image_free(struct cvlm_image *img)
{
    if (!img)
        return;
    free(img->rgb);
    img->rgb = NULL;
    img->width = img->height = 0;
}

void cvlm_image_palette_lut(const uint8_t *pal, int n, uint8_t lut[768])
{
    if (n > 256)
        n = 256;
    if (n < 0)
        n = 0;
    memcpy(lut, pal, (size_t)n * 3);
    for (int i = n; i < 256; i++)
        lut[i * 3 + 0] = lut[i * 3 + 1] = lut[i * 3 + 2] = (uint8_t)i;
}

enum img_format { FMT_UNKNOWN, FMT_JPEG, FMT_PNG, FMT_GIF, FMT_WEBP };

/* Magic bytes as PIL's plugins accept them (JpegImagePlugin: FF D8 FF; GifImagePlugin:
 * GIF87a/GIF89a; WebP: a RIFF container of form type WEBP). */
static enum img_format detect(const uint8_t *p, size_t len)
{
    if (len >= 3 && p[0] == 0xFF && p[1] == 0xD8 && p[2] == 0xFF)
        return FMT_JPEG;
    if (len >= 8 && !memcmp(p, "\x89PNG\r\n\x1a\n", 8))
        return FMT_PNG;
    if (len >= 6 && (!memcmp(p, "GIF87a", 6) || !memcmp(p, "GIF89a", 6)))
        return FMT_GIF;
    if (len >= 12 && !memcmp(p, "RIFF", 4) && !memcmp(p + 8, "WEBP", 4))
        return FMT_WEBP;
    return FMT_UNKNOWN;
}

int cvlm_image_decode(const void *data, size_t len, const struct cvlm_image_limits *lim,
                      struct cvlm_image *out)
{
    const uint8_t *p = data;
    uint64_t max_px = lim && lim->max_pixels ? lim->max_pixels : CVLM_IMAGE_DEFAULT_MAX_PIXELS;
    int rc;

    if (!out)
        return cvlm_errf(CVLM_EINVAL, "image: no output");
    memset(out, 0, sizeof(*out));
    if (!data && len)
        return cvlm_errf(CVLM_EINVAL, "image: no data");
    switch (detect(p, len)) {
    case FMT_JPEG: rc = cvlm_image_decode_jpeg(p, len, max_px, out); break;
    case FMT_PNG: rc = cvlm_image_decode_png(p, len, max_px, out); break;
    case FMT_GIF: rc = cvlm_image_decode_gif(p, len, max_px, out); break;
    case FMT_WEBP: rc = cvlm_image_decode_webp(p, len, max_px, out); break;
    default:
        return cvlm_errf(CVLM_EUNSUPPORTED,
                         "image: unknown format (%zu bytes; JPEG, PNG, WebP and GIF are "
                         "supported)",
                         len);
    }
    if (rc)
        cvlm_image_free(out);
    return rc;
}

/* torchvision: ToTensor divides by 255 in float32, Normalize subtracts and divides by the
 * float32 tensors made from the Python (double) constants; hence the (float) casts of
 * double literals rather than float literals (they can round differently). */
static const double clip_mean[3] = {0.48145466, 0.4578275, 0.40821073};
static const double clip_std[3] = {0.26862954, 0.26130258, 0.27577711};

void cvlm_image_normalize(const struct cvlm_image *img, float *chw)
{
    float lut[3][256];
    size_t n = (size_t)img->width * (size_t)img->height;

    /* 768 exact values, then a table lookup per byte: same numbers, a fraction of the time. */
    for (int c = 0; c < 3; c++) {
        float m = (float)clip_mean[c], s = (float)clip_std[c];
        for (int v = 0; v < 256; v++)
            lut[c][v] = ((float)v / 255.0f - m) / s;
    }
    for (int c = 0; c < 3; c++) {
        const uint8_t *src = img->rgb + c;
        float *dst = chw + (size_t)c * n;
        for (size_t i = 0; i < n; i++)
            dst[i] = lut[c][src[i * 3]];
    }
}

int cvlm_image_preprocess(const void *data, size_t len, const struct cvlm_image_limits *lim,
                          int size, float **chw, uint64_t *hash, int src_wh[2])
{
    struct cvlm_image img = {0}, sized = {0};
    int rc = cvlm_image_decode(data, len, lim, &img);
    *chw = NULL;
    if (!rc && src_wh) {
        src_wh[0] = img.width;
        src_wh[1] = img.height;
    }
    if (!rc)
        rc = cvlm_image_resize_bicubic(&img, size, size, &sized);
    cvlm_image_free(&img);
    if (!rc && !(*chw = malloc((size_t)3 * size * size * sizeof(float))))
        rc = cvlm_errf(CVLM_ENOMEM, "out of memory");
    if (!rc)
        cvlm_image_normalize(&sized, *chw);
    if (!rc && hash) { /* keyed (engine/util/hash.h): no client can forge another's image */
        uint64_t h = cvlm_hash64(sized.rgb, (size_t)3 * size * size, (uint64_t)size);
        *hash = h ? h : 1;
    }
    cvlm_image_free(&sized);
    return rc;
}
