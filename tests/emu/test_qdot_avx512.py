#!/usr/bin/env python3
"""test_qdot_avx512.py - the decode kernel cvlm_cpu_gemv_qdot_avx512vnni
(kernels/cpu/q_dot_avx512.c) in BochsCPU (Sapphire Rapids model) against
cvlm_cpu_gemv_qdot_avx2 run natively on the same qx, for machines without AVX-512 VNNI.

Per case (dtype, M 1..8, N, K, n0, n1, ldx > K):
  - random codes (Q8: int8 in -127..127, K bytes and one scale per row; Q4: random bytes,
    K/2 per row, a scale per group of 128) and positive f32 scales; gaussian f32 x whose
    ldx padding is NaN (a kernel that reads it makes NaN);
  - qx by the project's cvlm_cpu_quant_x_avx2 natively (its layout depends on the dtype);
    y_avx2 = cvlm_cpu_gemv_qdot_avx2 natively; y_guest = --func in the guest;
  - each output in [n0, n1) within 1e-5 * sum_k |x_k w_k| of y_avx2 and of a float64
    reference from qx's codes and d (Q8: plus x itself times w over the tail K % 32; Q4:
    (c - 8) xq summed directly, not through xc);
  - every y element outside [n0, n1) and the ldy padding untouched (bit pattern);
  - a NaN in x: all outputs of its row NaN (both kernels), the other rows still match;
  - over-reads: W, the scales, qx or x (Q8 with a tail: the last row's K-th float) ending
    exactly where the guest's map ends, so any read past them faults.

Run by tests/emu/run.sh (which builds the guest image and the native library into
EMU_BUILD); options: [--func NAME] [--image PREFIX] [--random N] [--seed S] [-v].
"""
import argparse
import ctypes
import functools
import math
import operator
import random
import struct
import sys

import bochs_guest as R
from emu_common import (DTYPE_Q4, DTYPE_Q8, IMAGE, SENT_BITS, TOP, Tensor, aligned, f32, lib,
                        quantize)

NAME = {DTYPE_Q8: "Q8", DTYPE_Q4: "Q4"}
MAX_M = 8  # CVLM_CPU_QDOT_MAX_M (kernels/cpu/cpu.h)
Q8_KS = (32, 64, 96, 100, 4000, 31, 8195)  # odd block count, tails of 4, 31 (only), 3
Q4_KS = (32, 96, 160, 416, 4096, 8320, 8288)  # lone slot, short groups, 65 groups (+ short)
# (N, n0, n1): ragged tiles for any tile height up to 16, n0 > 0, rows past n1 left alone
NS = ((1, 0, 1), (3, 1, 3), (5, 0, 5), (9, 2, 9), (17, 0, 17), (17, 3, 14))
Q8_FLIP = bytes(range(128)) + b"\0" + bytes(range(129, 256))  # byte 0x80 (-128) -> 0
mul = operator.mul


