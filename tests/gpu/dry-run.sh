#!/usr/bin/env bash
# dry-run.sh: runs device-check.sh here (no GPU) as the GPU machine would see this tree: the
# Debian -dev packages the engine builds against are hidden in a private mount namespace
# (unshare -m, as root), so the build must come from the carried .device-deps. The checks
# skip and the bench and the peer fail without a device; the build and the links are what
# this verifies. ICU's runtime stays visible (Debian's cmake needs it).
# Usage: bash scripts/fetch-device-deps && bash tests/gpu/dry-run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f .device-deps/moescope-deps.tar.gz ] || { echo "run scripts/fetch-device-deps first" >&2; exit 1; }
export MOESCOPE_DEVICE_BUILD=${MOESCOPE_DEVICE_BUILD:-$PWD/build-dryrun}
exec unshare -m bash -c '
set -e
empty_dir=$(mktemp -d); empty_file=$(mktemp)
A=/usr/lib/x86_64-linux-gnu
for d in /usr/include/nlohmann /usr/include/unicode /usr/include/x86_64-linux-gnu/openblas-pthread \
         $A/openblas-pthread $A/pkgconfig /usr/share/pkgconfig /usr/share/cmake/nlohmann_json \
         $A/cmake/nlohmann_json $A/cmake/openblas /usr/lib/cmake/nlohmann_json; do
  [ -d "$d" ] && mount --bind "$empty_dir" "$d"
done
# Binding over a symbolic link hides its target: the libraries themselves, not PCRE2 (grep needs it).
for f in /usr/include/pcre2.h /usr/bin/pkg-config /usr/bin/pkgconf $A/libgfortran.so.5 $A/libquadmath.so.0 \
         $A/libopenblas.so.0 $A/libopenblas.so $A/libblas.so.3; do
  [ -e "$f" ] && mount --bind "$empty_file" "$f"
done
exec bash tests/gpu/device-check.sh'
