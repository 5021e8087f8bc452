//! `wasmcorectl bench`: execute and chain throughput and latency against a raw Unix-socket
//! echo measured in the same run.
//!
//! The baseline is an in-process server that answers every request line with the exact
//! bytes the daemon answered, without parsing anything: the cost of the socket round trip
//! alone. Each measurement runs the same client loop against the echo and then the daemon,
//! so the ratio cancels out the machine's speed and load.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{Value, json};

use crate::client::Client;
use crate::{Failure, exit};

/// Options of `bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Binary to run (UUID or name).
    #[arg(long, conflicts_with = "load", required_unless_present = "load")]
    pub binary: Option<String>,
    /// Load this module for the run and unload it after.
    #[arg(long, value_name = "FILE")]
    pub load: Option<PathBuf>,
    /// Input of every execution.
    #[arg(long, default_value = "hello world")]
    pub input: String,
    /// How long each measurement runs.
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    pub duration_ms: u64,
    /// Requests in flight per connection in the pipelined runs.
    #[arg(long, default_value_t = 32)]
    pub pipeline: usize,
    /// Stages of the chain measurement (the same binary repeated).
    #[arg(long, default_value_t = 3)]
    pub chain: usize,
}

/// One measured run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Measured {
    pub requests: u64,
    pub per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

struct Scenario {
    label: &'static str,
    connections: usize,
    in_flight: usize,
    chain: bool,
}

pub fn run(socket: &Path, args: &BenchArgs) -> Result<(), Failure> {
    let mut c = Client::connect(socket)?;
    let (binary, loaded) = match (&args.binary, &args.load) {
        (Some(b), _) => (b.clone(), false),
        (None, Some(file)) => {
            let bytes = std::fs::read(file).map_err(|e| {
                Failure::new(exit::IO, format!("cannot read {}: {e}", file.display()))
            })?;
            let resp = c.call(
                &json!({"op": "load", "wasm_base64": wasmcore_proto::encode_base64(&bytes)}),
                None,
            )?;
            let resp = crate::check(resp)?;
            (
                resp["binary"].as_str().unwrap_or_default().to_string(),
                true,
            )
        }
        (None, None) => return Err(Failure::new(exit::USAGE, "give --binary or --load")),
    };
    let exec_req = line(&json!({"op": "execute", "binary": binary, "input": args.input}));
    let chain_req = line(
        &json!({"op": "chain", "binaries": vec![binary.clone(); args.chain], "input": args.input}),
    );
    let exec_resp = sample(&mut c, &exec_req)?;
    let chain_resp = sample(&mut c, &chain_req)?;
    let duration = Duration::from_millis(args.duration_ms);

    let scenarios = [
        Scenario {
            label: "execute, 1 connection, ping-pong",
            connections: 1,
            in_flight: 1,
            chain: false,
        },
        Scenario {
            label: "execute, 10 connections, ping-pong",
            connections: 10,
            in_flight: 1,
            chain: false,
        },
        Scenario {
            label: "execute, 1 connection, pipelined",
            connections: 1,
            in_flight: args.pipeline,
            chain: false,
        },
        Scenario {
            label: "execute, 10 connections, pipelined",
            connections: 10,
            in_flight: args.pipeline,
            chain: false,
        },
        Scenario {
            label: "chain, 10 connections, ping-pong",
            connections: 10,
            in_flight: 1,
            chain: true,
        },
    ];
    println!(
        "{:<38} {:>12} {:>12} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "measure",
        "echo req/s",
        "daemon req/s",
        "ratio",
        "echo p50",
        "p50 µs",
        "echo p99",
        "p99 µs"
    );
    let mut echo_pingpong_1 = 0.0;
    for s in &scenarios {
        let (req, resp) = if s.chain {
            (&chain_req, &chain_resp)
        } else {
            (&exec_req, &exec_resp)
        };
        let echo = Echo::start(resp.clone())
            .map_err(|e| Failure::new(exit::IO, format!("starting the echo baseline: {e}")))?;
        let e = measure(echo.path(), req, s.connections, s.in_flight, duration)?;
        drop(echo);
        let d = measure(socket, req, s.connections, s.in_flight, duration)?;
        if s.connections == 1 && s.in_flight == 1 && !s.chain {
            echo_pingpong_1 = e.per_sec;
        }
        let lat = |m: &Measured, v: f64| {
            if m.p50_us > 0.0 {
                format!("{v:.1}")
            } else {
                "-".into()
            }
        };
        println!(
            "{:<38} {:>12.0} {:>12.0} {:>7.2} {:>9} {:>9} {:>9} {:>9}",
            s.label,
            e.per_sec,
            d.per_sec,
            d.per_sec / e.per_sec,
            lat(&e, e.p50_us),
            lat(&d, d.p50_us),
            lat(&e, e.p99_us),
            lat(&d, d.p99_us)
        );
        if s.connections == 1 && s.in_flight > 1 && echo_pingpong_1 > 0.0 {
            println!(
                "{:<38} {:>12.0} {:>12.0} {:>7.2}",
                "  (pipelined vs echo ping-pong, 1 conn)",
                echo_pingpong_1,
                d.per_sec,
                d.per_sec / echo_pingpong_1
            );
        }
    }
    if loaded {
        let _ = c.call(&json!({"op": "unload", "binary": binary}), None);
    }
    Ok(())
}

