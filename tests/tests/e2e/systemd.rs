//! systemd integration without systemd: socket activation through `systemd-socket-activate`,
//! the notify protocol on a datagram socket, reload, shutdown, idle exit, and the client's
//! check of who serves a socket.

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::json;
use wasmcore_tests::*;

use crate::ok;

/// Collects sd_notify datagrams.
struct Notify {
    sock: UnixDatagram,
    seen: Vec<String>,
}

impl Notify {
    fn bind(path: &std::path::Path) -> Notify {
        let sock = UnixDatagram::bind(path).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Notify {
            sock,
            seen: Vec::new(),
        }
    }

    /// Wait until a message containing `needle` arrives (after those already seen).
    fn wait_for(&mut self, needle: &str, limit: Duration) -> String {
        let t = Instant::now();
        let mut buf = [0u8; 4096];
        while t.elapsed() < limit {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(msg.clone());
                if msg.lines().any(|l| l == needle) {
                    return msg;
                }
            }
        }
        panic!("no {needle:?} within {limit:?}; seen: {:?}", self.seen);
    }
}

#[test]
fn socket_activation_and_the_notify_protocol() {
    let tmp = TempDir::new("activate");
    let (a, b) = (tmp.path().join("a.sock"), tmp.path().join("b.sock"));
    let notify_path = tmp.path().join("notify.sock");
    let mut notify = Notify::bind(&notify_path);
    let log = std::fs::File::create(tmp.path().join("daemon.log")).unwrap();
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&a)
        .arg("-l")
        .arg(&b)
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
        .arg("--setenv=WATCHDOG_USEC=400000")
        .arg("--setenv=JOURNAL_STREAM=8:1234")
        .arg(wasmcored())
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .arg("--config")
        .arg(tmp.write("config.toml", b""))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("systemd-socket-activate (package systemd) is needed for this test");
    // systemd-socket-activate starts the daemon on the first connection.
    let t = Instant::now();
    let mut c = loop {
        if let Ok(s) = UnixStream::connect(&a) {
            drop(s);
            break Client::connect(&a);
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "listener {} never appeared",
            a.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let ready = notify.wait_for("READY=1", Duration::from_secs(20));
    assert!(ready.contains("STATUS="), "{ready}");
    // Both passed listeners serve.
    ok(&c.call(&json!({"op": "status"})));
    ok(&Client::connect(&b).call(&json!({"op": "status"})));
    // The watchdog is petted by the broker's loop, which also tends the workers: the
    // connections above are served by root's worker, a process of its own.
    notify.wait_for("WATCHDOG=1", Duration::from_secs(5));
    let status = c.call(&json!({"op": "status"}));
    let workers = ok(&status)["workers"].as_array().unwrap().clone();
    assert_eq!(workers.len(), 1, "{status}");
    assert_eq!(workers[0]["uid"], json!(0));
    assert_ne!(
        workers[0]["pid"],
        json!(child.id()),
        "not the broker: {status}"
    );
    // Reload: RELOADING=1, then READY=1.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, Signal::SIGHUP).unwrap();
    notify.wait_for("RELOADING=1", Duration::from_secs(5));
    notify.wait_for("READY=1", Duration::from_secs(5));
    ok(&c.call(&json!({"op": "status"})));
    drop(c);
    // Stop: STOPPING=1, exit 0, and the sockets systemd handed over are left alone.
    nix::sys::signal::kill(pid, Signal::SIGTERM).unwrap();
    notify.wait_for("STOPPING=1", Duration::from_secs(5));
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        a.exists() && b.exists(),
        "inherited sockets must not be unlinked"
    );
    // Under the journal, log lines carry syslog priorities.
    let text = std::fs::read_to_string(tmp.path().join("daemon.log")).unwrap();
    assert!(text.lines().any(|l| l.starts_with("<6>ready")), "{text}");
    assert!(text.contains("watchdog enabled"), "{text}");
}

