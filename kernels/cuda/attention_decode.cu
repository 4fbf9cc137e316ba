/* attention_decode.cu - causal attention of single tokens over the paged KV cache, split-K
 * ("flash decoding").
 *
 * A decode token has one query per head and a context of slot + 1 keys; reading those
 * keys and values once is the whole cost. The context is cut into parts of `part` keys
 * (chosen by the plan so that the GPU gets at least two blocks per SM even at batch 1),
 * and one block of 128 threads takes one (part, head): groups of GS lanes each read one
 * key row with 16-byte loads (GS * 8 >= head size), dot it with the query held in
 * registers and reduce within the group; the block then takes the softmax of its part
 * (max, exp2, sum) and the groups accumulate p * V the same way, reduced through shared
 * memory. A token with one part writes its output directly; otherwise every part leaves
 * its unnormalised output, max and sum in scratch and k_decode_combine merges the parts
 * with the usual rescaling. Needs head size % 8 == 0, <= 256, and 16-byte aligned rows.
 */
#include "kernels/cuda/attention.cuh"

#include <math.h>

#define DEC_THREADS 128
#define LOG2E 1.4426950408889634f

/* Where one block's keys are: its token, head, part, and the lanes' slice of a row. */
struct dec_ctx {
    const int32_t *table;
    size_t hoff;  /* query head offset + this lane's 8 columns */
    size_t kvoff; /* the same in a cache slot: its KV head's (GQA) */
    int t, k0, k1, np, act;
};

/* s[j - k0] = q . k_j for the part's keys: a group of GS lanes per key row (16-byte loads),
 * reduced within the group; every lane runs the same trips (the shuffles need all 32). */
template <int GS>
__device__ void dec_scores(const struct cu_attn_plan &pl, const struct cu_attn_io &io,
                           const struct dec_ctx &c, const float *q, float *s)
{
    constexpr int NG = DEC_THREADS / GS;
    int g = threadIdx.x / GS, lg = threadIdx.x % GS;
    for (int jb = c.k0; jb < c.k1; jb += NG) {
        int j = jb + g;
        float d = 0, kv[8];
        if (j < c.k1 && c.act) {
            size_t row = cu_kv_row(c.table, pl.block_size, j);
            cu_unpack8(*(const uint4 *)(io.k + row * io.kv_width + c.kvoff), kv);
            for (int e = 0; e < 8; e++)
                d = fmaf(q[e], kv[e], d);
        }
        for (int o = GS / 2; o; o >>= 1)
            d += __shfl_xor_sync(0xffffffffu, d, o);
        if (lg == 0 && j < c.k1)
            s[j - c.k0] = d;
    }
}

/* acc = sum over the group's keys of p_j v_j (this lane's 8 columns) */
template <int GS>
__device__ void dec_pv(const struct cu_attn_plan &pl, const struct cu_attn_io &io,
                       const struct dec_ctx &c, const float *s, float *acc)
{
    constexpr int NG = DEC_THREADS / GS;
    for (int j = c.k0 + (int)threadIdx.x / GS; c.act && j < c.k1; j += NG) {
        float vv[8], p = s[j - c.k0];
        size_t row = cu_kv_row(c.table, pl.block_size, j);
        cu_unpack8(*(const uint4 *)(io.v + row * io.kv_width + c.kvoff), vv);
        for (int e = 0; e < 8; e++)
            acc[e] = fmaf(p, vv[e], acc[e]);
    }
}

template <int GS>
__global__ void __launch_bounds__(DEC_THREADS)
    k_decode_part(struct cu_attn_plan pl, struct cu_attn_io io, float sl2, float *ws_o,
                  float2 *ws_ml)
{
    constexpr int NG = DEC_THREADS / GS; /* key rows in flight per block */
    __shared__ float s[512];             /* part <= 512 */
    __shared__ float red_o[DEC_THREADS * 8];
    __shared__ float red[32];
    int wi = blockIdx.x, h = blockIdx.y, tid = threadIdx.x, g = tid / GS, lg = tid % GS;
    int2 wk = pl.work[wi];
    struct dec_ctx c;
    c.t = pl.dec[wk.x];
    c.k0 = wk.y * pl.part;
    c.k1 = min(pl.slot[c.t] + 1, c.k0 + pl.part);
    c.np = pl.dec_nparts[wk.x];
    c.table = pl.tables + pl.toff[pl.seq[c.t]];
    c.hoff = (size_t)h * io.hd + lg * 8;
    c.kvoff = (size_t)(h / io.group) * io.hd + lg * 8;
    c.act = lg * 8 < io.hd;
    float q[8], acc[8];
    if (c.act)
        cu_unpack8(*(const uint4 *)(io.q + (size_t)c.t * io.q_stride + c.hoff), q);
    for (int e = 0; e < 8; e++)
        q[e] = c.act ? q[e] * sl2 : 0.0f, acc[e] = 0;
    dec_scores<GS>(pl, io, c, q, s);
    __syncthreads();
    float mx = -INFINITY, ls = 0;
    for (int i = tid; i < c.k1 - c.k0; i += DEC_THREADS)
        mx = fmaxf(mx, s[i]);
    mx = cu_block_reduce(mx, red, true);
    for (int i = tid; i < c.k1 - c.k0; i += DEC_THREADS) {
        float p = exp2f(s[i] - mx);
        s[i] = p;
        ls += p;
    }
    float l = cu_block_reduce(ls, red, false); /* its barriers also publish s[] */
    dec_pv<GS>(pl, io, c, s, acc);
    if (c.act)
        for (int e = 0; e < 8; e++)
            red_o[g * io.hd + lg * 8 + e] = acc[e];
    __syncthreads();
    for (int d = tid; d < io.hd; d += DEC_THREADS) {
        float o = 0;
        for (int gg = 0; gg < NG; gg++)
            o += red_o[gg * io.hd + d];
        if (c.np == 1)
            io.out[(size_t)c.t * io.width + (size_t)h * io.hd + d] = __float2bfloat16_rn(o / l);
        else
            ws_o[((size_t)wi * io.H + h) * io.hd + d] = o;
    }
    if (tid == 0 && c.np > 1)
        ws_ml[(size_t)wi * io.H + h] = make_float2(mx, l);
}

