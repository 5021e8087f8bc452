//! `configure`: replace an Extism plugin's configuration without reloading it. The owner
//! (or an admin) may; the new map is on disk before any execution sees it, and executions
//! already running keep the map they started with.

use std::sync::Arc;

use wasmcore_proto::{ConfigureRequest, Empty, Provisioned};

use crate::daemon::Daemon;
use crate::error::{Error, Result};
use crate::store::BinaryMeta;
use crate::tenant::Tenant;

pub async fn apply(daemon: &Arc<Daemon>, tenant: &Tenant, req: ConfigureRequest) -> Result<Empty> {
    let (d, who) = (daemon.clone(), tenant.clone());
    // Writing the metadata blocks: keep it off the async workers.
    let bin = tokio::task::spawn_blocking(move || {
        // One configuration change at a time, so the last one written is the one in force.
        let _one = d.configuring.lock().unwrap_or_else(|p| p.into_inner());
        d.registry
            .configure(&who, &req.binary, req.config, |bin, config| {
                let mut meta = BinaryMeta::of(bin);
                meta.config = config.clone();
                d.store.update_meta(&meta).map_err(|e| {
                    Error::internal(format!("storing the configuration of {}: {e}", bin.id))
                })
            })
    })
    .await
    .map_err(|e| Error::internal(format!("configure task failed: {e}")))??;
    log::info!(
        tenant_uid = tenant.uid, owner_uid = bin.owner, binary:% = bin.id, binary_name = bin.display_name().as_str();
        "configured binary {} ({}) owned by uid {}: {} entries, at the request of uid {}",
        bin.id,
        bin.display_name(),
        bin.owner,
        bin.config.load().len(),
        tenant.uid
    );
    Ok(Empty {})
}

/// `configure` for the daemon's provisioning: the configuration and the limits a
/// provisioning file now declares for a binary it declared before (same module).
pub async fn redeclare(
    daemon: &Arc<Daemon>,
    tenant: &Tenant,
    req: ConfigureRequest,
    provisioned: Provisioned,
) -> Result<Empty> {
    let (d, who) = (daemon.clone(), tenant.clone());
    let bin = tokio::task::spawn_blocking(move || {
        let _one = d.configuring.lock().unwrap_or_else(|p| p.into_inner());
        d.registry.redeclare(
            &who,
            &req.binary,
            req.config,
            provisioned,
            |bin, config, provisioned| {
                let mut meta = BinaryMeta::of(bin);
                meta.config = config.clone();
                meta.provisioned = Some(provisioned.clone());
                d.store.update_meta(&meta).map_err(|e| {
                    Error::internal(format!("storing the declaration of {}: {e}", bin.id))
                })
            },
        )
    })
    .await
    .map_err(|e| Error::internal(format!("configure task failed: {e}")))??;
    log::info!(
        owner_uid = bin.owner, binary:% = bin.id, binary_name = bin.display_name().as_str();
        "provisioning: binary {} ({}) of uid {} takes the configuration and limits of {}",
        bin.id,
        bin.display_name(),
        bin.owner,
        bin.provisioned().map(|p| p.file).unwrap_or_default()
    );
    Ok(Empty {})
}
