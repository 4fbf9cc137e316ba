/* peak.c - the CPU's measured FMA peak on the backend's instruction-set path: the figure
 * the GEMM's efficiency is stated against (`cogvlm bench`).
 *
 * Each thread runs independent multiply-add chains on registers only (no memory operand),
 * enough of them to cover the FMA latency on every core we know (12 AVX2 / 16 AVX-512
 * chains: Zen 3 and Skylake need 8, two pipes x 4 cycles); flops = 2 per lane per FMA.
 * The scalar path counts a multiply and an add (baseline x86-64 has no FMA).
 */
#include "base/clock.h"
#include "kernels/cpu/cpu.h"

#include <pthread.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define PEAK_ITERS 20000000L /* iterations per thread: ~0.1-0.2 s at 3 GHz */

struct peak_arg {
    enum cpu_isa isa;
    double flop;
    float sink;
};

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) static double peak_avx2(float *sink)
{
    __m256 a[12];
    const __m256 b = _mm256_set1_ps(0.999f), c = _mm256_set1_ps(1e-3f);
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++)
        a[i] = _mm256_set1_ps((float)i);
    for (long it = 0; it < PEAK_ITERS; it++) {
#pragma GCC unroll 12
        for (int i = 0; i < 12; i++)
            a[i] = _mm256_fmadd_ps(a[i], b, c);
    }
    float s = 0;
    for (int i = 0; i < 12; i++)
        s += _mm256_cvtss_f32(a[i]);
    *sink = s;
    return (double)PEAK_ITERS * 12 * 8 * 2;
}

__attribute__((target("avx512f"))) static double peak_avx512(float *sink)
{
    __m512 a[16];
    const __m512 b = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(1e-3f);
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++)
        a[i] = _mm512_set1_ps((float)i);
    for (long it = 0; it < PEAK_ITERS; it++) {
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++)
            a[i] = _mm512_fmadd_ps(a[i], b, c);
    }
    float s = 0;
    for (int i = 0; i < 16; i++)
        s += _mm512_cvtss_f32(a[i]);
    *sink = s;
    return (double)PEAK_ITERS * 16 * 16 * 2;
}
#endif

static double peak_scalar(float *sink)
{
    /* 4-wide SSE multiply + add on x86-64 (what the compiler makes of the scalar kernels),
     * written portably: 16 independent chains */
    float a[16];
    for (int i = 0; i < 16; i++)
        a[i] = (float)i;
    for (long it = 0; it < PEAK_ITERS / 4; it++)
        for (int i = 0; i < 16; i++)
            a[i] = a[i] * 0.999f + 1e-3f;
    float s = 0;
    for (int i = 0; i < 16; i++)
        s += a[i];
    *sink = s;
    return (double)PEAK_ITERS / 4 * 16 * 2;
}

static void *peak_thread(void *p)
{
    struct peak_arg *a = p;
#if defined(__x86_64__)
    if (a->isa >= CPU_ISA_AVX512)
        a->flop = peak_avx512(&a->sink);
    else if (a->isa >= CPU_ISA_AVX2)
        a->flop = peak_avx2(&a->sink);
    else
#endif
        a->flop = peak_scalar(&a->sink);
    return NULL;
}

double cvlm_backend_cpu_fma_peak(int n_threads)
{
    enum cpu_isa isa = cvlm_cpu_detect_isa();
    struct peak_arg args[64];
    pthread_t th[64];
    int nt = n_threads < 1 ? 1 : n_threads > 64 ? 64 : n_threads, started[64] = {0};
    double best = 0;
    for (int rep = 0; rep < 3; rep++) { /* best of 3: a preempted thread only lowers it */
        double t0 = cvlm_now_ms(), flop = 0;
        for (int t = 0; t < nt; t++) {
            args[t] = (struct peak_arg){.isa = isa};
            started[t] = t > 0 && !pthread_create(&th[t], NULL, peak_thread, &args[t]);
            if (!started[t] && t > 0)
                peak_thread(&args[t]);
        }
        peak_thread(&args[0]);
        for (int t = 0; t < nt; t++) {
            if (started[t])
                pthread_join(th[t], NULL);
            flop += args[t].flop;
        }
        double s = (cvlm_now_ms() - t0) / 1e3, g = s > 0 ? flop / s / 1e9 : 0;
        best = g > best ? g : best;
    }
    return best;
}

const char *cvlm_backend_cpu_isa(void)
{
    return cvlm_cpu_isa_name(cvlm_cpu_detect_isa());
}
