//! Commands: one file per op, each turning a decoded request into a reply value.
//!
//! A command never sees bytes on the wire and never writes; the connection encodes what it
//! returns. Every command is given the caller's [`Tenant`]; access decisions are made by the
//! registry with it.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use serde::Serialize;
use wasmcore_proto::{
    Empty, ExecuteResponse, InfoResponse, ListResponse, LoadResponse, MetricsResponse, Request,
    StatusResponse,
};

use crate::daemon::Daemon;
use crate::error::{Error, Result};
use crate::tenant::Tenant;

mod chain;
mod configure;
mod execute;
mod info;
mod list;
mod load;
mod metrics;
mod status;
mod unload;

/// The success body of any op.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Load(LoadResponse),
    Execute(ExecuteResponse),
    List(ListResponse),
    Info(Box<InfoResponse>),
    Status(Box<StatusResponse>),
    Metrics(Box<MetricsResponse>),
    Empty(Empty),
}

/// Run one request for `tenant`. `fds` are the descriptors that arrived with its line.
pub async fn dispatch(
    daemon: &Arc<Daemon>,
    tenant: &Tenant,
    req: Request,
    fds: Vec<OwnedFd>,
) -> Result<Reply> {
    if !fds.is_empty() && !matches!(&req, Request::Load(l) if l.fd) {
        return Err(Error::bad_request(
            "file descriptors were passed with a request that takes none (only load with \"fd\": true does)",
        ));
    }
    // The future of a request is as large as that of its largest op, and every request
    // moves it: the rare, heavy ops (a load's compilation and storage, an unload's
    // storage) are boxed so that an execution's future stays small (docs/PERFORMANCE.md).
    match req {
        Request::Load(r) => Box::pin(load::apply(daemon, tenant, r, fds))
            .await
            .map(Reply::Load),
        Request::Execute(r) => execute::apply(daemon, tenant, r).await.map(Reply::Execute),
        Request::Chain(r) => chain::apply(daemon, tenant, r).await.map(Reply::Execute),
        Request::List(r) => list::apply(daemon, tenant, r).map(Reply::List),
        Request::Unload(r) => Box::pin(unload::apply(daemon, tenant, r))
            .await
            .map(Reply::Empty),
        Request::Info(r) => info::apply(daemon, tenant, r).map(|i| Reply::Info(Box::new(i))),
        Request::Status(r) => Ok(Reply::Status(Box::new(status::apply(daemon, tenant, r)))),
        Request::Configure(r) => Box::pin(configure::apply(daemon, tenant, r))
            .await
            .map(Reply::Empty),
        Request::Metrics(r) => Ok(Reply::Metrics(Box::new(metrics::apply(daemon, tenant, r)))),
    }
}

/// The input bytes of `execute` / `chain`: `input` (UTF-8) or `input_base64`, not both.
fn input_bytes(
    daemon: &Daemon,
    input: Option<String>,
    input_base64: Option<String>,
) -> Result<Vec<u8>> {
    let bytes = match (input, input_base64) {
        (Some(_), Some(_)) => {
            return Err(Error::bad_request(
                "give either `input` or `input_base64`, not both",
            ));
        }
        (Some(s), None) => s.into_bytes(),
        (None, Some(b)) => wasmcore_proto::decode_base64(&b)
            .map_err(|e| Error::bad_request(format!("input_base64: {e}")))?,
        (None, None) => Vec::new(),
    };
    daemon.executor.check_input(&bytes)?;
    Ok(bytes)
}
