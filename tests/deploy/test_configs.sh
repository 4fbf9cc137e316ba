#!/usr/bin/env bash
# Lints deploy/ (nginx -t, promtool check/test, Kubernetes schemas, Dockerfiles, Grafana;
# see test_configs.py) in the virtualenv build/deploy-venv, created or refreshed here when
# tests/deploy/requirements.txt changed (PyPI, about 25 MB the first time).
# Exit 0 when everything holds; prints each failure otherwise.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/build/deploy-venv"
REQ="$ROOT/tests/deploy/requirements.txt"
STAMP="$VENV/.requirements.sha256"
PY="${PYTHON:-python3}"
want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "test_configs: installing Python packages into $VENV" >&2
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQ"
    echo "$want" > "$STAMP"
fi
exec "$VENV/bin/python" "$ROOT/tests/deploy/test_configs.py" "$@"
