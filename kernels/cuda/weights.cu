/* weights.cu - upload_weights: a weight set into one device allocation, as BF16 (or as
 * quantized codes + scales).
 *
 * Every tensor of the set gets a 256-byte aligned range of one cudaMalloc (owned by the
 * backend until destroy) and its data pointer is set there. The device copy is always
 * BF16 (t->dtype becomes BF16): BF16 checkpoints are copied as they are; F16 and F32 ones
 * are converted on the device (round to nearest even). Why: cuBLAS has no GEMM mixing a
 * BF16 activation with an F16 weight, F16 activations could overflow where BF16 ones do
 * not, and F32 weights would double the bytes every decode step streams. The price is
 * F16 weights losing 3 mantissa bits, well inside BF16-activation tolerances.
 *
 * Host data goes through two pinned staging buffers so that the host copy of one chunk
 * overlaps the transfer (and conversion) of the previous one. Tensors without data are
 * generated on the device by their fill: ONES, ZEROS, or RANDOM = uniform with standard
 * deviation 0.02 from a counter-based hash of (seed, tensor index, element index), so a
 * 35 GB dummy model costs no host work and the same seed gives the same weights.
 * Tensors sharing one data pointer (same dtype and size) share one device copy.
 *
 * Quantized matrices (Q8 / Q4, engine/backend.h) stay quantized: their codes, scales and
 * the optional mins and perm are copied as they are (each part its own 256-byte aligned
 * range, so the GEMV's 16-byte loads of the codes are aligned), and the tensor's data,
 * scales, mins and perm then point at the device copies (gemm_q.cu reads them). A
 * quantized tensor without data is generated: codes by its fill, scales constant.
 */
#include "kernels/cuda/elementwise.cuh"
#include "kernels/cuda/weights.cuh"

#include <stdlib.h>
#include <string.h>

#define STAGE_BYTES ((size_t)32 << 20)
#define NO_RANGE ((size_t)-1)

__device__ __forceinline__ uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* The CPU backend's f16_small (backend_cpu.c), widened back: an F16 tensor it generates
 * holds these values (mantissa rounded half up, magnitudes below the smallest normal half
 * flushed to zero). */
__device__ __forceinline__ float f16_small_value(float v)
{
    uint32_t u = __float_as_uint(v);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    int e = (int)((u >> 23) & 0xffu) - 127 + 15;
    if (e <= 0)
        return __half2float(__ushort_as_half(sign));
    uint32_t h = ((uint32_t)e << 10) | ((u & 0x7fffffu) >> 13);
    h += (u >> 12) & 1u;
    return __half2float(__ushort_as_half((unsigned short)(sign | h)));
}

/* Element i of a generated tensor: the same counter-based hash of (seed, tensor index,
 * element) as the CPU backend's upload_weights, so a BF16 dummy model has bit-identical
 * weights on both backends (an F32 or F16 one: the CPU's values, rounded to BF16 as the
 * upload of that tensor would). */
__global__ void k_fill(bf16 *dst, size_t n, int kind, int dtype, uint64_t key)
{
    const float amp = 0.034641016f; /* 0.02 * sqrt(3): uniform [-a, a) has std 0.02 */
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = kind == CVLM_FILL_ONES ? 1.0f : 0.0f;
        if (kind == CVLM_FILL_RANDOM) {
            uint64_t z = mix64(key + (uint64_t)i * 0x9e3779b97f4a7c15ull);
            v = ((float)(z >> 40) * (1.0f / 8388608.0f) - 1.0f) * amp;
        }
        if (dtype == CVLM_DTYPE_F16)
            v = f16_small_value(v);
        dst[i] = __float2bfloat16_rn(v);
    }
}

struct stage {
    void *host[2], *dev[2];
    cudaEvent_t ev[2];
    int next;
};

static void stage_free(struct stage *st)
{
    for (int i = 0; i < 2; i++) {
        cudaFreeHost(st->host[i]);
        cudaFree(st->dev[i]);
        if (st->ev[i])
            cudaEventDestroy(st->ev[i]);
    }
}

static bool stage_init(struct cuda_backend *cb, struct stage *st)
{
    memset(st, 0, sizeof(*st));
    for (int i = 0; i < 2; i++)
        if (!CU_RT(cb, cudaHostAlloc(&st->host[i], STAGE_BYTES, cudaHostAllocDefault)) ||
            !CU_RT(cb, cudaMalloc(&st->dev[i], STAGE_BYTES)) ||
            !CU_RT(cb, cudaEventCreateWithFlags(&st->ev[i], cudaEventDisableTiming)))
            return false;
    return true;
}

