//! Versions under a name: `load --replace` moves a name to a new binary in one step under
//! load, a chain never mixes versions, `rollback` and `versions`, kill -9 in the middle of
//! a replace, quotas counting every kept version, and a public name replaced for every
//! tenant's worker.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use wasmcore_tests::*;

use crate::{err_code, ok};

/// A process-ABI module that outputs its input followed by `tag;`: each version of a name
/// says which one ran, and a chain says which versions its stages ran.
fn tagged(tag: &str) -> Vec<u8> {
    let wat = format!(
        r#"(module
  (import "host" "output" (func $output (param i32 i32)))
  (memory (export "memory") 2)
  (data (i32.const 16) "{tag};")
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "process") (param $ptr i32) (param $len i32) (result i32)
    (memory.copy (i32.add (local.get $ptr) (local.get $len)) (i32.const 16) (i32.const {n}))
    (call $output (local.get $ptr) (i32.add (local.get $len) (i32.const {n})))
    (i32.const 0)))"#,
        n = tag.len() + 1
    );
    wat::parse_str(&wat).expect("valid wat")
}

fn load(c: &mut Client, tag: &str, name: &str, replace: bool) -> Value {
    c.call(
        &json!({"op": "load", "wasm_base64": b64(&tagged(tag)), "name": name, "replace": replace}),
    )
}

fn run(c: &mut Client, binary: &str) -> Value {
    c.call(&json!({"op": "execute", "binary": binary}))
}

fn versions(c: &mut Client, name: &str) -> Vec<Value> {
    ok(&c.call(&json!({"op": "versions", "binary": name})))["versions"]
        .as_array()
        .unwrap()
        .clone()
}

fn id(v: &Value) -> String {
    ok(v)["binary"].as_str().unwrap().to_string()
}

#[test]
fn replaces_under_pipelined_load_lose_no_request() {
    let d = Daemon::start();
    let mut admin = d.client();
    ok(&load(&mut admin, "v0", "svc", false));
    let stop = Arc::new(AtomicBool::new(false));
    // Four connections, each with 32 executions of the name in flight at a time.
    let loaders: Vec<_> = (0..4)
        .map(|_| {
            let (mut c, stop) = (d.client(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..32 {
                        c.send(&json!({"op": "execute", "binary": "svc"}));
                    }
                    for _ in 0..32 {
                        let r = c.recv();
                        assert_eq!(r["ok"], json!(true), "an execution failed: {r}");
                        seen.push(r["output"].as_str().unwrap().to_string());
                    }
                }
                seen
            })
        })
        .collect();
    let mut previous = None;
    for i in 1..=20 {
        let tag = format!("v{i}");
        let r = load(&mut admin, &tag, "svc", true);
        let new = id(&r);
        if let Some(p) = previous.replace(new.clone()) {
            assert_eq!(r["replaced"], json!(p), "{r}");
        }
        // Once the replace is answered, every execution by name runs the new version.
        assert_eq!(run(&mut admin, "svc")["output"], json!(format!("{tag};")));
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let valid: BTreeSet<String> = (0..=20).map(|i| format!("v{i};")).collect();
    let mut total = 0;
    for l in loaders {
        let seen = l.join().expect("a load connection failed");
        total += seen.len();
        for out in &seen {
            assert!(valid.contains(out), "output of no version: {out:?}");
        }
    }
    assert!(total >= 4 * 32, "{total} executions");
    // registry.keep_versions (3): the current version and the two before it.
    let kept = versions(&mut admin, "svc");
    assert_eq!(kept.len(), 3, "{kept:?}");
    assert_eq!(kept[2]["current"], json!(true));
    assert_eq!(kept[2]["binary"], json!(previous.unwrap()));
    let list = ok(&admin.call(&json!({"op": "list"})))["binaries"].clone();
    let superseded = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["superseded"] == json!(true))
        .count();
    assert_eq!(superseded, 2, "{list}");
}

