/* backend.h - the narrow op table between the model and the kernels, and its types.
 *
 * This and engine/error.h (error codes, cvlm_errf) are the only engine headers that
 * kernels/ may include (see the architecture page).
 * engine/model/model_rank.c is written once against struct cvlm_backend_i; kernels/cpu and
 * kernels/cuda fill it.
 *
 * Conventions shared by every op:
 * - Activations live in backend memory (cvlm_be_alloc) as dense row-major matrices of
 *   be->act_dtype (F32 on the CPU backend); model_rank.c never dereferences them, it only
 *   offsets them by whole rows (cvlm_be_row).
 * - Weights are struct cvlm_tensor views in their stored dtype (F32, F16 or BF16); ops
 *   widen them on the fly and accumulate in F32.
 * - Small per-token metadata (ids, positions, slots, block tables) is passed as host
 *   arrays; a device backend uploads them itself.
 * - Ops run in issue order on the backend's stream; to_host() waits for completion.
 * - Row counts (M, n, N of attention_full, n_tokens) may be 0: the op does nothing.
 *   Widths, head counts and head sizes are > 0; a row stride is >= its row width.
 * - Alignment: activations and weights are aligned to their element size (whole-row
 *   offsets keep it); a kernel with wider loads tests the pointers and falls back.
 * - Aliasing: an output shares no memory with an input, except where the op below says
 *   "may be": then it is that input exactly (same pointer, same rows), element for element.
 * engine/model/backend_check.h wraps any backend's table in checks of all of this
 * (debug and sanitized builds), so a violation fails the step with a message naming the
 * op instead of corrupting memory.
 */
#ifndef CVLM_BACKEND_H
#define CVLM_BACKEND_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define CVLM_MAX_DIMS 4

enum cvlm_dtype {
    CVLM_DTYPE_F32 = 0,
    CVLM_DTYPE_F16 = 1,
    CVLM_DTYPE_BF16 = 2,
    /* Quantized matrices [N, K] (engine/model/quantize.c makes them; weights of gemm only).
     * Value = q * scales[n * (K / group) + k / group] with the group along K:
     * Q8: q int8, one group per row (per output channel, symmetric);
     * Q4: q = nibble - 8 in [-8, 7], groups of CVLM_Q4_GROUP (the last one of a row may be
     *     shorter), K a multiple of 32; every 32 weights are 16 bytes, byte j holding weight
     *     j in its low and j + 16 in its high nibble (a vector unpacks 32 weights with one
     *     mask and one shift). Scales: [N][ceil(K / group)]. */
    CVLM_DTYPE_Q8 = 3,
    CVLM_DTYPE_Q4 = 4,
    /* Checkpoint storage only (GPTQ's packed codes and g_idx, engine/model/gptq.c): never
     * the weight of an op (the op-table checks refuse it). */
    CVLM_DTYPE_I32 = 5,
};

#define CVLM_Q4_GROUP 128

/* What upload_weights puts into a tensor that has no data yet (dummy weights generated
 * in backend memory, so a 35 GB configuration can be benchmarked without a checkpoint). */
enum cvlm_fill {
    CVLM_FILL_NONE = 0,   /* data is set: copy it */
    CVLM_FILL_RANDOM = 1, /* uniform, standard deviation 0.02 (a fresh init's scale) */
    CVLM_FILL_ONES = 2,   /* norm weights */
    CVLM_FILL_ZEROS = 3,  /* biases */
};

/* A non-owning view of a dense row-major tensor (e.g. into a mmap'd checkpoint). */
struct cvlm_tensor {
    enum cvlm_dtype dtype;
    int ndim;
    int64_t shape[CVLM_MAX_DIMS];
    const void *data;
    enum cvlm_fill fill; /* only when data == NULL, for upload_weights */
    const float *scales; /* Q8 / Q4 only: [N][ceil(K / group)] */
    /* Q4 only, optional (GPTQ sym=false): value = q * scale + mins[same index]. */
    const float *mins;
    /* Q8 / Q4 only, optional (GPTQ desc_act): stored column k multiplies x[perm[k]];
     * perm is a permutation of 0..K-1. NULL: the identity. */
    const int32_t *perm;
};

