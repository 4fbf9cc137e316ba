/* cpu.h - internals shared by the CPU backend's files (not for engine/ use).
 *
 * The CPU backend computes activations in F32. Weights of any stored dtype are widened
 * to F32 inside the kernels (registers, or per-thread packed panels); F16/BF16 are never
 * expanded in place, so a BF16 checkpoint keeps its 2-byte footprint.
 *
 * Instruction sets: the library is compiled for baseline x86-64 (or any other target);
 * AVX2 and AVX-512 kernels are functions with __attribute__((target)) in their own files
 * and are only called when the CPU reports the features at backend creation. The
 * environment variable COGVLM_CPU_ISA=scalar|avx2|avx512|avx512bf16 forces a lower path
 * (tests use it to cover every path the machine supports).
 */
#ifndef CVLM_CPU_H
#define CVLM_CPU_H

#include "engine/backend.h"
#include "kernels/cpu/pool.h"

/* Ordered: each level includes the ones below it. AVX512BF16 adds vdpbf16ps (used for
 * the BF16-weight matrix-vector kernel). */
enum cpu_isa {
    CPU_ISA_SCALAR = 0,
    CPU_ISA_AVX2 = 1,
    CPU_ISA_AVX512 = 2,
    CPU_ISA_AVX512BF16 = 3,
};

struct cpu_backend {
    struct cvlm_backend base;
    struct cvlm_pool *pool;
    enum cpu_isa isa;              /* the path in use: the best supported, or a lower forced one */
    int has_avx2;                  /* isa >= AVX2: AVX2 + FMA + F16C */
    int has_avx512;                /* isa >= AVX512: AVX-512 F/BW/VL/DQ (+ the AVX2 set) */
    int has_vnni;                  /* has_avx512 and AVX512_VNNI (the int8-x kernels' vpdpbusd) */
    const struct cpu_vec_ops *vec; /* element-wise and attention helpers for `isa` */
    float *scratch;                /* grows on demand; ops run one at a time */
    size_t scratch_cap;
    void *weights; /* generated weights (upload_weights fills), or NULL */
};

/* The ISA the CPU supports, lowered to `COGVLM_CPU_ISA` when that names a lower path. */
enum cpu_isa cvlm_cpu_detect_isa(void);
const char *cvlm_cpu_isa_name(enum cpu_isa isa);

/* Per-call scratch of at least n floats (64-byte aligned), owned by the backend; NULL if
 * out of memory. One op at a time uses it; its contents do not survive the op. */
float *cvlm_cpu_scratch(struct cpu_backend *cb, size_t n);

static inline struct cpu_backend *cpu_of(struct cvlm_backend *be)
{
    return (struct cpu_backend *)be;
}

/* Widens n elements of row `row` of a 2-D weight (or a 1-D vector, row 0) to F32. */
void cvlm_cpu_widen(const struct cvlm_tensor *w, int64_t row, int64_t n, float *out);

/* ---- GEMM building blocks (gemm.c drives them; one set per ISA) ----------------------- */

#define GEMM_MR 12  /* rows of x per micro-tile */
#define GEMM_NR 32  /* rows of W (output columns) per micro-tile */
#define GEMV_MMAX 4 /* rows of x one matrix-vector pass serves (scalar, AVX-512) */
/* AVX2: the matrix-vector kernel takes any number of rows (register blocks of 6 rows
 * against each W row pair, the pair read from memory once) and beats packing W up to about
 * this many rows (measured on Zen 3: see docs/PERFORMANCE.md) */
#ifndef CVLM_CPU_AVX2_GEMV_MAX_M
#define CVLM_CPU_AVX2_GEMV_MAX_M 32
#endif
/* k slice: a packed NR panel is KC * NR * 4 = 64 KiB (L2), an x micro-panel 24 KiB (L1);
 * 512 measured a few % faster than 256 on Zen 5 (fewer passes over y) */
#ifndef GEMM_KC
#define GEMM_KC 512
#endif

/* y[m][n] = sum_k x[m][k] * W[n][k] for m < M (<= the kernels' gemv_rows), n in [n0, n1):
 * every W row is streamed once and widened in registers. y rows are ldy apart. */
