//! The private channels between the broker and a tenant's worker (the broker side is
//! [`crate::broker`], the worker side [`crate::worker`]).
//!
//! Two socketpairs, made by the broker and inherited by the worker at fixed descriptors:
//! - *handover* (`SOCK_SEQPACKET`, broker → worker): one message per descriptor (an accepted
//!   client connection, a file an admin's load names), a [`Handover`] in JSON with exactly
//!   one descriptor (SCM_RIGHTS). A message that arrives with no descriptor, more than one,
//!   or truncated control data is refused.
//! - *control* (`SOCK_STREAM`, both ways): one JSON value per line (serde's externally
//!   tagged enums, which decode without buffering), capped at [`MAX_CONTROL_LINE`]; calls
//!   carry an id and get exactly one reply with that id.
//!
//! The worker trusts what arrives here: only the broker holds the other ends. The `Tenant`
//! of a connection is the one the broker read with SO_PEERCRED at accept. The broker trusts
//! nothing a worker says about identity: an ask is taken as made by the worker's own tenant,
//! with admin rights only if the broker started it as an admin's worker.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use wasmcore_proto::Request;

use crate::config::Config;
use crate::tenant::Tenant;

/// The descriptor number of the handover socket in a worker.
pub const HANDOVER_FD: i32 = 3;
/// The descriptor number of the control socket in a worker.
pub const CONTROL_FD: i32 = 4;
/// The longest control line either side accepts (a listing or metrics of many binaries).
pub const MAX_CONTROL_LINE: usize = 64 << 20;
/// The largest handover message (its JSON; the descriptor rides as ancillary data).
pub const MAX_HANDOVER: usize = 64 << 10;

/// A caller's identity as the broker established it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantWire {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub admin: bool,
}

impl From<&Tenant> for TenantWire {
    fn from(t: &Tenant) -> Self {
        TenantWire {
            uid: t.uid,
            gid: t.gid,
            groups: t.groups.clone(),
            admin: t.is_admin(),
        }
    }
}

impl TenantWire {
    /// The `Tenant` the broker established (only ever built from the broker's channel).
    pub fn tenant(&self) -> Tenant {
        Tenant::established(self.uid, self.gid, self.groups.clone(), self.admin)
    }
}

/// A descriptor the broker hands to a worker, with what it is.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Handover {
    /// An accepted connection of `tenant`; `conn` is the broker's number for it, echoed in
    /// [`FromWorker::Closed`].
    Connection { conn: u64, tenant: TenantWire },
    /// The file the worker asked for with [`Ask::Open`] `id`, opened by the broker.
    File { id: u64 },
    /// A [`ToWorker::Call`] that comes with a descriptor (a module file a provisioning file
    /// names, opened by the broker), answered by [`FromWorker::Reply`] of the same id.
    Call { id: u64, call: Call },
}

/// Broker → worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToWorker {
    /// The first message: the worker's tenant, whether it is an admin (its worker may then
    /// write the public binaries), and the configuration in force.
    Hello {
        uid: u32,
        admin: bool,
        config: Box<Config>,
        /// How long the daemon has been running: a tenant's `status` reports the daemon's
        /// uptime, not its worker's.
        #[serde(default)]
        uptime_ms: u64,
    },
    /// A call the worker answers with [`FromWorker::Reply`] of the same id.
    Call { id: u64, call: Call },
    /// The broker's answer to a worker's [`FromWorker::Ask`].
    Answer {
        id: u64,
        response: serde_json::Value,
    },
    /// The configuration was reloaded.
    Reload { config: Box<Config> },
    /// Finish the connections' current requests and exit.
    Shutdown,
}

/// What the broker asks of a worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Call {
    /// Run `request` for `tenant` here (an admin's request about a binary this worker's
    /// tenant owns); never passed on. The reply is the wire response.
    Request {
        tenant: TenantWire,
        request: Box<Request>,
    },
    /// The binaries this worker's tenant owns: `Vec<BinaryInfo>`.
    Owned,
    /// Every figure this worker holds, as an admin would see it: `MetricsResponse`.
    Metrics,
    /// This worker's counts for an admin's `status`: [`WorkerCounts`].
    Counts,
    /// Public binaries were loaded, changed or removed: read them again from the state
    /// directory. The reply is `null` once done.
    Refresh,
    /// What a provisioning file declares, for its owner `tenant`: a `load` (with `replace`,
    /// its module the descriptor of a [`Handover::Call`]), a `configure` that also takes
    /// the file's limits, or an `unload` of a name. Run with the provisioning's rights over
    /// the binaries it declares (`Tenant::provisioning`). The reply is the wire response.
    Provision {
        tenant: TenantWire,
        request: Box<Request>,
        provisioned: Option<wasmcore_proto::Provisioned>,
    },
}

