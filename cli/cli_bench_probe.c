/* cli_bench_probe.c - the machine probes of `cogvlm bench`: memory bandwidth, the FMA
 * peak and GEMM throughput on the CPU backend, each the reference the model's figures are
 * stated against.
 *
 * Bandwidth is meant as an upper bound of what a kernel can stream: the copy is memcpy of
 * a 1 GiB buffer (read + write counted, STREAM convention); the read figure is the best of
 * several read-only passes over it with 1, 2, 4, 8 and 16 interleaved sequential streams
 * per thread (the hardware prefetchers of some cores need several streams per core to
 * reach DRAM's bandwidth, others fewer), all threads at once, best of 3 each.
 */
#include "cli/cli_bench_probe.h"

#include "base/clock.h"
#include "engine/error.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <emmintrin.h>
#endif

#define BW_BYTES ((size_t)1 << 30)

static double now_s(void)
{
    return cvlm_now_ms() / 1e3;
}

struct bw_arg {
    unsigned char *src, *dst;
    size_t n;
    int streams; /* 0: memcpy, else read-only with this many streams */
    uint64_t sum;
};

/* Sum of n bytes read as `streams` interleaved sequential streams (256 bytes of each in
 * turn). SSE2 is part of x86-64, so no dispatch. */
static uint64_t read_pass(const unsigned char *p, size_t n, int streams)
{
    size_t part = n / (size_t)streams / 256 * 256; /* bytes per stream */
#if defined(__x86_64__)
    __m128i a0 = _mm_setzero_si128(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < part; i += 256)
        for (int st = 0; st < streams; st++) {
            const __m128i *r = (const __m128i *)(p + (size_t)st * part + i);
            for (int v = 0; v < 16; v += 4) {
                a0 = _mm_add_epi64(a0, _mm_loadu_si128(r + v));
                a1 = _mm_add_epi64(a1, _mm_loadu_si128(r + v + 1));
                a2 = _mm_add_epi64(a2, _mm_loadu_si128(r + v + 2));
                a3 = _mm_add_epi64(a3, _mm_loadu_si128(r + v + 3));
            }
        }
    a0 = _mm_add_epi64(_mm_add_epi64(a0, a1), _mm_add_epi64(a2, a3));
    return (uint64_t)_mm_cvtsi128_si64(a0);
#else
    uint64_t acc[8] = {0}, sum = 0;
    for (size_t i = 0; i < part; i += 256)
        for (int st = 0; st < streams; st++) {
            const uint64_t *s = (const uint64_t *)(p + (size_t)st * part + i);
            for (int l = 0; l < 32; l++)
                acc[l & 7] += s[l];
        }
    for (int l = 0; l < 8; l++)
        sum += acc[l];
    return sum;
#endif
}

static void *bw_worker(void *p)
{
    struct bw_arg *a = p;
    if (a->streams)
        a->sum = read_pass(a->src, a->n, a->streams);
    else
        memcpy(a->dst, a->src, a->n);
    return NULL;
}

/* Best of 3 passes over the buffers, split over nt threads; returns seconds per pass. */
static double bw_pass(unsigned char *src, unsigned char *dst, int nt, int streams)
{
    double best = 1e30;
    for (int rep = 0; rep < 3; rep++) {
        pthread_t th[64];
        struct bw_arg args[64];
        int started[64] = {0};
        size_t part = BW_BYTES / (size_t)nt;
        double t0 = now_s();
        for (int t = 0; t < nt; t++) {
            args[t] = (struct bw_arg){src + t * part, dst + t * part, part, streams, 0};
            started[t] = t > 0 && !pthread_create(&th[t], NULL, bw_worker, &args[t]);
            if (t > 0 && !started[t])
                bw_worker(&args[t]);
        }
        bw_worker(&args[0]);
        for (int t = 1; t < nt; t++)
            if (started[t])
                pthread_join(th[t], NULL);
        double dt = now_s() - t0;
        best = dt < best ? dt : best;
    }
    return best;
}

