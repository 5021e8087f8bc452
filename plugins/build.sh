#!/usr/bin/env bash
# Build every example plugin into plugins/dist/. Installs what it needs on a fresh machine:
# the rustup wasm targets and, for the C example, Debian's clang, lld and wasi-libc.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dist="$here/dist"
mkdir -p "$dist"

if command -v rustup >/dev/null; then
  installed=$(rustup target list --installed)
  for t in wasm32-unknown-unknown wasm32-wasip1; do
    grep -qx "$t" <<<"$installed" || rustup target add "$t"
  done
fi

"$here/../packaging/ensure-packages.sh" clang lld wasi-libc libclang-rt-dev-wasm32

cd "$here"
cargo build --release --quiet --target wasm32-unknown-unknown \
  -p uppercase -p transform -p hash -p counter
cargo build --release --quiet --target wasm32-wasip1 -p wc
for p in uppercase transform hash counter; do
  cp target/wasm32-unknown-unknown/release/$p.wasm "$dist/$p.wasm"
done
cp target/wasm32-wasip1/release/wc.wasm "$dist/wc.wasm"

clang --target=wasm32-wasi --sysroot=/usr -O2 -o "$dist/linenum.wasm" c/linenum.c
echo "plugins: built $(ls "$dist" | tr '\n' ' ')" >&2
