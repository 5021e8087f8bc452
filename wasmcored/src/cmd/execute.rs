//! `execute`: run one binary on an input.

use wasmcore_proto::{ExecuteRequest, ExecuteResponse};

use crate::daemon::Daemon;
use crate::error::Result;
use crate::executor::Executor;
use crate::registry::Access;
use crate::tenant::Tenant;

pub async fn apply(
    daemon: &Daemon,
    tenant: &Tenant,
    req: ExecuteRequest,
) -> Result<ExecuteResponse> {
    let limits = daemon.executor.resolve_limits(&req.limits)?;
    let input = super::input_bytes(daemon, req.input, req.input_base64)?;
    let bin = daemon.registry.resolve(tenant, &req.binary, Access::Use)?;
    // A provisioned binary's file may give limits for executions that ask for none.
    let limits = match bin.default_limits(&req.limits) {
        Some(l) => daemon.executor.resolve_limits(&l)?,
        None => limits,
    };
    let function = req.function.as_deref();
    Executor::check_function(&bin, function)?;
    // Taken before the execution starts and released when it ends, whatever the outcome.
    let _slot = daemon.admit(tenant)?;
    daemon.executions.add(1);
    let run = daemon
        .executor
        .execute(&bin, function, tenant.uid, input, &limits)
        .await
        .inspect_err(|e| daemon.note_failure(tenant, Some(&bin), e))?;
    let mut resp = ExecuteResponse {
        stats: run.stats,
        logs: run.logs,
        ..ExecuteResponse::default()
    };
    resp.set_output(run.output);
    Ok(resp)
}
