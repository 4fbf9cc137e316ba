/* attention.cu - ViT full attention, KV cache writes and causal paged attention.
 *
 * The flash kernel (k_flash): a block of 4 warps takes 64 queries of one head (16 per
 * warp) and walks the keys in tiles of 64: K and V tiles are staged in shared memory,
 * S = Q K^T and O += P V run on the tensor cores (WMMA, BF16 inputs, F32 accumulation),
 * and the online softmax (running max m, sum l, rescale of O by exp(m_old - m_new)) runs
 * in F32 on the S tile that each warp stores to shared memory; no N x N matrix exists
 * anywhere. Q and O stay in registers for the whole key loop (O is rescaled in its
 * accumulator fragments: fa_rows finds which row each fragment element belongs to).
 * Head sizes up to 128 are padded to a multiple of 16 with zeros. The same
 * kernel serves the ViT (dense keys of one sequence, no mask) and the paged prefill
 * (keys gathered through the block table, causal mask key <= query slot).
 *
 * Paged launches are planned on the host (the batch metadata is host data anyway): runs
 * of >= FLASH_MIN_RUN consecutive slots of one sequence become flash tiles; every other
 * token (decode, short chunks) takes the split-K decode path (attention_decode.cu). The
 * plan is uploaded once per step: kv_write and every layer's attention build identical
 * bytes, which the metadata ring's content cache recognises.
 *
 * Grouped-query attention (CogVLM2, cvlm_attn_batch.n_kv_heads): the cache holds only the
 * KV heads (slots kv_stride = Hkv * hd apart) and query head h reads KV head h / group,
 * group = n_heads / Hkv, in place: every kernel (flash, decode, reference) offsets its K
 * and V reads by the KV head and its Q and output by the query head; nothing is copied.
 *
 * k_attn_simple is the reference path: a warp per (query, head), keys one at a time. It
 * takes shapes the fast kernels do not (head size > 128 or unaligned rows) and everything
 * when COGVLM_CUDA_ATTN=simple (to tell a kernel bug from a model bug).
 */
#include "kernels/cuda/attention.cuh"

#include <math.h>
#include <mma.h>
#include <stdlib.h>
#include <string.h>

using namespace nvcuda;

#define FA_BM 64 /* queries per block */
#define FA_BN 64 /* keys per tile */
#define FA_THREADS 128
#define FA_MAX_HD 128
#define FLASH_MIN_RUN 8
#define LOG2E 1.4426950408889634f

struct fa_params {
    bf16 *out;
    const bf16 *q, *k, *v; /* already offset to head 0 of row 0 */
    int out_stride, q_stride, kv_stride, hd, vec;
    int group;         /* query heads per KV head (GQA; 1: one KV head per query head) */
    float scale_log2;  /* softmax scale * log2(e): exp2 of scaled scores */
    int n_keys;        /* full attention: keys (= queries) */
    const int4 *tiles; /* paged: tile list (NULL: full attention) */
    const int32_t *toff, *tables;
    int block_size;
};

/* Shared memory layout of one block, in bytes (every region 128-byte aligned; the WMMA
 * pointers need 32). P aliases Q when it fits (Q lives in registers after the start);
 * at the end the normalised output is staged as F32 in the K and V regions. */
template <int HDP> struct fa_layout {
    static constexpr int LDQ = HDP + 8, LDS = FA_BN + 4, LDP = FA_BN + 8, LDO = HDP + 4;
    static constexpr size_t q = 0, qsize = (size_t)FA_BM * LDQ * 2;
    static constexpr size_t k = q + qsize;
    static constexpr size_t v = k + (size_t)FA_BN * LDQ * 2;
    static constexpr size_t s = v + (size_t)FA_BN * LDQ * 2;
    static constexpr size_t o = k; /* [BM][LDO] floats <= the K and V tiles together */
    static constexpr size_t ml = s + (size_t)FA_BM * LDS * 4;
    static constexpr size_t psize = (size_t)FA_BM * LDP * 2;
    static constexpr bool p_in_q = psize <= qsize;
    static constexpr size_t p = p_in_q ? q : ml + 3 * FA_BM * 4;
    static constexpr size_t total = p_in_q ? ml + 3 * FA_BM * 4 : p + psize;
    static_assert((size_t)FA_BM * LDO * 4 <= s - k, "output staging overflows K/V");
};

