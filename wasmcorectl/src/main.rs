//! wasmcorectl: see the library for everything.

fn main() -> std::process::ExitCode {
    wasmcorectl::ctl_main()
}
