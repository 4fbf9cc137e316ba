/* image.h - image decoding and CLIP preprocessing, PIL-exact.
 *
 * Decodes JPEG, PNG, WebP and GIF (first frame) from memory into 8-bit RGB the way PIL's
 * Image.open(...).convert("RGB") does (alpha dropped, not composited; no EXIF rotation),
 * resizes with PIL's BICUBIC resampler bit for bit, and normalizes with the OpenAI-CLIP
 * mean/std into float CHW. Pure functions over caller-owned buffers; thread-safe.
 */
#ifndef CVLM_IMAGE_H
#define CVLM_IMAGE_H

#include <stddef.h>
#include <stdint.h>

#define CVLM_IMAGE_DEFAULT_MAX_PIXELS (50ull * 1000 * 1000)

/* An 8-bit RGB image, rows top to bottom, pixels interleaved R,G,B (HWC). */
struct cvlm_image {
    int width, height;
    uint8_t *rgb; /* width * height * 3 bytes, malloc'd; release with cvlm_image_free() */
};

struct cvlm_image_limits {
    uint64_t max_pixels; /* width*height above this is rejected before decoding pixels;
                            0 means CVLM_IMAGE_DEFAULT_MAX_PIXELS */
};

/* Detects the format from the magic bytes and decodes. Errors: CVLM_EUNSUPPORTED
 * (unknown format), CVLM_EFORMAT (corrupt or truncated), CVLM_ETOOBIG (pixel limit, checked
 * from the header before any pixel buffer is allocated), CVLM_ENOMEM, CVLM_EINVAL. The detail
 * names the format and the problem. `lim` may be NULL. On error *out is left empty (NULL
 * pixels), so cvlm_image_free() is safe either way. Never prints anything. */
int cvlm_image_decode(const void *data, size_t len, const struct cvlm_image_limits *lim,
                      struct cvlm_image *out);
void cvlm_image_free(struct cvlm_image *img);

/* Resizes to out_w x out_h with PIL's BICUBIC filter (Image.resize((w, h), BICUBIC)), bit
 * exact. `out` is allocated (free with cvlm_image_free). Errors: CVLM_EINVAL, CVLM_ENOMEM,
 * CVLM_ETOOBIG (a side above 2^28, or a side of over ~8 M pixels shrunk, whose filter table
 * would pass 128 MiB). */
int cvlm_image_resize_bicubic(const struct cvlm_image *in, int out_w, int out_h,
                              struct cvlm_image *out);

/* uint8 HWC -> float CHW: (v/255 - mean[c]) / std[c] with the OpenAI-CLIP constants,
 * computed in float32 as torchvision does. `chw` holds 3 * width * height floats. */
void cvlm_image_normalize(const struct cvlm_image *img, float *chw);

/* The whole model input path: decode, resize to size x size, normalize into a malloc'd
 * float CHW array (*chw, free() it). If `hash` is given it receives a 64-bit hash of the
 * resized pixels (what the vision tower sees), for caching; if `src_wh` is given it
 * receives the decoded image's own width and height (before the resize). */
int cvlm_image_preprocess(const void *data, size_t len, const struct cvlm_image_limits *lim,
                          int size, float **chw, uint64_t *hash, int src_wh[2]);

#endif
