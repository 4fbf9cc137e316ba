/* image_png.c - PNG decoding through libpng, producing what PIL's own PNG reader gives.
 *
 * PIL (PngImagePlugin + Unpack.c) maps each PNG type to a mode and convert("RGB") then:
 *   gray 1/2/4/8     -> scaled to 8 bits (x255, x85, x17), replicated
 *   gray 16          -> mode I: the value CLAMPED to 255, not scaled (PIL quirk)
 *   gray+alpha 8/16  -> high byte of the gray sample, alpha dropped
 *   RGB / RGBA 8/16  -> high byte of each sample, alpha dropped (never composited)
 *   palette 1/2/4/8  -> looked up; indices past the PLTE entries get PIL's gray ramp
 * tRNS, gAMA, sBIT, iCCP and every other ancillary chunk leave the pixels alone, so libpng
 * is told to skip them all.
 *
 * libpng reports errors through a callback that must not return: ours records the message
 * and longjmps. Warnings and benign errors are swallowed. Like PIL, a file whose pixel data
 * is complete is accepted even if what follows it (end of the zlib stream, CRC, IEND) is
 * cut off.
 */
#include "engine/error.h"
#include "engine/image/image_internal.h"

#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum png_kind { K_RGB8, K_GRAY8, K_GRAY16, K_PAL };

struct png_dec {
    png_structp png;
    png_infop info;
    const uint8_t *data;
    size_t len, pos;
    uint32_t w, h;
    int interlaced;
    int reading;  /* inside png_read_row / png_read_image */
    int complete; /* the error came after the last row was delivered */
    enum png_kind kind;
    size_t rowbytes;
    uint8_t lut[768]; /* palette lookup, K_PAL only */
    uint8_t *buf;     /* one row (progressive) or all rows (interlaced), libpng's format */
    png_bytep *rows;
    char msg[200];
};

static void on_png_error(png_structp png, png_const_charp msg)
{
    struct png_dec *d = png_get_error_ptr(png);
    snprintf(d->msg, sizeof(d->msg), "%s", msg);
    /* libpng advances the row counter (and, interlaced, the pass) only after a row was
     * handed over, then reads the rest of the zlib stream: an error at that point means
     * all pixels are in. */
    if (d->reading)
        d->complete = d->interlaced ? png_get_current_pass_number(png) >= 7
                                    : png_get_current_row_number(png) >= d->h;
    png_longjmp(png, 1);
}

static void on_png_warning(png_structp png, png_const_charp msg)
{
    (void)png;
    (void)msg; /* never print: this runs inside a daemon */
}

static void on_png_read(png_structp png, png_bytep buf, size_t n)
{
    struct png_dec *d = png_get_io_ptr(png);
    if (n > d->len - d->pos)
        png_error(png, "unexpected end of data (truncated file)");
    memcpy(buf, d->data + d->pos, n);
    d->pos += n;
}

/* Chooses libpng transforms so that a row arrives as RGB8, GRAY8, GRAY16 or palette indices,
 * and returns the bytes per pixel of that row. */
static int png_setup(struct png_dec *d)
{
    int depth = png_get_bit_depth(d->png, d->info), ct = png_get_color_type(d->png, d->info);

    if (ct == PNG_COLOR_TYPE_PALETTE) {
        png_colorp pal = NULL;
        int n = 0;
        uint8_t raw[768];
        if (depth < 8)
            png_set_packing(d->png);
        if (!png_get_PLTE(d->png, d->info, &pal, &n))
            n = 0;
        for (int i = 0; i < n && i < 256; i++) {
            raw[i * 3 + 0] = pal[i].red;
            raw[i * 3 + 1] = pal[i].green;
            raw[i * 3 + 2] = pal[i].blue;
        }
        cvlm_image_palette_lut(raw, n, d->lut);
        d->kind = K_PAL;
        return 1;
    }
    if (ct & PNG_COLOR_MASK_ALPHA)
        png_set_strip_alpha(d->png);
    if (ct == PNG_COLOR_TYPE_GRAY && depth == 16) {
        d->kind = K_GRAY16;
        return 2;
    }
    if (depth == 16)
        png_set_strip_16(d->png); /* keeps the high byte, as PIL's ;16B unpackers do */
    if (depth < 8)
        png_set_expand_gray_1_2_4_to_8(d->png); /* only gray can be < 8 here */
    d->kind = (ct & PNG_COLOR_MASK_COLOR) ? K_RGB8 : K_GRAY8;
    return d->kind == K_RGB8 ? 3 : 1;
}

