//! `wasmcorectl top` in a real terminal (tmux: send-keys and capture-pane) and in batch mode,
//! while a load runs on one binary: the busiest binary comes first and the view updates.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmcore_tests::*;

use crate::ok;

/// Executes `binary` on its own connection until dropped.
struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(d: &Daemon, binary: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut c = d.client();
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(60);
            while !s.load(Ordering::Relaxed) && Instant::now() < end {
                c.call(&json!({"op": "execute", "binary": binary, "input": "x"}));
            }
        });
        Load {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn setup() -> Daemon {
    let d = Daemon::start();
    let mut c = d.client();
    let wasm = wasmcore_proto::encode_base64(&fixture("upper.wat"));
    for name in ["busy", "idle"] {
        ok(&c.call(&json!({"op": "load", "wasm_base64": wasm, "name": name})));
    }
    ok(&c.call(&json!({"op": "execute", "binary": "idle", "input": "x"})));
    d
}

/// The binary names of a view's rows, in order.
fn rows(screen: &str) -> Vec<String> {
    screen
        .lines()
        .skip_while(|l| !l.starts_with("BINARY"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
        .collect()
}

/// A tmux server of this test's own.
struct Tmux(String);

impl Tmux {
    fn new() -> Tmux {
        Tmux(format!("wasmcore-top-{}", std::process::id()))
    }

    fn run(&self, args: &[&str]) -> String {
        let o = Command::new("tmux")
            .arg("-L")
            .arg(&self.0)
            .args(args)
            .output()
            .expect("tmux (Debian's tmux package)");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Run `cmd` in the session `top` on a terminal of `columns` × `lines`.
    fn start(&self, cmd: &str, columns: u16, lines: u16) {
        let (x, y) = (columns.to_string(), lines.to_string());
        self.run(&["new-session", "-d", "-s", "top", "-x", &x, "-y", &y, cmd]);
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }

    fn alive(&self) -> bool {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.0)
            .args(["has-session", "-t", "top"])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

#[test]
fn top_in_a_terminal_shows_the_busiest_binary_first_and_updates() {
    let d = setup();
    let _load = Load::start(&d, "busy");
    let t = Tmux::new();
    let cmd = format!(
        "{} --socket {} top -d 0.3",
        wasmcorectl().display(),
        d.socket.display()
    );
    t.start(&cmd, 150, 30);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut screen = String::new();
    while Instant::now() < deadline {
        screen = t.screen();
        if rows(&screen).len() == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(rows(&screen), vec!["busy", "idle"], "{screen}");
    assert!(screen.contains("q quit"), "{screen}");
    // The view refreshes: the header's rates and uptime move.
    let first = screen.lines().next().unwrap_or_default().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut changed = false;
    while Instant::now() < deadline && !changed {
        std::thread::sleep(Duration::from_millis(300));
        changed = t.screen().lines().next().unwrap_or_default() != first;
    }
    assert!(changed, "the header never changed from {first:?}");
    // `n` sorts by name (busy still first, alphabetically), `q` quits.
    t.run(&["send-keys", "-t", "top", "n"]);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(rows(&t.screen()), vec!["busy", "idle"]);
    t.run(&["send-keys", "-t", "top", "q"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!t.alive(), "top did not quit on q");
}

#[test]
fn top_in_batch_mode_prints_the_same_rows() {
    let d = setup();
    let _load = Load::start(&d, "busy");
    let o = d.ctl(&["top", "-b", "-n", "2", "-d", "0.3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    let views: Vec<&str> = text.split("\n\n\n").collect();
    assert_eq!(text.matches("BINARY").count(), 2, "{text}");
    for v in views.iter().filter(|v| v.contains("BINARY")) {
        assert_eq!(rows(v), vec!["busy", "idle"], "{text}");
    }
    // Not a terminal: plain snapshots without -b too; --json is one object per refresh.
    let o = d.ctl(&["--json", "top", "-n", "2", "-d", "0.3"]);
    let lines: Vec<Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for v in &lines {
        assert_eq!(v["binaries"][0]["name"], json!("busy"), "{v}");
        assert!(v["binaries"][0]["executions_per_second"].as_f64().unwrap() > 0.0);
        assert_eq!(v["binaries"][1]["executions_per_second"], json!(0.0));
    }
    let o = d.ctl(&["top", "-d", "0"]);
    assert_eq!(o.status.code(), Some(2), "a zero delay is a usage error");
}

#[test]
fn progress_lines_never_reach_a_pipe() {
    let d = Daemon::start();
    let o = d.ctl(&[
        "load",
        plugin_path("greet").to_str().unwrap(),
        "--name",
        "g",
    ]);
    assert!(o.status.success());
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8(o.stdout).unwrap();
    assert_eq!(out.lines().count(), 1, "{out:?}");
    let up = d.ctl(&[
        "load",
        plugin_path("uppercase").to_str().unwrap(),
        "--name",
        "up",
    ]);
    assert!(up.status.success());
    let o = d.ctl(&[
        "bench",
        "--binary",
        "up",
        "--only",
        "ping1",
        "--duration-ms",
        "50",
        "--rounds",
        "1",
        "--executions",
        "0",
        "--copies",
        "0",
        "--rotate",
        "0",
        "--tenants",
        "0",
    ]);
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// On a terminal, `execute` ends an output that lacks a newline with one (the prompt starts
/// on its own line); into a pipe the bytes stay exact.
#[test]
fn execute_on_a_terminal_ends_its_output_with_a_newline() {
    let d = setup();
    let t = Tmux::new();
    let cmd = format!(
        "{} --socket {} execute busy --input hi; printf 'END'; sleep 30",
        wasmcorectl().display(),
        d.socket.display()
    );
    t.start(&cmd, 80, 10);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut screen = String::new();
    while Instant::now() < deadline && !screen.contains("END") {
        std::thread::sleep(Duration::from_millis(100));
        screen = t.screen();
    }
    assert_eq!(
        screen.lines().take(2).collect::<Vec<_>>(),
        ["HI", "END"],
        "{screen}"
    );
    assert_eq!(
        d.ctl(&["execute", "busy", "--input", "hi"]).stdout,
        b"HI",
        "a pipe gets the output as it is"
    );
}
