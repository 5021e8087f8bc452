//! `load`: compile a module, store it durably and register it for the caller.
//!
//! The module arrives as inline base64, as a file descriptor the client opened itself and
//! passed with SCM_RIGHTS (so the daemon never opens tenants' paths for them), or, for
//! admins only, as a path the daemon opens. The reply is sent only once the binary is on
//! disk (fsynced); if storing fails, nothing is registered.
//!
//! With `replace`, a name the caller has moves to the new binary once it is stored; the
//! versions that fall out of `registry.keep_versions` are then removed from disk.

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use wasmcore_proto::{LoadRequest, LoadResponse};

use crate::daemon::Daemon;
use crate::error::{Error, Result};
use crate::metrics::Refusal;
use crate::registry::{LoadOptions, Loaded};
use crate::store::BinaryMeta;
use crate::tenant::Tenant;

enum Source {
    Bytes(Vec<u8>),
    File(File, String),
}

pub async fn apply(
    daemon: &Arc<Daemon>,
    tenant: &Tenant,
    req: LoadRequest,
    fds: Vec<OwnedFd>,
) -> Result<LoadResponse> {
    declared(daemon, tenant, req, fds, None).await
}

/// [`apply`], for the daemon's provisioning with what the file declares (`provisioned`);
/// `tenant` is then [`Tenant::provisioning`].
pub async fn declared(
    daemon: &Arc<Daemon>,
    tenant: &Tenant,
    req: LoadRequest,
    mut fds: Vec<OwnedFd>,
    provisioned: Option<wasmcore_proto::Provisioned>,
) -> Result<LoadResponse> {
    let sources = usize::from(req.wasm_base64.is_some())
        + usize::from(req.fd)
        + usize::from(req.path.is_some());
    if sources != 1 {
        return Err(Error::bad_request(
            "load needs exactly one module source: `wasm_base64`, `fd: true` with a passed descriptor, or `path` (admins)",
        ));
    }
    if req.public && !tenant.is_admin() {
        return Err(Error::Forbidden(
            "only admins may load public binaries".into(),
        ));
    }
    let source = if let Some(b64) = &req.wasm_base64 {
        // Check the size from the encoded length before decoding anything.
        daemon.registry.check_size(b64.len() / 4 * 3)?;
        Source::Bytes(
            wasmcore_proto::decode_base64(b64)
                .map_err(|e| Error::bad_request(format!("wasm_base64: {e}")))?,
        )
    } else if req.fd {
        if fds.len() != 1 {
            return Err(Error::bad_request(format!(
                "`fd: true` needs exactly one file descriptor passed with the request line, got {}",
                fds.len()
            )));
        }
        Source::File(File::from(fds.remove(0)), "passed file descriptor".into())
    } else {
        let path = req.path.clone().unwrap_or_default();
        if !tenant.is_admin() {
            return Err(Error::Forbidden(
                "only admins may load by `path`; send the module itself (wasmcorectl load passes the open file)".into(),
            ));
        }
        if !std::path::Path::new(&path).is_absolute() {
            return Err(Error::bad_request(format!(
                "path {path:?} is relative: the daemon would resolve it against its own working directory, not yours; give an absolute path (wasmcorectl load sends the file itself)"
            )));
        }
        // A worker cannot open paths outside its subtree: the broker opens it.
        let f = match daemon.upstream() {
            Some(up) => File::from(up.open(tenant, &path).await?),
            None => {
                File::open(&path).map_err(|e| Error::NotFound(format!("opening {path}: {e}")))?
            }
        };
        Source::File(f, path)
    };

    // Compile slots, the tenant's and the daemon's, held by the compiling thread until it
    // ends: a compilation that outlives its deadline still occupies a CPU, so it still counts.
    let own_slot = daemon.admit_load(tenant)?;
    let slot = daemon.loads.clone().try_acquire_owned().map_err(|_| {
        daemon.metrics.refused(tenant.uid, Refusal::CompileSlots);
        Error::Busy(
            "the daemon is compiling as many modules as it may at once (registry.max_concurrent_loads); retry later".into(),
        )
    })?;
    let max_compile = daemon.config().registry.max_compile;
    let deadline = Instant::now() + max_compile;
    let (d, who) = (daemon.clone(), tenant.clone());
    let opts = LoadOptions {
        name: req.name,
        public: req.public,
        config: req.config,
        replace: req.replace,
        source: req.source,
        provisioned,
    };
    // Reading, compiling and writing to disk block: keep them off the async workers.
    let job = tokio::task::spawn_blocking(move || -> Result<_> {
        let _slots = (own_slot, slot);
        let bytes = match source {
            Source::Bytes(b) => b,
            Source::File(f, what) => read_module(&d, f, &what)?,
        };
        let mut compiled = d.registry.compile(&bytes)?;
        // The caller was told at the deadline; a late compile must not register anything.
        if Instant::now() > deadline {
            return Err(too_slow(max_compile));
        }
        let compile_ms = compiled.compile_ms;
        let artifact = compiled.take_artifact();
        let hash = d.registry.engine().compat_hash();
        let loaded = d.registry.insert_with(&who, compiled, opts, |bin| {
            let stored = d
                .store
                .save_binary(&BinaryMeta::of(bin), &bytes, &hash, &artifact)
                .map_err(|e| Error::internal(format!("storing binary {}: {e}", bin.id)))?;
            bin.stored_bytes
                .store(stored, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        })?;
        if let Loaded::New { dropped, .. } = &loaded {
            // Out of the registry already: a removal that fails leaves an entry that the
            // next start restores as one more version, never a lost one.
            for old in dropped {
                if let Err(e) = d.store.remove_binary(old.owner, old.public, old.id) {
                    log::error!("removing version {} from disk: {e}", old.id);
                }
            }
        }
        drop((bytes, artifact));
        crate::sys::release_free_memory();
        Ok((loaded, compile_ms))
    });
    let loaded = match tokio::time::timeout(max_compile, job).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(Error::internal(format!("load task failed: {e}"))),
        Err(_) => Err(too_slow(max_compile)),
    };
    daemon.metrics.load(
        tenant.uid,
        loaded
            .as_ref()
            .ok()
            .map(|(_, ms)| std::time::Duration::from_secs_f64(ms / 1000.0)),
    );
    let (loaded, compile_ms) = loaded?;
    let (bin, replaced, dropped, unchanged) = match loaded {
        Loaded::New {
            bin,
            replaced,
            dropped,
        } => (bin, replaced, dropped, false),
        Loaded::Unchanged(bin) => (bin, None, Vec::new(), true),
    };
    if unchanged {
        log::info!(
            tenant_uid = tenant.uid, binary:% = bin.id, binary_name = bin.display_name().as_str();
            "replace of {} for uid {}: the module is its current version {} (sha256 {}), nothing changed",
            bin.display_name(),
            tenant.uid,
            bin.id,
            bin.sha256
        );
    } else {
        log::info!(
            tenant_uid = tenant.uid, binary:% = bin.id, binary_name = bin.display_name().as_str(), kind = bin.kind.as_str();
            "loaded binary {} ({}, {}, {} bytes, sha256 {}) for uid {}{}{}",
            bin.id,
            bin.display_name(),
            bin.kind,
            bin.size,
            bin.sha256,
            tenant.uid,
            if bin.public { ", public" } else { "" },
            replaced
                .as_ref()
                .map(|r| format!(", replacing {}", r.id))
                .unwrap_or_default()
        );
    }
    for old in &dropped {
        log::info!(
            tenant_uid = tenant.uid, binary:% = old.id, binary_name = old.display_name().as_str();
            "unloaded version {} of {} (registry.keep_versions)",
            old.id,
            old.display_name()
        );
    }
    Ok(LoadResponse {
        binary: bin.id.to_string(),
        name: bin.name.clone(),
        sha256: bin.sha256.clone(),
        size: bin.size,
        kind: bin.kind,
        public: bin.public,
        compile_ms: if unchanged {
            0.0
        } else {
            (compile_ms * 1000.0).round() / 1000.0
        },
        replaced: replaced.map(|r| r.id.to_string()),
        unchanged,
    })
}

fn too_slow(limit: std::time::Duration) -> Error {
    Error::InvalidModule(format!(
        "compilation took longer than {} s; the module is refused",
        limit.as_secs()
    ))
}

/// Read a module from a file, checking it is a regular file within the size cap.
fn read_module(daemon: &Arc<Daemon>, mut f: File, what: &str) -> Result<Vec<u8>> {
    let meta = f
        .metadata()
        .map_err(|e| Error::bad_request(format!("{what}: {e}")))?;
    if meta.file_type().is_dir() {
        return Err(Error::bad_request(format!(
            "{what} is a directory, not a module file"
        )));
    }
    if !meta.file_type().is_file() {
        return Err(Error::bad_request(format!("{what} is not a regular file")));
    }
    daemon.registry.check_size(meta.len() as usize)?;
    let cap = daemon.config().registry.max_module_bytes as u64;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // Read one byte past the cap: a file that grew after fstat is still refused.
    (&mut f)
        .take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::bad_request(format!("reading {what}: {e}")))?;
    daemon.registry.check_size(bytes.len())?;
    Ok(bytes)
}