/* Data already in device memory (a tensor uploaded before, or a view of one). */
static bool on_device(const void *p)
{
    cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        cudaGetLastError(); /* not an error worth keeping: plain host memory */
        return false;
    }
    return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

/* Copies `bytes` raw bytes of host or device memory to dst (device), host data chunk by
 * chunk through the pinned staging buffers. */
static bool copy_bytes(struct cuda_backend *cb, struct stage *st, void *dst, const void *src,
                       size_t bytes)
{
    if (on_device(src))
        return CU_RT(cb, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, cb->stream));
    for (size_t done = 0; done < bytes;) {
        size_t chunk = bytes - done < STAGE_BYTES ? bytes - done : STAGE_BYTES;
        int s = st->next;
        st->next ^= 1;
        if (!CU_RT(cb, cudaEventSynchronize(st->ev[s]))) /* the slot's last chunk is through */
            return false;
        memcpy(st->host[s], (const char *)src + done, chunk);
        if (!CU_RT(cb, cudaMemcpyAsync((char *)dst + done, st->host[s], chunk,
                                       cudaMemcpyHostToDevice, cb->stream)) ||
            !CU_RT(cb, cudaEventRecord(st->ev[s], cb->stream)))
            return false;
        done += chunk;
    }
    return true;
}

/* Copies (and converts to BF16) the data of t into dst: host data chunk by chunk through
 * the pinned staging buffers, device data directly. */
static bool copy_tensor(struct cuda_backend *cb, struct stage *st, bf16 *dst,
                        const struct cvlm_tensor *t, size_t n)
{
    size_t es = cvlm_dtype_size(t->dtype), bytes = n * es;
    const char *src = (const char *)t->data;
    if (t->dtype == CVLM_DTYPE_BF16)
        return copy_bytes(cb, st, dst, src, bytes);
    if (on_device(src))
        return cu_convert_to_bf16(cb, dst, src, t->dtype, n);
    for (size_t done = 0; done < bytes;) {
        size_t chunk = bytes - done < STAGE_BYTES ? bytes - done : STAGE_BYTES;
        int s = st->next;
        st->next ^= 1;
        if (!CU_RT(cb, cudaEventSynchronize(st->ev[s]))) /* the slot's last chunk is through */
            return false;
        memcpy(st->host[s], src + done, chunk);
        if (!CU_RT(cb, cudaMemcpyAsync(st->dev[s], st->host[s], chunk, cudaMemcpyHostToDevice,
                                       cb->stream)) ||
            !cu_convert_to_bf16(cb, dst + done / es, st->dev[s], t->dtype, chunk / es) ||
            !CU_RT(cb, cudaEventRecord(st->ev[s], cb->stream)))
            return false;
        done += chunk;
    }
    return true;
}

/* ---- quantized tensors: codes, scales, mins, perm ---------------------------------------- */

/* The parts of a tensor's device copy: the data (BF16, or a quantized matrix's codes) and,
 * for Q8 / Q4, its scales, mins and perm (bytes 0 where it has none). */
enum { P_DATA, P_SCALES, P_MINS, P_PERM, N_PARTS };

static void part_bytes(const struct cvlm_tensor *t, size_t *b)
{
    size_t numel = (size_t)cvlm_tensor_numel(t);
    memset(b, 0, N_PARTS * sizeof(size_t));
    if (!cvlm_dtype_is_quant(t->dtype)) {
        b[P_DATA] = numel * sizeof(bf16);
        return;
    }
    size_t scales = (size_t)t->shape[0] * (size_t)cvlm_quant_groups(t) * sizeof(float);
    b[P_DATA] = cvlm_tensor_bytes(t);
    b[P_SCALES] = scales;
    /* generated tensors (data NULL) have neither mins nor perm */
    b[P_MINS] = t->data && t->mins ? scales : 0;
    b[P_PERM] = t->data && t->perm ? (size_t)t->shape[1] * sizeof(int32_t) : 0;
}

/* Generated codes: RANDOM uniform (Q8 -127..127, Q4 any nibble: the spread of the CPU's
 * dummy codes, engine/model/quantize.c, not its values), ZEROS code 0, ONES code 1. */
