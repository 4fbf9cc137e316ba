/* template.h - CogVLM prompt construction: text templates, token types, position ids and
 * expert routing (cogvlm-model.md §4.1, §4.2, §4.6, §5).
 *
 * A prompt is [BOS] + (image: image_tokens placeholder slots of type VIS) + text ids.
 * Position ids are not slot indices: all interior image slots share one position.
 * The expert of a slot depends on the next slot's type, so it is fixed over the whole
 * prompt once and must not be recomputed per prefill chunk.
 */
#ifndef CVLM_TEMPLATE_H
#define CVLM_TEMPLATE_H

#include "engine/model/weights.h"
#include "engine/text/tokenizer.h"

#include <stdint.h>

enum { CVLM_TOKEN_LANG = 0, CVLM_TOKEN_VIS = 1 };

/* One past exchange of a conversation. */
struct cvlm_turn {
    const char *query;
    const char *response;
};

struct cvlm_prompt {
    int n;           /* slots */
    int32_t *ids;    /* [n] token ids; image slots hold pad_token_id */
    uint8_t *types;  /* [n] CVLM_TOKEN_LANG / CVLM_TOKEN_VIS */
    int32_t *pos;    /* [n] RoPE position ids */
    uint8_t *expert; /* [n] CVLM_EXPERT_LANG / CVLM_EXPERT_VISION */
    int image_start; /* first image slot (boi), -1 without image */
    int next_pos;    /* position of the first generated token */
};

/* Renders the template text (malloc'd): base = query verbatim; chat / vqa =
 * "Question: q Answer: r\n"... "Question: query Answer:" ("Short answer:" for vqa). */
char *cvlm_template_render(enum cvlm_template t, const struct cvlm_turn *history, int n_history,
                           const char *query);

/* Builds the whole prompt for a model config. */
int cvlm_prompt_build(const struct cvlm_config *cfg, const struct cvlm_tokenizer *tok,
                      enum cvlm_template t, const struct cvlm_turn *history, int n_history,
                      const char *query, int has_image, struct cvlm_prompt *out);
void cvlm_prompt_free(struct cvlm_prompt *p);

/* The rules, on any token-type sequence: position ids (returns the next position) and
 * the expert of each slot (vision iff own type and next type are VIS). */
int cvlm_position_ids(const uint8_t *types, int n, int32_t *pos);
void cvlm_expert_ids(const uint8_t *types, int n, uint8_t *expert);

#endif
