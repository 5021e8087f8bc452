//! `unload`: remove a binary (and its plugin state).

use wasmcore_proto::{BinaryRequest, Empty};

use crate::error::Result;
use crate::server::Daemon;
use crate::tenant::Tenant;

pub fn apply(daemon: &Daemon, tenant: &Tenant, req: BinaryRequest) -> Result<Empty> {
    let bin = daemon.registry.unload(tenant, &req.binary)?;
    log::info!(
        "unloaded binary {} ({}) owned by uid {} at the request of uid {}",
        bin.id,
        bin.display_name(),
        bin.owner,
        tenant.uid
    );
    Ok(Empty {})
}
