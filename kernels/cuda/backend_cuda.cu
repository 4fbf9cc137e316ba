/* backend_cuda.cu - the CUDA backend: creation, the op table, errors, device memory, the
 * metadata ring, scratch, and the host <-> device copies.
 *
 * Ownership: the backend owns its stream, library handles, every block alloc handed out
 * that was not freed (released at destroy), the weight allocations of upload_weights and
 * its scratch. The op families live in their own files (gemm.cu, norm.cu, elementwise.cu,
 * rope.cu, attention.cu, attention_decode.cu, weights.cu); see common.cuh for the rules
 * shared by all of them.
 */
#include "kernels/cuda/attention.cuh"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/elementwise.cuh"
#include "kernels/cuda/gemm.cuh"
#include "kernels/cuda/norm.cuh"
#include "kernels/cuda/rope.cuh"
#include "kernels/cuda/weights.cuh"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LT_WORKSPACE ((size_t)32 << 20) /* cuBLASLt workspace; 32 MiB suits Hopper */
#define SMALL_ALLOC ((size_t)1 << 20)   /* below: 256-byte granules; above: 2 MiB */
#define FREE_LIST_MAX ((size_t)2 << 30) /* cached free bytes beyond which blocks go back */

/* ---- errors ---------------------------------------------------------------------------- */

void cu_fail(struct cuda_backend *cb, int code, const char *file, int line, const char *fmt, ...)
{
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    const char *base = strrchr(file, '/');
    base = base ? base + 1 : file;
    if (!cb->err) { /* the first error explains the others: keep it */
        cb->err = code;
        snprintf(cb->err_msg, sizeof(cb->err_msg), "cuda device %d: %s:%d: %s", cb->device, base,
                 line, msg);
    }
    cvlm_errf(code, "cuda device %d: %s:%d: %s", cb->device, base, line, msg);
}

static int rt_code(cudaError_t e)
{
    return e == cudaErrorMemoryAllocation ? CVLM_ENOMEM
           : e == cudaErrorNoDevice || e == cudaErrorInvalidDevice ||
                   e == cudaErrorNoKernelImageForDevice
               ? CVLM_EUNSUPPORTED
               : CVLM_EIO; /* a device failure: the closest of the engine's codes */
}

bool cu_check_rt(struct cuda_backend *cb, cudaError_t e, const char *what, const char *file,
                 int line)
{
    if (e == cudaSuccess)
        return true;
    cu_fail(cb, rt_code(e), file, line, "%s: %s (%s)", what, cudaGetErrorString(e),
            cudaGetErrorName(e));
    return false;
}

bool cu_check_blas(struct cuda_backend *cb, cublasStatus_t s, const char *what, const char *file,
                   int line)
{
    if (s == CUBLAS_STATUS_SUCCESS)
        return true;
    cu_fail(cb, s == CUBLAS_STATUS_ALLOC_FAILED ? CVLM_ENOMEM : CVLM_EIO, file, line, "%s: %s",
            what, cublasGetStatusString(s));
    return false;
}

/* cu_enter without opening a step (alloc and free are not ops of a step) */
static bool enter_quiet(struct cuda_backend *cb)
{
    if (cb->err) { /* the op is skipped: say why on this thread */
        cvlm_errf(cb->err, "%s", cb->err_msg);
        return false;
    }
    /* cheap when already current; needed because ranks are created on one thread and run
     * on others, and NCCL initialisation changes the current device */
    return CU_RT(cb, cudaSetDevice(cb->device));
}

bool cu_enter(struct cuda_backend *cb)
{
    cb->in_step = 1;
    return enter_quiet(cb);
}

static void safe_point(struct cuda_backend *cb);

extern "C" int cvlm_backend_cuda_status(struct cvlm_backend *be, int clear)
{
    struct cuda_backend *cb = cu_of(be);
    if (!cb->err && CU_RT(cb, cudaSetDevice(cb->device)) &&
        CU_RT(cb, cudaStreamSynchronize(cb->stream)))
        safe_point(cb); /* the stream is idle and the caller is between steps */
    int rc = cb->err;
    if (rc)
        cvlm_errf(rc, "%s", cb->err_msg);
    if (clear) {
        cb->err = 0;
        cb->err_msg[0] = 0;
        cudaGetLastError(); /* a non-sticky runtime error would otherwise resurface */
    }
    return rc;
}

static int cu_status(struct cvlm_backend *be)
{
    return cvlm_backend_cuda_status(be, 0);
}

