#!/usr/bin/env bash
# run.sh - THE prepared script of a GPU session: correctness, then speed, of the CUDA
# backend, with every result in $OUT however far the run gets.
#
# A GPU session has 15 minutes of device time, machine start included, for all its calls;
# this script keeps within GPU_RUN_BUDGET (default 300 s) so that one rerun still fits.
# Steps, most important first; each runs under its own `timeout` (its limit, capped by the
# time left), a failing step never stops the later ones, and a step that no longer fits is
# recorded as skipped:
#   nvidia-smi      the device (name, driver) -> logs and report
#   build           only when no binaries were carried (or GPU_RUN_BUILD=1): make cuda
#   libs            tests/gpu/libs.sh: every library the binaries need, from `ldd`: the
#                   carried ones, the rest located there (pip wheels, toolkit, system)
#   python-deps     the carried wheels (jsonschema & co.) when the accuracy test lacks them
#   op-parity       every op vs the CPU backend             -> $OUT/op_parity.json
#   fixtures        tests/gpu/fixture.py unpack: the carried golden fixtures (packed by
#                   prepare.sh: .xz files, the float32 models rebuilt from the BF16 ones)
#   golden          cogvlm golden --backend cuda (BF16 tolerance, greedy tokens reported)
#   golden-cogvlm2  the same on golden-cogvlm2-tiny (GQA, vision-expert QKV bias, the conv),
#                   then on the CPU backend with the same carried weights, for comparison
#   golden-quant    golden-tiny --quantize int8 and int4 (and golden-cogvlm2-tiny int4) on
#                   CUDA, each followed by the CPU backend with the same quantization
#                   (report mode: the errors of both against the reference are printed)
#   op-parity-ref   the reference kernels, in a process of its own -> $OUT/op_parity_ref.json
#   accuracy        tests/api/test_tiny_accuracy.py on cogvlm-server --backend cuda
#   sanitizer       op-parity --small under compute-sanitizer memcheck (when it exists)
#                                                            -> $OUT/op_parity_small.json
#   bench-vlm       cogvlm bench-vlm --backend cuda (17B shapes) -> $OUT/bench_vlm.json
#   bench-vlm-q4    the same with --quantize int4 (W4A16 decode), batch 1 and 16
#   bench-torch     tests/gpu/bench_torch.py, the PyTorch eager baseline
# After and before every step $OUT/report.json and report.txt are rewritten (per step:
# passed / failed / skipped / running, exit status, seconds, why), $OUT/logs.txt gets the
# finished step's output (head and tail when long) and $OUT/step.log holds the output of
# the step in progress, so a run cut at any point returns everything done so far. $OUT
# never holds more than 8 files (what a device call returns).
#
# Inputs: the checkout, and build-cuda/gpu-carry/ from tests/gpu/prepare.sh (bin/, lib/,
# whl/, shared/data/ with the golden-tiny files and the tokenizer); shared data is also
# looked for at $COGVLM_SHARED and ../shared. Environment: OUT (default
# build-cuda/gpu-out), GPU_RUN_BUDGET (seconds, default 300), GPU_STEPS (comma list of the
# steps above to run, default all; nvidia-smi, build, libs and python-deps run whenever a
# chosen step needs them), GOLDEN_TOL (default: golden's own for CUDA, 5e-2),
# GPU_RUN_BUILD=1 (build even though binaries were carried), GPU_CARRY (the carry folder).
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
ROOT=$PWD
OUT=${OUT:-$ROOT/build-cuda/gpu-out}
CARRY=${GPU_CARRY:-$ROOT/build-cuda/gpu-carry}
WORK=$(mktemp -d /tmp/cogvlm-gpu.XXXXXX)
LOG=$OUT/logs.txt
START=$(date +%s)
BUDGET=${GPU_RUN_BUDGET:-300}
DEADLINE=$((START + BUDGET))
RESERVE=6 # seconds kept for the last report
mkdir -p "$OUT" || exit 2
rm -f "$OUT"/report.json "$OUT"/report.txt "$OUT"/step.log "$OUT"/op_parity*.json \
    "$OUT"/bench_vlm.json "$OUT"/nvidia-smi.txt
