//! Declarative provisioning: the binaries that `provisioning.dir` (by default
//! `/etc/wasm-core/binaries.d`) declares, one `*.toml` file each, and the plan that brings
//! the stored binaries to them. The broker ([`crate::broker`]) reads the files, plans, and
//! runs each step in the owner's worker, at start, on every reload and on `apply`.
//!
//! A binary that a file declares carries the file's path in its metadata
//! ([`Provisioned`]): only such binaries are ever replaced, reconfigured or unloaded by a
//! plan, and no client may change them. A file that cannot be used is reported with its
//! path (and line) and changes nothing; in particular what it declared before stays.
//!
//! An `oci://REGISTRY/REPOSITORY@sha256:…` source is read from `provisioning.oci_cache`,
//! where `wasmcorectl apply` put it (the daemon never reaches a registry): the directory
//! `sha256-<digest>/` holds the manifest as the registry served it and the module, and both
//! are checked here: the manifest against the digest the file pins, the module against the
//! layer digest the manifest names.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use wasmcore_proto::{LimitsRequest, ProvisionAction, ProvisionEntry, Provisioned, Source};

use crate::store::{BinaryMeta, current_of};

/// One binary as its file declares it.
#[derive(Debug)]
pub struct Declared {
    pub file: String,
    pub name: String,
    pub owner: u32,
    pub public: bool,
    pub config: BTreeMap<String, String>,
    pub limits: LimitsRequest,
    /// The module file, open, and the sha256 of what it held when read.
    pub module: File,
    pub sha256: String,
    /// For an `oci://` source: the reference and the manifest digest it pins.
    pub oci: Option<Source>,
}

impl Declared {
    /// What the binary's metadata keeps of the declaration.
    pub fn provisioned(&self) -> Provisioned {
        Provisioned {
            file: self.file.clone(),
            limits: self.limits,
        }
    }
}

/// A file that declares nothing usable: why, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub file: String,
    pub line: Option<u32>,
    pub error: String,
    /// What it names, when it got that far.
    pub name: Option<String>,
    pub owner: Option<u32>,
    /// An `oci://` source to pull into the cache first.
    pub pull: Option<String>,
}

/// What a file holds, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    name: toml::Spanned<String>,
    source: toml::Spanned<String>,
    #[serde(default)]
    owner: Option<toml::Spanned<RawOwner>>,
    #[serde(default)]
    public: bool,
    #[serde(default)]
    config: BTreeMap<String, String>,
    #[serde(default)]
    limits: RawLimits,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawOwner {
    Uid(u32),
    User(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    timeout_ms: Option<u64>,
    memory_limit_mb: Option<u64>,
    fuel: Option<u64>,
}

/// The provisioning files of `dir`: `*.toml`, sorted by name, read and checked. A missing
/// directory declares nothing; one that cannot be listed is an error (and nothing may be
/// unloaded for it). `uid_of` looks up an `owner` given as a user name; `max_bytes` caps a
/// module.
pub fn read_dir(
    dir: &Path,
    oci_cache: &Path,
    uid_of: &dyn Fn(&str) -> Result<u32, String>,
    max_bytes: u64,
) -> std::io::Result<(Vec<Declared>, Vec<Invalid>)> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => {
            return Err(std::io::Error::new(
                e.kind(),
                format!("listing {}: {e}", dir.display()),
            ));
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "toml")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    paths.sort();
    let (mut good, mut bad) = (Vec::new(), Vec::new());
    for path in paths {
        match read_file(&path, oci_cache, uid_of, max_bytes) {
            Ok(d) => good.push(d),
            Err(e) => bad.push(e),
        }
    }
    Ok((good, bad))
}

