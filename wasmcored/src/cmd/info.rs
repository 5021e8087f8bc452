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
    // What an execution that asks for no limit gets: a provisioning file's, else the config's.
    let declared = bin.provisioned().map(|p| p.limits).unwrap_or_default();
    Ok(InfoResponse {
        info: bin.info(daemon.registry.is_superseded(&bin)),
        imports: bin.imports(),
        exports: bin.exports_info(),
        limits: Limits {
            timeout_ms: declared.timeout_ms.unwrap_or(l.default_timeout_ms),
            memory_limit_mb: declared.memory_limit_mb.unwrap_or(l.default_memory_mb),
            fuel: declared.fuel.or(l.default_fuel),
        },
        state_bytes: daemon.registry.state().usage(&Namespace {
            owner: tenant.uid,
            binary: bin.id,
        }),
        stored_bytes: bin.stored_bytes.load(std::sync::atomic::Ordering::Relaxed),
        functions: bin.glue().functions().to_vec(),
        config: (**bin.config.load()).clone(),
    })
}
