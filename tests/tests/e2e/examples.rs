//! Every example of README.md, docs/PROTOCOL.md and docs/PLUGIN_ABI.md that shows a command
//! or a request and its output, run against a daemon set up as `make dev` sets it up, and
//! compared with what it shows (`wasmcore_tests::examples` says how).

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::{Value, json};
use wasmcore_tests::examples::{
    c_snippets, compare, json_exchanges, python_snippets, sessions, shown_json,
};
use wasmcore_tests::*;

const DOCS: [&str; 3] = ["README.md", "docs/PROTOCOL.md", "docs/PLUGIN_ABI.md"];

/// The example plugins `make dev` loads, by their names (the Makefile's `PLUGINS`).
fn dev_plugins() -> Vec<String> {
    let makefile = std::fs::read_to_string(repo().join("Makefile")).unwrap();
    let line = makefile
        .lines()
        .find_map(|l| l.strip_prefix("PLUGINS"))
        .expect("PLUGINS in the Makefile");
    line.trim_start_matches([' ', ':', '='])
        .split_whitespace()
        .map(String::from)
        .collect()
}

fn doc(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap()
}

/// The shell sessions and Python snippets, in a directory holding the files they name,
/// against a daemon with the example plugins loaded.
#[test]
fn the_shell_and_python_examples_print_what_they_show() {
    let d = Daemon::start();
    for p in dev_plugins() {
        let path = plugin_path(&p);
        let o = d.ctl(&["load", path.to_str().unwrap(), "--name", &p]);
        assert!(o.status.success(), "{p}: {}", stderr(&o));
    }
    let cwd = TempDir::new("examples");
    let plugin = std::fs::read(plugin_path("uppercase")).unwrap();
    // The files the examples name: the reader's plugin (here one that upper-cases).
    cwd.write("my-plugin.wasm", &plugin);
    std::fs::create_dir_all(cwd.path().join("target/wasm32-unknown-unknown/release")).unwrap();
    cwd.write(
        "target/wasm32-unknown-unknown/release/myplugin.wasm",
        &plugin,
    );
    cwd.write("sample.bin", b"sample\xff\x00");
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut ran = 0;
    for file in DOCS {
        for session in sessions(&doc(file)) {
            for step in session {
                // The daemon's socket is this test's, wherever the example names the default.
                let command = step
                    .command
                    .replace("/tmp/wasm-core.sock", d.socket.to_str().unwrap());
                let o = Command::new("sh")
                    .arg("-c")
                    .arg(format!("exec 2>&1\n{command}"))
                    .env("PATH", &path)
                    .env("WASM_CORE_SOCKET", &d.socket)
                    .current_dir(cwd.path())
                    .output()
                    .unwrap();
                assert!(
                    o.status.success(),
                    "{file}: `{}` failed: {}",
                    step.command,
                    stdout(&o)
                );
                if let Err(e) = compare(&step.output, &stdout(&o)) {
                    panic!(
                        "{file}: `{}` does not print what it shows\n{e}",
                        step.command
                    );
                }
                ran += 1;
            }
        }
        for (code, printed) in python_snippets(&doc(file)) {
            let code = code.replace(
                "/usr/share/wasm-core/plugins/",
                &format!("{}/", plugin_path("uppercase").parent().unwrap().display()),
            );
            let o = Command::new("/usr/bin/python3")
                .arg("-c")
                .arg(&code)
                .env("PYTHONPATH", repo().join("clients/python/src"))
                .env("WASM_CORE_SOCKET", &d.socket)
                .current_dir(cwd.path())
                .output()
                .unwrap();
            assert!(o.status.success(), "{file}: {code}\n{}", stderr(&o));
            if let Err(e) = compare(&printed, &stdout(&o)) {
                panic!("{file}: the Python example does not print what it shows\n{code}\n{e}");
            }
            ran += 1;
        }
    }
    assert!(ran >= 15, "only {ran} examples found");
}

/// The binaries a request names, without a chain stage's `:FUNCTION`.
fn named(request: &Value) -> Vec<String> {
    let mut names: Vec<&Value> = request["binaries"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    names.push(&request["binary"]);
    names
        .into_iter()
        .filter_map(Value::as_str)
        .map(|s| wasmcore_proto::split_stage(s).0.to_string())
        .collect()
}

/// Each JSON request shown, sent in order on one connection, answers what is shown after
/// it. A `wasm_base64` shown cut short (`…`) is the uppercase plugin; a binary a request
/// names that is an example plugin is loaded under that name first, as `make dev` does.
#[test]
fn the_protocol_examples_answer_what_they_show() {
    let d = Daemon::start();
    let mut c = d.client();
    let mut loaded = BTreeSet::new();
    let plugins = dev_plugins();
    let mut ran = 0;
    for file in DOCS {
        for (request, shown) in json_exchanges(&doc(file)) {
            let mut req: Value =
                serde_json::from_str(&request).unwrap_or_else(|e| panic!("{file}: {request}: {e}"));
            if req["wasm_base64"]
                .as_str()
                .is_some_and(|s| s.ends_with('…'))
            {
                req["wasm_base64"] = json!(b64(&std::fs::read(plugin_path("uppercase")).unwrap()));
            }
            if let Some(name) = req["name"].as_str() {
                loaded.insert(name.to_string());
            }
            for name in named(&req) {
                if plugins.contains(&name) && loaded.insert(name.clone()) {
                    let path = plugin_path(&name);
                    assert!(
                        d.ctl(&["load", path.to_str().unwrap(), "--name", &name])
                            .status
                            .success()
                    );
                }
            }
            let got = c.call(&req);
            assert!(
                shown_json(&shown).is_some(),
                "{file}: the response shown is not JSON: {shown}"
            );
            if let Err(e) = compare(std::slice::from_ref(&shown), &got.to_string()) {
                panic!("{file}: {request} does not answer what is shown\n{e}");
            }
            ran += 1;
        }
    }
    assert!(ran >= 4, "only {ran} exchanges found");
}

/// The C plugin of PLUGIN_ABI.md builds with the command in its first comment, loads, and
/// upper-cases as the text says.
#[test]
fn the_c_example_builds_with_its_own_command_and_runs() {
    let d = Daemon::start();
    let dir = TempDir::new("c-example");
    let snippets = c_snippets(&doc("docs/PLUGIN_ABI.md"));
    assert!(!snippets.is_empty(), "no C example with its command");
    for (command, code) in snippets {
        let out = command
            .split_whitespace()
            .skip_while(|w| *w != "-o")
            .nth(1)
            .expect("the command names its output")
            .to_string();
        let source = command.split_whitespace().last().unwrap().to_string();
        dir.write(&source, code.as_bytes());
        let o = Command::new("sh")
            .arg("-c")
            .arg(&command)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "`{command}`: {}", stderr(&o));
        let wasm = dir.path().join(&out);
        let o = d.ctl(&["load", wasm.to_str().unwrap(), "--name", "c-example"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let o = d.ctl(&["execute", "c-example", "--input", "from C"]);
        assert_eq!(stdout(&o), "FROM C", "{}", stderr(&o));
        assert!(d.ctl(&["unload", "c-example"]).status.success());
    }
}
