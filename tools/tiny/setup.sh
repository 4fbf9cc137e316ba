#!/bin/sh
# setup.sh - installs what the tiny-model scripts need (training, export, reference logits):
# Debian's PyTorch 1.13 with an optimized BLAS, SentencePiece, numpy, Pillow.
# Not needed by the build or by `make test`. Run the scripts with /usr/bin/python3 (Debian's).
#
# Why libopenblas0-pthread: Debian's python3-torch links the generic libblas.so.3, which is the
# slow reference BLAS unless an optimized one is installed (1024^2 matmul on 2 threads:
# 2.7 -> ~120 GFLOP/s here).
set -e
PKGS="python3-torch libopenblas0-pthread python3-sentencepiece python3-numpy python3-pil"
missing=""
for p in $PKGS; do
    st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    case "$st" in *"install ok installed"*) ;; *) missing="$missing $p" ;; esac
done
if [ -n "$missing" ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
/usr/bin/python3 - <<'EOF'
import time, torch, sentencepiece, PIL, numpy
torch.set_num_threads(2)
a = torch.randn(1024, 1024); b = torch.randn(1024, 1024)
a @ b
t = time.time()
for _ in range(10):
    a @ b
print("tiny-model deps ok: torch %s, matmul %.0f GFLOP/s on 2 threads" %
      (torch.__version__, 10 * 2 * 1024 ** 3 / (time.time() - t) / 1e9))
EOF