#[test]
fn reload_applies_a_valid_file_and_keeps_the_old_config_on_an_invalid_one() {
    let d = Daemon::start_config("[limits]\ndefault_timeout_ms = 5000\n", &[]);
    let path = d.dir.path().join("config.toml");
    let mut c = d.client();
    let timeout = |c: &mut Client| {
        ok(&c.call(&json!({"op": "status"})))["default_limits"]["timeout_ms"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(timeout(&mut c), 5000);
    std::fs::write(
        &path,
        "[limits]\ndefault_timeout_ms = 1234\n[engine]\npool_instances = 7\n",
    )
    .unwrap();
    d.signal(Signal::SIGHUP);
    let t = Instant::now();
    while timeout(&mut c) != 1234 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "reload not applied: {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        d.log().contains("need a restart: engine.pool_instances"),
        "{}",
        d.log()
    );
    std::fs::write(&path, "[limits]\ndefault_timeout_ms = 99\nbogus = 1\n").unwrap();
    d.signal(Signal::SIGHUP);
    let t = Instant::now();
    while !d.log().contains("keeping the running configuration") {
        assert!(t.elapsed() < Duration::from_secs(5), "{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.log().contains("bogus"), "the log says why: {}", d.log());
    assert_eq!(timeout(&mut c), 1234);
}

#[test]
fn check_config_validates_and_exits() {
    let tmp = TempDir::new("check");
    let good = tmp.write("good.toml", b"[limits]\ndefault_timeout_ms = 10\n");
    let bad = tmp.write("bad.toml", b"[limits]\ndefault_timeout_ms = \"ten\"\n");
    let o = Command::new(wasmcored())
        .arg("--config")
        .arg(&good)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("valid"));
    let o = Command::new(wasmcored())
        .arg("--config")
        .arg(&bad)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("default_timeout_ms"), "{}", stderr(&o));
    // A user that does not exist in an access list would refuse everyone it was meant to
    // admit: --check-config says so (a running daemon only warns, and a reload keeps going).
    for (name, text, key) in [
        (
            "users.toml",
            "[access]\nallow_users = [\"wasmcore-no-such-user\"]\n",
            "access.allow_users: ",
        ),
        (
            "groups.toml",
            "[access]\nallow_groups = [\"wasmcore-no-such-group\"]\n",
            "access.allow_groups: ",
        ),
        (
            "quota.toml",
            "[quotas.users.wasmcore-no-such-user]\nbinaries = 3\n",
            "quotas.users.wasmcore-no-such-user: ",
        ),
    ] {
        let f = tmp.write(name, text.as_bytes());
        let o = Command::new(wasmcored())
            .arg("--config")
            .arg(&f)
            .arg("--check-config")
            .output()
            .unwrap();
        assert!(!o.status.success(), "{name}: {}", stdout(&o));
        assert!(
            stderr(&o).contains(key)
                && stderr(&o).contains("\"wasmcore-no-such-")
                && stderr(&o).contains("does not exist"),
            "{name}: {}",
            stderr(&o)
        );
    }
    // A flag's bad value is the flag's, not the config file's.
    let o = Command::new(wasmcored())
        .args(["--pool-instances", "0", "--check-config"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("'--pool-instances <N>'") && !stderr(&o).contains("config.toml"),
        "{}",
        stderr(&o)
    );
    // A log level that is not one says which are.
    let o = Command::new(wasmcored())
        .args(["--log-level", "loud", "--check-config"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("[possible values: off, error, warn, info, debug, trace]"),
        "{}",
        stderr(&o)
    );
    // Without a config file: said so, not "valid" of a file that is not there.
    if !Path::new("/etc/wasm-core/config.toml").exists() {
        let o = Command::new(wasmcored())
            .arg("--check-config")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stdout(&o).contains("/etc/wasm-core/config.toml: no such file; the defaults apply"),
            "{}",
            stdout(&o)
        );
    } else {
        eprintln!("skipped: /etc/wasm-core/config.toml exists on this machine");
    }
    let shipped = repo().join("systemd/config.toml");
    if shipped.exists() {
        let o = Command::new(wasmcored())
            .arg("--config")
            .arg(&shipped)
            .arg("--check-config")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "the shipped config must be valid: {}",
            stderr(&o)
        );
    }
}

#[test]
fn shutdown_lets_an_in_flight_execution_finish() {
    let mut d = Daemon::start();
    let mut c = d.client();
    let r = c.call(&json!({"op": "load", "wasm_base64": b64(&fixture("spin.wat"))}));
    let id = ok(&r)["binary"].as_str().unwrap().to_string();
    // About half a second of work.
    let n: u32 = 400_000_000;
    c.send(&json!({"op": "execute", "binary": id, "input_base64": b64(&n.to_le_bytes()), "timeout_ms": 20000}));
    std::thread::sleep(Duration::from_millis(100));
    d.signal(Signal::SIGTERM);
    let r = c.recv();
    ok(&r);
    assert!(r["stats"]["wall_us"].as_u64().unwrap() > 100_000, "{r}");
    let status = d
        .wait_exit(Duration::from_secs(10))
        .expect("the daemon exits after draining");
    assert!(status.success(), "{status}");
}

#[test]
fn a_second_signal_exits_at_once() {
    let mut d = Daemon::start();
    let mut c = d.client();
    let r = c.call(&json!({"op": "load", "wasm_base64": b64(&fixture("loop.wat"))}));
    let id = ok(&r)["binary"].as_str().unwrap().to_string();
    c.send(&json!({"op": "execute", "binary": id, "timeout_ms": 30000}));
    std::thread::sleep(Duration::from_millis(200));
    d.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    d.signal(Signal::SIGTERM);
    d.wait_exit(Duration::from_secs(3))
        .expect("exits at the second signal");
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(d.log().contains("second signal"), "{}", d.log());
}

#[test]
fn idle_exit_when_asked() {
    let mut d = Daemon::start_with(&["--exit-idle-after", "1"]);
    ok(&d.client().call(&json!({"op": "status"})));
    let status = d
        .wait_exit(Duration::from_secs(10))
        .expect("exits when idle");
    assert!(status.success(), "{status}");
    assert!(d.log().contains("no connection for"), "{}", d.log());
}

#[test]
fn wasmcorectl_refuses_a_socket_squatted_by_another_user() {
    let user = TestUser::create("wasmcore-e2e-squat");
    let tmp = TempDir::new("squat");
    let dir = tmp.path().join("u");
    std::fs::create_dir(&dir).unwrap();
    nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(user.uid)), None).unwrap();
    let path = dir.join("wasm-core.sock");
    let script = "import socket,sys,time\ns=socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\ns.listen()\ntime.sleep(30)";
    let mut squatter = user
        .command()
        .args(["/usr/bin/python3", "-c", script])
        .arg(&path)
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !path.exists() {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = ctl_at(&path, &["status"], None, None);
    let _ = squatter.kill();
    let _ = squatter.wait();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("refusing to talk"), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("uid {}", user.uid)),
        "{}",
        stderr(&o)
    );
}

/// `--log-level debug` shows the daemon's own debug lines, not the compiler's hundreds per
/// load; `trace` shows those too.
#[test]
fn debug_logging_leaves_the_dependencies_out_unless_trace() {
    let load_and_count = |level: &str| {
        let d = Daemon::start_config("", &["--log-level", level]);
        let mut c = d.client();
        let r = c.call(&json!({
            "op": "load",
            "wasm_base64": b64(&std::fs::read(plugin_path("uppercase")).unwrap()),
        }));
        assert_eq!(r["ok"], json!(true), "{r}");
        std::thread::sleep(Duration::from_millis(200));
        let log = d.log();
        (
            log.lines().filter(|l| l.contains(": debug: ")).count(),
            log.lines().filter(|l| l.contains(": trace: ")).count(),
            log,
        )
    };
    let (debug, _, log) = load_and_count("debug");
    assert!(debug < 40, "{debug} debug lines for one load:\n{log}");
    assert!(
        log.contains("is ready"),
        "the daemon's own debug lines stay: {log}"
    );
    let (debug_at_trace, trace, _) = load_and_count("trace");
    assert!(
        debug_at_trace + trace > 100,
        "at trace the compiler's lines are there ({debug_at_trace} + {trace})"
    );
}
