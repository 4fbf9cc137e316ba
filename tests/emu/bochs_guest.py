#!/usr/bin/env python3
"""bochs_guest.py - run freestanding x86-64 functions (AVX-512 kernels built by gcc with no
libc) inside BochsCPU (the bochscpu-python wheel), so that kernels for CPUs this machine
lacks are checked here: a 64-bit ring-0 guest, identity-mapped with 2 MiB pages for the
low 1 GiB, CR4.OSXSAVE and XCR0 set for AVX-512 state, the CPU model forced to one with
the wanted features (Sapphire Rapids: AVX-512 F/BW/VL/DQ, VNNI, BF16), a function called
with the System V ABI and run until it returns to a HLT. See tests/emu/README.md.
"""
import argparse
import ctypes
import os
import struct
import sys
import time

# The wheel needs __isoc23_strtoull/__isoc23_sscanf (glibc >= 2.38); on an older glibc a
# two-function shim (glibc_compat.c, built by run.sh) is loaded globally before bochscpu.
_compat = os.path.join(os.environ.get("EMU_BUILD", "."), "libglibc_compat.so")
if os.path.exists(_compat):
    ctypes.CDLL(_compat, mode=ctypes.RTLD_GLOBAL)

import bochscpu
import bochscpu.cpu
import bochscpu.memory as mem

PAGE = 0x1000

# ---------------------------------------------------------------- CPU model
# bochscpu hard-codes its Bochs parameters in Rust (src/sim.rs); "cpu.model"
# is a bx_param_enum_c whose *index* selects the entry of Bochs' cpudb table.
# The Python binding has no API for it, so we poke the param object through
# exported C++ symbols of the .so before the first Session/CPU is created.
# IMPORTANT: the index is interpreted against the cpudb table compiled into the
# wheel's Bochs, which has 2 more entries than bochscpu's Rust name list (whose
# index 27 is labelled "tigerlake" but actually yields Cannon Lake).  Indices
# below were verified in the guest with CPUID(1) family/model + CPUID(7):
CPUDB = {
    "corei3_cnl": 27,        # model 0x66, AVX-512 F/DQ/BW/VL, no VNNI  (bochscpu default!)
    "corei7_icelake_u": 28,  # model 0x7e, + AVX512_VNNI
    "tigerlake": 29,         # model 0x8c, + AVX512_VNNI
    "sapphire_rapids": 30,   # model 0x8f, + AVX512_VNNI, AVX512_BF16, AVX-VNNI
    "arrow_lake": 31,        # model 0xc6, no AVX-512 (AVX-VNNI only)
}
CPUDB_NAME = {v: k for k, v in CPUDB.items()}


def _so():
    return ctypes.CDLL(bochscpu._bochscpu.__file__)


def model_param():
    """Return a ctypes pointer to the bx_param_enum_c for 'cpu.model'."""
    lib = _so()
    f = lib["_ZN13bx_real_sim_c14get_param_enumEPKcP10bx_param_c"]
    f.restype = ctypes.c_void_p
    f.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    p = f(None, b"cpu.model", None)  # `this` is unused by bochscpu's shim
    if not p:
        raise RuntimeError("cpu.model param not found")
    return p


def get_model_index():
    lib = _so()
    g = lib["_ZN14bx_param_num_c3getEv"]
    g.restype = ctypes.c_long
    g.argtypes = [ctypes.c_void_p]
    return g(model_param())


VAL_OFFSET = None  # offset of bx_param_num_c::val inside the object (found at runtime)


def set_model_index(idx):
    """Force cpu.model to `idx`, bypassing the [min,max] range of the enum
    (bochscpu's Rust list stops at 'tigerlake').  We locate the value field by
    scanning for the current value, then verify through bx_param_num_c::get()."""
    global VAL_OFFSET
    p = model_param()
    cur = get_model_index()
    words = (ctypes.c_int64 * 64).from_address(p)
    cands = [i for i in range(1, 64) if words[i] == cur]
    for i in cands:
        old = words[i]
        words[i] = idx
        if get_model_index() == idx:
            VAL_OFFSET = i * 8
            return
        words[i] = old
    raise RuntimeError(f"could not locate value field of cpu.model (cur={cur}, cands={cands})")