/* Rows row0 .. row0 + nrows - 1 (64 at most; the rest zero) of a [rows, stride] matrix,
 * columns 0 .. hd - 1 (zero up to HDP), into dst [64][HDP + 8]. Row j is row
 * table[j / bs] * bs + j % bs when a block table is given. */
template <int HDP>
__device__ void fa_load(bf16 *dst, const bf16 *base, int stride, int row0, int nrows,
                        const int32_t *table, int bs, int hd, int vec)
{
    constexpr int LD = HDP + 8, C8 = HDP / 8;
    for (int i = threadIdx.x; i < 64 * C8; i += blockDim.x) {
        int r = i / C8, c = (i % C8) * 8;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (r < nrows && c < hd) {
            int j = row0 + r;
            size_t row = table ? cu_kv_row(table, bs, j) : (size_t)j;
            const bf16 *src = base + row * stride + c;
            if (vec && c + 8 <= hd) {
                val = *(const uint4 *)src;
            } else {
                bf16 tmp[8];
                for (int e = 0; e < 8; e++)
                    tmp[e] = c + e < hd ? src[e] : __float2bfloat16(0.0f);
                memcpy(&val, tmp, sizeof(val));
            }
        }
        *(uint4 *)(dst + r * LD + c) = val;
    }
}

/* The online softmax of this warp's 16 rows for one key tile: scores in S (raw dot
 * products), probabilities to P (BF16), running max / sum / rescale factor per row. */
__device__ void fa_softmax(const float *S, int lds, bf16 *P, int ldp, float *Ms, float *Ls,
                           float *As, int r0, int kbase, int kn, int causal, int s0, float sl2)
{
    int lane = threadIdx.x & 31;
    for (int r = 0; r < 16; r++) {
        int row = r0 + r, qslot = s0 + row;
        float x[2];
        for (int h = 0; h < 2; h++) {
            int c = lane + 32 * h, j = kbase + c;
            bool ok = c < kn && (!causal || j <= qslot);
            x[h] = ok ? S[row * lds + c] * sl2 : -INFINITY;
        }
        float m_old = Ms[row], m_new = fmaxf(m_old, cu_warp_max(fmaxf(x[0], x[1])));
        float p0 = 0, p1 = 0, alpha = 1;
        if (m_new != -INFINITY) { /* else every key so far is masked: nothing to add */
            p0 = exp2f(x[0] - m_new);
            p1 = exp2f(x[1] - m_new);
            alpha = exp2f(m_old - m_new);
        }
        float sum = cu_warp_sum(p0 + p1);
        P[row * ldp + lane] = __float2bfloat16_rn(p0);
        P[row * ldp + lane + 32] = __float2bfloat16_rn(p1);
        if (lane == 0) {
            Ms[row] = m_new;
            Ls[row] = Ls[row] * alpha + sum;
            As[row] = alpha;
        }
    }
}

typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> fa_acc;

/* The row (0..15) of each element this lane holds in an accumulator fragment. WMMA leaves
 * the element mapping unspecified but fixed per fragment type, so it is read back once
 * from a tile whose every element is its own row index. */
__device__ void fa_rows(float *scratch, int ld, int *ri)
{
    int lane = threadIdx.x & 31;
    for (int i = lane; i < 256; i += 32)
        scratch[(i / 16) * ld + i % 16] = (float)(i / 16);
    __syncwarp();
    fa_acc rid;
    wmma::load_matrix_sync(rid, scratch, ld, wmma::mem_row_major);
    for (int e = 0; e < rid.num_elements; e++)
        ri[e] = (int)rid.x[e];
    __syncwarp();
}

