#!/usr/bin/env bash
# prepare.sh - run on the development machine before a GPU session. Fills
# build-cuda/gpu-carry/ (ignored, like all of build-cuda/) with what tests/gpu/run.sh needs
# on a GPU machine that has the NVIDIA driver, CUDA and PyTorch but no network and none of
# this project's -dev packages, then measures what the device call would send and fails
# HERE, not there, when that is over the call's 64 MiB:
#   bin/          cogvlm, cogvlm-server, op-parity from `make cuda`, stripped
#   lib/          every library `ldd` resolves for them here, except
#                 - the C/C++ runtimes and what any Ubuntu base image has (glibc, libstdc++,
#                   libgcc_s, zlib, GnuTLS and its dependencies, which apt itself needs),
#                 - the NVIDIA driver (libcuda, libnvidia-*): the machine's own, NEVER carried,
#                 - libraries over LIB_MAX_KB (default 8192: cuBLAS, cuBLASLt and NCCL weigh
#                   hundreds of MB), listed in lib/LOCATE.txt; run.sh's libs step
#                   (tests/gpu/libs.sh) finds them there (PyTorch's nvidia wheels, the toolkit)
#   whl/          wheels the accuracy test imports and the GPU image lacks (jsonschema & co.)
#   shared/data/  golden-tiny and golden-cogvlm2-tiny packed by tests/gpu/fixture.py (the
#                 files their manifests name; the float32 models rebuilt there from the
#                 BF16 ones, which is exact for the CUDA backend; big files as .xz;
#                 golden-cogvlm2-tiny: its image_chat case, without the prompt logits), the
#                 tokenizers; run.sh's fixtures step unpacks them. Repacked only when a
#                 source manifest or fixture.py changed (shared/.packed).
# The device call then names "build-cuda/gpu-carry" in `carry` (tests/gpu/README.md).
# Options: --no-build (reuse the build), --no-wheels, --no-shared.
# Environment: COGVLM_SHARED (default ../shared), LIB_MAX_KB, CALL_LIMIT_MIB (default 64),
# CUDA_BUILD (default build-cuda: where `make cuda` builds; the carry is CUDA_BUILD/gpu-carry,
# and run.sh then needs GPU_CARRY=CUDA_BUILD/gpu-carry).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
B=${CUDA_BUILD:-build-cuda}
C="$B/gpu-carry"
LIMIT=$((${CALL_LIMIT_MIB:-64} * 1024 * 1024)) # bytes a device call may send
LIB_MAX_KB=${LIB_MAX_KB:-8192}
build=1 wheels=1 shared=1
for a in "$@"; do
    case $a in
    --no-build) build=0 ;;
    --no-wheels) wheels=0 ;;
    --no-shared) shared=0 ;;
    *) echo "usage: $0 [--no-build] [--no-wheels] [--no-shared]" >&2; exit 2 ;;
    esac
done
if [ "$build" = 1 ]; then
    if [ "$B" = build-cuda ]; then
        nice make -j"$(nproc)" cuda
    else
        nice make -j"$(nproc)" BUILD="$B" CUDA=1 cuda-all
    fi