/// One provisioning file.
fn read_file(
    path: &Path,
    oci_cache: &Path,
    uid_of: &dyn Fn(&str) -> Result<u32, String>,
    max_bytes: u64,
) -> Result<Declared, Invalid> {
    let file = path.display().to_string();
    let invalid = |line: Option<u32>, error: String| Invalid {
        file: file.clone(),
        line,
        error,
        name: None,
        owner: None,
        pull: None,
    };
    let (f, len) = open_regular(path).map_err(|e| invalid(None, e))?;
    if len > 1 << 20 {
        return Err(invalid(None, "larger than 1 MiB".into()));
    }
    let mut text = String::new();
    (&f).take(1 << 20)
        .read_to_string(&mut text)
        .map_err(|e| invalid(None, e.to_string()))?;
    let line_of = |span: std::ops::Range<usize>| {
        let upto = span.start.min(text.len());
        Some(text[..upto].bytes().filter(|b| *b == b'\n').count() as u32 + 1)
    };
    let raw: RawFile = toml::from_str(&text).map_err(|e| {
        invalid(
            e.span().and_then(line_of),
            e.message().trim_end().to_string(),
        )
    })?;
    let name = raw.name.get_ref().clone();
    let at = |span: std::ops::Range<usize>, error: String| Invalid {
        file: file.clone(),
        line: line_of(span),
        error,
        name: Some(name.clone()),
        owner: None,
        pull: None,
    };
    crate::registry::validate_name(&name).map_err(|e| at(raw.name.span(), e.to_string()))?;
    let owner = match &raw.owner {
        None => 0,
        Some(o) => match o.get_ref() {
            RawOwner::Uid(uid) => *uid,
            RawOwner::User(user) => {
                uid_of(user).map_err(|e| at(o.span(), format!("owner: {e}")))?
            }
        },
    };
    let with_owner = |mut e: Invalid| {
        e.owner = Some(owner);
        e
    };
    let source_text = raw.source.get_ref();
    let (module, sha256, oci) = if source_text.starts_with("oci://") {
        let cached = from_cache(source_text, oci_cache, max_bytes).map_err(|(error, pull)| {
            let mut e = with_owner(at(raw.source.span(), format!("source: {error}")));
            e.pull = pull;
            e
        })?;
        (cached.module, cached.sha256, Some(cached.source))
    } else {
        let source = PathBuf::from(source_text);
        if !source.is_absolute() {
            return Err(with_owner(at(
                raw.source.span(),
                format!(
                    "source {source_text:?} must be an absolute path or an oci:// reference pinned by digest"
                ),
            )));
        }
        let (module, sha256) = hash_module(&source, max_bytes)
            .map_err(|e| with_owner(at(raw.source.span(), format!("source: {e}"))))?;
        (module, sha256, None)
    };
    Ok(Declared {
        file,
        name,
        owner,
        public: raw.public,
        config: raw.config,
        limits: LimitsRequest {
            timeout_ms: raw.limits.timeout_ms,
            memory_limit_mb: raw.limits.memory_limit_mb,
            fuel: raw.limits.fuel,
        },
        module,
        sha256,
        oci,
    })
}

/// An `oci://` source found in the cache and checked.
struct Cached {
    module: File,
    sha256: String,
    source: Source,
}

/// The config media type and the layer media type of a Wasm OCI artifact.
const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
const WASM_LAYER_MEDIA_TYPE: &str = "application/wasm";

/// Find `reference` (which must pin a manifest digest) in `cache` and check it. `Err`: why
/// not, and the reference to pull when it is not there yet.
fn from_cache(
    reference: &str,
    cache: &Path,
    max_bytes: u64,
) -> Result<Cached, (String, Option<String>)> {
    let refused = |why: String| (why, None);
    let hex = reference
        .rsplit_once("@sha256:")
        .map(|(_, h)| h)
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .ok_or_else(|| {
            refused(format!(
                "{reference:?} is not pinned: give the manifest digest (oci://REGISTRY/REPOSITORY@sha256:<64 hex digits>; wasmcorectl push prints it), so that every host runs the same bytes"
            ))
        })?;
    if reference.len() > 1024
        || reference
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(refused(format!("{reference:?} is not a reference")));
    }
    let dir = cache.join(format!("sha256-{hex}"));
    if !dir.exists() {
        return Err((
            format!(
                "{reference} is not in {} yet: `wasmcorectl apply` pulls it (as you, with your registry credentials) and applies again",
                cache.display()
            ),
            Some(reference.to_string()),
        ));
    }
    let manifest_path = dir.join("manifest.json");
    let (f, len) = open_regular(&manifest_path).map_err(refused)?;
    if len > 1 << 20 {
        return Err(refused(format!(
            "{} is larger than 1 MiB",
            manifest_path.display()
        )));
    }
    let mut raw = Vec::new();
    (&f).take(1 << 20)
        .read_to_end(&mut raw)
        .map_err(|e| refused(format!("reading {}: {e}", manifest_path.display())))?;
    let stale = |what: String| {
        refused(format!(
            "{what}; remove {} and run `wasmcorectl apply` to pull it again",
            dir.display()
        ))
    };
    if hex::encode(Sha256::digest(&raw)) != hex {
        return Err(stale(format!(
            "{} does not match the digest sha256:{hex}",
            manifest_path.display()
        )));
    }
    let manifest: serde_json::Value = serde_json::from_slice(&raw)
        .map_err(|e| stale(format!("{}: {e}", manifest_path.display())))?;
    if manifest["config"]["mediaType"] != WASM_CONFIG_MEDIA_TYPE {
        return Err(refused(format!(
            "{reference} is not a Wasm artifact (its config is {}, not {WASM_CONFIG_MEDIA_TYPE})",
            manifest["config"]["mediaType"]
        )));
    }
    let layer_hex = match manifest["layers"].as_array().map(Vec::as_slice) {
        Some([layer]) if layer["mediaType"] == WASM_LAYER_MEDIA_TYPE => layer["digest"]
            .as_str()
            .and_then(|d| d.strip_prefix("sha256:"))
            .map(str::to_string),
        _ => None,
    }
    .ok_or_else(|| {
        refused(format!(
            "{reference} is not a Wasm artifact (one {WASM_LAYER_MEDIA_TYPE} layer with a sha256 digest)"
        ))
    })?;
    let module_path = dir.join("module.wasm");
    let (module, sha256) = hash_module(&module_path, max_bytes).map_err(refused)?;
    if sha256 != layer_hex {
        return Err(stale(format!(
            "{} does not match the layer digest sha256:{layer_hex}",
            module_path.display()
        )));
    }
    Ok(Cached {
        module,
        sha256,
        source: Source {
            reference: reference.to_string(),
            digest: format!("sha256:{hex}"),
        },
    })
}

