//! Restart to READY with persisted binaries, and the daemon's RSS.
//!
//! Run: `cargo bench -p wasmcore-tests --bench restart` (after `make build plugins`).
//! Loads N binaries (the example plugins in turn; N = 100 unless BENCH_BINARIES says
//! otherwise), stops the daemon, then starts it repeatedly with a NOTIFY_SOCKET and times
//! spawn → READY=1, against the same measurement with an empty state directory in the same
//! run. RSS is read from /proc after READY.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use wasmcore_tests::*;

const RUNS: usize = 9;

struct Start {
    ready: Duration,
    rss_kib: u64,
    log: String,
}

fn start_once(dir: &TempDir, state: &std::path::Path) -> Start {
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
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    child.wait().unwrap();
    Start {
        ready,
        rss_kib,
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
    let empty = TempDir::new("bench-empty");
    let (mut full_t, mut empty_t, mut full_rss, mut empty_rss) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let e = start_once(&empty, &empty.path().join("state"));
        empty_t.push(e.ready.as_secs_f64() * 1000.0);
        empty_rss.push(e.rss_kib as f64);
        let f = start_once(&d.dir, &state);
        assert!(
            f.log.contains(&format!("restored {n} binaries"))
                && f.log.contains("(0 recompiled, 0 quarantined)"),
            "{}",
            f.log
        );
        full_t.push(f.ready.as_secs_f64() * 1000.0);
        full_rss.push(f.rss_kib as f64);
    }
    let (ft, et) = (median(full_t), median(empty_t));
    let (fr, er) = (median(full_rss), median(empty_rss));
    println!("restart to READY=1, median of {RUNS} (spawn to the notify datagram)");
    println!("  empty state directory                {et:>8.1} ms");
    println!(
        "  {n} persisted binaries ({} KiB of wasm)  {ft:>8.1} ms   (+{:.1} ms, no recompiles)",
        total_bytes / 1024,
        ft - et
    );
    println!("RSS after READY, median");
    println!(
        "  idle, empty                          {:>8.1} MiB",
        er / 1024.0
    );
    println!(
        "  with {n} binaries                     {:>8.1} MiB   ({:.0} KiB per binary)",
        fr / 1024.0,
        (fr - er) / n as f64
    );
}
