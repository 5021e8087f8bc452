//! Pipelined throughput of one connection: `N` executions of a loaded binary with
//! `execute_many`, in batches of `BATCH` (default 1000). Prints one line:
//! `pipeline: REQUESTS requests in SECONDS s = RATE req/s`.
//!
//! ```sh
//! cargo run --release -p wasmcore-client --example pipeline -- uppercase 100000 [BATCH] [INPUT]
//! ```

use std::process::ExitCode;
use std::time::Instant;

use wasmcore_client::{Client, ExecOptions};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pipeline: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: pipeline BINARY N [BATCH] [INPUT]";
    let binary = args.next().ok_or(usage)?;
    let n: usize = args.next().ok_or(usage)?.parse()?;
    let batch: usize = args.next().map(|b| b.parse()).transpose()?.unwrap_or(1000);
    let input = args.next().unwrap_or_else(|| "hello world".into());
    let inputs = vec![input.as_bytes(); batch.max(1)];
    let mut client = Client::connect()?;
    let opts = ExecOptions::new();
    let start = Instant::now();
    let mut done = 0;
    while done < n {
        let k = (n - done).min(inputs.len());
        for r in client.execute_many(&binary, &inputs[..k], &opts)? {
            r?;
        }
        done += k;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "pipeline: {done} requests in {secs:.3} s = {:.0} req/s",
        done as f64 / secs
    );
    Ok(())
}