/* S = Q K^T for this warp's 16 rows and the tile's 64 keys, stored to S (row-major). */
template <int HDP>
__device__ void fa_scores(
    const wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> *qf, const bf16 *Ks,
    float *Sw, int lds)
{
    for (int nt = 0; nt < FA_BN / 16; nt++) {
        fa_acc acc;
        wmma::fill_fragment(acc, 0.0f);
        for (int kk = 0; kk < HDP / 16; kk++) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> kf;
            wmma::load_matrix_sync(kf, Ks + nt * 16 * (HDP + 8) + kk * 16, HDP + 8);
            wmma::mma_sync(acc, qf[kk], kf, acc);
        }
        wmma::store_matrix_sync(Sw + nt * 16, acc, lds, wmma::mem_row_major);
    }
}

/* out rows of this warp = O / l, through the F32 staging area Ow (16 rows, ld HDP + 4) */
template <int HDP>
__device__ void fa_store(const fa_params &p, fa_acc *of, const int *ri, const float *Lw, float *Ow,
                         int t0, int r0, int nq, int hoff)
{
    int lane = threadIdx.x & 31;
    float il[8];
    for (int e = 0; e < of[0].num_elements; e++)
        il[e] = 1.0f / Lw[ri[e]];
    for (int dt = 0; dt < HDP / 16; dt++) {
        for (int e = 0; e < of[dt].num_elements; e++)
            of[dt].x[e] *= il[e];
        wmma::store_matrix_sync(Ow + dt * 16, of[dt], HDP + 4, wmma::mem_row_major);
    }
    __syncwarp();
    for (int i = lane; i < 16 * p.hd; i += 32) {
        int r = i / p.hd, c = i % p.hd;
        if (r0 + r < nq)
            p.out[(size_t)(t0 + r0 + r) * p.out_stride + hoff + c] =
                __float2bfloat16_rn(Ow[r * (HDP + 4) + c]);
    }
}

template <int HDP> __global__ void __launch_bounds__(FA_THREADS) k_flash(fa_params p)
{
    typedef fa_layout<HDP> L;
    extern __shared__ __align__(128) unsigned char sm[];
    bf16 *Qs = (bf16 *)(sm + L::q), *Ks = (bf16 *)(sm + L::k), *Vs = (bf16 *)(sm + L::v);
    bf16 *Ps = (bf16 *)(sm + L::p);
    float *Ss = (float *)(sm + L::s), *Ms = (float *)(sm + L::ml);
    float *Ls = Ms + FA_BM, *As = Ls + FA_BM;
    int h = blockIdx.y, r0 = (threadIdx.x >> 5) * 16, hoff = h * p.hd;
    int kvoff = h / p.group * p.hd; /* GQA: the KV head of query head h */
    int t0, nq, s0 = 0, n_keys = p.n_keys, causal = p.tiles != NULL;
    const int32_t *table = NULL;
    if (p.tiles) {
        int4 tl = p.tiles[gridDim.x - 1 - blockIdx.x]; /* longest (latest) tiles first */
        t0 = tl.x, nq = tl.y, s0 = tl.w, n_keys = tl.w + tl.y;
        table = p.tables + p.toff[tl.z];
    } else {
        t0 = blockIdx.x * FA_BM;
        nq = min(FA_BM, p.n_keys - t0);
    }
    for (int i = threadIdx.x; i < FA_BM; i += blockDim.x)
        Ms[i] = -INFINITY, Ls[i] = 0;
    fa_load<HDP>(Qs, p.q + hoff, p.q_stride, t0, nq, NULL, 1, p.hd, p.vec);
    int ri[8]; /* rows (within the warp's 16) of this lane's accumulator elements */
    fa_rows(Ss + r0 * L::LDS, L::LDS, ri);
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> qf[HDP / 16];
    for (int kk = 0; kk < HDP / 16; kk++)
        wmma::load_matrix_sync(qf[kk], Qs + r0 * L::LDQ + kk * 16, L::LDQ);
    fa_acc of[HDP / 16]; /* O of the warp's 16 rows, in registers for the whole loop */
    for (int dt = 0; dt < HDP / 16; dt++)
        wmma::fill_fragment(of[dt], 0.0f);
    for (int kbase = 0; kbase < n_keys; kbase += FA_BN) {
        int kn = min(FA_BN, n_keys - kbase);
        __syncthreads(); /* every warp is done with the previous K/V tile (and with Q) */
        fa_load<HDP>(Ks, p.k + kvoff, p.kv_stride, kbase, kn, table, p.block_size, p.hd, p.vec);
        fa_load<HDP>(Vs, p.v + kvoff, p.kv_stride, kbase, kn, table, p.block_size, p.hd, p.vec);
        __syncthreads();
        fa_scores<HDP>(qf, Ks, Ss + r0 * L::LDS, L::LDS);
        __syncwarp();
        fa_softmax(Ss, L::LDS, Ps, L::LDP, Ms, Ls, As, r0, kbase, kn, causal, s0, p.scale_log2);
        __syncwarp();
        float al[8];
        for (int e = 0; e < of[0].num_elements; e++)
            al[e] = As[r0 + ri[e]];
        for (int dt = 0; dt < HDP / 16; dt++) { /* O = alpha O + P V */
            for (int e = 0; e < of[dt].num_elements; e++)
                of[dt].x[e] *= al[e];
            for (int kk = 0; kk < FA_BN / 16; kk++) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> pf;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> vf;
                wmma::load_matrix_sync(pf, Ps + r0 * L::LDP + kk * 16, L::LDP);
                wmma::load_matrix_sync(vf, Vs + kk * 16 * L::LDQ + dt * 16, L::LDQ);
                wmma::mma_sync(of[dt], pf, vf, of[dt]);
            }
        }
    }
    __syncthreads(); /* the K/V tiles become the output staging area */
    fa_store<HDP>(p, of, ri, Ls + r0, (float *)(sm + L::o) + r0 * L::LDO, t0, r0, nq, hoff);
}

