//! Declarative provisioning: a directory of files applied at start, an edited file replacing
//! exactly its binary on SIGHUP, a removed file unloading its binary, a broken file reported
//! with its line while the others apply, `apply --dry-run`, and names no file declares left
//! alone.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmcore_tests::*;

use crate::{err_code, ok};

/// A process-ABI module that outputs `tag;` after its input; with `spin`, one that never
/// returns (for the limits a file gives).
fn module(tag: &str, spin: bool) -> Vec<u8> {
    let body = if spin {
        "(loop $l (br $l))".to_string()
    } else {
        String::new()
    };
    let wat = format!(
        r#"(module
  (import "host" "output" (func $output (param i32 i32)))
  (memory (export "memory") 2)
  (data (i32.const 16) "{tag};")
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "process") (param $ptr i32) (param $len i32) (result i32)
    {body}
    (memory.copy (i32.add (local.get $ptr) (local.get $len)) (i32.const 16) (i32.const {n}))
    (call $output (local.get $ptr) (i32.add (local.get $len) (i32.const {n})))
    (i32.const 0)))"#,
        n = tag.len() + 1
    );
    wat::parse_str(&wat).expect("valid wat")
}

struct Setup {
    dir: PathBuf,
    mods: PathBuf,
}

impl Setup {
    fn new(d: &Daemon) -> Setup {
        let dir = d.dir.path().join("binaries.d");
        let mods = d.dir.path().join("modules");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&mods).unwrap();
        Setup { dir, mods }
    }

    /// Write module `file` and return its path.
    fn module(&self, file: &str, bytes: &[u8]) -> PathBuf {
        let p = self.mods.join(file);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn declare(&self, file: &str, text: &str) {
        std::fs::write(self.dir.join(file), text).unwrap();
    }
}

fn binaries(c: &mut Client) -> Vec<Value> {
    ok(&c.call(&json!({"op": "list", "all": true})))["binaries"]
        .as_array()
        .unwrap()
        .clone()
}

