/* quantize.h - weights to 8 or 4 bits at load (`--quantize`), and back (tests, errors).
 *
 * Which tensors: both experts' QKV, dense, gate, up and down of every decoder layer; with
 * `vision`, also the ViT's linear layers and the GLU adapter; with `lm_head`, lm_head as
 * int8 (per output channel) at int8 and at int4 alike. Embeddings, norms, biases, boi/eoi
 * and the patch convolution keep their 16/32-bit dtype.
 * Formats (engine/backend.h): int8 symmetric per output channel (scale = max|w| / 127);
 * int4 symmetric in groups of 128 along K (codes -8..7; the scale of each group the one of
 * 16 candidates c max|w| / 7, c from 1 down to 0.625, with the least squared error), a
 * matrix whose K is not a multiple of 32 (the packed layout's block) gets int8 instead.
 * Rounding is to nearest (ties away from zero).
 */
#ifndef CVLM_QUANTIZE_H
#define CVLM_QUANTIZE_H

#include "engine/model/weights.h"

enum cvlm_quant {
    CVLM_QUANT_NONE = 0,
    CVLM_QUANT_INT8 = 1,
    CVLM_QUANT_INT4 = 2,
};

/* "none", "int8", "int4" -> *out; 0 or CVLM_EINVAL. */
int cvlm_quant_parse(const char *s, enum cvlm_quant *out);
const char *cvlm_quant_name(enum cvlm_quant q);

/* Bytes a [N, K] matrix takes as `dt` (codes + F32 scales). */
size_t cvlm_quant_bytes(enum cvlm_dtype dt, int64_t N, int64_t K);

/* Quantizes the [N, K] matrix t (data of any float dtype) into codes (cvlm_dtype_bytes of
 * N * K) and scales (N * groups floats) the caller provides, and points t at them. */
void cvlm_quantize_into(struct cvlm_tensor *t, enum cvlm_dtype dt, void *codes, float *scales);

/* Quantizes the weight table in place, tensor by tensor: each new buffer is owned by w,
 * and a tensor read from the checkpoint mapping has its pages released after (peak
 * memory: the quantized size plus one tensor). A tensor without data (lazy dummy
 * weights) gets random codes of the dummy weights' scale (std 0.02) directly, so a
 * 17B-shaped model never exists at 16 bits. 0 or CVLM_ENOMEM; CVLM_EINVAL for a GPTQ
 * checkpoint (already quantized: only `none` is accepted). */
int cvlm_weights_quantize(struct cvlm_weights *w, enum cvlm_quant q, int vision, int lm_head);

#endif
