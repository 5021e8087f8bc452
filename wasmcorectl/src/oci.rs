//! OCI registries: pulling a module for `load oci://…` and publishing one with `push`, in
//! the CNCF "Wasm OCI Artifact" layout (config `application/vnd.wasm.config.v0+json`, one
//! `application/wasm` layer), as the calling user: credentials come from the user's own
//! `$REGISTRY_AUTH_FILE` or Docker config, never through the daemon.

use std::io::{IsTerminal, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use indicatif::{ProgressBar, ProgressStyle};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciError, OciErrorCode};
use oci_client::manifest::{OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_wasm::{WASM_LAYER_MEDIA_TYPE, WASM_MANIFEST_CONFIG_MEDIA_TYPE, WasmClient, WasmConfig};
use sha2::{Digest, Sha256};

use crate::{Failure, exit};

/// The prefix that makes a `load` argument a registry reference.
pub const SCHEME: &str = "oci://";

/// Largest layer pulled: far above any module the daemon accepts by default
/// (`registry.max_module_bytes`), and a bound on what a registry can make us hold.
const MAX_LAYER_BYTES: i64 = 1 << 30;

/// A parsed `oci://REGISTRY/REPOSITORY[:TAG|@DIGEST]`.
#[derive(Debug)]
pub struct OciRef {
    reference: Reference,
    /// As the user wrote it, `oci://` included.
    pub text: String,
}

impl OciRef {
    pub fn parse(text: &str) -> Result<OciRef, Failure> {
        let rest = text
            .strip_prefix(SCHEME)
            .ok_or_else(|| usage(text, "not oci://"))?;
        // Without a registry, a reference would silently mean Docker Hub.
        let registry = rest.split('/').next().unwrap_or_default();
        if !rest.contains('/')
            || !(registry.contains('.') || registry.contains(':') || registry == "localhost")
        {
            return Err(usage(
                text,
                "name the registry: oci://REGISTRY/REPOSITORY:TAG (or @sha256:…)",
            ));
        }
        let reference: Reference = rest.parse().map_err(|e| usage(text, &format!("{e}")))?;
        Ok(OciRef {
            reference,
            text: text.to_string(),
        })
    }

    fn registry(&self) -> &str {
        self.reference.resolve_registry()
    }
}

fn usage(text: &str, why: &str) -> Failure {
    Failure::new(exit::USAGE, format!("{text}: {why}"))
}

/// A module pulled from a registry.
#[derive(Debug)]
pub struct Pulled {
    pub bytes: Vec<u8>,
    /// The digest of the manifest it was pulled by (what `@sha256:…` pins).
    pub manifest_digest: String,
}

/// What `push` published.
#[derive(Debug)]
pub struct Pushed {
    pub manifest_digest: String,
    pub layer_digest: String,
    pub os: &'static str,
}

/// A client for `r`'s registry: plain HTTP only for a registry on this host (`localhost`,
/// `127.0.0.1`, `[::1]`) or with `insecure`.
fn client(r: &OciRef, insecure: bool) -> WasmClient {
    let registry = r.registry().to_string();
    let host = registry
        .rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(registry.as_str(), |(host, _)| host);
    let local = matches!(host, "localhost" | "127.0.0.1" | "[::1]");
    let protocol = if insecure || local {
        ClientProtocol::HttpsExcept(vec![registry])
    } else {
        ClientProtocol::Https
    };
    WasmClient::new(Client::new(ClientConfig {
        protocol,
        ..ClientConfig::default()
    }))
}

/// The caller's credentials for `registry`: `$REGISTRY_AUTH_FILE` when set (the containers
/// tools' auth file), else the Docker config (`$DOCKER_CONFIG/config.json`, default
/// `~/.docker/config.json`, with its credential helpers). None configured: anonymous.
fn credentials(registry: &str) -> Result<RegistryAuth, Failure> {
    use docker_credential::{CredentialRetrievalError as E, DockerCredential};
    let found = match std::env::var_os("REGISTRY_AUTH_FILE") {
        Some(path) => {
            let f = std::fs::File::open(&path).map_err(|e| {
                Failure::new(
                    exit::IO,
                    format!("REGISTRY_AUTH_FILE {}: {e}", path.to_string_lossy()),
                )
            })?;
            docker_credential::get_credential_from_reader(std::io::BufReader::new(f), registry)
        }
        None => docker_credential::get_credential(registry),
    };
    match found {
        Ok(DockerCredential::UsernamePassword(user, password)) => {
            Ok(RegistryAuth::Basic(user, password))
        }
        Ok(DockerCredential::IdentityToken(token)) => Ok(RegistryAuth::Bearer(token)),
        Err(E::NoCredentialConfigured | E::ConfigNotFound | E::ConfigReadError) => {
            Ok(RegistryAuth::Anonymous)
        }
        Err(e) => Err(Failure::new(
            exit::REFUSED,
            format!("credentials for {registry}: {e}"),
        )),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(exit::INTERNAL, format!("starting the I/O runtime: {e}")))
}

/// What went wrong talking to the registry, said in the user's terms.
fn failed(r: &OciRef, doing: &str, e: &OciDistributionError) -> Failure {
    let not_found = |e: &OciError| {
        matches!(
            e.code,
            OciErrorCode::ManifestUnknown
                | OciErrorCode::NameUnknown
                | OciErrorCode::BlobUnknown
                | OciErrorCode::NotFound
        )
    };
    let refused =
        |e: &OciError| matches!(e.code, OciErrorCode::Unauthorized | OciErrorCode::Denied);
    let credentials = || {
        Failure::new(
            exit::FORBIDDEN,
            format!(
                "{}: {doing}: the registry {} refused access (HTTP 401/403): set your credentials for it in $REGISTRY_AUTH_FILE or ~/.docker/config.json",
                r.text,
                r.registry()
            ),
        )
    };
    match e {
        OciDistributionError::ServerError {
            code: 401 | 403, ..
        } => credentials(),
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(refused) =>
        {
            credentials()
        }
        OciDistributionError::ServerError { code: 404, .. } => Failure::new(
            exit::NOT_FOUND,
            format!("{}: not in the registry ({e})", r.text),
        ),
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(not_found) =>
        {
            Failure::new(
                exit::NOT_FOUND,
                format!("{}: not in the registry ({e})", r.text),
            )
        }
        OciDistributionError::ImageManifestNotFoundError(_) => Failure::new(
            exit::NOT_FOUND,
            format!("{}: not in the registry ({e})", r.text),
        ),
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => credentials(),
        OciDistributionError::RequestError(re) if re.is_connect() || re.is_timeout() => {
            Failure::new(
                exit::UNAVAILABLE,
                format!(
                    "{}: cannot reach the registry {}: {}",
                    r.text,
                    r.registry(),
                    error_chain(re)
                ),
            )
        }
        _ => Failure::new(
            exit::UNAVAILABLE,
            format!("{}: {doing}: {}", r.text, error_chain(e)),
        ),
    }
}

/// An error with its causes, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
}

