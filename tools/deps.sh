#!/bin/sh
# deps.sh - installs the Debian packages the build and tests need, only the missing ones.
# Fast when everything is there (one dpkg-query); runs apt-get update once otherwise.
set -e
PKGS="build-essential pkg-config libmicrohttpd-dev libjansson-dev libuv1-dev libb64-dev
      libjpeg62-turbo-dev libpng-dev libwebp-dev libgif-dev libpcre2-dev clang libclang-rt-14-dev
      clang-format libcurl4-openssl-dev python3-numpy"
missing=""
for p in $PKGS; do
    st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    case "$st" in *"install ok installed"*) ;; *) missing="$missing $p" ;; esac
done
[ -z "$missing" ] && exit 0
echo "deps: installing$missing"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
