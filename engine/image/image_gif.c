/* image_gif.c - GIF decoding (first frame) through giflib, composed the way PIL does it.
 *
 * PIL (GifImagePlugin, LOADING_STRATEGY RGB_AFTER_FIRST) opens frame 0 in mode P on a canvas
 * of the logical screen size, grown if the frame reaches past it. The canvas is first filled
 * with the frame's transparency index if its Graphic Control Extension has one, else with
 * index 0 (the screen's background colour is NOT used); the frame's indices are written at
 * its offset, transparent ones included. convert("RGB") looks every index up in the local
 * palette, else the global one (entries past its end: PIL's gray ramp); with no palette at
 * all the image is mode L and the index is the gray level, which the ramp also gives. A
 * local palette that is itself the gray ramp is replaced by the global one (PIL quirk).
 *
 * Like PIL, a file cut after the last pixel (missing block terminator or trailer) decodes;
 * a file cut inside the LZW data, or whose LZW data ends early, does not.
 */
#include "engine/error.h"
#include "engine/image/image_internal.h"

#include <gif_lib.h>
#include <stdlib.h>
#include <string.h>

struct gif_src {
    const uint8_t *data;
    size_t len, pos;
    int eof_zero; /* the data ends where a sub-block length byte belongs: read one 0 there */
};

static int on_gif_read(GifFileType *gif, GifByteType *buf, int n)
{
    struct gif_src *s = gif->UserData;
    size_t avail = s->len - s->pos;

    if (n <= 0)
        return 0;
    if (avail == 0 && s->eof_zero) {
        /* The virtual block terminator (see gif_check_tail). */
        s->eof_zero = 0;
        buf[0] = 0;
        return 1;
    }
    if ((size_t)n > avail)
        n = (int)avail;
    memcpy(buf, s->data + s->pos, (size_t)n);
    s->pos += (size_t)n;
    return n;
}

/* Called with pos at the first sub-block of the image data. If the chain of sub-blocks ends
 * exactly at the end of the file (terminator and trailer cut off), a virtual 0 terminator is
 * read there: giflib skips to the terminator after the last row, and PIL accepts such files.
 * If the LZW data itself is incomplete, giflib then reads that empty block where it expects
 * data and fails (D_GIF_ERR_IMAGE_DEFECT), again like PIL. A sub-block cut in its middle is
 * a short read and fails. */
static void gif_check_tail(struct gif_src *s)
{
    size_t p = s->pos;
    while (p < s->len && s->data[p] != 0)
        p += 1 + (size_t)s->data[p];
    s->eof_zero = p == s->len;
}

static const char *gif_strerror(int err)
{
    const char *s = err ? GifErrorString(err) : NULL;
    return s ? s : "malformed data";
}

static int gif_fail(GifFileType *gif, const char *what)
{
    return cvlm_errf(CVLM_EFORMAT, "GIF: %s: %s", what, gif_strerror(gif->Error));
}

/* Skips extensions up to the first image descriptor, remembering the transparency index
 * of the last Graphic Control Extension (-1 if none). */
static int gif_to_first_image(GifFileType *gif, int *trns)
{
    GifRecordType type;
    int code;
    GifByteType *ext;

    *trns = -1;
    for (;;) {
        if (DGifGetRecordType(gif, &type) == GIF_ERROR)
            return gif_fail(gif, "reading a record");
        if (type == IMAGE_DESC_RECORD_TYPE)
            return 0;
        if (type == TERMINATE_RECORD_TYPE)
            return cvlm_errf(CVLM_EFORMAT, "GIF: the file holds no image");
        if (type != EXTENSION_RECORD_TYPE)
            return cvlm_errf(CVLM_EFORMAT, "GIF: unexpected record type %d", (int)type);
        if (DGifGetExtension(gif, &code, &ext) == GIF_ERROR)
            return gif_fail(gif, "reading an extension");
        /* ext[0] is the sub-block length; GCE data: flags, delay (2), transparent index. */
        if (code == GRAPHICS_EXT_FUNC_CODE && ext && ext[0] >= 4 && (ext[1] & 1))
            *trns = ext[4];
        while (ext)
            if (DGifGetExtensionNext(gif, &ext) == GIF_ERROR)
                return gif_fail(gif, "reading an extension");
    }
}

static int gif_is_ramp(const ColorMapObject *m)
{
    for (int i = 0; i < m->ColorCount; i++)
        if (m->Colors[i].Red != i || m->Colors[i].Green != i || m->Colors[i].Blue != i)
            return 0;
    return 1;
}

