//! Support for the end-to-end tests: start the real `wasmcored` on a temporary socket and
//! state directory, talk to it over a raw socket or through the real `wasmcorectl`, and run
//! clients as other real UIDs.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod docs;
pub mod examples;

/// Directory holding the built binaries (next to this test executable's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

pub fn wasmcored() -> PathBuf {
    bin_dir().join("wasmcored")
}

pub fn wasmcorectl() -> PathBuf {
    bin_dir().join("wasmcorectl")
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A `.wat` fixture of the engine tests, as wasm bytes.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = repo().join("wasmcored/tests/fixtures").join(name);
    wat::parse_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A built example plugin.
pub fn plugin_path(name: &str) -> PathBuf {
    let p = repo().join("plugins/dist").join(format!("{name}.wasm"));
    assert!(
        p.exists(),
        "{} is missing: build the plugins first (make plugins)",
        p.display()
    );
    p
}

/// A fresh world-readable temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "wasmcore-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
            .expect("chmod temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Write a file readable by everyone.
    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).expect("write temp file");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))
            .expect("chmod temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `wasmcored` in dev mode; killed (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: TempDir,
    /// Extra arguments, used again by restarts.
    pub args: Vec<String>,
    /// The daemon program (`wasmcored`, or the test build with the escape probe).
    pub program: PathBuf,
}

/// The test build of the daemon with the escape probe (`make test` builds it; never
/// installed): host calls that try what an escaped guest would.
pub fn wasmcored_escape_probe() -> PathBuf {
    bin_dir().join("wasmcored-escape-probe")
}

/// Spawn `wasmcored` on `socket` with state in `dir/state`, logging (appended) to
/// `dir/daemon.log`: a pipe nobody reads would block the daemon when full.
fn spawn_daemon(program: &Path, dir: &Path, socket: &Path, args: &[String]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("daemon.log"))
        .expect("log file");
    Command::new(program)
        .arg("--listen")
        .arg(socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        // Never the host's provisioning files: a test that does not name a directory of its
        // own gets DIR/binaries.d.
        .args(
            (!args.iter().any(|a| a == "--provisioning-dir"))
                .then(|| ["--provisioning-dir".into(), dir.join("binaries.d")])
                .into_iter()
                .flatten(),
        )
        .args(args)
        .env_remove("LISTEN_FDS")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "starting {}: {e} (build the workspace first: make test builds everything)",
                program.display()
            )
        })
}

/// Run `wasmcored` with `args` until it exits; for start-up failures.
pub fn wasmcored_output(args: &[&str]) -> Output {
    Command::new(wasmcored())
        .args(args)
        .env_remove("LISTEN_FDS")
        .env_remove("NOTIFY_SOCKET")
        .output()
        .expect("run wasmcored")
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Daemon {
        Daemon::start_in(TempDir::new("daemon"), extra)
    }

    /// Start with `config` as its config file (`--config DIR/config.toml`).
    pub fn start_config(config: &str, extra: &[&str]) -> Daemon {
        let dir = TempDir::new("daemon");
        let path = dir.write("config.toml", config.as_bytes());
        let mut args = vec!["--config", path.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        Daemon::start_in(dir, &args)
    }

    /// Start `program` (a test build of the daemon) with `config` as its config file.
    pub fn start_program(program: PathBuf, config: &str) -> Daemon {
        let dir = TempDir::new("daemon");
        let path = dir.write("config.toml", config.as_bytes());
        Daemon::start_program_in(program, dir, &["--config", path.to_str().expect("utf-8")])
    }

    fn start_in(dir: TempDir, extra: &[&str]) -> Daemon {
        Daemon::start_program_in(wasmcored(), dir, extra)
    }

    fn start_program_in(program: PathBuf, dir: TempDir, extra: &[&str]) -> Daemon {
        let socket = dir.path().join("wasm-core.sock");
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let child = spawn_daemon(&program, dir.path(), &socket, &args);
        let mut d = Daemon {
            child,
            socket,
            dir,
            args,
            program,
        };
        d.wait_ready();
        d
    }

    /// The state directory the daemon uses.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Stop (SIGTERM) and start again on the same socket and state directory.
    pub fn restart(&mut self) {
        let status = self.terminate();
        assert!(
            status.success(),
            "wasmcored exited with {status}: {}",
            self.log()
        );
        self.start_again();
    }

    /// `kill -9`: no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start a new process after the previous one ended.
    pub fn start_again(&mut self) {
        self.child = spawn_daemon(&self.program, self.dir.path(), &self.socket, &self.args);
        self.wait_ready();
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Send a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig).expect("kill");
    }

    /// Wait for the daemon to exit by itself, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn wait_ready(&mut self) {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("wasmcored exited early with {status}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("wasmcored did not come up on {}", self.socket.display());
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket)
    }

    /// Run `wasmcorectl --socket <this daemon> args…`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_with(args, None, None)
    }

    /// Run `wasmcorectl` with optional stdin bytes, optionally as another user.
    pub fn ctl_with(&self, args: &[&str], stdin: Option<&[u8]>, user: Option<&RunAs>) -> Output {
        ctl_at(&self.socket, args, stdin, user)
    }
}

