/* attention.cuh - attention ops of the CUDA backend: the ViT's full attention and the
 * cache writes and causal attention over the paged KV cache (attention.cu), with the
 * split-K decode path in attention_decode.cu.
 */
#ifndef CVLM_CUDA_ATTENTION_CUH
#define CVLM_CUDA_ATTENTION_CUH

#include "kernels/cuda/common.cuh"

void cu_attention_full(struct cvlm_backend *be, void *out, const void *qkv, int N, int n_heads,
                       int head_dim);
void cu_kv_write(struct cvlm_backend *be, struct cvlm_kv_layer *kv, const void *k, const void *v,
                 int stride, const struct cvlm_attn_batch *b, int n_heads, int head_dim);
void cu_attention_paged(struct cvlm_backend *be, void *out, const void *q, int stride,
                        const struct cvlm_kv_layer *kv, const struct cvlm_attn_batch *b,
                        int n_heads, int head_dim);

/* One attention launch's metadata in device memory (built on the host from a
 * struct cvlm_attn_batch and uploaded in one piece; see attention.cu):
 * - every token: seq[t], slot[t]; table of sequence s: tables + toff[s];
 * - tiles: runs of >= FLASH_MIN_RUN consecutive slots of one sequence, cut in pieces of
 *   up to 64 queries: {first token, count, sequence, slot of the first};
 * - decode tokens (all others): dec[i] is a token; its keys are split in parts of `part`
 *   slots, work items {i, part index}; dec_first[i] is its first work item and
 *   dec_nparts[i] the number. */
struct cu_attn_plan {
    int n, n_seqs, n_tiles, n_dec, n_work, part, block_size;
    const int4 *tiles;
    const int2 *work;
    const int32_t *seq, *slot, *toff, *tables, *dec, *dec_first, *dec_nparts;
};

/* Where the keys/values and queries of a paged launch are: out rows `width` = H * hd
 * apart, q rows q_stride apart, cache slots kv_width = (H / group) * hd apart; query head
 * h reads KV head h / group (GQA; group 1: as many KV heads as query heads). */
struct cu_attn_io {
    bf16 *out;
    const bf16 *q, *k, *v;
    int q_stride, width, H, hd;
    int kv_width, group;
};

/* Decode tokens of the plan through the split-K path; false if it cannot take this
 * head size / alignment (the caller then uses the reference kernel). attention_decode.cu */
bool cu_attention_decode(struct cuda_backend *cb, const struct cu_attn_plan *p,
                         const struct cu_attn_io *io, bool *launched);

/* Key j of a sequence whose block table is `table`: its row in the cache. */
__device__ __forceinline__ size_t cu_kv_row(const int32_t *table, int bs, int j)
{
    return (size_t)table[j / bs] * bs + (size_t)(j % bs);
}

#endif
