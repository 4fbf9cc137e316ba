/* cli_bench_probe.h - machine probes for `cogvlm bench` (cli_bench_probe.c). */
#ifndef CVLM_CLI_BENCH_PROBE_H
#define CVLM_CLI_BENCH_PROBE_H

#include "engine/backend.h"

/* memcpy bandwidth (read + write counted) and the best read-only bandwidth, GB/s, with nt
 * threads over 1 GiB buffers. 0 or CVLM_ENOMEM. */
int cvlm_probe_bandwidth(int nt, double *copy_gbs, double *read_gbs);
/* GFLOP/s of the CPU backend's gemm (y[M,N] = x[M,K] W[N,K]^T, W of dtype dt, cache-hot
 * after a warm-up) with nt threads: the best of 5 timed runs. */
int cvlm_probe_gemm(enum cvlm_dtype dt, int nt, int M, int N, int K, double *gflops);

#endif
