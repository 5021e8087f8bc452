//! Commands: one file per op, each turning a decoded request into a reply value.
//!
//! A command never sees bytes on the wire and never writes; the connection encodes what it
//! returns. Every command is given the caller's [`Tenant`]; access decisions are made by the
//! registry with it.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use serde::Serialize;
use wasmcore_proto::{
    BinaryRequest, ConfigureRequest, Empty, ErrorBody, ErrorCode, ExecuteResponse, InfoResponse,
    ListResponse, LoadResponse, MetricsResponse, Owner, Request, RollbackResponse, StatusResponse,
    VersionsResponse,
};

use crate::control::Ask;
use crate::daemon::Daemon;
use crate::error::{Error, Result};
use crate::registry::Access;
use crate::tenant::Tenant;

mod chain;
mod configure;
mod execute;
mod info;
mod list;
mod load;
mod metrics;
mod rollback;
mod status;
mod unload;
mod versions;

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
    Rollback(RollbackResponse),
    Versions(VersionsResponse),
    Empty(Empty),
    /// The body of a response the broker or another worker made (an admin's view across
    /// tenants), passed on as it was.
    Relayed(serde_json::Map<String, serde_json::Value>),
}

/// Who a request comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A client on a connection this process serves.
    Client,
    /// The broker, for an admin connected to another worker: answered here, never passed on.
    Broker,
}

/// Run one request for `tenant`. `fds` are the descriptors that arrived with its line.
///
/// `OWNER/NAME` references get the owner's uid for its user name first. In a tenant's
/// worker, what crosses tenants goes to the broker: an admin's `list --all`, `metrics` and
/// `status`, and an admin's request naming a binary this worker does not hold, which runs
/// in the worker of its owner. A change to a public binary is seen by every other worker
/// before the caller is answered.
pub async fn dispatch(
    daemon: &Arc<Daemon>,
    tenant: &Tenant,
    req: Request,
    fds: Vec<OwnedFd>,
    origin: Origin,
) -> Result<Reply> {
    if !fds.is_empty() && !matches!(&req, Request::Load(l) if l.fd) {
        return Err(Error::bad_request(
            "file descriptors were passed with a request that takes none (only load with \"fd\": true does)",
        ));
    }
    // An execution that names no user and that this process answers itself (what nearly
    // every request is) runs directly: every `async` layer between the connection and the
    // executor moves the request's future once more. The rest is boxed, so that it does
    // not make every request's future as large as its own (docs/PERFORMANCE.md).
    if runs_here(daemon, tenant, &req, origin) {
        match req {
            Request::Execute(r) => {
                return execute::apply(daemon, tenant, r).await.map(Reply::Execute);
            }
            Request::Chain(r) => return chain::apply(daemon, tenant, r).await.map(Reply::Execute),
            _ => unreachable!("runs_here admits executions only"),
        }
    }
    Box::pin(qualify_and_serve(daemon, tenant, req, fds, origin)).await
}

/// Whether `req` is an `execute` or a `chain` that [`qualify_and_serve`] would pass
/// unchanged to [`run`]: it names no binary by a user name, and it is not an admin's
/// request in a worker for a binary this worker does not hold (which the broker runs in
/// its owner's worker).
fn runs_here(daemon: &Daemon, tenant: &Tenant, req: &Request, origin: Origin) -> bool {
    matches!(req, Request::Execute(_) | Request::Chain(_))
        && !req.references().iter().any(|r| {
            let (reference, _) = wasmcore_proto::split_stage(r);
            matches!(
                wasmcore_proto::split_owner(reference),
                Some(Ok((Owner::User(_), _)))
            )
        })
        && (origin == Origin::Broker
            || daemon.upstream().is_none()
            || !tenant.is_admin()
            || !unresolved_here(daemon, tenant, req))
}

/// [`dispatch`] of any request: user names qualified, then served here or by the broker.
async fn qualify_and_serve(
    daemon: &Arc<Daemon>,
    tenant: &Tenant,
    mut req: Request,
    fds: Vec<OwnedFd>,
    origin: Origin,
) -> Result<Reply> {
    let rewritten = match origin {
        Origin::Client => qualify(daemon, tenant, &mut req).await?,
        Origin::Broker => Vec::new(),
    };
    let reply = serve(daemon, tenant, req, fds, origin).await;
    if rewritten.is_empty() {
        reply
    } else {
        reply.map_err(|e| e.as_written(&rewritten))
    }
}

