//! `status`: daemon-wide facts and who the caller is.

use std::sync::atomic::Ordering::Relaxed;

use wasmcore_proto::{Limits, StatusRequest, StatusResponse, TenantInfo};

use crate::daemon::Daemon;
use crate::tenant::Tenant;

pub fn apply(daemon: &Daemon, tenant: &Tenant, _req: StatusRequest) -> StatusResponse {
    let c = daemon.config();
    let l = &c.limits;
    StatusResponse {
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: wasmcore_proto::PROTOCOL_VERSION,
        uptime_s: daemon.started.elapsed().as_secs(),
        binaries: daemon.registry.len() as u64,
        executions: daemon.executions.total(),
        executions_running: daemon.executor.engine().running_count() as u64,
        connections: daemon.connections.load(Relaxed),
        fuel_metering: c.engine.fuel_metering,
        default_limits: Limits {
            timeout_ms: l.default_timeout_ms,
            memory_limit_mb: l.default_memory_mb,
            fuel: l.default_fuel,
        },
        max_limits: Limits {
            timeout_ms: l.max_timeout_ms,
            memory_limit_mb: l.max_memory_mb,
            fuel: l.max_fuel,
        },
        max_module_bytes: c.registry.max_module_bytes as u64,
        max_request_bytes: c.server.max_request_bytes as u64,
        stored_bytes: daemon
            .registry
            .list(tenant, tenant.is_admin())
            .map(|bins| bins.iter().map(|b| b.stored_bytes.load(Relaxed)).sum())
            .unwrap_or(0),
        state_bytes: daemon.registry.state().total_usage(),
        tenant: TenantInfo {
            uid: tenant.uid,
            gid: tenant.gid,
            admin: tenant.is_admin(),
        },
        workers: None,
    }
}
