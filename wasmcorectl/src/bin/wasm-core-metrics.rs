//! wasm-core-metrics: the Prometheus exporter (see `wasmcorectl::exporter`).

fn main() -> std::process::ExitCode {
    wasmcorectl::exporter::main()
}
