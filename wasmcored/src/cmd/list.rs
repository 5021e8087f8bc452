//! `list`: binaries visible to the caller.

use wasmcore_proto::{ListRequest, ListResponse};

use crate::daemon::Daemon;
use crate::error::Result;
use crate::tenant::Tenant;

pub fn apply(daemon: &Daemon, tenant: &Tenant, req: ListRequest) -> Result<ListResponse> {
    let binaries = daemon
        .registry
        .list(tenant, req.all)?
        .iter()
        .map(|b| b.info(daemon.registry.is_superseded(b)))
        .collect();
    Ok(ListResponse { binaries })
}
