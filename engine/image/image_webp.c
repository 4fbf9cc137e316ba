/* image_webp.c - WebP decoding (lossy, lossless, alpha, animated -> first frame).
 *
 * PIL 9.x with libwebpdemux decodes every WebP, still or animated, through WebPAnimDecoder
 * in MODE_RGBA (not premultiplied) and takes the first frame; convert("RGB") drops alpha.
 * We make the same calls, so the pixels are libwebp's own. An animation's first frame may
 * cover only part of the canvas: the rest is transparent black (0, 0, 0, 0); the ANIM
 * background colour is ignored, as libwebp's anim decoder does.
 *
 * The canvas size is checked from the header (WebPGetFeatures reads VP8X / VP8 / VP8L)
 * before WebPAnimDecoderNew allocates its canvas buffers.
 */
#include "engine/error.h"
#include "engine/image/image_internal.h"

#include <string.h>

#include <webp/decode.h>
#include <webp/demux.h>

static const char *vp8_status(VP8StatusCode st)
{
    switch (st) {
    case VP8_STATUS_OUT_OF_MEMORY: return "out of memory";
    case VP8_STATUS_INVALID_PARAM: return "invalid parameter";
    case VP8_STATUS_BITSTREAM_ERROR: return "bitstream error";
    case VP8_STATUS_UNSUPPORTED_FEATURE: return "unsupported feature";
    case VP8_STATUS_NOT_ENOUGH_DATA: return "not enough data (truncated file)";
    default: return "malformed data";
    }
}

static int webp_first_frame(WebPAnimDecoder *dec, uint64_t max_pixels, struct cvlm_image *out)
{
    WebPAnimInfo info;
    uint8_t *rgba;
    int ts, rc;

    if (!WebPAnimDecoderGetInfo(dec, &info))
        return cvlm_errf(CVLM_EFORMAT, "WebP: cannot read the container");
    if ((rc = cvlm_image_check_dims(info.canvas_width, info.canvas_height, max_pixels, "WebP")))
        return rc;
    if (info.frame_count == 0)
        return cvlm_errf(CVLM_EFORMAT, "WebP: the file holds no frame");
    if (!WebPAnimDecoderGetNext(dec, &rgba, &ts))
        return cvlm_errf(CVLM_EFORMAT, "WebP: cannot decode the first frame (corrupt data)");
    if ((rc = cvlm_image_alloc(out, info.canvas_width, info.canvas_height, max_pixels, "WebP")))
        return rc;
    for (size_t i = 0, n = (size_t)out->width * (size_t)out->height; i < n; i++)
        memcpy(out->rgb + 3 * i, rgba + 4 * i, 3);
    return 0;
}

int cvlm_image_decode_webp(const uint8_t *data, size_t len, uint64_t max_pixels,
                           struct cvlm_image *out)
{
    WebPBitstreamFeatures feat;
    WebPAnimDecoderOptions opt;
    WebPAnimDecoder *dec;
    WebPData wd = {data, len};
    VP8StatusCode st;
    int rc;

    st = WebPGetFeatures(data, len, &feat);
    if (st != VP8_STATUS_OK)
        return cvlm_errf(st == VP8_STATUS_UNSUPPORTED_FEATURE ? CVLM_EUNSUPPORTED : CVLM_EFORMAT,
                         "WebP: %s", vp8_status(st));
    if ((rc = cvlm_image_check_dims((uint64_t)feat.width, (uint64_t)feat.height, max_pixels,
                                    "WebP")))
        return rc;
    if (!WebPAnimDecoderOptionsInit(&opt))
        return cvlm_errf(CVLM_EUNSUPPORTED, "WebP: libwebpdemux version mismatch");
    opt.color_mode = MODE_RGBA;
    opt.use_threads = 0;
    dec = WebPAnimDecoderNew(&wd, &opt);
    if (!dec)
        return cvlm_errf(CVLM_EFORMAT, "WebP: malformed or truncated file");
    rc = webp_first_frame(dec, max_pixels, out);
    WebPAnimDecoderDelete(dec);
    if (rc)
        cvlm_image_free(out);
    return rc;
}
