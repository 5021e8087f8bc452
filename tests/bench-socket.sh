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
# The exec bench, built once.
exec_bench=$(cargo bench --no-run --quiet -p wasmcored --bench exec \
    --message-format=json-render-diagnostics |
    grep -o '"executable":"[^"]*/deps/exec-[^"]*"' | cut -d'"' -f4) || true
[ -x "$exec_bench" ] || { echo "bench-socket: the exec bench was not built" >&2; exit 1; }
# The in-process cost of one execution, the yardstick for the daemon's CPU per request.
engine_us=$(BENCH_ITERS=5000 "$exec_bench" --executor-us)
# The bare-Wasmtime floor of one execution, the unit of the daemon's overhead, and the same
# floor with every CPU executing at once (what bare Wasmtime costs on busy cores): measured
# before and after every scenario, so each is divided by a floor of the same minute.
"$bin/wasmcorectl" --socket "$sock" bench --load plugins/dist/uppercase.wasm \
    --plugins plugins/dist --wasi plugins/dist/wc.wasm --extism plugins/dist/count_vowels.wasm \
    --engine-us "$engine_us" \
    --floor-cmd "BENCH_ITERS=5000 '$exec_bench' --floor-us" \
    --floor-parallel-cmd "BENCH_ITERS=5000 '$exec_bench' --floor-parallel-us" "$@"
