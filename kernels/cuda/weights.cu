/* weights.cu - upload_weights: a weight set into one device allocation, as BF16.
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

/* Copies (and converts to BF16) the data of t into dst: host data chunk by chunk through
 * the pinned staging buffers, device data directly. */
static bool copy_tensor(struct cuda_backend *cb, struct stage *st, bf16 *dst,
                        const struct cvlm_tensor *t, size_t n)
{
    size_t es = cvlm_dtype_size(t->dtype), bytes = n * es;
    const char *src = (const char *)t->data;
    if (on_device(src))
        return t->dtype == CVLM_DTYPE_BF16
                   ? CU_RT(cb, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, cb->stream))
                   : cu_convert_to_bf16(cb, dst, src, t->dtype, n);
    for (size_t done = 0; done < bytes;) {
        size_t chunk = bytes - done < STAGE_BYTES ? bytes - done : STAGE_BYTES;
        int s = st->next;
        st->next ^= 1;
        if (!CU_RT(cb, cudaEventSynchronize(st->ev[s]))) /* the slot's last chunk is through */
            return false;
        memcpy(st->host[s], src + done, chunk);
        if (t->dtype == CVLM_DTYPE_BF16) {
            if (!CU_RT(cb, cudaMemcpyAsync((char *)dst + done, st->host[s], chunk,
                                           cudaMemcpyHostToDevice, cb->stream)))
                return false;
        } else if (!CU_RT(cb, cudaMemcpyAsync(st->dev[s], st->host[s], chunk,
                                              cudaMemcpyHostToDevice, cb->stream)) ||
                   !cu_convert_to_bf16(cb, dst + done / es, st->dev[s], t->dtype, chunk / es)) {
            return false;
        }
        if (!CU_RT(cb, cudaEventRecord(st->ev[s], cb->stream)))
            return false;
        done += chunk;
    }
    return true;
}

/* Byte offsets of each tensor in the allocation (NO_RANGE: nothing to upload; a shared
 * tensor gets its first user's offset). Returns the total. */
static size_t plan_ranges(struct cvlm_tensor *const *ts, int n, size_t *off, char *own)
{
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        const struct cvlm_tensor *t = ts[i];
        int64_t numel = cvlm_tensor_numel(t);
        off[i] = NO_RANGE;
        own[i] = 0;
        if (numel <= 0 || (!t->data && t->fill == CVLM_FILL_NONE))
            continue;
        for (int j = 0; t->data && j < i && off[i] == NO_RANGE; j++)
            if (ts[j]->data == t->data && ts[j]->dtype == t->dtype &&
                cvlm_tensor_numel(ts[j]) == numel)
                off[i] = off[j];
        if (off[i] == NO_RANGE) {
            own[i] = 1;
            off[i] = total;
            total += ((size_t)numel * sizeof(bf16) + 255) / 256 * 256;
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
        size_t numel = (size_t)cvlm_tensor_numel(t);
        if (off[i] == NO_RANGE || !own[i]) /* shared ranges: written by their first user */
            continue;
        bf16 *dst = (bf16 *)(base + off[i]);
        if (t->data) {
            ok = copy_tensor(cb, &st, dst, t, numel);
        } else {
            uint64_t key = seed * 0x100000001b3ull + (uint64_t)i;
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
        if (cvlm_dtype_is_quant(ts[i]->dtype))
            return cvlm_errf(CVLM_EINVAL,
                             "the CUDA backend has no %s weight kernels yet: use --quantize none "
                             "with --backend cuda",
                             cvlm_dtype_name(ts[i]->dtype));
    size_t *off = (size_t *)malloc((size_t)(n > 0 ? n : 1) * (sizeof(size_t) + 1));
    char *own = (char *)(off + (n > 0 ? n : 1));
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
    for (int i = 0; i < n; i++) /* only now: a failure above leaves the tensors untouched */
        if (off[i] != NO_RANGE) {
            ts[i]->data = base + off[i];
            ts[i]->dtype = CVLM_DTYPE_BF16;
        }
out:
    free(off);
    return rc;
}