# ---------------------------------------------------------------- guest memory
class Guest:
    """Identity-mapped (GVA == GPA) 64-bit guest with 2 MiB pages for the low
    1 GiB.  Physical pages are backed lazily by the missing-page handler."""

    PML4 = 0x1000
    PDPT = 0x2000
    PD = 0x3000
    SENTINEL = 0x10000  # return address; holds a HLT
    STACK_TOP = 0x200000  # stack grows down from 2 MiB
    CODE = 0x400000  # kernels.bin is linked at this address
    HEAP = 0x1000000  # bump allocator for argument buffers

    def __init__(self):
        self.pages = {}
        self.sess = bochscpu.Session()
        self.sess.missing_page_handler = self._missing
        # page tables: PML4[0] -> PDPT[0] -> PD[0..511] 2 MiB pages (PS=1)
        self.write(self.PML4, struct.pack("<Q", self.PDPT | 0x3))
        self.write(self.PDPT, struct.pack("<Q", self.PD | 0x3))
        self.write(self.PD, b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(512)))
        self.write(self.SENTINEL, b"\xf4")  # hlt
        self.heap = self.HEAP

    def _missing(self, gpa):
        gpa &= ~(PAGE - 1)
        hva = mem.allocate_host_page()
        if not hva:
            raise MemoryError("allocate_host_page failed")
        mem.page_insert(gpa, hva)
        self.pages[gpa] = hva

    def _ensure(self, addr, size):
        for pg in range(addr & ~(PAGE - 1), addr + size, PAGE):
            if pg not in self.pages:
                self._missing(pg)

    def write(self, addr, data):
        """Copy host bytes into guest memory (memmove straight into the host
        pages backing the guest-physical pages; GVA == GPA here)."""
        data = bytes(data)
        self._ensure(addr, len(data))
        off = 0
        while off < len(data):
            a = addr + off
            n = min(len(data) - off, PAGE - (a & (PAGE - 1)))
            ctypes.memmove(self.pages[a & ~(PAGE - 1)] + (a & (PAGE - 1)), data[off:off + n], n)
            off += n

    def read(self, addr, size):
        self._ensure(addr, size)
        out = bytearray()
        off = 0
        while off < size:
            a = addr + off
            n = min(size - off, PAGE - (a & (PAGE - 1)))
            out += ctypes.string_at(self.pages[a & ~(PAGE - 1)] + (a & (PAGE - 1)), n)
            off += n
        return bytes(out)

    def alloc(self, data_or_size, align=64):
        self.heap = (self.heap + align - 1) & ~(align - 1)
        addr = self.heap
        if isinstance(data_or_size, int):
            self._ensure(addr, data_or_size)
            self.heap += data_or_size
        else:
            self.write(addr, data_or_size)
            self.heap += len(data_or_size)
        return addr

    def load_image(self, path, syms):
        self.write(self.CODE, open(path, "rb").read())
        self.syms = {}
        for line in open(syms):
            name, addr = line.split()
            self.syms[name] = int(addr, 16)


# ---------------------------------------------------------------- CPU state
CR0 = 0x80010033  # PG | WP | NE | ET | MP | PE
CR4 = 0x00040620  # OSXSAVE(18) | OSXMMEXCPT(10) | OSFXSR(9) | PAE(5)
EFER = 0x00000D00  # NXE | LMA | LME
XCR0 = 0xE7  # x87 | SSE | AVX(YMM) | opmask | ZMM_Hi256 | Hi16_ZMM


class Double:
    """Marks a float argument as C double (plain Python floats are C float)."""
    def __init__(self, v):
        self.v = float(v)


