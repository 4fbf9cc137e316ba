/* test_template.c - prompt text, position ids and expert routing against the spec's
 * worked examples (cogvlm-model.md §4.2, §4.6, §5.2). */
#include "engine/error.h"
#include "engine/text/template.h"
#include "tests/unit/harness.h"

#include <stdlib.h>
#include <string.h>

TEST(template_render_chat_vqa_base)
{
    struct cvlm_turn h[1] = {{"What is this?", "A cat."}};
    char *s = cvlm_template_render(CVLM_TEMPLATE_CHAT, h, 1, "Its color?");
    CHECK(s && !strcmp(s, "Question: What is this? Answer: A cat.\nQuestion: Its color? Answer:"));
    free(s);
    s = cvlm_template_render(CVLM_TEMPLATE_VQA, NULL, 0, "What color is the square?");
    CHECK(s && !strcmp(s, "Question: What color is the square? Short answer:"));
    free(s);
    s = cvlm_template_render(CVLM_TEMPLATE_BASE, h, 1, "A photo of");
    CHECK(s && !strcmp(s, "A photo of")); /* base ignores history */
    free(s);
}

/* The 490 model's layout: BOS, 1227 image slots, 5 text tokens (spec §4.6 example). */
TEST(template_positions_and_experts_490)
{
    enum { N = 1 + 1227 + 5 };
    static uint8_t types[N], expert[N];
    static int32_t pos[N];
    for (int i = 1; i <= 1227; i++)
        types[i] = CVLM_TOKEN_VIS;
    int next = cvlm_position_ids(types, N, pos);
    cvlm_expert_ids(types, N, expert);
    CHECK(pos[0] == 0 && pos[1] == 1 && pos[1227] == 3 && pos[1228] == 4 && pos[N - 1] == 8);
    int shared = 1;
    for (int i = 2; i <= 1226; i++)
        shared &= pos[i] == 2;
    CHECK(shared);
    CHECK(next == 9);
    int vis = 0;
    for (int i = 0; i < N; i++)
        vis += expert[i] == CVLM_EXPERT_VISION;
    CHECK(vis == 1226 && expert[0] == CVLM_EXPERT_LANG && expert[1] == CVLM_EXPERT_VISION);
    CHECK(expert[1226] == CVLM_EXPERT_VISION && expert[1227] == CVLM_EXPERT_LANG);
    /* slot = position + 1224 after the image, as the spec states */
    CHECK(pos[1230] == 1230 - 1224);
}

TEST(template_positions_general_rule)
{
    /* two runs and edge cases: runs of 1 and 2 are all language-like */
    const uint8_t t1[] = {0, 1, 1, 1, 0, 1, 1, 1, 1, 0};
    const int32_t p1[] = {0, 1, 2, 3, 4, 5, 6, 6, 7, 8};
    const uint8_t t2[] = {0, 1, 0, 1, 1, 0};
    const int32_t p2[] = {0, 1, 2, 3, 4, 5};
    const uint8_t t3[] = {0, 0, 0};
    int32_t pos[16];
    uint8_t ex[16];
    CHECK(cvlm_position_ids(t1, 10, pos) == 9 && !memcmp(pos, p1, sizeof(p1)));
    CHECK(cvlm_position_ids(t2, 6, pos) == 6 && !memcmp(pos, p2, sizeof(p2)));
    CHECK(cvlm_position_ids(t3, 3, pos) == 3 && pos[2] == 2);
    cvlm_expert_ids(t1, 10, ex);
    const uint8_t e1[] = {0, 1, 1, 0, 0, 1, 1, 1, 0, 0};
    CHECK(!memcmp(ex, e1, sizeof(e1)));
    /* a VIS slot at the very end never uses the vision expert */
    const uint8_t t4[] = {0, 1, 1};
    cvlm_expert_ids(t4, 3, ex);
    CHECK(ex[1] == 1 && ex[2] == 0);
}

TEST(template_prompt_build_with_tokenizer)
{
    struct cvlm_tokenizer *tok;
    struct cvlm_config cfg;
    struct cvlm_prompt p;
    REQUIRE(cvlm_config_load(cvlm_test_data("golden-tiny/model/config.json"), &cfg) == 0);
    REQUIRE(cvlm_tokenizer_load(cvlm_test_data("llama2-tokenizer.model"), &tok) == 0);
    /* "Question: What is in this image? Answer:" with the fixture's 6-slot image */
    REQUIRE(cvlm_prompt_build(&cfg, tok, CVLM_TEMPLATE_CHAT, NULL, 0, "What is in this image?", 1,
                              &p) == 0);
    const int32_t ids[] = {1,    0,   0,   0,   0,    0,     0,   894,  29901,
                           1724, 338, 297, 445, 1967, 29973, 673, 29901};
    const int32_t pos[] = {0, 1, 2, 2, 2, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13};
    CHECK(p.n == 17 && !memcmp(p.ids, ids, sizeof(ids)) && !memcmp(p.pos, pos, sizeof(pos)));
    CHECK(p.image_start == 1 && p.next_pos == 14 && p.types[6] == 1 && p.expert[6] == 0);
    cvlm_prompt_free(&p);
    cfg.has_vision = 0;
    CHECK(cvlm_prompt_build(&cfg, tok, CVLM_TEMPLATE_CHAT, NULL, 0, "x", 1, &p) == CVLM_EINVAL);
    cvlm_tokenizer_destroy(tok);
}