/* Merges the parts of every multi-part token: out = sum_k 2^(m_k - M) o_k / sum_k
 * 2^(m_k - M) l_k with M the largest m_k. */
__global__ void k_decode_combine(struct cu_attn_plan pl, struct cu_attn_io io, const float *ws_o,
                                 const float2 *ws_ml)
{
    int di = blockIdx.x, h = blockIdx.y, np = pl.dec_nparts[di], w0 = pl.dec_first[di];
    if (np == 1)
        return;
    int t = pl.dec[di], hd = io.hd;
    float M = -INFINITY, L = 0;
    for (int k = 0; k < np; k++)
        M = fmaxf(M, ws_ml[(size_t)(w0 + k) * io.H + h].x);
    for (int k = 0; k < np; k++) {
        float2 ml = ws_ml[(size_t)(w0 + k) * io.H + h];
        L += exp2f(ml.x - M) * ml.y;
    }
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0;
        for (int k = 0; k < np; k++)
            o += exp2f(ws_ml[(size_t)(w0 + k) * io.H + h].x - M) *
                 ws_o[((size_t)(w0 + k) * io.H + h) * hd + d];
        io.out[(size_t)t * io.width + (size_t)h * hd + d] = __float2bfloat16_rn(o / L);
    }
}

template <int GS>
static bool launch_part(struct cuda_backend *cb, const struct cu_attn_plan *p,
                        const struct cu_attn_io *io, float *ws_o, float2 *ws_ml)
{
    float sl2 = LOG2E / sqrtf((float)io->hd);
    k_decode_part<GS><<<dim3((unsigned)p->n_work, (unsigned)io->H), DEC_THREADS, 0, cb->stream>>>(
        *p, *io, sl2, ws_o, ws_ml);
    return CU_LAUNCHED(cb, "decode attention");
}

bool cu_attention_decode(struct cuda_backend *cb, const struct cu_attn_plan *p,
                         const struct cu_attn_io *io, bool *launched)
{
    *launched = false;
    if (io->hd % 8 || io->hd > 256 || p->part > 512 || !cu_aligned16(io->q) ||
        !cu_aligned16(io->k) || !cu_aligned16(io->v) || io->q_stride % 8 || io->width % 8 ||
        io->kv_width % 8)
        return false;
    *launched = true;
    size_t n_o = (size_t)p->n_work * io->H * io->hd;
    char *ws = (char *)cu_scratch(cb, CU_SCRATCH_ATTN, n_o * 4 + (size_t)p->n_work * io->H * 8);
    if (!ws)
        return false;
    float *ws_o = (float *)ws;
    float2 *ws_ml = (float2 *)(ws + n_o * 4); /* n_o * 4 is a multiple of 32: hd % 8 == 0 */
    int gs = 1;
    while (gs * 8 < io->hd)
        gs *= 2;
    bool ok;
    switch (gs) {
    case 1: ok = launch_part<1>(cb, p, io, ws_o, ws_ml); break;
    case 2: ok = launch_part<2>(cb, p, io, ws_o, ws_ml); break;
    case 4: ok = launch_part<4>(cb, p, io, ws_o, ws_ml); break;
    case 8: ok = launch_part<8>(cb, p, io, ws_o, ws_ml); break;
    case 16: ok = launch_part<16>(cb, p, io, ws_o, ws_ml); break;
    default: ok = launch_part<32>(cb, p, io, ws_o, ws_ml); break;
    }
    if (!ok)
        return false;
    k_decode_combine<<<dim3((unsigned)p->n_dec, (unsigned)io->H), 128, 0, cb->stream>>>(
        *p, *io, ws_o, ws_ml);
    return CU_LAUNCHED(cb, "decode attention combine");
}