typedef void (*cpu_gemv_fn)(float *y, int ldy, const float *x, int ldx, int M,
                            const struct cvlm_tensor *w, int n0, int n1, int K);
/* BF16 weights on AVX512_BF16 CPUs: x is first split once per call into two BF16 terms,
 * x = hi + lo + r with |r| <= 2^-17 |x| (hi = bf16(x), lo = bf16(x - hi)), stored as
 * xs[m][2][Kp] (Kp = K rounded up to 32, zero padded); the kernel then runs two vdpbf16ps
 * per 32 weights (each product exact, F32 accumulation). This reads 64 bytes of W per
 * three instructions, which is what lets one core approach the memory bandwidth. */
#define GEMV_KPAD(K) (((K) + 31) / 32 * 32)
void cvlm_cpu_split_bf16_avx512(uint16_t *xs, const float *x, int ldx, int M, int K);
void cvlm_cpu_gemv_bf16x2_avx512(float *y, int ldy, const uint16_t *xs, int M,
                                 const struct cvlm_tensor *w, int n0, int n1, int K);

/* Bp[k][c] = W[n0 + c][k0 + k] (F32) for k < kc, c < GEMM_NR; rows n0 + c >= N are 0. */
typedef void (*cpu_pack_b_fn)(float *bp, const struct cvlm_tensor *w, int n0, int N, int k0, int kc,
                              int K);
/* C[i][j] (+)= sum_k ap[k][i] * bp[k][j] for i < mr, j < nr (a GEMM_MR x GEMM_NR tile);
 * `acc` 0 stores, 1 adds to C. */
typedef void (*cpu_tile_fn)(const float *ap, const float *bp, int kc, float *c, int ldc, int mr,
                            int nr, int acc);

struct cpu_gemm_kernels {
    cpu_gemv_fn gemv;
    cpu_pack_b_fn pack_b;
    cpu_tile_fn tile;
    int gemv_rows;  /* rows of x one gemv call takes (GEMV_MMAX, or any M up to gemv_max_m) */
    int gemv_max_m; /* the driver uses gemv up to this many rows, the packed GEMM above */
};

/* The GEMM kernels of an ISA (also used by the blocked attention). */
struct cpu_gemm_kernels cvlm_cpu_gemm_kernels(enum cpu_isa isa);

void cvlm_cpu_gemv_scalar(float *y, int ldy, const float *x, int ldx, int M,
                          const struct cvlm_tensor *w, int n0, int n1, int K);
void cvlm_cpu_pack_b_scalar(float *bp, const struct cvlm_tensor *w, int n0, int N, int k0, int kc,
                            int K);
void cvlm_cpu_tile_scalar(const float *ap, const float *bp, int kc, float *c, int ldc, int mr,
                          int nr, int acc);
#if defined(__x86_64__)
void cvlm_cpu_gemv_avx2(float *y, int ldy, const float *x, int ldx, int M,
                        const struct cvlm_tensor *w, int n0, int n1, int K);
void cvlm_cpu_pack_b_avx2(float *bp, const struct cvlm_tensor *w, int n0, int N, int k0, int kc,
                          int K);
void cvlm_cpu_tile_avx2(const float *ap, const float *bp, int kc, float *c, int ldc, int mr, int nr,
                        int acc);
/* Quantized weights (Q8 / Q4; gemm_q_avx2.c): any M, like the AVX2 float kernel. */
void cvlm_cpu_gemv_q_avx2(float *y, int ldy, const float *x, int ldx, int M,
                          const struct cvlm_tensor *w, int n0, int n1, int K);
void cvlm_cpu_pack_b_q_avx2(float *bp, const struct cvlm_tensor *w, int n0, int N, int k0, int kc,
                            int K);
