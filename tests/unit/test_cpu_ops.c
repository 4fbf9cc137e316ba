/* test_cpu_ops.c - every op of the CPU backend against a naive double-precision reference.
 *
 * Each test runs on every instruction-set path this machine supports (forced with
 * COGVLM_CPU_ISA at backend creation: scalar, avx2, avx512, avx512bf16) and with 1 and 2
 * threads. GEMMs cover F32/F16/BF16 weights and awkward shapes (M = 1, 3, 9, 13, 30; N and
 * K off every multiple of 8/16/32; K = 4100; strided x; bias). The reference widens the
 * stored weights exactly as the kernels must, so the only difference allowed is F32
 * rounding: |y - ref| <= tol * sum_k |x_k w_k| with tol 1e-5 (F32 accumulation over up to
 * 4100 terms), and the element-wise ops are held to a few ulp of their double reference.
 * Last, the random weights of engine/model/weights_dummy.c (used by `cogvlm bench`): seeded,
 * scaled like an init, and identical after cvlm_weights_write + cvlm_weights_load.
 */
#include "engine/model/quantize.h"
#include "engine/model/weights.h"
#include "kernels/cpu/cpu.h"
#include "tests/unit/harness.h"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- helpers ------------------------------------------------------------------------- */

static const char *const isa_names[] = {"scalar", "avx2", "avx512", "avx512bf16"};

/* Number of ISA paths to test: those up to the best one this CPU has. */
static int n_isas(void)
{
    char *saved = getenv("COGVLM_CPU_ISA") ? strdup(getenv("COGVLM_CPU_ISA")) : NULL;
    unsetenv("COGVLM_CPU_ISA");
    int best = (int)cvlm_cpu_detect_isa();
    if (saved) {
        setenv("COGVLM_CPU_ISA", saved, 1);
        free(saved);
    }
    return best + 1;
}

static struct cvlm_backend *make_backend(int isa, int threads)
{
    setenv("COGVLM_CPU_ISA", isa_names[isa], 1);
    struct cvlm_backend *be = cvlm_backend_cpu_create(threads);
    unsetenv("COGVLM_CPU_ISA");
    return be;
}

static uint64_t rng_state = 88172645463325252ull;

static float frand(void) /* uniform in [-1, 1) */
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) * (1.0 / 8388608.0) - 1.0);
}

static float *rand_floats(size_t n, float scale)
{
    float *p = malloc(n * sizeof(float) + 64);
    for (size_t i = 0; p && i < n; i++)
        p[i] = frand() * scale;
    return p;
}

/* IEEE half from float (round to nearest even; test values are in the normal range). */
static uint16_t to_f16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u, man = u & 0x7fffffu;
    int e = (int)((u >> 23) & 0xff) - 127 + 15;
    if (e <= 0)
        return (uint16_t)sign; /* flush tiny values: fine for test data */
    uint32_t h = sign | ((uint32_t)e << 10) | (man >> 13), rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1)))
        h++;
    return (uint16_t)h;
}

/* A weight tensor [rows, cols] (cols 0: 1-D) of random values in dtype; *wide receives the
 * exactly widened values for the reference. */
static struct cvlm_tensor make_weight(enum cvlm_dtype dt, int rows, int cols, float scale,
                                      float **wide)
{
    size_t n = (size_t)rows * (cols ? cols : 1);
    struct cvlm_tensor t = {.dtype = dt, .ndim = cols ? 2 : 1, .shape = {rows, cols}};
    float *f = rand_floats(n, scale);
    void *data = malloc(n * cvlm_dtype_size(dt) + 64);
    for (size_t i = 0; i < n; i++) {
        if (dt == CVLM_DTYPE_BF16)
            ((uint16_t *)data)[i] = cvlm_f32_to_bf16(f[i]);
        else if (dt == CVLM_DTYPE_F16)
            ((uint16_t *)data)[i] = to_f16(f[i]);
        else
            ((float *)data)[i] = f[i];
    }
    t.data = data;
    for (size_t i = 0; i < n; i++)
        f[i] = cvlm_tensor_get_f32(&t, (int64_t)i);
    *wide = f;
    return t;
}

/* Backend buffer holding host floats. */
static float *dev_copy(struct cvlm_backend *be, const float *src, size_t n)
{
    float *p = be->ops->alloc(be, n * sizeof(float));
    if (p)
        be->ops->from_host(be, p, src, n);
    return p;
}

/* ---- GEMM ---------------------------------------------------------------------------- */

struct gemm_case {
    int M, N, K, stride_pad, bias;
};

static const struct gemm_case gemm_cases[] = {
    {1, 1, 1, 0, 0},     {1, 37, 100, 0, 1},   {1, 256, 4096, 0, 0}, {2, 70, 33, 5, 1},
    {3, 70, 4100, 0, 0}, {4, 129, 257, 3, 1},  {5, 31, 17, 0, 1},    {8, 64, 300, 0, 0},
    {9, 45, 259, 0, 1},  {13, 100, 513, 7, 0}, {30, 67, 1000, 0, 1}, {64, 96, 32, 0, 1},
    {17, 300, 70, 0, 0}, {200, 33, 48, 2, 1},  {4, 32, 588, 0, 1},   {5, 96, 32, 0, 1},
    {4, 172, 64, 0, 0},  {4, 64, 172, 0, 0},   {32, 9, 2050, 0, 0},  {33, 70, 1030, 3, 1},
    {7, 33, 15, 1, 1},   {25, 47, 2049, 0, 1},
};

/* Runs one case; returns the worst error / (sum |x w| + tiny), or -1 on setup failure. */
static double gemm_err(struct cvlm_backend *be, const struct gemm_case *c, enum cvlm_dtype dt)
{
    int M = c->M, N = c->N, K = c->K, ld = K + c->stride_pad;
    float *wf, *bf = NULL, *x = rand_floats((size_t)M * ld, 1.0f), *y = malloc((size_t)M * N * 4);
    struct cvlm_tensor w = make_weight(dt, N, K, 0.5f, &wf), b = {0};
    if (c->bias)
        b = make_weight(dt, N, 0, 1.0f, &bf);
    float *dx = dev_copy(be, x, (size_t)M * ld), *dy = be->ops->alloc(be, (size_t)M * N * 4);
    double worst = -1;
    if (x && y && dx && dy) {
        be->ops->gemm(be, dy, dx, ld, &w, c->bias ? &b : NULL, M, N, K);
        be->ops->to_host(be, y, dy, (size_t)M * N);
        worst = 0;
        for (int m = 0; m < M; m++)
            for (int n = 0; n < N; n++) {
                double ref = bf ? bf[n] : 0, mag = bf ? fabs(bf[n]) : 0;
                for (int k = 0; k < K; k++) {
                    double p = (double)x[(size_t)m * ld + k] * wf[(size_t)n * K + k];
                    ref += p;
                    mag += fabs(p);
                }
                double e = fabs(y[(size_t)m * N + n] - ref) / (mag + 1e-30);
                worst = e > worst || isnan(e) ? e : worst;
            }
    }
    be->ops->free(be, dx);
    be->ops->free(be, dy);
    free(x);
    free(y);
    free(wf);
    free(bf);
    free((void *)w.data);
    free((void *)b.data);
    return worst;
}

TEST(cpu_ops_gemm)
{
    static const enum cvlm_dtype dts[] = {CVLM_DTYPE_F32, CVLM_DTYPE_F16, CVLM_DTYPE_BF16};
    int nisa = n_isas();
    for (int isa = 0; isa < nisa; isa++)
        for (int threads = 1; threads <= 2; threads++) {
            struct cvlm_backend *be = make_backend(isa, threads);
            REQUIRE(be);
            for (size_t i = 0; i < sizeof(gemm_cases) / sizeof(gemm_cases[0]); i++)
                for (int d = 0; d < 3; d++) {
                    const struct gemm_case *c = &gemm_cases[i];
                    double e = gemm_err(be, c, dts[d]);
                    CHECKF(e >= 0 && e <= 1e-5, "%s t=%d %s M=%d N=%d K=%d: rel err %.3g",
                           isa_names[isa], threads, cvlm_dtype_name(dts[d]), c->M, c->N, c->K, e);
                }
            be->ops->destroy(be);
        }
}

/* Rows of x up to which the driver takes the AVX2 int8-x decode kernel. */
static int qdot_use_m(void)
{
#if defined(__x86_64__)
    return CVLM_CPU_QDOT_USE_M;
#else
    return 0;
#endif
}

/* From this many rows of x on, Q4 weights take the AVX2 integer GEMM (x rounded as in
 * decode), and Q8 weights too where the backend has AVX-512 VNNI; INT_MAX where there is
 * no such kernel. */
static int q4gemm_min_m(void)
{
#if defined(__x86_64__)
    return CVLM_CPU_AVX2_GEMV_MAX_M + 1;
#else
    return INT_MAX;
#endif
}

/* The elements over which the AVX2 decode kernels (kernels/cpu/q_dot_avx2.c) take
 * x's scale: blocks of 32 for Q8, groups of CVLM_QX_GROUP (whole blocks) for Q4. */
static int x_group_size(enum cvlm_dtype dt)
{
    return dt == CVLM_DTYPE_Q4 ? CVLM_QX_GROUP : 32;
}

/* max |x| / 127 over the group of gs elements that holds element k, as the decode kernels
 * take it: its elements in whole blocks of 32 (the tail K % 32 is not rounded). */
