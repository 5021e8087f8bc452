//! Tenants in workers of their own: which process serves whom, what a worker can reach from
//! the inside (the test build's escape probe), and that a worker's death is its tenant's
//! alone.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmcore_tests::*;

use crate::{err_code, ok};

fn json_of(o: &std::process::Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {} {}", stdout(o), stderr(o)))
}

/// The live workers as root sees them in `status --json`: uid → pid.
fn workers(d: &Daemon) -> std::collections::BTreeMap<u64, u64> {
    let v = json_of(&d.ctl(&["--json", "status"]));
    v["workers"]
        .as_array()
        .unwrap_or_else(|| panic!("no workers in {v}"))
        .iter()
        .map(|w| (w["uid"].as_u64().unwrap(), w["pid"].as_u64().unwrap()))
        .collect()
}

fn proc_status(pid: u64, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("{field} not in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// Every path a process maps or holds open.
fn paths_of(pid: u64) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5).map(str::to_string))
        .collect();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        if let Ok(target) = std::fs::read_link(fd.unwrap().path()) {
            out.push(target.to_string_lossy().into_owned());
        }
    }
    out
}

fn load_as(d: &Daemon, who: &RunAs, plugin: &Path, name: &str) -> String {
    let o = d.ctl_with(
        &["load", plugin.to_str().unwrap(), "--name", name],
        None,
        Some(who),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    stdout(&o).trim().to_string()
}

#[test]
fn each_tenant_is_served_by_its_own_confined_worker() {
    let alice = TestUser::create("wasmcore-e2e-walice");
    let bob = TestUser::create("wasmcore-e2e-wbob");
    let d = Daemon::start();
    let tmp = TempDir::new("workers");
    let up = tmp.write("up.wasm", &std::fs::read(plugin_path("uppercase")).unwrap());
    let counter = tmp.write("c.wasm", &std::fs::read(plugin_path("counter")).unwrap());
    let a_id = load_as(&d, &alice, &up, "up");
    let b_id = load_as(&d, &bob, &counter, "hits");
    for (who, name, want) in [(&alice, "up", "X"), (&bob, "hits", "1")] {
        let o = d.ctl_with(&["execute", name, "--input", "x"], None, Some(who));
        assert_eq!(stdout(&o), want, "{}", stderr(&o));
    }
    let w = workers(&d);
    let (a_pid, b_pid, root_pid) = (w[&u64::from(alice.uid)], w[&u64::from(bob.uid)], w[&0]);
    assert_eq!(w.len(), 3, "alice, bob and root (asking): {w:?}");
    let broker = u64::from(d.pid());
    for pid in [a_pid, b_pid, root_pid] {
        assert_ne!(pid, broker);
        assert_eq!(proc_status(pid, "NoNewPrivs"), "1", "pid {pid}");
        assert_eq!(proc_status(pid, "Seccomp"), "2", "pid {pid}");
        let parent = proc_status(pid, "PPid");
        assert_eq!(parent, broker.to_string(), "started by the broker");
    }
    assert!(a_pid != b_pid && a_pid != root_pid && b_pid != root_pid);
    // A worker maps and holds nothing of another tenant's files.
    let tenants = d.state_dir().join("tenants");
    let a_dir = tenants.join(alice.uid.to_string());
    let b_dir = tenants.join(bob.uid.to_string());
    for (pid, foreign) in [(a_pid, &b_dir), (b_pid, &a_dir)] {
        let paths = paths_of(pid);
        let foreign = foreign.to_string_lossy().into_owned();
        assert!(
            paths.iter().all(|p| !p.starts_with(&foreign)),
            "pid {pid} reaches {foreign}: {paths:?}"
        );
    }
    assert!(a_dir.join("binaries").join(&a_id).is_dir());
    assert!(b_dir.join("binaries").join(&b_id).is_dir());
    assert!(b_dir.join("state").join(&b_id).is_dir());
    // A tenant's further connections go to the same worker.
    let o = d.ctl_with(&["execute", "up", "--input", "y"], None, Some(&alice));
    assert_eq!(stdout(&o), "Y");
    assert_eq!(workers(&d)[&u64::from(alice.uid)], a_pid);
    // An admin's metrics carry each worker's CPU time and memory; `top --tenants` shows them.
    let m = json_of(&d.ctl(&["--json", "metrics"]));
    let alice_m = m["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["uid"] == json!(alice.uid))
        .unwrap()
        .clone();
    assert_eq!(alice_m["worker"]["pid"], json!(a_pid), "{alice_m}");
    assert!(alice_m["worker"]["rss_bytes"].as_u64().unwrap() > 1 << 20);
    assert!(alice_m["worker"]["cpu_us"].as_u64().unwrap() > 0);
    let om = stdout(&d.ctl(&["metrics"]));
    assert!(
        om.contains(&format!(
            "wasm_core_worker_resident_memory_bytes{{tenant_uid=\"{}\"}}",
            alice.uid
        )),
        "{om}"
    );
    let top = d.ctl(&["top", "--tenants", "--batch", "-n", "1", "-d", "0.2"]);
    let text = stdout(&top);
    assert!(text.contains("TENANT"), "{text} {}", stderr(&top));
    let row = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&alice.uid.to_string()))
        .unwrap_or_else(|| panic!("no row of alice in {text}"));
    assert_eq!(
        row.split_whitespace().nth(1),
        Some(a_pid.to_string().as_str()),
        "{row}"
    );
    // Alice's own metrics leave the workers out, as they do other tenants.
    let o = d.ctl_with(&["--json", "metrics"], None, Some(&alice));
    let own = json_of(&o);
    assert!(own["tenants"][0].get("worker").is_none(), "{own}");
}

