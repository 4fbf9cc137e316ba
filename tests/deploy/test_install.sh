#!/usr/bin/env bash
# make install / make uninstall with DESTDIR and PREFIX, in temporary roots.
# 1. `make install DESTDIR=T`: binaries, config, unit, GPU drop-in, docs (and the default
#    model when models/cogvlm-tiny-shapes is built) where docs/DEPLOY.md says; the
#    installed server starts with the installed config; the installed unit passes
#    `systemd-analyze verify` (paths mapped into T).
# 2. An edited T/etc/cogvlm/cogvlm.conf survives a second install and the uninstall.
# 3. `make uninstall DESTDIR=T` leaves no file, link or cogvlm directory behind.
# 4. The same with PREFIX=/opt/vlm SYSCONFDIR=/opt/vlm/etc
#    SYSTEMDUNITDIR=/etc/systemd/system: the unit's paths follow PREFIX.
# Exit 0 when all holds; prints each failure otherwise. A few seconds (no rebuild when the
# build is current).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SHARED="${COGVLM_SHARED_DATA:-$ROOT/../shared/data}"
fails=0
fail() { echo "test_install: FAIL: $*" >&2; fails=$((fails + 1)); }
T="$(mktemp -d /tmp/cogvlm-install.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
    rm -rf "$T"
}
trap cleanup EXIT
mk() { make --no-print-directory -C "$ROOT" "$@" >"$T/make.log" 2>&1 || { fail "make $*: $(tail -5 "$T/make.log")"; return 1; }; }

leftovers() { # $1: root; prints files, links and cogvlm directories under it
    find "$1" \( -type f -o -type l -o -name '*cogvlm*' \) -print 2>/dev/null
}

# ---- 1. install to DESTDIR
D="$T/root"
mk install DESTDIR="$D" || exit 1
for f in usr/local/bin/cogvlm-server usr/local/bin/cogvlm; do
    [ -x "$D/$f" ] || fail "$f not installed (executable)"
done
for f in etc/cogvlm/cogvlm.conf usr/local/lib/systemd/system/cogvlm-server.service \
         usr/local/share/cogvlm/cogvlm.conf.default usr/local/share/cogvlm/systemd/gpu.conf \
         usr/local/share/doc/cogvlm/DEPLOY.md; do
    [ -f "$D/$f" ] || fail "$f not installed"
done
cmp -s "$D/etc/cogvlm/cogvlm.conf" "$ROOT/config/cogvlm.conf" || fail "etc/cogvlm/cogvlm.conf differs from config/cogvlm.conf"
if [ -f "$ROOT/models/cogvlm-tiny-shapes/config.json" ]; then
    [ -f "$D/usr/local/share/cogvlm/models/cogvlm-tiny-shapes/config.json" ] ||
        fail "the default model is not installed in share/cogvlm/models"
fi
U="$D/usr/local/lib/systemd/system/cogvlm-server.service"
grep -q '^ExecStart=/usr/local/bin/cogvlm-server --config /etc/cogvlm/cogvlm.conf$' "$U" ||
    fail "installed unit: ExecStart is $(grep ^ExecStart= "$U")"
grep -q '^WorkingDirectory=/usr/local/share/cogvlm$' "$U" || fail "installed unit: WorkingDirectory"

# the installed unit verifies (its absolute paths mapped into the DESTDIR)
if command -v systemd-analyze >/dev/null; then
    mkdir -p "$T/verify"
    sed "s#/usr/local/#$D/usr/local/#g" "$U" > "$T/verify/cogvlm-server.service"
    out="$(cd "$T/verify" && systemd-analyze verify "$T/verify/cogvlm-server.service" 2>&1)" ||
        fail "installed unit: systemd-analyze verify: $out"
fi