extern "C" int cvlm_cuda_device_count(void)
{
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

/* ---- device memory: a free list over cudaMalloc ------------------------------------------- */

static size_t round_alloc(size_t bytes)
{
    if (bytes <= SMALL_ALLOC)
        return (bytes + 255) / 256 * 256 + (bytes == 0) * 256;
    return (bytes + (SMALL_ALLOC * 2 - 1)) / (SMALL_ALLOC * 2) * (SMALL_ALLOC * 2);
}

/* A free block that fits `cap` without wasting more than a quarter; unlinked. */
static struct cu_block *take_free(struct cuda_backend *cb, size_t cap)
{
    struct cu_block **best = NULL;
    for (struct cu_block **pp = &cb->free_list; *pp; pp = &(*pp)->next)
        if ((*pp)->cap >= cap && (*pp)->cap <= cap + cap / 4 &&
            (!best || (*pp)->cap < (*best)->cap))
            best = pp;
    if (!best)
        return NULL;
    struct cu_block *b = *best;
    *best = b->next;
    cb->free_bytes -= b->cap;
    return b;
}

/* cudaFree of every block of a list (cudaFree synchronizes the device, so kernels still
 * using a block have finished). Only at a safe point (common.cuh). */
static void free_blocks(struct cu_block **list)
{
    while (*list) {
        struct cu_block *b = *list;
        *list = b->next;
        cudaFree(b->p);
        free(b);
    }
}

/* Gives every cached free block back to the driver (safe points only). */
static void release_free(struct cuda_backend *cb)
{
    free_blocks(&cb->free_list);
    cb->free_bytes = 0;
}

/* Between steps: the deferred blocks go back, the free list is trimmed to its bound, and
 * a new step may begin. The caller has synchronized the stream. */
static void safe_point(struct cuda_backend *cb)
{
    pthread_mutex_lock(&cb->mem_mu);
    free_blocks(&cb->deferred);
    if (cb->free_bytes > FREE_LIST_MAX)
        release_free(cb);
    cb->in_step = 0;
    pthread_mutex_unlock(&cb->mem_mu);
}

/* Replacing a device buffer inside a step: defer_node() takes the list node first (NULL:
 * out of host memory, recorded), so that a failure changes nothing; defer_push() then
 * puts the old buffer `p` (cap bytes, maybe NULL) on the deferred list, where kernels
 * queued on it may go on using it until the next safe point. */
static struct cu_block *defer_node(struct cuda_backend *cb)
{
    struct cu_block *b = (struct cu_block *)calloc(1, sizeof(*b));
    if (!b)
        cu_fail(cb, CVLM_ENOMEM, __FILE__, __LINE__, "out of host memory");
    return b;
}

static void defer_push(struct cuda_backend *cb, struct cu_block *b, void *p, size_t cap)
{
    if (!p) {
        free(b);
        return;
    }
    b->p = p;
    b->cap = cap;
    pthread_mutex_lock(&cb->mem_mu);
    b->next = cb->deferred;
    cb->deferred = b;
    pthread_mutex_unlock(&cb->mem_mu);
}

static void *cu_alloc(struct cvlm_backend *be, size_t bytes)
{
    struct cuda_backend *cb = cu_of(be);
    size_t cap = round_alloc(bytes);
    void *p = NULL;
    if (!enter_quiet(cb))
        return NULL;
    pthread_mutex_lock(&cb->mem_mu);
    struct cu_block *b = take_free(cb, cap);
    if (!b && (b = (struct cu_block *)calloc(1, sizeof(*b)))) {
        cudaError_t e = cudaMalloc(&p, cap);
        if (e == cudaErrorMemoryAllocation && (cb->free_bytes || cb->deferred) && !cb->in_step) {
            cudaGetLastError(); /* clear, give the cache back, try once more */
            free_blocks(&cb->deferred);
            release_free(cb);
            e = cudaMalloc(&p, cap);
        }
        if (e != cudaSuccess) {
            cudaGetLastError(); /* out of memory is the caller's to handle, not sticky */
            cvlm_errf(rt_code(e), "cuda device %d: cudaMalloc(%zu bytes): %s", cb->device, cap,
                      cudaGetErrorString(e));
            free(b);
            b = NULL;
        } else {
            b->p = p;
            b->cap = cap;
        }
    }
    if (b) {
        b->next = cb->live;
        cb->live = b;
    }
    pthread_mutex_unlock(&cb->mem_mu);
    return b ? b->p : NULL;
}

static void cu_free(struct cvlm_backend *be, void *p)
{
    struct cuda_backend *cb = cu_of(be);
    if (!p)
        return;
    pthread_mutex_lock(&cb->mem_mu);
    for (struct cu_block **pp = &cb->live; *pp; pp = &(*pp)->next) {
        if ((*pp)->p != p)
            continue;
        struct cu_block *b = *pp;
        *pp = b->next;
        /* kept for reuse: a later user's kernels run after this one's on the stream;
         * beyond FREE_LIST_MAX the list is trimmed at the next safe point */
        b->next = cb->free_list;
        cb->free_list = b;
        cb->free_bytes += b->cap;
        break;
    }
    pthread_mutex_unlock(&cb->mem_mu);
}

void *cu_scratch(struct cuda_backend *cb, enum cu_scratch_id id, size_t bytes)
{
    if (bytes <= cb->scratch_cap[id])
        return cb->scratch[id];
    /* the old buffer may be in use by queued kernels: it goes at the next safe point */
    size_t cap = round_alloc(bytes + bytes / 4);
    void *p = NULL;
    struct cu_block *node = defer_node(cb);
    if (!node)
        return NULL;
    if (!CU_RT(cb, cudaMalloc(&p, cap))) {
        free(node);
        return NULL;
    }
    defer_push(cb, node, cb->scratch[id], cb->scratch_cap[id]);
    cb->scratch[id] = p;
    cb->scratch_cap[id] = cap;
    return p;
}

void *cu_host_tmp(struct cuda_backend *cb, size_t bytes)
{
    if (bytes <= cb->host_tmp_cap)
        return cb->host_tmp;
    void *p = realloc(cb->host_tmp, bytes + bytes / 2);
    if (!p) {
        cu_fail(cb, CVLM_ENOMEM, __FILE__, __LINE__, "out of host memory (%zu bytes)", bytes);
        return NULL;
    }
    cb->host_tmp = p;
    cb->host_tmp_cap = bytes + bytes / 2;
    return p;
}

/* ---- the metadata ring ------------------------------------------------------------------- */

/* Host metadata is copied into pinned memory and sent with cudaMemcpyAsync on the stream,
 * so kernels read it in order and the caller's arrays may change on return. The ring
 * has two halves: when the cursor moves into a half, the host waits for the event
 * recorded when it last left that half, i.e. until the copies out of it have run, which
 * lets the GPU lag behind the host by up to one half of uploads. */
static void meta_switch_half(struct cuda_backend *cb)
{
    CU_RT(cb, cudaEventRecord(cb->meta_ev[cb->meta_half], cb->stream));
    cb->meta_half ^= 1;
    CU_RT(cb, cudaEventSynchronize(cb->meta_ev[cb->meta_half]));
    cb->meta_off = (size_t)cb->meta_half * CU_META_HALF;
    for (int i = 0; i < CU_META_CACHE; i++) /* those bytes are about to be overwritten */
        if (cb->meta_cache[i].half == cb->meta_half)
            cb->meta_cache[i].half = -1;
}

static void meta_remember(struct cuda_backend *cb, const void *host, size_t n, const void *dev)
{
    struct cu_meta_entry *e = &cb->meta_cache[cb->meta_next];
    if (n > e->cap) {
        void *p = realloc(e->host, n);
        if (!p)
            return; /* only a cache */
        e->host = p;
        e->cap = n;
    }
    memcpy(e->host, host, n);
    e->n = n;
    e->dev = dev;
    e->half = cb->meta_half;
    cb->meta_next = (cb->meta_next + 1) % CU_META_CACHE;
}

/* Uploads larger than half the ring: into a dedicated buffer, once the stream is idle. */
static const void *meta_big(struct cuda_backend *cb, const void *host, size_t n)
{
    if (!CU_RT(cb, cudaStreamSynchronize(cb->stream)))
        return NULL;
    if (n > cb->meta_big_cap) { /* the old one goes at the next safe point */
        struct cu_block *node = defer_node(cb);
        char *p = NULL;
        if (!node)
            return NULL;
        if (!CU_RT(cb, cudaMalloc((void **)&p, n))) {
            free(node);
            return NULL;
        }
        defer_push(cb, node, cb->meta_big, cb->meta_big_cap);
        cb->meta_big = p;
        cb->meta_big_cap = n;
    }
    /* on the stream: a synchronous cudaMemcpy from pageable memory may return before its
     * DMA is done, and the (non-blocking) stream's next kernels would not wait for it */
    if (!CU_RT(cb, cudaMemcpyAsync(cb->meta_big, host, n, cudaMemcpyHostToDevice, cb->stream)))
        return NULL;
    return cb->meta_big;
}

const void *cu_upload(struct cuda_backend *cb, const void *host, size_t n)
{
    size_t a = (n + 255) / 256 * 256;
    if (n == 0)
        return cb->meta_dev;
    /* only entries of the current half: one in the other half would be overwritten as
     * soon as a later upload (possibly of the same op) switches into it */
    for (int i = 0; i < CU_META_CACHE; i++) {
        const struct cu_meta_entry *e = &cb->meta_cache[i];
        if (e->half == cb->meta_half && e->n == n && !memcmp(e->host, host, n))
            return e->dev;
    }
    if (a > CU_META_HALF)
        return meta_big(cb, host, n);
    if (cb->meta_off + a > (size_t)(cb->meta_half + 1) * CU_META_HALF)
        meta_switch_half(cb);
    if (cb->err)
        return NULL;
    size_t at = cb->meta_off;
    memcpy(cb->meta_host + at, host, n);
    if (!CU_RT(cb, cudaMemcpyAsync(cb->meta_dev + at, cb->meta_host + at, n, cudaMemcpyHostToDevice,
                                   cb->stream)))
        return NULL;
    cb->meta_off += a;
    meta_remember(cb, host, n, cb->meta_dev + at);
    return cb->meta_dev + at;
}

/* ---- host <-> device ------------------------------------------------------------------------ */

static void fill_nan(float *dst, size_t n)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = NAN;
}