static double x_group_d(const float *x, int k, int K, int gs)
{
    int g0 = k / gs * gs, g1 = g0 + gs < K / 32 * 32 ? g0 + gs : K / 32 * 32;
    double m = 0;
    for (int i = g0; i < g1; i++)
        m = fmax(m, fabs(x[i]));
    return m / 127;
}

/* x as the AVX2 decode kernels see it: each group of gs elements in whole blocks of 32
 * rounded to q d, q = round(x * (127 / max|x|)) (to nearest even, in float), d = max|x| /
 * 127; the tail (K % 32) as it is. */
static void round_x_blocks(const float *x, float *out, int K, int gs)
{
    for (int g = 0; g < K; g += gs) {
        int g1 = g + gs < K / 32 * 32 ? g + gs : K / 32 * 32;
        float m = 0;
        for (int k = g; k < g1; k++)
            m = fabsf(x[k]) > m ? fabsf(x[k]) : m;
        float id = m > 0 ? 127.0f / m : 0.0f, d = m / 127.0f;
        for (int k = g; k < g + gs && k < K; k++)
            out[k] = k < g1 ? nearbyintf(x[k] * id) * d : x[k];
    }
}

/* Quantized weights (Q8 per row, Q4 in groups of 128): the kernels against the
 * dequantized matrix (cvlm_tensor_get_f32), every ISA path, 1 and 2 threads, M from 1
 * (decode) through the small-M kernel to the packed GEMM, K with tails and partial groups. */
TEST(cpu_ops_gemm_quantized)
{
    static const struct gemm_case qc[] = {
        {1, 37, 100, 0, 1},
        {1, 70, 4096, 0, 0},
        {2, 70, 224, 5, 1},
        {3, 9, 1000, 0, 0},
        {5, 64, 256, 3, 0},
        {6, 33, 96, 0, 1},
        {7, 40, 160, 0, 0},
        {13, 100, 512, 7, 0},
        {16, 130, 672, 0, 1},
        {32, 9, 2048, 0, 0},
        {33, 70, 1024, 3, 1},
        {64, 96, 32, 0, 1},
        {200, 33, 800, 2, 1},
        {4, 172, 688, 0, 0},
        /* the AVX2 decode's tiles (M <= 8): K = 32 x odd (a slot of one Q4 block), short last
         * groups, K < 32 (Q8: all tail), N not a multiple of the 8 / 4 / 1-row tiles, M = 9 */
        {8, 45, 416, 3, 1},
        {9, 19, 352, 0, 0},
        {1, 13, 32, 0, 1},
        {2, 11, 96, 1, 0},
        {3, 21, 4000, 0, 0},
        {1, 10, 20, 0, 0},
        {5, 9, 1184, 1, 1},
        /* the Q4 integer GEMM (M > 32): x rows 3 a tile (and the 1 or 2 left), W rows 2 (and
         * 1 left), a short last group of 1 or 3 blocks, more than 64 groups (K 8320) */
        {35, 9, 4000, 0, 1},
        {34, 17, 8320, 1, 0},
        {40, 6, 224, 0, 0},
    };
    int nisa = n_isas();
    for (size_t i = 0; i < sizeof(qc) / sizeof(qc[0]); i++)
        for (int q = 0; q < 2; q++) {
            const struct gemm_case *c = &qc[i];
            enum cvlm_dtype dt = q ? CVLM_DTYPE_Q4 : CVLM_DTYPE_Q8;
            if (dt == CVLM_DTYPE_Q4 && c->K % 32)
                continue;
            int M = c->M, N = c->N, K = c->K, ld = K + c->stride_pad;
            float *wf, *bf = NULL, *x = rand_floats((size_t)M * ld, 1.0f);
            struct cvlm_tensor w = make_weight(CVLM_DTYPE_F32, N, K, 0.5f, &wf), b = {0};
            const void *fdata = w.data;
            if (c->bias)
                b = make_weight(CVLM_DTYPE_F32, N, 0, 1.0f, &bf);
            size_t nb = cvlm_dtype_bytes(dt, (size_t)N * K);
            void *codes = calloc(1, nb + 8);
            float *scales = malloc((size_t)N * (K / 32 + 1) * sizeof(float));
            REQUIRE(x && codes && scales);
            cvlm_quantize_into(&w, dt, codes, scales);
            /* the quantization itself: every value within half a step of the original, or
             * (int4's scale search may clip) at the end of the code range it lies beyond */
            double qerr = 0;
            for (int n = 0; n < N; n++)
                for (int k = 0; k < K; k++) {
                    float s = scales[(size_t)n * cvlm_quant_groups(&w) + k / cvlm_quant_group(&w)];
                    float v = cvlm_tensor_get_f32(&w, (int64_t)n * K + k), o = wf[n * K + k];
                    double e = fabs(v - o);
                    if (dt == CVLM_DTYPE_Q4 && ((v == 7 * s && o > v) || (v == -8 * s && o < v)))
                        e = 0;
                    qerr = e / (0.5 * s + 1e-30) > qerr ? e / (0.5 * s + 1e-30) : qerr;
                }
            CHECKF(qerr <= 1.0001, "%s M=%d N=%d K=%d: a code is %.3g half-steps off",
                   cvlm_dtype_name(dt), M, N, K, qerr);
            float *ref = malloc((size_t)M * N * sizeof(float)), *y = malloc((size_t)M * N * 4);
            float *refq = malloc((size_t)M * N * sizeof(float)), *xq = malloc((size_t)K * 4);
            double *mag = malloc((size_t)M * N * sizeof(double));
            REQUIRE(ref && y && refq && xq && mag);
            for (int m = 0; m < M; m++) {
                round_x_blocks(x + (size_t)m * ld, xq, K, x_group_size(dt));
                for (int n = 0; n < N; n++) {
                    double r = bf ? bf[n] : 0, a = bf ? fabs(bf[n]) : 0, rq = r;
                    for (int k = 0; k < K; k++) {
                        double v = cvlm_tensor_get_f32(&w, (int64_t)n * K + k);
                        r += (double)x[(size_t)m * ld + k] * v;
                        rq += (double)xq[k] * v;
                        a += fabs((double)x[(size_t)m * ld + k] * v);
                    }
                    ref[(size_t)m * N + n] = (float)r;
                    refq[(size_t)m * N + n] = (float)rq;
                    mag[(size_t)m * N + n] = a;
                }
            }
            for (int isa = 0; isa < nisa; isa++)
                for (int threads = 1; threads <= 2; threads++) {
                    struct cvlm_backend *be = make_backend(isa, threads);
                    REQUIRE(be);
                    float *dx = dev_copy(be, x, (size_t)M * ld),
                          *dy = be->ops->alloc(be, (size_t)M * N * 4);
                    REQUIRE(dx && dy);
                    be->ops->gemm(be, dy, dx, ld, &w, c->bias ? &b : NULL, M, N, K);
                    be->ops->to_host(be, y, dy, (size_t)M * N);
                    /* decode on AVX2 rounds x to 8 bits per block of 32 (Q8) or group of 128
                     * (Q4) (d = max|x| / 127; a Q8 tail of K % 32 stays float): each product
                     * may then be off by |w| d / 2 on top */
                    int xq8 =
                        isa >= 1 &&
                        (M <= qdot_use_m() ||
                         ((dt == CVLM_DTYPE_Q4 || cpu_of(be)->has_vnni) && M >= q4gemm_min_m()));
                    double worst = 0, worst_q = 0;
                    for (size_t j = 0; j < (size_t)M * N; j++) {
                        const float *xr = x + j / N * ld;
                        /* and exactly: against the product with x rounded the same way */
                        double eq = fabs(y[j] - refq[j]) / (mag[j] + 1e-30);
                        worst_q = xq8 && (eq > worst_q || isnan(eq)) ? eq : worst_q;
                        double slack = 0;
                        for (int k = 0; xq8 && k < K / 32 * 32; k++)
                            slack += fabs(cvlm_tensor_get_f32(&w, (int64_t)(j % N) * K + k)) *
                                     x_group_d(xr, k, K, x_group_size(dt)) / 2;
                        double e = fmax(0, fabs(y[j] - ref[j]) - slack) / (mag[j] + 1e-30);
                        worst = e > worst || isnan(e) ? e : worst;
                    }
                    CHECKF(worst <= 1e-5, "%s t=%d %s M=%d N=%d K=%d: rel err %.3g", isa_names[isa],
                           threads, cvlm_dtype_name(dt), M, N, K, worst);
                    CHECKF(worst_q <= 1e-5, "%s t=%d %s M=%d N=%d K=%d: vs 8-bit x: rel err %.3g",
                           isa_names[isa], threads, cvlm_dtype_name(dt), M, N, K, worst_q);
                    be->ops->free(be, dx);
                    be->ops->free(be, dy);
                    be->ops->destroy(be);
                }
            free(ref);
            free(refq);
            free(xq);
            free(mag);
            free(y);
            free(x);
            free(wf);
            free(bf);
            free((void *)fdata);
            free((void *)b.data);
            free(codes);
            free(scales);
        }
}

#if defined(__x86_64__)
/* Worst relative error of y[m][n] (m < M, n in [n0, n1), rows ldy apart) against W times x
 * rounded as the int8-x kernels round it (round_x_blocks). */