/// Pull the module `r` names: its manifest must be a Wasm artifact (the config media type
/// and one `application/wasm` layer), and the layer's bytes must match the layer's digest.
pub fn pull(r: &OciRef, insecure: bool) -> Result<Pulled, Failure> {
    let auth = credentials(r.registry())?;
    let client = client(r, insecure);
    runtime()?.block_on(async {
        let (manifest, manifest_digest) = client
            .pull_image_manifest(&r.reference, &auth)
            .await
            .map_err(|e| failed(r, "pulling the manifest", &e))?;
        let bytes = wasm_layer(&client, r, &manifest).await?;
        Ok(Pulled {
            bytes,
            manifest_digest,
        })
    })
}

/// Pull `r`, which must pin a manifest digest, into `cache` for the daemon's provisioning:
/// `sha256-<digest>/manifest.json` (the manifest as the registry served it, checked against
/// the digest) and `module.wasm` (the layer, checked against its digest), written in a
/// temporary directory and renamed into place. An entry already there is kept.
pub fn pull_to_cache(r: &OciRef, insecure: bool, cache: &Path) -> Result<PathBuf, Failure> {
    let hex = r
        .reference
        .digest()
        .and_then(|d| d.strip_prefix("sha256:"))
        .ok_or_else(|| {
            usage(
                &r.text,
                "pin it by digest: oci://REGISTRY/REPOSITORY@sha256:…",
            )
        })?
        .to_string();
    let entry = cache.join(format!("sha256-{hex}"));
    if entry.exists() {
        return Ok(entry);
    }
    let auth = credentials(r.registry())?;
    let client = client(r, insecure);
    let (raw, module) = runtime()?.block_on(async {
        let (raw, _) = client
            .pull_manifest_raw(&r.reference, &auth, &[OCI_IMAGE_MEDIA_TYPE])
            .await
            .map_err(|e| failed(r, "pulling the manifest", &e))?;
        let actual = hex::encode(Sha256::digest(&raw));
        if actual != hex {
            return Err(Failure::new(
                exit::REFUSED,
                format!(
                    "{}: the manifest the registry sent does not match the digest (sha256:{actual}); refused",
                    r.text
                ),
            ));
        }
        let manifest: OciImageManifest = serde_json::from_slice(&raw).map_err(|e| {
            Failure::new(exit::REFUSED, format!("{}: its manifest: {e}", r.text))
        })?;
        let module = wasm_layer(&client, r, &manifest).await?;
        Ok((raw.to_vec(), module))
    })?;
    let io = |what: &Path, e: std::io::Error| {
        Failure::new(exit::IO, format!("writing {}: {e}", what.display()))
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(cache)
        .map_err(|e| io(cache, e))?;
    let tmp = cache.join(format!(".sha256-{hex}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(&tmp)
        .map_err(|e| io(&tmp, e))?;
    for (name, bytes) in [("manifest.json", &raw), ("module.wasm", &module)] {
        let path = tmp.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| io(&path, e))?;
    }
    match std::fs::rename(&tmp, &entry) {
        Ok(()) => {}
        // Another pull of the same digest got there first: the same bytes.
        Err(_) if entry.exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(io(&entry, e));
        }
    }
    if let Ok(dir) = std::fs::File::open(cache) {
        let _ = dir.sync_all();
    }
    Ok(entry)
}

/// The module of a Wasm artifact whose manifest is `manifest`: its one `application/wasm`
/// layer, checked against the layer's digest.
async fn wasm_layer(
    client: &WasmClient,
    r: &OciRef,
    manifest: &OciImageManifest,
) -> Result<Vec<u8>, Failure> {
    if manifest.config.media_type != WASM_MANIFEST_CONFIG_MEDIA_TYPE {
        return Err(Failure::new(
            exit::REFUSED,
            format!(
                "{}: not a Wasm artifact: its config is {:?}, not {WASM_MANIFEST_CONFIG_MEDIA_TYPE:?}",
                r.text, manifest.config.media_type
            ),
        ));
    }
    let layer = match manifest.layers.as_slice() {
        [layer] if layer.media_type == WASM_LAYER_MEDIA_TYPE => layer.clone(),
        layers => {
            return Err(Failure::new(
                exit::REFUSED,
                format!(
                    "{}: a Wasm artifact has one {WASM_LAYER_MEDIA_TYPE:?} layer; this one has {}",
                    r.text,
                    describe_layers(layers)
                ),
            ));
        }
    };
    if !(0..=MAX_LAYER_BYTES).contains(&layer.size) {
        return Err(Failure::new(
            exit::REFUSED,
            format!(
                "{}: its layer is {} bytes, more than the {MAX_LAYER_BYTES} this tool pulls",
                r.text, layer.size
            ),
        ));
    }
    let bar = progress(layer.size as u64, &r.text);
    let mut sink = Collect {
        bytes: Vec::with_capacity(layer.size as usize),
        bar: bar.clone(),
    };
    let pulled = client.pull_blob(&r.reference, &layer, &mut sink).await;
    bar.finish_and_clear();
    match pulled {
        Ok(()) => {}
        Err(OciDistributionError::DigestError(e)) => return Err(tampered(r, &layer, &e)),
        Err(e) => return Err(failed(r, "pulling the layer", &e)),
    }
    // Checked here too: what is loaded is what the manifest names, whatever the client
    // library verifies.
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(&sink.bytes)));
    if actual != layer.digest {
        return Err(tampered(r, &layer, &actual));
    }
    Ok(sink.bytes)
}