/// [`dispatch`], the references rewritten.
async fn serve(
    daemon: &Arc<Daemon>,
    tenant: &Tenant,
    req: Request,
    fds: Vec<OwnedFd>,
    origin: Origin,
) -> Result<Reply> {
    let up = match daemon.upstream() {
        Some(up) if origin == Origin::Client => up,
        _ => return run(daemon, tenant, req, fds).await,
    };
    if tenant.is_admin() {
        let ask = match &req {
            Request::List(l) if l.all => Some(Ask::ListAll),
            Request::Metrics(_) => Some(Ask::Metrics),
            Request::Apply(r) => Some(Ask::Apply { dry_run: r.dry_run }),
            Request::Reload(_) => Some(Ask::Reload),
            Request::Status(r) => Some(Ask::Status {
                own: Box::new(status::apply(daemon, tenant, r.clone())),
            }),
            _ => unresolved_here(daemon, tenant, &req).then(|| Ask::Forward {
                request: Box::new(req.clone()),
            }),
        };
        if let Some(ask) = ask {
            return relayed(up.ask(tenant, ask).await?);
        }
    }
    let public_change = match &req {
        // A replace keeps the visibility of the name it replaces.
        Request::Load(l) => {
            l.public
                || l.replace
                    && l.name.as_ref().is_some_and(|name| {
                        daemon
                            .registry
                            .resolve(tenant, name, Access::Use)
                            .is_ok_and(|b| b.public && tenant.is(b.owner))
                    })
        }
        Request::Unload(BinaryRequest { binary, .. })
        | Request::Rollback(BinaryRequest { binary, .. })
        | Request::Configure(ConfigureRequest { binary, .. }) => daemon
            .registry
            .resolve(tenant, binary, Access::Use)
            .is_ok_and(|b| b.public),
        _ => false,
    };
    let reply = run(daemon, tenant, req, fds).await?;
    if public_change {
        relayed(up.ask(tenant, Ask::PublicChanged).await?)?;
    }
    Ok(reply)
}

/// Whether `req` names a binary that this process cannot find for `tenant` (an admin):
/// another tenant's, which the broker finds and runs in its owner's worker, or none, which
/// the broker says in an admin's terms.
fn unresolved_here(daemon: &Daemon, tenant: &Tenant, req: &Request) -> bool {
    req.references().iter().any(|r| {
        let (reference, _) = wasmcore_proto::split_stage(r);
        match uuid::Uuid::parse_str(reference) {
            Ok(id) => daemon.registry.get(id).is_none(),
            Err(_) => matches!(
                daemon.registry.resolve(tenant, reference, Access::Use),
                Err(Error::NotFound(_))
            ),
        }
    })
}

/// Put uids for user names in the `OWNER/NAME` references of `req`: the registry knows
/// owners by uid, and a worker cannot read the user database (the broker looks the names
/// up for it). Other references are left as they are. Returns each reference rewritten,
/// as `(rewritten, as written)`, for the errors.
async fn qualify(
    daemon: &Daemon,
    tenant: &Tenant,
    req: &mut Request,
) -> Result<Vec<(String, String)>> {
    let chain = matches!(req, Request::Chain(_));
    let mut rewritten = Vec::new();
    for (stage, r) in req.references_mut().iter_mut().enumerate() {
        let (reference, function) = wasmcore_proto::split_stage(r);
        let Some(Ok((Owner::User(user), name))) = wasmcore_proto::split_owner(reference) else {
            continue;
        };
        let uid = match uid_of_user(daemon, tenant, user).await {
            Ok(uid) => uid,
            Err(e) if chain => {
                return Err(Error::Stage {
                    stage,
                    reference: r.clone(),
                    inner: Box::new(e),
                });
            }
            Err(e) => return Err(e),
        };
        let qualified = format!("{uid}/{name}");
        let mut stage = qualified.clone();
        if let Some(function) = function {
            stage.push(':');
            stage.push_str(function);
        }
        rewritten.push((qualified, reference.to_string()));
        *r = stage;
    }
    Ok(rewritten)
}

