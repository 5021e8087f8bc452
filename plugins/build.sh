#!/usr/bin/env bash
# Build every example plugin into plugins/dist/. Installs what it needs on a fresh machine:
# the rustup wasm targets and, for the C example, Debian's clang, lld and wasi-libc.
# Also copies `count_vowels.wasm` as shipped inside the extism-pdk crate (a plugin built by
# Extism's own project), which the tests run as a plugin nobody built for wasm-core.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dist="$here/dist"
mkdir -p "$dist"

if command -v rustup >/dev/null; then
  installed=$(rustup target list --installed)
  for t in wasm32-unknown-unknown wasm32-wasip1 wasm32-wasip2; do
    grep -qx "$t" <<<"$installed" || rustup target add "$t"
  done
fi

"$here/../packaging/ensure-packages.sh" clang lld wasi-libc libclang-rt-dev-wasm32

cd "$here"
cargo build --release --quiet --target wasm32-unknown-unknown \
  -p uppercase -p transform -p hash -p counter -p greet
cargo build --release --quiet --target wasm32-wasip1 -p wc
cargo build --release --quiet --target wasm32-wasip2 -p sort
for p in uppercase transform hash counter greet; do
  cp target/wasm32-unknown-unknown/release/$p.wasm "$dist/$p.wasm"
done
cp target/wasm32-wasip1/release/wc.wasm "$dist/wc.wasm"
for p in sort p2probe; do
  cp target/wasm32-wasip2/release/$p.wasm "$dist/$p.wasm"
done
# The crate's own example plugin, from the source cargo fetched for `greet` (which pins
# extism-pdk 1.4.1).
pdk=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/extism-pdk-1.4.1 | head -n 1)
cp "$pdk/count_vowels.wasm" "$dist/count_vowels.wasm"

clang --target=wasm32-wasi --sysroot=/usr -O2 -o "$dist/linenum.wasm" c/linenum.c
echo "plugins: built $(ls "$dist" | tr '\n' ' ')" >&2