static void cu_to_host(struct cvlm_backend *be, float *dst, const void *src, size_t n)
{
    struct cuda_backend *cb = cu_of(be);
    float *tmp;
    if (n == 0)
        return;
    if (!cu_enter(cb) || !(tmp = (float *)cu_scratch(cb, CU_SCRATCH_CONV, n * sizeof(float))) ||
        !cu_convert_bf16_to_f32(cb, tmp, src, n) ||
        !CU_RT(cb,
               cudaMemcpyAsync(dst, tmp, n * sizeof(float), cudaMemcpyDeviceToHost, cb->stream)) ||
        !CU_RT(cb, cudaStreamSynchronize(cb->stream))) {
        /* the op table has no error return: make the failure impossible to miss */
        fill_nan(dst, n);
        if (cb->err)
            cvlm_errf(cb->err, "%s", cb->err_msg);
    }
}

static void cu_from_host(struct cvlm_backend *be, void *dst, const float *src, size_t n)
{
    struct cuda_backend *cb = cu_of(be);
    float *tmp;
    if (n == 0 || !cu_enter(cb) ||
        !(tmp = (float *)cu_scratch(cb, CU_SCRATCH_CONV, n * sizeof(float))))
        return;
    /* from pageable memory: returns once src has been staged, so src may change after */
    if (CU_RT(cb, cudaMemcpyAsync(tmp, src, n * sizeof(float), cudaMemcpyHostToDevice, cb->stream)))
        cu_convert_f32_to_bf16(cb, dst, tmp, n);
}