/* Quantized weights against at most CVLM_CPU_QDOT_MAX_M rows of x (decode;
 * q_dot_avx2.c): x is first rounded once per call to int8 into qx
 * (cvlm_cpu_qx_floats(M, K) floats, 64-byte aligned; the layout depends on w's dtype), with
 * one scale per block of 32 (Q8) or per group of CVLM_QX_GROUP elements (Q4: the whole
 * blocks of [g * 128, (g + 1) * 128)); then the kernel runs integer dot products: y[m][n]
 * for m < M, n in [n0, n1). x itself is read only for a Q8 tail (K % 32). Each product may
 * be off by |w| d / 2, d = max |x| / 127 over x's block or group. gemm.c uses it up to
 * CVLM_CPU_QDOT_USE_M rows: one (a decode step of one sequence); 2..8 rows (batched
 * decode, but also short prefill chunks and the vision-expert subsets of a prompt, which
 * tests compare with F32 models at 1e-5) stay on the float kernel until that trade is
 * decided (the kernel is tested at every M). */
#define CVLM_QX_GROUP 128
#define CVLM_CPU_QDOT_MAX_M 8
#define CVLM_CPU_QDOT_USE_M 1
size_t cvlm_cpu_qx_floats(int M, int K);
/* y of a Q8 row from its integer kernel's sum over the whole blocks (acc): the tail of K %
 * 32 weights from [k0, K) in float from x itself, then the row scale s. */
static inline float cvlm_cpu_q8_finish(float acc, const float *x, const signed char *w, int k0,
                                       int K, float s)
{
    for (int k = k0; k < K; k++)
        acc += x[k] * (float)w[k];
    return acc * s;
}
void cvlm_cpu_quant_x_avx2(float *qx, const float *x, int ldx, int M, int K, enum cvlm_dtype dt);
/* The scales of the Q4 row whose codes start at `codes` (inside w->data; rows of K / 2
 * bytes): the kernels prefetch the next tile's scales from its codes' address. */
static inline const char *cvlm_cpu_q4_scales_at(const struct cvlm_tensor *w, const char *codes,
                                                int K)
{
    size_t row = (size_t)(codes - (const char *)w->data) / (size_t)(K / 2);
    return (const char *)(w->scales + row * (size_t)cvlm_quant_groups(w));
}
/* Q4 weights against any M rows of x (prefill, the vision tower; q_dot_avx2.c): x rounded
 * as above (qx of M rows), y[m][n] for m < M, n in [n0, n1), in tiles of 2 x rows by 2 W
 * rows (the pair of x rows stays in L1 while the W rows stream from L2). gemm.c uses it for
 * M > CVLM_CPU_AVX2_GEMV_MAX_M. */
void cvlm_cpu_gemm_q4dot_avx2(float *y, int ldy, const float *qx, int M,
                              const struct cvlm_tensor *w, int n0, int n1, int K);
/* The same on AVX-512 VNNI (q_dot_avx512.c: a group of a W row per 512-bit load, two
 * vpdpbusd per group and (W row, x row), tiles of 4 x 4); gemm.c uses it where the backend
 * has VNNI. Verified under emulation (tests/emu) and natively on VNNI CPUs by the op tests. */
void cvlm_cpu_gemm_q4dot_avx512vnni(float *y, int ldy, const float *qx, int M,
                                    const struct cvlm_tensor *w, int n0, int n1, int K);
void cvlm_cpu_gemv_qdot_avx2(float *y, int ldy, const float *qx, const float *x, int ldx, int M,
                             const struct cvlm_tensor *w, int n0, int n1, int K);
/* The decode kernel on AVX-512 VNNI (q_dot_avx512.c), the same contract and results up to
 * the order of float sums; gemm.c uses it where the backend has VNNI. */
void cvlm_cpu_gemv_qdot_avx512vnni(float *y, int ldy, const float *qx, const float *x, int ldx,
                                   int M, const struct cvlm_tensor *w, int n0, int n1, int K);
/* Q8 weights against any M rows of x (prefill) on AVX-512 VNNI (q_dot_avx512.c): x rounded
 * per block of 32 as for decode (qx of M rows; x itself read for a tail of K % 32), y[m][n]
 * for m < M, n in [n0, n1). gemm.c uses it for M > CVLM_CPU_AVX2_GEMV_MAX_M where the
 * backend has VNNI; without VNNI, int8 prefill runs the float GEMM on dequantized panels. */
