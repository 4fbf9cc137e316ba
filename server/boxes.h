/* boxes.h - CogVLM's grounding boxes in an answer's text, and their pixel coordinates.
 *
 * CogVLM writes a box as `[[x0,y0,x1,y1]]` and several for one phrase as
 * `[[x0,y0,x1,y1;x0,y0,x1,y1]]` (the model spec's form; `[[x0,y0,x1,y1];[x0,y0,x1,y1]]` is read
 * too), every value three digits (000..999) on a 1000 x 1000 grid laid over the whole image,
 * whatever its aspect ratio. The text stays as the model wrote it; the request extension
 * `"cogvlm": {"boxes": "pixels"}` adds the boxes in pixels of the client's image
 * (openapi.yaml). Pure functions (no state), used on the loop thread.
 */
#ifndef CVLM_SERVER_BOXES_H
#define CVLM_SERVER_BOXES_H

#include <jansson.h>
#include <stddef.h>

/* Characters of a box's four values: `ddd,ddd,ddd,ddd`. */
#define CVLM_BOX_CHARS 15

struct cvlm_box {
    int v[4];           /* x0, y0, x1, y1 as written, 0..999 */
    size_t text_offset; /* characters (code points) of the text before the box's x0 digits */
};

/* Finds the boxes of text[0..len) (UTF-8), in order: only whole groups as defined above
 * (a group with any malformed box yields nothing). Writes at most `cap` of them to out
 * (out may be NULL when cap is 0) and returns how many there are in all. */
size_t cvlm_boxes_scan(const char *text, size_t len, struct cvlm_box *out, size_t cap);

/* A grid value (0..999) to a pixel coordinate on an axis of `size` pixels:
 * round(v * size / 1000), halves up, computed exactly in integers, then clamped to
 * [0, size] (coordinates are pixel edges: 0 is the left/top edge, size the right/bottom
 * one, as the model's x1 = x0 + width). */
long long cvlm_box_to_pixel(int v, int size);

/* The boxes of the text as a JSON array of {"x0","y0","x1","y1","text_offset"} in pixels
 * of a width x height image; an empty array when there is no image (a size <= 0). NULL
 * only when out of memory. */
json_t *cvlm_boxes_json(const char *text, size_t len, int width, int height);

#endif