int cvlm_probe_bandwidth(int nt, double *copy_gbs, double *read_gbs)
{
    unsigned char *src = malloc(BW_BYTES), *dst = malloc(BW_BYTES);
    if (!src || !dst) {
        free(src);
        free(dst);
        return cvlm_errf(CVLM_ENOMEM, "no memory for the 2 GiB bandwidth buffers");
    }
    memset(src, 1, BW_BYTES); /* fault every page in before timing */
    memset(dst, 2, BW_BYTES);
    nt = nt < 1 ? 1 : nt > 64 ? 64 : nt;
    *copy_gbs = 2.0 * BW_BYTES / bw_pass(src, dst, nt, 0) / 1e9;
    double best = 1e30;
    for (int streams = 1; streams <= 16; streams *= 2) {
        double s = bw_pass(src, dst, nt, streams);
        best = s < best ? s : best;
    }
    *read_gbs = (double)BW_BYTES / best / 1e9;
    free(src);
    free(dst);
    return 0;
}

/* F32 -> F16 by truncation, values below F16's normal range to 0 (probe data only). */
static uint16_t f16_of(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    int e = (int)((u >> 23) & 0xff) - 127 + 15;
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    return e <= 0 || e >= 31 ? sign : (uint16_t)(sign | (e << 10) | ((u >> 13) & 0x3ff));
}

int cvlm_probe_gemm(enum cvlm_dtype dt, int nt, int M, int N, int K, double *gflops)
{
    struct cvlm_backend *be = cvlm_backend_cpu_create(nt);
    size_t nw = (size_t)N * K;
    void *wd = malloc(nw * cvlm_dtype_size(dt));
    float *x = malloc((size_t)M * K * sizeof(float)), *dx = NULL, *dy = NULL;
    int rc = 0;
    if (!be || !wd || !x || !(dx = be->ops->alloc(be, (size_t)M * K * 4)) ||
        !(dy = be->ops->alloc(be, (size_t)M * N * 4))) {
        rc = cvlm_errf(CVLM_ENOMEM, "no memory for the GEMM probe");
        goto out;
    }
    /* weights uniform in about +-0.03 (their bit patterns are all the kernels see) */
    uint32_t h = 12345;
    for (size_t i = 0; i < nw; i++) {
        h = h * 1664525u + 1013904223u;
        float v = ((float)(h >> 8) / 16777216.0f - 0.5f) * 0.06f;
        if (dt == CVLM_DTYPE_F32)
            ((float *)wd)[i] = v;
        else if (dt == CVLM_DTYPE_BF16)
            ((uint16_t *)wd)[i] = cvlm_f32_to_bf16(v);
        else
            ((uint16_t *)wd)[i] = f16_of(v);
    }
    for (size_t i = 0; i < (size_t)M * K; i++)
        x[i] = (float)((i * 7919) % 2000) / 1000.0f - 1.0f;
    be->ops->from_host(be, dx, x, (size_t)M * K);
    struct cvlm_tensor w = {.dtype = dt, .ndim = 2, .shape = {N, K}, .data = wd};
    be->ops->gemm(be, dy, dx, K, &w, NULL, M, N, K); /* warm-up */
    double best = 1e30;
    for (int rep = 0; rep < 5; rep++) { /* best of 5 runs of >= 0.1 s each */
        double t0 = now_s(), t;
        int it = 0;
        do {
            be->ops->gemm(be, dy, dx, K, &w, NULL, M, N, K);
            it++;
        } while ((t = now_s() - t0) < 0.1);
        best = t / it < best ? t / it : best;
    }
    *gflops = 2.0 * M * N * K / best / 1e9;
out:
    if (be) {
        be->ops->free(be, dx);
        be->ops->free(be, dy);
        be->ops->destroy(be);
    }
    free(wd);
    free(x);
    return rc;
}
