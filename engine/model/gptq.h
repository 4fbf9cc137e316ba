/* gptq.h - GPTQ int4 checkpoints (config.json quantization_config, quant_method "gptq")
 * bound as Q4 matrices of engine/backend.h, exactly.
 *
 * A quantized Linear X of a GPTQ checkpoint stores, instead of X.weight [N, K]:
 *   X.qweight I32 [K/8, N]   8 4-bit codes along K per int32, code k%8 in bits 4(k%8)..+3
 *   X.qzeros  I32 [G, N/8]   the zero points, packed the same way along N
 *   X.scales  F16 [G, N]     (F32 / BF16 accepted too: widening is exact)
 *   X.g_idx   I32 [K]        the group of input row k (optional: k / group_size)
 * with W[n][k] = scale[g][n] * (q[k][n] - z[g][n]), g = g_idx[k]; checkpoint_format "gptq"
 * (v1, the default) stores z - 1, "gptq_v2" z itself. Mapping into Q4 (docs/MODEL.md):
 * codes q - 8 (the same nibbles), scales widened, mins[n][g] = scale * (8 - z) where some
 * z != 8 (else NULL), and for a g_idx other than k / group_size the input rows sorted
 * stably by group into perm (each group must then hold exactly its group's rows). Every
 * value is exact in F32: scale * (q - 8) and scale * (8 - z) are exact products of an
 * 11-bit mantissa and a 5-bit integer, and so is their sum.
 *
 * Ownership: the converted buffers are appended to w->owned (freed with the weights).
 */
#ifndef CVLM_GPTQ_H
#define CVLM_GPTQ_H

#include "engine/model/weights.h"

#include <jansson.h>

/* Reads root's quantization_config (absent or not GPTQ: g->enabled 0). Refuses what the
 * loader cannot represent exactly: bits other than 4, group_size other than 128 or -1, an
 * unknown checkpoint_format. */
int cvlm_gptq_parse_config(json_t *root, struct cvlm_gptq_config *g);

/* 1 if `name` is a GPTQ part (ends in .qweight, .qzeros, .scales or .g_idx). */
int cvlm_gptq_is_part(const char *name);

/* Binds `base`.qweight etc. of st as the Q4 matrix [N, K] *slot, marking the tensors used
 * in claimed[] (indexed like st->tensors). 0, or an error naming the tensor. */
int cvlm_gptq_bind(struct cvlm_weights *w, const struct cvlm_safetensors *st, const char *base,
                   int64_t N, int64_t K, struct cvlm_tensor *slot, unsigned char *claimed);

#endif
