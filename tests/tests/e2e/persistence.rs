//! Persistence: restarts keep every binary with its UUID, name and owner and every tenant's
//! plugin state, without recompiling; kill -9 at random moments loses nothing acknowledged
//! and leaves nothing half-written; a full disk fails a load cleanly; an unusable state
//! directory is a clear start-up error.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmcore_tests::*;

use crate::{err_code, ok};

fn list(d: &Daemon) -> Vec<Value> {
    let r = d.client().call(&json!({"op": "list", "all": true}));
    ok(&r)["binaries"].as_array().unwrap().clone()
}

/// (uuid → (name, owner, public, loaded_at)) of every binary.
fn identities(d: &Daemon) -> BTreeMap<String, (Value, Value, Value, Value)> {
    list(d)
        .into_iter()
        .map(|b| {
            (
                b["binary"].as_str().unwrap().to_string(),
                (
                    b["name"].clone(),
                    b["owner_uid"].clone(),
                    b["public"].clone(),
                    b["loaded_at"].clone(),
                ),
            )
        })
        .collect()
}

fn load(d: &Daemon, plugin: &str, name: &str, public: bool) -> String {
    let bytes = std::fs::read(plugin_path(plugin)).unwrap();
    let r = d
        .client()
        .call(&json!({"op": "load", "wasm_base64": b64(&bytes), "name": name, "public": public}));
    ok(&r)["binary"].as_str().unwrap().to_string()
}

/// The restore line of the latest worker start (root's worker restores root's binaries at
/// its first connection).
fn last_restore(d: &Daemon) -> String {
    last_line(d, "restored ")
}

/// The latest log line containing `what`.
fn last_line(d: &Daemon, what: &str) -> String {
    d.log()
        .lines()
        .rfind(|l| l.contains(what))
        .unwrap_or_default()
        .to_string()
}

fn execute(d: &Daemon, binary: &str, input: &str) -> Value {
    d.client()
        .call(&json!({"op": "execute", "binary": binary, "input": input}))
}