static inline int cvlm_dtype_is_quant(enum cvlm_dtype t)
{
    return t == CVLM_DTYPE_Q8 || t == CVLM_DTYPE_Q4;
}

/* Bytes of one element (1 for Q8; Q4 has none: use cvlm_dtype_bytes). */
static inline size_t cvlm_dtype_size(enum cvlm_dtype t)
{
    return t == CVLM_DTYPE_F32 || t == CVLM_DTYPE_I32 ? 4
           : t == CVLM_DTYPE_Q8 || t == CVLM_DTYPE_Q4 ? 1
                                                      : 2;
}

/* Bytes of n consecutive elements of a row (n even for Q4). */
static inline size_t cvlm_dtype_bytes(enum cvlm_dtype t, size_t n)
{
    return t == CVLM_DTYPE_Q4 ? n / 2 : n * cvlm_dtype_size(t);
}

static inline const char *cvlm_dtype_name(enum cvlm_dtype t)
{
    return t == CVLM_DTYPE_F32    ? "F32"
           : t == CVLM_DTYPE_F16  ? "F16"
           : t == CVLM_DTYPE_BF16 ? "BF16"
           : t == CVLM_DTYPE_Q8   ? "Q8"
           : t == CVLM_DTYPE_Q4   ? "Q4"
                                  : "I32";
}

/* Elements per scale along a quantized matrix's rows (K for Q8). */
static inline int64_t cvlm_quant_group(const struct cvlm_tensor *t)
{
    return t->dtype == CVLM_DTYPE_Q4 ? CVLM_Q4_GROUP : t->shape[t->ndim - 1];
}

/* Scales per row of a quantized matrix. */
static inline int64_t cvlm_quant_groups(const struct cvlm_tensor *t)
{
    int64_t g = cvlm_quant_group(t);
    return (t->shape[t->ndim - 1] + g - 1) / g;
}

/* Bytes of a tensor's data (quantized: the codes, not the scales). */
static inline size_t cvlm_tensor_bytes(const struct cvlm_tensor *t)
{
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++)
        n *= t->shape[i];
    return cvlm_dtype_bytes(t->dtype, (size_t)n);
}

static inline int64_t cvlm_tensor_numel(const struct cvlm_tensor *t)
{
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++)
        n *= t->shape[i];
    return n;
}

static inline float cvlm_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round-to-nearest-even, as torch's .to(torch.bfloat16); NaN stays NaN. */
static inline uint16_t cvlm_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float cvlm_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t u;
    float f;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13); /* inf / nan */
    } else if (exp != 0) {
        u = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        u = sign; /* signed zero */
    } else {
        /* subnormal half: value = man * 2^-24, exact in float */
        f = (float)man * (1.0f / 16777216.0f);
        return sign ? -f : f;
    }
    memcpy(&f, &u, 4);
    return f;
}

/* Round-to-nearest-even to IEEE half (as F16C's vcvtps2ph with rounding mode 0 and torch's
 * .to(torch.float16)): overflow gives inf, tiny values subnormals or zero; NaN stays NaN. */
static inline uint16_t cvlm_f32_to_f16(float f)
{
    uint32_t u, sign, a;
    memcpy(&u, &f, 4);
    sign = (u >> 16) & 0x8000u;
    a = u & 0x7fffffffu;
    if (a > 0x7f800000u) /* NaN: quiet, keep the top payload bits */
        return (uint16_t)(sign | 0x7e00u | (a >> 13));
    if (a >= 0x477ff000u) /* rounds to >= 65520: inf */
        return (uint16_t)(sign | 0x7c00u);
    if (a < 0x38800000u) { /* below 2^-14: a subnormal half, man * 2^-24 */
        float m;
        memcpy(&m, &a, 4);
        /* adding 0.5 lands the value's 2^-24 units in the low mantissa bits, rounded by the
         * FPU to nearest even */
        m += 0.5f;
        memcpy(&a, &m, 4);
        return (uint16_t)(sign | (a - 0x3f000000u));
    }
    a += 0xfffu + ((a >> 13) & 1u) - (112u << 23); /* rebias 127 -> 15, round the 13 bits */
    return (uint16_t)(sign | (a >> 13));
}

