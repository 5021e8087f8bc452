//! The client libraries against a real daemon: the Rust crate (blocking and Tokio, in this
//! process and as an unprivileged user) and the Python package's pytest suite, run as a
//! real user beside another user's binary and a socket squatted by a third.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use wasmcore_client::{AsyncClient, Client, Error, ErrorCode, ExecOptions, LoadOptions};
use wasmcore_tests::{
    Daemon, RunAs, TempDir, TestUser, bin_dir, fixture, plugin_path, repo, stderr, stdout,
};

/// A socket in `dir` bound by `user`, who records how many bytes a client sent.
struct Squatter {
    child: Child,
    socket: PathBuf,
    count: PathBuf,
}

impl Squatter {
    fn start(user: &TestUser, tmp: &TempDir) -> Squatter {
        let dir = tmp.path().join("squat");
        std::fs::create_dir(&dir).unwrap();
        nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(user.uid)), None).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let socket = dir.join("wasm-core.sock");
        let count = dir.join("received");
        let script = "import os,socket,sys\n\
            s=socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\nos.chmod(sys.argv[1],0o777)\ns.listen()\n\
            s.settimeout(60)\n\
            while True:\n  c,_=s.accept()\n  c.settimeout(5)\n  n=0\n  try:\n    while True:\n      d=c.recv(65536)\n      if not d: break\n      n+=len(d)\n  except OSError: pass\n  open(sys.argv[2],'a').write('%d\\n'%n)\n";
        let child = user
            .command()
            .args(["/usr/bin/python3", "-c", script])
            .arg(&socket)
            .arg(&count)
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !socket.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the squatter did not bind"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Squatter {
            child,
            socket,
            count,
        }
    }

    /// Bytes received by each connection so far (waits for `n` connections to end).
    fn received(&self, n: usize) -> Vec<u64> {
        let t = Instant::now();
        loop {
            let text = std::fs::read_to_string(&self.count).unwrap_or_default();
            let v: Vec<u64> = text.lines().map(|l| l.parse().unwrap()).collect();
            if v.len() >= n || t.elapsed() > Duration::from_secs(10) {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn example(name: &str) -> PathBuf {
    let p = bin_dir().join("examples").join(name);
    assert!(
        p.exists(),
        "{} is missing: cargo build --release --workspace --all-targets",
        p.display()
    );
    p
}

fn run_example(user: &RunAs, socket: &Path, name: &str, args: &[&str]) -> std::process::Output {
    user.command()
        .arg(example(name))
        .args(args)
        .env("WASM_CORE_SOCKET", socket)
        .output()
        .unwrap()
}

#[test]
fn rust_client_blocking_and_async_as_an_unprivileged_user() {
    let d = Daemon::start();
    let alice = TestUser::create("wasmcore-e2e-rcli");
    let squatter_user = TestUser::create("wasmcore-e2e-rsq");
    let up = plugin_path("uppercase");
    let up = up.to_str().unwrap();
    for name in ["blocking", "tokio"] {
        let o = run_example(&alice, &d.socket, name, &[up]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let out = stdout(&o);
        assert!(out.contains("loaded ") && out.contains("(process"), "{out}");
        assert!(out.contains("execute: \"HELLO FROM"), "{out}");
        assert!(out.contains(": \"CHAINED\""), "{out}");
    }
    assert!(
        stdout(&run_example(&alice, &d.socket, "blocking", &[up])).contains("unloaded: not_found")
    );
    // Every binary was unloaded by the examples.
    assert_eq!(
        Client::connect_to(&d.socket).unwrap().list(true).unwrap(),
        vec![]
    );

    // A socket squatted by another user: refused before a byte is sent.
    let tmp = TempDir::new("rust-squat");
    let sq = Squatter::start(&squatter_user, &tmp);
    for name in ["blocking", "tokio"] {
        let o = run_example(&alice, &sq.socket, name, &[up]);
        assert!(!o.status.success());
        assert!(
            stderr(&o).contains("refusing to talk"),
            "{name}: {}",
            stderr(&o)
        );
        assert!(
            stderr(&o).contains(&format!("uid {}", squatter_user.uid)),
            "{}",
            stderr(&o)
        );
    }
    assert_eq!(
        sq.received(2),
        vec![0, 0],
        "a client sent bytes to the squatter"
    );
}

#[test]
fn rust_client_calls_errors_and_pipelining() {
    let d = Daemon::start();
    let tmp = TempDir::new("rust-client");
    let mut c = Client::connect_to(&d.socket).unwrap();
    assert_eq!(c.server_pid(), Some(d.pid() as i32));

    let up = c
        .load_file(plugin_path("uppercase"), &LoadOptions::new().name("up"))
        .unwrap();
    assert_eq!(up.kind, wasmcore_client::ModuleKind::Process);
    assert_eq!(c.execute("up", b"abc").unwrap().bytes, b"ABC");
    // Bytes that are not UTF-8 go as base64 both ways.
    let data: Vec<u8> = (0..=255).collect();
    assert_eq!(
        c.execute("up", &data).unwrap().bytes,
        data.to_ascii_uppercase()
    );
    let chained = c.chain(&["up", &up.binary], b"x").unwrap();
    assert_eq!(
        (chained.bytes.as_slice(), chained.stages.len()),
        (&b"X"[..], 2)
    );
    // OWNER/NAME, OWNER a uid or a user name.
    let me = nix::unistd::getuid().as_raw();
    assert_eq!(c.execute(&format!("{me}/up"), b"q").unwrap().bytes, b"Q");
    assert_eq!(c.info("root/up").unwrap().info.binary, up.binary);

    // From an open descriptor; a pipe is refused with the daemon's reason.
    let file = std::fs::File::open(plugin_path("uppercase")).unwrap();
    let piped = c
        .load_fd(
            std::os::fd::AsFd::as_fd(&file),
            &LoadOptions::new().name("piped"),
        )
        .unwrap();
    let (r, _w) = nix::unistd::pipe().unwrap();
    let e = c
        .load_fd(std::os::fd::AsFd::as_fd(&r), &LoadOptions::new())
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{e}");
    assert_eq!(piped.sha256, up.sha256);

    // Typed errors with the wire code and details.
    let e = c.execute("nope", b"").unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");
    let e = c
        .load_bytes(b"\0asm\x01\0\0\0junk", &LoadOptions::new())
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidModule), "{e}");
    let e = c
        .load_bytes(
            &std::fs::read(plugin_path("uppercase")).unwrap(),
            &LoadOptions::new().name("up"),
        )
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::AlreadyExists), "{e}");
    // A new version of the name, then back.
    let wc = std::fs::read(plugin_path("wc")).unwrap();
    let v2 = c
        .load_bytes(&wc, &LoadOptions::new().name("up").replace(true))
        .unwrap();
    assert_eq!(v2.replaced.as_deref(), Some(up.binary.as_str()));
    let kept = c.versions("up").unwrap();
    assert_eq!(
        kept.versions
            .iter()
            .map(|v| (v.binary.as_str(), v.current))
            .collect::<Vec<_>>(),
        [(up.binary.as_str(), false), (v2.binary.as_str(), true)]
    );
    let back = c.rollback("up").unwrap();
    assert_eq!((back.binary, back.previous), (up.binary.clone(), v2.binary));
    assert_eq!(c.execute("up", b"abc").unwrap().bytes, b"ABC");
    let e = c
        .load_file(tmp.path().join("missing.wasm"), &LoadOptions::new())
        .unwrap_err();
    assert!(matches!(e, Error::File { .. }), "{e}");
    let trap = c
        .load_bytes(&fixture("trap.wat"), &LoadOptions::new().name("trap"))
        .unwrap();
    let e = c.chain(&["up", "trap"], b"x").unwrap_err();
    let body = e.server_error().expect("a server error");
    assert_eq!((body.code, body.stage), (ErrorCode::Trap, Some(1)));
    assert!(!body.backtrace.is_empty(), "{body:?}");
    c.load_bytes(&fixture("loop.wat"), &LoadOptions::new().name("loop"))
        .unwrap();
    let opts = ExecOptions::new().timeout(Duration::from_millis(50));
    assert_eq!(
        c.execute_with("loop", b"", &opts).unwrap_err().code(),
        Some(ErrorCode::Timeout)
    );

    // Pipelined, in order; a batch over the inline size is written from a second thread.
    let inputs: Vec<String> = (0..5000).map(|i| format!("input {i}")).collect();
    let results = c.execute_many("up", &inputs, &ExecOptions::new()).unwrap();
    assert_eq!(results.len(), inputs.len());
    for (r, i) in results.iter().zip(&inputs) {
        assert_eq!(r.as_ref().unwrap().bytes, i.to_uppercase().as_bytes());
    }
    let mixed = c
        .execute_many(&trap.binary, ["a", "b"], &ExecOptions::new())
        .unwrap();
    assert!(
        mixed
            .iter()
            .all(|r| r.as_ref().unwrap_err().code() == Some(ErrorCode::Trap))
    );
    assert!(
        c.execute_many("up", Vec::<&[u8]>::new(), &ExecOptions::new())
            .unwrap()
            .is_empty()
    );

    let info = c.info("up").unwrap();
    assert_eq!(info.info.binary, up.binary);
    let status = c.status().unwrap();
    assert_eq!((status.tenant.uid, status.protocol), (0, 1));
    assert!(c.metrics().unwrap().tenants.iter().any(|t| t.uid == 0));
    // Four binaries and the superseded version of `up`.
    let listed = c.list(false).unwrap();
    assert_eq!(listed.len(), 5);
    assert_eq!(listed.iter().filter(|b| b.superseded).count(), 1);

    // A client timeout: the connection is given up, later calls say so.
    let mut slow = Client::connect_to(&d.socket).unwrap();
    slow.set_timeout(Some(Duration::from_millis(200))).unwrap();
    let t = Instant::now();
    let opts = ExecOptions::new().timeout(Duration::from_secs(3));
    assert!(matches!(
        slow.execute_with("loop", b"", &opts),
        Err(Error::TimedOut)
    ));
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(matches!(slow.status(), Err(Error::Closed)));

    // No daemon.
    let e = Client::connect_to(tmp.path().join("none.sock")).unwrap_err();
    assert!(
        e.is_unavailable() && e.to_string().contains("is the daemon running"),
        "{e}"
    );

    for b in ["up", "piped", "trap", "loop"] {
        c.unload(b).unwrap();
    }
    assert_eq!(
        c.execute("up", b"").unwrap_err().code(),
        Some(ErrorCode::NotFound)
    );
}

