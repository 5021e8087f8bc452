//! The socket service in dev mode: every op through a raw socket and through `wasmcorectl`,
//! pipelining, byte round-trips, bad input, fd passing, a second real UID.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmcore_tests::*;

use crate::{err_code, ok};

fn load_inline(c: &mut Client, bytes: &[u8], name: Option<&str>) -> String {
    let mut req = json!({"op": "load", "wasm_base64": b64(bytes)});
    if let Some(n) = name {
        req["name"] = json!(n);
    }
    let r = c.call(&req);
    ok(&r)["binary"].as_str().unwrap().to_string()
}

#[test]
fn every_op_over_a_raw_socket() {
    let d = Daemon::start();
    let mut c = d.client();
    let r = c.call(&json!({"op": "load", "wasm_base64": b64(&std::fs::read(plugin_path("uppercase")).unwrap()), "name": "up", "tag": 1}));
    ok(&r);
    assert_eq!(r["tag"], json!(1));
    assert_eq!(r["kind"], json!("process"));
    assert_eq!(r["name"], json!("up"));
    assert_eq!(r["sha256"].as_str().unwrap().len(), 64);
    let id = r["binary"].as_str().unwrap().to_string();

    let r = c.call(&json!({"op": "execute", "binary": "up", "input": "hello world", "tag": "a"}));
    assert_eq!(ok(&r)["output"], json!("HELLO WORLD"));
    assert_eq!(r["tag"], json!("a"));
    assert!(r["stats"]["wall_us"].is_u64());
    assert!(r["stats"]["fuel_used"].as_u64().unwrap() > 0);

    let r = c.call(&json!({"op": "chain", "binaries": [id, "up"], "input": "abc"}));
    assert_eq!(ok(&r)["output"], json!("ABC"));
    assert_eq!(r["stages"].as_array().unwrap().len(), 2);

    let r = c.call(&json!({"op": "list"}));
    let list = ok(&r)["binaries"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["binary"], json!(id));
    assert_eq!(list[0]["executions"], json!(3));
    assert_eq!(list[0]["owner_uid"], json!(nix::unistd::getuid().as_raw()));

    let r = c.call(&json!({"op": "info", "binary": id}));
    ok(&r);
    assert!(
        r["exports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == json!("process"))
    );
    assert!(
        r["imports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == json!("output"))
    );
    assert_eq!(r["limits"]["timeout_ms"], json!(5000));

    let r = c.call(&json!({"op": "status"}));
    ok(&r);
    assert_eq!(r["protocol"], json!(1));
    assert_eq!(r["binaries"], json!(1));
    assert_eq!(
        r["executions"],
        json!(3),
        "one execute and a chain of two stages so far"
    );
    assert_eq!(r["tenant"]["uid"], json!(nix::unistd::getuid().as_raw()));

    ok(&c.call(&json!({"op": "unload", "binary": "up"})));
    assert_eq!(
        err_code(&c.call(&json!({"op": "execute", "binary": id}))),
        "not_found"
    );
    assert_eq!(
        err_code(&c.call(&json!({"op": "unload", "binary": id}))),
        "not_found"
    );
}

#[test]
fn arbitrary_bytes_round_trip_exactly() {
    let d = Daemon::start();
    let mut c = d.client();
    let id = load_inline(&mut c, &fixture("echo.wat"), None);
    let bytes: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let r = c.call(&json!({"op": "execute", "binary": id, "input_base64": b64(&bytes)}));
    assert_eq!(ok(&r)["output_base64"], json!(b64(&bytes)));
    // UTF-8 text with escapes and non-ASCII comes back as text.
    let text = "tab\tquote\"backslash\\ newline\n nul\u{0} é 日本 🎉";
    let r = c.call(&json!({"op": "execute", "binary": id, "input": text}));
    assert_eq!(ok(&r)["output"], json!(text));
    // Through wasmcorectl: bytes in from a file, raw bytes out on stdout.
    let tmp = TempDir::new("bytes");
    let f = tmp.write("in.bin", &bytes);
    let o = d.ctl(&["execute", &id, "--input-file", f.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(o.stdout, bytes);
    let o = d.ctl_with(&["execute", &id], Some(&bytes[..1000]), None);
    assert_eq!(o.stdout, &bytes[..1000]);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let d = Daemon::start();
    let mut c = d.client();
    let id = load_inline(&mut c, &fixture("upper.wat"), None);
    let mut batch = Vec::new();
    for i in 0..200 {
        let req = if i % 7 == 0 {
            json!({"op": "status", "tag": i})
        } else if i % 11 == 0 {
            json!({"op": "execute", "binary": "missing", "tag": i})
        } else {
            json!({"op": "execute", "binary": id, "input": format!("req {i}"), "tag": i})
        };
        batch.extend(serde_json::to_vec(&req).unwrap());
        batch.push(b'\n');
    }
    c.send_raw(&batch);
    for i in 0..200 {
        let r = c.recv();
        assert_eq!(r["tag"], json!(i), "response {i} out of order: {r}");
        if i % 7 == 0 {
            ok(&r);
        } else if i % 11 == 0 {
            assert_eq!(err_code(&r), "not_found");
        } else {
            assert_eq!(ok(&r)["output"], json!(format!("REQ {i}")));
        }
    }
}

#[test]
fn pipelined_executions_never_see_each_others_secrets() {
    // Each execution of leave_secrets.wat reports the state it found, then writes a secret
    // into its memory, a global and its table (wasmcored/tests/isolation.rs runs it under
    // every reset setting); pipelined on two connections, every report must be the
    // module's initial data.
    let d = Daemon::start();
    let mut c = d.client();
    let id = load_inline(&mut c, &fixture("leave_secrets.wat"), None);
    let mut want = b"INIT".to_vec();
    for v in [0i32, 7, 1, 1, 2, 4] {
        want.extend(v.to_le_bytes());
    }
    let want = String::from_utf8(want).unwrap();
    let mut other = d.client();
    let req = json!({"op": "execute", "binary": id});
    let mut batch = serde_json::to_vec(&req).unwrap();
    batch.push(b'\n');
    let batch = batch.repeat(100);
    c.send_raw(&batch);
    other.send_raw(&batch);
    for i in 0..100 {
        for conn in [&mut c, &mut other] {
            let r = conn.recv();
            assert_eq!(
                ok(&r)["output"],
                json!(want),
                "execution {i} saw another's data"
            );
        }
    }
}

#[test]
fn malformed_requests_get_clear_errors_and_the_connection_survives() {
    let d = Daemon::start();
    let mut c = d.client();
    // The binary the requests name exists: what is wrong is the request.
    ok(&c.call(&json!({
        "op": "load", "name": "x",
        "wasm_base64": b64(&std::fs::read(plugin_path("uppercase")).unwrap()),
    })));
    let cases: Vec<(&[u8], &str)> = vec![
        (b"this is not json\n", "not a JSON object"),
        (b"[1,2]\n", "not a JSON object but an array"),
        (b"42\n", "not a JSON object but a number"),
        (b"{\"op\":\"status\"\n", "invalid request"),
        (b"{\"op\":\"fly\",\"tag\":5}\n", "unknown op"),
        (b"{\"binary\":\"x\"}\n", "missing field `op`"),
        (b"{\"op\":\"execute\"}\n", "missing field `binary`"),
        (
            b"{\"op\":\"execute\",\"binary\":\"x\",\"timeout_ms\":\"soon\"}\n",
            "invalid",
        ),
        (
            b"{\"op\":\"status\",\"extra\":true}\n",
            "unknown field `extra`",
        ),
        (b"{\"op\":\"load\"}\n", "exactly one module source"),
        (
            b"{\"op\":\"load\",\"wasm_base64\":\"!!!\"}\n",
            "invalid base64",
        ),
        (
            b"{\"op\":\"execute\",\"binary\":\"x\",\"input\":\"a\",\"input_base64\":\"YQ==\"}\n",
            "not both",
        ),
        (b"{\"op\":\"chain\",\"binaries\":[]}\n", "at least one"),
        (b"\xff\xfe\n", "UTF-8"),
        (b"\n", "empty request"),
    ];
    for (line, expect) in cases {
        c.send_raw(line);
        let r = c.recv();
        let code = err_code(&r).to_string();
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(expect),
            "{:?}: {msg}",
            String::from_utf8_lossy(line)
        );
        assert!(code == "bad_request" || code == "not_found", "{code}");
    }
    c.send_raw(b"{\"op\":\"fly\",\"tag\":5}\n");
    assert_eq!(
        c.recv()["tag"],
        json!(5),
        "the tag is echoed even for an unknown op"
    );
    ok(&c.call(&json!({"op": "status"})));
}

#[test]
fn an_oversized_line_closes_only_that_connection() {
    let d = Daemon::start_with(&[]);
    let mut c = d.client();
    let max = ok(&c.call(&json!({"op": "status"})))["max_request_bytes"]
        .as_u64()
        .unwrap() as usize;
    let big = vec![b'x'; max + 10];
    // The daemon may close before we finish writing: ignore write errors.
    use std::io::Write;
    let _ = c.stream.write_all(&big);
    let r = c.recv();
    assert_eq!(err_code(&r), "too_large");
    assert!(
        c.recv_line().is_none(),
        "the connection is closed after an oversized line"
    );
    ok(&d.client().call(&json!({"op": "status"})));
}

#[test]
fn a_client_that_disconnects_mid_execution_leaks_nothing() {
    let d = Daemon::start();
    let mut c = d.client();
    let id = load_inline(&mut c, &fixture("loop.wat"), None);
    ok(&c.call(&json!({"op": "status"})));
    let fds_before = d.open_fds();
    for _ in 0..20 {
        let mut gone = d.client();
        gone.send(&json!({"op": "execute", "binary": id, "timeout_ms": 300}));
        drop(gone);
    }
    // Every abandoned execution ends at its deadline and its connection is closed.
    let t = Instant::now();
    loop {
        let r = c.call(&json!({"op": "status"}));
        if r["executions_running"] == json!(0)
            && r["connections"] == json!(1)
            && d.open_fds() <= fds_before
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "still busy: {r}, fds {} > {fds_before}",
            d.open_fds()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_op_through_wasmcorectl() {
    let d = Daemon::start();
    let up = plugin_path("uppercase");
    let o = d.ctl(&["load", up.to_str().unwrap(), "--name", "up"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let id = stdout(&o).trim().to_string();
    assert_eq!(id.len(), 36, "load prints the UUID: {id:?}");
    let o = d.ctl(&["execute", "up", "--input", "hello"]);
    assert_eq!(
        (o.status.code(), o.stdout.as_slice()),
        (Some(0), &b"HELLO"[..])
    );
    let o = d.ctl_with(&["execute", &id], Some(b"from stdin"), None);
    assert_eq!(o.stdout, b"FROM STDIN");
    let o = d.ctl(&[
        "load",
        plugin_path("transform").to_str().unwrap(),
        "--name",
        "slug",
    ]);
    assert!(o.status.success());
    let o = d.ctl(&["chain", "slug", "up", "--input", "Hello, World"]);
    assert_eq!(o.stdout, b"HELLO-WORLD");
    let o = d.ctl(&["list"]);
    let out = stdout(&o);
    assert!(out.starts_with("BINARY"), "{out}");
    assert!(out.contains(&id) && out.contains("slug"), "{out}");
    let o = d.ctl(&["--json", "list"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["binaries"].as_array().unwrap().len(), 2);
    let o = d.ctl(&["info", "up"]);
    assert!(stdout(&o).contains("kind: process"), "{}", stdout(&o));
    let o = d.ctl(&["status"]);
    assert!(stdout(&o).contains("protocol: 1"), "{}", stdout(&o));
    let o = d.ctl(&["--json", "execute", "up", "--input", "x"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["output"], json!("X"));
    // .wat text is compiled by the client.
    let wat = repo().join("wasmcored/tests/fixtures/nonzero.wat");
    let o = d.ctl(&["load", wat.to_str().unwrap(), "--name", "fails"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Documented exit codes, with errors on stderr that say what happened.
    let o = d.ctl(&["execute", "fails"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("plugin_error") && stderr(&o).contains("log: about to fail"),
        "{}",
        stderr(&o)
    );
    let o = d.ctl(&["execute", "nope"]);
    assert_eq!(o.status.code(), Some(5));
    assert!(stderr(&o).contains("not_found"), "{}", stderr(&o));
    let o = d.ctl(&["load", "/nonexistent.wasm"]);
    assert_eq!(o.status.code(), Some(9));
    let tmp = TempDir::new("ctl");
    let junk = tmp.write("junk.wasm", b"not wasm at all");
    let o = d.ctl(&["load", junk.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(6));
    assert!(stderr(&o).contains("invalid_module"), "{}", stderr(&o));
    let o = d.ctl(&["load", up.to_str().unwrap(), "--name", "up"]);
    assert_eq!(o.status.code(), Some(6));
    assert!(stderr(&o).contains("already_exists"), "{}", stderr(&o));
    let o = d.ctl(&["unload", "up"]);
    assert!(o.status.success());
    let o = d.ctl(&["bogus"]);
    assert_eq!(o.status.code(), Some(2));
    let o = std::process::Command::new(wasmcorectl())
        .args(["--socket", "/nonexistent/wasm-core.sock", "status"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr(&o).contains("is the daemon running"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn passed_file_descriptors_are_checked() {
    let d = Daemon::start();
    let tmp = TempDir::new("fds");
    let send_fds = |req: &Value, fds: &[std::os::fd::RawFd]| -> Value {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        let s = UnixStream::connect(&d.socket).unwrap();
        let mut line = serde_json::to_vec(req).unwrap();
        line.push(b'\n');
        sendmsg::<()>(
            s.as_raw_fd(),
            &[std::io::IoSlice::new(&line)],
            &[ControlMessage::ScmRights(fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut r = std::io::BufReader::new(s);
        let mut buf = String::new();
        std::io::BufRead::read_line(&mut r, &mut buf).unwrap();
        serde_json::from_str(&buf).unwrap()
    };
    let send_fd = |req: &Value, fd: std::os::fd::RawFd| send_fds(req, &[fd]);
    let good = std::fs::File::open(plugin_path("uppercase")).unwrap();
    let r = send_fd(&json!({"op": "load", "fd": true}), good.as_raw_fd());
    assert_eq!(ok(&r)["kind"], json!("process"));
    let dir = std::fs::File::open(tmp.path()).unwrap();
    let r = send_fd(&json!({"op": "load", "fd": true}), dir.as_raw_fd());
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("passed file descriptor is a directory, not a module file"),
        "{r}"
    );
    let (a, _b) = UnixStream::pair().unwrap();
    let r = send_fd(&json!({"op": "load", "fd": true}), a.as_raw_fd());
    assert_eq!(err_code(&r), "bad_request");
    let r = send_fd(&json!({"op": "status"}), good.as_raw_fd());
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("takes none"),
        "{r}"
    );
    let r = d.client().call(&json!({"op": "load", "fd": true}));
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exactly one file descriptor"),
        "{r}"
    );
    // Too many descriptors in one message.
    let many: Vec<_> = (0..10).map(|_| good.as_raw_fd()).collect();
    let r = send_fds(&json!({"op": "load", "fd": true}), &many);
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("too many file descriptors"),
        "{r}"
    );
    // No descriptor stays open in the daemon.
    let fds = d.open_fds();
    let _ = d.client().call(&json!({"op": "status"}));
    assert!(d.open_fds() <= fds + 1);
}

#[test]
fn load_by_path_is_for_admins() {
    let d = Daemon::start();
    let up = plugin_path("uppercase");
    let r = d.client().call(&json!({"op": "load", "path": up}));
    ok(&r);
    let r = d
        .client()
        .call(&json!({"op": "load", "path": "/nonexistent.wasm"}));
    assert_eq!(err_code(&r), "not_found");
}

#[test]
fn a_second_uid_cannot_touch_the_first_ones_binaries() {
    let d = Daemon::start();
    let user = TestUser::create("wasmcore-e2e-b");
    let tmp = TempDir::new("uid");
    let module = tmp.write("up.wasm", &std::fs::read(plugin_path("uppercase")).unwrap());
    let m = module.to_str().unwrap();
    // Root's binary.
    let o = d.ctl(&["load", m, "--name", "rootbin"]);
    let root_id = stdout(&o).trim().to_string();
    let as_b = |args: &[&str]| d.ctl_with(args, None, Some(&user));
    // The other UID sees nothing of it, cannot run or unload it.
    let o = as_b(&["--json", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["binaries"], json!([]));
    for args in [
        vec!["execute", &root_id, "--input", "x"],
        vec!["unload", &root_id],
        vec!["info", &root_id],
        vec!["execute", "rootbin"],
    ] {
        let o = as_b(&args);
        assert_eq!(o.status.code(), Some(5), "{args:?}: {}", stderr(&o));
    }
    let o = as_b(&["list", "--all"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    // It loads (by passed fd: the daemon never opens its path) and runs its own.
    let o = as_b(&["load", m, "--name", "rootbin"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let b_id = stdout(&o).trim().to_string();
    let o = as_b(&["execute", "rootbin", "--input", "mine"]);
    assert_eq!(o.stdout, b"MINE");
    // Loading by path is refused for a non-admin, and so is loading a public binary.
    let r = raw_as(&d.socket, &user, &json!({"op": "load", "path": m}));
    assert_eq!(err_code(&r), "forbidden", "{r}");
    let r = raw_as(
        &d.socket,
        &user,
        &json!({"op": "load", "wasm_base64": b64(&std::fs::read(&module).unwrap()), "public": true}),
    );
    assert_eq!(err_code(&r), "forbidden", "{r}");
    let o = as_b(&["--json", "status"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["tenant"]["uid"], json!(user.uid));
    assert_eq!(v["tenant"]["admin"], json!(false));
    // Root (an admin) sees both and may unload the other's.
    let o = d.ctl(&["--json", "list", "--all"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["binaries"].as_array().unwrap().len(), 2);
    assert!(d.ctl(&["unload", &b_id]).status.success());
    assert_eq!(as_b(&["execute", &b_id]).status.code(), Some(5));
}

#[test]
fn dev_mode_binding_is_careful() {
    let d = Daemon::start();
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666);
    // A second daemon refuses to take over a live socket.
    let o = std::process::Command::new(wasmcored())
        .arg("--listen")
        .arg(&d.socket)
        .arg("--state-dir")
        .arg(d.dir.path().join("state2"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already listening"), "{}", stderr(&o));
    ok(&d.client().call(&json!({"op": "status"})));
    // It refuses to replace something that is not a socket.
    let tmp = TempDir::new("bind");
    let file = tmp.write("not-a-socket", b"precious");
    let o = std::process::Command::new(wasmcored())
        .arg("--listen")
        .arg(&file)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a socket"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
}

#[test]
fn sigterm_stops_cleanly_and_removes_the_socket() {
    let mut d = Daemon::start();
    let socket = d.socket.clone();
    assert!(
        std::fs::symlink_metadata(&socket)
            .unwrap()
            .file_type()
            .is_socket()
    );
    let status = d.terminate();
    assert!(status.success(), "{status}");
    assert!(!socket.exists());
}

/// A SIGTERM sent the moment the socket file appears is a clean stop, the socket removed:
/// the daemon installs its signal handlers before it binds. Twenty rounds, because the
/// window this guards (bound, handlers not yet installed) was a few hundred microseconds.
#[test]
fn sigterm_the_moment_the_socket_appears_is_a_clean_stop() {
    for round in 0..20 {
        let tmp = TempDir::new("early-term");
        let path = tmp.path().join("wasm-core.sock");
        let mut child = std::process::Command::new(wasmcored())
            .arg("--listen")
            .arg(&path)
            .arg("--state-dir")
            .arg(tmp.path().join("state"))
            .env_remove("LISTEN_FDS")
            .env_remove("NOTIFY_SOCKET")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while std::fs::symlink_metadata(&path).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "round {round}: no socket"
            );
            std::thread::yield_now();
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "round {round}: {status}");
        assert!(!path.exists(), "round {round}: the socket was left behind");
    }
}

#[test]
fn a_stale_socket_is_replaced() {
    let tmp = TempDir::new("stale");
    let path = tmp.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let mut child = std::process::Command::new(wasmcored())
        .arg("--listen")
        .arg(&path)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while UnixStream::connect(&path).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "daemon did not bind over a stale socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    ok(&Client::connect(&path).call(&json!({"op": "status"})));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    assert!(child.wait().unwrap().success());
}
