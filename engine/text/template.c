/* template.c - prompt text, token types, position ids and expert routing (template.h). */
#include "engine/text/template.h"

#include "base/buf.h"
#include "engine/error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

char *cvlm_template_render(enum cvlm_template t, const struct cvlm_turn *history, int n_history,
                           const char *query)
{
    const char *tag = t == CVLM_TEMPLATE_VQA ? "Short answer:" : "Answer:";
    struct cvlm_buf b = {0};
    if (t == CVLM_TEMPLATE_BASE)
        return strdup(query);
    for (int i = 0; i < n_history; i++)
        cvlm_buf_printf(&b, "Question: %s %s %s\n", history[i].query, tag, history[i].response);
    cvlm_buf_printf(&b, "Question: %s %s", query, tag);
    return cvlm_buf_take(&b, NULL); /* NULL when memory ran out */
}

int cvlm_position_ids(const uint8_t *types, int n, int32_t *pos)
{
    int p = -1;
    for (int i = 0; i < n; i++) {
        int vis = types[i] == CVLM_TOKEN_VIS;
        /* the first and last slot of every VIS run count as language (boi / eoi) */
        int first = vis && (i == 0 || types[i - 1] != CVLM_TOKEN_VIS);
        int last = vis && (i == n - 1 || types[i + 1] != CVLM_TOKEN_VIS);
        int lang_like = !vis || first || last;
        /* a remaining VIS slot opens a new position only if the previous slot was not a
         * remaining VIS slot, i.e. if it directly follows the run's first slot */
        int opens = lang_like || (i > 0 && types[i - 1] == CVLM_TOKEN_VIS &&
                                  (i - 1 == 0 || types[i - 2] != CVLM_TOKEN_VIS));
        if (opens)
            p++;
        pos[i] = p < 0 ? 0 : p;
    }
    return p + 1;
}

void cvlm_expert_ids(const uint8_t *types, int n, uint8_t *expert)
{
    for (int i = 0; i < n; i++)
        expert[i] = (types[i] == CVLM_TOKEN_VIS && i + 1 < n && types[i + 1] == CVLM_TOKEN_VIS)
                        ? CVLM_EXPERT_VISION
                        : CVLM_EXPERT_LANG;
}

void cvlm_prompt_free(struct cvlm_prompt *p)
{
    free(p->ids);
    free(p->types);
    free(p->pos);
    free(p->expert);
    memset(p, 0, sizeof(*p));
}

int cvlm_prompt_build(const struct cvlm_config *cfg, const struct cvlm_tokenizer *tok,
                      enum cvlm_template t, const struct cvlm_turn *history, int n_history,
                      const char *query, int has_image, struct cvlm_prompt *out)
{
    int32_t *text_ids = NULL;
    size_t n_text = 0;
    int n_img = has_image ? cvlm_config_image_tokens(cfg) : 0, rc;
    char *text = cvlm_template_render(t, history, n_history, query);

    memset(out, 0, sizeof(*out));
    if (has_image && !cfg->has_vision)
        rc = cvlm_errf(CVLM_EINVAL, "this model has no vision tower; send text only");
    else if (!text)
        rc = cvlm_errf(CVLM_ENOMEM, "out of memory");
    else
        rc = cvlm_tokenizer_encode(tok, text, strlen(text), &text_ids, &n_text);
    free(text);
    if (rc)
        return rc;
    out->n = 1 + n_img + (int)n_text;
    out->ids = malloc((size_t)out->n * sizeof(int32_t));
    out->types = calloc((size_t)out->n, 1);
    out->pos = malloc((size_t)out->n * sizeof(int32_t));
    out->expert = malloc((size_t)out->n);
    if (!out->ids || !out->types || !out->pos || !out->expert) {
        free(text_ids);
        cvlm_prompt_free(out);
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    }
    out->ids[0] = cfg->bos_token_id;
    for (int i = 0; i < n_img; i++) {
        out->ids[1 + i] = cfg->pad_token_id;
        out->types[1 + i] = CVLM_TOKEN_VIS;
    }
    if (n_text)
        memcpy(out->ids + 1 + n_img, text_ids, n_text * sizeof(int32_t));
    free(text_ids);
    out->image_start = n_img ? 1 : -1;
    out->next_pos = cvlm_position_ids(out->types, out->n, out->pos);
    cvlm_expert_ids(out->types, out->n, out->expert);
    return 0;
}
