//! Hostile clients: random bytes, deep nesting, pipelining without reading, a thousand
//! connections, per-tenant connection caps, idle and half-closed connections, FIFOs passed
//! as modules, compile bombs. Each case ends with the daemon still serving and a binary
//! loaded before the abuse still registered and running; the daemon's memory is read from
//! /proc and its peak printed (run with `--nocapture` to see the figures).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmcore_tests::*;

use crate::{err_code, ok};

/// A process-ABI module that answers every request with 1 MiB of `a`.
const AMPLIFIER: &str = r#"(module
  (import "host" "output" (func $output (param i32 i32)))
  (memory (export "memory") 17)
  (func (export "alloc") (param i32) (result i32) (i32.const 1048576))
  (func (export "process") (param i32 i32) (result i32)
    (memory.fill (i32.const 0) (i32.const 97) (i32.const 1048576))
    (call $output (i32.const 0) (i32.const 1048576))
    (i32.const 0)))"#;

fn status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a kB figure")
}

fn rss_kib(d: &Daemon) -> u64 {
    status_kib(d.pid(), "VmRSS:")
}

/// A binary loaded before an abuse; [`Survivor::check`] proves it is still registered
/// under its id and still runs correctly afterwards, and reports the daemon's peak RSS.
struct Survivor(String);

impl Survivor {
    fn load(d: &Daemon) -> Survivor {
        let mut c = served_client(d);
        let up = b64(&std::fs::read(plugin_path("uppercase")).unwrap());
        let r = c.call(&json!({"op": "load", "wasm_base64": up, "name": "survivor"}));
        Survivor(ok(&r)["binary"].as_str().unwrap().to_string())
    }

    fn check(&self, d: &Daemon, what: &str) {
        let mut c = served_client(d);
        let listed = ok(&c.call(&json!({"op": "list"})))["binaries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["binary"] == json!(self.0));
        assert!(listed, "the binary loaded before {what} is gone");
        let r = c.call(&json!({"op": "execute", "binary": self.0, "input": "still here"}));
        assert_eq!(ok(&r)["output"], json!("STILL HERE"));
        eprintln!(
            "after {what}: binaries lost 0, daemon peak RSS {:.1} MiB",
            status_kib(d.pid(), "VmHWM:") as f64 / 1024.0
        );
    }
}

/// A deterministic byte stream (xorshift), so a failure can be replayed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn random_bytes_and_deep_nesting_get_errors_and_the_daemon_keeps_serving() {
    let d = Daemon::start();
    let survivor = Survivor::load(&d);
    let mut lines_tried = 0;
    for seed in 1..=50u64 {
        let mut c = d.client();
        let mut bytes = noise(seed, 4096);
        bytes.push(b'\n');
        let lines = bytes.iter().filter(|b| **b == b'\n').count();
        c.send_raw(&bytes);
        for _ in 0..lines {
            let r = c.recv();
            assert_eq!(err_code(&r), "bad_request", "seed {seed}: {r}");
        }
        lines_tried += lines;
        // The same connection still works.
        ok(&c.call(&json!({"op": "status"})));
    }
    eprintln!("random lines tried: {lines_tried}");
    let mut c = d.client();
    for depth in [200usize, 100_000] {
        let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let objects = format!(
            "{{\"op\":\"status\",\"x\":{}1{}}}",
            "{\"a\":".repeat(depth),
            "}".repeat(depth)
        );
        for line in [arrays, objects] {
            c.send_raw(format!("{line}\n").as_bytes());
            let r = c.recv();
            assert_eq!(err_code(&r), "bad_request", "depth {depth}: {r}");
        }
    }
    ok(&c.call(&json!({"op": "status"})));
    survivor.check(&d, "random bytes and nesting");
}

