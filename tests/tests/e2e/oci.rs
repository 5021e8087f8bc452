//! OCI registries: `wasmcorectl push` publishes a module, an Extism plugin and a component in
//! the CNCF Wasm artifact layout (checked field by field, and read by `skopeo inspect`), and
//! `wasmcorectl load oci://…` loads them back byte for byte with their reference and digest;
//! a tampered layer, a missing tag and an unreachable registry get clear errors. The registry
//! is Debian's `docker-registry` (the distribution v2 registry) on 127.0.0.1.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use wasmcore_tests::*;

use crate::ok;

/// A registry on a free port of 127.0.0.1, its storage in a temporary directory; stopped on
/// drop.
struct Registry {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl Registry {
    fn start() -> Registry {
        Registry::start_with_users(None)
    }

    /// With `users`, every request needs one of them (HTTP basic authentication).
    fn start_with_users(users: Option<&[(&str, &str)]>) -> Registry {
        let dir = TempDir::new("registry");
        let mut auth = String::new();
        if let Some(users) = users {
            let mut lines = Vec::new();
            for (user, password) in users {
                let o = Command::new("htpasswd")
                    .args(["-Bbn", user, password])
                    .output()
                    .expect("run htpasswd (Debian's apache2-utils; make test installs it)");
                assert!(o.status.success(), "htpasswd: {}", stderr(&o));
                lines.push(stdout(&o).trim().to_string());
            }
            let path = dir.write("htpasswd", (lines.join("\n") + "\n").as_bytes());
            auth = format!(
                "auth:\n  htpasswd:\n    realm: wasm-core-tests\n    path: {}\n",
                path.display()
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
            dir.path().join("data").display()
        );
        let path = dir.write("config.yml", config.as_bytes());
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "run docker-registry (Debian's docker-registry package; make test installs it)",
            );
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry { child, port, dir }
    }

    fn reference(&self, repo: &str) -> String {
        format!("oci://127.0.0.1:{}/{repo}", self.port)
    }

    /// `skopeo inspect --raw` (the manifest), or with `--config` the config blob.
    fn inspect(&self, repo: &str, config: bool) -> Value {
        let mut c = Command::new("skopeo");
        c.args(["inspect", "--tls-verify=false", "--raw"]);
        if config {
            c.arg("--config");
        }
        let o = c
            .arg(format!("docker://127.0.0.1:{}/{repo}", self.port))
            .output()
            .expect("run skopeo");
        assert!(o.status.success(), "skopeo inspect: {}", stderr(&o));
        serde_json::from_slice(&o.stdout).expect("skopeo prints JSON")
    }