fn tampered(r: &OciRef, layer: &OciDescriptor, got: &dyn std::fmt::Display) -> Failure {
    Failure::new(
        exit::REFUSED,
        format!(
            "{}: the layer the registry sent does not match its digest {} ({got}); refused",
            r.text, layer.digest
        ),
    )
}

fn describe_layers(layers: &[OciDescriptor]) -> String {
    if layers.is_empty() {
        return "none".into();
    }
    let types: Vec<String> = layers
        .iter()
        .map(|l| format!("{:?}", l.media_type))
        .collect();
    format!("{} ({})", layers.len(), types.join(", "))
}

/// A progress bar on a terminal (stderr): bytes, total and rate. Hidden elsewhere.
fn progress(total: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} {bar:30} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}",
    ) {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar
}

/// Collects a pulled blob, counting it on the progress bar.
struct Collect {
    bytes: Vec<u8>,
    bar: ProgressBar,
}

impl tokio::io::AsyncWrite for Collect {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.bytes.len() + buf.len() > MAX_LAYER_BYTES as usize {
            return Poll::Ready(Err(std::io::Error::other(
                "the layer is larger than its manifest says",
            )));
        }
        this.bytes.extend_from_slice(buf);
        this.bar.inc(buf.len() as u64);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Publish `bytes` (a core module or a component) as `r`, in the CNCF layout: `os` is
/// `wasip2` for a component (with its WIT imports and exports in the config) and `wasip1`
/// for a core module.
pub fn push(bytes: Vec<u8>, r: &OciRef, insecure: bool) -> Result<Pushed, Failure> {
    let component = bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[6..8] == [1, 0];
    let (config, layer) = if component {
        WasmConfig::from_raw_component(bytes, None)
    } else {
        WasmConfig::from_raw_module(bytes, None)
    }
    .map_err(|e| {
        Failure::new(
            exit::REFUSED,
            format!("{}: cannot describe the module: {e:#}", r.text),
        )
    })?;
    let os = if component {
        oci_wasm::COMPONENT_OS
    } else {
        oci_wasm::MODULE_OS
    };
    let layer_digest = layer.sha256_digest();
    let auth = credentials(r.registry())?;
    let client = client(r, insecure);
    runtime()?.block_on(async {
        client
            .push(&r.reference, &auth, layer, config, None)
            .await
            .map_err(|e| match e.downcast::<OciDistributionError>() {
                Ok(e) => failed(r, "pushing", &e),
                Err(e) => Failure::new(exit::UNAVAILABLE, format!("{}: pushing: {e:#}", r.text)),
            })?;
        let manifest_digest = client
            .fetch_manifest_digest(&r.reference, &auth)
            .await
            .map_err(|e| failed(r, "reading back the manifest digest", &e))?;
        Ok(Pushed {
            manifest_digest,
            layer_digest,
            os,
        })
    })
}