impl Daemon {
    /// Open file descriptors of the daemon process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Send SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.child.wait().expect("wait for wasmcored")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run `wasmcorectl --socket SOCKET args…`, optionally as `user`.
pub fn ctl_at(socket: &Path, args: &[&str], stdin: Option<&[u8]>, user: Option<&RunAs>) -> Output {
    let mut cmd = match user {
        None => Command::new(wasmcorectl()),
        Some(u) => {
            let mut c = u.command();
            c.arg(wasmcorectl());
            c
        }
    };
    cmd.arg("--socket").arg(socket).args(args);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn wasmcorectl");
    {
        let mut input = child.stdin.take().expect("stdin");
        if let Some(bytes) = stdin {
            input.write_all(bytes).expect("write stdin");
        }
    }
    child.wait_with_output().expect("wait wasmcorectl")
}

/// A raw protocol client.
#[derive(Debug)]
pub struct Client {
    pub stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        Client { stream, reader }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    pub fn send(&mut self, v: &Value) {
        let mut line = serde_json::to_vec(v).expect("json");
        line.push(b'\n');
        self.send_raw(&line);
    }

    /// Read one response line; `None` at end of stream.
    pub fn recv_line(&mut self) -> Option<Vec<u8>> {
        let mut buf = Vec::new();
        match self.reader.read_until(b'\n', &mut buf) {
            Ok(0) => None,
            Ok(_) => Some(buf),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("recv: {e}"),
        }
    }

    pub fn recv(&mut self) -> Value {
        let line = self.recv_line().expect("a response line");
        serde_json::from_slice(&line)
            .unwrap_or_else(|e| panic!("bad response {:?}: {e}", String::from_utf8_lossy(&line)))
    }

    pub fn call(&mut self, v: &Value) -> Value {
        self.send(v);
        self.recv()
    }
}

/// An identity to run a client as: uid, primary gid and exactly these supplementary groups.
#[derive(Debug, Clone)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl RunAs {
    /// `setpriv` prepared to run a program as this identity.
    pub fn command(&self) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid));
        if self.groups.is_empty() {
            c.arg("--clear-groups");
        } else {
            let g: Vec<String> = self.groups.iter().map(u32::to_string).collect();
            c.arg(format!("--groups={}", g.join(",")));
        }
        c
    }
}

/// A system user created for a test and deleted on drop; derefs to its [`RunAs`].
#[derive(Debug)]
pub struct TestUser {
    pub name: String,
    who: RunAs,
}

impl std::ops::Deref for TestUser {
    type Target = RunAs;
    fn deref(&self) -> &RunAs {
        &self.who
    }
}

impl std::ops::DerefMut for TestUser {
    fn deref_mut(&mut self) -> &mut RunAs {
        &mut self.who
    }
}

/// Run `useradd`, `userdel`, `groupadd` or `groupdel`. Tests running side by side take
/// turns at /etc/passwd and /etc/group: the tools fail on a lock held rather than wait for
/// it, so a failure that names a lock is tried again (for up to 5 s).
fn account_tool(tool: &str, args: &[&str]) -> Output {
    let mut tries = 0;
    loop {
        let out = Command::new(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"));
        tries += 1;
        if out.status.success()
            || tries == 50
            || !String::from_utf8_lossy(&out.stderr).contains("lock")
        {
            return out;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

impl TestUser {
    /// Create `name` (root only). Fails the test if it cannot: the access tests need real UIDs.
    pub fn create(name: &str) -> TestUser {
        assert!(
            nix::unistd::getuid().is_root(),
            "the multi-user tests create real users and must run as root"
        );
        account_tool("userdel", &[name]);
        let out = account_tool(
            "useradd",
            &[
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--user-group",
                name,
            ],
        );
        assert!(
            out.status.success(),
            "useradd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let u = nix::unistd::User::from_name(name)
            .expect("lookup")
            .expect("user exists");
        TestUser {
            name: name.to_string(),
            who: RunAs {
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
                groups: Vec::new(),
            },
        }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        account_tool("userdel", &[&self.name]);
    }
}

/// A system group created for a test and deleted on drop.
#[derive(Debug)]
pub struct TestGroup {
    pub name: String,
    pub gid: u32,
}

impl TestGroup {
    pub fn create(name: &str) -> TestGroup {
        assert!(
            nix::unistd::getuid().is_root(),
            "creating groups needs root"
        );
        account_tool("groupdel", &[name]);
        let out = account_tool("groupadd", &["--system", name]);
        assert!(
            out.status.success(),
            "groupadd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let g = nix::unistd::Group::from_name(name)
            .expect("lookup")
            .expect("group exists");
        TestGroup {
            name: name.to_string(),
            gid: g.gid.as_raw(),
        }
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        account_tool("groupdel", &[&self.name]);
    }
}

/// One request over a raw socket from a process running as `user` (Debian's python3, so
/// the client is not this test process).
pub fn raw_as(socket: &Path, user: &RunAs, req: &Value) -> Value {
    let script = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\ns.sendall(sys.argv[2].encode()+b'\\n')\nsys.stdout.write(s.makefile().readline())";
    let o = user
        .command()
        .args(["/usr/bin/python3", "-c", script])
        .arg(socket)
        .arg(req.to_string())
        .output()
        .expect("run python3 as the test user");
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stderr)))
}

/// stdout of a command as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr of a command as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Standard base64.
pub fn b64(bytes: &[u8]) -> String {
    wasmcore_proto::encode_base64(bytes)
}
