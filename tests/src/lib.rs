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
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Daemon {
        let dir = TempDir::new("daemon");
        let socket = dir.path().join("wasm-core.sock");
        let child = Command::new(wasmcored())
            .arg("--listen")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(extra)
            .env_remove("LISTEN_FDS")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting {}: {e} (build the workspace first)",
                    wasmcored().display()
                )
            });
        let mut d = Daemon { child, socket, dir };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "wasmcored exited early with {status}: {}",
                    self.stderr_now()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("wasmcored did not come up on {}", self.socket.display());
    }

    fn stderr_now(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(e) = self.child.stderr.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
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

    /// Run `wasmcorectl` with optional stdin bytes, optionally as another user (uid, gid).
    pub fn ctl_with(
        &self,
        args: &[&str],
        stdin: Option<&[u8]>,
        user: Option<(u32, u32)>,
    ) -> Output {
        let mut cmd = match user {
            None => Command::new(wasmcorectl()),
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg(wasmcorectl());
                c
            }
        };
        cmd.arg("--socket").arg(&self.socket).args(args);
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

/// A system user created for a test and deleted on drop.
#[derive(Debug)]
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl TestUser {
    /// Create `name` (root only). Fails the test if it cannot: the access tests need real UIDs.
    pub fn create(name: &str) -> TestUser {
        assert!(
            nix::unistd::getuid().is_root(),
            "the multi-user tests create real users and must run as root"
        );
        let _ = Command::new("userdel").arg(name).output();
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--user-group",
                name,
            ])
            .output()
            .expect("run useradd");
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
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        }
    }

    pub fn ids(&self) -> (u32, u32) {
        (self.uid, self.gid)
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).output();
    }
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