/* q * scale of stored element i of a quantized matrix, without its group offset (mins). */
static inline float cvlm_quant_get_scaled(const struct cvlm_tensor *t, int64_t i)
{
    int64_t K = t->shape[t->ndim - 1], n = i / K, k = i % K, g = cvlm_quant_group(t);
    const signed char *q = (const signed char *)t->data;
    float s = t->scales[n * cvlm_quant_groups(t) + k / g];
    if (t->dtype == CVLM_DTYPE_Q8)
        return (float)q[i] * s;
    /* Q4: the 16-byte block of weight k in row n, its low or high nibble */
    unsigned char b = ((const unsigned char *)q)[n * (K / 2) + k / 32 * 16 + k % 16];
    return (float)((k % 32 < 16 ? b & 15 : b >> 4) - 8) * s;
}

/* Element i of a tensor of any supported dtype, widened to float. Quantized: q * scale
 * (+ mins), element i of the stored order (with perm, stored column k multiplies x[perm[k]]). */
static inline float cvlm_tensor_get_f32(const struct cvlm_tensor *t, int64_t i)
{
    if (cvlm_dtype_is_quant(t->dtype)) {
        int64_t K = t->shape[t->ndim - 1], g = cvlm_quant_group(t);
        float v = cvlm_quant_get_scaled(t, i);
        return t->mins ? v + t->mins[i / K * cvlm_quant_groups(t) + i % K / g] : v;
    }
    const unsigned char *p = (const unsigned char *)t->data + (size_t)i * cvlm_dtype_size(t->dtype);
    uint16_t h;
    float f;
    if (t->dtype == CVLM_DTYPE_F32) {
        memcpy(&f, p, 4);
        return f;
    }
    memcpy(&h, p, 2);
    return t->dtype == CVLM_DTYPE_F16 ? cvlm_f16_to_f32(h) : cvlm_bf16_to_f32(h);
}

/* ---- the op table ------------------------------------------------------------------- */

struct cvlm_backend;

/* A paged KV cache for one layer: `n_blocks` blocks of `block_size` token slots, each slot
 * holding n_heads * head_dim keys (after RoPE) and as many values, in `dtype` (F32, F16,
 * BF16 or Q8; elements of that size, so a 16-bit cache holds twice the slots in the same
 * bytes). kv_write converts the act_dtype rows to it, rounding to nearest even
 * (cvlm_f32_to_bf16; F16 as F16C's vcvtps2ph); attention_paged widens the stored keys and
 * values to F32 in registers (or while packing them) and accumulates in F32, so an F32
 * cache computes exactly as before and a 16-bit one as if K and V had been rounded once on
 * write.
 * Q8 (int8): each (slot, head) of K and of V is quantized on write, symmetrically, with its
 * own F32 scale: scale = max |x| / 127 over the head's head_dim values, code = x / scale
 * rounded to nearest even (all codes 0 when the head is all zero); the value read is code *
 * scale. `scales` holds them, [n_blocks, block_size, 2, n_heads] F32 (a slot's K scales,
 * then its V scales); k and v hold the int8 codes. Other dtypes leave `scales` NULL.
 * A backend may lack a dtype: the CPU one has all four, the CUDA one only BF16 (its
 * activation dtype); an op given a cache it lacks records an error (CUDA: CVLM_ESHAPE)
 * that status() reports, and computes nothing. */