/// Open `path` if it is a regular file (never blocking on a FIFO or a device), with its
/// size.
fn open_regular(path: &Path) -> Result<(File, u64), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    let meta = f
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    Ok((f, meta.len()))
}

/// Open a module file, hash it, and leave it at its start for the load.
fn hash_module(path: &Path, max_bytes: u64) -> Result<(File, String), String> {
    let (mut f, len) = open_regular(path)?;
    if len > max_bytes {
        return Err(format!(
            "{} has {len} bytes, more than registry.max_module_bytes ({max_bytes})",
            path.display()
        ));
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    f.rewind()
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    Ok((f, hex::encode(hasher.finalize())))
}

/// What to do for one file, or for one provisioned binary whose file is gone.
#[derive(Debug)]
pub enum Step {
    Load(Declared),
    Replace(Declared),
    Configure(Declared, String),
    Unchanged(Declared, String),
    Unload {
        file: String,
        owner: u32,
        name: String,
        binary: String,
    },
    Invalid(Invalid),
}

impl Step {
    /// The line of the report for this step, before it runs.
    pub fn entry(&self) -> ProvisionEntry {
        let of = |d: &Declared, action, binary: Option<String>| ProvisionEntry {
            file: d.file.clone(),
            action,
            name: Some(d.name.clone()),
            owner_uid: Some(d.owner),
            binary,
            sha256: Some(d.sha256.clone()),
            error: None,
            line: None,
            pull: None,
        };
        match self {
            Step::Load(d) => of(d, ProvisionAction::Load, None),
            Step::Replace(d) => of(d, ProvisionAction::Replace, None),
            Step::Configure(d, id) => of(d, ProvisionAction::Configure, Some(id.clone())),
            Step::Unchanged(d, id) => of(d, ProvisionAction::Unchanged, Some(id.clone())),
            Step::Unload {
                file,
                owner,
                name,
                binary,
            } => ProvisionEntry {
                file: file.clone(),
                action: ProvisionAction::Unload,
                name: Some(name.clone()),
                owner_uid: Some(*owner),
                binary: Some(binary.clone()),
                sha256: None,
                error: None,
                line: None,
                pull: None,
            },
            Step::Invalid(i) => ProvisionEntry {
                file: i.file.clone(),
                action: ProvisionAction::Invalid,
                name: i.name.clone(),
                owner_uid: i.owner,
                binary: None,
                sha256: None,
                error: Some(i.error.clone()),
                line: i.line,
                pull: i.pull.clone(),
            },
        }
    }
}

/// The steps that bring the stored binaries (`metas`, every version of every tenant's) to
/// what `declared` says, with `invalid` reported. A provisioned binary whose file is among
/// the invalid ones is left as it is; one whose file is gone is unloaded; a name that a
/// client loaded (no provisioning file) is never touched, and a file declaring it is
/// refused.
pub fn plan(declared: Vec<Declared>, invalid: Vec<Invalid>, metas: &[BinaryMeta]) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut seen: HashMap<(u32, String), String> = HashMap::new();
    let broken: Vec<String> = invalid.iter().map(|i| i.file.clone()).collect();
    let mut by_file: Vec<(String, Step)> = invalid
        .into_iter()
        .map(|i| (i.file.clone(), Step::Invalid(i)))
        .collect();
    for d in declared {
        let key = (d.owner, d.name.clone());
        if let Some(first) = seen.get(&key) {
            let error = format!(
                "uid {} and name {:?} are already declared by {first}",
                d.owner, d.name
            );
            by_file.push((
                d.file.clone(),
                Step::Invalid(Invalid {
                    file: d.file,
                    line: None,
                    error,
                    name: Some(d.name),
                    owner: Some(d.owner),
                    pull: None,
                }),
            ));
            continue;
        }
        seen.insert(key, d.file.clone());
        let current = current_of(metas, |m| {
            m.owner == d.owner && m.name.as_deref() == Some(d.name.as_str())
        });
        let step = match current {
            None => Step::Load(d),
            Some(cur) => match &cur.provisioned {
                None => Step::Invalid(Invalid {
                    error: format!(
                        "uid {} already has a binary named {:?} ({}) that no provisioning file declares; unload it, or declare another name",
                        d.owner, d.name, cur.id
                    ),
                    file: d.file,
                    line: None,
                    name: Some(d.name),
                    owner: Some(d.owner),
                    pull: None,
                }),
                Some(_) if cur.public != d.public => Step::Invalid(Invalid {
                    error: format!(
                        "{:?} is loaded {}, and a binary keeps its visibility: to change it, remove this file, reload, and add it back",
                        d.name,
                        if cur.public { "public" } else { "private" }
                    ),
                    file: d.file,
                    line: None,
                    name: Some(d.name),
                    owner: Some(d.owner),
                    pull: None,
                }),
                Some(p) => {
                    if cur.sha256 != d.sha256 {
                        Step::Replace(d)
                    } else if cur.config != d.config || *p != d.provisioned() {
                        Step::Configure(d, cur.id.to_string())
                    } else {
                        Step::Unchanged(d, cur.id.to_string())
                    }
                }
            },
        };
        by_file.push((step_file(&step), step));
    }
    by_file.sort_by(|a, b| a.0.cmp(&b.0));
    steps.extend(by_file.into_iter().map(|(_, s)| s));
    // Provisioned names no file declares any more (their current versions).
    let mut gone: Vec<&BinaryMeta> = metas
        .iter()
        .filter(|m| {
            let (Some(p), Some(name)) = (&m.provisioned, &m.name) else {
                return false;
            };
            !m.superseded_in(metas)
                && !seen.contains_key(&(m.owner, name.clone()))
                && !broken.contains(&p.file)
        })
        .collect();
    gone.sort_by_key(|m| {
        (
            m.provisioned.as_ref().map(|p| p.file.clone()),
            m.owner,
            m.name.clone(),
        )
    });
    steps.extend(gone.into_iter().map(|m| {
        Step::Unload {
            file: m
                .provisioned
                .as_ref()
                .map(|p| p.file.clone())
                .unwrap_or_default(),
            owner: m.owner,
            name: m.name.clone().unwrap_or_default(),
            binary: m.id.to_string(),
        }
    }));
    steps
}