fn line(v: &Value) -> Vec<u8> {
    let mut l = serde_json::to_vec(v).expect("serializable");
    l.push(b'\n');
    l
}

/// Run the request once and keep the daemon's exact response line for the echo.
fn sample(c: &mut Client, req: &[u8]) -> Result<Vec<u8>, Failure> {
    let v: Value = serde_json::from_slice(req).expect("valid json");
    let resp = c.call(&v, None)?;
    let resp = crate::check(resp)?;
    Ok(line(&resp))
}

/// Drive `connections` clients with `in_flight` requests outstanding each, for `duration`.
pub fn measure(
    socket: &Path,
    req: &[u8],
    connections: usize,
    in_flight: usize,
    duration: Duration,
) -> Result<Measured, Failure> {
    let stop = Arc::new(AtomicBool::new(false));
    let start_gate = Arc::new(std::sync::Barrier::new(connections + 1));
    let mut handles = Vec::new();
    for _ in 0..connections {
        let socket = socket.to_path_buf();
        let req = req.to_vec();
        let stop = stop.clone();
        let gate = start_gate.clone();
        handles.push(std::thread::spawn(move || {
            client_loop(&socket, &req, in_flight, &stop, &gate)
        }));
    }
    start_gate.wait();
    let t0 = Instant::now();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut total = 0u64;
    let mut lat = Vec::new();
    for h in handles {
        let (n, mut l) = h
            .join()
            .map_err(|_| Failure::new(exit::INTERNAL, "a bench client thread panicked"))?
            .map_err(|e| Failure::new(exit::UNAVAILABLE, format!("bench client: {e}")))?;
        total += n;
        lat.append(&mut l);
    }
    let secs = t0.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| {
        if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1000.0
        }
    };
    Ok(Measured {
        requests: total,
        per_sec: total as f64 / secs,
        p50_us: if in_flight == 1 { pct(0.50) } else { 0.0 },
        p99_us: if in_flight == 1 { pct(0.99) } else { 0.0 },
    })
}

fn client_loop(
    socket: &Path,
    req: &[u8],
    in_flight: usize,
    stop: &AtomicBool,
    gate: &std::sync::Barrier,
) -> std::io::Result<(u64, Vec<u64>)> {
    let conn = UnixStream::connect(socket);
    gate.wait();
    let stream = conn?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::with_capacity(256 * 1024, stream);
    let mut buf = Vec::with_capacity(1024);
    let mut done = 0u64;
    let mut lat = Vec::new();
    let check_ok = |buf: &[u8]| -> std::io::Result<()> {
        if buf.starts_with(b"{\"ok\":true") {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "request failed: {}",
                String::from_utf8_lossy(buf).trim_end()
            )))
        }
    };
    if in_flight == 1 {
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            w.write_all(req)?;
            buf.clear();
            if r.read_until(b'\n', &mut buf)? == 0 {
                return Err(std::io::Error::other("connection closed"));
            }
            lat.push(t.elapsed().as_nanos() as u64);
            check_ok(&buf)?;
            done += 1;
        }
        return Ok((done, lat));
    }
    let batch: Vec<u8> = req.repeat(in_flight);
    w.write_all(&batch)?;
    let mut outstanding = in_flight;
    while outstanding > 0 {
        buf.clear();
        if r.read_until(b'\n', &mut buf)? == 0 {
            return Err(std::io::Error::other("connection closed"));
        }
        check_ok(&buf)?;
        done += 1;
        outstanding -= 1;
        if !stop.load(Ordering::Relaxed) {
            w.write_all(req)?;
            outstanding += 1;
        }
    }
    Ok((done, lat))
}

/// The baseline: answers each line with `reply`, one thread per connection.
struct Echo {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn start(reply: Vec<u8>) -> std::io::Result<Echo> {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("wasmcore-bench-echo-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let reply = Arc::new(reply);
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let reply = reply.clone();
                std::thread::spawn(move || {
                    let Ok(mut w) = conn.try_clone() else { return };
                    let mut r = BufReader::with_capacity(256 * 1024, conn);
                    let mut buf = Vec::new();
                    let mut out = Vec::new();
                    loop {
                        buf.clear();
                        match r.read_until(b'\n', &mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        out.extend_from_slice(&reply);
                        // Same batching rule as the daemon: write when nothing more is buffered.
                        if !r.buffer().contains(&b'\n') {
                            if w.write_all(&out).is_err() {
                                return;
                            }
                            out.clear();
                        }
                    }
                });
            }
        });
        Ok(Echo {
            path,
            stop,
            accept: Some(accept),
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = UnixStream::connect(&self.path);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