/// The uid of user `name`: from the broker in a worker, else from the user database.
async fn uid_of_user(daemon: &Daemon, tenant: &Tenant, name: &str) -> Result<u32> {
    let Some(up) = daemon.upstream() else {
        let name = name.to_string();
        return tokio::task::spawn_blocking(move || crate::tenant::uid_of_user(&name))
            .await
            .map_err(|e| Error::internal(e.to_string()))?;
    };
    let Reply::Relayed(body) = relayed(
        up.ask(
            tenant,
            Ask::Uid {
                user: name.to_string(),
            },
        )
        .await?,
    )?
    else {
        return Err(Error::internal("the broker answered no uid"));
    };
    body.get("uid")
        .and_then(serde_json::Value::as_u64)
        .and_then(|uid| u32::try_from(uid).ok())
        .ok_or_else(|| Error::internal("the broker answered no uid"))
}

/// A wire response made elsewhere, as this process's result.
pub fn relayed(response: serde_json::Value) -> Result<Reply> {
    let serde_json::Value::Object(mut body) = response else {
        return Err(Error::internal(
            "the broker answered something other than a response",
        ));
    };
    body.remove("tag");
    match body.remove("ok") {
        Some(serde_json::Value::Bool(true)) => Ok(Reply::Relayed(body)),
        _ => {
            let error = body
                .remove("error")
                .and_then(|e| serde_json::from_value::<ErrorBody>(e).ok())
                .unwrap_or_else(|| {
                    ErrorBody::new(
                        ErrorCode::Internal,
                        "the broker answered a malformed failure",
                    )
                });
            Err(Error::Relayed(Box::new(error)))
        }
    }
}

/// Run `req` in this process.
async fn run(
    daemon: &Arc<Daemon>,
    tenant: &Tenant,
    req: Request,
    fds: Vec<OwnedFd>,
) -> Result<Reply> {
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
        Request::Rollback(r) => Box::pin(rollback::apply(daemon, tenant, r))
            .await
            .map(Reply::Rollback),
        Request::Versions(r) => versions::apply(daemon, tenant, r).map(Reply::Versions),
        Request::Apply(_) | Request::Reload(_) if !tenant.is_admin() => {
            Err(Error::Forbidden(format!(
                "only admins may {} the daemon's configuration",
                if matches!(req, Request::Apply(_)) {
                    "apply"
                } else {
                    "reload"
                }
            )))
        }
        Request::Apply(_) | Request::Reload(_) => Err(Error::bad_request(format!(
            "{} is the broker's: this process serves without one (in-process mode)",
            req.op()
        ))),
    }
}

/// Run what a provisioning file declares, for its owner (`tenant`, a provisioning tenant):
/// a `load` (its module in `fds`), a `configure` that also takes the file's limits, an
/// `unload`. Only the broker asks for it ([`crate::control::Call::Provision`]).
pub async fn provision(
    daemon: &Arc<Daemon>,
    tenant: &Tenant,
    req: Request,
    fds: Vec<OwnedFd>,
    provisioned: Option<wasmcore_proto::Provisioned>,
) -> Result<Reply> {
    if let Some(p) = &provisioned {
        daemon
            .executor
            .resolve_limits(&p.limits)
            .map_err(|e| Error::bad_request(format!("[limits]: {e}")))?;
    }
    match (req, provisioned) {
        (Request::Load(r), Some(p)) => Box::pin(load::declared(daemon, tenant, r, fds, Some(p)))
            .await
            .map(Reply::Load),
        (Request::Configure(r), Some(p)) => Box::pin(configure::redeclare(daemon, tenant, r, p))
            .await
            .map(Reply::Empty),
        (Request::Unload(r), None) => Box::pin(unload::apply(daemon, tenant, r))
            .await
            .map(Reply::Empty),
        (req, _) => Err(Error::internal(format!(
            "a {} request is not part of provisioning",
            req.op()
        ))),
    }
}

/// Every figure this process holds, as an admin sees them: a worker's part of an admin's
/// `metrics`, which the broker merges with the other workers'.
pub fn metrics_of_all(daemon: &Daemon) -> MetricsResponse {
    let uid = match daemon.scope {
        crate::tenant::Scope::Tenant(uid) => uid,
        crate::tenant::Scope::All => 0,
    };
    let admin = Tenant::established(uid, uid, Vec::new(), true);
    metrics::apply(daemon, &admin, wasmcore_proto::MetricsRequest::default())
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
