//! Restart to READY and to serving with persisted binaries, and the processes' RSS.
//!
//! Run: `cargo bench -p wasmcore-tests --bench restart` (after `make build plugins`).
//! Loads N binaries as one tenant (the example plugins in turn; N = 100 unless
//! BENCH_BINARIES says otherwise), stops the daemon, then starts it repeatedly with a
//! NOTIFY_SOCKET and times spawn → READY=1 (the broker: it reads the stored metadata) and
//! spawn → the tenant's first `list` answered with all N (its worker started, confined,
//! and restored every binary), against the same measurements with an empty state directory
//! in the same run. RSS of the broker and of its workers is read from /proc then.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use wasmcore_tests::*;

const RUNS: usize = 9;

struct Start {
    ready: Duration,
    served: Duration,
    broker_kib: u64,
    workers_kib: u64,
    log: String,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The broker's child processes: its tenants' workers.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(|t| t.ok())
                .map(|t| std::fs::read_to_string(t.path().join("children")).unwrap_or_default())
                .collect::<Vec<_>>()
                .iter()
                .flat_map(|c| c.split_whitespace())
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn start_once(dir: &TempDir, state: &std::path::Path, expect: usize) -> Start {
    let notify_path = dir.path().join("notify.sock");
    let _ = std::fs::remove_file(&notify_path);
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let log_path = dir.path().join("bench.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let t = Instant::now();
    let mut child = Command::new(wasmcored())
        .arg("--listen")
        .arg(dir.path().join("s.sock"))
        .arg("--state-dir")
        .arg(state)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn wasmcored");
    let mut buf = [0u8; 4096];
    loop {
        let n = notify.recv(&mut buf).expect("READY within 30 s");
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "READY=1")
        {
            break;
        }
    }
    let ready = t.elapsed();
    let mut c = Client::connect(&dir.path().join("s.sock"));
    let listed = c.call(&json!({"op": "list"}));
    let served = t.elapsed();
    let count = listed["binaries"].as_array().map_or(0, |b| b.len());
    assert_eq!(count, expect, "{listed}");
    let workers = children(child.id());
    assert!(
        expect == 0 || !workers.is_empty(),
        "no worker serves the tenant"
    );
    let (broker_kib, workers_kib) = (
        rss_kib(child.id()),
        workers.iter().map(|w| rss_kib(*w)).sum(),
    );
    drop(c);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    child.wait().unwrap();
    Start {
        ready,
        served,
        broker_kib,
        workers_kib,
        log: std::fs::read_to_string(&log_path).unwrap_or_default(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let n: usize = std::env::var("BENCH_BINARIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let plugins = ["uppercase", "transform", "hash", "counter", "wc", "linenum"];
    let d = Daemon::start();
    let mut total_bytes = 0;
    for i in 0..n {
        let bytes = std::fs::read(plugin_path(plugins[i % plugins.len()])).unwrap();
        total_bytes += bytes.len();
        let r = d
            .client()
            .call(&json!({"op": "load", "wasm_base64": b64(&bytes), "name": format!("b{i}")}));
        assert_eq!(r["ok"], json!(true), "{r}");
    }
    let state = d.state_dir();
    let mut d = d;
    d.terminate();
    let empty_dir = TempDir::new("bench-empty");
    let (mut full, mut empty) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        empty.push(start_once(&empty_dir, &empty_dir.path().join("state"), 0));
        let f = start_once(&d.dir, &state, n);
        assert!(
            f.log.contains(&format!("restored {n} binaries"))
                && f.log.contains("(0 recompiled, 0 quarantined)"),
            "{}",
            f.log
        );
        full.push(f);
    }
    let med = |v: &[Start], f: fn(&Start) -> f64| median(v.iter().map(f).collect());
    let ready = |s: &Start| s.ready.as_secs_f64() * 1000.0;
    let served = |s: &Start| s.served.as_secs_f64() * 1000.0;
    let broker = |s: &Start| s.broker_kib as f64 / 1024.0;
    let workers = |s: &Start| s.workers_kib as f64 / 1024.0;
    let row = |label: String, value: f64, unit: &str, note: &str| {
        println!("  {label:<56} {value:>8.1} {unit}{note}")
    };
    println!("restart, median of {RUNS} (from spawn)");
    row(
        "to READY=1, empty state directory".into(),
        med(&empty, ready),
        "ms",
        "",
    );
    row(
        format!(
            "to READY=1, {n} persisted binaries ({} KiB of wasm)",
            total_bytes / 1024
        ),
        med(&full, ready),
        "ms",
        "",
    );
    row(
        "to the first answer, empty state directory".into(),
        med(&empty, served),
        "ms",
        "",
    );
    row(
        format!("to the first answer listing the {n} binaries"),
        med(&full, served),
        "ms",
        "   (the worker restored them, no recompiles)",
    );
    println!("RSS after the first answer, median");
    row(
        "broker, empty state directory".into(),
        med(&empty, broker),
        "MiB",
        "",
    );
    row(
        format!("broker, {n} binaries"),
        med(&full, broker),
        "MiB",
        "",
    );
    row(
        "worker, empty state directory".into(),
        med(&empty, workers),
        "MiB",
        "",
    );
    let per = (med(&full, workers) - med(&empty, workers)) * 1024.0 / n as f64;
    row(
        format!("worker, {n} binaries"),
        med(&full, workers),
        "MiB",
        &format!("   ({per:.0} KiB per binary)"),
    );
}