struct cvlm_kv_layer {
    void *k, *v; /* [n_blocks, block_size, n_heads, head_dim] */
    enum cvlm_dtype dtype;
    float *scales; /* Q8 only: [n_blocks, block_size, 2, n_heads]; else NULL */
};

/* Where the keys and values of one sequence live: block_table[i] is the physical block of
 * the sequence's slots [i*block_size, (i+1)*block_size). */
struct cvlm_seq_kv {
    const int32_t *block_table;
    int n_blocks;
};

/* One attention launch over paged KV: token t (a row of q/out) belongs to sequence
 * seq[t] and sits in slot slot[t]; it attends causally to that sequence's slots
 * 0..slot[t] (the current batch's keys were written with kv_write before).
 * Grouped-query attention: the cache holds n_kv_heads heads per slot (kv_write is called
 * with that many), attention_paged's n_heads query heads share them, query head h reading
 * KV head h / (n_heads / n_kv_heads); 0 means n_heads (one KV head per query head). */
struct cvlm_attn_batch {
    int n_tokens;
    const int32_t *seq;  /* [n_tokens] index into seqs */
    const int32_t *slot; /* [n_tokens] */
    const struct cvlm_seq_kv *seqs;
    int block_size;
    int n_kv_heads; /* attention_paged: KV heads in the cache (divides n_heads); 0: n_heads */
};

struct cvlm_backend_i {
    const char *name;
    /* memory */
    void *(*alloc)(struct cvlm_backend *be, size_t bytes);
    void (*free)(struct cvlm_backend *be, void *p);
    void (*to_host)(struct cvlm_backend *be, float *dst, const void *src, size_t n);
    void (*from_host)(struct cvlm_backend *be, void *dst, const float *src, size_t n);
    void (*copy_rows)(struct cvlm_backend *be, void *dst, const void *src, const int32_t *rows,
                      int n, int width); /* dst[i] = src[rows[i]] */