/* ---- the reference kernel ------------------------------------------------------------------ */

/* Warp per (query, head); lanes over head dims (hd <= 256), online softmax over keys one
 * at a time. Full attention when tok/seq are NULL; else query i is token tok[i] (or i)
 * of sequence seq[t], causal up to its slot. */
__global__ void k_attn_simple(fa_params p, int n_q, int H, const int32_t *tok, const int32_t *seq,
                              const int32_t *slot)
{
    int w = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (w >= n_q * H)
        return;
    int i = w / H, h = w % H, t = tok ? tok[i] : i, n_keys = p.n_keys, hd = p.hd;
    const int32_t *table = NULL;
    if (seq) {
        n_keys = slot[t] + 1;
        table = p.tables + p.toff[seq[t]];
    }
    const bf16 *qr = p.q + (size_t)t * p.q_stride + h * hd;
    float q[8], acc[8], m = -INFINITY, l = 0;
    for (int e = 0; e < 8; e++) {
        int d = lane + 32 * e;
        q[e] = d < hd ? __bfloat162float(qr[d]) * p.scale_log2 : 0.0f;
        acc[e] = 0;
    }
    for (int j = 0; j < n_keys; j++) {
        size_t row = table ? cu_kv_row(table, p.block_size, j) : (size_t)j;
        size_t kvo = row * p.kv_stride + (size_t)(h / p.group) * hd; /* GQA: h's KV head */
        const bf16 *kr = p.k + kvo, *vr = p.v + kvo;
        float s = 0;
        for (int e = 0; e < 8; e++)
            if (lane + 32 * e < hd)
                s += q[e] * __bfloat162float(kr[lane + 32 * e]);
        s = cu_warp_sum(s);
        float m_new = fmaxf(m, s), corr = exp2f(m - m_new), pj = exp2f(s - m_new);
        l = l * corr + pj;
        for (int e = 0; e < 8; e++)
            if (lane + 32 * e < hd)
                acc[e] = acc[e] * corr + pj * __bfloat162float(vr[lane + 32 * e]);
        m = m_new;
    }
    for (int e = 0; e < 8; e++)
        if (lane + 32 * e < hd)
            p.out[(size_t)t * p.out_stride + h * hd + lane + 32 * e] =
                __float2bfloat16_rn(acc[e] / l);
}