/* ---- creation / destruction ------------------------------------------------------------------ */

static void cu_destroy(struct cvlm_backend *be)
{
    struct cuda_backend *cb = cu_of(be);
    if (!cb)
        return;
    cudaSetDevice(cb->device);
    if (cb->stream)
        cudaStreamSynchronize(cb->stream);
    cu_gemm_cache_destroy(cb);
    while (cb->live) {
        struct cu_block *b = cb->live;
        cb->live = b->next;
        cudaFree(b->p);
        free(b);
    }
    release_free(cb);
    free_blocks(&cb->deferred);
    for (int i = 0; i < cb->n_weights; i++)
        cudaFree(cb->weights[i]);
    free(cb->weights);
    for (int i = 0; i < CU_SCRATCH_N; i++)
        cudaFree(cb->scratch[i]);
    for (int i = 0; i < CU_META_CACHE; i++)
        free(cb->meta_cache[i].host);
    for (int i = 0; i < 2; i++)
        if (cb->meta_ev[i])
            cudaEventDestroy(cb->meta_ev[i]);
    cudaFreeHost(cb->meta_host);
    cudaFree(cb->meta_dev);
    cudaFree(cb->meta_big);
    cudaFree(cb->lt_ws);
    if (cb->lt)
        cublasLtDestroy(cb->lt);
    if (cb->blas)
        cublasDestroy(cb->blas);
    if (cb->stream)
        cudaStreamDestroy(cb->stream);
    free(cb->host_tmp);
    pthread_mutex_destroy(&cb->mem_mu);
    free(cb);
}