fn step_file(s: &Step) -> String {
    match s {
        Step::Load(d) | Step::Replace(d) | Step::Configure(d, _) | Step::Unchanged(d, _) => {
            d.file.clone()
        }
        Step::Unload { file, .. } => file.clone(),
        Step::Invalid(i) => i.file.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;
    use wasmcore_proto::ModuleKind;

    fn dir(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("wasmcored-prov-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn no_users(u: &str) -> Result<u32, String> {
        match u {
            "alice" => Ok(1001),
            _ => Err(format!("no user named {u:?}")),
        }
    }

    fn meta(owner: u32, name: &str, sha: &str, file: Option<&str>, activation: u64) -> BinaryMeta {
        BinaryMeta {
            format: 1,
            id: Uuid::new_v4(),
            name: Some(name.into()),
            owner,
            sha256: sha.into(),
            size: 1,
            kind: ModuleKind::Process,
            public: false,
            loaded_at: 0,
            config: BTreeMap::new(),
            activation,
            source: None,
            provisioned: file.map(|f| Provisioned {
                file: f.into(),
                limits: LimitsRequest::default(),
            }),
        }
    }

    #[test]
    fn files_are_read_with_their_errors_and_lines() {
        let d = dir("read");
        let module = d.join("m.wasm");
        std::fs::write(&module, b"\0asm\x01\0\0\0").unwrap();
        let m = module.display();
        std::fs::write(
            d.join("10-a.toml"),
            format!(
                "name = \"a\"\nsource = \"{m}\"\nowner = \"alice\"\n[config]\nk = \"v\"\n[limits]\ntimeout_ms = 50\n"
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("20-b.toml"),
            format!("name = \"b\"\nsource = \"{m}\"\n"),
        )
        .unwrap();
        std::fs::write(d.join("30-bad.toml"), "name = \"c\"\n\nsource = 5\n").unwrap();
        std::fs::write(d.join("40-rel.toml"), "name = \"d\"\nsource = \"m.wasm\"\n").unwrap();
        std::fs::write(
            d.join("50-unknown.toml"),
            format!("name = \"e\"\nsource = \"{m}\"\nreplicas = 3\n"),
        )
        .unwrap();
        std::fs::write(
            d.join("60-missing.toml"),
            "name = \"f\"\nsource = \"/nonexistent/x.wasm\"\n",
        )
        .unwrap();
        std::fs::write(
            d.join("70-user.toml"),
            format!("name = \"g\"\nsource = \"{m}\"\nowner = \"bob\"\n"),
        )
        .unwrap();
        std::fs::write(
            d.join("80-oci.toml"),
            "name = \"h\"\nsource = \"oci://r.example/x:1.0\"\n",
        )
        .unwrap();
        std::fs::write(d.join("README"), "not a provisioning file").unwrap();
        std::fs::write(d.join(".hidden.toml"), "garbage").unwrap();
        let (good, bad) =
            read_dir(&d, Path::new("/nonexistent-cache"), &no_users, 1 << 20).unwrap();
        assert_eq!(good.len(), 2, "{bad:?}");
        assert_eq!(good[0].name, "a");
        assert_eq!(good[0].owner, 1001);
        assert_eq!(good[0].config.get("k").map(String::as_str), Some("v"));
        assert_eq!(good[0].limits.timeout_ms, Some(50));
        assert_eq!(good[1].owner, 0);
        assert_eq!(
            good[1].sha256,
            "93a44bbb96c751218e4c00d479e4c14358122a389acca16205b1e4d0dc5f9476"
        );
        let lines: Vec<(String, Option<u32>)> = bad
            .iter()
            .map(|i| {
                (
                    Path::new(&i.file)
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                    i.line,
                )
            })
            .collect();
        assert_eq!(
            lines,
            [
                ("30-bad.toml".to_string(), Some(3)),
                ("40-rel.toml".to_string(), Some(2)),
                ("50-unknown.toml".to_string(), Some(3)),
                ("60-missing.toml".to_string(), Some(2)),
                ("70-user.toml".to_string(), Some(3)),
                ("80-oci.toml".to_string(), Some(2)),
            ]
        );
        assert!(bad[2].error.contains("replicas"), "{}", bad[2].error);
        assert!(
            bad[3].error.contains("/nonexistent/x.wasm"),
            "{}",
            bad[3].error
        );
        assert!(bad[4].error.contains("bob"), "{}", bad[4].error);
        assert!(bad[5].error.contains("not pinned"), "{}", bad[5].error);
        assert_eq!(bad[5].pull, None);
        let _ = std::fs::remove_dir_all(&d);
        // A missing directory declares nothing.
        let (good, bad) =
            read_dir(&d, Path::new("/nonexistent-cache"), &no_users, 1 << 20).unwrap();
        assert!(good.is_empty() && bad.is_empty());
    }

    fn declared(d: &Path, file: &str, name: &str, body: &[u8]) -> Declared {
        let module = d.join(format!("{file}.wasm"));
        std::fs::write(&module, body).unwrap();
        let (module_file, sha256) = hash_module(&module, 1 << 20).unwrap();
        Declared {
            file: d.join(file).display().to_string(),
            name: name.into(),
            owner: 0,
            public: false,
            config: BTreeMap::new(),
            limits: LimitsRequest::default(),
            module: module_file,
            sha256,
            oci: None,
        }
    }

    #[test]
    fn the_plan_touches_only_what_files_declare() {
        let d = dir("plan");
        let f = |n: &str| d.join(n).display().to_string();
        let same = declared(&d, "a.toml", "a", b"A");
        let changed = declared(&d, "b.toml", "b", b"B2");
        let fresh = declared(&d, "c.toml", "c", b"C");
        let mut reconf = declared(&d, "d.toml", "d", b"D");
        reconf.limits.fuel = Some(9);
        let clash = declared(&d, "e.toml", "mine", b"E");
        let twice = declared(&d, "f.toml", "a", b"A");
        let metas = vec![
            meta(0, "a", &same.sha256, Some(&f("a.toml")), 0),
            meta(0, "b", "old", Some(&f("b.toml")), 0),
            meta(0, "d", &reconf.sha256, Some(&f("d.toml")), 0),
            meta(0, "mine", "x", None, 0),
            meta(0, "gone", "g", Some(&f("gone.toml")), 0),
            meta(0, "gone", "g2", Some(&f("gone.toml")), 1),
            meta(0, "kept", "k", Some(&f("broken.toml")), 0),
            meta(0, "tenants", "t", None, 0),
        ];
        let broken = super::Invalid {
            file: f("broken.toml"),
            line: Some(1),
            error: "bad".into(),
            name: None,
            owner: None,
            pull: None,
        };
        let steps = plan(
            vec![same, changed, fresh, reconf, clash, twice],
            vec![broken],
            &metas,
        );
        let got: Vec<(ProvisionAction, Option<String>)> = steps
            .iter()
            .map(|s| {
                let e = s.entry();
                (e.action, e.name)
            })
            .collect();
        use ProvisionAction::*;
        let n = |s: &str| Some(s.to_string());
        assert_eq!(
            got,
            [
                (Unchanged, n("a")),
                (Replace, n("b")),
                (Invalid, None),
                (Load, n("c")),
                (Configure, n("d")),
                (Invalid, n("mine")),
                (Invalid, n("a")),
                (Unload, n("gone")),
            ]
        );
        // The unload names the current version.
        assert_eq!(steps[7].entry().binary, Some(metas[5].id.to_string()));
        assert!(steps[6].entry().error.unwrap().contains("a.toml"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_oci_source_is_taken_from_the_cache_checked_against_its_digests() {
        let d = dir("oci");
        let cache = d.join("cache");
        let module = b"\0asm\x01\0\0\0".to_vec();
        let layer = hex::encode(Sha256::digest(&module));
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": WASM_CONFIG_MEDIA_TYPE, "digest": "sha256:00", "size": 2},
            "layers": [{"mediaType": WASM_LAYER_MEDIA_TYPE, "digest": format!("sha256:{layer}"), "size": module.len()}],
        }))
        .unwrap();
        let digest = hex::encode(Sha256::digest(&manifest));
        let reference = format!("oci://r.example/team/x@sha256:{digest}");
        let max = 1 << 20;
        // Not pulled yet: the reference to pull.
        let (why, pull) = from_cache(&reference, &cache, max).err().unwrap();
        assert!(why.contains("not in"), "{why}");
        assert_eq!(pull.as_deref(), Some(reference.as_str()));
        let entry = cache.join(format!("sha256-{digest}"));
        std::fs::create_dir_all(&entry).unwrap();
        std::fs::write(entry.join("manifest.json"), &manifest).unwrap();
        std::fs::write(entry.join("module.wasm"), &module).unwrap();
        let got = from_cache(&reference, &cache, max).ok().unwrap();
        assert_eq!(got.sha256, layer);
        assert_eq!(got.source.digest, format!("sha256:{digest}"));
        // A module that is not the layer the manifest names.
        std::fs::write(entry.join("module.wasm"), b"\0asm\x01\0\0\0\0").unwrap();
        let (why, pull) = from_cache(&reference, &cache, max).err().unwrap();
        assert!(why.contains("does not match the layer digest"), "{why}");
        assert_eq!(pull, None);
        // A manifest that is not the one pinned.
        std::fs::write(entry.join("module.wasm"), &module).unwrap();
        std::fs::write(entry.join("manifest.json"), b"{}").unwrap();
        let (why, _) = from_cache(&reference, &cache, max).err().unwrap();
        assert!(why.contains("does not match the digest"), "{why}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
