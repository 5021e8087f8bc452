//! Load a module, execute it, chain it, unload it, with the blocking client.
//!
//! ```sh
//! make dev &   # a daemon on /tmp/wasm-core.sock
//! cargo run -p wasmcore-client --example blocking -- plugins/dist/uppercase.wasm
//! ```

use std::process::ExitCode;

use wasmcore_client::{Client, ErrorCode, LoadOptions};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blocking: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let module = std::env::args()
        .nth(1)
        .ok_or("usage: blocking MODULE.wasm (a process-ABI plugin such as uppercase.wasm)")?;
    let mut client = Client::connect()?;
    let loaded = client.load_file(&module, &LoadOptions::new())?;
    println!(
        "loaded {} ({}, {} bytes)",
        loaded.binary, loaded.kind, loaded.size
    );

    let out = client.execute(&loaded.binary, b"hello from rust")?;
    println!(
        "execute: {:?} in {} µs",
        String::from_utf8_lossy(&out.bytes),
        out.stats.wall_us
    );

    let stages = [loaded.binary.as_str(); 3];
    let out = client.chain(&stages, b"chained")?;
    println!("chain of 3: {:?}", String::from_utf8_lossy(&out.bytes));

    client.unload(&loaded.binary)?;
    match client.execute(&loaded.binary, b"") {
        Err(e) if e.code() == Some(ErrorCode::NotFound) => println!("unloaded: {e}"),
        other => return Err(format!("expected not_found, got {other:?}").into()),
    }
    Ok(())
}