static double qdot_worst(const float *y, int ldy, const float *x, int ld, int M,
                         const struct cvlm_tensor *w, int n0, int n1, int K)
{
    float *xq = malloc((size_t)K * 4);
    double worst = 0;
    for (int m = 0; xq && m < M; m++) {
        round_x_blocks(x + (size_t)m * ld, xq, K, x_group_size(w->dtype));
        for (int n = n0; n < n1; n++) {
            double r = 0, a = 0;
            for (int k = 0; k < K; k++) {
                double v = cvlm_tensor_get_f32(w, (int64_t)n * K + k);
                r += xq[k] * v;
                a += fabs(x[(size_t)m * ld + k] * v);
            }
            double e = fabs(y[(size_t)m * ldy + n] - r) / (a + 1e-30);
            worst = e > worst || isnan(e) ? e : worst;
        }
    }
    free(xq);
    return xq ? worst : INFINITY;
}
#endif

/* The int8-x kernels themselves: the decode kernel at every M it takes
 * (1..CVLM_CPU_QDOT_MAX_M; the driver uses it for fewer) and the Q4 GEMM (each on AVX2,
 * and on AVX-512 VNNI where the CPU has it; the Q8 GEMM on VNNI only) at those M and at
 * 40 and 41 (the driver uses them for M > 32): against the product with x rounded as they
 * round it, rows [n0, n1) of awkward ranges, x rows ldx apart. */
TEST(cpu_ops_gemv_qdot_avx2_every_m)
{
#if defined(__x86_64__)
    static const int shapes[][2] = {{45, 416}, {21, 4000}, {13, 32}, {11, 1184}, {10, 1000}};
    enum { MAXR = 41 };
    if (n_isas() < 2)
        return; /* no AVX2 */
    struct cvlm_backend *be = make_backend(n_isas() - 1, 1);
    REQUIRE(be);
    const int vnni = cpu_of(be)->has_vnni; /* the AVX-512 VNNI kernels run here too */
    be->ops->destroy(be);
    for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++)
        for (int q = 0; q < 2; q++) {
            const int N = shapes[i][0], K = shapes[i][1], ld = K + 3;
            enum cvlm_dtype dt = q ? CVLM_DTYPE_Q4 : CVLM_DTYPE_Q8;
            if (dt == CVLM_DTYPE_Q4 && K % 32)
                continue;
            float *wf, *x = rand_floats((size_t)MAXR * ld, 1.0f);
            struct cvlm_tensor w = make_weight(CVLM_DTYPE_F32, N, K, 0.5f, &wf);
            const void *fdata = w.data;
            void *codes = calloc(1, (size_t)N * K + 8);
            float *scales = malloc((size_t)N * (K / 32 + 1) * sizeof(float));
            float *qx = aligned_alloc(64, cvlm_cpu_qx_floats(MAXR, K) * 4 + 64);
            float *y = malloc((size_t)MAXR * N * 4);
            REQUIRE(x && codes && scales && qx && y);
            cvlm_quantize_into(&w, dt, codes, scales);
            for (int M = 1; M <= MAXR; M = M < CVLM_CPU_QDOT_MAX_M ? M + 1 : M < 40 ? 40 : M + 1) {
                const int n0 = N > 9 ? 3 : 0, n1 = N - (N > 9);
                cvlm_cpu_quant_x_avx2(qx, x, ld, M, K, dt);
                for (int v = 0; M <= CVLM_CPU_QDOT_MAX_M && v <= vnni; v++) { /* AVX2, VNNI */
                    if (v)
                        cvlm_cpu_gemv_qdot_avx512vnni(y, N, qx, x, ld, M, &w, n0, n1, K);
                    else
                        cvlm_cpu_gemv_qdot_avx2(y, N, qx, x, ld, M, &w, n0, n1, K);
                    double worst = qdot_worst(y, N, x, ld, M, &w, n0, n1, K);
                    CHECKF(worst <= 1e-5, "%s%s M=%d N=%d K=%d rows %d..%d: rel err %.3g",
                           cvlm_dtype_name(dt), v ? " VNNI" : "", M, N, K, n0, n1, worst);
                }
                /* Q4: AVX2, VNNI; Q8: VNNI only */
                for (int v = dt == CVLM_DTYPE_Q8; v <= vnni; v++) {
                    for (size_t j = 0; j < (size_t)M * N; j++)
                        y[j] = NAN; /* rows outside [n0, n1) must stay untouched */
                    if (dt == CVLM_DTYPE_Q8)
                        cvlm_cpu_gemm_q8dot_avx512vnni(y, N, qx, x, ld, M, &w, n0, n1, K);
                    else if (v)
                        cvlm_cpu_gemm_q4dot_avx512vnni(y, N, qx, M, &w, n0, n1, K);
                    else
                        cvlm_cpu_gemm_q4dot_avx2(y, N, qx, M, &w, n0, n1, K);
                    double worst = qdot_worst(y, N, x, ld, M, &w, n0, n1, K);
                    CHECKF(worst <= 1e-5, "%s GEMM%s M=%d N=%d K=%d rows %d..%d: rel err %.3g",
                           cvlm_dtype_name(dt), v ? " VNNI" : "", M, N, K, n0, n1, worst);
                    int kept = 1;
                    for (int m = 0; m < M; m++)
                        for (int n = 0; n < N; n++)
                            kept &= (n >= n0 && n < n1) || isnan(y[(size_t)m * N + n]);
                    CHECKF(kept, "%s GEMM%s M=%d N=%d K=%d wrote outside rows %d..%d",
                           cvlm_dtype_name(dt), v ? " VNNI" : "", M, N, K, n0, n1);
                }
            }
            free(x);
            free(wf);
            free((void *)fdata);
            free(codes);
            free(scales);
            free(qx);
            free(y);
        }
#endif
}

/* A non-finite x through the quantized kernels (x rounded to 8 bits per block or group on
 * AVX2: decode, and Q4's GEMM at 40 rows) makes every output NaN or infinite, as the float
 * product does: never a finite number. */
TEST(cpu_ops_gemm_quantized_nonfinite_x)
{
    enum { N = 11, K = 256, MAXR = 40 };
    int nisa = n_isas();
    float *wf, *x = rand_floats((size_t)MAXR * K, 1.0f), y[MAXR * N];
    struct cvlm_tensor w = make_weight(CVLM_DTYPE_F32, N, K, 0.5f, &wf);
    const void *fdata = w.data;
    void *codes = calloc(1, (size_t)N * K + 8);
    float *scales = malloc((size_t)N * (K / 32 + 1) * sizeof(float));
    REQUIRE(x && codes && scales);
    for (int q = 0; q < 2; q++) {
        cvlm_quantize_into(&w, q ? CVLM_DTYPE_Q4 : CVLM_DTYPE_Q8, codes, scales);
        for (int v = 0; v < 2; v++) {
            for (int m = 0; m < MAXR; m++) /* one in every row, in a different group */
                x[(size_t)m * K + (70 + 61 * m) % K] = !v ? NAN : m % 2 ? -INFINITY : INFINITY;
            for (int isa = 0; isa < nisa; isa++) {
                struct cvlm_backend *be = make_backend(isa, 2);
                REQUIRE(be);
                float *dx = dev_copy(be, x, (size_t)MAXR * K), *dy = be->ops->alloc(be, sizeof(y));
                REQUIRE(dx && dy);
                for (int M = 1; M <= MAXR; M = M < 2 ? M + 1 : M == 2 ? MAXR : MAXR + 1) {
                    be->ops->gemm(be, dy, dx, K, &w, NULL, M, N, K);
                    be->ops->to_host(be, y, dy, (size_t)M * N);
                    for (int j = 0; j < M * N; j++)
                        CHECKF(!isfinite(y[j]), "%s %s M=%d x %s: y[%d] = %g", isa_names[isa],
                               q ? "Q4" : "Q8", M, v ? "inf" : "NaN", j, y[j]);
                }
                be->ops->free(be, dx);
                be->ops->free(be, dy);
                be->ops->destroy(be);
            }
        }
        w.data = fdata;
        w.dtype = CVLM_DTYPE_F32;
        w.scales = NULL;
    }
    free(x);
    free(wf);
    free((void *)fdata);
    free(codes);
    free(scales);
}

/* ---- element-wise ops, norms, embedding ------------------------------------------------ */

/* Runs `body` once per (ISA path, thread count) with a fresh backend `be`. */
#define FOR_EACH_BACKEND(be, isa, threads)                                 \
    for (int isa = 0, nisa_ = n_isas(); isa < nisa_; isa++)                \
        for (int threads = 1; threads <= 2; threads++)                     \
            for (struct cvlm_backend *be = make_backend(isa, threads); be; \
                 be->ops->destroy(be), be = NULL)

