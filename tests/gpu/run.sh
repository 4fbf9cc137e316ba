#!/usr/bin/env bash
# run.sh - THE prepared script of the GPU machine: build, correctness and speed of the
# CUDA backend in one run of under 8 minutes, results in $OUT.
#
# Steps (each under `timeout`, capped by the time left; a failing step never stops the
# later ones, the report records it):
#   1. nvidia-smi                      -> $OUT/nvidia-smi.txt (device, peaks)
#   2. make -j16 cuda                  (or the binaries tests/gpu/prepare.sh carried in
#                                       .gpu-carry/bin when this machine lacks the -dev
#                                       packages)
#   3. op-parity                       -> $OUT/op_parity.json (every op vs the CPU backend)
#   4. cogvlm golden --backend cuda    (golden-tiny fixture, BF16-activation tolerance)
#   5. tests/api/test_tiny_accuracy.py on cogvlm-server --backend cuda
#   6. cogvlm bench-vlm --backend cuda -> $OUT/bench_vlm.json (17B shapes: vision + 1278-
#                                       token prefill, decode at batch 1/16/64)
#   7. tests/gpu/bench_torch.py        -> $OUT/bench_torch.json (PyTorch eager baseline)
#   8. $OUT/report.json + $OUT/report.txt; every step's output in $OUT/logs.txt
# Inputs: the repo (this checkout), the shared data at $COGVLM_SHARED, ../shared or
# .gpu-carry/shared (needs data/golden-tiny, data/llama2-tokenizer.model and
# data/openai-openapi.yaml), optionally .gpu-carry/ from tests/gpu/prepare.sh.
# Environment: OUT (default build-cuda/gpu-out), GPU_RUN_BUDGET (seconds, default 450),
# GOLDEN_TOL (default 5e-2), GPU_RUN_PREBUILT=1 (use .gpu-carry/bin, skip the build).
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
ROOT=$PWD
OUT=${OUT:-$ROOT/build-cuda/gpu-out}
CARRY=$ROOT/.gpu-carry
WORK=$(mktemp -d /tmp/cogvlm-gpu.XXXXXX)
LOG=$OUT/logs.txt
START=$(date +%s)
DEADLINE=$((START + ${GPU_RUN_BUDGET:-450}))
mkdir -p "$OUT" && : > "$LOG" && : > "$WORK/steps"

say() { echo "run.sh: $*" | tee -a "$LOG"; }

# run_step NAME LIMIT RESERVE CMD...: runs CMD under timeout, at most LIMIT seconds and
# never into the RESERVE seconds kept for the steps after it; output to $WORK/NAME.log,
# its head and tail to logs.txt; records "NAME rc seconds" in $WORK/steps.
run_step() {
    local name=$1 limit=$2 reserve=$3 rc t0 left
    shift 3
    t0=$(date +%s)
    left=$((DEADLINE - t0 - reserve))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        say "[$name] skipped: out of time"
        echo "$name skipped 0" >> "$WORK/steps"
        return 125
    fi
    say "[$name] $(date +%T) limit ${limit}s: $*"
    timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    if [ "$(wc -c < "$WORK/$name.log")" -gt 24000 ]; then
        {
            head -c 6000 "$WORK/$name.log"
            echo "... [$(wc -c < "$WORK/$name.log") bytes, middle cut] ..."
            tail -c 16000 "$WORK/$name.log"
        } >> "$LOG"
    else
        cat "$WORK/$name.log" >> "$LOG"
    fi
    [ "$rc" -eq 124 ] && say "[$name] TIMED OUT after ${limit}s"
    say "[$name] exit $rc after $(($(date +%s) - t0))s"
    echo "$name $rc $(($(date +%s) - t0))" >> "$WORK/steps"
    return "$rc"
}