/// Run the escape probe (loaded by `who` as `probe`) with `input`: 0 or an errno.
fn probe(d: &Daemon, who: &RunAs, input: &[u8]) -> i32 {
    let r = raw_as(
        &d.socket,
        who,
        &json!({"op": "execute", "binary": "probe", "input_base64": b64(input)}),
    );
    // Four bytes: `output` when they happen to be UTF-8, else `output_base64`.
    let out = match ok(&r)["output"].as_str() {
        Some(text) => text.as_bytes().to_vec(),
        None => wasmcore_proto::decode_base64(r["output_base64"].as_str().unwrap()).unwrap(),
    };
    i32::from_le_bytes(out[..4].try_into().unwrap())
}

fn open_probe(d: &Daemon, who: &RunAs, path: &Path) -> i32 {
    let mut input = b"o".to_vec();
    input.extend_from_slice(path.to_str().unwrap().as_bytes());
    probe(d, who, &input)
}

#[test]
fn an_escaped_guest_reaches_its_own_files_and_nothing_else() {
    let alice = TestUser::create("wasmcore-e2e-palice");
    let bob = TestUser::create("wasmcore-e2e-pbob");
    let program = wasmcored_escape_probe();
    assert!(
        program.exists(),
        "{} is missing: make test builds it",
        program.display()
    );
    let d = Daemon::start_program(program, "[limits]\ndefault_timeout_ms = 20000\n");
    let tmp = TempDir::new("probe");
    let probe_wat = tmp.write("probe.wat", &fixture("escape_probe.wat"));
    let counter = tmp.write("c.wasm", &std::fs::read(plugin_path("counter")).unwrap());
    load_as(&d, &alice, &probe_wat, "probe");
    let a_counter = load_as(&d, &alice, &counter, "hits");
    let b_counter = load_as(&d, &bob, &counter, "hits");
    for who in [&alice, &bob] {
        let o = d.ctl_with(&["execute", "hits", "--input", "k"], None, Some(who));
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let public = ok(&d.client().call(&json!({
        "op": "load", "name": "shared", "public": true,
        "wasm_base64": b64(&std::fs::read(plugin_path("uppercase")).unwrap()),
    })))["binary"]
        .as_str()
        .unwrap()
        .to_string();
    let state = d.state_dir();
    let mine = state.join(format!("tenants/{}", alice.uid));
    let theirs = state.join(format!("tenants/{}", bob.uid));
    const EACCES: i32 = 13;
    const ENOENT: i32 = 2;
    const EPERM: i32 = 1;
    // Its own subtree: binaries and plugin state.
    assert_eq!(
        open_probe(
            &d,
            &alice,
            &mine.join(format!("binaries/{a_counter}/meta.json"))
        ),
        0
    );
    let own_state = mine.join(format!("state/{a_counter}/{}.state", alice.uid));
    assert!(own_state.exists());
    assert_eq!(open_probe(&d, &alice, &own_state), 0);
    assert_eq!(open_probe(&d, &alice, &mine.join("no-such-file")), ENOENT);
    // The public binaries, read-only.
    assert_eq!(
        open_probe(
            &d,
            &alice,
            &state.join(format!("public/binaries/{public}/meta.json"))
        ),
        0
    );
    // Nothing of bob's, of the daemon's own, or of the system.
    let b_state = theirs.join(format!("state/{b_counter}/{}.state", bob.uid));
    assert!(b_state.exists());
    for path in [
        b_state,
        theirs.join(format!("binaries/{b_counter}/meta.json")),
        theirs.join(format!("binaries/{b_counter}/module.wasm")),
        state.join("FORMAT"),
        d.dir.path().join("config.toml"),
        "/etc/shadow".into(),
        "/etc/passwd".into(),
        "/proc/1/environ".into(),
    ] {
        assert_eq!(open_probe(&d, &alice, &path), EACCES, "{}", path.display());
    }
    // No network, no other process, no program.
    assert_eq!(probe(&d, &alice, b"s"), EPERM, "socket");
    let mut kill = b"k".to_vec();
    kill.extend_from_slice(&(d.pid() as i32).to_le_bytes());
    assert_eq!(probe(&d, &alice, &kill), EPERM, "signal the broker");
    assert_eq!(probe(&d, &alice, b"x"), EPERM, "exec");
    // And the worker still serves.
    let o = d.ctl_with(&["execute", "hits", "--input", "k"], None, Some(&alice));
    assert_eq!(stdout(&o), "2");
}

/// `n` executions of `binary` as `who` on one connection, one at a time, each tagged:
/// (ok answers in order, the first other line).
const PING_PONG: &str = r#"
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rwb")
n, okays, other = int(sys.argv[3]), 0, None
for i in range(n):
    f.write(json.dumps({"op": "execute", "binary": sys.argv[2], "input": "x", "tag": i}).encode() + b"\n")
    f.flush()
    line = f.readline()
    if not line:
        other = "connection closed"
        break
    r = json.loads(line)
    if r.get("ok") and r.get("tag") == i:
        okays += 1
    elif other is None:
        other = line.decode()
print(json.dumps({"ok": okays, "other": other}))
"#;

/// Start [`PING_PONG`]: `n` executions of `binary` as `who`.
fn ping_pong(d: &Daemon, who: &RunAs, binary: &str, n: u32) -> std::process::Child {
    who.command()
        .arg("/usr/bin/python3")
        .arg("-c")
        .arg(PING_PONG)
        .arg(&d.socket)
        .arg(binary)
        .arg(n.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// What a [`ping_pong`] run reported.
fn ping_pong_result(run: std::process::Child) -> Value {
    serde_json::from_slice(&run.wait_with_output().unwrap().stdout).unwrap()
}

/// `binary`'s output for input `k` as `who`, retried until a (new) worker serves it.
fn execute_once_served(d: &Daemon, who: &RunAs, binary: &str) -> String {
    let t = Instant::now();
    loop {
        let o = d.ctl_with(&["execute", binary, "--input", "k"], None, Some(who));
        if o.status.success() {
            return stdout(&o);
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{}", stderr(&o));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_worker_fails_only_its_tenant_and_comes_back() {
    let alice = TestUser::create("wasmcore-e2e-kalice");
    let bob = TestUser::create("wasmcore-e2e-kbob");
    let d = Daemon::start();
    let tmp = TempDir::new("kill");
    let up = tmp.write("up.wasm", &std::fs::read(plugin_path("uppercase")).unwrap());
    let counter = tmp.write("c.wasm", &std::fs::read(plugin_path("counter")).unwrap());
    load_as(&d, &alice, &counter, "hits");
    load_as(&d, &bob, &up, "up");
    let o = d.ctl_with(&["execute", "hits", "--input", "k"], None, Some(&alice));
    assert_eq!(stdout(&o), "1");
    let b_pid = workers(&d)[&u64::from(bob.uid)];
    // Bob keeps executing while alice's worker is killed, three times.
    let bob_run = ping_pong(&d, &bob, "up", 3000);
    for _ in 0..3 {
        let a_pid = workers(&d)[&u64::from(alice.uid)];
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(a_pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        // Alice's next connection starts a new worker with her binary and state.
        let out = execute_once_served(&d, &alice, "hits");
        assert!(["2", "3", "4"].contains(&out.as_str()), "{out}");
        assert_ne!(workers(&d)[&u64::from(alice.uid)], a_pid);
    }
    let r = ping_pong_result(bob_run);
    assert_eq!(r, json!({"ok": 3000, "other": null}), "bob lost nothing");
    assert_eq!(
        workers(&d)[&u64::from(bob.uid)],
        b_pid,
        "bob's worker was not touched"
    );
    // The failures are logged with the tenant and counted in metrics.
    assert!(
        d.log()
            .contains(&format!("the worker of uid {} (pid", alice.uid)),
        "{}",
        d.log()
    );
    let m = json_of(&d.ctl(&["--json", "metrics"]));
    let a = m["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["uid"] == json!(alice.uid))
        .unwrap()
        .clone();
    assert_eq!(a["worker_failures"], json!(3), "{a}");
    // Her in-flight request, if any, got its connection closed, never another's answer.
    let r = raw_as(
        &d.socket,
        &alice,
        &json!({"op": "execute", "binary": "nope"}),
    );
    assert_eq!(err_code(&r), "not_found");
}

#[test]
fn an_idle_worker_exits_and_starts_again_on_the_next_connection() {
    let d = Daemon::start_config("[workers]\nidle_timeout_s = 1\n", &[]);
    let id = ok(&d.client().call(&json!({
        "op": "load", "wasm_base64": b64(&std::fs::read(plugin_path("counter")).unwrap()),
    })))["binary"]
        .as_str()
        .unwrap()
        .to_string();
    let run = || {
        d.client()
            .call(&json!({"op": "execute", "binary": id, "input": "k"}))
    };
    assert_eq!(ok(&run())["output"], json!("1"));
    let t = Instant::now();
    while !d.log().contains("had no connection for") {
        assert!(t.elapsed() < Duration::from_secs(10), "{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(ok(&run())["output"], json!("2"), "state and binary kept");
}

#[test]
fn the_noisy_neighbour_scenario_answers_every_request_in_order() {
    // tests/bench-noisy.py (a row of `make bench`) in short phases: a flood of 10 × 32
    // pipelined ~4 ms executions by one tenant beside another's ping-pong. The script
    // checks every answer (`ok`, and the tag of the request it answers, in order) and fails
    // otherwise; its timings are the bench's business, not this test's.
    let o = std::process::Command::new("/usr/bin/python3")
        .arg(repo().join("tests/bench-noisy.py"))
        .args([
            "--seconds",
            "1",
            "--json",
            "--flood-uid",
            "61110",
            "--victim-uid",
            "61111",
        ])
        .output()
        .expect("run tests/bench-noisy.py");
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    for phase in ["victim_alone", "victim_under_flood"] {
        assert!(r[phase]["n"].as_u64().unwrap() > 0, "{r}");
    }
    for phase in ["flood_alone", "flood_with_victim"] {
        assert!(r[phase]["n"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r[phase]["errors"], json!(0), "{r}");
    }
}

/// The booted e2e has no WAT compiler: it runs the committed compiled form, which must be
/// what the source says (`WASMCORE_BLESS=1` rewrites it).
#[test]
fn the_compiled_memory_hog_is_its_source() {
    let path = repo().join("wasmcored/tests/fixtures/memory_hog.wasm");
    let compiled = fixture("memory_hog.wat");
    if std::env::var_os("WASMCORE_BLESS").is_some() {
        std::fs::write(&path, &compiled).unwrap();
    }
    assert_eq!(
        std::fs::read(&path).unwrap_or_default(),
        compiled,
        "{} is stale: run with WASMCORE_BLESS=1",
        path.display()
    );
}

/// Without a cgroup memory controller (this test's dev-mode daemon has none), the broker
/// keeps `quotas.memory_mb` by watching each worker's resident memory: a tenant over it
/// loses its worker (its request fails, its connection closes), another tenant sees
/// nothing, and the tenant's next connection is served by a new worker.
#[test]
fn a_tenant_over_its_memory_quota_is_killed_alone() {
    let hog = TestUser::create("wasmcore-e2e-mhog");
    let calm = TestUser::create("wasmcore-e2e-mcalm");
    let d = Daemon::start_config(
        &format!(
            "[limits]\nmax_memory_mb = 256\n[quotas.users.\"{}\"]\nmemory_mb = 64\n",
            hog.uid
        ),
        &[],
    );
    assert!(
        d.log().contains("cgroups: none for the workers"),
        "the log says which mode is in force: {}",
        d.log()
    );
    let tmp = TempDir::new("mhog");
    let up = tmp.write("up.wasm", &std::fs::read(plugin_path("uppercase")).unwrap());
    let greedy = tmp.write("hog.wasm", &fixture("memory_hog.wat"));
    let counter = tmp.write("c.wasm", &std::fs::read(plugin_path("counter")).unwrap());
    load_as(&d, &hog, &greedy, "greedy");
    load_as(&d, &hog, &counter, "hits");
    load_as(&d, &calm, &up, "up");
    let o = d.ctl_with(&["execute", "hits", "--input", "k"], None, Some(&hog));
    assert_eq!(stdout(&o), "1");
    let calm_pid = workers(&d)[&u64::from(calm.uid)];
    let hog_pid = workers(&d)[&u64::from(hog.uid)];
    let calm_run = ping_pong(&d, &calm, "up", 2000);
    let t = Instant::now();
    let o = d.ctl_with(
        &[
            "execute",
            "greedy",
            "--memory-limit-mb",
            "200",
            "--timeout-ms",
            "20000",
        ],
        None,
        Some(&hog),
    );
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "killed well before its deadline: {:?}",
        t.elapsed()
    );
    assert!(
        d.log().contains(&format!(
            "the worker of uid {} (pid {hog_pid}) holds more than quotas.memory_mb (64 MiB)",
            hog.uid
        )),
        "{}",
        d.log()
    );
    let r = ping_pong_result(calm_run);
    assert_eq!(
        r,
        json!({"ok": 2000, "other": null}),
        "the calm tenant lost nothing"
    );
    assert_eq!(workers(&d)[&u64::from(calm.uid)], calm_pid);
    // The hog's binaries and state are served again, by a new worker.
    let out = execute_once_served(&d, &hog, "hits");
    assert_eq!(out, "2");
    assert_ne!(workers(&d)[&u64::from(hog.uid)], hog_pid);
    assert!(
        d.log().contains(
            "killed by the broker: its resident memory went over quotas.memory_mb (64 MiB)"
        ),
        "{}",
        d.log()
    );
}
