#!/bin/sh
# tests/emu/run.sh - the AVX-512 kernels under emulation (BochsCPU), for machines without
# them: builds the kernels freestanding (no libc: ld refuses any undefined symbol) as a
# guest image, the AVX2 references as a native library, installs the pinned bochscpu-python
# wheel into a venv, and runs tests/emu/test_q4gemm_avx512.py (the Q4 GEMM) and
# test_qdot_avx512.py (the Q8 / Q4 decode kernel, the Q8 GEMM); fails if either does. Where
# the wheel cannot be installed or loaded (offline, another CPU architecture) it says so and
# exits 0:
# the op tests still run the kernels natively on CPUs that have AVX-512 VNNI.
#   tests/emu/run.sh [q4gemm | qdot] [OPTIONS]   one test only, with its options; without a
#                                                name both tests get OPTIONS (--seed, --random)
set -e
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
B=${EMU_BUILD:-$ROOT/build/emu}
VENV=${EMU_VENV:-$ROOT/build/emu-venv}
CC=${CC:-gcc}
mkdir -p "$B"
if [ "$(uname -m)" != x86_64 ]; then
    echo "emu: SKIPPED (not an x86-64 host)"
    exit 0
fi
F="-O2 -std=c11 -D_GNU_SOURCE -I$ROOT -ffreestanding -fno-builtin -fno-pic -fno-stack-protector
   -fno-asynchronous-unwind-tables -fcf-protection=none -ffunction-sections -fdata-sections"
# shellcheck disable=SC2086
$CC $F -c "$ROOT/kernels/cpu/q_dot_avx512.c" -o "$B/q_dot_avx512.o"
# shellcheck disable=SC2086
$CC $F -c "$ROOT/kernels/cpu/q_dot_avx2.c" -o "$B/q_dot_avx2.o" # cvlm_cpu_qx_floats
# the AVX2 decode kernel too: `run.sh qdot --func cvlm_cpu_gemv_qdot_avx2` checks the test
ld -static -nostdlib -N -Ttext=0x400000 -e 0x400000 --gc-sections --no-warn-rwx-segments \
    --undefined=cvlm_cpu_gemm_q4dot_avx512vnni --undefined=cvlm_cpu_gemv_qdot_avx512vnni \
    --undefined=cvlm_cpu_gemm_q8dot_avx512vnni \
    --undefined=cvlm_cpu_gemv_qdot_avx2 "$B/q_dot_avx512.o" "$B/q_dot_avx2.o" \
    -o "$B/q4.elf"
objcopy -O binary "$B/q4.elf" "$B/q4.bin"
nm "$B/q4.elf" | awk 'NF == 3 {print $3, $1}' >"$B/q4.syms"
$CC -O2 -std=c11 -D_GNU_SOURCE -I"$ROOT" -shared -fPIC "$ROOT/kernels/cpu/q_dot_avx2.c" \
    -o "$B/libqdot_avx2.so"
$CC -O2 -shared -fPIC "$ROOT/tests/emu/glibc_compat.c" -o "$B/libglibc_compat.so"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import bochscpu' 2>/dev/null; then
    python3 -m venv "$VENV" &&
        "$VENV/bin/pip" install -q "bochscpu-python==0.4.0" >"$B/pip.log" 2>&1 || {
        echo "emu: SKIPPED (bochscpu-python could not be installed: $B/pip.log)"
        exit 0
    }
fi
if ! EMU_BUILD="$B" "$VENV/bin/python" -c 'import sys; sys.path.insert(0, "'"$ROOT"'/tests/emu"); import bochs_guest' 2>"$B/import.log"; then
    echo "emu: SKIPPED (bochscpu does not load here: $B/import.log)"
    exit 0
fi
cd "$ROOT/tests/emu"
TESTS="q4gemm qdot"
case "$1" in q4gemm | qdot) TESTS=$1 && shift ;; esac
rc=0
for t in $TESTS; do
    EMU_BUILD="$B" "$VENV/bin/python" "test_${t}_avx512.py" "$@" || rc=1
done
exit $rc