static bool launch_simple(struct cuda_backend *cb, const fa_params *p, int n_q, int H,
                          const int32_t *tok, const int32_t *seq, const int32_t *slot)
{
    if (n_q <= 0)
        return true;
    unsigned blocks = (unsigned)(((size_t)n_q * H + 3) / 4);
    k_attn_simple<<<blocks, 128, 0, cb->stream>>>(*p, n_q, H, tok, seq, slot);
    return CU_LAUNCHED(cb, "attention (reference)");
}

/* ---- flash launch ------------------------------------------------------------------------- */

template <int HDP> static size_t fa_smem()
{
    return fa_layout<HDP>::total;
}

static size_t flash_smem(int hd)
{
    switch ((hd + 15) / 16) {
    case 1: return fa_smem<16>();
    case 2: return fa_smem<32>();
    case 3: return fa_smem<48>();
    case 4: return fa_smem<64>();
    case 5: return fa_smem<80>();
    case 6: return fa_smem<96>();
    case 7: return fa_smem<112>();
    default: return fa_smem<128>();
    }
}

/* The flash kernel can take this head size on this device. */
static bool flash_ok(struct cuda_backend *cb, int hd)
{
    return !cb->attn_simple && hd > 0 && hd <= FA_MAX_HD && flash_smem(hd) <= cb->smem_optin;
}

template <int HDP> static bool flash_launch(struct cuda_backend *cb, const fa_params *p, dim3 grid)
{
    size_t smem = fa_smem<HDP>();
    if (!cb->smem_set[HDP / 16]) {
        if (!CU_RT(cb, cudaFuncSetAttribute(
                           k_flash<HDP>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem)))
            return false;
        cb->smem_set[HDP / 16] = 1;
    }
    k_flash<HDP><<<grid, FA_THREADS, smem, cb->stream>>>(*p);
    return CU_LAUNCHED(cb, "flash attention");
}

static bool launch_flash(struct cuda_backend *cb, const fa_params *p, dim3 grid)
{
    switch ((p->hd + 15) / 16) {
    case 1: return flash_launch<16>(cb, p, grid);
    case 2: return flash_launch<32>(cb, p, grid);
    case 3: return flash_launch<48>(cb, p, grid);
    case 4: return flash_launch<64>(cb, p, grid);
    case 5: return flash_launch<80>(cb, p, grid);
    case 6: return flash_launch<96>(cb, p, grid);
    case 7: return flash_launch<112>(cb, p, grid);
    default: return flash_launch<128>(cb, p, grid);
    }
}

/* 16-byte loads are possible for every row of these matrices */
static int rows_vec_ok(const void *a, const void *b, const void *c, int stride, int hd)
{
    return cu_aligned16(a) && cu_aligned16(b) && cu_aligned16(c) && stride % 8 == 0 && hd % 8 == 0;
}

void cu_attention_full(struct cvlm_backend *be, void *out, const void *qkv, int N, int n_heads,
                       int head_dim)
{
    struct cuda_backend *cb = cu_of(be);
    if (N <= 0 || !cu_enter(cb))
        return;
    CU_REQUIRE(cb, n_heads > 0 && head_dim > 0 && head_dim <= 256,
               "attention_full: %d heads of %d (at most 256)", n_heads, head_dim);
    int D = n_heads * head_dim;
    const bf16 *q = (const bf16 *)qkv;
    fa_params p = {};
    p.out = (bf16 *)out;
    p.q = q;
    p.k = q + D;
    p.v = q + 2 * D;
    p.out_stride = D;
    p.q_stride = p.kv_stride = 3 * D;
    p.hd = head_dim;
    p.group = 1;
    p.vec = rows_vec_ok(p.q, p.k, p.v, 3 * D, head_dim);
    p.scale_log2 = LOG2E / sqrtf((float)head_dim);
    p.n_keys = N;
    if (flash_ok(cb, head_dim))
        launch_flash(cb, &p, dim3((unsigned)((N + FA_BM - 1) / FA_BM), (unsigned)n_heads));
    else
        launch_simple(cb, &p, N, n_heads, NULL, NULL, NULL);
}

