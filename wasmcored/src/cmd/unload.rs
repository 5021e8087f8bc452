//! `unload`: remove a binary and its plugin state, from disk first, then from memory.

use std::sync::Arc;

use wasmcore_proto::{BinaryRequest, Empty};

use crate::daemon::Daemon;
use crate::error::{Error, Result};
use crate::registry::Access;
use crate::tenant::Tenant;

pub async fn apply(daemon: &Arc<Daemon>, tenant: &Tenant, req: BinaryRequest) -> Result<Empty> {
    let bin = daemon
        .registry
        .resolve(tenant, &req.binary, Access::Manage)?;
    // Durable removal first: if it fails, the binary stays loaded and the caller is told.
    let (d, id, owner, public) = (daemon.clone(), bin.id, bin.owner, bin.public);
    tokio::task::spawn_blocking(move || d.store.remove_binary(owner, public, id))
        .await
        .map_err(|e| Error::internal(format!("unload task failed: {e}")))?
        .map_err(|e| Error::internal(format!("removing binary {id} from disk: {e}")))?;
    let bin = daemon.registry.unload(tenant, &bin.id.to_string())?;
    log::info!(
        tenant_uid = tenant.uid, owner_uid = bin.owner, binary:% = bin.id, binary_name = bin.display_name().as_str();
        "unloaded binary {} ({}) owned by uid {} at the request of uid {}",
        bin.id,
        bin.display_name(),
        bin.owner,
        tenant.uid
    );
    Ok(Empty {})
}
