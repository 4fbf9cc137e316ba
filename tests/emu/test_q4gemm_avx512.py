#!/usr/bin/env python3
"""test_q4gemm_avx512.py - cvlm_cpu_gemm_q4dot_avx512vnni (kernels/cpu/q_dot_avx512.c) in
BochsCPU (Sapphire Rapids model) against cvlm_cpu_gemm_q4dot_avx2 run natively on the same
qx, for machines without AVX-512 VNNI (on those with it, tests/unit runs it natively).

Per case (M, N, K, n0, n1):
  - random Q4 codes (K/2 bytes per row) and positive f32 group scales, random f32 x;
  - x quantized natively by the project's cvlm_cpu_quant_x_avx2 (unmodified, .so);
  - y_avx2 = the project's AVX2 GEMM natively; y_vnni = the new kernel in the guest;
  - check |y_vnni - y_avx2| <= 1e-5 * sum_k |x w| for every output in [n0, n1), and also
    against an independent float64 reference made from qx (codes, d, xc);
  - every y element outside rows [n0, n1) (and the ldy padding) is untouched (bit pattern);
  - NaN case: one x value NaN -> all outputs of that x row NaN, the other rows still match.

Run by tests/emu/run.sh (which builds the guest image and the native library into
EMU_BUILD); options: [--random N] [--count] [--image PREFIX].
"""
import argparse
import ctypes
import math
import random
import struct
import sys

import bochs_guest as R
from emu_common import (DTYPE_Q4, IMAGE, SENT_BITS, TOP, Tensor, aligned, f32, lib, quantize,
                        w_value)