    /// The file a blob is stored in.
    fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn json_out(o: &Output) -> Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

#[test]
fn push_then_load_round_trips_a_module_a_plugin_and_a_component() {
    let reg = Registry::start();
    let d = Daemon::start();
    // (plugin, os, input, output)
    let cases = [
        ("uppercase", "wasip1", "abc", "ABC"),
        ("count_vowels", "wasip1", "aeb", r#"{"count":2}"#),
        ("sort", "wasip2", "b\na\n", "a\nb\n"),
    ];
    for (plugin, os, input, output) in cases {
        let path = plugin_path(plugin);
        let bytes = std::fs::read(&path).unwrap();
        let layer = format!("sha256:{}", sha256(&bytes));
        let tagged = reg.reference(&format!("team/{plugin}:1.0"));
        let pushed = json_out(&d.ctl(&["--json", "push", path.to_str().unwrap(), &tagged]));
        assert_eq!(pushed["layer_digest"], json!(layer));
        assert_eq!(pushed["os"], json!(os));
        let digest = pushed["digest"].as_str().unwrap().to_string();
        assert_eq!(
            pushed["pinned"],
            json!(reg.reference(&format!("team/{plugin}@{digest}")))
        );
        // The manifest and its config, as the CNCF Wasm artifact layout has them.
        let repo = format!("team/{plugin}:1.0");
        let m = reg.inspect(&repo, false);
        assert_eq!(m["schemaVersion"], json!(2), "{m}");
        assert_eq!(
            m["mediaType"],
            json!("application/vnd.oci.image.manifest.v1+json")
        );
        assert_eq!(
            m["config"]["mediaType"],
            json!("application/vnd.wasm.config.v0+json")
        );
        let layers = m["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1, "{m}");
        assert_eq!(layers[0]["mediaType"], json!("application/wasm"));
        assert_eq!(layers[0]["digest"], json!(layer));
        assert_eq!(layers[0]["size"], json!(bytes.len()));
        let config = reg.inspect(&repo, true);
        assert_eq!(config["architecture"], json!("wasm"), "{config}");
        assert_eq!(config["os"], json!(os));
        assert_eq!(config["layerDigests"], json!([layer]));
        assert!(config["created"].is_string(), "{config}");
        if os == "wasip2" {
            let component = &config["component"];
            assert!(
                component["exports"]
                    .as_array()
                    .unwrap()
                    .contains(&json!("wasi:cli/run@0.2.0")),
                "{config}"
            );
            assert!(
                component["imports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|i| i.as_str().unwrap().starts_with("wasi:cli/stdout")),
                "{config}"
            );
        } else {
            assert!(config["component"].is_null(), "{config}");
        }
        // Loaded back: the same bytes (sha256), with where they came from.
        let o = d.ctl(&["load", &tagged, "--name", plugin]);
        assert!(o.status.success(), "{}", stderr(&o));
        let info = d.client().call(&json!({"op": "info", "binary": plugin}));
        assert_eq!(ok(&info)["sha256"], json!(sha256(&bytes)), "byte for byte");
        assert_eq!(
            info["source"],
            json!({"reference": tagged, "digest": digest})
        );
        let r = d
            .client()
            .call(&json!({"op": "execute", "binary": plugin, "input": input}));
        assert_eq!(ok(&r)["output"], json!(output));
        // Pinned by digest, the same bytes: a replace that changes nothing.
        let o = d.ctl(&[
            "--json",
            "load",
            pushed["pinned"].as_str().unwrap(),
            "--name",
            plugin,
            "--replace",
        ]);
        assert_eq!(json_out(&o)["unchanged"], json!(true));
    }
}

#[test]
fn a_tampered_layer_a_missing_tag_and_an_unreachable_registry_are_refused_clearly() {
    let reg = Registry::start();
    let d = Daemon::start();
    let path = plugin_path("uppercase");
    let bytes = std::fs::read(&path).unwrap();
    let tagged = reg.reference("team/up:1");
    json_out(&d.ctl(&["--json", "push", path.to_str().unwrap(), &tagged]));
    // A missing tag and repository.
    let o = d.ctl(&["load", &reg.reference("team/up:2")]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("team/up:2: not in the registry"),
        "{}",
        stderr(&o)
    );
    let o = d.ctl(&["load", &reg.reference("team/none:1")]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    // Nothing listens on port 1.
    let o = d.ctl(&["load", "oci://127.0.0.1:1/team/up:1"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot reach the registry 127.0.0.1:1"),
        "{}",
        stderr(&o)
    );
    // A reference without a registry would mean Docker Hub: refused.
    let o = d.ctl(&["load", "oci://team/up:1"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    // The registry serves other bytes than the manifest names.
    let layer = format!("sha256:{}", sha256(&bytes));
    let blob = reg.blob_path(&layer);
    let mut tampered = std::fs::read(&blob).unwrap();
    assert_eq!(tampered, bytes);
    let last = tampered.len() - 1;
    tampered[last] ^= 0xff;
    std::fs::write(&blob, &tampered).unwrap();
    let o = d.ctl(&["load", &tagged, "--name", "up"]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&layer),
        "names the digest: {}",
        stderr(&o)
    );
    let list = d.client().call(&json!({"op": "list"}));
    assert_eq!(ok(&list)["binaries"], json!([]), "nothing loaded");
    // Credentials the user points to must be readable.
    let o = ctl_at_env(&d, &["load", &tagged], "/nonexistent/auth.json");
    assert_eq!(o.status.code(), Some(9), "{}", stderr(&o));
    assert!(stderr(&o).contains("REGISTRY_AUTH_FILE"), "{}", stderr(&o));
}

fn ctl_at_env(d: &Daemon, args: &[&str], auth_file: &str) -> Output {
    Command::new(wasmcorectl())
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .env("REGISTRY_AUTH_FILE", auth_file)
        .output()
        .expect("run wasmcorectl")
}

#[test]
fn credentials_are_the_calling_users_own() {
    let reg = Registry::start_with_users(Some(&[("alice", "s3cret")]));
    let d = Daemon::start();
    let path = plugin_path("uppercase");
    let tagged = reg.reference("team/up:1");
    let auth = |password: &str| {
        let token = b64(format!("alice:{password}").as_bytes());
        let registry = format!("127.0.0.1:{}", reg.port);
        json!({"auths": {registry: {"auth": token}}}).to_string()
    };
    // No credentials, and wrong ones: refused, with where to put them.
    let o = d.ctl(&["push", path.to_str().unwrap(), &tagged]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("REGISTRY_AUTH_FILE"), "{}", stderr(&o));
    let wrong = reg.dir.write("wrong.json", auth("nope").as_bytes());
    let o = ctl_at_env(
        &d,
        &["push", path.to_str().unwrap(), &tagged],
        wrong.to_str().unwrap(),
    );
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    // $REGISTRY_AUTH_FILE.
    let right = reg.dir.write("right.json", auth("s3cret").as_bytes());
    let o = ctl_at_env(
        &d,
        &["push", path.to_str().unwrap(), &tagged],
        right.to_str().unwrap(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // A tenant pulls with its own Docker config; the daemon never sees the credentials.
    let bob = TestUser::create("wasmcore-e2e-ocibob");
    let docker = TempDir::new("docker-config");
    docker.write("config.json", auth("s3cret").as_bytes());
    let o = bob
        .command()
        .arg(wasmcorectl())
        .arg("--socket")
        .arg(&d.socket)
        .args(["load", &tagged, "--name", "up"])
        .env("DOCKER_CONFIG", docker.path())
        .env_remove("REGISTRY_AUTH_FILE")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let r = raw_as(
        &d.socket,
        &bob,
        &json!({"op": "execute", "binary": "up", "input": "q"}),
    );
    assert_eq!(ok(&r)["output"], json!("Q"));
    assert!(!d.log().contains("s3cret"));
}

#[test]
fn provisioning_takes_oci_sources_pinned_by_digest_from_the_cache_apply_fills() {
    let reg = Registry::start();
    let cache = TempDir::new("oci-cache");
    let cache_dir = cache.path().join("oci");
    let mut d = Daemon::start_config(
        &format!("[provisioning]\noci_cache = \"{}\"\n", cache_dir.display()),
        &[],
    );
    let dir = d.dir.path().join("binaries.d");
    std::fs::create_dir_all(&dir).unwrap();
    let path = plugin_path("uppercase");
    let bytes = std::fs::read(&path).unwrap();
    let tagged = reg.reference("team/up:1.0");
    let pushed = json_out(&d.ctl(&["--json", "push", path.to_str().unwrap(), &tagged]));
    let pinned = pushed["pinned"].as_str().unwrap().to_string();
    let digest = pushed["digest"].as_str().unwrap().to_string();
    std::fs::write(
        dir.join("up.toml"),
        format!("name = \"up\"\nsource = \"{pinned}\"\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("tag.toml"),
        format!("name = \"tagged\"\nsource = \"{tagged}\"\n"),
    )
    .unwrap();
    // The daemon does not pull: it says what to pull. A tag is not a pin.
    let r = d.client().call(&json!({"op": "apply", "dry_run": true}));
    let entries = ok(&r)["entries"].as_array().unwrap().clone();
    assert_eq!(entries[0]["action"], json!("invalid"), "{r}");
    assert!(
        entries[0]["error"].as_str().unwrap().contains("not pinned"),
        "{r}"
    );
    assert_eq!(entries[0]["line"], json!(2));
    assert_eq!(entries[0]["pull"], Value::Null);
    assert_eq!(entries[1]["action"], json!("invalid"), "{r}");
    assert_eq!(entries[1]["pull"], json!(pinned), "{r}");
    // `wasmcorectl apply` pulls it into the cache, then applies (the tag's file is refused).
    let o = d.ctl(&["apply"]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("pulled {pinned} into ")),
        "{}",
        stderr(&o)
    );
    let info = d.client().call(&json!({"op": "info", "binary": "up"}));
    assert_eq!(ok(&info)["sha256"], json!(sha256(&bytes)), "byte for byte");
    assert_eq!(
        info["source"],
        json!({"reference": pinned, "digest": digest})
    );
    assert!(
        info["provisioned"]["file"]
            .as_str()
            .unwrap()
            .ends_with("up.toml")
    );
    let run = json!({"op": "execute", "binary": "up", "input": "abc"});
    assert_eq!(d.client().call(&run)["output"], json!("ABC"));
    // The cache entry: the manifest as the registry served it, and the module.
    let entry = cache_dir.join(format!(
        "sha256-{}",
        digest.strip_prefix("sha256:").unwrap()
    ));
    assert_eq!(
        format!(
            "sha256:{}",
            sha256(&std::fs::read(entry.join("manifest.json")).unwrap())
        ),
        digest
    );
    assert_eq!(std::fs::read(entry.join("module.wasm")).unwrap(), bytes);
    // A cache entry that does not match its digests is refused; the binary stays.
    std::fs::remove_file(dir.join("tag.toml")).unwrap();
    std::fs::write(entry.join("module.wasm"), b"\0asm\x01\0\0\0").unwrap();
    let r = d.client().call(&json!({"op": "apply"}));
    let e = &ok(&r)["entries"][0];
    assert_eq!(e["action"], json!("invalid"), "{r}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("does not match the layer digest"),
        "{r}"
    );
    assert_eq!(d.client().call(&run)["output"], json!("ABC"));
    // Removed from the cache, it is pulled again.
    std::fs::remove_dir_all(&entry).unwrap();
    let o = d.ctl(&["apply"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(entry.join("module.wasm").exists());
    // Without the registry, a restart applies from the cache: nothing to change.
    drop(reg);
    d.restart();
    let r = d.client().call(&json!({"op": "apply", "dry_run": true}));
    assert_eq!(ok(&r)["entries"][0]["action"], json!("unchanged"), "{r}");
    assert_eq!(d.client().call(&run)["output"], json!("ABC"));
}