/// Requests written without reading any reply: the daemon stops reading once its replies
/// back up, and its memory stays bounded even when each reply is 1 MiB.
#[test]
fn pipelining_without_reading_is_bounded_by_backpressure() {
    let d = Daemon::start();
    let survivor = Survivor::load(&d);
    let mut c = d.client();
    let amp = ok(&c.call(&json!({
        "op": "load", "name": "amp",
        "wasm_base64": b64(&wat::parse_str(AMPLIFIER).unwrap()),
    })))["binary"]
        .as_str()
        .unwrap()
        .to_string();
    ok(&c.call(&json!({"op": "execute", "binary": amp})));
    ok(&c.call(
        &json!({"op": "load", "name": "up", "wasm_base64": b64(&std::fs::read(plugin_path("uppercase")).unwrap())}),
    ));
    for (binary, count) in [("amp", 500usize), ("up", 10_000)] {
        let before = rss_kib(&d);
        let s = UnixStream::connect(&d.socket).unwrap();
        let mut w = s.try_clone().unwrap();
        let req = format!("{{\"op\":\"execute\",\"binary\":\"{binary}\",\"input\":\"x\"}}\n");
        let writer = std::thread::spawn(move || {
            let all = req.repeat(count);
            w.write_all(all.as_bytes()).is_ok()
        });
        std::thread::sleep(Duration::from_millis(1500));
        let during = rss_kib(&d);
        let growth_mib = during.saturating_sub(before) as f64 / 1024.0;
        eprintln!("{count} x {binary} pipelined, nothing read: RSS grew {growth_mib:.1} MiB");
        assert!(
            growth_mib < 64.0,
            "{count} unread {binary} replies grew the daemon by {growth_mib:.1} MiB"
        );
        let mut r = BufReader::with_capacity(1 << 20, s);
        let mut line = Vec::new();
        for i in 0..count {
            line.clear();
            r.read_until(b'\n', &mut line).unwrap();
            assert!(
                line.starts_with(b"{\"ok\":true"),
                "reply {i} of {count}: {}",
                String::from_utf8_lossy(&line[..line.len().min(200)])
            );
        }
        assert!(writer.join().unwrap(), "every request was written");
    }
    ok(&c.call(&json!({"op": "status"})));
    survivor.check(&d, "pipelining without reading");
}

/// More connections than the daemon serves: each one is served or gets one `busy` line and
/// is closed; none hangs, and everything is released afterwards.
#[test]
fn a_thousand_connections_are_served_or_refused_cleanly() {
    let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, h)| h)
        .unwrap_or(4096);
    let _ = nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_NOFILE,
        hard.min(8192),
        hard,
    );
    let d = Daemon::start_config(
        "[server]\nmax_connections = 200\n[quotas]\nconnections = 2000\n",
        &[],
    );
    let survivor = Survivor::load(&d);
    // One connection of our own, kept open, once the start-up check's has closed.
    let mut own = served_client(&d);
    let t = Instant::now();
    while ok(&own.call(&json!({"op": "status"})))["connections"] != json!(1) {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(20));
    }
    let fds_before = d.open_fds();
    let mut conns = Vec::new();
    for _ in 0..1000 {
        let s = UnixStream::connect(&d.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        conns.push(s);
    }
    let (mut served, mut busy) = (0, 0);
    for s in &mut conns {
        // A refused connection may already be closed: the write can fail.
        let _ = s.write_all(b"{\"op\":\"status\"}\n");
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).expect("an answer, not a hang");
        let v: Value = serde_json::from_str(&line).expect("a JSON line");
        if v["ok"] == json!(true) {
            served += 1;
        } else {
            assert_eq!(err_code(&v), "busy", "{v}");
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
            assert!(
                rest.is_empty(),
                "a refused connection is closed after its line"
            );
            busy += 1;
        }
    }
    eprintln!("1000 more connections: {served} served, {busy} refused with busy");
    assert_eq!(served, 199);
    assert_eq!(busy, 801);
    drop(conns);
    let t = Instant::now();
    while d.open_fds() > fds_before {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "descriptors still open: {} > {fds_before}",
            d.open_fds()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ok(&own.call(&json!({"op": "status"})));
    survivor.check(&d, "1000 connections");
}

#[test]
fn connections_per_tenant_are_capped() {
    let d = Daemon::start_config("[quotas]\nconnections = 3\n", &[]);
    let survivor = Survivor::load(&d);
    // The start-up check's own connection may still be closing: retry until served.
    let mut open: Vec<Client> = (0..3).map(|_| served_client(&d)).collect();
    for c in &mut open {
        ok(&c.call(&json!({"op": "status"})));
    }
    let mut fourth = d.client();
    let r = fourth.recv();
    assert_eq!(err_code(&r), "busy");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("3 connections open"),
        "{r}"
    );
    assert!(fourth.recv_line().is_none(), "closed after the busy line");
    drop(open.pop());
    // The slot comes back once the daemon has seen the close.
    drop(served_client(&d));
    survivor.check(&d, "connections over the tenant's cap");
}

