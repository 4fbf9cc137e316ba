#!/usr/bin/env python3
"""emu_common.py - what the tests under emulation share (test_q4gemm_avx512.py,
test_qdot_avx512.py): the native AVX2 library built by run.sh (x rounding, the AVX2 twins),
struct cvlm_tensor, the y sentinel, the end of the guest's map, Q4 weight decoding.
"""
import ctypes
import os
import struct

BUILD = os.environ.get("EMU_BUILD", ".")
IMAGE = os.path.join(BUILD, "q4")  # the guest image run.sh builds (.bin/.syms)
DTYPE_Q8, DTYPE_Q4 = 3, 4  # enum cvlm_dtype (engine/backend.h)
SENT_BITS = 0x7FA5A5A5  # a NaN bit pattern in y, checked as bits
SENT = struct.unpack("<f", struct.pack("<I", SENT_BITS))[0]
TOP = 0x40000000  # end of the guest's identity map: any access at or past it faults (#PF)


class Tensor(ctypes.Structure):  # struct cvlm_tensor (engine/backend.h); sizeof 80, checked
    _fields_ = [("dtype", ctypes.c_int), ("ndim", ctypes.c_int),
                ("shape", ctypes.c_int64 * 4), ("data", ctypes.c_void_p),
                ("fill", ctypes.c_int), ("scales", ctypes.c_void_p),
                ("mins", ctypes.c_void_p), ("perm", ctypes.c_void_p)]


assert ctypes.sizeof(Tensor) == 80 and Tensor.data.offset == 40 and Tensor.scales.offset == 56

lib = ctypes.CDLL(os.path.join(BUILD, "libqdot_avx2.so"))
lib.cvlm_cpu_qx_floats.restype = ctypes.c_size_t
lib.cvlm_cpu_qx_floats.argtypes = [ctypes.c_int, ctypes.c_int]
lib.cvlm_cpu_quant_x_avx2.restype = None
lib.cvlm_cpu_quant_x_avx2.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                      ctypes.c_int, ctypes.c_int, ctypes.c_int]
lib.cvlm_cpu_gemm_q4dot_avx2.restype = None
lib.cvlm_cpu_gemm_q4dot_avx2.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                         ctypes.c_int, ctypes.POINTER(Tensor), ctypes.c_int,
                                         ctypes.c_int, ctypes.c_int]
lib.cvlm_cpu_gemv_qdot_avx2.restype = None
lib.cvlm_cpu_gemv_qdot_avx2.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                        ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                        ctypes.POINTER(Tensor), ctypes.c_int, ctypes.c_int,
                                        ctypes.c_int]


def aligned(nbytes, align=64):
    """A zeroed ctypes buffer with a 64-byte aligned address (keeps the owner alive)."""
    raw = ctypes.create_string_buffer(nbytes + align)
    addr = (ctypes.addressof(raw) + align - 1) & ~(align - 1)
    return raw, addr


def f32(v):
    return struct.unpack("<f", struct.pack("<f", v))[0]


def quantize(M, K, x, ldx=None, dtype=DTYPE_Q4):
    """qx of M rows of x (M * ldx floats) by the project's cvlm_cpu_quant_x_avx2: (the bytes,
    floats per row)."""
    ldx = K if ldx is None else ldx
    nf = lib.cvlm_cpu_qx_floats(M, K)
    qraw, qaddr = aligned(nf * 4)
    xb = (ctypes.c_float * (M * ldx))(*x)
    lib.cvlm_cpu_quant_x_avx2(qaddr, ctypes.addressof(xb), ldx, M, K, dtype)
    return ctypes.string_at(qaddr, nf * 4), nf // M


def w_value(wdata, scales, K, n, k):
    """Weight (c - 8) * scale of row n, column k (engine/backend.h's Q4 layout)."""
    ng = (K + 127) // 128
    b, j = divmod(k, 32)
    byte = wdata[n * K // 2 + b * 16 + (j % 16)]
    c = byte & 15 if j < 16 else byte >> 4
    return (c - 8) * scales[n * ng + k // 128]
