//! `rollback`: move a name back to the version that was current before its current one.
//! The version's new activation is on disk before any execution sees the name move.

use std::sync::Arc;

use wasmcore_proto::{BinaryRequest, RollbackResponse};

use crate::daemon::Daemon;
use crate::error::{Error, Result};
use crate::store::BinaryMeta;
use crate::tenant::Tenant;

pub async fn apply(
    daemon: &Arc<Daemon>,
    tenant: &Tenant,
    req: BinaryRequest,
) -> Result<RollbackResponse> {
    let (d, who) = (daemon.clone(), tenant.clone());
    // Writing the metadata blocks: keep it off the async workers.
    let (now, was) = tokio::task::spawn_blocking(move || {
        // Metadata is written whole: no configuration change in between.
        let _one = d.configuring.lock().unwrap_or_else(|p| p.into_inner());
        d.registry.rollback(&who, &req.binary, |bin, activation| {
            let mut meta = BinaryMeta::of(bin);
            meta.activation = activation;
            d.store
                .update_meta(&meta)
                .map_err(|e| Error::internal(format!("storing the rollback to {}: {e}", bin.id)))
        })
    })
    .await
    .map_err(|e| Error::internal(format!("rollback task failed: {e}")))??;
    let name = now.display_name();
    log::info!(
        tenant_uid = tenant.uid, owner_uid = now.owner, binary:% = now.id, binary_name = name.as_str();
        "rolled {name} of uid {} back from {} to {} (sha256 {}) at the request of uid {}",
        now.owner,
        was.id,
        now.id,
        now.sha256,
        tenant.uid
    );
    Ok(RollbackResponse {
        name,
        owner_uid: now.owner,
        binary: now.id.to_string(),
        sha256: now.sha256.clone(),
        previous: was.id.to_string(),
    })
}
