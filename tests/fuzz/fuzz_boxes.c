/* fuzz_boxes.c - libFuzzer target: grounding boxes read from answer text and converted to
 * pixels (server/boxes.c). The first 4 bytes are the image's width and height (16 bits
 * each, 0 = no image), the rest the text. Every box must lie in the image and its
 * text_offset must point at the box as written. */
#include "server/boxes.h"

#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 4)
        return 0;
    int w = data[0] | data[1] << 8, h = data[2] | data[3] << 8;
    const char *t = (const char *)data + 4;
    size_t len = size - 4, chars = 0, n = cvlm_boxes_scan(t, len, NULL, 0);
    for (size_t i = 0; i < len; i++)
        chars += ((unsigned char)t[i] & 0xc0u) != 0x80u;
    json_t *a = cvlm_boxes_json(t, len, w, h), *o;
    size_t i;
    if (!a || json_array_size(a) != (w > 0 && h > 0 ? n : 0))
        abort();
    json_array_foreach (a, i, o) {
        static const char *const keys[4] = {"x0", "y0", "x1", "y1"};
        for (int k = 0; k < 4; k++) {
            json_int_t v = json_integer_value(json_object_get(o, keys[k]));
            if (v < 0 || v > (k % 2 ? h : w))
                abort();
        }
        json_int_t off = json_integer_value(json_object_get(o, "text_offset"));
        if (off < 1 || (size_t)off + CVLM_BOX_CHARS > chars)
            abort();
    }
    json_decref(a);
    return 0;
}
