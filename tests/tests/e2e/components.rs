//! Components (`wasm32-wasip2` commands) through a real daemon: stdin to stdout, stderr as
//! logs, exit statuses, and the sandbox: deadlines, the memory cap, no files, no
//! environment, the output cap.

use serde_json::{Value, json};
use wasmcore_tests::{Daemon, plugin_path};

use crate::{err_code, ok};

fn run(c: &mut wasmcore_tests::Client, input: &str, extra: Value) -> Value {
    let mut req = json!({"op": "execute", "binary": "probe", "input": input});
    if let (Value::Object(r), Value::Object(e)) = (&mut req, extra) {
        r.extend(e);
    }
    c.call(&req)
}

#[test]
fn a_wasip2_command_runs_from_stdin_to_stdout_in_its_sandbox() {
    let d = Daemon::start_config("[limits]\nmax_output_bytes = 1048576\n", &[]);
    for (plugin, name) in [("sort", "sort"), ("p2probe", "probe")] {
        let o = d.ctl(&[
            "load",
            plugin_path(plugin).to_str().unwrap(),
            "--name",
            name,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // Through wasmcorectl: stdin in, stdout out, stderr as logs.
    let o = d.ctl_with(&["execute", "sort"], Some(b"pear\napple\nfig\n"), None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout, b"apple\nfig\npear\n");
    let mut c = d.client();
    let r = c.call(&json!({"op": "execute", "binary": "sort", "input": "b\na\n"}));
    assert_eq!(ok(&r)["logs"], json!(["sort: 2 lines"]));
    let info = c.call(&json!({"op": "info", "binary": "sort"}));
    assert_eq!(ok(&info)["kind"], json!("component"));

    // An infinite loop meets its deadline; a memory bomb its cap.
    let r = run(&mut c, "loop", json!({"timeout_ms": 300}));
    assert_eq!(err_code(&r), "timeout", "{r}");
    let r = run(&mut c, "bomb", json!({"memory_limit_mb": 16}));
    assert_eq!(err_code(&r), "memory_limit", "{r}");
    // Fuel holds for components too.
    let r = run(&mut c, "loop", json!({"fuel": 1_000_000}));
    assert_eq!(err_code(&r), "out_of_fuel", "{r}");
    // No files: reading one fails inside the guest, which exits non-zero.
    let r = run(&mut c, "read /etc/passwd", json!({}));
    assert_eq!(err_code(&r), "plugin_error", "{r}");
    assert!(
        r["error"]["logs"][0]
            .as_str()
            .unwrap()
            .contains("read /etc/passwd"),
        "{r}"
    );
    // No environment; clocks and random work.
    assert_eq!(ok(&run(&mut c, "env", json!({})))["output"], json!(""));
    assert_eq!(
        ok(&run(&mut c, "clock", json!({})))["output"],
        json!("clock true random true\n")
    );
    // Rust's `exit(n)` reaches the host as status 1 (wasi-libc's preview 2 exit).
    let r = run(&mut c, "exit 7", json!({}));
    assert_eq!(
        (err_code(&r), &r["error"]["plugin_code"]),
        ("plugin_error", &json!(1))
    );
    // A full stdout pipe is too_large, not a trap.
    let r = run(&mut c, "flood 2000000", json!({}));
    assert_eq!(err_code(&r), "too_large", "{r}");
    // The daemon still serves.
    assert_eq!(
        ok(&run(&mut c, "echo me", json!({})))["output"],
        json!("echo me")
    );
}