: > "$LOG"
: > "$WORK/steps.tsv"

say() { echo "run.sh: $*" | tee -a "$LOG"; }

report() {
    python3 "$ROOT/tests/gpu/report.py" --out "$OUT" --work "$WORK" \
        --elapsed $(($(date +%s) - START)) >> "$WORK/report.log" 2>&1 ||
        { echo "report.py failed; the step table:"; cat "$WORK/steps.tsv"; } > "$OUT/report.txt"
}

# row NAME STATUS RC SECONDS WHY: one line of the step table
row() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$WORK/steps.tsv"; }

skip() {
    say "[$1] skipped: $2"
    row "$1" skipped - 0 "$2"
    report
}

# asked NAME: whether GPU_STEPS asks for the step; wanted NAME: the same, recording a skip
asked() {
    [ "${GPU_STEPS:-all}" = all ] && return 0
    case ",${GPU_STEPS}," in *",$1,"*) return 0 ;; esac
    return 1
}
wanted() {
    asked "$1" && return 0
    skip "$1" "not asked for (GPU_STEPS=$GPU_STEPS)"
    return 1
}

# fold NAME: the step's output (step.log) into logs.txt (head and tail when long) and WORK
fold() {
    local f=$OUT/step.log n
    n=$(wc -c < "$f")
    if [ "$n" -gt 24000 ]; then
        { head -c 6000 "$f"; echo "... [$n bytes, middle cut] ..."; tail -c 16000 "$f"; } >> "$LOG"
    else
        cat "$f" >> "$LOG"
    fi
    mv "$f" "$WORK/$1.log"
}

# run_step NAME LIMIT CMD...: CMD under `timeout`, at most LIMIT seconds and never past the
# budget; records passed/failed (with why: the exit, a timeout, the output's last line).
run_step() {
    local name=$1 limit=$2 rc t0 left dt last
    shift 2
    t0=$(date +%s)
    left=$((DEADLINE - t0 - RESERVE))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        skip "$name" "out of time (${left}s of the ${BUDGET}s budget left)"
        return 125
    fi
    say "[$name] $(date +%T) limit ${limit}s: $*"
    echo "$name $t0 $limit" > "$WORK/running"
    report
    timeout -k 5 "$limit" "$@" < /dev/null > "$OUT/step.log" 2>&1
    rc=$?
    dt=$(($(date +%s) - t0))
    last=$(grep -v '^[[:space:]]*$' "$OUT/step.log" | tail -1 | cut -c1-200 | tr '\t' ' ')
    fold "$name"
    rm -f "$WORK/running"
    case $rc in
    0) row "$name" passed 0 "$dt" "" ;;
    124 | 137) row "$name" failed "$rc" "$dt" "timed out after ${limit}s; last output: $last" ;;
    *) row "$name" failed "$rc" "$dt" "exit $rc: $last" ;;
    esac
    say "[$name] exit $rc after ${dt}s"
    report
    return "$rc"
}

# ---- the device ----------------------------------------------------------------------------------
say "start $(date -u +%FT%TZ), budget ${BUDGET}s, steps ${GPU_STEPS:-all}, out $OUT"
if command -v nvidia-smi > /dev/null; then
    run_step nvidia-smi 20 nvidia-smi
    timeout 10 nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null |
        head -1 > "$WORK/device.txt"
else
    row nvidia-smi failed 127 0 "nvidia-smi not found: no NVIDIA driver on this machine"
    say "[nvidia-smi] failed: not found"
fi
report

# ---- shared data: the carried copy first (packed: unpacked into WORK) -------------------------
SHARED=""
if [ -d "$CARRY/shared/data" ]; then
    run_step fixtures 60 python3 "$ROOT/tests/gpu/fixture.py" unpack "$CARRY/shared/data" \
        "$WORK/data"
fi
for d in "$WORK/data" "$CARRY/shared/data" "${COGVLM_SHARED:+$COGVLM_SHARED/data}" \
    "$ROOT/../shared/data"; do
    if [ -n "$d" ] && [ -f "$d/golden-tiny/manifest.json" ]; then
        SHARED=$(cd "$d" && pwd)
        break
    fi
