#!/usr/bin/env bash
# Black-box tests of build/cogvlm-server over HTTP (pytest; see tests/api/README.md).
# Creates or reuses the virtualenv build/api-venv (reinstalls only when requirements.txt
# changed), then runs pytest on tests/api; the exit status is pytest's.
# Extra arguments go to pytest (e.g. -k stream, -x).
# Environment: COGVLM_SERVER_BIN (default build/cogvlm-server), COGVLM_SHARED_DATA
# (default ../shared/data), COGVLM_TEST_MODEL, COGVLM_TEST_TOKENIZER, COGVLM_API_TEST_LOGS
# (keep the daemons' logs there).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
VENV="$ROOT/build/api-venv"
REQ="$ROOT/tests/api/requirements.txt"
STAMP="$VENV/.requirements.sha256"
PY="${PYTHON:-python3}"

want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "api tests: installing Python packages into $VENV" >&2
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQ"
    echo "$want" > "$STAMP"
fi

if [ ! -x "${COGVLM_SERVER_BIN:-$ROOT/build/cogvlm-server}" ]; then
    echo "api tests: ${COGVLM_SERVER_BIN:-build/cogvlm-server} not built (run make)" >&2
    exit 2
fi

# exit status = pytest's (5, "no tests collected", is a failure too)
exec "$VENV/bin/python" -m pytest -q tests/api "$@"