/* Decodes the frame's rows into the canvas (indices), in interlaced order if needed. */
static int gif_read_rows(GifFileType *gif, struct gif_src *src, uint8_t *canvas, size_t cw)
{
    static const int start[4] = {0, 4, 2, 1}, step[4] = {8, 8, 4, 2};
    const GifImageDesc *id = &gif->Image;
    int passes = id->Interlace ? 4 : 1;

    gif_check_tail(src);
    for (int p = 0; p < passes; p++) {
        int y0 = id->Interlace ? start[p] : 0, dy = id->Interlace ? step[p] : 1;
        for (int y = y0; y < id->Height; y += dy) {
            uint8_t *row = canvas + ((size_t)id->Top + (size_t)y) * cw + (size_t)id->Left;
            if (DGifGetLine(gif, row, id->Width) == GIF_ERROR)
                return gif_fail(gif, "decoding the image data");
        }
    }
    return 0;
}

static int gif_frame(GifFileType *gif, struct gif_src *src, int trns, uint64_t max_pixels,
                     struct cvlm_image *out)
{
    const GifImageDesc *id = &gif->Image;
    const ColorMapObject *cmap;
    uint64_t cw, ch, x1, y1;
    uint8_t lut[768], *canvas;
    int rc;

    if (id->Left < 0 || id->Top < 0 || id->Width < 0 || id->Height < 0)
        return cvlm_errf(CVLM_EFORMAT, "GIF: bad image descriptor");
    if (id->Width == 0 || id->Height == 0) /* PIL: "tile cannot extend outside image" */
        return cvlm_errf(CVLM_EFORMAT, "GIF: the first frame is empty (%dx%d)", id->Width,
                         id->Height);
    x1 = (uint64_t)id->Left + (uint64_t)id->Width;
    y1 = (uint64_t)id->Top + (uint64_t)id->Height;
    cw = x1 > (uint64_t)gif->SWidth ? x1 : (uint64_t)gif->SWidth;
    ch = y1 > (uint64_t)gif->SHeight ? y1 : (uint64_t)gif->SHeight;
    if ((rc = cvlm_image_check_dims(cw, ch, max_pixels, "GIF")))
        return rc;
    if (!(canvas = malloc((size_t)(cw * ch))))
        return cvlm_errf(CVLM_ENOMEM, "GIF: out of memory for a %llux%llu canvas",
                         (unsigned long long)cw, (unsigned long long)ch);
    memset(canvas, trns >= 0 ? trns : 0, (size_t)(cw * ch));
    if ((rc = gif_read_rows(gif, src, canvas, cw)))
        goto out;
    /* PIL drops a palette that is the identity ramp (i, i, i) as "not needed"; for a local
     * one it then attaches the global palette, which convert("RGB") applies. */
    cmap = id->ColorMap && !gif_is_ramp(id->ColorMap) ? id->ColorMap
           : gif->SColorMap                           ? gif->SColorMap
                                                      : id->ColorMap;
    {
        uint8_t raw[768];
        int n = cmap ? cmap->ColorCount : 0;
        for (int i = 0; i < n && i < 256; i++) {
            raw[i * 3 + 0] = cmap->Colors[i].Red;
            raw[i * 3 + 1] = cmap->Colors[i].Green;
            raw[i * 3 + 2] = cmap->Colors[i].Blue;
        }
        cvlm_image_palette_lut(raw, n, lut);
    }
    if ((rc = cvlm_image_alloc(out, cw, ch, max_pixels, "GIF")))
        goto out;
    for (size_t i = 0, n = (size_t)(cw * ch); i < n; i++)
        memcpy(out->rgb + 3 * i, lut + 3 * canvas[i], 3);
out:
    free(canvas);
    return rc;
}

int cvlm_image_decode_gif(const uint8_t *data, size_t len, uint64_t max_pixels,
                          struct cvlm_image *out)
{
    struct gif_src src = {data, len, 0, 0};
    GifFileType *gif;
    uint64_t sw, sh;
    int err = 0, trns = -1, rc;

    gif = DGifOpen(&src, on_gif_read, &err);
    if (!gif)
        return cvlm_errf(CVLM_EFORMAT, "GIF: %s", gif_strerror(err));
    /* The screen alone can already be too big (the canvas is at least the screen). */
    sw = (uint64_t)gif->SWidth;
    sh = (uint64_t)gif->SHeight;
    if (sw * sh > max_pixels)
        rc = cvlm_image_check_dims(sw, sh, max_pixels, "GIF");
    else if (!(rc = gif_to_first_image(gif, &trns))) {
        if (DGifGetImageDesc(gif) == GIF_ERROR)
            rc = gif_fail(gif, "reading the image descriptor");
        else
            rc = gif_frame(gif, &src, trns, max_pixels, out);
    }
    DGifCloseFile(gif, &err);
    if (rc)
        cvlm_image_free(out);
    return rc;
}
