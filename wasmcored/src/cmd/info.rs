//! `info`: one binary's metadata, imports, exports and effective limits.

use wasmcore_proto::{BinaryRequest, InfoResponse, Limits};

use crate::daemon::Daemon;
use crate::error::Result;
use crate::registry::Access;
use crate::state::Namespace;
use crate::tenant::Tenant;

pub fn apply(daemon: &Daemon, tenant: &Tenant, req: BinaryRequest) -> Result<InfoResponse> {
    let bin = daemon.registry.resolve(tenant, &req.binary, Access::Use)?;
    let l = daemon.executor.limits_config();
    Ok(InfoResponse {
        info: bin.info(daemon.registry.is_superseded(&bin)),
        imports: bin.imports(),
        exports: bin.exports_info(),
        limits: Limits {
            timeout_ms: l.default_timeout_ms,
            memory_limit_mb: l.default_memory_mb,
            fuel: l.default_fuel,
        },
        state_bytes: daemon.registry.state().usage(&Namespace {
            owner: tenant.uid,
            binary: bin.id,
        }),
        stored_bytes: bin.stored_bytes.load(std::sync::atomic::Ordering::Relaxed),
        functions: bin.glue.functions().to_vec(),
        config: (**bin.config.load()).clone(),
    })
}
