#!/usr/bin/env bash
# libs.sh - makes the shared libraries of the carried (or built) binaries resolvable on the
# GPU machine, decided from what `ldd` says about the binaries themselves.
#
# Usage: libs.sh LDPATH_FILE CARRIED_LIB_DIR BINARY...
# Starts from CARRIED_LIB_DIR (what tests/gpu/prepare.sh copied: everything but the C/C++
# runtimes, the base image's libraries and the big CUDA libraries), then, while `ldd`
# reports "not found", looks each missing library up by its file name in the places a
# CUDA machine keeps them: the pip wheels of PyTorch (site-packages/nvidia/*/lib), the
# toolkit (/usr/local/cuda*/lib*, targets/), the system folders, and as a last resort a
# bounded search of the whole file system; each folder found joins the search path.
# Writes the resulting LD_LIBRARY_PATH value to LDPATH_FILE (even when incomplete), prints
# every binary's resolved libraries (path per library) and whether the driver's libcuda.so.1
# is visible (it is the machine's own and never carried). Exit status 0 when nothing is
# missing, 1 otherwise (the missing names are printed).
set -u -o pipefail
out=$1 carried=$2
shift 2
bins=("$@")
ldp=""
[ -d "$carried" ] && ldp=$(cd "$carried" && pwd)

missing() {
    local b
    for b in "${bins[@]}"; do
        LD_LIBRARY_PATH="$ldp" ldd "$b" 2>&1 | awk '/not found/ {print $1}'
    done | sort -u
}

# folders where a CUDA machine keeps its libraries, most specific first
roots() {
    timeout 15 python3 - 2>/dev/null <<'EOF'
import importlib.util, os
spec = importlib.util.find_spec("nvidia")
for p in (spec.submodule_search_locations if spec else []) or []:
    for d in sorted(os.listdir(p)):
        if os.path.isdir(os.path.join(p, d, "lib")):
            print(os.path.join(p, d, "lib"))
EOF
    local d
    for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib \
        /usr/local/cuda-*/lib64 /usr/local/cuda-*/lib /usr/local/cuda-*/targets/x86_64-linux/lib \
        /usr/lib/x86_64-linux-gnu /usr/local/lib /usr/lib64 /opt/*/lib; do
        [ -d "$d" ] && echo "$d"
    done
}

add_dir() {
    case ":$ldp:" in
    *":$1:"*) ;;
    *) ldp=${ldp:+$ldp:}$1 ;;
    esac
}

# one bounded search of the whole file system for every name the known folders lack
search_fs() {
    local args=() so
    for so in "$@"; do
        args+=(${args[0]+-o} -name "$so")
    done
    timeout 20 find / -xdev \( -path /proc -o -path /sys \) -prune -o \( "${args[@]}" \) \
        -print 2>/dev/null | awk -F/ '!seen[$NF]++' # the first copy of each
}

mapfile -t dirs < <(roots)
for round in 1 2 3; do
    mapfile -t need < <(missing)
    [ "${#need[@]}" -eq 0 ] && break
    lack=()
    for so in "${need[@]}"; do
        hit=""
        for d in "${dirs[@]}"; do
            [ -e "$d/$so" ] && hit=$d/$so && break
        done
        if [ -n "$hit" ]; then
            echo "libs.sh: $so found in $(dirname "$hit")"
            add_dir "$(dirname "$hit")"
        else
            lack+=("$so")
        fi
    done
    if [ "${#lack[@]}" -gt 0 ] && [ "$round" = 1 ]; then
        while read -r hit; do
            echo "libs.sh: $(basename "$hit") found in $(dirname "$hit") (file-system search)"
            add_dir "$(dirname "$hit")"
        done < <(search_fs "${lack[@]}")
    fi
done
printf '%s\n' "$ldp" > "$out"
echo "libs.sh: LD_LIBRARY_PATH for the binaries: ${ldp:-(none)}"
for b in "${bins[@]}"; do
    echo "libs.sh: $b"
    LD_LIBRARY_PATH="$ldp" ldd "$b" 2>&1 | awk '{ print "    " $0 }'
done
drv=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 / {print $NF; exit}')
echo "libs.sh: driver libcuda.so.1: ${drv:-not in the ldconfig cache}"
mapfile -t need < <(missing)
if [ "${#need[@]}" -gt 0 ]; then
    echo "libs.sh: STILL MISSING: ${need[*]}"
    exit 1
fi
echo "libs.sh: every library resolved"
