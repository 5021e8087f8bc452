//! `unload`: remove a binary and its plugin state, from disk first, then from memory. By
//! name, every version of the name goes.

use std::sync::Arc;

use wasmcore_proto::{BinaryRequest, Empty};

use crate::daemon::Daemon;
use crate::error::{Error, Result};
use crate::tenant::Tenant;

pub async fn apply(daemon: &Arc<Daemon>, tenant: &Tenant, req: BinaryRequest) -> Result<Empty> {
    // The current version last: a failure half-way leaves the name on its current version.
    for bin in daemon.registry.unload_plan(tenant, &req.binary)? {
        // Durable removal first: if it fails, the binary stays loaded and the caller is told.
        let (d, id, owner, public) = (daemon.clone(), bin.id, bin.owner, bin.public);
        tokio::task::spawn_blocking(move || d.store.remove_binary(owner, public, id))
            .await
            .map_err(|e| Error::internal(format!("unload task failed: {e}")))?
            .map_err(|e| Error::internal(format!("removing binary {id} from disk: {e}")))?;
        if daemon.registry.unload_one(&bin).is_none() {
            continue;
        }
        log::info!(
            tenant_uid = tenant.uid, owner_uid = bin.owner, binary:% = bin.id, binary_name = bin.display_name().as_str();
            "unloaded binary {} ({}) owned by uid {} at the request of uid {}",
            bin.id,
            bin.display_name(),
            bin.owner,
            tenant.uid
        );
    }
    Ok(Empty {})
}