#[test]
fn async_client_calls_errors_and_pipelining() {
    let d = Daemon::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = AsyncClient::connect_to(&d.socket).await.unwrap();
        c.load_file(plugin_path("uppercase"), &LoadOptions::new().name("up"))
            .await
            .unwrap();
        c.load_file(
            plugin_path("greet"),
            &LoadOptions::new().name("greet").config("greeting", "Hi"),
        )
        .await
        .unwrap();
        let greet = ExecOptions::new().function("greet");
        assert_eq!(
            c.execute_with("greet", b"Ann", &greet).await.unwrap().bytes,
            b"Hi, Ann!"
        );
        let config = [("greeting".to_string(), "Howdy".to_string())].into();
        c.configure("greet", config).await.unwrap();
        let out = c.chain(&["up", "greet:greet"], b"ann").await.unwrap();
        assert_eq!(out.text(), Some("Howdy, ANN!"));
        let e = c
            .execute_with("greet", b"x", &ExecOptions::new().function("fail"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::PluginError), "{e}");

        let inputs: Vec<Vec<u8>> = (0..5000).map(|i| format!("in {i}").into_bytes()).collect();
        let results = c
            .execute_many("up", &inputs, &ExecOptions::new())
            .await
            .unwrap();
        for (r, i) in results.iter().zip(&inputs) {
            assert_eq!(r.as_ref().unwrap().bytes, i.to_ascii_uppercase());
        }
        assert_eq!(c.list(false).await.unwrap().len(), 2);
        assert_eq!(c.info("greet").await.unwrap().functions.len(), 5);

        c.load_bytes(&fixture("loop.wat"), &LoadOptions::new().name("loop"))
            .await
            .unwrap();
        c.set_timeout(Some(Duration::from_millis(200)));
        let opts = ExecOptions::new().timeout(Duration::from_secs(3));
        assert!(matches!(
            c.execute_with("loop", b"", &opts).await,
            Err(Error::TimedOut)
        ));
        assert!(matches!(c.status().await, Err(Error::Closed)));

        let mut c = AsyncClient::connect_to(&d.socket).await.unwrap();
        for b in ["up", "greet", "loop"] {
            c.unload(b).await.unwrap();
        }
        assert!(c.list(false).await.unwrap().is_empty());
    });
}

