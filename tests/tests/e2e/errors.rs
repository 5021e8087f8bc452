//! Errors a user can act on: each says what went wrong and where (the path, the chain
//! stage, the plugin's own code).

use serde_json::json;
use wasmcore_tests::*;

use crate::{err_code, ok};

#[test]
fn loading_a_directory_names_it_on_the_client_and_in_the_daemon() {
    let d = Daemon::start();
    let tmp = TempDir::new("dirload");
    let o = d.ctl(&["load", tmp.0.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains(tmp.0.to_str().unwrap()) && e.contains("is a directory"),
        "{e}"
    );
    // An admin's `path` load of a directory: the daemon says the same of the path.
    let r = d
        .client()
        .call(&json!({"op": "load", "path": tmp.0.to_str().unwrap()}));
    assert_eq!(err_code(&r), "bad_request");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(tmp.0.to_str().unwrap()) && msg.contains("is a directory"),
        "{msg}"
    );
}

#[test]
fn a_module_the_daemon_refuses_is_named_by_its_file() {
    let d = Daemon::start();
    let tmp = TempDir::new("badload");
    let notes = tmp.write("notes.txt", b"not wasm");
    let o = d.ctl(&["load", notes.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with(&format!(
            "wasmcorectl: invalid_module: {}: not a WebAssembly binary",
            notes.display()
        )),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_relative_load_path_is_refused_with_the_reason() {
    let d = Daemon::start();
    let r = d
        .client()
        .call(&json!({"op": "load", "path": "plugins/dist/uppercase.wasm"}));
    assert_eq!(err_code(&r), "bad_request");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("\"plugins/dist/uppercase.wasm\" is relative") && msg.contains("absolute"),
        "{msg}"
    );
}

#[test]
fn a_chain_stage_that_cannot_start_is_named_and_numbered_from_zero() {
    let d = Daemon::start();
    let mut c = d.client();
    ok(&c.call(&json!({
        "op": "load", "name": "up",
        "wasm_base64": b64(&std::fs::read(plugin_path("uppercase")).unwrap()),
    })));
    let r = c.call(&json!({"op": "chain", "binaries": ["up", "nope", "up"], "input": "x"}));
    assert_eq!(err_code(&r), "not_found");
    assert_eq!(r["error"]["stage"], json!(1), "{r}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.starts_with("stage 1 (nope): "), "{msg}");
    // A function the stage's binary lacks.
    let r = c.call(&json!({"op": "chain", "binaries": ["up:nosuch"], "input": "x"}));
    assert_eq!(r["error"]["stage"], json!(0), "{r}");
    // The CLI prints the same.
    let o = d.ctl(&["chain", "up", "nope", "--input", "x"]);
    assert_eq!(o.status.code(), Some(5));
    assert!(stderr(&o).contains("stage 1 (nope)"), "{}", stderr(&o));
}

#[test]
fn the_human_form_of_a_plugin_error_carries_the_plugins_code() {
    let d = Daemon::start();
    let greet = plugin_path("greet");
    let o = d.ctl(&["load", greet.to_str().unwrap(), "--name", "greet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = d.ctl(&["execute", "greet", "--function", "fail", "--input", "x"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("plugin_error: refusing") && e.contains("(plugin code 3)"),
        "{e}"
    );
}

#[test]
fn one_message_names_every_missing_import_wasi_ones_too() {
    let d = Daemon::start();
    let module = wat::parse_str(
        r#"(module
            (import "env" "foo" (func))
            (import "host" "nope" (func))
            (import "extism:host/user" "hf" (func))
            (import "wasi_snapshot_preview1" "bar" (func))
            (memory (export "memory") 1)
            (func (export "_start")))"#,
    )
    .unwrap();
    let r = d
        .client()
        .call(&json!({"op": "load", "wasm_base64": b64(&module)}));
    assert_eq!(err_code(&r), "invalid_module");
    let msg = r["error"]["message"].as_str().unwrap();
    for import in [
        "env::foo",
        "host::nope",
        "extism:host/user::hf",
        "wasi_snapshot_preview1::bar",
    ] {
        assert!(msg.contains(import), "{import} missing from: {msg}");
    }
    // Alone, the WASI one gets the same wording.
    let alone = wat::parse_str(
        r#"(module (import "wasi_snapshot_preview1" "bar" (func))
            (memory (export "memory") 1) (func (export "_start")))"#,
    )
    .unwrap();
    let r = d
        .client()
        .call(&json!({"op": "load", "wasm_base64": b64(&alone)}));
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(
            "the module imports what wasm-core does not provide: wasi_snapshot_preview1::bar"
        ),
        "{msg}"
    );
}

#[test]
fn a_trap_says_so_once_and_shows_its_frames() {
    let d = Daemon::start();
    let wasm = wat::parse_str(
        r#"(module (memory (export "memory") 1)
             (func (export "alloc") (param i32) (result i32) i32.const 0)
             (func $deep unreachable)
             (func (export "process") (param i32 i32) (result i32) call $deep i32.const 0))"#,
    )
    .unwrap();
    let mut c = d.client();
    ok(&c.call(&json!({"op": "load", "name": "trap", "wasm_base64": b64(&wasm)})));
    let r = c.call(&json!({"op": "execute", "binary": "trap"}));
    assert_eq!(err_code(&r), "trap");
    assert_eq!(
        r["error"]["message"],
        json!("wasm trap: wasm `unreachable` instruction executed"),
        "{r}"
    );
    assert!(
        r["error"]["backtrace"][0]
            .as_str()
            .unwrap()
            .contains("deep"),
        "{r}"
    );
}