def make_state(g, rip, args, rsp):
    s = bochscpu.State()
    s.cr0, s.cr4, s.efer, s.xcr0 = CR0, CR4, EFER, XCR0
    s.cr3 = g.PML4
    s.mxcsr = 0x1F80
    s.mxcsr_mask = 0xFFFF
    s.fpcw = 0x37F
    s.rflags = 0x2
    s.rip = rip
    s.rsp = rsp
    # SysV ABI: integer/pointer args -> rdi rsi rdx rcx r8 r9, float args ->
    # xmm0..7 (passed here as Python float = C float; use Double(x) for double)
    ints = [a for a in args if not isinstance(a, (float, Double))]
    flts = [a for a in args if isinstance(a, (float, Double))]
    if len(ints) > 6 + 8 or len(flts) > 8:  # ints 7.. go on the stack (see call())
        raise ValueError("too many arguments (at most 14 integer, 8 float)")
    for reg, v in zip(("rdi", "rsi", "rdx", "rcx", "r8", "r9"), ints):
        setattr(s, reg, v & 0xFFFFFFFFFFFFFFFF)
    if flts:
        zmm = s.zmm
        for i, v in enumerate(flts):
            raw = struct.pack("<d", v.v) if isinstance(v, Double) else struct.pack("<f", v) + bytes(4)
            q = [0] * 8
            q[0] = struct.unpack("<Q", raw)[0]
            zmm[i].q = q
        s.zmm = zmm
    # 64-bit ring-0 code segment: attr = descriptor bytes 5..6
    # (P=1 DPL=0 S=1 type=0xB exec/read/accessed, L=1)
    cs = bochscpu.Segment()
    cs.present, cs.selector, cs.base, cs.limit, cs.attr = True, 0x08, 0, 0xFFFFFFFF, 0x209B
    s.cs = cs
    for name in ("ds", "es", "ss", "fs", "gs"):
        d = bochscpu.Segment()
        # P=1 DPL=0 S=1 type=0x3 read/write/accessed, G=1 D/B=1
        d.present, d.selector, d.base, d.limit, d.attr = True, 0x10, 0, 0xFFFFFFFF, 0xC093
        setattr(s, name, d)
    # No GDT/IDT in memory: segment caches are loaded directly; any exception
    # is caught by the exception hook before Bochs would need the IDT.
    tr = bochscpu.Segment()
    tr.present, tr.selector, tr.base, tr.limit, tr.attr = True, 0x18, 0, 0x67, 0x8B
    s.tr = tr
    return s


class RunResult:
    pass


def call(g, func, *args, count=False, max_insns=None, trace=False):
    """Call guest function `func` (name or address) with integer args per the
    SysV ABI, run until it returns to the HLT sentinel.  Returns RunResult with
    rax, xmm0 (bytes), f32/f64 (xmm0 as float/double), exception info
    (vector, error, rip-after, cr2), instruction count (count=True), the
    faulting RIP (trace=True).  max_insns (needs count=True) stops runaway code."""
    rip = g.syms[func] if isinstance(func, str) else func
    # SysV: integer args 7.. sit on the stack above the return address, 8 bytes each
    ints = [a for a in args if not isinstance(a, (float, Double))]
    extra = ints[6:]
    rsp = g.STACK_TOP - 8 - 8 * (len(extra) + (len(extra) & 1))  # rsp + 8 16-byte aligned
    g.write(rsp, struct.pack("<Q", g.SENTINEL))  # return address -> hlt
    for i, v in enumerate(extra):
        g.write(rsp + 8 + 8 * i, struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF))
    state = make_state(g, rip, args, rsp)
    g.sess.cpu.state = state

    res = RunResult()
    res.exc = None
    res.insns = 0
    res.halted = False
    res.last_rip = None
    res.cr2 = None

    def on_hlt(sess, cpu_id):
        res.halted = True
        sess.stop()

    def on_exc(sess, cpu_id, vector, error_code):
        # NB: sess.cpu.rip here is already the address of the NEXT instruction
        # (observed for #UD and #PF); res.last_rip (count=True) is the faulting one.
        res.exc = (vector, error_code, sess.cpu.rip)
        res.cr2 = sess.cpu.cr2
        sess.stop()

    h = bochscpu.Hook()
    h.hlt = on_hlt
    h.exception = on_exc
    if count:
        def on_after(sess, cpu_id, insn):
            res.insns += 1
            if max_insns and res.insns >= max_insns:
                sess.stop()
        h.after_execution = on_after
    if trace:  # remember the RIP of each instruction (slow: ~1 us per insn)
        def on_before(sess, cpu_id, insn):
            res.last_rip = sess.cpu.rip
        h.before_execution = on_before

    t0 = time.perf_counter()
    g.sess.run([h])
    res.seconds = time.perf_counter() - t0
    st = g.sess.cpu.state
    res.rax = st.rax
    res.rip = st.rip
    res.state = st
    z0 = st.zmm[0].q
    res.xmm0 = struct.pack("<8Q", *z0)
    res.f32 = struct.unpack("<f", res.xmm0[:4])[0]
    res.f64 = struct.unpack("<d", res.xmm0[:8])[0]
    return res


def check_ok(r, what):
    if r.exc is not None:
        v, e, rip = r.exc
        last = f", faulting insn at {r.last_rip:#x}" if r.last_rip is not None else ""
        raise SystemExit(f"{what}: guest exception vector={v} error={e:#x} "
                         f"rip(next insn)={rip:#x}{last} cr2={r.cr2:#x}")
    if not r.halted:
        raise SystemExit(f"{what}: guest did not reach the HLT sentinel (rip={r.rip:#x})")