static void png_convert_row(const struct png_dec *d, const uint8_t *src, uint8_t *dst)
{
    uint32_t w = d->w;
    switch (d->kind) {
    case K_RGB8: memcpy(dst, src, (size_t)w * 3); break;
    case K_GRAY8:
        for (uint32_t x = 0; x < w; x++, dst += 3)
            dst[0] = dst[1] = dst[2] = src[x];
        break;
    case K_GRAY16:
        for (uint32_t x = 0; x < w; x++, dst += 3) {
            unsigned v = (unsigned)src[2 * x] << 8 | src[2 * x + 1];
            dst[0] = dst[1] = dst[2] = (uint8_t)(v > 255 ? 255 : v);
        }
        break;
    case K_PAL:
        for (uint32_t x = 0; x < w; x++, dst += 3)
            memcpy(dst, d->lut + 3 * src[x], 3);
        break;
    }
}

/* Everything up to the first row: header, limits, transforms, buffers. */
static int png_start(struct png_dec *d, uint64_t max_pixels, struct cvlm_image *out)
{
    int bpp, rc;
    size_t nrows;

    png_set_read_fn(d->png, d, on_png_read);
    png_set_user_limits(d->png, 0x7fffffff, 0x7fffffff); /* our pixel limit decides */
    png_set_keep_unknown_chunks(d->png, PNG_HANDLE_CHUNK_NEVER, NULL, -1);
    png_set_benign_errors(d->png, 1);
    png_read_info(d->png, d->info);
    d->w = png_get_image_width(d->png, d->info);
    d->h = png_get_image_height(d->png, d->info);
    d->interlaced = png_get_interlace_type(d->png, d->info) != PNG_INTERLACE_NONE;
    if ((rc = cvlm_image_check_dims(d->w, d->h, max_pixels, "PNG")))
        return rc;
    bpp = png_setup(d);
    png_set_interlace_handling(d->png);
    png_read_update_info(d->png, d->info);
    d->rowbytes = png_get_rowbytes(d->png, d->info);
    if (d->rowbytes != (size_t)d->w * (size_t)bpp)
        return cvlm_errf(CVLM_EFORMAT, "PNG: unexpected row size %zu for %u pixels", d->rowbytes,
                         d->w);
    if ((rc = cvlm_image_alloc(out, d->w, d->h, max_pixels, "PNG")))
        return rc;
    nrows = d->interlaced ? d->h : 1;
    d->buf = malloc(d->rowbytes * nrows);
    d->rows = malloc(sizeof(*d->rows) * nrows);
    if (!d->buf || !d->rows)
        return cvlm_errf(CVLM_ENOMEM, "PNG: out of memory for %u rows", d->h);
    for (size_t y = 0; y < nrows; y++)
        d->rows[y] = d->buf + y * d->rowbytes;
    return 0;
}

/* Returns 0, a negative code, or 1 when libpng failed after the last row (d->complete). */
static int png_run(struct png_dec *d, uint64_t max_pixels, struct cvlm_image *out)
{
    int rc;

    if (setjmp(png_jmpbuf(d->png)))
        return d->complete ? 1 : cvlm_errf(CVLM_EFORMAT, "PNG: %s", d->msg);
    if ((rc = png_start(d, max_pixels, out)))
        return rc;
    d->reading = 1;
    if (d->interlaced) {
        png_read_image(d->png, d->rows);
    } else {
        for (uint32_t y = 0; y < d->h; y++) {
            png_read_row(d->png, d->buf, NULL);
            png_convert_row(d, d->buf, out->rgb + (size_t)y * d->w * 3);
        }
    }
    d->reading = 0;
    return 0;
}

int cvlm_image_decode_png(const uint8_t *data, size_t len, uint64_t max_pixels,
                          struct cvlm_image *out)
{
    struct png_dec *d = calloc(1, sizeof(*d));
    int rc;

    if (!d)
        return cvlm_errf(CVLM_ENOMEM, "PNG: out of memory");
    d->data = data;
    d->len = len;
    d->png = png_create_read_struct(PNG_LIBPNG_VER_STRING, d, on_png_error, on_png_warning);
    if (d->png)
        d->info = png_create_info_struct(d->png);
    if (!d->png || !d->info) {
        rc = cvlm_errf(CVLM_ENOMEM, "PNG: cannot create the decoder");
        goto out;
    }
    rc = png_run(d, max_pixels, out);
    if (rc == 1) {
        /* Complete pixels, broken tail. The progressive path missed converting the last
         * row, whose data libpng had already copied out. */
        if (!d->interlaced)
            png_convert_row(d, d->buf, out->rgb + (size_t)(d->h - 1) * d->w * 3);
        rc = 0;
    }
    if (rc == 0 && d->interlaced)
        for (uint32_t y = 0; y < d->h; y++)
            png_convert_row(d, d->rows[y], out->rgb + (size_t)y * d->w * 3);
out:
    png_destroy_read_struct(d->png ? &d->png : NULL, d->info ? &d->info : NULL, NULL);
    free(d->buf);
    free(d->rows);
    free(d);
    if (rc)
        cvlm_image_free(out);
    return rc;
}
