/* image_internal.h - what the codec files of engine/image/image_*.c share; not a public API.
 *
 * image.c detects the format and dispatches to one decoder per codec (image_jpeg.c,
 * image_png.c, image_webp.c, image_gif.c). Each decoder checks the pixel limit from the
 * header before it allocates or decodes pixels, never prints anything, and on failure
 * leaves `out` empty and returns a negative CVLM_E* code with a cvlm_errf() detail.
 */
#ifndef CVLM_IMAGE_INTERNAL_H
#define CVLM_IMAGE_INTERNAL_H

#include "engine/image/image.h"

#include <stddef.h>
#include <stdint.h>

/* Checks w x h against the limit (0 dims -> CVLM_EFORMAT, too many pixels -> CVLM_ETOOBIG)
 * and allocates out->rgb (uninitialized). `fmt` names the codec in error details. */
int cvlm_image_alloc(struct cvlm_image *out, uint64_t w, uint64_t h, uint64_t max_pixels,
                     const char *fmt);

/* Just the limit part of cvlm_image_alloc(), for decoders that must check before they
 * allocate something else (a canvas, a library's own buffers). */
int cvlm_image_check_dims(uint64_t w, uint64_t h, uint64_t max_pixels, const char *fmt);

int cvlm_image_decode_jpeg(const uint8_t *data, size_t len, uint64_t max_pixels,
                           struct cvlm_image *out);
int cvlm_image_decode_png(const uint8_t *data, size_t len, uint64_t max_pixels,
                          struct cvlm_image *out);
int cvlm_image_decode_webp(const uint8_t *data, size_t len, uint64_t max_pixels,
                           struct cvlm_image *out);
int cvlm_image_decode_gif(const uint8_t *data, size_t len, uint64_t max_pixels,
                          struct cvlm_image *out);

/* Palette lookup the way PIL does it: entries past the file's palette come from PIL's
 * default palette, the gray ramp (i, i, i). `pal` has n <= 256 RGB triplets; `lut` gets
 * 256. */
void cvlm_image_palette_lut(const uint8_t *pal, int n, uint8_t lut[768]);

#endif