done
say "shared data: ${SHARED:-NOT FOUND (golden and accuracy will be skipped)}"

# ---- binaries: carried, else built ---------------------------------------------------------------
have_deps() {
    local h
    for h in jansson.h microhttpd.h uv.h b64/cencode.h jpeglib.h png.h webp/decode.h gif_lib.h; do
        echo "#include <$h>" | cc -E -x c - > /dev/null 2>&1 || return 1
    done
}
BIN=""
chmod +x "$CARRY"/bin/* 2> /dev/null # in case the copy lost the mode bits
if [ -x "$CARRY/bin/cogvlm" ] && [ "${GPU_RUN_BUILD:-0}" != 1 ]; then
    BIN=$CARRY/bin
    skip build "using the binaries carried in $CARRY/bin"
elif have_deps; then
    run_step build 240 nice make -j16 cuda && BIN=$ROOT/build-cuda
else
    skip build "no carried binaries and no -dev packages to build with (run prepare.sh)"
fi
REAL=() PARITY_REAL=""
for b in cogvlm cogvlm-server op-parity tests/op-parity; do
    [ -n "$BIN" ] && [ -x "$BIN/$b" ] && REAL+=("$BIN/$b")
done
for b in "${REAL[@]}"; do
    [ "$(basename "$b")" = op-parity ] && PARITY_REAL=$b
done

# ---- libraries, from ldd; wrappers that set them for our binaries only ---------------------------
W=$WORK/bin
mkdir -p "$W"
if [ "${#REAL[@]}" -gt 0 ]; then
    run_step libs 60 bash "$ROOT/tests/gpu/libs.sh" "$WORK/ldpath" "$CARRY/lib" "${REAL[@]}"
else
    skip libs "no binaries"
fi
LDP=$(cat "$WORK/ldpath" 2>/dev/null)
for b in "${REAL[@]}"; do # python and torch keep the system's libraries
    printf '#!/bin/bash\nLD_LIBRARY_PATH=%q${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec %q "$@"\n' \
        "$LDP" "$b" > "$W/$(basename "$b")"
    chmod +x "$W/$(basename "$b")"
done
have() { [ -x "$W/$1" ]; }

# ---- Python packages of the accuracy test --------------------------------------------------------
PYCHECK='import jsonschema, referencing, yaml, pytest, PIL'
if ! asked accuracy; then
    :
elif python3 -c "$PYCHECK" 2> /dev/null; then
    row python-deps passed 0 0 "already importable"
elif compgen -G "$CARRY/whl/*.whl" > /dev/null; then
    run_step python-deps 60 bash -c 'python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$1" "$2"/*.whl && PYTHONPATH=$1 python3 -c "$3"' \
        _ "$WORK/site" "$CARRY/whl" "$PYCHECK" &&
        export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
else
    skip python-deps "jsonschema & co. missing and no wheels carried"
fi

# ---- correctness ---------------------------------------------------------------------------------
if ! wanted op-parity; then :; elif have op-parity; then
    run_step op-parity 100 "$W/op-parity" --json "$OUT/op_parity.json"
else skip op-parity "no op-parity binary"; fi

if ! wanted golden; then :; elif have cogvlm && [ -n "$SHARED" ]; then
    run_step golden 60 "$W/cogvlm" golden --fixture "$SHARED/golden-tiny" \
        --tokenizer "$SHARED/llama2-tokenizer.model" --backend cuda \
        ${GOLDEN_TOL:+--tol "$GOLDEN_TOL"}
else skip golden "no cogvlm binary or no shared data"; fi

# golden_pair LABEL FIXTURE ARGS...: CUDA then CPU on the same fixture and arguments; the
# exit status is the CUDA run's (the CPU run is the comparison: same weights, F32
# activations)
golden_pair() {
    local label=$1 fx=$2 rc
    shift 2
    echo "== $label: cuda"
    "$W/cogvlm" golden --fixture "$fx" --backend cuda "$@"
    rc=$?
    echo "== $label: cpu"
    "$W/cogvlm" golden --fixture "$fx" --backend cpu --tokens report "$@"
    return "$rc"
}
export -f golden_pair
export W

if ! wanted golden-cogvlm2; then
    :
elif have cogvlm && [ -f "$SHARED/golden-cogvlm2-tiny/manifest.json" ]; then
    run_step golden-cogvlm2 60 bash -c 'golden_pair cogvlm2 "$1" ${2:+--tol "$2"}' _ \
        "$SHARED/golden-cogvlm2-tiny" "${GOLDEN_TOL:-}"
else skip golden-cogvlm2 "no cogvlm binary or no golden-cogvlm2-tiny in the shared data"; fi

if ! wanted golden-quant; then :; elif have cogvlm && [ -n "$SHARED" ]; then
    run_step golden-quant 90 bash -c 'rc=0
        for q in int8 int4; do
            golden_pair "golden-tiny $q" "$1/golden-tiny" --tokenizer "$1/llama2-tokenizer.model" \
                --quantize $q || rc=1
        done
        if [ -f "$1/golden-cogvlm2-tiny/manifest.json" ]; then
            golden_pair "golden-cogvlm2-tiny int4" "$1/golden-cogvlm2-tiny" --quantize int4 || rc=1
        fi
        exit $rc' _ "$SHARED"
else skip golden-quant "no cogvlm binary or no shared data"; fi

if ! wanted op-parity-ref; then :; elif have op-parity; then
    run_step op-parity-ref 45 "$W/op-parity" --reference --json "$OUT/op_parity_ref.json"
else skip op-parity-ref "no op-parity binary"; fi

if ! wanted accuracy; then :; elif have cogvlm-server && [ -n "$SHARED" ]; then
    COGVLM_SERVER_BIN="$W/cogvlm-server" COGVLM_SHARED_DATA="$SHARED" \
        COGVLM_SERVER_EXTRA_ARGS="--backend cuda" PYTHONUNBUFFERED=1 \
        run_step accuracy 100 python3 -m pytest -q -s -p no:cacheprovider \
        tests/api/test_tiny_accuracy.py
else skip accuracy "no cogvlm-server binary or no shared data"; fi

SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer \
    /usr/local/cuda/compute-sanitizer/compute-sanitizer 2> /dev/null | head -1)
if ! wanted sanitizer; then :; elif [ -z "$SAN" ]; then
    skip sanitizer "compute-sanitizer not found"
elif ! have op-parity; then
    skip sanitizer "no op-parity binary"
else # the real binary (not the wrapper) under the tool, the libraries through env
    run_step sanitizer 75 env LD_LIBRARY_PATH="$LDP" "$SAN" --tool memcheck --error-exitcode 3 \
        --print-limit 20 "$PARITY_REAL" --small --no-bench \
        --json "$OUT/op_parity_small.json"
fi

# ---- speed ---------------------------------------------------------------------------------------
if ! wanted bench-vlm; then :; elif have cogvlm; then
    run_step bench-vlm 150 "$W/cogvlm" bench-vlm --backend cuda --batch 1,16,64 \
        --decode-steps 16 --json "$OUT/bench_vlm.json"
else skip bench-vlm "no cogvlm binary"; fi

if ! wanted bench-vlm-q4; then :; elif have cogvlm; then
    run_step bench-vlm-q4 120 "$W/cogvlm" bench-vlm --backend cuda --quantize int4 --batch 1,16 \
        --decode-steps 16 --vit-layers 2 --json "$WORK/bench_vlm_q4.json"
else skip bench-vlm-q4 "no cogvlm binary"; fi

if wanted bench-torch; then
    PYTHONUNBUFFERED=1 run_step bench-torch 120 python3 tests/gpu/bench_torch.py \
        --json "$WORK/bench_torch.json"
fi

# ---- the final report ----------------------------------------------------------------------------
touch "$WORK/finished"
report
cat "$OUT/report.txt" 2>/dev/null
say "done in $(($(date +%s) - START))s"
cat "$WORK/report.log" 2>/dev/null >> "$LOG"
rm -rf "$WORK"