/// A connection the daemon serves, retrying for up to 5 s while it answers `busy`.
fn served_client(d: &Daemon) -> Client {
    let t = Instant::now();
    loop {
        let mut c = d.client();
        // A refused connection may be closed before the request is written.
        let _ = c.stream.write_all(b"{\"op\":\"status\"}\n");
        let r = c.recv();
        if r["ok"] == json!(true) {
            return c;
        }
        assert_eq!(err_code(&r), "busy");
        assert!(t.elapsed() < Duration::from_secs(5), "{r}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn idle_and_half_closed_connections_end_cleanly() {
    let d = Daemon::start_config("[server]\nidle_timeout_s = 1\n", &[]);
    let survivor = Survivor::load(&d);
    // Idle: closed after the timeout, without a reply.
    let mut idle = d.client();
    let t = Instant::now();
    assert!(idle.recv_line().is_none());
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // Busy: a connection that sends a request every 400 ms lives past several timeouts
    // (the timeout counts from the latest wait, not from the connection's start), then
    // idles out in its turn.
    let mut busy = d.client();
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(2600) {
        assert_eq!(
            ok(&busy.call(&json!({"op": "status", "tag": 3})))["tag"],
            json!(3)
        );
        std::thread::sleep(Duration::from_millis(400));
    }
    let t = Instant::now();
    assert!(busy.recv_line().is_none());
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // Half-closed: the requests sent before the shutdown are all answered, then EOF.
    let mut c = d.client();
    c.send_raw(b"{\"op\":\"status\",\"tag\":1}\n{\"op\":\"status\",\"tag\":2}\n");
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(ok(&c.recv())["tag"], json!(1));
    assert_eq!(ok(&c.recv())["tag"], json!(2));
    assert!(c.recv_line().is_none());
    // A request cut off by the shutdown (no newline) gets nothing and is not run.
    let mut c = d.client();
    c.send_raw(b"{\"op\":\"status\"");
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(c.recv_line().is_none());
    survivor.check(&d, "idle and half-closed connections");
}

#[test]
fn a_fifo_passed_as_a_module_is_refused_without_blocking() {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let d = Daemon::start();
    let survivor = Survivor::load(&d);
    let tmp = TempDir::new("fifo");
    let path = tmp.path().join("fifo");
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // Opened for reading without blocking; nobody ever writes to it.
    let fifo = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(&path)
        .unwrap();
    let s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    sendmsg::<()>(
        s.as_raw_fd(),
        &[std::io::IoSlice::new(b"{\"op\":\"load\",\"fd\":true}\n")],
        &[ControlMessage::ScmRights(&[fifo.as_raw_fd()])],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    let r: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(err_code(&r), "bad_request", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a regular file"),
        "{r}"
    );
    survivor.check(&d, "a FIFO passed as a module");
}

/// A module that is valid and small enough but slow to compile (~12 MB of straight-line
/// code, seconds of Cranelift): the load is refused at `max_compile_s`, other loads get
/// `busy` while it still compiles, and everything else keeps being served.
#[test]
fn compile_bombs_are_bounded_in_time_and_concurrency() {
    // One compile slot for the whole daemon; the per-tenant cap out of the way.
    let d = Daemon::start_config(
        "[registry]\nmax_compile_s = 1\nmax_concurrent_loads = 1\n[quotas]\nconcurrent_loads = 8\n",
        &[],
    );
    let survivor = Survivor::load(&d);
    let bomb_load = spawn_bomb_load(&d);
    // Once the bomb is compiling, another load is refused at once...
    let up = b64(&std::fs::read(plugin_path("uppercase")).unwrap());
    let mut c = d.client();
    let msg = first_busy_load(&mut c, &up, &bomb_load);
    assert!(msg.contains("max_concurrent_loads"), "{msg}");
    // ...while everything else is served promptly.
    let t = Instant::now();
    ok(&c.call(&json!({"op": "status"})));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let (r, took) = bomb_load.join().unwrap();
    assert_eq!(err_code(&r), "invalid_module", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("longer than 1 s"),
        "{r}"
    );
    // Refused at its deadline (plus the time to send and decode 16 MB of base64).
    assert!(took < Duration::from_secs(4), "refused after {took:?}");
    // Nothing of the bomb is registered, and loads work again once its compile ends.
    let t = Instant::now();
    loop {
        let r = c.call(&json!({"op": "load", "wasm_base64": up, "name": "up"}));
        if r["ok"] == json!(true) {
            break;
        }
        assert_eq!(err_code(&r), "busy", "{r}");
        assert!(t.elapsed() < Duration::from_secs(60), "loads stayed busy");
        std::thread::sleep(Duration::from_millis(100));
    }
    let listed = ok(&c.call(&json!({"op": "list"})))["binaries"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(listed, 2, "the survivor and the last load");
    survivor.check(&d, "a compile bomb");
}

/// Load `up_b64` until a load is refused with `busy` while `bomb` compiles (a load that got
/// in before the bomb is unloaded and tried again); the refusal's message.
fn first_busy_load<T>(c: &mut Client, up_b64: &str, bomb: &std::thread::JoinHandle<T>) -> String {
    let t = Instant::now();
    loop {
        let r = c.call(&json!({"op": "load", "wasm_base64": up_b64}));
        if r["ok"] == json!(false) {
            assert_eq!(err_code(&r), "busy", "{r}");
            return r["error"]["message"].as_str().unwrap().to_string();
        }
        let id = r["binary"].as_str().unwrap().to_string();
        ok(&c.call(&json!({"op": "unload", "binary": id})));
        assert!(
            !bomb.is_finished(),
            "the bomb ended before a load was refused"
        );
        assert!(t.elapsed() < Duration::from_secs(10), "never saw busy");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Load [`compile_bomb`] from a thread, retrying while it gets `busy` (the probing loads of
/// [`first_busy_load`] may hold a slot); the answer and how long that last load took.
fn spawn_bomb_load(d: &Daemon) -> std::thread::JoinHandle<(Value, Duration)> {
    let bomb = compile_bomb();
    let socket = d.socket.clone();
    std::thread::spawn(move || {
        let mut c = Client::connect(&socket);
        let req = json!({"op": "load", "wasm_base64": b64(&bomb)});
        loop {
            let t = Instant::now();
            let r = c.call(&req);
            if r["error"]["code"] != json!("busy") {
                return (r, t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

/// ~12 MB of straight-line code: valid, under the module size cap, seconds of Cranelift.
fn compile_bomb() -> Vec<u8> {
    let body = "local.get 0 i32.const 7 i32.mul local.get 0 i32.add local.set 0 ".repeat(2000);
    let func = format!("(func (param i32) (result i32) {body} local.get 0)");
    let abi = r#"(memory (export "memory") 1)
      (func (export "alloc") (param i32) (result i32) (i32.const 0))
      (func (export "process") (param i32 i32) (result i32) (i32.const 0))"#;
    let bomb = wat::parse_str(format!("(module {abi} {})", func.repeat(600))).unwrap();
    assert!(bomb.len() < 16 << 20, "under the module size cap");
    bomb
}

/// A tenant compiling a bomb has used its own load slot (`quotas.concurrent_loads = 1`):
/// its next load is `busy`, while another tenant's load is admitted and completes. (The two
/// compilations share the compiler's worker threads, so the other one is slower meanwhile;
/// the time bound is generous here so that both finish.)
#[test]
fn one_tenant_compiling_does_not_block_another_tenants_loads() {
    let d = Daemon::start_config(
        "[registry]\nmax_compile_s = 20\nmax_concurrent_loads = 2\n",
        &[],
    );
    let survivor = Survivor::load(&d);
    let other = TestUser::create("wasmcore-e2e-loader");
    let bomb_load = spawn_bomb_load(&d);
    let up = b64(&std::fs::read(plugin_path("uppercase")).unwrap());
    let mut c = d.client();
    let msg = first_busy_load(&mut c, &up, &bomb_load);
    assert!(msg.contains("loads compiling, your limit is 1"), "{msg}");
    // The other tenant is not held up by the first one's compilation.
    let r = raw_as(
        &d.socket,
        &other,
        &json!({"op": "load", "wasm_base64": up, "name": "theirs"}),
    );
    ok(&r);
    ok(&bomb_load.join().unwrap().0);
    survivor.check(&d, "one tenant's compile bomb");
}
