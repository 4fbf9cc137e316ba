/* vision2.c - CogVLM2's 2x2 stride-2 conv as a gather + GEMM (vision2.h). */
#include "engine/model/vision2.h"

#include "engine/error.h"

#include <stdlib.h>
#include <string.h>

void cvlm_vision2_conv_rows(int G, int32_t *rows)
{
    int g = G / 2;
    for (int i = 0; i < g; i++)
        for (int j = 0; j < g; j++)
            for (int ky = 0; ky < 2; ky++)
                for (int kx = 0; kx < 2; kx++)
                    rows[4 * (i * g + j) + 2 * ky + kx] = 1 + (2 * i + ky) * G + (2 * j + kx);
}

int cvlm_vision2_prepare(struct cvlm_weights *w)
{
    struct cvlm_tensor *t = &w->conv_w;
    if (!cvlm_config_has_conv(&w->cfg) || t->ndim != 4)
        return 0; /* no conv, or already rearranged */
    int64_t d_out = t->shape[0], d_in = t->shape[1];
    if (t->shape[2] != 2 || t->shape[3] != 2 || cvlm_dtype_is_quant(t->dtype))
        return cvlm_errf(CVLM_ESHAPE, "model.vision.conv.weight: a 2x2 %s kernel expected",
                         cvlm_dtype_name(t->dtype));
    if (t->data) {
        size_t es = cvlm_dtype_size(t->dtype), n = (size_t)(d_out * d_in * 4);
        unsigned char *dst = cvlm_weights_own(w, n * es);
        const unsigned char *src = t->data;
        if (!dst)
            return cvlm_errf(CVLM_ENOMEM, "out of memory rearranging the conv kernel");
        /* dst[o][k * d_in + c] = src[o][c][k], k = 2*ky + kx */
        for (int64_t oc = 0; oc < d_out; oc++)
            for (int64_t c = 0; c < d_in; c++)
                for (int k = 0; k < 4; k++)
                    memcpy(dst + (size_t)((oc * 4 + k) * d_in + c) * es,
                           src + (size_t)((oc * d_in + c) * 4 + k) * es, es);
        t->data = dst;
    }
    t->ndim = 2;
    t->shape[1] = 4 * d_in;
    t->shape[2] = t->shape[3] = 0;
    return 0;
}