/* ---- paged: the plan --------------------------------------------------------------------------
 */

struct plan_counts {
    int n_seqs, n_tables, n_tiles, n_dec, n_work, part;
};

/* End (exclusive) of the run of consecutive slots of one sequence starting at token t. */
static int run_end(const struct cvlm_attn_batch *b, int t)
{
    int e = t + 1;
    while (e < b->n_tokens && b->seq[e] == b->seq[t] && b->slot[e] == b->slot[e - 1] + 1)
        e++;
    return e;
}

static bool is_tile_run(int len, int flash)
{
    return flash && len >= FLASH_MIN_RUN;
}

/* Sizes of every part of the plan; maxslot[s] gets each sequence's largest slot. */
static void plan_count(struct cuda_backend *cb, const struct cvlm_attn_batch *b, int H, int flash,
                       int *maxslot, struct plan_counts *c)
{
    int bs = b->block_size;
    for (int s = 0; s < c->n_seqs; s++)
        maxslot[s] = -1;
    for (int t = 0; t < b->n_tokens; t++)
        maxslot[b->seq[t]] = b->slot[t] > maxslot[b->seq[t]] ? b->slot[t] : maxslot[b->seq[t]];
    for (int s = 0; s < c->n_seqs; s++)
        c->n_tables += maxslot[s] < 0 ? 0 : maxslot[s] / bs + 1;
    for (int t = 0; t < b->n_tokens;) {
        int e = run_end(b, t);
        if (is_tile_run(e - t, flash))
            c->n_tiles += (e - t + FA_BM - 1) / FA_BM;
        else
            c->n_dec += e - t;
        t = e;
    }
    /* the largest key split that still gives the GPU >= 2 blocks per SM of decode work */
    for (c->part = 512;; c->part /= 2) {
        long parts = 0;
        for (int t = 0; t < b->n_tokens;) {
            int e = run_end(b, t);
            for (int i = t; i < e && !is_tile_run(e - t, flash); i++)
                parts += (b->slot[i] + c->part) / c->part;
            t = e;
        }
        c->n_work = (int)parts;
        if (c->part == 64 || parts * H >= 2L * cb->sm_count)
            break;
    }
}

/* Writes the packed plan (layout: tiles int4, work int2, then the int32 arrays). */
static void plan_fill(const struct cvlm_attn_batch *b, int flash, const int *maxslot,
                      const struct plan_counts *c, int32_t *buf)
{
    int n = b->n_tokens, bs = b->block_size;
    int32_t *tiles = buf, *work = tiles + 4 * c->n_tiles, *seq = work + 2 * c->n_work;
    int32_t *slot = seq + n, *toff = slot + n, *tables = toff + c->n_seqs + 1;
    int32_t *dec = tables + c->n_tables, *first = dec + c->n_dec, *nparts = first + c->n_dec;
    memcpy(seq, b->seq, (size_t)n * sizeof(int32_t));
    memcpy(slot, b->slot, (size_t)n * sizeof(int32_t));
    toff[0] = 0;
    for (int s = 0; s < c->n_seqs; s++) {
        int cnt = maxslot[s] < 0 ? 0 : maxslot[s] / bs + 1;
        memcpy(tables + toff[s], b->seqs[s].block_table, (size_t)cnt * sizeof(int32_t));
        toff[s + 1] = toff[s] + cnt;
    }
    int nt = 0, nd = 0, nw = 0;
    for (int t = 0; t < n;) {
        int e = run_end(b, t);
        for (int i = t; i < e && is_tile_run(e - t, flash); i += FA_BM) {
            int32_t *tl = tiles + 4 * nt++;
            tl[0] = i, tl[1] = e - i < FA_BM ? e - i : FA_BM, tl[2] = b->seq[i], tl[3] = b->slot[i];
        }
        for (int i = t; i < e && !is_tile_run(e - t, flash); i++) {
            int parts = (b->slot[i] + c->part) / c->part;
            dec[nd] = i, first[nd] = nw, nparts[nd] = parts;
            for (int k = 0; k < parts; k++, nw++)
                work[2 * nw] = nd, work[2 * nw + 1] = k;
            nd++;
        }
        t = e;
    }
}