__global__ void k_fill_codes(unsigned char *dst, size_t n, int kind, int q4, uint64_t key)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        unsigned v = kind == CVLM_FILL_ONES ? 1u : 0u;
        if (kind == CVLM_FILL_RANDOM)
            v = (unsigned)(mix64(key + (uint64_t)i * 0x9e3779b97f4a7c15ull) >> 40);
        dst[i] = kind == CVLM_FILL_RANDOM
                     ? (unsigned char)(q4 ? v : (unsigned)((int)(v % 255u) - 127))
                 : q4 ? (unsigned char)((v + 8u) * 17u) /* both nibbles */
                      : (unsigned char)v;
    }
}

__global__ void k_fill_f32(float *dst, size_t n, float v)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = v;
}

/* A quantized tensor's parts: copied, or generated by its fill (scales: RANDOM the CPU
 * dummy scale, std 0.02 / std of the codes; ZEROS and ONES 1). */
static bool upload_quant(struct cuda_backend *cb, struct stage *st, const struct cvlm_tensor *t,
                         char *const *dst, const size_t *b, uint64_t key)
{
    int q4 = t->dtype == CVLM_DTYPE_Q4;
    if (t->data)
        return copy_bytes(cb, st, dst[P_DATA], t->data, b[P_DATA]) &&
               copy_bytes(cb, st, dst[P_SCALES], t->scales, b[P_SCALES]) &&
               (!b[P_MINS] || copy_bytes(cb, st, dst[P_MINS], t->mins, b[P_MINS])) &&
               (!b[P_PERM] || copy_bytes(cb, st, dst[P_PERM], t->perm, b[P_PERM]));
    float s = t->fill != CVLM_FILL_RANDOM ? 1.0f : q4 ? 0.02f / 4.61f : 0.02f / 73.3f;
    size_t ns = b[P_SCALES] / sizeof(float);
    k_fill_codes<<<cu_blocks(b[P_DATA], 256, 4096), 256, 0, cb->stream>>>(
        (unsigned char *)dst[P_DATA], b[P_DATA], t->fill, q4, key);
    if (!CU_LAUNCHED(cb, "fill codes"))
        return false;
    k_fill_f32<<<cu_blocks(ns, 256, 4096), 256, 0, cb->stream>>>((float *)dst[P_SCALES], ns, s);
    return CU_LAUNCHED(cb, "fill scales");
}

/* Byte offsets of each part of each tensor in the allocation, off[N_PARTS * i + part]
 * (NO_RANGE: nothing to upload; a shared tensor gets its first user's offsets). Returns
 * the total. */
static size_t plan_ranges(struct cvlm_tensor *const *ts, int n, size_t *off, char *own)
{
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        const struct cvlm_tensor *t = ts[i];
        int64_t numel = cvlm_tensor_numel(t);
        size_t *o = off + (size_t)N_PARTS * i, b[N_PARTS];
        for (int p = 0; p < N_PARTS; p++)
            o[p] = NO_RANGE;
        own[i] = 0;
        if (numel <= 0 || (!t->data && t->fill == CVLM_FILL_NONE))
            continue;
        for (int j = 0; t->data && j < i && o[P_DATA] == NO_RANGE; j++)
            if (ts[j]->data == t->data && ts[j]->dtype == t->dtype &&
                cvlm_tensor_numel(ts[j]) == numel &&
                (!cvlm_dtype_is_quant(t->dtype) ||
                 (ts[j]->scales == t->scales && ts[j]->mins == t->mins && ts[j]->perm == t->perm)))
                memcpy(o, off + (size_t)N_PARTS * j, N_PARTS * sizeof(size_t));
        if (o[P_DATA] != NO_RANGE)
            continue;
        own[i] = 1;
        part_bytes(t, b);
        for (int p = 0; p < N_PARTS; p++)
            if (b[p]) {
                o[p] = total;
                total += (b[p] + 255) / 256 * 256;
            }
    }
    return total;
}

/* Fills or copies every tensor that owns its range; false on error (recorded). */
static bool upload_all(struct cuda_backend *cb, struct cvlm_tensor *const *ts, int n,
                       const size_t *off, const char *own, char *base, uint64_t seed)
{
    struct stage st;
    bool ok = stage_init(cb, &st);
    for (int i = 0; ok && i < n; i++) {
        const struct cvlm_tensor *t = ts[i];
        const size_t *o = off + (size_t)N_PARTS * i;
        size_t numel = (size_t)cvlm_tensor_numel(t);
        uint64_t key = seed * 0x100000001b3ull + (uint64_t)i;
        if (o[P_DATA] == NO_RANGE || !own[i]) /* shared ranges: written by their first user */
            continue;
        if (cvlm_dtype_is_quant(t->dtype)) {
            char *dst[N_PARTS];
            size_t b[N_PARTS];
            part_bytes(t, b);
            for (int p = 0; p < N_PARTS; p++)
                dst[p] = o[p] == NO_RANGE ? NULL : base + o[p];
            ok = upload_quant(cb, &st, t, dst, b, key);
            continue;
        }
        bf16 *dst = (bf16 *)(base + o[P_DATA]);
        if (t->data) {
            ok = copy_tensor(cb, &st, dst, t, numel);
        } else {
            k_fill<<<cu_blocks(numel, 256, 4096), 256, 0, cb->stream>>>(dst, numel, t->fill,
                                                                        t->dtype, key);
            ok = CU_LAUNCHED(cb, "fill");
        }
    }
    ok = ok && CU_RT(cb, cudaStreamSynchronize(cb->stream));
    stage_free(&st);
    return ok;
}