#[test]
fn a_chain_never_mixes_versions() {
    let d = Daemon::start();
    let mut admin = d.client();
    ok(&load(&mut admin, "v0", "step", false));
    let stop = Arc::new(AtomicBool::new(false));
    let chains: Vec<_> = (0..2)
        .map(|_| {
            let (mut c, stop) = (d.client(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..16 {
                        c.send(&json!({"op": "chain", "binaries": ["step", "step", "step"]}));
                    }
                    for _ in 0..16 {
                        let r = c.recv();
                        let out = ok(&r)["output"].as_str().unwrap().to_string();
                        let tags: Vec<&str> = out.split_terminator(';').collect();
                        assert_eq!(tags.len(), 3, "{out}");
                        assert!(tags.iter().all(|t| *t == tags[0]), "mixed: {out}");
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    for i in 1..=10 {
        ok(&load(&mut admin, &format!("v{i}"), "step", true));
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let n: usize = chains.into_iter().map(|c| c.join().unwrap()).sum();
    assert!(n >= 32, "{n} chains");
}

#[test]
fn rollback_versions_and_what_a_replace_refuses() {
    let d = Daemon::start_config("[registry]\nkeep_versions = 3\n", &[]);
    let mut c = d.client();
    let v1 = id(&load(&mut c, "v1", "r", false));
    // Without `replace`, a taken name is refused, and the message says how to replace.
    let r = load(&mut c, "v2", "r", false);
    assert_eq!(err_code(&r), "already_exists");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--replace"),
        "{r}"
    );
    let r = c.call(&json!({"op": "load", "wasm_base64": b64(&tagged("x")), "replace": true}));
    assert_eq!(err_code(&r), "bad_request", "a replace needs a name: {r}");
    let r = c.call(&json!({"op": "rollback", "binary": "r"}));
    assert_eq!(
        err_code(&r),
        "not_found",
        "one version, nothing to roll back to: {r}"
    );
    let v2 = id(&load(&mut c, "v2", "r", true));
    let v3 = id(&load(&mut c, "v3", "r", true));
    // The same bytes as the current version: nothing changes, and the reply says so.
    let r = load(&mut c, "v3", "r", true);
    assert_eq!((id(&r), &r["unchanged"]), (v3.clone(), &json!(true)), "{r}");
    let order: Vec<Value> = versions(&mut c, "r")
        .iter()
        .map(|v| v["binary"].clone())
        .collect();
    assert_eq!(order, [json!(v1), json!(v2), json!(v3)]);
    // Rollback goes to the version current before; a second one undoes the first.
    let r = c.call(&json!({"op": "rollback", "binary": "r"}));
    assert_eq!(
        (&ok(&r)["binary"], &r["previous"]),
        (&json!(v2), &json!(v3))
    );
    assert_eq!(run(&mut c, "r")["output"], json!("v2;"));
    let kept = versions(&mut c, "r");
    assert_eq!(kept.last().unwrap()["binary"], json!(v2), "{kept:?}");
    let r = c.call(&json!({"op": "rollback", "binary": v2}));
    assert_eq!(ok(&r)["binary"], json!(v3), "by a version's UUID too");
    assert_eq!(run(&mut c, "r")["output"], json!("v3;"));
    // Every kept version still runs by UUID.
    assert_eq!(run(&mut c, &v1)["output"], json!("v1;"));
    // A fourth version drops the one current longest ago (v1).
    let v4 = id(&load(&mut c, "v4", "r", true));
    let order: BTreeSet<String> = versions(&mut c, "r")
        .iter()
        .map(|v| v["binary"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(order, BTreeSet::from([v2.clone(), v3.clone(), v4.clone()]));
    assert_eq!(err_code(&run(&mut c, &v1)), "not_found");
    // By UUID, one version goes; the current one's name moves to the version current
    // before it.
    ok(&c.call(&json!({"op": "unload", "binary": v2})));
    assert_eq!(versions(&mut c, "r").len(), 2);
    ok(&c.call(&json!({"op": "unload", "binary": v4})));
    assert_eq!(run(&mut c, "r")["output"], json!("v3;"));
    let v5 = id(&load(&mut c, "v5", "r", true));
    assert_eq!(versions(&mut c, "r").len(), 2, "{v5}");
    // By name, the name goes with every version, from memory and from disk.
    ok(&c.call(&json!({"op": "unload", "binary": "r"})));
    assert_eq!(err_code(&run(&mut c, &v3)), "not_found");
    assert_eq!(err_code(&run(&mut c, "r")), "not_found");
    let stored = std::fs::read_dir(d.state_dir().join("tenants/0/binaries"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(stored, 0, "every version removed from disk");
}

#[test]
fn versions_and_the_current_one_survive_a_restart() {
    let mut d = Daemon::start();
    let mut c = d.client();
    let v1 = id(&load(&mut c, "v1", "p", false));
    let v2 = id(&load(&mut c, "v2", "p", true));
    let r = c.call(&json!({"op": "rollback", "binary": "p"}));
    assert_eq!(ok(&r)["binary"], json!(v1));
    drop(c);
    d.restart();
    let mut c = d.client();
    assert_eq!(
        run(&mut c, "p")["output"],
        json!("v1;"),
        "the rollback persisted"
    );
    let kept: Vec<Value> = versions(&mut c, "p")
        .iter()
        .map(|v| v["binary"].clone())
        .collect();
    assert_eq!(kept, [json!(v2), json!(v1)]);
}

#[test]
fn kill_9_in_the_middle_of_a_replace_keeps_both_versions() {
    let mut d = Daemon::start();
    let mut c = d.client();
    let mut current = id(&load(&mut c, "v0", "k", false));
    let mut all = BTreeSet::from([current.clone()]);
    // A module that takes a while to compile widens the window.
    let big = std::fs::read(plugin_path("greet")).unwrap();
    for i in 1..=6 {
        let bytes = if i % 2 == 1 {
            big.clone()
        } else {
            tagged(&format!("v{i}"))
        };
        let mut conn = d.client();
        conn.send(&json!({"op": "load", "wasm_base64": b64(&bytes), "name": "k", "replace": true}));
        std::thread::sleep(Duration::from_millis(5 + 15 * i));
        d.kill9();
        let answered = conn.recv_line();
        d.start_again();
        let mut c = d.client();
        let kept: Vec<String> = versions(&mut c, "k")
            .iter()
            .map(|v| v["binary"].as_str().unwrap().to_string())
            .collect();
        assert!(
            kept.contains(&current),
            "the version current before was lost: {kept:?}"
        );
        let now = kept.last().unwrap().clone();
        if let Some(line) = answered {
            let r: Value = serde_json::from_slice(&line).unwrap();
            if r["ok"] == json!(true) {
                assert_eq!(id(&r), now, "an acknowledged replace was lost");
            }
        }
        assert!(now == current || !all.contains(&now), "{now} {kept:?}");
        let r = run(&mut c, "k");
        if r["ok"] == json!(true) {
            assert!(r["output"].as_str().unwrap().starts_with('v'), "{r}");
        } else {
            // greet is an Extism plugin: it runs, but not as a process module.
            assert_eq!(
                ok(&c.call(&json!({"op": "info", "binary": "k"})))["binary"],
                json!(now)
            );
        }
        all.extend(kept.iter().cloned());
        current = now;
    }
}

#[test]
fn quotas_count_every_kept_version() {
    let d = Daemon::start_config("[quotas]\nbinaries = 3\n", &[]);
    let mut c = d.client();
    ok(&load(&mut c, "v1", "q", false));
    ok(&load(&mut c, "v2", "q", true));
    ok(&load(&mut c, "v3", "q", true));
    let r = load(&mut c, "o1", "other", false);
    assert_eq!(
        err_code(&r),
        "quota_exceeded",
        "three versions are three binaries: {r}"
    );
    assert!(
        r["error"]["message"].as_str().unwrap().contains("version"),
        "{r}"
    );
    // A replace that drops the oldest version fits.
    ok(&load(&mut c, "v4", "q", true));
    assert_eq!(versions(&mut c, "q").len(), 3);
}

#[test]
fn a_public_name_replaced_and_rolled_back_moves_for_every_tenant() {
    let d = Daemon::start();
    let alice = TestUser::create("wasmcore-e2e-valice");
    let mut root = d.client();
    let r = root.call(
        &json!({"op": "load", "wasm_base64": b64(&tagged("p1")), "name": "shared", "public": true}),
    );
    ok(&r);
    let as_alice = |req: &Value| raw_as(&d.socket, &alice, req);
    let exec = json!({"op": "execute", "binary": "shared"});
    assert_eq!(as_alice(&exec)["output"], json!("p1;"));
    // The replace keeps the name public without --public.
    let r = load(&mut root, "p2", "shared", true);
    assert_eq!(ok(&r)["public"], json!(true));
    assert_eq!(
        as_alice(&exec)["output"],
        json!("p2;"),
        "alice's worker took the new version"
    );
    let r = as_alice(&json!({"op": "rollback", "binary": "shared"}));
    assert_eq!(err_code(&r), "forbidden", "{r}");
    ok(&root.call(&json!({"op": "rollback", "binary": "shared"})));
    assert_eq!(as_alice(&exec)["output"], json!("p1;"), "and the rollback");
    let r = as_alice(&json!({"op": "versions", "binary": "shared"}));
    assert_eq!(ok(&r)["versions"].as_array().unwrap().len(), 2);
    // A private name is not made public by a replace.
    ok(&load(&mut root, "x1", "private", false));
    let r = root.call(&json!({"op": "load", "wasm_base64": b64(&tagged("x2")), "name": "private", "replace": true, "public": true}));
    assert_eq!(err_code(&r), "bad_request", "{r}");
    // An admin rolls back another tenant's name, by OWNER/NAME (a user name), through the
    // broker to the owner's worker.
    for tag in ["o1", "o2"] {
        let req =
            json!({"op": "load", "wasm_base64": b64(&tagged(tag)), "name": "own", "replace": true});
        ok(&as_alice(&req));
    }
    let own = json!({"op": "execute", "binary": "own"});
    assert_eq!(as_alice(&own)["output"], json!("o2;"));
    let theirs = format!("{}/own", alice.name);
    let out = d.ctl(&["rollback", &theirs]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("own is now "), "{}", stdout(&out));
    assert_eq!(
        as_alice(&own)["output"],
        json!("o1;"),
        "alice's worker took it"
    );
    let listed = root.call(&json!({"op": "versions", "binary": theirs}));
    // In the order they became current: o2, then o1 again (current, last).
    let listed = ok(&listed)["versions"].as_array().unwrap().clone();
    let current: Vec<bool> = listed
        .iter()
        .map(|v| v["current"].as_bool().unwrap())
        .collect();
    assert_eq!(current, [false, true], "{listed:?}");
    let info = as_alice(&json!({"op": "info", "binary": "own"}));
    assert_eq!(listed[1]["binary"], ok(&info)["binary"]);
}

#[test]
fn a_replace_keeps_the_configuration_unless_given_one() {
    let d = Daemon::start();
    let mut c = d.client();
    let greet = b64(&std::fs::read(plugin_path("greet")).unwrap());
    let vowels = b64(&std::fs::read(plugin_path("count_vowels")).unwrap());
    ok(&c.call(
        &json!({"op": "load", "wasm_base64": greet, "name": "g", "config": {"greeting": "Howdy"}}),
    ));
    ok(&c.call(&json!({"op": "load", "wasm_base64": vowels, "name": "g", "replace": true})));
    let info = c.call(&json!({"op": "info", "binary": "g"}));
    assert_eq!(ok(&info)["config"], json!({"greeting": "Howdy"}), "{info}");
    assert_eq!(info["kind"], json!("extism"));
    // A kind that reads no configuration cannot keep one: said, and nothing changes.
    let r = load(&mut c, "t1", "g", true);
    assert_eq!(err_code(&r), "bad_request", "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("--config"),
        "{r}"
    );
    assert_eq!(versions(&mut c, "g").len(), 2);
    // Given one, the new version has it (an empty one clears it).
    ok(&c.call(
        &json!({"op": "load", "wasm_base64": greet, "name": "g", "replace": true, "config": {}}),
    ));
    let info = c.call(&json!({"op": "info", "binary": "g"}));
    assert_eq!(ok(&info).get("config"), None, "{info}");
    // The same bytes with another configuration is not a new version: `configure` is.
    let r = c.call(&json!({"op": "load", "wasm_base64": greet, "name": "g", "replace": true, "config": {"greeting": "Hi"}}));
    assert_eq!(err_code(&r), "bad_request", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("configure"),
        "{r}"
    );
}

#[test]
fn info_lists_imports_and_exports_in_a_stable_order() {
    let d = Daemon::start();
    let mut c = d.client();
    // Declared out of order: `output` before `log`, `process` before `alloc`.
    let wat = r#"(module
      (import "host" "output" (func $output (param i32 i32)))
      (import "host" "log" (func $log (param i32 i32)))
      (memory (export "memory") 1)
      (func (export "process") (param i32 i32) (result i32) (i32.const 0))
      (func (export "alloc") (param i32) (result i32) (i32.const 1024)))"#;
    let bytes = wat::parse_str(wat).unwrap();
    let id = id(&c.call(&json!({"op": "load", "wasm_base64": b64(&bytes)})));
    let info = c.call(&json!({"op": "info", "binary": id}));
    let names = |key: &str| -> Vec<String> {
        ok(&info)[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names("imports"), ["log", "output"]);
    assert_eq!(names("exports"), ["alloc", "memory", "process"]);
}