static const struct cvlm_backend_i cuda_ops = {
    .name = "cuda",
    .alloc = cu_alloc,
    .free = cu_free,
    .to_host = cu_to_host,
    .from_host = cu_from_host,
    .copy_rows = cu_copy_rows,
    .gemm = cu_gemm,
    .embed = cu_embed,
    .rmsnorm = cu_rmsnorm,
    .layernorm = cu_layernorm,
    .add = cu_add,
    .add_rmsnorm = cu_add_rmsnorm,
    .add_row = cu_add_row,
    .gelu = cu_gelu,
    .silu_mul = cu_silu_mul,
    .rope = cu_rope,
    .attention_full = cu_attention_full,
    .kv_write = cu_kv_write,
    .attention_paged = cu_attention_paged,
    .patchify = cu_patchify,
    .upload_weights = cu_upload_weights,
    .status = cu_status,
    .destroy = cu_destroy,
};

/* Device checks and properties; 0 or a CVLM_E* code (detail recorded). */
static int probe_device(struct cuda_backend *cb, int device)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || device < 0 || device >= n)
        return cvlm_errf(CVLM_EUNSUPPORTED, "no CUDA device %d (%d found%s%s)", device,
                         e == cudaSuccess ? n : 0, e == cudaSuccess ? "" : ": ",
                         e == cudaSuccess ? "" : cudaGetErrorString(e));
    cudaDeviceProp p;
    if (!CU_RT(cb, cudaSetDevice(device)) || !CU_RT(cb, cudaGetDeviceProperties(&p, device)))
        return cb->err;
    if (p.major < 8) /* BF16 tensor cores and the kernels' sm_80 baseline */
        return cvlm_errf(CVLM_EUNSUPPORTED, "CUDA device %d (%s) is sm_%d%d; sm_80 or newer needed",
                         device, p.name, p.major, p.minor);
    cb->sm_count = p.multiProcessorCount;
    cb->cc_major = p.major;
    cb->cc_minor = p.minor;
    cb->smem_optin = p.sharedMemPerBlockOptin;
    return 0;
}

static int init_handles(struct cuda_backend *cb)
{
    if (!CU_RT(cb, cudaStreamCreateWithFlags(&cb->stream, cudaStreamNonBlocking)) ||
        !CU_BLAS(cb, cublasCreate(&cb->blas)) ||
        !CU_BLAS(cb, cublasSetStream(cb->blas, cb->stream)) ||
        !CU_BLAS(cb, cublasLtCreate(&cb->lt)) || !CU_RT(cb, cudaMalloc(&cb->lt_ws, LT_WORKSPACE)))
        return cb->err;
    cb->lt_ws_size = LT_WORKSPACE;
    if (!CU_RT(cb,
               cudaHostAlloc((void **)&cb->meta_host, 2 * CU_META_HALF, cudaHostAllocDefault)) ||
        !CU_RT(cb, cudaMalloc((void **)&cb->meta_dev, 2 * CU_META_HALF)) ||
        !CU_RT(cb, cudaEventCreateWithFlags(&cb->meta_ev[0], cudaEventDisableTiming)) ||
        !CU_RT(cb, cudaEventCreateWithFlags(&cb->meta_ev[1], cudaEventDisableTiming)))
        return cb->err;
    for (int i = 0; i < CU_META_CACHE; i++)
        cb->meta_cache[i].half = -1;
    return cu_gemm_cache_create(cb);
}

extern "C" struct cvlm_backend *cvlm_backend_cuda_create(int device)
{
    struct cuda_backend *cb = (struct cuda_backend *)calloc(1, sizeof(*cb));
    if (!cb) {
        cvlm_errf(CVLM_ENOMEM, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&cb->mem_mu, NULL);
    cb->device = device;
    cb->base.ops = &cuda_ops;
    cb->base.act_dtype = CVLM_DTYPE_BF16;
    cb->base.n_threads = 1;
    const char *attn = getenv("COGVLM_CUDA_ATTN");
    cb->attn_simple = attn && !strcmp(attn, "simple");
    int rc = probe_device(cb, device);
    if (rc || (rc = init_handles(cb))) {
        char msg[512];
        snprintf(msg, sizeof(msg), "%s", cvlm_last_error());
        cu_destroy(&cb->base);
        cvlm_errf(rc, "%s", msg); /* keep the first detail */
        return NULL;
    }
    return &cb->base;
}