#[test]
fn a_restart_keeps_binaries_and_plugin_state_without_recompiling() {
    let mut d = Daemon::start();
    load(&d, "uppercase", "up", false);
    let counter = load(&d, "counter", "hits", true);
    load(&d, "wc", "wc", false);
    // Every kind: an Extism plugin and a component beside the process and WASI ones.
    load(&d, "count_vowels", "vowels", false);
    load(&d, "sort", "sort", false);
    for _ in 0..3 {
        ok(&execute(&d, "hits", "k"));
    }
    let before = identities(&d);
    assert_eq!(before.len(), 5);
    let r = d.client().call(&json!({"op": "info", "binary": counter}));
    let stored_at_load = ok(&r)["stored_bytes"].as_u64().unwrap();
    assert!(stored_at_load > 11343, "module + artifact: {r}");
    d.restart();
    assert_eq!(
        identities(&d),
        before,
        "same UUIDs, names, owners, flags, load times"
    );
    let line = last_restore(&d);
    assert!(
        line.contains("restored 5 binaries") && line.contains("(0 recompiled, 0 quarantined)"),
        "{line}"
    );
    assert_eq!(
        execute(&d, "hits", "k")["output"],
        json!("4"),
        "plugin state survived"
    );
    assert_eq!(
        execute(&d, "vowels", "aeb")["output"],
        json!(r#"{"count":2}"#)
    );
    assert_eq!(execute(&d, "sort", "b\na\n")["output"], json!("a\nb\n"));
    assert_eq!(execute(&d, "up", "abc")["output"], json!("ABC"));
    let r = d.client().call(&json!({"op": "info", "binary": counter}));
    assert_eq!(
        ok(&r)["stored_bytes"].as_u64().unwrap(),
        stored_at_load,
        "{r}"
    );
    assert!(r["state_bytes"].as_u64().unwrap() > 0, "{r}");
    let r = d.client().call(&json!({"op": "status"}));
    assert!(ok(&r)["stored_bytes"].as_u64().unwrap() > 0);
    // A failed execution's writes were never stored: the counter fixture traps after set_state.
    let trap = b64(&fixture("state_set_then_trap.wat"));
    let id = ok(&d.client().call(&json!({"op": "load", "wasm_base64": trap})))["binary"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(err_code(&execute(&d, &id, "v")), "trap");
    d.restart();
    let r = d.client().call(&json!({"op": "info", "binary": id}));
    assert_eq!(ok(&r)["state_bytes"], json!(0));
}

#[test]
fn a_changed_engine_recompiles_from_the_original_bytes_once() {
    let mut d = Daemon::start();
    load(&d, "uppercase", "up", false);
    load(&d, "hash", "hash", false);
    let before = identities(&d);
    d.terminate();
    // Another engine configuration: the stored artifacts no longer fit.
    d.args = vec!["--no-fuel".into()];
    d.start_again();
    assert_eq!(identities(&d), before);
    let line = last_restore(&d);
    assert!(
        line.contains("restored 2 binaries") && line.contains("(2 recompiled, 0 quarantined)"),
        "{line}"
    );
    assert_eq!(execute(&d, "up", "x")["output"], json!("X"));
    d.restart();
    assert_eq!(identities(&d), before);
    let line = last_restore(&d);
    assert!(
        line.contains("restored 2 binaries") && line.contains("(0 recompiled"),
        "the new artifacts were stored: {line}"
    );
}

#[test]
fn unload_removes_the_binary_and_its_state_from_disk() {
    let mut d = Daemon::start();
    let id = load(&d, "counter", "c", false);
    ok(&execute(&d, "c", "k"));
    // Root's binary and plugin state, in root's subtree (format 2).
    let entry = d.state_dir().join("tenants/0/binaries").join(&id);
    let state = d.state_dir().join("tenants/0/state").join(&id);
    assert!(entry.join("meta.json").exists() && entry.join("module.wasm").exists());
    assert!(state.exists());
    ok(&d.client().call(&json!({"op": "unload", "binary": "c"})));
    assert!(!entry.exists() && !state.exists());
    d.restart();
    assert!(list(&d).is_empty());
}

#[test]
fn unreadable_entries_are_quarantined_and_stale_temp_files_cleaned() {
    let mut d = Daemon::start();
    let good = load(&d, "uppercase", "up", false);
    let bad = load(&d, "hash", "hash", false);
    d.terminate();
    let state = d.state_dir();
    let binaries = state.join("tenants/0/binaries");
    std::fs::write(binaries.join(&bad).join("meta.json"), b"{ torn").unwrap();
    let stray = binaries.join("not-a-uuid");
    std::fs::create_dir(&stray).unwrap();
    std::fs::write(state.join("tmp").join("half-written"), b"x").unwrap();
    std::fs::write(state.join("tenants/0/tmp").join("half-written"), b"x").unwrap();
    let artifact = std::fs::read_dir(binaries.join(&good))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .unwrap();
    std::fs::write(&artifact, b"bit rot").unwrap();
    d.start_again();
    let ids = identities(&d);
    assert_eq!(
        ids.keys().collect::<Vec<_>>(),
        vec![&good],
        "the good entry survives"
    );
    assert_eq!(
        execute(&d, "up", "ok")["output"],
        json!("OK"),
        "a damaged artifact is recompiled"
    );
    // The broker quarantines what no worker could read before any worker starts; the
    // worker recompiles the damaged artifact.
    let line = last_line(&d, "stored binaries of");
    assert!(
        line.contains("found 1 stored binaries of 1 tenants"),
        "{line}"
    );
    assert!(line.contains("(2 quarantined)"), "{line}");
    let line = last_restore(&d);
    assert!(line.contains("(1 recompiled, 0 quarantined)"), "{line}");
    let q: Vec<String> = std::fs::read_dir(state.join("quarantine"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        q.iter().any(|n| n.starts_with(&bad)) && q.iter().any(|n| n.ends_with(".reason")),
        "{q:?}"
    );
    for tmp in ["tmp", "tenants/0/tmp"] {
        assert_eq!(std::fs::read_dir(state.join(tmp)).unwrap().count(), 0);
    }
}

/// xorshift: reproducible randomness without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn kill_9_at_random_moments_loses_nothing_acknowledged() {
    let rounds: usize = std::env::var("WASMCORE_KILL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut rng = Rng(seed);
    let mut d = Daemon::start();
    let modules = [
        b64(&std::fs::read(plugin_path("uppercase")).unwrap()),
        b64(&std::fs::read(plugin_path("counter")).unwrap()),
    ];
    // What the daemon acknowledged: uuid → name, and the counter's acknowledged value.
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    let counter = ok(&d
        .client()
        .call(&json!({"op": "load", "wasm_base64": modules[1], "name": "counter"})))["binary"]
        .as_str()
        .unwrap()
        .to_string();
    acked.insert(counter.clone(), "counter".into());
    let mut count: u64 = 0;
    let mut n = 0u64;
    let mut ops = 0usize;
    for round in 0..rounds {
        // A client works until the daemon is killed under it, recording acknowledgements.
        let socket = d.socket.clone();
        let kill_after = Duration::from_millis(5 + rng.below(120));
        let plan: Vec<u64> = (0..400).map(|_| rng.below(10)).collect();
        let mut in_flight: Option<(String, Option<String>)> = None;
        let mut counted_in_flight = false;
        let pid = d.pid();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(kill_after);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        });
        let mut c = Client::connect(&socket);
        for step in plan {
            let req = if step < 4 && acked.len() < 30 {
                n += 1;
                let name = format!("b{n}");
                in_flight = Some(("load".into(), Some(name.clone())));
                json!({"op": "load", "wasm_base64": modules[0], "name": name})
            } else if step < 7 && acked.len() > 1 {
                let victim = acked.keys().find(|k| **k != counter).unwrap().clone();
                in_flight = Some(("unload".into(), Some(victim.clone())));
                json!({"op": "unload", "binary": victim})
            } else {
                in_flight = Some(("count".into(), None));
                counted_in_flight = true;
                json!({"op": "execute", "binary": "counter", "input": "k"})
            };
            let mut line = serde_json::to_vec(&req).unwrap();
            line.push(b'\n');
            use std::io::Write;
            if c.stream.write_all(&line).is_err() {
                break;
            }
            let Some(resp) = c.recv_line() else { break };
            let resp: Value = serde_json::from_slice(&resp).unwrap();
            ok(&resp);
            ops += 1;
            match in_flight.take().unwrap() {
                (op, Some(name)) if op == "load" => {
                    acked.insert(resp["binary"].as_str().unwrap().to_string(), name);
                }
                (op, Some(victim)) if op == "unload" => {
                    acked.remove(&victim);
                }
                _ => {
                    count += 1;
                    assert_eq!(resp["output"], json!(count.to_string()));
                }
            }
            counted_in_flight = false;
        }
        killer.join().unwrap();
        let _ = d.child.wait();
        d.start_again();
        // Every acknowledged binary is there; an unacknowledged operation may or may not
        // have happened, but nothing else appears.
        let now = identities(&d);
        let names: BTreeMap<String, String> = now
            .iter()
            .map(|(id, (name, ..))| (id.clone(), name.as_str().unwrap_or_default().to_string()))
            .collect();
        for (id, name) in &acked {
            let unloading = matches!(&in_flight, Some((op, Some(v))) if op == "unload" && v == id);
            assert!(
                names.get(id) == Some(name) || unloading,
                "round {round}: acknowledged {name} ({id}) lost"
            );
        }
        for (id, name) in &names {
            let loading = matches!(&in_flight, Some((op, Some(v))) if op == "load" && v == name);
            assert!(
                acked.contains_key(id) || loading,
                "round {round}: {name} ({id}) appeared without an acknowledged load"
            );
        }
        acked = names;
        // The counter: the acknowledged value, or one more if an execution was in flight.
        let r = execute(&d, "counter", "k");
        let got: u64 = ok(&r)["output"].as_str().unwrap().parse().unwrap();
        assert!(
            got == count + 1 || (counted_in_flight && got == count + 2),
            "round {round}: counter {got}, acknowledged {count}"
        );
        count = got;
        assert_eq!(
            std::fs::read_dir(d.state_dir().join("quarantine"))
                .unwrap()
                .count(),
            0,
            "round {round}: {}",
            d.log()
        );
    }
    eprintln!(
        "kill -9 rounds: {rounds}, acknowledged operations: {ops}, binaries at the end: {}",
        acked.len()
    );
}

/// A small tmpfs mounted for a test, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &std::path::Path, options: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(path)
            .output()
            .unwrap();
        assert!(o.status.success(), "mount: {}", stderr(&o));
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

#[test]
fn a_full_disk_fails_a_load_cleanly() {
    let tmp = TempDir::new("enospc");
    let state = tmp.path().join("state");
    let _fs = Tmpfs::mount(&state, "size=400k,mode=0700");
    let socket = tmp.path().join("s.sock");
    let mut child = Command::new(wasmcored())
        .arg("--listen")
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(10));
    }
    let module = b64(&std::fs::read(plugin_path("uppercase")).unwrap());
    let mut c = Client::connect(&socket);
    let mut loaded = Vec::new();
    let failure = loop {
        let r = c.call(&json!({"op": "load", "wasm_base64": module}));
        if r["ok"] == json!(true) {
            loaded.push(r["binary"].as_str().unwrap().to_string());
            assert!(loaded.len() < 100, "the 400 KiB disk never filled");
        } else {
            break r;
        }
    };
    assert_eq!(err_code(&failure), "internal");
    assert!(
        failure["error"]["message"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{failure}"
    );
    // Nothing half-registered: the list is exactly what was acknowledged, and all of it runs.
    let r = c.call(&json!({"op": "list"}));
    let listed: Vec<String> = ok(&r)["binaries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["binary"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, loaded);
    ok(&c.call(&json!({"op": "execute", "binary": loaded[0], "input": "a"})));
    assert_eq!(
        std::fs::read_dir(state.join("tenants/0/tmp"))
            .unwrap()
            .count(),
        0,
        "no staging left behind"
    );
    // Recovery: free space, load again.
    ok(&c.call(&json!({"op": "unload", "binary": loaded[0]})));
    ok(&c.call(&json!({"op": "load", "wasm_base64": module})));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    assert!(child.wait().unwrap().success());
}

#[test]
fn an_unusable_state_directory_is_a_clear_startup_error() {
    let tmp = TempDir::new("badstate");
    let file = tmp.write("a-file", b"x");
    let sock = tmp.path().join("s.sock");
    let o = wasmcored_output(&[
        "--listen",
        sock.to_str().unwrap(),
        "--state-dir",
        file.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("state directory"), "{}", stderr(&o));
    let ro = tmp.path().join("ro");
    let _fs = Tmpfs::mount(&ro, "size=64k,ro");
    let o = wasmcored_output(&[
        "--listen",
        sock.to_str().unwrap(),
        "--state-dir",
        ro.join("state").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("Read-only file system"),
        "{}",
        stderr(&o)
    );
    let newer = tmp.path().join("newer");
    std::fs::create_dir_all(&newer).unwrap();
    std::fs::write(newer.join("FORMAT"), "wasm-core-state 9\n").unwrap();
    let o = wasmcored_output(&[
        "--listen",
        sock.to_str().unwrap(),
        "--state-dir",
        newer.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("formats 1 and 2"), "{}", stderr(&o));
    assert!(!sock.exists(), "no socket is left behind by a failed start");
}

/// Copy a directory tree.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

#[test]
fn a_format_1_state_directory_is_moved_into_tenant_subtrees_losing_nothing() {
    // tests/fixtures/state-format-1: root's private `up`, root's public `hits` (counter) with
    // plugin state of root (5) and of uid 4242 (7), and uid 4242's private `lines`.
    let tmp = TempDir::new("format1");
    let state = tmp.path().join("state");
    copy_tree(&repo().join("tests/fixtures/state-format-1"), &state);
    let socket = tmp.path().join("s.sock");
    let log = tmp.path().join("log");
    let child = Command::new(wasmcored())
        .arg("--listen")
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Stopped however the test ends.
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Stop(child);
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        std::fs::read_to_string(state.join("FORMAT")).unwrap(),
        "wasm-core-state 2\n"
    );
    for gone in ["binaries", "state"] {
        assert!(!state.join(gone).exists(), "{gone} was emptied and removed");
    }
    let mut c = Client::connect(&socket);
    let all = c.call(&json!({"op": "list", "all": true}));
    let listed: Vec<(String, String, u64, bool, u64)> = ok(&all)["binaries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["binary"].as_str().unwrap().to_string(),
                b["name"].as_str().unwrap().to_string(),
                b["owner_uid"].as_u64().unwrap(),
                b["public"].as_bool().unwrap(),
                b["loaded_at"].as_u64().unwrap(),
            )
        })
        .collect();
    let want = [
        (
            "6f0c3a52-8a43-4d7e-9c1b-2f4e8d1a9b01",
            "up",
            0,
            false,
            1796000000,
        ),
        (
            "a1b2c3d4-0001-4e5f-8a9b-0c1d2e3f4a5b",
            "hits",
            0,
            true,
            1796000100,
        ),
        (
            "d4c3b2a1-0002-4f5e-9b8a-5b4a3f2e1d0c",
            "lines",
            4242,
            false,
            1796000200,
        ),
    ];
    assert_eq!(
        listed,
        want.iter()
            .map(|(i, n, o, p, t)| (i.to_string(), n.to_string(), *o, *p, *t))
            .collect::<Vec<_>>(),
        "same UUIDs, names, owners, flags, load times"
    );
    let run = |c: &mut Client, binary: &str, input: &str| {
        c.call(&json!({"op": "execute", "binary": binary, "input": input}))
    };
    assert_eq!(ok(&run(&mut c, "up", "a"))["output"], json!("A"));
    assert_eq!(
        ok(&run(&mut c, "hits", "k"))["output"],
        json!("6"),
        "root's plugin state kept"
    );
    // uid 4242 (no such user here): its binary runs in its own worker, for an admin.
    let lines = run(&mut c, "d4c3b2a1-0002-4f5e-9b8a-5b4a3f2e1d0c", "a\nb\n");
    assert!(
        ok(&lines)["output"].as_str().unwrap().contains('2'),
        "{lines}"
    );
    // uid 4242's state of the public counter moved into its subtree.
    assert!(
        state
            .join("tenants/4242/state/a1b2c3d4-0001-4e5f-8a9b-0c1d2e3f4a5b/4242.state")
            .exists()
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("moved 5 entries from format 1"), "{text}");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    assert!(child.0.wait().unwrap().success());
}
