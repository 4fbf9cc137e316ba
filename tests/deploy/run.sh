#!/usr/bin/env bash
# Runs every deployment test (docs/DEPLOY.md, "Tests"); each also runs alone.
# Needs build/cogvlm-server (make) and ../shared/data (the tiny test model); installs
# nginx (apt-get) and a virtualenv build/deploy-venv (PyPI) when missing.
# Prints one line per test and exits non-zero when any failed.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 2
pass=0 fail=0
for t in test_systemd.sh test_notify.py test_install.sh test_configs.sh test_lb.py; do
    if "tests/deploy/$t"; then pass=$((pass + 1)); else echo "deploy: $t FAILED" >&2; fail=$((fail + 1)); fi
done
echo "deploy: $pass passed, $fail failed"
[ $fail -eq 0 ]