def make_case(rng, M, N, K, nan_at=None):
    ng = (K + 127) // 128
    wdata = bytes(rng.randrange(256) for _ in range(N * K // 2))
    scales = [f32(rng.uniform(0.002, 0.05)) for _ in range(N * ng)]
    x = [f32(rng.gauss(0, 1)) for _ in range(M * K)]
    if nan_at is not None:
        x[nan_at[0] * K + nan_at[1]] = float("nan")
    return wdata, scales, x


def ref_from_qx(qx, rf, wdata, scales, K, m, n):
    """y[m][n] in float64 from qx's integer codes, d and xc (the kernels' own formula)."""
    ng, ns = (K + 127) // 128, (K // 32 + 1) // 2
    base = m * rf * 4
    xq = struct.unpack_from(f"<{ns * 64}b", qx, base)
    d = struct.unpack_from(f"<{ng}f", qx, base + ns * 64)
    xc = struct.unpack_from(f"<{ng}f", qx, base + ns * 64 + ng * 4)
    row = wdata[n * K // 2:(n + 1) * K // 2]
    y = 0.0
    for g in range(ng):
        s = 0
        for o in range(64 * g, min(64 * g + 64, K // 2)):  # W byte o of the row
            sl, j = divmod(o, 32)
            s += (row[o] & 15) * xq[64 * sl + j] + (row[o] >> 4) * xq[64 * sl + 32 + j]
        sc = scales[n * ng + g]
        y += sc * d[g] * s - sc * xc[g]
    return y


def run_case(g, rng, M, N, K, n0, n1, nan_at=None, count=False, quiet=False, at_end=None):
    """at_end: 'w', 'scales' or 'qx' puts that buffer right below TOP, so that any read past
    its end faults in the guest."""
    ng = (K + 127) // 128
    wdata, scales, x = make_case(rng, M, N, K, nan_at)
    qx, rf = quantize(M, K, x)
    assert rf == lib.cvlm_cpu_qx_floats(1, K)
    ldy = N + 3  # padding columns must stay untouched too
    ny = M * ldy

    # native AVX2 reference on the same qx
    wbuf = ctypes.create_string_buffer(wdata, len(wdata))
    sbuf = (ctypes.c_float * len(scales))(*scales)
    t = Tensor(DTYPE_Q4, 2, (ctypes.c_int64 * 4)(N, K, 0, 0), ctypes.addressof(wbuf), 0,
               ctypes.addressof(sbuf), None, None)
    qraw, qaddr = aligned(len(qx))
    ctypes.memmove(qaddr, qx, len(qx))
    ya = (ctypes.c_uint32 * ny)(*([SENT_BITS] * ny))
    lib.cvlm_cpu_gemm_q4dot_avx2(ctypes.addressof(ya), ldy, qaddr, M, ctypes.byref(t), n0, n1, K)
    ya = struct.unpack(f"<{ny}f", bytes(ya))

    # guest run (fresh buffers per case; the bump allocator never reuses memory)
    g.heap = R.Guest.HEAP
    sb = struct.pack(f"<{len(scales)}f", *scales)

    def place(name, data, align):
        if at_end == name:
            assert len(data) % align == 0 or align == 1
            g.write(TOP - len(data), data)
            return TOP - len(data)
        return g.alloc(data, align=align)

    gw = place("w", wdata, 1)
    gs = place("scales", sb, 4)
    gq = place("qx", qx, 64)
    gt = g.alloc(bytes(Tensor(DTYPE_Q4, 2, (ctypes.c_int64 * 4)(N, K, 0, 0), gw, 0, gs,
                              None, None)))
    gy = g.alloc(struct.pack("<I", SENT_BITS) * ny)
    r = R.call(g, "cvlm_cpu_gemm_q4dot_avx512vnni", gy, ldy, gq, M, gt, n0, n1, K, count=count,
               max_insns=2_000_000_000 if count else None)
    R.check_ok(r, f"gemm_q4dot_avx512vnni M={M} N={N} K={K}")
    yb = g.read(gy, 4 * ny)
    yv = struct.unpack(f"<{ny}f", yb)
    ybits = struct.unpack(f"<{ny}I", yb)

    worst = worst_ref = 0.0
    bad = []
    untouched = True
    nan_ok = True
    for m in range(M):
        for col in range(ldy):
            i = m * ldy + col
            if not (n0 <= col < n1):
                if ybits[i] != SENT_BITS:
                    untouched = False
                continue
            if nan_at is not None and m == nan_at[0]:
                if not math.isnan(yv[i]) or not math.isnan(ya[i]):
                    nan_ok = False
                continue
            mag = sum(abs(x[m * K + k] * w_value(wdata, scales, K, col, k)) for k in range(K))
            e = abs(yv[i] - ya[i]) / mag
            yr = ref_from_qx(qx, rf, wdata, scales, K, m, col)
            er = abs(yv[i] - yr) / mag
            worst, worst_ref = max(worst, e), max(worst_ref, er)
            if not (e <= 1e-5 and er <= 1e-5):
                bad.append((m, col, yv[i], ya[i], yr))
    ok = not bad and untouched and nan_ok
    if not quiet or not ok:
        extra = f" ({at_end} ends at the map's end)" if at_end else ""
        extra += f" NaN row {nan_at[0]} all NaN={nan_ok}" if nan_at is not None else ""
        ins = f" guest insns={r.insns:,d}" if count else ""
        print(f"  M={M:3d} N={N:2d} K={K:5d} [{n0},{n1}) groups={ng:3d} "
              f"max rel err vs AVX2 {worst:.1e}, vs f64(qx) {worst_ref:.1e}, "
              f"outside untouched={untouched}{extra}{ins}  {'OK' if ok else 'FAIL'}")
        for b in bad[:5]:
            print("    mismatch m=%d n=%d vnni=%r avx2=%r f64=%r" % b)
    return ok, r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--random", type=int, default=0, help="extra random shapes")
    ap.add_argument("--count", action="store_true",
                    help="count guest instructions per MAC of the hot loop")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--image", default=IMAGE,
                    help="guest image prefix (.bin/.syms), e.g. a deliberately broken build")
    opt = ap.parse_args()

    R.set_model_index(R.CPUDB["sapphire_rapids"])
    g = R.Guest()
    g.load_image(opt.image + ".bin", opt.image + ".syms")
    rng = random.Random(opt.seed)
    ok = True
    print("required shapes (M, N, K, n0, n1):")
    for M, N, K, n0, n1 in [(1, 2, 128, 0, 2), (3, 5, 256, 1, 4), (7, 9, 416, 0, 9),
                            (5, 4, 8320, 0, 4), (40, 6, 2048, 0, 6), (2, 3, 96, 0, 3)]:
        ok &= run_case(g, rng, M, N, K, n0, n1)[0]
    print("NaN in x (row 1, column 300):")
    ok &= run_case(g, rng, 3, 5, 416, 0, 5, nan_at=(1, 300))[0]
    print("extra shapes (short groups of 1 and 2 blocks, ragged tiles, a short group after 64):")
    for M, N, K, n0, n1 in [(1, 1, 32, 0, 1), (2, 2, 64, 0, 2), (6, 7, 160, 2, 7),
                            (5, 11, 352, 3, 10), (2, 3, 8288, 1, 3), (9, 5, 1024, 0, 5)]:
        ok &= run_case(g, rng, M, N, K, n0, n1)[0]
    print("over-read checks (the buffer ends where the guest's mapping ends):")
    for where in ("w", "scales", "qx"):
        for M, N, K in ((3, 5, 416), (2, 3, 96), (1, 2, 160), (5, 6, 8320)):
            ok &= run_case(g, rng, M, N, K, 0, N, at_end=where)[0]
    if opt.random:
        nok = 0
        for i in range(opt.random):
            M, N = rng.randint(1, 9), rng.randint(1, 9)
            K = 32 * rng.randint(1, 40)
            n0 = rng.randrange(N)
            n1 = rng.randint(n0 + 1, N)
            good = run_case(g, rng, M, N, K, n0, n1, quiet=True)[0]
            nok += good
            ok &= good
        print(f"random shapes: {nok}/{opt.random} OK (M, N 1..9, K 32..1280)")
    if opt.count:
        # hot loop: marginal instructions of 64 more whole groups (8192 more K) with a
        # 4 x 4 tile (M = N = 4), and a 8 x 8 run (4 tiles)
        for M, N in ((4, 4), (8, 8)):
            r1 = run_case(g, rng, M, N, 4096, 0, N, count=True, quiet=True)[1]
            r2 = run_case(g, rng, M, N, 12288, 0, N, count=True, quiet=True)[1]
            macs = M * N * (12288 - 4096)
            print(f"[count] M={M} N={N}: K=4096 {r1.insns:,d} insns, K=12288 {r2.insns:,d} insns "
                  f"-> {(r2.insns - r1.insns) / macs:.4f} guest insns per MAC (marginal), "
                  f"{r2.insns / (M * N * 12288):.4f} overall at K=12288")
    print("ALL OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