TEST(cpu_ops_norms)
{
    FOR_EACH_BACKEND(be, isa, threads)
    {
        static const int Ds[] = {1, 7, 64, 100, 4100};
        for (size_t di = 0; di < 5; di++)
            for (int d = 0; d < 3; d++) {
                int M = 3, D = Ds[di];
                float *wf, *bf, *x = rand_floats((size_t)M * D, 3.0f),
                                *y = malloc((size_t)M * D * 4);
                struct cvlm_tensor w = make_weight((enum cvlm_dtype)d, D, 0, 1.0f, &wf);
                struct cvlm_tensor b = make_weight((enum cvlm_dtype)d, D, 0, 1.0f, &bf);
                float *dx = dev_copy(be, x, (size_t)M * D),
                      *dy = be->ops->alloc(be, (size_t)M * D * 4);
                double worst = 0;
                for (int ln = 0; ln < 2; ln++) {
                    if (ln)
                        be->ops->layernorm(be, dy, dx, &w, &b, M, D, 1e-5f);
                    else
                        be->ops->rmsnorm(be, dy, dx, &w, M, D, 1e-6f);
                    be->ops->to_host(be, y, dy, (size_t)M * D);
                    for (int m = 0; m < M; m++) {
                        const float *xr = x + (size_t)m * D;
                        double mean = 0, var = 0;
                        for (int i = 0; i < D; i++)
                            mean += ln ? xr[i] : 0;
                        mean /= D;
                        for (int i = 0; i < D; i++)
                            var += (xr[i] - mean) * (xr[i] - mean);
                        double r = 1.0 / sqrt(var / D + (ln ? 1e-5 : 1e-6));
                        for (int i = 0; i < D; i++) {
                            double ref = (xr[i] - mean) * r * wf[i] + (ln ? bf[i] : 0);
                            double mag = fabs((xr[i] - mean) * r * wf[i]) + (ln ? fabs(bf[i]) : 0);
                            double e = fabs(y[(size_t)m * D + i] - ref) / (mag + 1e-30);
                            worst = e > worst || isnan(e) ? e : worst;
                        }
                    }
                    CHECKF(worst <= 2e-6, "%s t=%d %s D=%d %s: rel err %.3g", isa_names[isa],
                           threads, cvlm_dtype_name(w.dtype), D, ln ? "layernorm" : "rmsnorm",
                           worst);
                }
                be->ops->free(be, dx);
                be->ops->free(be, dy);
                free(x), free(y), free(wf), free(bf), free((void *)w.data), free((void *)b.data);
            }
    }
}

/* add_rmsnorm is exactly add then rmsnorm (the model relies on it), also with y == r. */
TEST(cpu_ops_add_rmsnorm)
{
    FOR_EACH_BACKEND(be, isa, threads)
    {
        int M = 5, D = 4100;
        size_t n = (size_t)M * D;
        float *wf, *x = rand_floats(n, 3.0f), *r = rand_floats(n, 1.0f), *a = malloc(n * 4),
                   *b = malloc(n * 4), *xa = malloc(n * 4), *xb = malloc(n * 4);
        struct cvlm_tensor w = make_weight(CVLM_DTYPE_BF16, D, 0, 1.0f, &wf);
        float *dx1 = dev_copy(be, x, n), *dx2 = dev_copy(be, x, n), *dr1 = dev_copy(be, r, n),
              *dr2 = dev_copy(be, r, n), *dy = be->ops->alloc(be, n * 4);
        be->ops->add(be, dx1, dr1, n); /* unfused */
        be->ops->rmsnorm(be, dy, dx1, &w, M, D, 1e-5f);
        be->ops->to_host(be, a, dy, n);
        be->ops->add_rmsnorm(be, dr2, dx2, dr2, &w, M, D, 1e-5f); /* fused, y aliases r */
        be->ops->to_host(be, b, dr2, n);
        be->ops->to_host(be, xa, dx1, n);
        be->ops->to_host(be, xb, dx2, n);
        CHECKF(!memcmp(a, b, n * 4) && !memcmp(xa, xb, n * 4), "%s t=%d: fused differs",
               isa_names[isa], threads);
        float *bufs[] = {dx1, dx2, dr1, dr2, dy};
        for (int i = 0; i < 5; i++)
            be->ops->free(be, bufs[i]);
        free(x), free(r), free(a), free(b), free(xa), free(xb), free(wf), free((void *)w.data);
    }
}

/* max over i of |got - ref| / (tol_rel |ref| + tol_abs_i) where tol_abs_i = abs_scale |x_i| */
static double ew_check(const float *got, const double *ref, const float *x, size_t n, double rel,
                       double abs_scale)
{
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double tol = rel * fabs(ref[i]) + abs_scale * fabs(x[i]) + 1e-37;
        double e = fabs(got[i] - ref[i]) / tol;
        worst = e > worst || isnan(e) ? e : worst;
    }
    return worst;
}

TEST(cpu_ops_gelu_add)
{
    FOR_EACH_BACKEND(be, isa, threads)
    {
        static const size_t ns[] = {1, 15, 17, 33, 40000};
        for (size_t ni = 0; ni < 5; ni++) {
            size_t n = ns[ni];
            float *x = rand_floats(n, 8.0f), *x2 = rand_floats(n, 2.0f), *y = malloc(n * 4);
            double *ref = malloc(n * sizeof(double));
            float *dx = dev_copy(be, x, n), *dx2 = dev_copy(be, x2, n);
            /* gelu: the vector paths use an erf with |error| <= 1.5e-7 */
            be->ops->gelu(be, dx, n);
            be->ops->to_host(be, y, dx, n);
            for (size_t i = 0; i < n; i++)
                ref[i] = 0.5 * x[i] * (1.0 + erf(x[i] / sqrt(2.0)));
            double e = ew_check(y, ref, x, n, 4e-7, 1e-7);
            CHECKF(e <= 1, "%s t=%d gelu n=%zu: err %.3g of tolerance", isa_names[isa], threads, n,
                   e);
            /* add: exact */
            be->ops->from_host(be, dx, x, n);
            be->ops->add(be, dx, dx2, n);
            be->ops->to_host(be, y, dx, n);
            for (size_t i = 0; i < n; i++)
                ref[i] = (double)(x[i] + x2[i]);
            CHECKF(ew_check(y, ref, x, n, 0, 0) == 0, "%s add n=%zu", isa_names[isa], n);
            be->ops->free(be, dx);
            be->ops->free(be, dx2);
            free(x), free(x2), free(y), free(ref);
        }
    }
}

TEST(cpu_ops_silu_mul_add_row)
{
    FOR_EACH_BACKEND(be, isa, threads)
    {
        int M = 3, N = 37, stride = 2 * N + 3; /* fused [gate | up] rows */
        float *gu = rand_floats((size_t)M * stride, 12.0f), *y = malloc((size_t)M * N * 4);
        double *ref = malloc((size_t)M * N * sizeof(double));
        float *dgu = dev_copy(be, gu, (size_t)M * stride),
              *dy = be->ops->alloc(be, (size_t)M * N * 4);
        be->ops->silu_mul(be, dy, dgu, (float *)dgu + N, stride, M, N);
        be->ops->to_host(be, y, dy, (size_t)M * N);
        for (int m = 0; m < M; m++)
            for (int i = 0; i < N; i++) {
                double g = gu[(size_t)m * stride + i], u = gu[(size_t)m * stride + N + i];
                ref[(size_t)m * N + i] = g / (1 + exp(-g)) * u;
            }
        double e = ew_check(y, ref, y, (size_t)M * N, 1e-6, 0);
        CHECKF(e <= 1, "%s t=%d silu_mul: err %.3g of tolerance", isa_names[isa], threads, e);
        /* in place (out == gate, row stride N), as the model calls it */
        float *g = malloc((size_t)M * N * 4), *u = malloc((size_t)M * N * 4);
        for (int m = 0; m < M; m++) {
            memcpy(g + (size_t)m * N, gu + (size_t)m * stride, (size_t)N * 4);
            memcpy(u + (size_t)m * N, gu + (size_t)m * stride + N, (size_t)N * 4);
        }
        float *dg = dev_copy(be, g, (size_t)M * N), *du = dev_copy(be, u, (size_t)M * N);
        be->ops->silu_mul(be, dg, dg, du, N, M, N);
        be->ops->to_host(be, y, dg, (size_t)M * N);
        CHECK(ew_check(y, ref, y, (size_t)M * N, 1e-6, 0) <= 1);
        be->ops->free(be, dg);
        be->ops->free(be, du);
        free(g), free(u);
        for (int d = 0; d < 3; d++) {
            float *bf, *x = rand_floats((size_t)M * N, 1.0f);
            struct cvlm_tensor b = make_weight((enum cvlm_dtype)d, N, 0, 1.0f, &bf);
            be->ops->from_host(be, dy, x, (size_t)M * N);
            be->ops->add_row(be, dy, &b, M, N);
            be->ops->to_host(be, y, dy, (size_t)M * N);
            for (int i = 0; i < M * N; i++)
                ref[i] = (double)(x[i] + bf[i % N]);
            CHECK(ew_check(y, ref, y, (size_t)M * N, 0, 0) == 0);
            free(x), free(bf), free((void *)b.data);
        }
        be->ops->free(be, dgu);
        be->ops->free(be, dy);
        free(gu), free(y), free(ref);
    }
}