void cvlm_cpu_gemm_q8dot_avx512vnni(float *y, int ldy, const float *qx, const float *x, int ldx,
                                    int M, const struct cvlm_tensor *w, int n0, int n1, int K);
void cvlm_cpu_gemv_avx512(float *y, int ldy, const float *x, int ldx, int M,
                          const struct cvlm_tensor *w, int n0, int n1, int K);
void cvlm_cpu_pack_b_avx512(float *bp, const struct cvlm_tensor *w, int n0, int N, int k0, int kc,
                            int K);
void cvlm_cpu_tile_avx512(const float *ap, const float *bp, int kc, float *c, int ldc, int mr,
                          int nr, int acc);
#endif

/* The body of a cvlm_cpu_gemv_<isa>: calls the file's own always-inlined
 * range(y, ldy, x, ldx, M, w, dtype, n0, n1, K) with M (1..4) and the weight dtype as
 * literal constants, so each of the 12 combinations compiles to its own loop. */
#define CVLM_CPU_GEMV_M(range, DT)                                    \
    switch (M) {                                                      \
    case 1: range(y, ldy, x, ldx, 1, w->data, DT, n0, n1, K); break;  \
    case 2: range(y, ldy, x, ldx, 2, w->data, DT, n0, n1, K); break;  \
    case 3: range(y, ldy, x, ldx, 3, w->data, DT, n0, n1, K); break;  \
    default: range(y, ldy, x, ldx, 4, w->data, DT, n0, n1, K); break; \
    }
#define CVLM_CPU_GEMV_DISPATCH(range)               \
    do {                                            \
        if (w->dtype == CVLM_DTYPE_BF16)            \
            CVLM_CPU_GEMV_M(range, CVLM_DTYPE_BF16) \
        else if (w->dtype == CVLM_DTYPE_F16)        \
            CVLM_CPU_GEMV_M(range, CVLM_DTYPE_F16)  \
        else                                        \
            CVLM_CPU_GEMV_M(range, CVLM_DTYPE_F32)  \
    } while (0)

/* ---- vector math and attention helpers (vec_*.c; one set per ISA) ------------------- */

struct cpu_vec_ops {
    /* x[i] = 0.5 x (1 + erf(x / sqrt 2)) in place */
    void (*gelu)(float *x, size_t n);
    /* o[i] = g[i] / (1 + exp(-g[i])) * u[i] (o may alias g) */
    void (*silu_mul)(float *o, const float *g, const float *u, int n);
    /* p[j] = exp(p[j] - mx); returns the sum of the new p */
    float (*exp_sum)(float *p, int n, float mx);
    /* s[j] = scale * dot(q, k + j * ldk) over hd elements, for j < n */
    void (*scores)(float *s, const float *q, const float *k, int ldk, int n, int hd, float scale);
    /* o[d] += sum_j p[j] * v[j * ldv + d] for d < hd, j < n */
    void (*pv)(float *o, const float *p, const float *v, int ldv, int n, int hd);
    /* y[i] += x[i] */
    void (*add)(float *y, const float *x, size_t n);
    /* dst[c * ldd + r] = src[r * lds + c] for r < rows (<= 16), c < cols */
    void (*transpose)(float *dst, int ldd, const float *src, int lds, int rows, int cols);
    /* scores and pv over a 16-bit KV cache (dt F16 or BF16): k / v widened in registers,
     * the same F32 arithmetic as scores / pv on the widened values */
    void (*scores16)(float *s, const float *q, const uint16_t *k, int ldk, int n, int hd,
                     float scale, enum cvlm_dtype dt);
    void (*pv16)(float *o, const float *p, const uint16_t *v, int ldv, int n, int hd,
                 enum cvlm_dtype dt);
    /* dst[i] = src[i] widened to F32 (src of dtype dt: F32, F16 or BF16), i < n */
    void (*widen)(float *dst, const void *src, int n, enum cvlm_dtype dt);
    /* dst[i] = src[i] rounded to nearest even in dt (F32: copied), i < n */
    void (*narrow)(void *dst, const float *src, int n, enum cvlm_dtype dt);
    /* An int8 KV cache (Q8): codes, and one F32 scale per (slot, KV head), row j's at
     * ks[j * lds]; the codes are widened to F32 in registers. scores8: s[j] = scale * ks[j *
     * lds] * dot(q, k_j); pv8: o[d] += sum_j (p[j] * vs[j * lds]) v_j[d] (d < hd, j < n). */
    void (*scores8)(float *s, const float *q, const int8_t *k, int ldk, const float *ks, int lds,
                    int n, int hd, float scale);
    void (*pv8)(float *o, const float *p, const int8_t *v, int ldv, const float *vs, int lds, int n,
                int hd);
    /* dst[i] = src[i] * scale, i < n */
    void (*widen8)(float *dst, const int8_t *src, int n, float scale);
    /* Symmetric int8 of src[0..n): *scale = max |src[i]| / 127, dst[i] = src[i] / *scale
     * rounded to nearest even (all 0 when *scale is 0); every ISA's bits are the scalar's. */
    void (*narrow8)(int8_t *dst, float *scale, const float *src, int n);
};