fi
rm -rf "${C:?}/bin" "${C:?}/lib"
mkdir -p "$C/bin" "$C/lib" "$C/whl"
cp "$B/cogvlm" "$B/cogvlm-server" "$B/tests/op-parity" "$C/bin/"
strip "$C"/bin/* # the debug info is half their size

# ---- libraries: decided from ldd of the binaries themselves --------------------------------
if ldd "$C"/bin/* | grep -q 'not found'; then
    echo "prepare.sh: the binaries do not even resolve their libraries here:" >&2
    ldd "$C"/bin/* | grep 'not found' >&2
    exit 1
fi
: > "$C/lib/LOCATE.txt"
ldd "$C"/bin/* | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | sort -u | while read -r so path; do
    case $so in
    libc.so* | libm.so* | libmvec.so* | libpthread.so* | libdl.so* | librt.so* | libresolv.so* | \
        libutil.so* | ld-linux* | libstdc++.so* | libgcc_s.so*) ;; # the C/C++ runtimes
    libz.so* | libgnutls.so* | libp11-kit.so* | libunistring.so* | libidn2.so* | libtasn1.so* | \
        libnettle.so* | libhogweed.so* | libgmp.so* | libffi.so*) ;; # any Ubuntu base has them
    libcuda.so* | libnvidia-*) ;; # the driver: the GPU machine's own, never carried
    *)
        kb=$(du -kL "$path" | cut -f1)
        if [ "$kb" -gt "$LIB_MAX_KB" ]; then
            echo "$so $((kb / 1024)) MiB here: $path" >> "$C/lib/LOCATE.txt"
        else
            cp -L "$path" "$C/lib/$so"
        fi
        ;;
    esac
done
if compgen -G "$C/lib/libcuda.so*" > /dev/null; then
    echo "prepare.sh: the driver library ended up in the carry" >&2
    exit 1
fi
echo "prepare.sh: carried libraries:" "$(cd "$C/lib" && ls -- *.so*)"
echo "prepare.sh: located on the GPU machine by tests/gpu/libs.sh:"
sed 's/^/    /' "$C/lib/LOCATE.txt"

# ---- wheels of the accuracy test -------------------------------------------------------------
if [ "$wheels" = 1 ] && ! compgen -G "$C/whl/jsonschema-*.whl" > /dev/null; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$C/whl" jsonschema==4.26.0 referencing rpds-py \
        jsonschema-specifications
fi

# ---- shared data: the files the golden step reads, and the tokenizer ------------------------
if [ "$shared" = 1 ]; then
    src=${COGVLM_SHARED:-../shared}/data
    stamp=$(cat tests/gpu/fixture.py "$src/golden-tiny/manifest.json" \
        "$src/golden-cogvlm2-tiny/manifest.json" 2> /dev/null | sha256sum | cut -c1-16)
    if [ "$(cat "$C/shared/.packed" 2> /dev/null)" != "$stamp" ]; then
        rm -rf "$C/shared"
        mkdir -p "$C/shared/data"
        cp "$src/llama2-tokenizer.model" "$C/shared/data/"
        python3 tests/gpu/fixture.py pack "$src/golden-tiny" "$C/shared/data/golden-tiny"
        if [ -f "$src/golden-cogvlm2-tiny/manifest.json" ]; then
            python3 tests/gpu/fixture.py pack "$src/golden-cogvlm2-tiny" \
                "$C/shared/data/golden-cogvlm2-tiny" --cases image_chat --no-prompt-logits
        fi
        echo "$stamp" > "$C/shared/.packed"
    else
        echo "prepare.sh: $C/shared is packed from the current fixtures: kept"
    fi
    chmod -R u+w "$C/shared"
fi

# ---- what the device call sends: the working tree as git sees it + the carry ----------------
tree_b=$(git ls-files -z -co --exclude-standard |
    du -cb --apparent-size --files0-from=- 2> /dev/null | tail -1 | cut -f1)
carry_b=$(du -sb --apparent-size "$C" | cut -f1)
total=$((tree_b + carry_b))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
for d in bin lib whl shared; do
    [ -d "$C/$d" ] && echo "prepare.sh:   $C/$d" \
        "$(mib "$(du -sb --apparent-size "$C/$d" | cut -f1)")"
done
echo "prepare.sh: carry $(mib "$carry_b") + working tree $(mib "$tree_b") = $(mib "$total")" \
    "of the $(mib "$LIMIT") a device call may send"
if [ "$total" -gt "$LIMIT" ]; then
    echo "prepare.sh: OVER THE LIMIT by $(mib $((total - LIMIT))): the call would be refused" >&2
    exit 1
fi
run="bash tests/gpu/run.sh"
[ "$B" = build-cuda ] || run="GPU_CARRY=$C $run"
echo "prepare.sh: device call: carry [\"$C\"], command \"$run\"" \
    "(tests/gpu/README.md)"