#[test]
fn python_package_tests_as_an_unprivileged_user() {
    let d = Daemon::start();
    let alice = TestUser::create("wasmcore-e2e-pycli");
    let bob = TestUser::create("wasmcore-e2e-pybob");
    let squatter_user = TestUser::create("wasmcore-e2e-pysq");
    let tmp = TempDir::new("python-client");
    for f in ["trap", "loop"] {
        tmp.write(&format!("{f}.wasm"), &fixture(&format!("{f}.wat")));
    }
    // Bob's private binary, which alice must not see.
    let o = d.ctl_with(
        &[
            "load",
            plugin_path("uppercase").to_str().unwrap(),
            "--name",
            "bobs",
        ],
        None,
        Some(&bob),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let foreign = stdout(&o).trim().to_string();
    let sq = Squatter::start(&squatter_user, &tmp);

    let python = repo().join("clients/python");
    // pytest's temporary files in this test's directory, not /tmp/pytest-of-USER: that one
    // outlives the user, and a later user of the same name but another uid is refused it.
    let basetemp = tmp.path().join("pytest");
    std::fs::create_dir(&basetemp).unwrap();
    nix::unistd::chown(
        &basetemp,
        Some(nix::unistd::Uid::from_raw(alice.uid)),
        Some(nix::unistd::Gid::from_raw(alice.gid)),
    )
    .unwrap();
    let o = alice
        .command()
        .args([
            "/usr/bin/python3",
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
        ])
        .arg(format!("--basetemp={}", basetemp.join("run").display()))
        .arg(python.join("tests"))
        .current_dir(tmp.path())
        .env("PYTHONPATH", python.join("src"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("WASMCORE_TEST_SOCKET", &d.socket)
        .env("WASMCORE_TEST_PLUGINS", repo().join("plugins/dist"))
        .env("WASMCORE_TEST_FIXTURES", tmp.path())
        .env("WASMCORE_TEST_FOREIGN", &foreign)
        .env("WASMCORE_TEST_SQUATTED", &sq.socket)
        .output()
        .expect("run pytest (Debian's python3-pytest)");
    let out = format!("{}{}", stdout(&o), stderr(&o));
    assert!(o.status.success(), "{out}");
    assert!(out.contains(" passed") && !out.contains("skipped"), "{out}");
    assert_eq!(
        sq.received(1),
        vec![0],
        "the Python client sent bytes to the squatter"
    );
    // Bob's binary is untouched, and alice left nothing behind.
    let mut c = Client::connect_to(&d.socket).unwrap();
    let all = c.list(true).unwrap();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].binary, foreign);
}
