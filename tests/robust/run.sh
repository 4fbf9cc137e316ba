#!/usr/bin/env bash
# Robustness tests of build/cogvlm-server (Python 3 stdlib only, loopback only):
#   overload      a burst of 10x capacity: 429 + Retry-After for the excess, bounded latency;
#                 CPU-heavy refused prompts; logprobs output memory
#   slow-clients  slowloris, idle floods, huge headers, endless bodies, slow SSE readers
#   images        decompression bombs, 1x1 and extreme aspect ratios, truncated files
#   api-key       key-file and key-length edge cases that could fail open
#   soak          mixed traffic with cancellations; RSS, KV blocks and metrics afterwards
#   leaks         the server under valgrind: no definite leaks (skipped without valgrind)
# Each prints one PASS/FAIL/SKIP line with its measurements; the last line is
# "robust: N passed, N failed, N skipped". The exit status is 1 if any test failed.
#
# Usage: tests/robust/run.sh [name ...]     (default: all, in the order above)
# Environment: COGVLM_SERVER_BIN (default build/cogvlm-server), COGVLM_SHARED_DATA,
# COGVLM_TEST_MODEL, COGVLM_TEST_TOKENIZER (as tests/api), COGVLM_ROBUST_LOGS (keep the
# daemons' logs there), COGVLM_ROBUST_SOAK_SECONDS (default 60), COGVLM_ROBUST_SEED,
# COGVLM_ROBUST_IDLE (idle connections, default 1000), COGVLM_ROBUST_STRICT=1 (known
# server issues fail instead of XFAIL), PYTHON (default python3).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
BIN="${COGVLM_SERVER_BIN:-$ROOT/build/cogvlm-server}"
if [ ! -x "$BIN" ]; then
    echo "robust tests: $BIN not built (run make)" >&2
    exit 2
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 8))' 2>/dev/null; then
    echo "robust tests: $PY is missing or older than 3.8" >&2
    exit 2
fi

soak="${COGVLM_ROBUST_SOAK_SECONDS:-60}"
soak="${soak%.*}"
# name:script:time limit in seconds (a safety net; each test bounds its own loops)
TESTS=(
    "overload:test_overload.py:180"
    "slow-clients:test_slow_clients.py:180"
    "images:test_images.py:150"
    "api-key:test_api_key.py:120"
    "soak:test_soak.py:$((soak + 180))"
)
# valgrind is slow on a busy 2-core machine: opt in (LSan covers leaks in `make asan`)
[ -n "${COGVLM_ROBUST_LEAKS:-}" ] && TESTS+=("leaks:test_leaks.py:360")
want=("$@")
passed=0 failed=0 skipped=0
failed_names=()
t_all=$SECONDS
for entry in "${TESTS[@]}"; do
    IFS=: read -r name script limit <<<"$entry"
    if [ ${#want[@]} -gt 0 ] && [[ " ${want[*]} " != *" $name "* ]]; then
        continue
    fi
    t0=$SECONDS
    # own process group per test: the timeout kills the test and whatever it started
    timeout -k 10 "$limit" "$PY" -u "tests/robust/$script"
    rc=$?
    case $rc in
        0) passed=$((passed + 1)) ;;
        77) skipped=$((skipped + 1)) ;;
        124|137) echo "FAIL $name: timed out after $limit s"; failed=$((failed + 1)); failed_names+=("$name") ;;
        *) failed=$((failed + 1)); failed_names+=("$name") ;;
    esac
    echo "  ($name: $((SECONDS - t0)) s)"
done
echo "robust: $passed passed, $failed failed, $skipped skipped ($((SECONDS - t_all)) s)${failed_names[*]:+; failed: ${failed_names[*]}}"
[ "$failed" -eq 0 ]
