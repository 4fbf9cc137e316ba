#!/usr/bin/env bash
# The systemd unit: `systemd-analyze verify` of systemd/cogvlm-server.service, alone and
# with the GPU drop-in (systemd/gpu.conf), from a temporary copy whose ExecStart names the
# built binary (verify checks that it exists); any warning about the unit fails the test
# (verify itself only warns on unknown keys and bad values). Then the settings the
# deployment relies on (Type=notify, the config path, EnvironmentFile, a dedicated user,
# the hardening, TimeoutStopSec > drain_timeout + 5 s, Restart=on-failure), and
# `systemd-analyze security --offline` exposure <= 3.0 ("OK").
# Exit 0 when all holds; prints each failure otherwise. A second or two.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
UNIT="$ROOT/systemd/cogvlm-server.service"
DROPIN="$ROOT/systemd/gpu.conf"
BIN="${COGVLM_SERVER_BIN:-$ROOT/build/cogvlm-server}"
fails=0
fail() { echo "test_systemd: FAIL: $*" >&2; fails=$((fails + 1)); }

if ! command -v systemd-analyze >/dev/null; then
    echo "test_systemd: systemd-analyze missing, installing systemd with apt-get"
    s=""; [ "$(id -u)" -ne 0 ] && s="sudo -n"
    DEBIAN_FRONTEND=noninteractive $s apt-get install -y -qq --no-install-recommends systemd \
        >/dev/null 2>&1 || { DEBIAN_FRONTEND=noninteractive $s apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive $s apt-get install -y -qq --no-install-recommends \
        systemd >/dev/null; }
    command -v systemd-analyze >/dev/null || { echo "test_systemd: FAIL: no systemd-analyze" >&2; exit 1; }
fi
[ -x "$BIN" ] || { echo "test_systemd: $BIN not built (run make)" >&2; exit 2; }

T="$(mktemp -d /tmp/cogvlm-systemd.XXXXXX)"
trap 'rm -rf "$T"' EXIT

# ---- verify, with ExecStart pointing at the built binary
sed "s#^ExecStart=/usr/local/bin/cogvlm-server #ExecStart=$BIN #" "$UNIT" > "$T/cogvlm-server.service"
grep -q "^ExecStart=$BIN --config /etc/cogvlm/cogvlm.conf\$" "$T/cogvlm-server.service" ||
    fail "ExecStart is not /usr/local/bin/cogvlm-server --config /etc/cogvlm/cogvlm.conf"
verify() { # $1: what
    local out rc
    out="$(cd "$T" && systemd-analyze verify "$T/cogvlm-server.service" 2>&1)"
    rc=$?
    [ $rc -eq 0 ] || fail "$1: systemd-analyze verify exited $rc: $out"
    # warnings about other units of this host are not ours; any about ours fail
    local mine
    mine="$(printf '%s\n' "$out" | grep -E "cogvlm|$T" || true)"
    [ -z "$mine" ] || fail "$1: systemd-analyze verify warns: $mine"
}
verify "unit"
mkdir -p "$T/cogvlm-server.service.d"
cp "$DROPIN" "$T/cogvlm-server.service.d/gpu.conf"
verify "unit + gpu.conf drop-in"
rm -rf "$T/cogvlm-server.service.d"

# ---- the settings the deployment relies on (last assignment wins, as in systemd)
val() { grep -E "^$1=" "$UNIT" | tail -1 | cut -d= -f2-; }
want() { # key value
    local v; v="$(val "$1")"
    [ "$v" = "$2" ] || fail "$1=$v, want $1=$2"
}
want Type notify
want EnvironmentFile -/etc/cogvlm/cogvlm.env
want User cogvlm
want Restart on-failure
want NoNewPrivileges yes
want ProtectSystem strict
want ProtectHome yes
want PrivateTmp yes
want PrivateDevices yes
want CapabilityBoundingSet ""
want SystemCallFilter "~@privileged"
grep -q "^SystemCallFilter=@system-service$" "$UNIT" || fail "no SystemCallFilter=@system-service"
grep -q "^RestrictAddressFamilies=" "$UNIT" || fail "no RestrictAddressFamilies="
grep -q "^#WatchdogSec=" "$UNIT" || grep -q "^WatchdogSec=" "$UNIT" || fail "WatchdogSec not documented"
grep -q "^DeviceAllow=/dev/nvidiactl rw$" "$DROPIN" || fail "gpu.conf: no DeviceAllow=/dev/nvidiactl"
grep -q "^PrivateDevices=no$" "$DROPIN" || fail "gpu.conf: PrivateDevices is not turned off"

secs() { # systemd time span (s, min, h; bare = s) -> seconds
    local v="$1" n
    case "$v" in
        *min) n="${v%min}"; echo $((n * 60)) ;;
        *h) n="${v%h}"; echo $((n * 3600)) ;;
        *s) echo "${v%s}" ;;
        *) echo "$v" ;;
    esac
}
stop="$(secs "$(val TimeoutStopSec)")"
drain="$(sed -n 's/^#\{0,1\}drain_timeout *= *\([0-9]*\).*/\1/p' "$ROOT/config/cogvlm.conf" | head -1)"
if [ -z "$stop" ] || [ -z "$drain" ]; then
    fail "cannot read TimeoutStopSec ($stop) or the default drain_timeout ($drain)"
elif [ "$stop" -le $((drain + 5)) ]; then
    fail "TimeoutStopSec=${stop}s must exceed drain_timeout ${drain}s + 5 s of cancellation"
fi

# ---- exposure score (offline analysis of the unit file; systemd >= 250)
if systemd-analyze security --help 2>/dev/null | grep -q -- --offline; then
    out="$(cd "$T" && systemd-analyze security --offline=true --threshold=30 --no-pager \
        "$T/cogvlm-server.service" 2>&1)" ||
        fail "systemd-analyze security: exposure above 3.0: $(printf '%s\n' "$out" | tail -1)"
fi

if [ $fails -ne 0 ]; then
    echo "test_systemd: $fails checks failed" >&2
    exit 1
fi
echo "test_systemd: ok"