TEST(cpu_ops_embed_copy_rows_patchify)
{
    FOR_EACH_BACKEND(be, isa, threads)
    {
        int V = 50, D = 19;
        int32_t ids[5] = {3, 0, 49, 3, 17};
        float *y = malloc(5 * (size_t)D * 4), *dy = be->ops->alloc(be, 5 * (size_t)D * 4);
        for (int d = 0; d < 3; d++) {
            float *tf;
            struct cvlm_tensor t = make_weight((enum cvlm_dtype)d, V, D, 1.0f, &tf);
            be->ops->embed(be, dy, &t, ids, 5, D);
            be->ops->to_host(be, y, dy, 5 * (size_t)D);
            for (int i = 0; i < 5; i++)
                CHECK(!memcmp(y + i * D, tf + (size_t)ids[i] * D, (size_t)D * 4));
            free(tf), free((void *)t.data);
        }
        float *src = rand_floats(6 * (size_t)D, 1.0f), *dsrc = dev_copy(be, src, 6 * (size_t)D);
        int32_t rows[4] = {5, 0, 5, 2};
        be->ops->copy_rows(be, dy, dsrc, rows, 4, D);
        be->ops->to_host(be, y, dy, 4 * (size_t)D);
        for (int i = 0; i < 4; i++)
            CHECK(!memcmp(y + i * D, src + (size_t)rows[i] * D, (size_t)D * 4));
        /* patchify: C=3, 6x4 image, P=2 -> 6 patches of 12 values ordered (c, ky, kx) */
        float px[3 * 6 * 4], out[6 * 12], *dout = be->ops->alloc(be, sizeof(out));
        for (int i = 0; i < 72; i++)
            px[i] = (float)i;
        be->ops->patchify(be, dout, px, 3, 6, 4, 2);
        be->ops->to_host(be, out, dout, 72);
        for (int p = 0, ok = 1; p < 6 && ok; p++)
            for (int c = 0; c < 3; c++)
                for (int ky = 0; ky < 2; ky++)
                    for (int kx = 0; kx < 2; kx++) {
                        float want = px[(c * 6 + (p / 2) * 2 + ky) * 4 + (p % 2) * 2 + kx];
                        ok &= out[p * 12 + (c * 2 + ky) * 2 + kx] == want;
                        CHECK(ok);
                    }
        be->ops->free(be, dy);
        be->ops->free(be, dsrc);
        be->ops->free(be, dout);
        free(y), free(src);
    }
}

TEST(cpu_ops_rope)
{
    FOR_EACH_BACKEND(be, isa, threads)
    {
        int M = 4, H = 3, hd = 10, stride = H * hd + 6;
        int32_t pos[4] = {0, 1, 77, 4095};
        float inv[5], *x = rand_floats((size_t)M * stride, 2.0f),
                      *y = malloc((size_t)M * stride * 4);
        for (int j = 0; j < 5; j++)
            inv[j] = 1.0f / powf(10000.0f, (float)(2 * j) / (float)hd);
        float *dx = dev_copy(be, x, (size_t)M * stride);
        be->ops->rope(be, dx, stride, pos, M, H, hd, inv);
        be->ops->to_host(be, y, dx, (size_t)M * stride);
        double worst = 0;
        for (int m = 0; m < M; m++)
            for (int h = 0; h < H; h++)
                for (int k = 0; k < hd / 2; k++) {
                    const float *v = x + (size_t)m * stride + h * hd;
                    double ang = (double)((float)pos[m] * inv[k]); /* angle in F32 */
                    double a = v[k], b = v[k + hd / 2], c = cos(ang), s = sin(ang);
                    double r0 = a * c - b * s, r1 = b * c + a * s, mag = fabs(a) + fabs(b);
                    const float *g = y + (size_t)m * stride + h * hd;
                    double e = fmax(fabs(g[k] - r0), fabs(g[k + hd / 2] - r1)) / mag;
                    worst = e > worst ? e : worst;
                }
        CHECKF(worst <= 1e-6, "%s t=%d rope: rel err %.3g", isa_names[isa], threads, worst);
        for (int m = 0; m < M; m++) /* columns past the heads are untouched */
            CHECK(!memcmp(y + (size_t)m * stride + H * hd, x + (size_t)m * stride + H * hd, 24));
        be->ops->free(be, dx);
        free(x), free(y);
    }
}

/* ---- attention ---------------------------------------------------------------------- */

/* o[hd] = softmax(scale q.k_j) v_j over n keys/values rows ldk apart, in double */
static void ref_attend(double *o, const float *q, const float *k, const float *v, int ld, int n,
                       int hd)
{
    double *s = malloc((size_t)n * sizeof(double)), mx = -INFINITY, sum = 0;
    for (int j = 0; j < n; j++) {
        double d = 0;
        for (int i = 0; i < hd; i++)
            d += (double)q[i] * k[(size_t)j * ld + i];
        s[j] = d / sqrt((double)hd);
        mx = s[j] > mx ? s[j] : mx;
    }
    for (int j = 0; j < n; j++)
        sum += (s[j] = exp(s[j] - mx));
    for (int i = 0; i < hd; i++) {
        o[i] = 0;
        for (int j = 0; j < n; j++)
            o[i] += s[j] / sum * v[(size_t)j * ld + i];
    }
    free(s);
}

TEST(cpu_ops_attention_full)
{
    static const int shapes[][3] = {{1, 1, 16}, {5, 2, 16}, {37, 3, 112}, {70, 2, 64}, {19, 1, 20}};
    FOR_EACH_BACKEND(be, isa, threads)
    {
        for (int si = 0; si < 5; si++) {
            int N = shapes[si][0], H = shapes[si][1], hd = shapes[si][2], D = H * hd;
            float *qkv = rand_floats((size_t)N * 3 * D, 2.0f), *o = malloc((size_t)N * D * 4);
            float *dqkv = dev_copy(be, qkv, (size_t)N * 3 * D),
                  *dout = be->ops->alloc(be, (size_t)N * D * 4);
            double ref[112], worst = 0;
            be->ops->attention_full(be, dout, dqkv, N, H, hd);
            be->ops->to_host(be, o, dout, (size_t)N * D);
            for (int t = 0; t < N; t++)
                for (int h = 0; h < H; h++) {
                    ref_attend(ref, qkv + (size_t)t * 3 * D + h * hd, qkv + D + h * hd,
                               qkv + 2 * D + h * hd, 3 * D, N, hd);
                    for (int i = 0; i < hd; i++) {
                        double e = fabs(o[(size_t)t * D + h * hd + i] - ref[i]);
                        worst = e > worst || isnan(e) ? e : worst;
                    }
                }
            CHECKF(worst <= 2e-6, "%s t=%d N=%d H=%d hd=%d: abs err %.3g (values in [-2, 2))",
                   isa_names[isa], threads, N, H, hd, worst);
            be->ops->free(be, dqkv);
            be->ops->free(be, dout);
            free(qkv), free(o);
        }
    }
}

/* Three sequences over a shared paged cache with scattered block tables: a history written
 * first, then one batch mixing prefill tokens of two sequences and a decode token.
 * H query heads over Hkv KV heads (GQA when Hkv < H); the cache holds Hkv heads per slot. */
struct paged_fixture {
    int H, Hkv, hd, bs, n_blocks;
    int32_t tables[3][64];
    struct cvlm_seq_kv seqs[3];
    float *hk[3], *hv[3]; /* host mirror: [slots][Hkv*hd] per sequence */
    enum cvlm_dtype dt;   /* the cache's; the mirror holds the values rounded to it */
    /* Q8: the codes and scales kv_write must store, [64][Hkv*hd] and [64][2][Hkv] */
    int8_t *ck[3], *cv[3];
    float *sc[3];
};

/* x rounded to a KV cache dtype, as kv_write must store it. */
static float kv_round(float x, enum cvlm_dtype dt)
{
    return dt == CVLM_DTYPE_F16    ? cvlm_f16_to_f32(cvlm_f32_to_f16(x))
           : dt == CVLM_DTYPE_BF16 ? cvlm_bf16_to_f32(cvlm_f32_to_bf16(x))
                                   : x;
}

/* The int8 KV quantizer as engine/backend.h states it: scale = max |x| / 127 (F32),
 * code = x / scale rounded to nearest even; all 0 for a zero head. Returns the scale. */
static float q8_head(int8_t *code, const float *x, int n)
{
    float mx = 0;
    for (int i = 0; i < n; i++)
        mx = fabsf(x[i]) > mx ? fabsf(x[i]) : mx;
    float sc = mx / 127.0f;
    for (int i = 0; i < n; i++)
        code[i] = sc > 0 ? (int8_t)nearbyintf(x[i] / sc) : 0;
    return sc;
}

/* The mirror of one written row (k or v, Hkv heads): rounded (Q8: quantized, codes and
 * scales kept, the mirror holding code * scale). */
static void mirror_row(struct paged_fixture *f, float *dst, int8_t *codes, float *scales,
                       const float *src)
{
    for (int h = 0; h < f->Hkv; h++) {
        const float *x = src + (size_t)h * f->hd;
        float *d = dst + (size_t)h * f->hd;
        if (f->dt != CVLM_DTYPE_Q8) {
            for (int i = 0; i < f->hd; i++)
                d[i] = kv_round(x[i], f->dt);
            continue;
        }
        int8_t *c = codes + (size_t)h * f->hd;
        scales[h] = q8_head(c, x, f->hd);
        for (int i = 0; i < f->hd; i++)
            d[i] = (float)c[i] * scales[h];
    }
}

/* rows: [n][Wq | W | W] (q of H heads, k and v of Hkv heads), stride Wq + 2 W */
static void paged_write(struct cvlm_backend *be, struct paged_fixture *f, struct cvlm_kv_layer *kv,
                        const int32_t *seq, const int32_t *slot, int n, float *rows)
{
    int W = f->Hkv * f->hd, Wq = f->H * f->hd, stride = Wq + 2 * W;
    struct cvlm_attn_batch b = {n, seq, slot, f->seqs, f->bs, f->Hkv};
    for (int t = 0; t < n; t++) {
        size_t at = (size_t)slot[t] * W, sat = (size_t)slot[t] * 2 * f->Hkv;
        int s = seq[t], q8 = f->dt == CVLM_DTYPE_Q8;
        mirror_row(f, f->hk[s] + at, q8 ? f->ck[s] + at : NULL, q8 ? f->sc[s] + sat : NULL,
                   rows + (size_t)t * stride + Wq);
        mirror_row(f, f->hv[s] + at, q8 ? f->cv[s] + at : NULL, q8 ? f->sc[s] + sat + f->Hkv : NULL,
                   rows + (size_t)t * stride + Wq + W);
    }
    float *d = dev_copy(be, rows, (size_t)n * stride);
    be->ops->kv_write(be, kv, d + Wq, d + Wq + W, stride, &b, f->Hkv, f->hd);
    be->ops->free(be, d);
}

