/* test_boxes.c - CogVLM grounding boxes found in text and converted to pixels
 * (server/boxes.c; the API suite checks them end to end in tests/api/test_api_extras.py). */
#include "server/boxes.h"
#include "tests/unit/harness.h"

#include <stdlib.h>
#include <string.h>

static size_t scan(const char *s, struct cvlm_box *b, size_t cap)
{
    return cvlm_boxes_scan(s, strlen(s), b, cap);
}

TEST(boxes_single_and_grouped_with_character_offsets)
{
    struct cvlm_box b[4];
    REQUIRE(scan("[[089,134,312,357]]", b, 4) == 1);
    CHECK(b[0].v[0] == 89 && b[0].v[1] == 134 && b[0].v[2] == 312 && b[0].v[3] == 357);
    CHECK(b[0].text_offset == 2);
    /* two groups, one of two boxes; offsets count characters, not bytes ("é" is 2) */
    const char *t = "é cat [[000,001,002,003];[997,998,999,500]] and dog[[010,020,030,040]].";
    REQUIRE(scan(t, b, 4) == 3);
    CHECK(b[0].text_offset == 8 && b[0].v[3] == 3);
    CHECK(b[1].text_offset == 8 + 18 && b[1].v[0] == 997 && b[1].v[3] == 500);
    CHECK(b[2].text_offset == 53 && b[2].v[2] == 30);
    /* the reference's form: several boxes inside one bracket pair */
    const char *r = "two[[000,001,002,003;997,998,999,500]]";
    REQUIRE(scan(r, b, 4) == 2);
    CHECK(b[0].text_offset == 5 && b[0].v[0] == 0 && b[0].v[3] == 3);
    CHECK(b[1].text_offset == 5 + 16 && b[1].v[0] == 997 && b[1].v[3] == 500);
    /* the count goes on past cap; only cap are written */
    CHECK(scan(t, b, 1) == 3 && b[0].v[0] == 0);
    CHECK(cvlm_boxes_scan(t, strlen(t), NULL, 0) == 3);
}

TEST(boxes_malformed_groups_yield_nothing)
{
    static const char *const bad[] = {
        "[089,134,312,357]",       /* single brackets */
        "[[89,134,312,357]]",      /* two digits */
        "[[0890,134,312,357]]",    /* four digits */
        "[[089,134,312]]",         /* three values */
        "[[089,134,312,357,001]]", /* five values */
        "[[089, 134,312,357]]",    /* a space */
        "[[089,134,312,357]",      /* unclosed */
        "[[089,134,312,357];]",    /* empty second box */
        "[[089,134,312,357;]]",    /* empty second box, one bracket pair */
        "[[089,134,312,357;1,2,3,4]]",
        "[[089,134,312,357];[1,2,3,4]]",        /* one bad box spoils the group */
        "[[089,134,312,357][089,134,312,357]]", /* no separator */
        "[[-89,134,312,357]]",
        "[[",
        "",
    };
    struct cvlm_box b[2];
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        CHECKF(scan(bad[i], b, 2) == 0, "'%s' was read as a box", bad[i]);
    /* a good group right after a stray bracket, and text cut inside a box */
    CHECK(scan("[[[001,002,003,004]]", b, 2) == 1 && b[0].text_offset == 3);
    CHECK(cvlm_boxes_scan("[[001,002,003,004]]", 18, b, 2) == 0);
}

TEST(boxes_pixel_formula_rounds_half_up_and_stays_in_the_image)
{
    CHECK(cvlm_box_to_pixel(0, 640) == 0);
    CHECK(cvlm_box_to_pixel(500, 640) == 320);
    CHECK(cvlm_box_to_pixel(999, 640) == 639); /* 639.36 */
    CHECK(cvlm_box_to_pixel(999, 500) == 500); /* 499.5 rounds up, to the edge */
    CHECK(cvlm_box_to_pixel(1, 500) == 1);     /* 0.5 */
    CHECK(cvlm_box_to_pixel(1, 499) == 0);     /* 0.499 */
    CHECK(cvlm_box_to_pixel(333, 3) == 1);     /* 0.999 */
    CHECK(cvlm_box_to_pixel(999, 1) == 1);
    CHECK(cvlm_box_to_pixel(999, 1 << 30) == 1072668082); /* exact in 64 bits */
}

TEST(boxes_json_in_pixels_and_empty_without_an_image)
{
    const char *t = "x[[100,200,300,400]]";
    json_t *a = cvlm_boxes_json(t, strlen(t), 300, 150);
    REQUIRE(a && json_array_size(a) == 1);
    json_t *o = json_array_get(a, 0);
    CHECK(json_integer_value(json_object_get(o, "x0")) == 30);
    CHECK(json_integer_value(json_object_get(o, "y0")) == 30);
    CHECK(json_integer_value(json_object_get(o, "x1")) == 90);
    CHECK(json_integer_value(json_object_get(o, "y1")) == 60);
    CHECK(json_integer_value(json_object_get(o, "text_offset")) == 3);
    CHECK(json_object_size(o) == 5);
    json_decref(a);
    a = cvlm_boxes_json(t, strlen(t), 0, 0);
    CHECK(a && json_is_array(a) && json_array_size(a) == 0);
    json_decref(a);
    a = cvlm_boxes_json("", 0, 10, 10);
    CHECK(a && json_array_size(a) == 0);
    json_decref(a);
}