/// Worker → broker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FromWorker {
    /// Restored and serving.
    Ready,
    /// A handed-over connection ended.
    Closed { conn: u64 },
    /// The answer to [`ToWorker::Call`] `id`.
    Reply {
        id: u64,
        response: serde_json::Value,
    },
    /// Something only the broker can answer, for `tenant`; answered by
    /// [`ToWorker::Answer`] with the same id.
    Ask {
        id: u64,
        tenant: TenantWire,
        ask: Ask,
    },
}

/// What a worker asks of the broker. Every answer is a wire response (`ok`, body or
/// `error`), which the worker relays to its client as it is.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ask {
    /// An admin's request naming a binary this worker does not hold: run it in the worker
    /// of the binary's owner, its references made UUIDs.
    Forward { request: Box<Request> },
    /// The uid of a user name (any tenant: a worker cannot read the user database).
    Uid { user: String },
    /// An admin's `list --all`.
    ListAll,
    /// An admin's `metrics`.
    Metrics,
    /// An admin's `status`: what this worker adds, the rest is the broker's.
    Status {
        own: Box<wasmcore_proto::StatusResponse>,
    },
    /// Public binaries changed here: every other worker reads them again before this
    /// worker answers its client, so the change is visible everywhere once answered.
    PublicChanged,
    /// An admin's `load` by `path`: the broker opens the file (the worker cannot) and hands
    /// it over as [`Handover::File`] with this ask's id, or answers with the failure.
    Open { path: String },
    /// An admin's `apply`: bring the binaries to what the provisioning files declare (or,
    /// with `dry_run`, say what that would change).
    Apply { dry_run: bool },
    /// An admin's `reload`: the config file, then the provisioning files.
    Reload,
}

/// A worker's counts for an admin's `status`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WorkerCounts {
    pub executions: u64,
    pub executions_running: u64,
    pub state_bytes: u64,
    /// The worker's own resident memory and CPU time, as it reads them from the /proc files
    /// it opened before its confinement: the broker's view of /proc may hide a process that
    /// is not dumpable (`ProtectProc=invisible`).
    #[serde(default)]
    pub rss_bytes: u64,
    #[serde(default)]
    pub cpu_us: u64,
}

/// Read one control line (without its newline) into `buf`; `Ok(false)` at end of stream.
/// A line over [`MAX_CONTROL_LINE`] is an error: the channel cannot be resynchronised.
pub async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<bool> {
    buf.clear();
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            if buf.is_empty() {
                return Ok(false);
            }
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "control channel closed in the middle of a line",
            ));
        }
        let (take, done) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        buf.extend_from_slice(&chunk[..take]);
        reader.consume(take);
        if buf.len() > MAX_CONTROL_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("control line over {MAX_CONTROL_LINE} bytes"),
            ));
        }
        if done {
            buf.pop();
            return Ok(true);
        }
    }
}

/// One message as a line.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    wasmcore_proto::encode_line(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_read_whole_and_capped() {
        let data = b"\"ready\"\n{\"closed\":{\"conn\":7}}\npartial".to_vec();
        let mut r = tokio::io::BufReader::with_capacity(5, &data[..]);
        let mut buf = Vec::new();
        assert!(read_line(&mut r, &mut buf).await.unwrap());
        assert!(matches!(
            serde_json::from_slice::<FromWorker>(&buf).unwrap(),
            FromWorker::Ready
        ));
        assert!(read_line(&mut r, &mut buf).await.unwrap());
        assert!(matches!(
            serde_json::from_slice::<FromWorker>(&buf).unwrap(),
            FromWorker::Closed { conn: 7 }
        ));
        assert!(read_line(&mut r, &mut buf).await.is_err(), "torn last line");
        let mut empty: &[u8] = b"";
        assert!(!read_line(&mut empty, &mut buf).await.unwrap());
    }

    #[test]
    fn config_crosses_the_channel_unchanged() {
        let mut c = Config::default();
        c.quotas.users.insert(1001, crate::config::Quota::default());
        c.server.exit_idle_after = Some(std::time::Duration::from_millis(1500));
        let line = encode(&ToWorker::Hello {
            uid: 1001,
            admin: false,
            config: Box::new(c.clone()),
            uptime_ms: 5,
        });
        match serde_json::from_slice::<ToWorker>(&line).unwrap() {
            ToWorker::Hello { uid, config, .. } => {
                assert_eq!(uid, 1001);
                assert_eq!(*config, c);
            }
            other => panic!("{other:?}"),
        }
    }
}