    /* y[M,N] = x[M,K] . W[N,K]^T (+ bias[N]); x rows x_stride elements apart */
    void (*gemm)(struct cvlm_backend *be, void *y, const void *x, int x_stride,
                 const struct cvlm_tensor *w, const struct cvlm_tensor *bias, int M, int N, int K);
    /* out[i] = table[ids[i]] */
    void (*embed)(struct cvlm_backend *be, void *out, const struct cvlm_tensor *table,
                  const int32_t *ids, int M, int D);
    /* y = x / sqrt(mean(x^2) + eps) * w; w [D]; y may be x */
    void (*rmsnorm)(struct cvlm_backend *be, void *y, const void *x, const struct cvlm_tensor *w,
                    int M, int D, float eps);
    /* y = (x - mean) / sqrt(var + eps) * w + b; w, b [D] (b may be NULL); y may be x */
    void (*layernorm)(struct cvlm_backend *be, void *y, const void *x, const struct cvlm_tensor *w,
                      const struct cvlm_tensor *b, int M, int D, float eps);
    void (*add)(struct cvlm_backend *be, void *y, const void *x, size_t n); /* y += x; y may be x */
    /* The residual step between sub-layers in one pass: x[M,D] += r, then
     * y = x / sqrt(mean(x^2) + eps) * w. y may be r or x. Optional (NULL: the model calls add
     * and rmsnorm); the same arithmetic as those two, so results do not change. */
    void (*add_rmsnorm)(struct cvlm_backend *be, void *y, void *x, const void *r,
                        const struct cvlm_tensor *w, int M, int D, float eps);
    /* y[i] = x[i] + broadcast row b (ViT pos/bias helpers): y[M,D] += b[D] per row */
    void (*add_row)(struct cvlm_backend *be, void *y, const struct cvlm_tensor *b, int M, int D);
    void (*gelu)(struct cvlm_backend *be, void *x, size_t n); /* exact erf GELU, in place */
    /* out[M,N] = silu(gate) * up; gate/up rows g_stride apart (a fused [gate|up] works);
     * out may be gate or up when g_stride == N */
    void (*silu_mul)(struct cvlm_backend *be, void *out, const void *gate, const void *up,
                     int g_stride, int M, int N);
    /* Rotate-half RoPE in place on n_heads heads of each row (row stride `stride`),
     * angle = pos[i] * inv_freq[j] computed in F32. */
    void (*rope)(struct cvlm_backend *be, void *x, int stride, const int32_t *pos, int M,
                 int n_heads, int head_dim, const float *inv_freq);
    /* Bidirectional attention of one sequence of N tokens (ViT): qkv [N, 3*H*hd] laid out
     * [q heads | k heads | v heads]; out [N, H*hd]. */
    void (*attention_full)(struct cvlm_backend *be, void *out, const void *qkv, int N, int n_heads,
                           int head_dim);
    /* Stores rows of k and v (row stride `stride`) into their slots. */
    void (*kv_write)(struct cvlm_backend *be, struct cvlm_kv_layer *kv, const void *k,
                     const void *v, int stride, const struct cvlm_attn_batch *b, int n_heads,
                     int head_dim);
    /* Causal attention over the paged cache; q rows `stride` apart; out [M, H*hd]. */
    void (*attention_paged)(struct cvlm_backend *be, void *out, const void *q, int stride,
                            const struct cvlm_kv_layer *kv, const struct cvlm_attn_batch *b,
                            int n_heads, int head_dim);
    /* Patchify a CHW image into rows of C*P*P values ordered (c, ky, kx), raster patch
     * order: out [(H/P)*(W/P), C*P*P]. `pixels` is a host array. */
    void (*patchify)(struct cvlm_backend *be, void *out, const float *pixels, int C, int H, int W,
                     int P);
    /* Moves weight tensors into backend memory (one allocation for the set, owned by the
     * backend until destroy) and points each tensor's data there. Tensors with data NULL
     * are generated by their `fill` (RANDOM from `seed`, deterministic per tensor index).
     * The CPU backend leaves tensors with data where they are (the mmap is its memory) and
     * fills the others in host memory. Returns 0 or a negative CVLM_E* code. */
    int (*upload_weights)(struct cvlm_backend *be, struct cvlm_tensor *const *ts, int n,
                          uint64_t seed);
    /* Waits for the queued work; returns 0, or the first error any op met since the
     * backend was created (sticky: ops return void, a device backend records a failed
     * launch and reports it here and from upload_weights), with cvlm_errf's message. */
    int (*status)(struct cvlm_backend *be);
    void (*destroy)(struct cvlm_backend *be);
};

struct cvlm_backend {
    const struct cvlm_backend_i *ops;
    enum cvlm_dtype act_dtype;
    int n_threads;
};

/* Offsets an activation pointer by `rows` rows of `width` elements. */
static inline void *cvlm_be_row(const struct cvlm_backend *be, const void *p, size_t rows,
                                size_t width)
{
    return (char *)p + rows * width * cvlm_dtype_size(be->act_dtype);
}

/* Backends: the CPU one always exists; n_threads 0 = one per online core. */
struct cvlm_backend *cvlm_backend_cpu_create(int n_threads);
/* The CPU backend's instruction-set path: "scalar", "avx2", "avx512" or "avx512bf16", the
 * best the CPU supports, lowered by COGVLM_CPU_ISA. */
const char *cvlm_backend_cpu_isa(void);
/* GFLOP/s of a register-only FMA loop on that path with n_threads threads (best of 3,
 * about 0.5 s): the peak `cogvlm bench` states the GEMM's efficiency against. */
double cvlm_backend_cpu_fma_peak(int n_threads);
/* The CUDA backend on `device` (BF16 activations, F32 accumulation). A build without CUDA
 * links a stub that returns NULL with the error "not built with CUDA" (cvlm_last_error). */
struct cvlm_backend *cvlm_backend_cuda_create(int device);

#endif
