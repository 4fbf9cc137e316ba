/* vision2.h - CogVLM2's 2x2 stride-2 convolution between the ViT and the GLU adapter
 * (cogvlm-model.md §9), expressed through the existing ops as a row gather + one GEMM.
 * Internal to engine/model/ (model_rank.c).
 *
 * The ViT's patch rows (CLS dropped) form a G x G grid in raster order. Output token
 * (i, j) of the (G/2) x (G/2) grid reads the four rows (2i+ky, 2j+kx), ky, kx in {0, 1};
 * copy_rows gathers them, in (ky, kx) order, into one [4*d] row, so the gathered matrix
 * is [(G/2)^2, 4*d] and the conv is gemm with the kernel rearranged to [d, (ky, kx, c)]
 * (the checkpoint stores [d, c, ky, kx]).
 */
#ifndef CVLM_VISION2_H
#define CVLM_VISION2_H

#include "engine/model/weights.h"

#include <stdint.h>

/* rows[4*t + 2*ky + kx] = the ViT row (CLS = row 0, so patch p is row p + 1) that output
 * token t reads at kernel offset (ky, kx); G even; rows has 4 * (G/2)^2 entries. */
void cvlm_vision2_conv_rows(int G, int32_t *rows);

/* Rearranges w->conv_w [d, d, 2, 2] in place of the table into the GEMM's [d, 4*d]
 * (ky, kx, c) order, in a buffer that w owns (freed by cvlm_weights_destroy). A tensor
 * without data (lazy dummy weights) only changes shape. No-op without the conv. */
int cvlm_vision2_prepare(struct cvlm_weights *w);

#endif
