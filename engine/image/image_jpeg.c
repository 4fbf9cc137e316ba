/* image_jpeg.c - JPEG decoding through libjpeg-turbo, configured as PIL's JpegDecode.c.
 *
 * PIL keeps libjpeg's defaults (islow DCT, fancy upsampling, block smoothing) and only picks
 * the output colour space from the number of components in SOF: 1 -> grayscale (mode L),
 * 3 -> RGB, 4 -> CMYK that it always treats as Adobe-inverted ("CMYK;I", whether or not an
 * Adobe marker is present; YCCK is converted to CMYK by libjpeg first). convert("RGB") then
 * maps CMYK with 8-bit integer math, reproduced in cmyk_to_rgb().
 *
 * libjpeg reports fatal errors through error_exit(), whose default calls exit(): ours
 * longjmps back instead. Warnings are never printed (corrupt-data warnings do not stop PIL
 * either). Running out of data before the last row (JWRN_JPEG_EOF, where libjpeg would pad
 * the image with gray) is an error, as for PIL ("image file is truncated"); running out
 * after it (missing EOI) is not. A progress monitor caps the number of progressive scans,
 * which a hostile file could otherwise multiply to burn CPU on a tiny input.
 */
#include "engine/error.h"
#include "engine/image/image_internal.h"

#include <setjmp.h>
#include <stdio.h> /* jpeglib.h needs FILE */
#include <stdlib.h>
#include <string.h>

#include <jerror.h>
#include <jpeglib.h>

#define JPEG_MAX_SCANS 1000

/* jpeg_mem_src() takes an unsigned long length. */
_Static_assert(sizeof(unsigned long) >= sizeof(size_t), "unsigned long narrower than size_t");

struct jpeg_err {
    struct jpeg_error_mgr pub; /* first: libjpeg sees a struct jpeg_error_mgr * */
    jmp_buf jmp;
    int eof; /* the data ended before the image did */
    char msg[JMSG_LENGTH_MAX];
};

/* Everything the decoder touches after setjmp() lives here, not in locals of the function
 * that called setjmp(), so nothing is indeterminate after a longjmp. */
struct jpeg_dec {
    struct jpeg_decompress_struct cinfo;
    struct jpeg_err err;
    struct jpeg_progress_mgr progress;
    int created;
    uint8_t *row; /* one decoded row, for grayscale and CMYK */
};

static void on_error_exit(j_common_ptr cinfo)
{
    struct jpeg_err *e = (struct jpeg_err *)cinfo->err;
    cinfo->err->format_message(cinfo, e->msg);
    longjmp(e->jmp, 1);
}

static void on_emit_message(j_common_ptr cinfo, int level)
{
    struct jpeg_err *e = (struct jpeg_err *)cinfo->err;
    if (level < 0) {
        if (cinfo->err->msg_code == JWRN_JPEG_EOF)
            e->eof = 1;
        cinfo->err->num_warnings++;
    }
}

static void on_output_message(j_common_ptr cinfo)
{
    (void)cinfo; /* never print: this runs inside a daemon */
}

static void on_progress(j_common_ptr cinfo)
{
    struct jpeg_err *e = (struct jpeg_err *)cinfo->err;
    if (cinfo->is_decompressor && ((j_decompress_ptr)cinfo)->input_scan_number > JPEG_MAX_SCANS) {
        snprintf(e->msg, sizeof(e->msg), "more than %d progressive scans", JPEG_MAX_SCANS);
        longjmp(e->jmp, 1);
    }
}

/* PIL's cmyk2rgb after the "CMYK;I" unpack (which inverts every channel):
 * out = clip(nk - nk * c / 255) with nk = 255 - k and PIL's rounded MULDIV255. */
static void cmyk_to_rgb(const uint8_t *in, uint8_t *out, int w)
{
    for (int x = 0; x < w; x++, in += 4, out += 3) {
        int nk = in[3]; /* 255 - (255 - k) */
        for (int c = 0; c < 3; c++) {
            int t = (255 - in[c]) * nk + 128;
            int v = nk - (((t >> 8) + t) >> 8);
            out[c] = (uint8_t)(v < 0 ? 0 : v);
        }
    }
}

