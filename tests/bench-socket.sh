#!/usr/bin/env bash
# The socket benchmark against a daemon of this checkout (or $WASMCORED): starts it on a temporary
# socket and state directory, runs `wasmcorectl bench` with every row (uppercase, an Extism
# call of count_vowels, the example plugins' compile times, memory, and `wasmtime run` when
# a wasmtime CLI is on PATH), with the in-process cost of one execution and the bare-Wasmtime
# floor from the exec bench as the yardsticks for the daemon's CPU per request; stops the
# daemon. Extra arguments go to `wasmcorectl bench`.
#
#   tests/bench-socket.sh                      the full table (docs/PERFORMANCE.md)
#   tests/bench-socket.sh --duration-ms 200 --executions 0 --copies 0 --check
#                                              the CI regression guard (make bench-guard)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release
dir=$(mktemp -d /tmp/wasmcore-bench.XXXXXX)
sock=$dir/wasm-core.sock
mkdir "$dir/state"
# The multi-tenant scenario connects from other UIDs.
chmod 755 "$dir"
"${WASMCORED:-$bin/wasmcored}" --listen "$sock" --state-dir "$dir/state" --log-level warn &
pid=$!
cleanup() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
for _ in $(seq 200); do [ -S "$sock" ] && break; kill -0 "$pid" || exit 1; sleep 0.05; done
# The in-process cost of one execution, the yardstick for the daemon's CPU per request.
engine_us=$(BENCH_ITERS=5000 cargo bench --quiet -p wasmcored --bench exec -- --executor-us)
# The bare-Wasmtime floor of one execution: the unit of the daemon's overhead.
floor_us=$(BENCH_ITERS=5000 cargo bench --quiet -p wasmcored --bench exec -- --floor-us)
# The same floor with every CPU executing at once: what bare Wasmtime costs on busy cores.
floor_parallel_us=$(BENCH_ITERS=5000 cargo bench --quiet -p wasmcored --bench exec -- --floor-parallel-us)
"$bin/wasmcorectl" --socket "$sock" bench --load plugins/dist/uppercase.wasm \
    --plugins plugins/dist --wasi plugins/dist/wc.wasm --extism plugins/dist/count_vowels.wasm \
    --engine-us "$engine_us" --floor-us "$floor_us" \
    --floor-parallel-us "$floor_parallel_us" "$@"