/* Batch A: a few tokens of three sequences, interleaved (per-token path). Batch B: a
 * 15-token chunk of seq 0 (slots 20..34), a decode token of seq 2, a 28-token prefill of
 * seq 1 (slots 0..27): runs long enough for the blocked path, plus a leftover token. */
static const int32_t seq_a[] = {1, 0, 1, 2, 0, 1, 1}, slot_a[] = {0, 20, 1, 20, 21, 2, 3};
static int32_t seq_b[44], slot_b[44];

static void make_batch_b(void)
{
    for (int i = 0; i < 44; i++) {
        seq_b[i] = i < 15 ? 0 : i == 15 ? 2 : 1;
        slot_b[i] = i < 15 ? 20 + i : i == 15 ? 20 : i - 16;
    }
}

/* Bits of the cache slot of (seq, slot) differing from the mirror's rounded keys: 0 when
 * kv_write rounds exactly as cvlm_f32_to_f16 / cvlm_f32_to_bf16 (Q8: the key and value
 * codes and the slot's scales exactly as q8_head). */
static int paged_bits_differ(const struct paged_fixture *f, const struct cvlm_kv_layer *kv, int seq,
                             int slot)
{
    int W = f->Hkv * f->hd, bad = 0;
    size_t row = (size_t)f->tables[seq][slot / f->bs] * f->bs + (size_t)(slot % f->bs);
    size_t at = row * W;
    if (f->dt == CVLM_DTYPE_Q8)
        return memcmp((const int8_t *)kv->k + at, f->ck[seq] + (size_t)slot * W, (size_t)W) ||
               memcmp((const int8_t *)kv->v + at, f->cv[seq] + (size_t)slot * W, (size_t)W) ||
               memcmp(kv->scales + row * 2 * f->Hkv, f->sc[seq] + (size_t)slot * 2 * f->Hkv,
                      (size_t)2 * f->Hkv * 4);
    for (int i = 0; i < W; i++) {
        float want = f->hk[seq][(size_t)slot * W + i];
        float got = f->dt == CVLM_DTYPE_F32 ? ((const float *)kv->k)[at + i]
                                            : cvlm_cpu_kv_get(kv->k, at + i, f->dt);
        bad += memcmp(&want, &got, 4) != 0;
    }
    return bad;
}

/* Batch C (`batch_b` 2): decode tokens with long contexts (300, 129 and 128 slots: the
 * split path's several chunks, a last chunk of one slot, and exactly one chunk). */
static const int32_t seq_c[] = {0, 1, 2}, slot_c[] = {299, 128, 127};

/* attention_paged against the double reference on the mirror (the values as stored); H
 * query heads over Hkv KV heads; batch A, B (64 slots per sequence) or C (320). Returns
 * the largest abs error (INFINITY if a stored key is not the rounding the contract
 * states). */
static double paged_case_gqa(struct cvlm_backend *be, int H, int Hkv, int hd, int bs, int batch_b,
                             enum cvlm_dtype dt)
{
    int slots = batch_b >= 2 ? 320 : 64, per_seq = slots / bs;
    struct paged_fixture f = {
        .H = H, .Hkv = Hkv, .hd = hd, .bs = bs, .n_blocks = 3 * per_seq, .dt = dt};
    size_t es = cvlm_dtype_size(dt);
    int W = Hkv * hd, Wq = H * hd, stride = Wq + 2 * W;
    for (int s = 0; s < 3; s++) { /* blocks interleaved backwards: nothing contiguous */
        for (int i = 0; i < per_seq; i++)
            f.tables[s][i] = f.n_blocks - 1 - (i * 3 + s);
        f.seqs[s] = (struct cvlm_seq_kv){f.tables[s], per_seq};
        f.hk[s] = calloc(slots, (size_t)W * 4);
        f.hv[s] = calloc(slots, (size_t)W * 4);
        f.ck[s] = calloc(slots, (size_t)W);
        f.cv[s] = calloc(slots, (size_t)W);
        f.sc[s] = calloc(slots, (size_t)2 * Hkv * 4);
    }
    size_t rows_all = (size_t)f.n_blocks * bs;
    struct cvlm_kv_layer kv = {
        be->ops->alloc(be, rows_all * W * es), be->ops->alloc(be, rows_all * W * es), dt,
        dt == CVLM_DTYPE_Q8 ? be->ops->alloc(be, rows_all * 2 * (size_t)Hkv * 4) : NULL};
    /* history: A, B: seq 0 slots 0..19, seq 2 slots 0..19; C: the slots before each
     * batch token's (seq 0: 0..298, seq 1: 0..127, seq 2: 0..126) */
    int nh = batch_b >= 2 ? 299 + 128 + 127 : 40;
    int32_t *hseq = malloc((size_t)nh * sizeof(int32_t)), *hslot = malloc((size_t)nh * 4);
    for (int i = 0; i < nh; i++) {
        if (batch_b >= 2) {
            hseq[i] = i < 299 ? 0 : i < 299 + 128 ? 1 : 2;
            hslot[i] = i < 299 ? i : i < 299 + 128 ? i - 299 : i - 299 - 128;
        } else {
            hseq[i] = i < 20 ? 0 : 2;
            hslot[i] = i % 20;
        }
    }
    float *hist = rand_floats((size_t)nh * stride, 1.0f);
    for (int i = 0; i < W; i++) /* a zero key head and value head: scale 0 */
        hist[(size_t)3 * stride + Wq + i] = hist[(size_t)3 * stride + Wq + W + i] = 0;
    paged_write(be, &f, &kv, hseq, hslot, nh, hist);
    free(hseq), free(hslot);
    make_batch_b();
    /* 3 and 4: batch C's first or last token alone (the heads split into groups) */
    const int32_t *seq = batch_b >= 2 ? seq_c + (batch_b == 4 ? 2 : 0) : batch_b ? seq_b : seq_a;
    const int32_t *slot = batch_b >= 2 ? slot_c + (batch_b == 4 ? 2 : 0)
                          : batch_b    ? slot_b
                                       : slot_a;
    int nb = batch_b == 2 ? 3 : batch_b > 2 ? 1 : batch_b ? 44 : 7;
    float *rows = rand_floats(nb * (size_t)stride, 1.0f), *o = malloc(nb * (size_t)Wq * 4);
    paged_write(be, &f, &kv, seq, slot, nb, rows);
    struct cvlm_attn_batch b = {nb, seq, slot, f.seqs, bs, Hkv};
    float *dq = dev_copy(be, rows, nb * (size_t)stride),
          *dout = be->ops->alloc(be, nb * (size_t)Wq * 4);
    be->ops->attention_paged(be, dout, dq, stride, &kv, &b, H, hd);
    be->ops->to_host(be, o, dout, nb * (size_t)Wq);
    double ref[128], worst = 0;
    for (int t = 0; t < nb; t++)
        for (int h = 0; h < H; h++) {
            int g = h / (H / Hkv) * hd; /* the query head's KV head */
            ref_attend(ref, rows + (size_t)t * stride + h * hd, f.hk[seq[t]] + g, f.hv[seq[t]] + g,
                       W, slot[t] + 1, hd);
            for (int i = 0; i < hd; i++) {
                double e = fabs(o[(size_t)t * Wq + h * hd + i] - ref[i]);
                worst = e > worst || isnan(e) ? e : worst;
            }
        }
    if (paged_bits_differ(&f, &kv, seq[0], slot[0]) || paged_bits_differ(&f, &kv, 2, 5) ||
        paged_bits_differ(&f, &kv, 0, 3))
        worst = INFINITY; /* a stored key is not the round-to-nearest-even value */
    be->ops->free(be, kv.k);
    be->ops->free(be, kv.v);
    if (kv.scales)
        be->ops->free(be, kv.scales);
    be->ops->free(be, dq);
    be->ops->free(be, dout);
    for (int s = 0; s < 3; s++)
        free(f.hk[s]), free(f.hv[s]), free(f.ck[s]), free(f.cv[s]), free(f.sc[s]);
    free(hist), free(rows), free(o);
    return worst;
}

static double paged_case(struct cvlm_backend *be, int H, int hd, int bs, int batch_b,
                         enum cvlm_dtype dt)
{
    return paged_case_gqa(be, H, H, hd, bs, batch_b, dt);
}

TEST(cpu_ops_attention_paged)
{
    FOR_EACH_BACKEND(be, isa, threads)
    {
        static const int shapes[][3] = {{2, 16, 16}, {3, 64, 4}, {1, 112, 8}, {2, 20, 16}};
        for (int si = 0; si < 4; si++)
            for (int bb = 0; bb < 2; bb++) {
                double e =
                    paged_case(be, shapes[si][0], shapes[si][1], shapes[si][2], bb, CVLM_DTYPE_F32);
                CHECKF(e <= 2e-6,
                       "%s t=%d H=%d hd=%d bs=%d batch %c: abs err %.3g (values in "
                       "[-1, 1))",
                       isa_names[isa], threads, shapes[si][0], shapes[si][1], shapes[si][2],
                       bb ? 'B' : 'A', e);
            }
    }
}