static void gray_to_rgb(const uint8_t *in, uint8_t *out, int w)
{
    for (int x = 0; x < w; x++, out += 3)
        out[0] = out[1] = out[2] = in[x];
}

/* Reads the header, checks the limits, picks PIL's output colour space. */
static int jpeg_header(struct jpeg_dec *d, uint64_t max_pixels)
{
    j_decompress_ptr ci = &d->cinfo;
    int rc;

    if (jpeg_read_header(ci, TRUE) != JPEG_HEADER_OK)
        return cvlm_errf(CVLM_EFORMAT, "JPEG: no image in the data (tables only)");
    rc = cvlm_image_check_dims(ci->image_width, ci->image_height, max_pixels, "JPEG");
    if (rc)
        return rc;
    switch (ci->num_components) {
    case 1: ci->out_color_space = JCS_GRAYSCALE; break;
    case 3: ci->out_color_space = JCS_RGB; break;
    case 4: ci->out_color_space = JCS_CMYK; break;
    default:
        return cvlm_errf(CVLM_EUNSUPPORTED, "JPEG: cannot handle %d-component images",
                         ci->num_components);
    }
    return 0;
}

static int jpeg_run(struct jpeg_dec *d, const uint8_t *data, size_t len, uint64_t max_pixels,
                    struct cvlm_image *out)
{
    j_decompress_ptr ci = &d->cinfo;
    int rc;

    if (setjmp(d->err.jmp))
        return cvlm_errf(CVLM_EFORMAT, "JPEG: %s%s", d->err.msg,
                         d->err.eof ? " (truncated data)" : "");
    jpeg_create_decompress(ci);
    d->created = 1;
    ci->progress = &d->progress;
    jpeg_mem_src(ci, data, (unsigned long)len);
    if ((rc = jpeg_header(d, max_pixels)))
        return rc;
    jpeg_start_decompress(ci);
    if (ci->output_width != ci->image_width || ci->output_height != ci->image_height ||
        ci->output_components != ci->num_components)
        return cvlm_errf(CVLM_EFORMAT, "JPEG: unexpected output geometry");
    if ((rc = cvlm_image_alloc(out, ci->output_width, ci->output_height, max_pixels, "JPEG")))
        return rc;
    if (ci->output_components != 3 &&
        !(d->row = malloc((size_t)ci->output_width * (size_t)ci->output_components)))
        return cvlm_errf(CVLM_ENOMEM, "JPEG: out of memory");
    while (ci->output_scanline < ci->output_height) {
        uint8_t *dst = out->rgb + (size_t)ci->output_scanline * (size_t)out->width * 3;
        JSAMPROW row = ci->output_components == 3 ? dst : d->row;
        if (jpeg_read_scanlines(ci, &row, 1) != 1 || d->err.eof)
            break;
        if (ci->output_components == 1)
            gray_to_rgb(d->row, dst, out->width);
        else if (ci->output_components == 4)
            cmyk_to_rgb(d->row, dst, out->width);
    }
    if (d->err.eof || ci->output_scanline < ci->output_height)
        return cvlm_errf(CVLM_EFORMAT, "JPEG: truncated data (%u of %u rows decoded)",
                         ci->output_scanline, ci->output_height);
    /* Reads up to EOI. Like PIL, whose decoder ignores a suspension here, data that ends
     * after the last row (no EOI) is fine: libjpeg then warns and fakes the EOI. */
    jpeg_finish_decompress(ci);
    return 0;
}

int cvlm_image_decode_jpeg(const uint8_t *data, size_t len, uint64_t max_pixels,
                           struct cvlm_image *out)
{
    struct jpeg_dec *d = calloc(1, sizeof(*d));
    int rc;

    if (!d)
        return cvlm_errf(CVLM_ENOMEM, "JPEG: out of memory");
    d->cinfo.err = jpeg_std_error(&d->err.pub);
    d->err.pub.error_exit = on_error_exit;
    d->err.pub.emit_message = on_emit_message;
    d->err.pub.output_message = on_output_message;
    d->progress.progress_monitor = on_progress;
    rc = jpeg_run(d, data, len, max_pixels, out);
    if (d->created)
        jpeg_destroy_decompress(&d->cinfo);
    free(d->row);
    free(d);
    if (rc)
        cvlm_image_free(out);
    return rc;
}