class Case:
    """Weights, x, qx and the float64 reference of one (dtype, M, N, K, ldx)."""

    def __init__(self, rng, dt, M, N, K, ldx, nan_at=None):
        self.dt, self.M, self.N, self.K, self.ldx = dt, M, N, K, ldx
        if dt == DTYPE_Q8:
            self.ng, rb = 1, K
            self.wdata = rng.randbytes(N * K).translate(Q8_FLIP)
        else:
            assert K % 32 == 0
            self.ng, rb = (K + 127) // 128, K // 2
            self.wdata = rng.randbytes(N * rb)
        self.scales = [f32(rng.uniform(0.002, 0.05)) for _ in range(N * self.ng)]
        x = []
        for m in range(M):
            x += [f32(rng.gauss(0, 1)) for _ in range(K)] + [math.nan] * (ldx - K)
        if nan_at is not None:
            x[nan_at[0] * ldx + nan_at[1]] = math.nan
        self.x, self.nan_at = x, nan_at
        self.qx, self.rf = quantize(M, K, x, ldx, dt)
        assert self.rf == lib.cvlm_cpu_qx_floats(1, K)
        # W rows decoded: Q8 the int8 codes, Q4 c - 8, in natural order
        if dt == DTYPE_Q8:
            self.wc = [struct.unpack_from(f"<{K}b", self.wdata, n * K) for n in range(N)]
        else:
            self.wc = []
            for n in range(N):
                row, c = self.wdata[n * rb:(n + 1) * rb], []
                for b in range(K // 32):
                    blk = row[16 * b:16 * b + 16]
                    c += [v & 15 for v in blk] + [v >> 4 for v in blk]
                self.wc.append([v - 8 for v in c])

    def xq(self, m):
        """x row m's codes in natural order and d per block (Q8) or group (Q4), from qx."""
        K, base, nb = self.K, m * self.rf * 4, self.K // 32
        if self.dt == DTYPE_Q8:
            codes, d = [], []
            for b in range(nb):
                codes += struct.unpack_from("<32b", self.qx, base + 64 * b)
                d8 = struct.unpack_from("<8f", self.qx, base + 64 * b + 32)
                assert all(v == d8[0] or (math.isnan(v) and math.isnan(d8[0])) for v in d8)
                d.append(d8[0])
            return codes, d
        ns = (nb + 1) // 2
        s = struct.unpack_from(f"<{ns * 64}b", self.qx, base)
        codes = []
        for b in range(nb):  # slot b // 2: both blocks' weights 0..15, then 16..31
            o = 64 * (b // 2) + 16 * (b % 2)
            codes += s[o:o + 16] + s[o + 32:o + 48]
        return codes, struct.unpack_from(f"<{self.ng}f", self.qx, base + ns * 64)

    def reference(self, m):
        """(y, sum_k |x_k w_k|) of x row m for every W row, in float64."""
        K, ng, nb = self.K, self.ng, self.K // 32
        xr = self.x[m * self.ldx:m * self.ldx + K]
        codes, d = self.xq(m)
        out = []
        for n in range(self.N):
            w = self.wc[n]
            if self.dt == DTYPE_Q8:
                s = sum(d[b] * sum(map(mul, codes[32 * b:32 * b + 32], w[32 * b:32 * b + 32]))
                        for b in range(nb))
                s += sum(map(mul, xr[nb * 32:], w[nb * 32:]))
                mag = sum(map(abs, map(mul, xr, w)))
                sc = self.scales[n]
                out.append((sc * s, sc * mag))
            else:
                y = mag = 0.0
                for g in range(ng):
                    sc, k0, k1 = self.scales[n * ng + g], 128 * g, min(128 * g + 128, K)
                    y += sc * d[g] * sum(map(mul, codes[k0:k1], w[k0:k1]))
                    mag += sc * sum(map(abs, map(mul, xr[k0:k1], w[k0:k1])))
                out.append((y, mag))
        return out


def worse(a, b):
    """max, but NaN if either is (Python's max drops a NaN after the first argument)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def run_case(g, func, c, n0, n1, at_end=None):
    """c against W rows [n0, n1) natively (AVX2) and in the guest (func); at_end: 'w',
    'scales', 'qx' or 'x' puts that buffer right below TOP. Returns (ok, worst error vs
    AVX2, vs f64, a list of problems)."""
    M, N, K, ldx = c.M, c.N, c.K, c.ldx
    ldy = N + 3  # padding columns must stay untouched too
    ny = M * ldy
    sb = struct.pack(f"<{len(c.scales)}f", *c.scales)

    # native AVX2 kernel on the same qx
    wbuf = ctypes.create_string_buffer(c.wdata, len(c.wdata))
    sbuf = ctypes.create_string_buffer(sb, len(sb))
    xbuf = (ctypes.c_float * len(c.x))(*c.x)
    t = Tensor(c.dt, 2, (ctypes.c_int64 * 4)(N, K, 0, 0), ctypes.addressof(wbuf), 0,
               ctypes.addressof(sbuf), None, None)
    qraw, qaddr = aligned(len(c.qx))
    ctypes.memmove(qaddr, c.qx, len(c.qx))
    ya = (ctypes.c_uint32 * ny)(*([SENT_BITS] * ny))
    lib.cvlm_cpu_gemv_qdot_avx2(ctypes.addressof(ya), ldy, qaddr, ctypes.addressof(xbuf), ldx,
                                M, ctypes.byref(t), n0, n1, K)
    ya = struct.unpack(f"<{ny}f", bytes(ya))

    # the guest (fresh buffers per case; the bump allocator never reuses memory)
    g.heap = R.Guest.HEAP
    # x: with at_end, the last row ends at its K-th float (its ldx padding cut off)
    xb = struct.pack(f"<{len(c.x)}f", *c.x)
    if at_end == "x":
        xb = xb[:4 * ((M - 1) * ldx + K)]

    def place(name, data):
        if at_end == name:
            g.write(TOP - len(data), data)
            return TOP - len(data)
        return g.alloc(data)

    gw, gs, gq, gx = place("w", c.wdata), place("scales", sb), place("qx", c.qx), place("x", xb)
    assert at_end != "qx" or gq % 64 == 0
    gt = g.alloc(bytes(Tensor(c.dt, 2, (ctypes.c_int64 * 4)(N, K, 0, 0), gw, 0, gs, None,
                              None)))
    gy = g.alloc(struct.pack("<I", SENT_BITS) * ny)
    r = R.call(g, func, gy, ldy, gq, gx, ldx, M, gt, n0, n1, K)
    try:
        R.check_ok(r, func)
    except SystemExit as e:
        return False, math.inf, math.inf, [str(e)]
    yb = g.read(gy, 4 * ny)
    yv = struct.unpack(f"<{ny}f", yb)
    ybits = struct.unpack(f"<{ny}I", yb)

    worst = worst_ref = 0.0
    bad = []
    for m in range(M):
        nan_row = c.nan_at is not None and m == c.nan_at[0]
        ref = None if nan_row else c.reference(m)
        for col in range(ldy):
            i = m * ldy + col
            if not n0 <= col < n1:
                if ybits[i] != SENT_BITS:
                    bad.append(f"y[{m}][{col}] outside [{n0},{n1}) written: {yv[i]!r}")
                continue
            if nan_row:
                if not (math.isnan(yv[i]) and math.isnan(ya[i])):
                    bad.append(f"NaN row {m} n={col}: guest {yv[i]!r} avx2 {ya[i]!r}")
                continue
            yr, mag = ref[col]
            e, er = abs(yv[i] - ya[i]), abs(yv[i] - yr)
            if not (e <= 1e-5 * mag and er <= 1e-5 * mag):
                bad.append(f"m={m} n={col}: guest {yv[i]!r} avx2 {ya[i]!r} f64 {yr!r} "
                           f"(sum|xw| {mag:.4g})")
            if mag > 0:
                worst, worst_ref = worse(worst, e / mag), worse(worst_ref, er / mag)
    return not bad, worst, worst_ref, bad


class Report:
    def __init__(self, verbose):
        self.ok, self.verbose = True, verbose

    def group(self, title, results):
        """results: [(label, (ok, worst, worst_ref, problems))]; one line for the group,
        then each failing case's problems (the first 5)."""
        good = sum(r[0] for _, r in results)
        worst = functools.reduce(worse, (r[1] for _, r in results))
        worst_ref = functools.reduce(worse, (r[2] for _, r in results))
        ok = good == len(results)
        self.ok &= ok
        print(f"  {title}: {good}/{len(results)} cases OK, max rel err vs AVX2 {worst:.1e}, "
              f"vs f64(qx) {worst_ref:.1e}  {'OK' if ok else 'FAIL'}")
        for label, (cok, w, wr, problems) in results:
            if self.verbose or not cok:
                print(f"    {label}: {'OK' if cok else 'FAIL'} (vs AVX2 {w:.1e}, vs f64 {wr:.1e})")
                for p in problems[:5]:
                    print(f"      {p}")
                if len(problems) > 5:
                    print(f"      ... {len(problems) - 5} more")


def label(c, n0, n1, extra=""):
    return f"{NAME[c.dt]} M={c.M} N={c.N} K={c.K} [{n0},{n1}) ldx={c.ldx}{extra}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--func", default="cvlm_cpu_gemv_qdot_avx512vnni",
                    help="guest function with cvlm_cpu_gemv_qdot_avx2's signature")
    ap.add_argument("--image", default=IMAGE,
                    help="guest image prefix (.bin/.syms), e.g. a deliberately broken build")
    ap.add_argument("--random", type=int, default=0, help="extra random shapes")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--gemm-func", default="cvlm_cpu_gemm_q8dot_avx512vnni",
                    help="the Q8 prefill GEMM in the guest (same signature, any M); '' skips")
    ap.add_argument("-v", "--verbose", action="store_true", help="a line per case")
    opt = ap.parse_args()

    R.set_model_index(R.CPUDB["sapphire_rapids"])
    g = R.Guest()
    g.load_image(opt.image + ".bin", opt.image + ".syms")
    if opt.func not in g.syms:
        have = " ".join(s for s in sorted(g.syms) if s.startswith("cvlm_cpu_gemv"))
        print(f"{opt.func}: not in {opt.image}.syms (it has: {have or 'no cvlm_cpu_gemv*'})")
        return 1
    print(f"{opt.func} in the guest vs cvlm_cpu_gemv_qdot_avx2 natively:")
    rng = random.Random(opt.seed)
    rep = Report(opt.verbose)

    def one(dt, M, N, K, n0, n1, nan_at=None, at_end=None, func=None):
        c = Case(rng, dt, M, N, K, K + rng.randint(1, 9), nan_at)
        extra = f" NaN at {nan_at}" if nan_at else f" {at_end} at the map's end" if at_end else ""
        return label(c, n0, n1, extra), run_case(g, func or opt.func, c, n0, n1, at_end)

    print("every M 1..8 per K, each with 2 of N [n0, n1): 1 [0,1), 3 [1,3), 5 [0,5), 9 [2,9), "
          "17 [0,17), 17 [3,14):")
    for dt, ks in ((DTYPE_Q8, Q8_KS), (DTYPE_Q4, Q4_KS)):
        for ki, K in enumerate(ks):
            res = []
            for M in range(1, MAX_M + 1):
                for j in (0, len(NS) // 2):
                    N, n0, n1 = NS[(M + ki + j) % len(NS)]
                    res.append(one(dt, M, N, K, n0, n1))
            rep.group(f"{NAME[dt]} K={K:5d}", res)
    print("NaN in x (its row all NaN, the other rows match):")
    res = [one(DTYPE_Q8, 3, 9, 100, 0, 9, nan_at=(1, 40)),  # in a block
           one(DTYPE_Q8, 2, 5, 100, 0, 5, nan_at=(0, 98)),  # in the tail
           one(DTYPE_Q8, 8, 17, 31, 3, 14, nan_at=(7, 5)),  # only a tail
           one(DTYPE_Q8, 1, 17, 4000, 0, 17, nan_at=(0, 3999)),
           one(DTYPE_Q4, 3, 5, 416, 0, 5, nan_at=(1, 300)),
           one(DTYPE_Q4, 8, 9, 96, 2, 9, nan_at=(5, 70)),  # the lone block
           one(DTYPE_Q4, 1, 17, 160, 0, 17, nan_at=(0, 140))]
    rep.group("NaN", res)
    print("over-reads (the buffer ends where the guest's map ends):")
    for dt, shapes, where in (
            (DTYPE_Q8, ((1, 17, 100), (2, 5, 31), (3, 9, 8195), (8, 3, 100), (5, 1, 32)),
             ("w", "scales", "qx", "x")),
            (DTYPE_Q4, ((1, 17, 96), (2, 5, 160), (3, 9, 416), (8, 3, 8288), (5, 1, 32)),
             ("w", "scales", "qx"))):
        for wh in where:
            res = [one(dt, M, N, K, 0, N, at_end=wh) for M, N, K in shapes]
            rep.group(f"{NAME[dt]} {wh:6s} at the end", res)
    if opt.gemm_func:
        # the Q8 GEMM: x tiles of 4 rows outer (ragged 1..3 left), W tiles of 4 (ragged),
        # odd blocks, tails, NaN, over-reads; the AVX2 decode kernel takes any M natively
        if opt.gemm_func not in g.syms:
            print(f"{opt.gemm_func}: not in {opt.image}.syms")
            return 1
        print(f"{opt.gemm_func} (Q8 prefill GEMM) in the guest:")
        gf = opt.gemm_func
        res = [one(DTYPE_Q8, M, N, K, n0, n1, func=gf)
               for M, N, K, n0, n1 in ((40, 9, 96, 2, 9), (41, 17, 100, 3, 14), (33, 5, 4000, 0, 5),
                                       (9, 6, 31, 0, 6), (6, 17, 8195, 1, 17), (1, 3, 64, 0, 3),
                                       (35, 4, 32, 0, 4))]
        res.append(one(DTYPE_Q8, 37, 5, 100, 0, 5, nan_at=(34, 60), func=gf))
        res += [one(DTYPE_Q8, 34, 5, 100, 0, 5, at_end=wh, func=gf)
                for wh in ("w", "scales", "qx", "x")]
        rep.group("Q8 GEMM, M 1..41, NaN, each buffer at the map's end", res)
    if opt.random:
        res = []
        for _ in range(opt.random):
            dt = rng.choice((DTYPE_Q8, DTYPE_Q4))
            M, N = rng.randint(1, MAX_M), rng.randint(1, 20)
            K = rng.randint(1, 700) if dt == DTYPE_Q8 else 32 * rng.randint(1, 40)
            n0 = rng.randrange(N)
            res.append(one(dt, M, N, K, n0, rng.randint(n0 + 1, N)))
        rep.group("random shapes (M 1..8, N 1..20, K Q8 1..700, Q4 32..1280)", res)
    print("ALL OK" if rep.ok else "FAILED")
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