/* A 16-bit cache: kv_write rounds to nearest even (the stored bits are checked), and
 * attention_paged on the widened values matches the reference computed from the rounded
 * K / V as tightly as the F32 cache matches its own; decode tokens (batch A) and prefill
 * runs >= GEMM_MR (batch B, the blocked path), block sizes 16 and 7, head dims 64 and 80. */
TEST(cpu_ops_attention_paged_kv16)
{
    static const enum cvlm_dtype dts[] = {CVLM_DTYPE_F16, CVLM_DTYPE_BF16};
    FOR_EACH_BACKEND(be, isa, threads)
    {
        static const int shapes[][3] = {{2, 64, 16}, {2, 80, 7}, {1, 64, 7}, {3, 80, 16}};
        for (int di = 0; di < 2; di++)
            for (int si = 0; si < 4; si++)
                for (int bb = 0; bb < 2; bb++) {
                    double e =
                        paged_case(be, shapes[si][0], shapes[si][1], shapes[si][2], bb, dts[di]);
                    CHECKF(e <= 2e-6, "%s t=%d %s H=%d hd=%d bs=%d batch %c: abs err %.3g",
                           isa_names[isa], threads, cvlm_dtype_name(dts[di]), shapes[si][0],
                           shapes[si][1], shapes[si][2], bb ? 'B' : 'A', e);
                }
    }
}

/* An int8 cache (Q8, one F32 scale per slot and KV head for K and for V): kv_write stores
 * exactly q8_head's codes and scales (checked bit for bit, a zero head included), and
 * attention_paged matches the double reference on the dequantized K / V (code * scale):
 * decode tokens (batch A, per-token path) and prefill runs (batch B, the blocked path),
 * GQA (4 over 2, 4 over 1, 2 over 1), head dims 64, 80, 128 and odd ones, block sizes
 * 16, 7, 5. The AVX-512 paths run the AVX2 int8 helpers. */
TEST(cpu_ops_attention_paged_kv_int8)
{
    static const int shapes[][4] = {{2, 2, 64, 16}, {2, 1, 80, 7},  {4, 2, 128, 16},
                                    {3, 3, 37, 5},  {4, 1, 19, 16}, {1, 1, 8, 7}};
    FOR_EACH_BACKEND(be, isa, threads)
    {
        for (int si = 0; si < 6; si++)
            for (int bb = 0; bb < 2; bb++) {
                const int *c = shapes[si];
                double e = paged_case_gqa(be, c[0], c[1], c[2], c[3], bb, CVLM_DTYPE_Q8);
                CHECKF(e <= 4e-6, "%s t=%d int8 H=%d Hkv=%d hd=%d bs=%d batch %c: abs err %.3g",
                       isa_names[isa], threads, c[0], c[1], c[2], c[3], bb ? 'B' : 'A', e);
            }
    }
}

/* The same GQA shapes over F32 and F16 caches (the fixture's GQA against the reference). */
TEST(cpu_ops_attention_paged_gqa)
{
    static const int shapes[][4] = {{4, 2, 64, 16}, {4, 1, 80, 7}, {2, 1, 19, 5}};
    static const enum cvlm_dtype dts[] = {CVLM_DTYPE_F32, CVLM_DTYPE_F16};
    FOR_EACH_BACKEND(be, isa, threads)
    {
        for (int di = 0; di < 2; di++)
            for (int si = 0; si < 3; si++)
                for (int bb = 0; bb < 2; bb++) {
                    const int *c = shapes[si];
                    double e = paged_case_gqa(be, c[0], c[1], c[2], c[3], bb, dts[di]);
                    CHECKF(e <= 2e-6, "%s t=%d %s H=%d Hkv=%d hd=%d bs=%d batch %c: abs err %.3g",
                           isa_names[isa], threads, cvlm_dtype_name(dts[di]), c[0], c[1], c[2],
                           c[3], bb ? 'B' : 'A', e);
                }
    }
}

/* Long contexts (batch C): decode tokens over 300, 129 and 128 slots, so the split path's
 * chunks (CHUNK_SLOTS = 128 slots rounded to blocks, merged per head) and a one-chunk
 * context meet the reference alike; then the first (300 slots) and the last (128) token
 * alone, whose heads the split path divides into groups of whole KV heads (two threads:
 * 2 and up to 4 groups; 3 KV heads in 2 groups: uneven); every cache dtype, GQA, block
 * sizes 16, 7 and 5. */
TEST(cpu_ops_attention_paged_long)
{
    static const int shapes[][4] = {
        {2, 2, 64, 16}, {4, 2, 80, 7}, {3, 1, 19, 5}, {6, 3, 24, 16}, {8, 8, 32, 16}};
    static const enum cvlm_dtype dts[] = {CVLM_DTYPE_F32, CVLM_DTYPE_F16, CVLM_DTYPE_BF16,
                                          CVLM_DTYPE_Q8};
    FOR_EACH_BACKEND(be, isa, threads)
    {
        for (int di = 0; di < 4; di++)
            for (int si = 0; si < 5; si++)
                for (int bb = 2; bb <= 4; bb++) {
                    const int *c = shapes[si];
                    double e = paged_case_gqa(be, c[0], c[1], c[2], c[3], bb, dts[di]);
                    CHECKF(e <= 4e-6,
                           "%s t=%d %s H=%d Hkv=%d hd=%d bs=%d long batch %d: abs err %.3g",
                           isa_names[isa], threads, cvlm_dtype_name(dts[di]), c[0], c[1], c[2],
                           c[3], bb, e);
                }
    }
}

/* narrow8 of every ISA path: the scalar quantizer's bits (q8_head) on ties (x / scale at
 * k + 0.5 with scale exactly 1), signed zero, a zero row (scale 0), tails of every length;
 * widen8 gives code * scale exactly. */
TEST(cpu_ops_kv_narrow8)
{
    enum { N = 67 };
    float x[N], back[N], sc, want_sc;
    int8_t got[N], want[N];
    for (int isa = 0, nisa = n_isas(); isa < nisa; isa++) {
        const struct cpu_vec_ops *vec = cvlm_cpu_vec_ops((enum cpu_isa)isa);
        for (int kind = 0; kind < 3; kind++)
            for (int n = 1; n <= N; n += (n < 18 ? 1 : 7)) {
                for (int i = 0; i < n; i++)
                    x[i] = kind == 0   ? frand() * 3.0f
                           : kind == 1 ? (float)(i % 9) - 4.5f /* ties at scale 1 */
                                       : (i & 1 ? -0.0f : 0.0f);
                if (kind == 1)
                    x[n / 2] = n & 1 ? 127.0f : -127.0f; /* max |x| = 127: scale 1 */
                want_sc = q8_head(want, x, n);
                vec->narrow8(got, &sc, x, n);
                vec->widen8(back, got, n, sc);
                CHECKF(!memcmp(&sc, &want_sc, 4) && !memcmp(got, want, (size_t)n),
                       "%s narrow8 kind %d n=%d: scale %g (want %g) or codes differ",
                       isa_names[isa], kind, n, sc, want_sc);
                for (int i = 0; i < n; i++) {
                    float w = (float)want[i] * want_sc;
                    CHECKF(!memcmp(&w, &back[i], 4), "%s widen8 n=%d i=%d", isa_names[isa], n, i);
                }
            }
    }
    int8_t c[4];
    float t[4] = {127.0f, 2.5f, -3.5f, 0.5f}; /* to nearest even: 2, -4, 0 */
    CHECK(q8_head(c, t, 4) == 1.0f && c[0] == 127 && c[1] == 2 && c[2] == -4 && c[3] == 0);
}

/* The row conversions of every ISA path agree bit for bit with the scalar rounding
 * (cvlm_f32_to_f16 / cvlm_f32_to_bf16) on ties, subnormals, overflow and signed zero. */
TEST(cpu_ops_kv_narrow_widen)
{
    static const float special[] = {0.0f,
                                    -0.0f,
                                    1.0f + 1.0f / 2048,
                                    1.0f + 3.0f / 2048,
                                    65504.0f,
                                    65519.0f,
                                    65520.0f,
                                    -1e9f,
                                    6.1035156e-5f,
                                    5.9604645e-8f,
                                    2.9802322e-8f,
                                    4.4703484e-8f,
                                    1e-10f,
                                    1.0f + 1.0f / 256,
                                    1.0f + 3.0f / 256,
                                    3.3895314e38f};
    enum { N = 16 + 53 };
    float x[N], back[N];
    uint16_t ref[N], got[N];
    for (int i = 0; i < N; i++)
        x[i] = i < 16 ? special[i] : frand() * 3.0f;
    for (int isa = 0, nisa = n_isas(); isa < nisa; isa++) {
        const struct cpu_vec_ops *vec = cvlm_cpu_vec_ops((enum cpu_isa)isa);
        for (int d = 0; d < 2; d++) {
            enum cvlm_dtype dt = d ? CVLM_DTYPE_BF16 : CVLM_DTYPE_F16;
            for (int i = 0; i < N; i++)
                ref[i] = d ? cvlm_f32_to_bf16(x[i]) : cvlm_f32_to_f16(x[i]);
            vec->narrow(got, x, N, dt);
            vec->widen(back, got, N, dt);
            for (int i = 0; i < N; i++) {
                CHECKF(got[i] == ref[i], "%s %s: %.9g -> 0x%04x, want 0x%04x", isa_names[isa],
                       cvlm_dtype_name(dt), x[i], got[i], ref[i]);
                float w = d ? cvlm_bf16_to_f32(ref[i]) : cvlm_f16_to_f32(ref[i]);
                CHECKF(!memcmp(&w, &back[i], 4), "%s %s widen 0x%04x", isa_names[isa],
                       cvlm_dtype_name(dt), ref[i]);
            }
        }
    }
    /* the scalar F16 rounding against the test's own for normal values */
    for (int i = 16; i < N; i++)
        CHECK(cvlm_f32_to_f16(x[i]) == to_f16(x[i]));
}

