//! Metrics: a mixed load from two real users, counted by the load generator and read back
//! through `wasmcorectl metrics` (an admin sees both, each user only itself); the exporter
//! under socket activation answering `GET /metrics` with text `promtool check metrics`
//! accepts, over TCP and over a Unix socket, and nothing else.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmcore_tests::*;

fn json_of(o: &std::process::Output) -> Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("json")
}

/// Executions of `tenant` by outcome, over every kind, from a snapshot.
fn outcomes(snapshot: &Value, uid: u32) -> BTreeMap<String, u64> {
    let mut by = BTreeMap::new();
    let t = snapshot["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["uid"] == json!(uid))
        .unwrap_or_else(|| panic!("no tenant {uid} in {snapshot}"));
    for k in t["kinds"].as_array().unwrap() {
        for (o, n) in k["executions"].as_object().unwrap() {
            *by.entry(o.clone()).or_insert(0) += n.as_u64().unwrap();
        }
        let count: u64 = k["executions"]
            .as_object()
            .unwrap()
            .values()
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert_eq!(k["latency_seconds"]["count"], json!(count), "{k}");
    }
    by
}

#[test]
fn metrics_count_each_users_load_and_show_each_only_its_own() {
    let tmp = TempDir::new("metrics");
    let d = Daemon::start();
    let alice = TestUser::create("wasmcore-e2e-malice");
    let bob = TestUser::create("wasmcore-e2e-mbob");
    let upper = tmp.write("upper.wasm", &fixture("upper.wat"));
    let trap = tmp.write("trap.wasm", &fixture("trap.wat"));
    let looper = tmp.write("loop.wasm", &fixture("loop.wat"));
    let nonzero = tmp.write("nonzero.wasm", &fixture("nonzero.wat"));
    let load = |who: &TestUser, path: &std::path::Path, name: &str| {
        let o = d.ctl_with(
            &["load", path.to_str().unwrap(), "--name", name],
            None,
            Some(who),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    load(&alice, &upper, "up");
    load(&alice, &trap, "trap");
    load(&alice, &looper, "loop");
    load(&bob, &upper, "up");
    load(&bob, &nonzero, "nz");

    // The load generator: what each user ran, and how it ended by the exit status.
    let mut expected: BTreeMap<(u32, &str), u64> = BTreeMap::new();
    let mut run = |who: &TestUser, args: &[&str], outcome: &'static str, times: usize| {
        for _ in 0..times {
            let o = d.ctl_with(args, None, Some(who));
            assert_eq!(o.status.success(), outcome == "ok", "{args:?}");
            *expected.entry((who.uid, outcome)).or_insert(0) += 1;
        }
    };
    run(&alice, &["execute", "up", "--input", "hi"], "ok", 12);
    run(&alice, &["execute", "trap"], "trap", 3);
    run(
        &alice,
        &["execute", "loop", "--timeout-ms", "50"],
        "timeout",
        2,
    );
    run(&bob, &["execute", "up", "--input", "x"], "ok", 7);
    run(&bob, &["execute", "nz"], "plugin_error", 4);

    let admin = json_of(&d.ctl(&["--json", "metrics"]));
    assert_eq!(admin["all_tenants"], json!(true));
    for who in [&alice, &bob] {
        let want: BTreeMap<String, u64> = expected
            .iter()
            .filter(|((uid, _), _)| *uid == who.uid)
            .map(|((_, o), n)| (o.to_string(), *n))
            .collect();
        assert_eq!(outcomes(&admin, who.uid), want, "uid {}", who.uid);
    }
    assert!(admin["pool"]["capacity"].as_u64().unwrap() > 0, "{admin}");
    // Per binary: alice's trap binary failed 3 times out of 3.
    let trap_bin = admin["binaries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == json!("trap") && b["owner_uid"] == json!(alice.uid))
        .unwrap();
    assert_eq!(
        (&trap_bin["executions"], &trap_bin["errors"]),
        (&json!(3), &json!(3))
    );
    assert!(trap_bin["p50_seconds"].as_f64().unwrap() > 0.0);

    // Each user sees itself only, and its own binaries.
    for (who, other) in [(&alice, &bob), (&bob, &alice)] {
        let mine = json_of(&d.ctl_with(&["--json", "metrics"], None, Some(who)));
        assert_eq!(mine["all_tenants"], json!(false));
        let uids: Vec<&Value> = mine["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| &t["uid"])
            .collect();
        assert_eq!(uids, vec![&json!(who.uid)], "{mine}");
        assert!(mine.get("pool").is_none() && mine.get("connections_open").is_none());
        assert!(
            mine["binaries"]
                .as_array()
                .unwrap()
                .iter()
                .all(|b| b["owner_uid"] == json!(who.uid))
        );
        assert_eq!(outcomes(&mine, who.uid), outcomes(&admin, who.uid));
        // The OpenMetrics text carries only the user's own tenant_uid.
        let text = d.ctl_with(&["metrics"], None, Some(who));
        let text = String::from_utf8(text.stdout).unwrap();
        assert!(text.contains(&format!("tenant_uid=\"{}\"", who.uid)));
        assert!(!text.contains(&format!("tenant_uid=\"{}\"", other.uid)));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}

/// A free TCP port on the loopback (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn exporter() -> std::path::PathBuf {
    bin_dir().join("wasm-core-metrics")
}

/// The exporter under `systemd-socket-activate` listening on `addr`.
struct Exporter(std::process::Child);

impl Exporter {
    fn start(addr: &str, daemon_socket: &std::path::Path) -> Exporter {
        let child = Command::new("systemd-socket-activate")
            .args(["-l", addr])
            .arg(exporter())
            .arg("--socket")
            .arg(daemon_socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("systemd-socket-activate");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let up = if addr.starts_with('/') {
                std::path::Path::new(addr).exists()
            } else {
                std::net::TcpStream::connect(addr).is_ok()
            };
            if up {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Exporter(child)
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn curl(args: &[&str]) -> (String, String) {
    let o = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl");
    let text = String::from_utf8(o.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (body.to_string(), code.to_string())
}

fn promtool_accepts(text: &str) {
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package)");
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let o = p.wait_with_output().unwrap();
    assert!(
        o.status.success() && o.stdout.is_empty() && o.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn the_socket_activated_exporter_serves_metrics_promtool_accepts() {
    let d = Daemon::start();
    let up = d.ctl(&[
        "load",
        plugin_path("uppercase").to_str().unwrap(),
        "--name",
        "up",
    ]);
    assert!(up.status.success());
    assert!(d.ctl(&["execute", "up", "--input", "x"]).status.success());
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _e = Exporter::start(&addr, &d.socket);
    let url = format!("http://{addr}/metrics");

    let (body, code) = curl(&[&url]);
    assert_eq!(code, "200", "{body}");
    assert!(
        body.contains(
            "wasm_core_executions_total{tenant_uid=\"0\",kind=\"process\",outcome=\"ok\"} 1"
        ),
        "{body}"
    );
    promtool_accepts(&body);
    // A scraper that asks for OpenMetrics gets it.
    let (om, _) = curl(&[
        "-H",
        "Accept: application/openmetrics-text;version=1.0.0",
        &url,
    ]);
    assert!(
        om.contains("wasm_core_build_info{") && om.trim_end().ends_with("# EOF"),
        "{om}"
    );

    // Only GET /metrics.
    assert_eq!(curl(&[&format!("http://{addr}/")]).1, "404");
    assert_eq!(curl(&[&format!("http://{addr}/metrics/x")]).1, "404");
    assert_eq!(curl(&["-X", "POST", "-d", "x", &url]).1, "405");
    // A request head over the cap is refused, not buffered.
    let big = format!("X-Big: {}", "a".repeat(64 << 10));
    let (_, code) = curl(&["-H", &big, &url]);
    assert!(code == "431" || code == "000", "oversized head got {code}");
    // A client that sends nothing is dropped after the head timeout (5 s).
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 512];
    let _ = slow.read(&mut buf);
    assert!(t.elapsed() < Duration::from_secs(12), "{:?}", t.elapsed());
    // Still serving.
    assert_eq!(curl(&[&url]).1, "200");

    // The Unix-socket mode, for one group's agent.
    let tmp = TempDir::new("exporter");
    let path = tmp.path().join("metrics.sock");
    let _u = Exporter::start(path.to_str().unwrap(), &d.socket);
    let (body, code) = curl(&[
        "--unix-socket",
        path.to_str().unwrap(),
        "http://localhost/metrics",
    ]);
    assert_eq!(code, "200");
    promtool_accepts(&body);
}

#[test]
fn the_exporter_reports_a_daemon_it_cannot_reach() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let tmp = TempDir::new("exporter-down");
    let _e = Exporter::start(&addr, &tmp.path().join("nothing.sock"));
    let (body, code) = curl(&[&format!("http://{addr}/metrics")]);
    assert_eq!(code, "503");
    assert!(body.contains("cannot read wasm-core's metrics"), "{body}");
}
