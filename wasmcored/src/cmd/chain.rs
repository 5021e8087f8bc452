//! `chain`: run binaries in order, each one's output the next one's input.

use wasmcore_proto::{ChainRequest, ExecuteResponse, LimitsRequest};

use crate::daemon::Daemon;
use crate::error::{Error, Result};
use crate::executor::{Executor, Stage};
use crate::registry::Access;
use crate::tenant::Tenant;

pub async fn apply(daemon: &Daemon, tenant: &Tenant, req: ChainRequest) -> Result<ExecuteResponse> {
    let max = daemon.executor.limits_config().max_chain_len;
    if req.binaries.is_empty() {
        return Err(Error::bad_request(
            "`binaries` must name at least one binary",
        ));
    }
    if req.binaries.len() > max {
        return Err(Error::bad_request(format!(
            "a chain may have at most {max} stages, this one has {}",
            req.binaries.len()
        )));
    }
    let limits = daemon.executor.resolve_limits(&req.limits)?;
    let input = super::input_bytes(daemon, req.input, req.input_base64)?;
    // Resolve every stage before running any, so a typo fails fast and runs nothing. A
    // stage is `BINARY` or `BINARY:FUNCTION`. A reference named twice is resolved once, so
    // that a name replaced meanwhile does not run in two versions within one chain.
    let mut resolved: Vec<(&str, std::sync::Arc<crate::registry::Binary>)> = Vec::new();
    let stages = req
        .binaries
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let (reference, function) = wasmcore_proto::split_stage(r);
            let function = function.map(str::to_string);
            let staged = |e: Error| Error::Stage {
                stage: i,
                reference: r.clone(),
                inner: Box::new(e),
            };
            let bin = match resolved.iter().find(|(r, _)| *r == reference) {
                Some((_, bin)) => bin.clone(),
                None => {
                    let bin = daemon
                        .registry
                        .resolve(tenant, reference, Access::Use)
                        .map_err(staged)?;
                    resolved.push((reference, bin.clone()));
                    bin
                }
            };
            Executor::check_function(&bin, function.as_deref()).map_err(staged)?;
            Ok(Stage { bin, function })
        })
        .collect::<Result<Vec<_>>>()?;
    // Limits the chain does not give: the strictest that a stage's provisioning file gives.
    let declared = resolved
        .iter()
        .filter_map(|(_, b)| b.provisioned())
        .map(|p| p.limits)
        .reduce(|a, b| LimitsRequest {
            timeout_ms: min_of(a.timeout_ms, b.timeout_ms),
            memory_limit_mb: min_of(a.memory_limit_mb, b.memory_limit_mb),
            fuel: min_of(a.fuel, b.fuel),
        });
    let limits = match declared.map(|d| req.limits.or(&d)) {
        Some(l) if l != req.limits => daemon.executor.resolve_limits(&l)?,
        _ => limits,
    };
    // Taken before the execution starts and released when it ends, whatever the outcome.
    let _slot = daemon.admit(tenant)?;
    // One per stage, as `metrics` and `list` count them.
    daemon.executions.add(stages.len() as u64);
    let out = daemon
        .executor
        .chain(&stages, tenant.uid, input, &limits)
        .await
        .inspect_err(|e| daemon.note_failure(tenant, None, e))?;
    let mut resp = ExecuteResponse {
        stats: out.stats,
        stages: out.stages,
        logs: out.logs,
        ..ExecuteResponse::default()
    };
    resp.set_output(out.output);
    Ok(resp)
}

/// The smaller of two optional limits; either when only one is given.
fn min_of(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