/* ---- dummy weights (engine/model/weights_dummy.c) -------------------------------------------- */

struct collect {
    const struct cvlm_tensor *t[256];
    char names[256][96];
    int n;
};

static int collect_one(void *ctx, const char *name, struct cvlm_tensor *slot, int ndim,
                       const int64_t *shape, int optional)
{
    struct collect *c = ctx;
    (void)ndim, (void)shape, (void)optional;
    if (slot->data && c->n < 256) {
        snprintf(c->names[c->n], sizeof(c->names[0]), "%s", name);
        c->t[c->n++] = slot;
    }
    return 0;
}

TEST(cpu_ops_dummy_weights_roundtrip)
{
    static const char cfg_json[] =
        "{\"vocab_size\": 64, \"hidden_size\": 16, \"intermediate_size\": 24,"
        " \"num_hidden_layers\": 2, \"num_attention_heads\": 2, \"vision_config\": {"
        " \"image_size\": 28, \"patch_size\": 14, \"hidden_size\": 8, \"num_heads\": 2,"
        " \"num_hidden_layers\": 1, \"intermediate_size\": 16, \"num_positions\": 5}}";
    struct cvlm_config cfg;
    struct cvlm_weights *a = NULL, *b = NULL, *c = NULL;
    REQUIRE(cvlm_config_parse(cfg_json, sizeof(cfg_json) - 1, &cfg) == 0);
    REQUIRE(cvlm_weights_dummy(&cfg, CVLM_DTYPE_BF16, 7, &a) == 0);
    REQUIRE(cvlm_weights_dummy(&cfg, CVLM_DTYPE_BF16, 7, &c) == 0);
    char dir[512];
    snprintf(dir, sizeof(dir), "%s/dummy", cvlm_test_tmpdir());
    REQUIRE(cvlm_weights_write(a, dir) == 0);
    REQUIRE(cvlm_weights_load(dir, &b) == 0);
    static struct collect ca, cb, cc;
    memset(&ca, 0, sizeof(ca)), memset(&cb, 0, sizeof(cb)), memset(&cc, 0, sizeof(cc));
    cvlm_weights_visit(a, collect_one, &ca);
    cvlm_weights_visit(b, collect_one, &cb);
    cvlm_weights_visit(c, collect_one, &cc);
    REQUIRE(ca.n > 20 && ca.n == cb.n && ca.n == cc.n);
    for (int i = 0; i < ca.n; i++) {
        const struct cvlm_tensor *x = ca.t[i], *y = cb.t[i];
        size_t bytes = (size_t)cvlm_tensor_numel(x) * cvlm_dtype_size(x->dtype);
        CHECKF(x->dtype == y->dtype && x->ndim == y->ndim &&
                   !memcmp(x->shape, y->shape, sizeof(x->shape)) &&
                   !memcmp(x->data, y->data, bytes) && !memcmp(x->data, cc.t[i]->data, bytes),
               "%s differs after write + load or between two seeded builds", ca.names[i]);
        /* norms 1, biases 0, the rest random with std 0.02 */
        double s = 0, s2 = 0;
        int64_t n = cvlm_tensor_numel(x);
        for (int64_t k = 0; k < n; k++) {
            double v = cvlm_tensor_get_f32(x, k);
            s += v, s2 += v * v;
        }
        const char *nm = ca.names[i];
        size_t len = strlen(nm);
        if (len > 5 && !strcmp(nm + len - 5, ".bias"))
            CHECKF(s2 == 0, "%s: bias not zero", nm);
        else if (strstr(nm, "norm") && !strcmp(nm + len - 7, ".weight"))
            CHECKF(s == (double)n && s2 == (double)n, "%s: norm weight not 1", nm);
        else if (n >= 1000)
            CHECKF(fabs(sqrt(s2 / n) - 0.02) < 0.002 && fabs(s / n) < 0.002, "%s: std %.4f", nm,
                   sqrt(s2 / n));
    }
    cvlm_weights_destroy(a);
    cvlm_weights_destroy(b);
    cvlm_weights_destroy(c);
}

/* ---- GPTQ's extras on Q4: group offsets (mins) and input-row order (perm) ---------------- */

/* One GEMM of a Q4 matrix with mins and/or perm against the double reference over the
 * dequantized stored matrix (cvlm_tensor_get_f32) and the gathered x; rel err returned as
 * in cpu_ops_gemm_quantized (the AVX2 integer kernels' 8-bit x slack taken off). */
static double gptq_gemm_err(struct cvlm_backend *be, int isa, const struct cvlm_tensor *w,
                            const float *x, int M, int N, int K, const float *bias)
{
    float *y = malloc((size_t)M * N * 4), *xp = malloc((size_t)K * 4);
    float *dx = dev_copy(be, x, (size_t)M * K), *dy = be->ops->alloc(be, (size_t)M * N * 4);
    struct cvlm_tensor b = {.dtype = CVLM_DTYPE_F32, .ndim = 1, .shape = {N}, .data = bias};
    double worst = -1;
    if (!y || !xp || !dx || !dy)
        goto out;
    be->ops->gemm(be, dy, dx, K, w, bias ? &b : NULL, M, N, K);
    be->ops->to_host(be, y, dy, (size_t)M * N);
    worst = 0;
    for (int m = 0; m < M; m++) {
        for (int k = 0; k < K; k++)
            xp[k] = x[(size_t)m * K + (w->perm ? w->perm[k] : k)];
        for (int n = 0; n < N; n++) {
            double r = bias ? bias[n] : 0, a = bias ? fabs(bias[n]) : 0, slack = 0;
            for (int k = 0; k < K; k++) {
                double v = cvlm_tensor_get_f32(w, (int64_t)n * K + k);
                r += xp[k] * v;
                a += fabs(xp[k] * v) +
                     (w->mins ? fabs(xp[k] * w->mins[(size_t)n * ((K + 127) / 128) + k / 128]) : 0);
                if (isa >= 1 && (M <= qdot_use_m() || M >= q4gemm_min_m()))
                    /* the integer kernels' 8-bit x, per group of stored columns */
                    slack += fabs(cvlm_quant_get_scaled(w, (int64_t)n * K + k)) *
                             x_group_d(xp, k, K, x_group_size(w->dtype)) / 2;
            }
            double e = fmax(0, fabs(y[(size_t)m * N + n] - r) - slack) / (a + 1e-30);
            worst = e > worst || isnan(e) ? e : worst;
        }
    }
out:
    be->ops->free(be, dx);
    be->ops->free(be, dy);
    free(y);
    free(xp);
    return worst;
}

/* Every ISA path, 1 and 2 threads, M from decode to the packed GEMM, K with whole and
 * short last groups; mins only, perm only, both. */
TEST(cpu_ops_gemm_q4_gptq_extras)
{
    static const int Ms[] = {1, 3, 16, 33, 512}, Ks[] = {384, 352};
    const int N = 40;
    int nisa = n_isas();
    for (int ki = 0; ki < 2; ki++)
        for (int v = 1; v <= 3; v++) { /* bit 0: mins, bit 1: perm */
            const int K = Ks[ki], ng = (K + 127) / 128;
            float *wf, *x = rand_floats((size_t)512 * K, 1.0f), *bias = rand_floats(N, 1.0f);
            struct cvlm_tensor w = make_weight(CVLM_DTYPE_F32, N, K, 0.5f, &wf);
            const void *fdata = w.data;
            void *codes = calloc(1, (size_t)N * K / 2 + 8);
            float *scales = malloc((size_t)N * ng * 4), *mins = rand_floats((size_t)N * ng, 0.2f);
            int32_t *perm = malloc((size_t)K * 4);
            REQUIRE(x && bias && codes && scales && mins && perm);
            cvlm_quantize_into(&w, CVLM_DTYPE_Q4, codes, scales);
            for (int k = 0; k < K; k++)
                perm[k] = k;
            for (int k = K - 1; k > 0; k--) { /* Fisher-Yates */
                int r = (int)((frand() + 1) * 0.5 * (k + 1)) % (k + 1), t = perm[k];
                perm[k] = perm[r], perm[r] = t;
            }
            w.mins = v & 1 ? mins : NULL;
            w.perm = v & 2 ? perm : NULL;
            for (size_t mi = 0; mi < sizeof(Ms) / sizeof(Ms[0]); mi++)
                for (int isa = 0; isa < nisa; isa++)
                    for (int threads = 1; threads <= 2; threads++) {
                        struct cvlm_backend *be = make_backend(isa, threads);
                        REQUIRE(be);
                        double e =
                            gptq_gemm_err(be, isa, &w, x, Ms[mi], N, K, mi % 2 ? bias : NULL);
                        CHECKF(e >= 0 && e <= 1e-5, "%s t=%d Q4%s%s M=%d K=%d: rel err %.3g",
                               isa_names[isa], threads, w.mins ? " mins" : "",
                               w.perm ? " perm" : "", Ms[mi], K, e);
                        be->ops->destroy(be);
                    }
            free(x);
            free(bias);
            free(wf);
            free((void *)fdata);
            free(codes);
            free(scales);
            free(mins);
            free(perm);
        }
}