/* Builds and uploads the plan of a paged launch; false on error (recorded). */
static bool plan_build(struct cuda_backend *cb, const struct cvlm_attn_batch *b, int H, int hd,
                       struct cu_attn_plan *p)
{
    struct plan_counts c = {};
    int flash = flash_ok(cb, hd);
    for (int t = 0; t < b->n_tokens; t++)
        c.n_seqs = b->seq[t] + 1 > c.n_seqs ? b->seq[t] + 1 : c.n_seqs;
    int *maxslot = (int *)malloc((size_t)c.n_seqs * sizeof(int));
    if (!maxslot) {
        cu_fail(cb, CVLM_ENOMEM, __FILE__, __LINE__, "out of host memory");
        return false;
    }
    plan_count(cb, b, H, flash, maxslot, &c);
    size_t ints = 4 * (size_t)c.n_tiles + 2 * (size_t)c.n_work + 2 * (size_t)b->n_tokens +
                  (size_t)c.n_seqs + 1 + c.n_tables + 3 * (size_t)c.n_dec;
    int32_t *buf = (int32_t *)cu_host_tmp(cb, ints * sizeof(int32_t));
    if (buf)
        plan_fill(b, flash, maxslot, &c, buf);
    free(maxslot);
    const int32_t *d = buf ? (const int32_t *)cu_upload(cb, buf, ints * sizeof(int32_t)) : NULL;
    if (!d)
        return false;
    memset(p, 0, sizeof(*p));
    p->n = b->n_tokens;
    p->n_seqs = c.n_seqs;
    p->n_tiles = c.n_tiles;
    p->n_dec = c.n_dec;
    p->n_work = c.n_work;
    p->part = c.part;
    p->block_size = b->block_size;
    p->tiles = (const int4 *)d;
    p->work = (const int2 *)(d + 4 * c.n_tiles);
    p->seq = d + 4 * c.n_tiles + 2 * c.n_work;
    p->slot = p->seq + b->n_tokens;
    p->toff = p->slot + b->n_tokens;
    p->tables = p->toff + c.n_seqs + 1;
    p->dec = p->tables + c.n_tables;
    p->dec_first = p->dec + c.n_dec;
    p->dec_nparts = p->dec_first + c.n_dec;
    return true;
}

/* ---- paged: cache writes and attention ---------------------------------------------------- */

__global__ void k_kv_write(bf16 *kc, bf16 *vc, const bf16 *k, const bf16 *v, int stride,
                           const int32_t *seq, const int32_t *slot, const int32_t *toff,
                           const int32_t *tables, int bs, int width, int n, int vec)
{
    for (int t = blockIdx.x; t < n; t += gridDim.x) {
        size_t row = cu_kv_row(tables + toff[seq[t]], bs, slot[t]) * width;
        const bf16 *ks = k + (size_t)t * stride, *vs = v + (size_t)t * stride;
        if (vec) {
            for (int c = threadIdx.x; c < width / 8; c += blockDim.x) {
                ((uint4 *)(kc + row))[c] = ((const uint4 *)ks)[c];
                ((uint4 *)(vc + row))[c] = ((const uint4 *)vs)[c];
            }
        } else {
            for (int c = threadIdx.x; c < width; c += blockDim.x) {
                kc[row + c] = ks[c];
                vc[row + c] = vs[c];
            }
        }
    }
}