/* The scalar row conversions (vec_scalar.c); the vector sets use them for tails. */
void cvlm_cpu_widen_scalar(float *dst, const void *src, int n, enum cvlm_dtype dt);
void cvlm_cpu_narrow_scalar(void *dst, const float *src, int n, enum cvlm_dtype dt);
void cvlm_cpu_narrow8_scalar(int8_t *dst, float *scale, const float *src, int n);
#if defined(__x86_64__)
/* The AVX2 int8-KV helpers; the AVX-512 set uses them too (no AVX-512 int8 path yet). */
void cvlm_cpu_scores8_avx2(float *s, const float *q, const int8_t *k, int ldk, const float *ks,
                           int lds, int n, int hd, float scale);
void cvlm_cpu_pv8_avx2(float *o, const float *p, const int8_t *v, int ldv, const float *vs, int lds,
                       int n, int hd);
void cvlm_cpu_widen8_avx2(float *dst, const int8_t *src, int n, float scale);
void cvlm_cpu_narrow8_avx2(int8_t *dst, float *scale, const float *src, int n);
#endif

/* Element i of a KV row of dtype dt, as F32. */
static inline float cvlm_cpu_kv_get(const void *p, size_t i, enum cvlm_dtype dt)
{
    if (dt == CVLM_DTYPE_F32)
        return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    return dt == CVLM_DTYPE_F16 ? cvlm_f16_to_f32(h) : cvlm_bf16_to_f32(h);
}

void cvlm_cpu_transpose_scalar(float *dst, int ldd, const float *src, int lds, int rows, int cols);

/* The helpers for an ISA (scalar ones in vec_scalar.c). */
const struct cpu_vec_ops *cvlm_cpu_vec_ops(enum cpu_isa isa);
extern const struct cpu_vec_ops cvlm_cpu_vec_scalar;
#if defined(__x86_64__)
extern const struct cpu_vec_ops cvlm_cpu_vec_avx2;
extern const struct cpu_vec_ops cvlm_cpu_vec_avx512;
#endif

/* Shared by the attention files: max of p[0..n); o[0..hd) /= sum. */
float cvlm_cpu_max_of(const float *p, int n);
void cvlm_cpu_scale_out(float *o, int hd, float sum);

/* The kernel families, each in its own file. */
void cvlm_cpu_gemm(struct cvlm_backend *be, void *y, const void *x, int x_stride,
                   const struct cvlm_tensor *w, const struct cvlm_tensor *bias, int M, int N,
                   int K);
void cvlm_cpu_attention_full(struct cvlm_backend *be, void *out, const void *qkv, int N,
                             int n_heads, int head_dim);
void cvlm_cpu_kv_write(struct cvlm_backend *be, struct cvlm_kv_layer *kv, const void *k,
                       const void *v, int stride, const struct cvlm_attn_batch *b, int n_heads,
                       int head_dim);
void cvlm_cpu_attention_paged(struct cvlm_backend *be, void *out, const void *q, int stride,
                              const struct cvlm_kv_layer *kv, const struct cvlm_attn_batch *b,
                              int n_heads, int head_dim);

#endif
