//! Load a module, execute it, chain it, unload it, with the Tokio client; then run a batch
//! of executions pipelined on one connection.
//!
//! ```sh
//! make dev &
//! cargo run -p wasmcore-client --example tokio -- plugins/dist/uppercase.wasm
//! ```

use std::process::ExitCode;

use wasmcore_client::{AsyncClient, ExecOptions, LoadOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokio: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let module = std::env::args()
        .nth(1)
        .ok_or("usage: tokio MODULE.wasm (a process-ABI plugin such as uppercase.wasm)")?;
    let mut client = AsyncClient::connect().await?;
    let loaded = client.load_file(&module, &LoadOptions::new()).await?;
    let id = loaded.binary.as_str();
    println!("loaded {id} ({})", loaded.kind);

    let out = client.execute(id, b"hello from tokio").await?;
    println!("execute: {:?}", String::from_utf8_lossy(&out.bytes));
    let out = client.chain(&[id, id], b"chained").await?;
    println!("chain of 2: {:?}", String::from_utf8_lossy(&out.bytes));

    let inputs: Vec<String> = (0..100).map(|i| format!("input {i}")).collect();
    let results = client
        .execute_many(id, &inputs, &ExecOptions::new())
        .await?;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    println!("execute_many: {ok} of {} succeeded", inputs.len());

    client.unload(id).await?;
    Ok(())
}