# the installed server starts with the installed config (all defaults) and a test model
model=(--model "$SHARED/golden-tiny/model-bf16" --tokenizer "$SHARED/llama2-tokenizer.model")
[ -f "$ROOT/models/cogvlm-tiny-shapes/config.json" ] && model=()
(cd "$D/usr/local/share/cogvlm" && exec env -u COGVLM_SERVER_BIN "$D/usr/local/bin/cogvlm-server" \
    --config "$D/etc/cogvlm/cogvlm.conf" --port 0 --threads 1 --kv-memory 16M "${model[@]}" \
    >"$T/server.log" 2>&1) &
pids+=($!)
ok=0
for _ in $(seq 100); do
    grep -q "ready" "$T/server.log" && { ok=1; break; }
    kill -0 "${pids[0]}" 2>/dev/null || break
    sleep 0.1
done
[ $ok -eq 1 ] || fail "installed server did not get ready: $(tail -3 "$T/server.log")"
kill -TERM "${pids[0]}" 2>/dev/null
wait "${pids[0]}"; rc=$?
[ $rc -eq 0 ] || fail "installed server exit status $rc after SIGTERM"
pids=()

# ---- 2. an edited config survives install and uninstall
echo "port = 9001" >> "$D/etc/cogvlm/cogvlm.conf"
mk install DESTDIR="$D" || exit 1
grep -q "^port = 9001$" "$D/etc/cogvlm/cogvlm.conf" || fail "a second install overwrote the edited config"
mk uninstall DESTDIR="$D" || exit 1
grep -q "^port = 9001$" "$D/etc/cogvlm/cogvlm.conf" 2>/dev/null || fail "uninstall removed the edited config"
left="$(leftovers "$D" | grep -v "^$D/etc/cogvlm")"
[ -z "$left" ] || fail "uninstall (edited config kept) left: $left"
rm -f "$D/etc/cogvlm/cogvlm.conf"; rmdir "$D/etc/cogvlm"

# ---- 3. install + uninstall leaves nothing behind
mk install DESTDIR="$D" || exit 1
mk uninstall DESTDIR="$D" || exit 1
left="$(leftovers "$D")"
[ -z "$left" ] || fail "make uninstall DESTDIR left: $left"

# ---- 4. another PREFIX
P="$T/prefix"
mk install DESTDIR="$P" PREFIX=/opt/vlm SYSCONFDIR=/opt/vlm/etc SYSTEMDUNITDIR=/etc/systemd/system || exit 1
U="$P/etc/systemd/system/cogvlm-server.service"
[ -x "$P/opt/vlm/bin/cogvlm-server" ] || fail "PREFIX=/opt/vlm: no bin/cogvlm-server"
[ -f "$P/opt/vlm/etc/cogvlm/cogvlm.conf" ] || fail "SYSCONFDIR=/opt/vlm/etc: no cogvlm/cogvlm.conf"
if [ -f "$U" ]; then
    grep -q '^ExecStart=/opt/vlm/bin/cogvlm-server --config /opt/vlm/etc/cogvlm/cogvlm.conf$' "$U" ||
        fail "PREFIX unit: $(grep ^ExecStart= "$U")"
    grep -q '^EnvironmentFile=-/opt/vlm/etc/cogvlm/cogvlm.env$' "$U" || fail "PREFIX unit: EnvironmentFile"
    grep -q '^WorkingDirectory=/opt/vlm/share/cogvlm$' "$U" || fail "PREFIX unit: WorkingDirectory"
    ! grep -q '/usr/local' "$U" || fail "PREFIX unit still names /usr/local"
else
    fail "SYSTEMDUNITDIR=/etc/systemd/system: no unit"
fi
mk uninstall DESTDIR="$P" PREFIX=/opt/vlm SYSCONFDIR=/opt/vlm/etc SYSTEMDUNITDIR=/etc/systemd/system || exit 1
left="$(leftovers "$P")"
[ -z "$left" ] || fail "uninstall with PREFIX left: $left"

if [ $fails -ne 0 ]; then
    echo "test_install: $fails checks failed" >&2
    exit 1
fi
echo "test_install: ok"