static bool remember(struct cuda_backend *cb, void *base)
{
    if (cb->n_weights == cb->cap_weights) {
        int cap = cb->cap_weights ? 2 * cb->cap_weights : 8;
        void **p = (void **)realloc(cb->weights, (size_t)cap * sizeof(*p));
        if (!p)
            return false;
        cb->weights = p;
        cb->cap_weights = cap;
    }
    cb->weights[cb->n_weights++] = base;
    return true;
}

int cu_upload_weights(struct cvlm_backend *be, struct cvlm_tensor *const *ts, int n, uint64_t seed)
{
    struct cuda_backend *cb = cu_of(be);
    if (!cu_enter(cb))
        return cb->err ? cvlm_errf(cb->err, "%s", cb->err_msg) : CVLM_EIO;
    for (int i = 0; i < n; i++)
        if (ts[i]->dtype != CVLM_DTYPE_F32 && ts[i]->dtype != CVLM_DTYPE_F16 &&
            ts[i]->dtype != CVLM_DTYPE_BF16 && !cvlm_dtype_is_quant(ts[i]->dtype))
            return cvlm_errf(CVLM_EINVAL, "upload_weights: tensor %d has dtype %s (not a weight's)",
                             i, cvlm_dtype_name(ts[i]->dtype));
    for (int i = 0; i < n; i++) /* what the quantized kernels rely on (gemm_q.cu) */
        if (cvlm_dtype_is_quant(ts[i]->dtype) &&
            (ts[i]->ndim != 2 || (ts[i]->data && !ts[i]->scales) ||
             (ts[i]->dtype == CVLM_DTYPE_Q4 && ts[i]->shape[1] % 32)))
            return cvlm_errf(CVLM_EINVAL,
                             "upload_weights: tensor %d: a %s matrix needs 2 dimensions, scales "
                             "and (Q4) K a multiple of 32",
                             i, cvlm_dtype_name(ts[i]->dtype));
    size_t nn = (size_t)(n > 0 ? n : 1);
    size_t *off = (size_t *)malloc(nn * (N_PARTS * sizeof(size_t) + 1));
    char *own = (char *)(off + N_PARTS * nn);
    if (!off)
        return cvlm_errf(CVLM_ENOMEM, "out of memory");
    size_t total = plan_ranges(ts, n, off, own);
    char *base = NULL;
    int rc = 0;
    if (total == 0)
        goto out;
    if (cudaMalloc((void **)&base, total) != cudaSuccess) {
        cudaGetLastError(); /* out of memory: not sticky, the caller reports it */
        rc = cvlm_errf(CVLM_ENOMEM, "cuda device %d: no room for %.2f GB of weights", cb->device,
                       (double)total / 1e9);
        goto out;
    }
    if (!upload_all(cb, ts, n, off, own, base, seed) || !remember(cb, base)) {
        rc = cb->err ? cb->err : cvlm_errf(CVLM_ENOMEM, "out of memory");
        cudaFree(base);
        goto out;
    }
    for (int i = 0; i < n; i++) { /* only now: a failure above leaves the tensors untouched */
        const size_t *o = off + (size_t)N_PARTS * i;
        if (o[P_DATA] == NO_RANGE)
            continue;
        ts[i]->data = base + o[P_DATA];
        if (!cvlm_dtype_is_quant(ts[i]->dtype)) {
            ts[i]->dtype = CVLM_DTYPE_BF16;
            continue;
        }
        ts[i]->scales = (const float *)(base + o[P_SCALES]);
        ts[i]->mins = o[P_MINS] == NO_RANGE ? NULL : (const float *)(base + o[P_MINS]);
        ts[i]->perm = o[P_PERM] == NO_RANGE ? NULL : (const int32_t *)(base + o[P_PERM]);
    }
out:
    free(off);
    return rc;
}