/// The current binary of each name: (name, owner) → UUID.
fn current(c: &mut Client) -> Vec<(String, u64, String)> {
    let mut v: Vec<_> = binaries(c)
        .iter()
        .filter(|b| b["superseded"] != json!(true))
        .map(|b| {
            (
                b["name"].as_str().unwrap_or("").to_string(),
                b["owner_uid"].as_u64().unwrap(),
                b["binary"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

fn apply(d: &Daemon, dry_run: bool) -> (Value, i32, String) {
    let mut args = vec!["--json", "apply"];
    if dry_run {
        args.push("--dry-run");
    }
    let out = d.ctl(&args);
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| {
        panic!(
            "apply printed no report ({e}): {} {}",
            stdout(&out),
            stderr(&out)
        )
    });
    (report, out.status.code().unwrap_or(-1), stderr(&out))
}

fn actions(report: &Value) -> Vec<(String, String)> {
    report["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                Path::new(e["file"].as_str().unwrap())
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
                e["action"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// Wait until the daemon has logged `n` provisioning runs at reload.
fn wait_reloads(d: &Daemon, n: usize) {
    let t = Instant::now();
    while d.log().matches("provisioning (reload)").count() < n {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no provisioning at reload: {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn output(c: &mut Client, binary: &str) -> String {
    ok(&c.call(&json!({"op": "execute", "binary": binary})))["output"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn a_directory_of_files_is_applied_at_start_on_reload_and_on_apply() {
    // The files exist before the daemon starts: write them into the directory it will use.
    let tmp = TempDir::new("prov");
    let dir = tmp.path().join("binaries.d");
    let mods = tmp.path().join("modules");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&mods).unwrap();
    let s = Setup { dir, mods };
    let alice = TestUser::create("wasmcore-e2e-palice");
    let greet = plugin_path("greet");
    let a = s.module("a.wasm", &module("a1", false));
    let b = s.module("b.wasm", &module("b1", false));
    let c = s.module("c.wasm", &module("c1", false));
    let e = s.module("e.wasm", &module("e1", true));
    s.declare(
        "10-a.toml",
        &format!("name = \"alpha\"\nsource = \"{}\"\n", a.display()),
    );
    s.declare(
        "20-b.toml",
        &format!(
            "# the team's service\nname = \"beta\"\nsource = \"{}\"\nowner = \"{}\"\n",
            b.display(),
            alice.name
        ),
    );
    s.declare(
        "30-c.toml",
        &format!(
            "name = \"gamma\"\nsource = \"{}\"\npublic = true\n",
            c.display()
        ),
    );
    s.declare(
        "40-d.toml",
        &format!(
            "name = \"greet\"\nsource = \"{}\"\n[config]\ngreeting = \"Howdy\"\n",
            greet.display()
        ),
    );
    s.declare(
        "50-e.toml",
        &format!(
            "name = \"spin\"\nsource = \"{}\"\nowner = {}\n[limits]\ntimeout_ms = 150\n",
            e.display(),
            alice.uid
        ),
    );
    let dir_arg = s.dir.display().to_string();
    let d = Daemon::start_with(&["--provisioning-dir", &dir_arg]);
    let mut root = d.client();

    // At start: all five, each marked with its file. (`apply` waits for the start's run.)
    let (report, code, _) = apply(&d, true);
    assert_eq!(code, 0, "{report}");
    assert_eq!(
        actions(&report),
        pairs(&[
            ("10-a.toml", "unchanged"),
            ("20-b.toml", "unchanged"),
            ("30-c.toml", "unchanged"),
            ("40-d.toml", "unchanged"),
            ("50-e.toml", "unchanged"),
        ])
    );
    let all = binaries(&mut root);
    assert_eq!(all.len(), 5, "{all:?}");
    for bin in &all {
        assert!(
            bin["provisioned"]["file"]
                .as_str()
                .is_some_and(|f| f.starts_with(&dir_arg)),
            "{bin}"
        );
    }
    let owners: Vec<(String, u64)> = current(&mut root)
        .into_iter()
        .map(|(n, o, _)| (n, o))
        .collect();
    let au = u64::from(alice.uid);
    assert_eq!(
        owners,
        [
            ("alpha".to_string(), 0),
            ("beta".to_string(), au),
            ("gamma".to_string(), 0),
            ("greet".to_string(), 0),
            ("spin".to_string(), au),
        ]
    );
    assert_eq!(output(&mut root, "alpha"), "a1;");
    // Alice runs her own and the public one.
    let as_alice = |req: &Value| raw_as(&d.socket, &alice, req);
    assert_eq!(
        as_alice(&json!({"op": "execute", "binary": "beta"}))["output"],
        json!("b1;")
    );
    assert_eq!(
        as_alice(&json!({"op": "execute", "binary": "gamma"}))["output"],
        json!("c1;")
    );
    // The file's Extism configuration.
    let greeting = json!({"op": "execute", "binary": "greet", "function": "greet", "input": "you"});
    assert_eq!(root.call(&greeting)["output"], json!("Howdy, you!"));
    // The file's limits: a timeout of 150 ms where the default is seconds; a request's own
    // limit still wins.
    let r = as_alice(&json!({"op": "execute", "binary": "spin"}));
    assert_eq!(err_code(&r), "timeout", "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains(" 150 ms"),
        "{r}"
    );
    let r = as_alice(&json!({"op": "execute", "binary": "spin", "timeout_ms": 60}));
    assert_eq!(err_code(&r), "timeout", "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains(" 60 ms"),
        "{r}"
    );
    let info = as_alice(&json!({"op": "info", "binary": "spin"}));
    assert_eq!(ok(&info)["limits"]["timeout_ms"], json!(150), "{info}");

    // Nobody changes a provisioned binary over the socket: not its owner, not root.
    for (who, req) in [
        ("root", json!({"op": "unload", "binary": "alpha"})),
        ("root", json!({"op": "rollback", "binary": "alpha"})),
        (
            "root",
            json!({"op": "configure", "binary": "greet", "config": {}}),
        ),
        (
            "root",
            json!({"op": "load", "wasm_base64": b64(&module("x", false)), "name": "alpha", "replace": true}),
        ),
        ("alice", json!({"op": "unload", "binary": "beta"})),
    ] {
        let r = if who == "root" {
            root.call(&req)
        } else {
            as_alice(&req)
        };
        assert_eq!(err_code(&r), "forbidden", "{who}: {req}: {r}");
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap()
                .contains("provisioning file"),
            "{r}"
        );
    }
    let before = current(&mut root);

    // One file edited to a new module: a reload replaces exactly that binary.
    let b2 = s.module("b2.wasm", &module("b2", false));
    s.declare(
        "20-b.toml",
        &format!(
            "name = \"beta\"\nsource = \"{}\"\nowner = {}\n",
            b2.display(),
            alice.uid
        ),
    );
    d.signal(nix::sys::signal::Signal::SIGHUP);
    wait_reloads(&d, 1);
    let after = current(&mut root);
    let changed: Vec<&str> = before
        .iter()
        .zip(&after)
        .filter(|(x, y)| x != y)
        .map(|(x, _)| x.0.as_str())
        .collect();
    assert_eq!(changed, ["beta"], "{before:?} {after:?}");
    assert_eq!(
        as_alice(&json!({"op": "execute", "binary": "beta"}))["output"],
        json!("b2;")
    );
    // The old version is kept for its owner's history, as any replace keeps it.
    let v = as_alice(&json!({"op": "versions", "binary": "beta"}));
    assert_eq!(ok(&v)["versions"].as_array().unwrap().len(), 2, "{v}");

    // A file removed: `wasmcorectl apply` unloads its binary, and only it.
    std::fs::remove_file(s.dir.join("30-c.toml")).unwrap();
    let (report, code, _) = apply(&d, true);
    assert_eq!(code, 0);
    assert!(
        actions(&report).contains(&("30-c.toml".into(), "unload".into())),
        "{report}"
    );
    assert!(
        current(&mut root).iter().any(|(n, _, _)| n == "gamma"),
        "a dry run changes nothing"
    );
    let out = d.ctl(&["apply"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("30-c.toml") && l.contains("unload")),
        "{table}"
    );
    let now = current(&mut root);
    assert!(!now.iter().any(|(n, _, _)| n == "gamma"), "{now:?}");
    assert_eq!(now.len(), 4);
    let r = as_alice(&json!({"op": "execute", "binary": "gamma"}));
    assert_eq!(
        err_code(&r),
        "not_found",
        "alice's worker saw the unload: {r}"
    );

    // A broken file is refused with its path and line; the others still apply, and what
    // the broken file declared before stays.
    s.declare(
        "40-d.toml",
        &format!(
            "name = \"greet\"\nsource = \"{}\"\nconfig = [\n",
            greet.display()
        ),
    );
    let a2 = s.module("a2.wasm", &module("a2", false));
    s.declare(
        "10-a.toml",
        &format!("name = \"alpha\"\nsource = \"{}\"\n", a2.display()),
    );
    // A tenant's own name, which a file then declares: refused, the tenant's binary kept.
    let mine =
        as_alice(&json!({"op": "load", "wasm_base64": b64(&module("m", false)), "name": "mine"}));
    let mine = ok(&mine)["binary"].as_str().unwrap().to_string();
    s.declare(
        "60-mine.toml",
        &format!(
            "name = \"mine\"\nsource = \"{}\"\nowner = {}\n",
            a.display(),
            alice.uid
        ),
    );
    // `wasmcorectl reload` (what `systemctl reload` runs) answers once all is applied, and
    // fails for the refused files.
    let out = d.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("configuration applied\n"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.starts_with("10-a.toml") && l.contains("replace")),
        "{}",
        stdout(&out)
    );
    wait_reloads(&d, 2);
    assert_eq!(output(&mut root, "alpha"), "a2;");
    assert_eq!(
        root.call(&greeting)["output"],
        json!("Howdy, you!"),
        "the broken file's binary stays as it was"
    );
    let (report, code, _) = apply(&d, true);
    assert_eq!(code, 6, "{report}");
    assert_eq!(
        actions(&report),
        pairs(&[
            ("10-a.toml", "unchanged"),
            ("20-b.toml", "unchanged"),
            ("40-d.toml", "invalid"),
            ("50-e.toml", "unchanged"),
            ("60-mine.toml", "invalid"),
        ])
    );
    let bad = &report["entries"][2];
    assert_eq!(bad["line"], json!(3), "{bad}");
    let out = d.ctl(&["apply", "--dry-run"]);
    assert_eq!(out.status.code(), Some(6));
    let err = stderr(&out);
    assert!(err.contains(&format!("{dir_arg}/40-d.toml:3: ")), "{err}");
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.starts_with("40-d.toml") && l.contains("invalid")),
        "{}",
        stdout(&out)
    );
    assert!(
        report["entries"][4]["error"]
            .as_str()
            .unwrap()
            .contains("no provisioning file declares"),
        "{report}"
    );
    assert_eq!(
        as_alice(&json!({"op": "info", "binary": "mine"}))["binary"],
        json!(mine)
    );
    assert!(d.log().contains("40-d.toml:3: refused"), "{}", d.log());

    // Everything persists: after a restart the start's run finds nothing to change.
    std::fs::remove_file(s.dir.join("60-mine.toml")).unwrap();
    let kept = current(&mut root);
    drop(root);
    let mut d = d;
    d.restart();
    let (report, code, _) = apply(&d, true);
    assert_eq!(code, 6, "the broken file is still broken: {report}");
    assert!(
        actions(&report)
            .iter()
            .all(|(f, a)| a == "unchanged" || f == "40-d.toml"),
        "{report}"
    );
    assert_eq!(current(&mut d.client()), kept);
    // Non-admins may not apply.
    let out = d.ctl_with(&["apply"], None, Some(&alice));
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
}

#[test]
fn files_written_after_start_load_on_apply_and_a_dry_run_changes_nothing() {
    let d = Daemon::start();
    let s = Setup::new(&d);
    let mut root = d.client();
    let (report, code, _) = apply(&d, false);
    assert_eq!((code, report["entries"].as_array().unwrap().len()), (0, 0));
    let m = s.module("n.wasm", &module("n1", false));
    s.declare(
        "n.toml",
        &format!("name = \"n\"\nsource = \"{}\"\n", m.display()),
    );
    // Not a provisioning file: ignored.
    s.declare("n.toml.orig", "garbage");
    let (report, code, _) = apply(&d, true);
    assert_eq!(code, 0);
    assert_eq!(actions(&report), pairs(&[("n.toml", "load")]));
    assert_eq!(report["dry_run"], json!(true));
    assert!(binaries(&mut root).is_empty());
    let (report, code, _) = apply(&d, false);
    assert_eq!(code, 0, "{report}");
    let id = report["entries"][0]["binary"].as_str().unwrap().to_string();
    assert_eq!(output(&mut root, &id), "n1;");
    // Same module, new configuration for a process module: refused at load time, reported
    // as a failed configure; the binary stays.
    s.declare(
        "n.toml",
        &format!(
            "name = \"n\"\nsource = \"{}\"\n[config]\nk = \"v\"\n",
            m.display()
        ),
    );
    let (report, code, _) = apply(&d, false);
    assert_eq!(code, 6, "{report}");
    assert_eq!(report["entries"][0]["action"], json!("configure"));
    assert!(report["entries"][0]["error"].is_string(), "{report}");
    assert_eq!(output(&mut root, "n"), "n1;");
    // Limits beyond the daemon's maxima are refused when applied, not at each execution.
    s.declare(
        "n.toml",
        &format!(
            "name = \"n\"\nsource = \"{}\"\n[limits]\ntimeout_ms = 999999999\n",
            m.display()
        ),
    );
    let (report, code, _) = apply(&d, false);
    assert_eq!(code, 6, "{report}");
    let error = report["entries"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("[limits]") && error.contains("timeout_ms"),
        "{error}"
    );
    // A source that is not a regular file (a FIFO nobody writes) is refused at once.
    let fifo = s.mods.join("fifo.wasm");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    s.declare(
        "n.toml",
        &format!("name = \"n\"\nsource = \"{}\"\n", fifo.display()),
    );
    let (report, code, _) = apply(&d, false);
    assert_eq!(code, 6, "{report}");
    assert_eq!(report["entries"][0]["action"], json!("invalid"));
    assert!(
        report["entries"][0]["error"]
            .as_str()
            .unwrap()
            .contains("not a regular file"),
        "{report}"
    );
    assert_eq!(
        output(&mut root, "n"),
        "n1;",
        "the binary it declared stays"
    );
}
