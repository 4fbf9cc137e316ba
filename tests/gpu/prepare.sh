#!/usr/bin/env bash
# prepare.sh - run on the development machine before tests/gpu/run.sh goes to a GPU
# machine that has CUDA and PyTorch but no network and maybe not this project's -dev
# packages. Fills .gpu-carry/ (ignored through .git/info/exclude) with:
#   bin/     cogvlm, cogvlm-server, op-parity from `make cuda` (used there when the build
#            cannot run for lack of headers)
#   lib/     the shared libraries those binaries need beyond glibc, libstdc++ and CUDA
#   whl/     Python wheels the API test imports and the GPU image lacks (jsonschema and
#            friends), installed there with pip --no-index
#   shared/  the part of ../shared/data the steps read (golden-tiny, tokenizer, OpenAPI)
# Then carry it: the device call names ".gpu-carry" in `carry` and runs
# `bash tests/gpu/run.sh`. Prints the size (the working tree + carry must stay < 64 MiB).
# Options: --no-build (reuse build-cuda/), --no-wheels, --no-shared.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
C=.gpu-carry
build=1 wheels=1 shared=1
for a in "$@"; do
    case $a in
    --no-build) build=0 ;;
    --no-wheels) wheels=0 ;;
    --no-shared) shared=0 ;;
    *) echo "usage: $0 [--no-build] [--no-wheels] [--no-shared]" >&2; exit 2 ;;
    esac
done
grep -qx '/.gpu-carry/' .git/info/exclude 2>/dev/null || echo '/.gpu-carry/' >> .git/info/exclude
mkdir -p "$C/bin" "$C/lib" "$C/whl"
if [ "$build" = 1 ]; then
    nice make -j"$(nproc)" cuda
fi
cp build-cuda/cogvlm build-cuda/cogvlm-server build-cuda/tests/op-parity "$C/bin/"
strip "$C"/bin/* # the debug info is half their size and the carry is tight
# the libraries ldd resolves, except the C/C++ runtimes, CUDA's own and what an Ubuntu
# base image has anyway (zlib, and GnuTLS with its dependencies, which apt itself needs)
rm -f "$C"/lib/*
ldd "$C"/bin/* | awk '$3 ~ /^\// {print $3}' | sort -u | while read -r lib; do
    case $(basename "$lib") in
    libc.so* | libm.so* | libpthread.so* | libdl.so* | librt.so* | ld-linux* | libstdc++* | \
        libgcc_s* | libcuda* | libcublas* | libnccl* | libz.so* | libgnutls* | libp11-kit* | \
        libunistring* | libidn2* | libtasn1* | libnettle* | libhogweed* | libgmp* | libffi*) ;;
    *) cp -L "$lib" "$C/lib/" ;;
    esac
done
if [ "$wheels" = 1 ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$C/whl" jsonschema==4.26.0 referencing rpds-py \
        jsonschema-specifications pytest-timeout==2.4.0
fi
if [ "$shared" = 1 ]; then
    src=${COGVLM_SHARED:-../shared}
    mkdir -p "$C/shared/data"
    cp -R "$src/data/golden-tiny" "$src/data/llama2-tokenizer.model" \
        "$src/data/openai-openapi.yaml" "$C/shared/data/"
    chmod -R u+w "$C/shared"
fi
tree_kb=$(git ls-files -z --cached --others --exclude-standard | du -ck --files0-from=- | tail -1 | cut -f1)
carry_kb=$(du -sk "$C" | cut -f1)
echo "prepare.sh: .gpu-carry ${carry_kb} KiB + working tree ${tree_kb} KiB" \
     "= $(((carry_kb + tree_kb) / 1024)) MiB of the 64 MiB a device call may take"
echo "prepare.sh: device call: carry [\".gpu-carry\"], command \"bash tests/gpu/run.sh\""
