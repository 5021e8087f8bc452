//! Extism plugins against Extism's own runtime: the same plugins, functions, inputs and
//! configuration through PyPI's `extism` (with `extism-sys`, the native runtime) and
//! through a real daemon, by the raw socket and by `wasmcorectl execute`. Outputs must be
//! byte-identical and failures the same:
//! - a plugin's own error: `plugin_error` with exactly Extism's message;
//! - a non-zero code without an error ("Error code: N" under Extism): `plugin_error` with
//!   `plugin_code` N;
//! - a trap or a refused host call (Extism reports only "error while executing at wasm
//!   backtrace: …"): a failure here too, `trap` or `plugin_error`.
//!
//! The reference runtime lives in `target/extism-venv` (`tests/extism/setup.sh`, run by
//! `make test`).

use std::path::PathBuf;
use std::process::Command;

use base64::Engine as _;
use serde_json::{Value, json};
use wasmcore_tests::{Daemon, TempDir, fixture, plugin_path, repo};

use crate::{err_code, ok};

/// A call, with the binary name it is loaded under in the daemon.
struct Case {
    binary: &'static str,
    function: &'static str,
    input: &'static [u8],
}

fn reference_python() -> PathBuf {
    let py = repo().join("target/extism-venv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run tests/extism/setup.sh (make test does)",
        py.display()
    );
    py
}