# ---- 1. the device ------------------------------------------------------------------------
run_step nvidia-smi 20 400 nvidia-smi
cp "$WORK/nvidia-smi.log" "$OUT/nvidia-smi.txt" 2>/dev/null
GPU_NAME=$(timeout 10 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
say "device: ${GPU_NAME:-unknown}"

# ---- paths: shared data, carried libraries and Python packages ---------------------------
SHARED=""
for d in "${COGVLM_SHARED:-}" "$ROOT/../shared" "$CARRY/shared" "$ROOT/shared"; do
    if [ -n "$d" ] && [ -d "$d/data/golden-tiny" ]; then
        SHARED=$(cd "$d" && pwd)
        break
    fi
done
say "shared data: ${SHARED:-NOT FOUND (golden and accuracy steps will fail)}"
if [ -d "$CARRY/lib" ]; then
    export LD_LIBRARY_PATH="$CARRY/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# CUDA libraries: the toolkit's, else those of the pip wheels PyTorch uses
if [ ! -e /usr/local/cuda/lib64/libcublasLt.so ] && ! ldconfig -p 2>/dev/null | grep -q libcublasLt; then
    NV=$(python3 -c 'import nvidia, os; print(":".join(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in os.listdir(p) if os.path.isdir(os.path.join(p, d, "lib"))))' 2>/dev/null)
    [ -n "$NV" ] && export LD_LIBRARY_PATH="$NV${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if ! python3 -c 'import jsonschema, referencing, yaml, pytest, PIL' 2>/dev/null &&
    compgen -G "$CARRY/whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "$CARRY"/whl/*.whl >> "$LOG" 2>&1 &&
        export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---- 2. build ------------------------------------------------------------------------------
have_deps() {
    local h
    for h in jansson.h microhttpd.h uv.h b64/cencode.h jpeglib.h png.h webp/decode.h gif_lib.h; do
        echo "#include <$h>" | cc -E -x c - > /dev/null 2>&1 || return 1
    done
}
BIN=""
if [ "${GPU_RUN_PREBUILT:-0}" = 1 ]; then
    say "build: skipped (GPU_RUN_PREBUILT=1)"
    echo "build skipped-prebuilt 0" >> "$WORK/steps"
elif have_deps; then
    run_step build 240 200 make -j16 cuda && BIN=$ROOT/build-cuda
else
    say "build: the -dev packages are missing here (no network to install them)"
    echo "build skipped-no-deps 0" >> "$WORK/steps"
fi
if [ -z "$BIN" ] && [ -x "$CARRY/bin/cogvlm" ]; then
    BIN=$CARRY/bin
    say "using the binaries carried in .gpu-carry/bin (built by tests/gpu/prepare.sh)"
fi
PARITY=""
for p in "$BIN/tests/op-parity" "$BIN/op-parity"; do
    [ -x "$p" ] && PARITY=$p && break
done

# ---- 3. op parity --------------------------------------------------------------------------
if [ -n "$PARITY" ]; then
    run_step op-parity 120 170 "$PARITY" --json "$OUT/op_parity.json"
else
    say "op-parity: no binary"
    echo "op-parity no-binary 0" >> "$WORK/steps"
fi

# ---- 4. golden -----------------------------------------------------------------------------
if [ -n "$BIN" ] && [ -n "$SHARED" ]; then
    run_step golden 60 150 "$BIN/cogvlm" golden --fixture "$SHARED/data/golden-tiny" \
        --tokenizer "$SHARED/data/llama2-tokenizer.model" --backend cuda --tol "${GOLDEN_TOL:-5e-2}"
fi

# ---- 5. accuracy of the embedded model, through the daemon on the GPU -----------------------
if [ -n "$BIN" ] && [ -n "$SHARED" ]; then
    COGVLM_SERVER_BIN="$BIN/cogvlm-server" COGVLM_SHARED_DATA="$SHARED/data" \
        COGVLM_SERVER_EXTRA_ARGS="--backend cuda" PYTHONUNBUFFERED=1 \
        run_step accuracy 150 130 python3 -m pytest -q -s -p no:cacheprovider \
        tests/api/test_tiny_accuracy.py
fi

# ---- 6. GPU benchmark (17B shapes, weights generated on the device) ------------------------
if [ -n "$BIN" ]; then
    run_step bench-vlm 180 70 "$BIN/cogvlm" bench-vlm --backend cuda --batch 1,16,64 \
        --decode-steps 16 --json "$OUT/bench_vlm.json"
fi

# ---- 7. PyTorch eager baseline -------------------------------------------------------------
PYTHONUNBUFFERED=1 run_step bench-torch 150 10 python3 tests/gpu/bench_torch.py \
    --json "$OUT/bench_torch.json"

# ---- 8. report -----------------------------------------------------------------------------
GPU_NAME="$GPU_NAME" python3 "$ROOT/tests/gpu/report.py" --out "$OUT" --steps "$WORK/steps" \
    --logs "$WORK" >> "$LOG" 2>&1 || say "report: failed (see above)"
cat "$OUT/report.txt" 2>/dev/null
say "done in $(($(date +%s) - START))s"
rm -rf "$WORK"
