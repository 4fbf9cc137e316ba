/* boxes.c - finds CogVLM's grounding boxes in answer text and converts them to pixels
 * (see boxes.h for the format and the formula). */
#include "server/boxes.h"

#include <stdlib.h>

/* Four values `ddd,ddd,ddd,ddd` at p (n bytes there): 1 and the values, or 0. */
static int quad_at(const char *p, size_t n, int v[4])
{
    if (n < CVLM_BOX_CHARS)
        return 0;
    for (int k = 0; k < 4; k++) {
        const char *q = p + 4 * k;
        int x = 0;
        for (int d = 0; d < 3; d++) {
            if (q[d] < '0' || q[d] > '9')
                return 0;
            x = x * 10 + (q[d] - '0');
        }
        if (k < 3 && q[3] != ',')
            return 0;
        v[k] = x;
    }
    return 1;
}

/* A group at t (n bytes there): `[` inner (`;` inner)* `]` with inner = `[` quad (`;` quad)*
 * `]`, which covers both `[[q;q]]` (the reference's form) and `[[q];[q]]`. Returns the
 * number of its boxes and its length in *end, or 0 if the bytes there are not one. */
static size_t group_at(const char *t, size_t n, size_t *end)
{
    size_t j = 1, nb = 0;
    int v[4];
    if (n < 2 || t[0] != '[' || t[1] != '[')
        return 0;
    for (;;) { /* at an inner's '[' */
        if (j >= n || t[j] != '[')
            return 0;
        j++;
        for (;;) { /* at a quad */
            if (!quad_at(t + j, n - j, v))
                return 0;
            j += CVLM_BOX_CHARS;
            nb++;
            if (j < n && t[j] == ';') {
                j++;
                continue;
            }
            break;
        }
        if (j >= n || t[j] != ']')
            return 0;
        j++;
        if (j < n && t[j] == ']') {
            *end = j + 1;
            return nb;
        }
        if (j >= n || t[j] != ';')
            return 0;
        j++;
    }
}

size_t cvlm_boxes_scan(const char *text, size_t len, struct cvlm_box *out, size_t cap)
{
    size_t i = 0, chars = 0, found = 0, end = 0;
    while (i < len) {
        size_t nb = group_at(text + i, len - i, &end);
        if (!nb) { /* count code points: every byte that does not continue one */
            chars += ((unsigned char)text[i] & 0xc0u) != 0x80u;
            i++;
            continue;
        }
        /* a quad starts at every digit right after '[' or ';' (the group is ASCII: bytes
         * = characters) */
        for (size_t at = 1; at < end; at++)
            if (text[i + at] >= '0' && text[i + at] <= '9' &&
                (text[i + at - 1] == '[' || text[i + at - 1] == ';')) {
                if (found < cap) {
                    quad_at(text + i + at, len - i - at, out[found].v);
                    out[found].text_offset = chars + at;
                }
                found++;
            }
        i += end;
        chars += end;
    }
    return found;
}

long long cvlm_box_to_pixel(int v, int size)
{
    long long p = (2LL * v * size + 1000) / 2000; /* v * size / 1000 rounded, halves up */
    return p < 0 ? 0 : p > size ? size : p;
}

json_t *cvlm_boxes_json(const char *text, size_t len, int width, int height)
{
    json_t *arr = json_array();
    size_t n = width > 0 && height > 0 ? cvlm_boxes_scan(text, len, NULL, 0) : 0;
    struct cvlm_box *b = n ? calloc(n, sizeof(*b)) : NULL;
    if (!arr || (n && !b)) {
        json_decref(arr);
        free(b);
        return NULL;
    }
    n = n ? cvlm_boxes_scan(text, len, b, n) : 0;
    for (size_t i = 0; i < n; i++) {
        json_t *o = json_pack("{sIsIsIsIsI}", "x0", (json_int_t)cvlm_box_to_pixel(b[i].v[0], width),
                              "y0", (json_int_t)cvlm_box_to_pixel(b[i].v[1], height), "x1",
                              (json_int_t)cvlm_box_to_pixel(b[i].v[2], width), "y1",
                              (json_int_t)cvlm_box_to_pixel(b[i].v[3], height), "text_offset",
                              (json_int_t)b[i].text_offset);
        if (!o || json_array_append_new(arr, o)) {
            json_decref(arr);
            free(b);
            return NULL;
        }
    }
    free(b);
    return arr;
}