/// Run `calls` through Extism's runtime.
fn extism_results(calls: &Value) -> Vec<Value> {
    let dir = TempDir::new("extism-ref");
    let input = dir.write("calls.json", calls.to_string().as_bytes());
    let out = Command::new(reference_python())
        .arg(repo().join("tests/extism/reference.py"))
        .stdin(std::fs::File::open(&input).expect("calls"))
        .output()
        .expect("run the reference runtime");
    assert!(
        out.status.success(),
        "reference runtime failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reference results")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Check one of wasm-core's answers (`ok`, output bytes or error code, message and
/// plugin code) against Extism's.
fn same(what: &str, reference: &Value, ours_ok: bool, ours: &Value, output: &[u8]) {
    if reference["ok"] == json!(true) {
        assert!(
            ours_ok,
            "{what}: Extism succeeded, wasm-core failed: {ours}"
        );
        let want = base64::engine::general_purpose::STANDARD
            .decode(reference["output_base64"].as_str().unwrap())
            .unwrap();
        assert_eq!(output, want.as_slice(), "{what}: outputs differ");
        return;
    }
    assert!(
        !ours_ok,
        "{what}: Extism failed ({reference}), wasm-core succeeded"
    );
    let message = reference["error"].as_str().unwrap();
    let code = ours["code"].as_str().unwrap();
    if message.starts_with("error while executing at wasm backtrace") {
        assert!(
            code == "trap" || code == "plugin_error",
            "{what}: Extism trapped, wasm-core said {ours}"
        );
    } else if let Some(n) = message.strip_prefix("Error code: ") {
        assert_eq!(code, "plugin_error", "{what}: {ours}");
        assert_eq!(
            ours["plugin_code"],
            json!(n.parse::<i32>().unwrap()),
            "{what}"
        );
    } else {
        assert_eq!(code, "plugin_error", "{what}: {ours}");
        assert_eq!(ours["message"].as_str(), Some(message), "{what}");
    }
}

#[test]
fn extism_plugins_match_the_extism_runtime() {
    let dir = TempDir::new("extism");
    let edges = dir.write("extism_edges.wasm", &fixture("extism_edges.wat"));
    let d = Daemon::start();
    let load = |path: &PathBuf, name: &str, config: &[&str]| {
        let mut args = vec!["load", path.to_str().unwrap(), "--name", name];
        for c in config {
            args.extend(["--config", c]);
        }
        let o = d.ctl(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let vowels = plugin_path("count_vowels");
    let greet = plugin_path("greet");
    load(&vowels, "vowels", &[]);
    load(&greet, "greet", &[]);
    load(&greet, "greet-howdy", &["greeting=Howdy", "unused=x=y"]);
    load(&edges, "edges", &[]);
    let paths = [
        ("vowels", vowels),
        ("greet", greet.clone()),
        ("greet-howdy", greet),
        ("edges", edges),
    ];
    let config = |binary: &str| match binary {
        "greet-howdy" => json!({"greeting": "Howdy", "unused": "x=y"}),
        _ => json!({}),
    };
    let cases = [
        Case {
            binary: "vowels",
            function: "count_vowels",
            input: b"Hello World",
        },
        Case {
            binary: "vowels",
            function: "count_vowels",
            input: b"",
        },
        Case {
            binary: "vowels",
            function: "count_vowels",
            input: "aeiouAEIOU \u{e9}\u{fc}".as_bytes(),
        },
        Case {
            binary: "vowels",
            function: "count_vowels",
            input: b"\xff\xfe not UTF-8",
        },
        Case {
            binary: "greet",
            function: "greet",
            input: b"Bob",
        },
        Case {
            binary: "greet-howdy",
            function: "greet",
            input: b"Bob",
        },
        Case {
            binary: "greet",
            function: "shout",
            input: b"quiet",
        },
        Case {
            binary: "greet",
            function: "count",
            input: b"abc",
        },
        Case {
            binary: "greet",
            function: "fail",
            input: b"Bob",
        },
        Case {
            binary: "greet",
            function: "fetch",
            input: b"http://127.0.0.1:9/",
        },
        Case {
            binary: "edges",
            function: "echo",
            input: b"\x00\x01binary\xff",
        },
        Case {
            binary: "edges",
            function: "echo",
            input: b"",
        },
        Case {
            binary: "edges",
            function: "lengths",
            input: b"",
        },
        Case {
            binary: "edges",
            function: "oob_loads",
            input: b"abcdefghij",
        },
        Case {
            binary: "edges",
            function: "oob_stores",
            input: b"",
        },
        Case {
            binary: "edges",
            function: "output_freed",
            input: b"",
        },
        Case {
            binary: "edges",
            function: "error_not_utf8",
            input: b"",
        },
        Case {
            binary: "edges",
            function: "error_returns_zero",
            input: b"",
        },
        Case {
            binary: "edges",
            function: "error_freed",
            input: b"",
        },
        Case {
            binary: "edges",
            function: "code_only",
            input: b"",
        },
        Case {
            binary: "edges",
            function: "vars",
            input: b"",
        },
        Case {
            binary: "edges",
            function: "bad_var_handle",
            input: b"",
        },
        Case {
            binary: "edges",
            function: "trap",
            input: b"",
        },
    ];
    let calls: Vec<Value> = cases
        .iter()
        .map(|c| {
            let wasm = &paths.iter().find(|(n, _)| *n == c.binary).unwrap().1;
            json!({
                "wasm": wasm,
                "function": c.function,
                "input_base64": b64(c.input),
                "config": config(c.binary),
            })
        })
        .collect();
    let reference = extism_results(&json!(calls));
    let mut client = d.client();
    for (c, r) in cases.iter().zip(&reference) {
        let what = format!(
            "{}:{} {:?}",
            c.binary,
            c.function,
            String::from_utf8_lossy(c.input)
        );
        let resp = client.call(&json!({
            "op": "execute",
            "binary": c.binary,
            "function": c.function,
            "input_base64": b64(c.input),
        }));
        let ours_ok = resp["ok"] == json!(true);
        let output = if ours_ok {
            wasmcore_proto::ExecuteResponse::output_bytes(
                &serde_json::from_value(resp.clone()).unwrap(),
            )
            .unwrap()
        } else {
            Vec::new()
        };
        same(
            &format!("socket {what}"),
            r,
            ours_ok,
            &resp["error"],
            &output,
        );
        if c.function == "count" {
            // The var persisted: a second call adds to it (Extism's own runtime keeps vars
            // per plugin instance only; wasm-core keeps them per tenant and binary).
            let again = client.call(
                &json!({"op": "execute", "binary": "greet", "function": "count", "input": "abcd"}),
            );
            assert_eq!(ok(&again)["output"], json!("7"), "{again}");
            continue;
        }

        // The same through wasmcorectl: raw output bytes on stdout, or the error.
        let input = dir.write("input", c.input);
        let o = d.ctl(&[
            "--json",
            "execute",
            c.binary,
            "--function",
            c.function,
            "--input-file",
            input.to_str().unwrap(),
        ]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        let ctl_ok = o.status.success();
        let output = if ctl_ok {
            wasmcore_proto::ExecuteResponse::output_bytes(
                &serde_json::from_value(v.clone()).unwrap(),
            )
            .unwrap()
        } else {
            Vec::new()
        };
        same(
            &format!("wasmcorectl {what}"),
            r,
            ctl_ok,
            &v["error"],
            &output,
        );
    }
}

#[test]
fn extism_edges_beyond_the_reference() {
    let d = Daemon::start();
    let mut c = d.client();
    let bytes = fixture("extism_edges.wat");
    let id = {
        let r = c.call(&json!({"op": "load", "wasm_base64": b64(&bytes), "name": "edges"}));
        ok(&r)["binary"].as_str().unwrap().to_string()
    };
    let exec = |c: &mut wasmcore_tests::Client, f: &str| {
        c.call(&json!({"op": "execute", "binary": "edges", "function": f}))
    };
    // A huge allocation is the memory limit (Extism's kernel returns 0).
    assert_eq!(err_code(&exec(&mut c, "huge_alloc")), "memory_limit");
    // Several functions: one must be chosen, and it must exist.
    let r = c.call(&json!({"op": "execute", "binary": id}));
    assert_eq!(err_code(&r), "bad_request");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("echo"),
        "{r}"
    );
    let r = exec(&mut c, "no_such_function");
    assert_eq!(err_code(&r), "bad_request");
    let r = exec(&mut c, "__data_end");
    assert_eq!(err_code(&r), "bad_request");
    // A function on a binary that has none to choose.
    let up = c.call(&json!({"op": "load", "wasm_base64": b64(&fixture("upper.wat"))}));
    let up = ok(&up)["binary"].as_str().unwrap().to_string();
    let r = c.call(&json!({"op": "execute", "binary": up, "function": "process"}));
    assert_eq!(err_code(&r), "bad_request");
    // Chains mix kinds and name functions: process -> Extism -> component.
    let sort = c.call(&json!({"op": "load", "wasm_base64": b64(&std::fs::read(plugin_path("sort")).unwrap()), "name": "sort"}));
    ok(&sort);
    let r =
        c.call(&json!({"op": "chain", "binaries": [up, "edges:echo", "sort"], "input": "b\na\n"}));
    assert_eq!(ok(&r)["output"], json!("A\nB\n"), "{r}");
    assert_eq!(r["stages"].as_array().unwrap().len(), 3);
    let r = c.call(&json!({"op": "chain", "binaries": [up, "edges"], "input": "x"}));
    assert_eq!(err_code(&r), "bad_request");
    // A configuration is for Extism plugins only, and is checked.
    let r = c.call(&json!({"op": "configure", "binary": up, "config": {"a": "b"}}));
    assert_eq!(err_code(&r), "bad_request");
    let r = c.call(&json!({"op": "configure", "binary": "edges", "config": {"": "b"}}));
    assert_eq!(err_code(&r), "bad_request");
}

#[test]
fn extism_plugins_that_import_wasi_get_its_sandbox_and_their_initialiser_runs() {
    let d = Daemon::start();
    let mut c = d.client();
    let wasm = fixture("extism_wasi.wat");
    let r = c.call(&json!({"op": "load", "wasm_base64": b64(&wasm), "name": "wasi-plugin"}));
    assert_eq!(ok(&r)["kind"], json!("extism"));
    for _ in 0..2 {
        let r = c.call(&json!({"op": "execute", "binary": "wasi-plugin"}));
        // `_initialize` ran before `hello`, on every fresh instance; stdout and stderr
        // are logs, the output is the output block.
        assert_eq!(ok(&r)["output"], json!("1"), "{r}");
        assert_eq!(r["logs"], json!(["to stderr", "to stdout"]), "{r}");
    }
}

#[test]
fn extism_vars_are_under_the_state_quota_and_unknown_host_imports_are_named() {
    let d = Daemon::start_config("[quotas]\nstate_bytes = 12\n", &[]);
    let mut c = d.client();
    let greet = std::fs::read(plugin_path("greet")).unwrap();
    ok(&c.call(&json!({"op": "load", "wasm_base64": b64(&greet), "name": "greet"})));
    let count = |c: &mut wasmcore_tests::Client| {
        c.call(&json!({"op": "execute", "binary": "greet", "function": "count", "input": "abc"}))
    };
    // The quota is per (tenant, binary), keys and values counted: "total" + "3" is 6 bytes
    // of greet's 12, "total" + "23" is 7.
    assert_eq!(ok(&count(&mut c))["output"], json!("3"));
    let big = "x".repeat(20);
    let r = c.call(&json!({"op": "execute", "binary": "greet", "function": "count", "input": big}));
    assert_eq!(ok(&r)["output"], json!("23"), "{r}");
    // A 1-byte key with a 12-byte value is 13 bytes: refused, and nothing is kept.
    let wat = r#"(module
      (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
      (import "extism:host/env" "var_set" (func $var_set (param i64 i64)))
      (memory (export "memory") 1)
      (func (export "fill") (result i32)
        (call $var_set (call $alloc (i64.const 1)) (call $alloc (i64.const 12)))
        (i32.const 0)))"#;
    let fill = wat::parse_str(wat).unwrap();
    ok(&c.call(&json!({"op": "load", "wasm_base64": b64(&fill), "name": "fill"})));
    let r = c.call(&json!({"op": "execute", "binary": "fill"}));
    assert_eq!(err_code(&r), "quota_exceeded", "{r}");
    let info = c.call(&json!({"op": "info", "binary": "fill"}));
    assert_eq!(ok(&info)["state_bytes"], json!(0));

    // Host functions of some other application (`extism:host/user`): refused at load, each
    // missing import named.
    let wat = r#"(module
      (import "extism:host/user" "lookup" (func (param i64) (result i64)))
      (import "extism:host/user" "notify" (func (param i64)))
      (import "extism:host/env" "nonesuch" (func))
      (func (export "run") (result i32) (i32.const 0)))"#;
    let user = wat::parse_str(wat).unwrap();
    let r = c.call(&json!({"op": "load", "wasm_base64": b64(&user)}));
    assert_eq!(err_code(&r), "invalid_module");
    let msg = r["error"]["message"].as_str().unwrap();
    for name in [
        "extism:host/user::lookup",
        "extism:host/user::notify",
        "extism:host/env::nonesuch",
    ] {
        assert!(msg.contains(name), "{msg}");
    }
}

#[test]
fn extism_config_changes_without_reloading_and_survives_restart() {
    let mut d = Daemon::start();
    let greet = plugin_path("greet");
    let o = d.ctl(&[
        "load",
        greet.to_str().unwrap(),
        "--name",
        "greet",
        "--config",
        "greeting=Hi",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = |d: &Daemon| {
        let o = d.ctl(&["execute", "greet", "--function", "greet", "--input", "Ann"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    assert_eq!(run(&d), "Hi, Ann!");
    let o = d.ctl(&["configure", "greet", "--config", "greeting=Ahoy"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(run(&d), "Ahoy, Ann!");
    let mut c = d.client();
    let info = c.call(&json!({"op": "info", "binary": "greet"}));
    assert_eq!(ok(&info)["config"], json!({"greeting": "Ahoy"}));
    assert_eq!(info["kind"], json!("extism"));
    assert_eq!(
        info["functions"],
        json!(["count", "fail", "fetch", "greet", "shout"])
    );
    // Vars persist like plugin state.
    let r =
        c.call(&json!({"op": "execute", "binary": "greet", "function": "count", "input": "abc"}));
    assert_eq!(ok(&r)["output"], json!("3"));
    drop(c);
    d.restart();
    assert_eq!(run(&d), "Ahoy, Ann!");
    let mut c = d.client();
    let r =
        c.call(&json!({"op": "execute", "binary": "greet", "function": "count", "input": "ab"}));
    assert_eq!(ok(&r)["output"], json!("5"));
    // Clearing the configuration: the PDK's default greeting.
    let o = d.ctl(&["configure", "greet"]);
    assert!(o.status.success());
    assert_eq!(run(&d), "Hello, Ann!");
}
