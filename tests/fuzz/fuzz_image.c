/* fuzz_image.c - libFuzzer target: image decoding (every format) and resizing.
 * Any input must either decode to a consistent image or fail with an error code. */
#include "engine/image/image.h"

#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct cvlm_image img = {0}, out = {0};
    struct cvlm_image_limits lim = {1u << 22}; /* 4 MP keeps iterations fast */
    if (cvlm_image_decode(data, size, &lim, &img) == 0) {
        if (!img.rgb || img.width <= 0 || img.height <= 0)
            abort();
        if (cvlm_image_resize_bicubic(&img, 28, 28, &out) == 0) {
            float chw[3 * 28 * 28];
            cvlm_image_normalize(&out, chw);
        }
    }
    cvlm_image_free(&img);
    cvlm_image_free(&out);
    return 0;
}