void cu_kv_write(struct cvlm_backend *be, struct cvlm_kv_layer *kv, const void *k, const void *v,
                 int stride, const struct cvlm_attn_batch *b, int n_heads, int head_dim)
{
    struct cuda_backend *cb = cu_of(be);
    struct cu_attn_plan p;
    if (b->n_tokens <= 0 || !cu_enter(cb))
        return;
    int width = n_heads * head_dim;
    CU_REQUIRE(cb, width > 0 && stride >= width && b->block_size > 0,
               "kv_write: %d heads of %d, row stride %d, block size %d", n_heads, head_dim, stride,
               b->block_size);
    /* the cache is BF16 only (the activation dtype); the model refuses other choices first */
    CU_REQUIRE(cb, kv->dtype == CVLM_DTYPE_BF16, "kv_write: a %s KV cache (BF16 only)",
               cvlm_dtype_name(kv->dtype));
    if (!plan_build(cb, b, n_heads, head_dim, &p))
        return;
    int vec = rows_vec_ok(k, v, kv->k, stride, width) && cu_aligned16(kv->v);
    unsigned grid = (unsigned)(b->n_tokens < 65535 ? b->n_tokens : 65535);
    k_kv_write<<<grid, 128, 0, cb->stream>>>((bf16 *)kv->k, (bf16 *)kv->v, (const bf16 *)k,
                                             (const bf16 *)v, stride, p.seq, p.slot, p.toff,
                                             p.tables, p.block_size, width, b->n_tokens, vec);
    CU_LAUNCHED(cb, "kv_write");
}

void cu_attention_paged(struct cvlm_backend *be, void *out, const void *q, int stride,
                        const struct cvlm_kv_layer *kv, const struct cvlm_attn_batch *b,
                        int n_heads, int head_dim)
{
    struct cuda_backend *cb = cu_of(be);
    struct cu_attn_plan pl;
    if (b->n_tokens <= 0 || !cu_enter(cb))
        return;
    int width = n_heads * head_dim;
    CU_REQUIRE(cb, width > 0 && head_dim <= 256 && stride >= width && b->block_size > 0,
               "attention_paged: %d heads of %d, row stride %d", n_heads, head_dim, stride);
    CU_REQUIRE(cb, kv->dtype == CVLM_DTYPE_BF16, "attention_paged: a %s KV cache (BF16 only)",
               cvlm_dtype_name(kv->dtype));
    /* grouped-query attention (CogVLM2): the cache holds Hkv heads per slot; query head h
     * reads KV head h / (n_heads / Hkv) in place (no copies) */
    int Hkv = b->n_kv_heads > 0 ? b->n_kv_heads : n_heads, kv_width = Hkv * head_dim;
    CU_REQUIRE(cb, Hkv <= n_heads && n_heads % Hkv == 0,
               "attention_paged: %d query heads over %d KV heads (must divide)", n_heads, Hkv);
    if (!plan_build(cb, b, n_heads, head_dim, &pl))
        return;
    fa_params p = {};
    p.out = (bf16 *)out;
    p.q = (const bf16 *)q;
    p.k = (const bf16 *)kv->k;
    p.v = (const bf16 *)kv->v;
    p.out_stride = width;
    p.q_stride = stride;
    p.kv_stride = kv_width;
    p.hd = head_dim;
    p.group = n_heads / Hkv;
    p.vec = rows_vec_ok(q, kv->k, kv->v, stride, head_dim) && width % 8 == 0;
    p.scale_log2 = LOG2E / sqrtf((float)head_dim);
    p.tiles = pl.tiles;
    p.toff = pl.toff;
    p.tables = pl.tables;
    p.block_size = pl.block_size;
    if (pl.n_tiles && !launch_flash(cb, &p, dim3((unsigned)pl.n_tiles, (unsigned)n_heads)))
        return;
    struct cu_attn_io io = {(bf16 *)out, p.q,     p.k,      p.v,      stride,
                            width,       n_heads, head_dim, kv_width, p.group};
    bool launched = false;
    if (pl.n_dec && !cb->attn_simple && cu_attention_decode(cb, &pl, &io, &launched))
        return;
    if (pl.n_dec && !launched && !cb->err)
        launch_simple(cb, &p, pl.n_dec, n_heads, pl.dec, pl.seq, pl.slot);
}
