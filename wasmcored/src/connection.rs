//! One client connection: read capped lines (with any passed file descriptors), decode,
//! dispatch, encode, write. Knows nothing of what a command does.
//!
//! Responses go out in request order. Replies are batched: the connection writes when no
//! further complete request is buffered (or 256 KiB of replies are waiting), so a
//! pipelining client gets one write per batch and a slow reader holds up only its own
//! connection, never the daemon's memory.
//! A line over the cap gets an error and the connection is closed (the stream cannot be
//! resynchronised); any other bad request gets an error and the connection goes on.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::sync::watch;
use wasmcore_proto::{
    ErrorBody, ErrorCode, LineBuffer, LineError, Response, decode_request, encode_line_into,
};

use crate::cmd::{self, Reply};
use crate::daemon::Daemon;
use crate::sys;
use crate::tenant::Tenant;

const READ_CHUNK: usize = 64 * 1024;
/// Replies buffered beyond this are written before the next request is handled, so a client
/// that pipelines requests with large outputs and reads slowly holds at most about this
/// much (plus one reply) in the daemon: the socket's backpressure then stops the reading.
const FLUSH_AT: usize = 256 * 1024;

/// Descriptors that arrived with the stream byte at `offset`.
struct PassedFds {
    offset: u64,
    fds: Vec<OwnedFd>,
    truncated: bool,
}

/// Serve one connection until the peer closes it, it idles out, or the daemon shuts down.
pub async fn serve(
    daemon: Arc<Daemon>,
    stream: UnixStream,
    tenant: Tenant,
    mut shutdown: watch::Receiver<bool>,
) {
    let cfg = daemon.config();
    let mut conn = Connection {
        lines: LineBuffer::new(cfg.server.max_request_bytes),
        out: Vec::with_capacity(4096),
        passed: VecDeque::new(),
        stream,
    };
    let idle = cfg.server.idle_timeout;
    drop(cfg);
    // One timer for the connection's life, not one per read: it is set to the idle
    // timeout from the first wait and, when it fires while the connection was busy since,
    // moved to the idle timeout from the latest wait (docs/PERFORMANCE.md).
    let mut waiting_since = tokio::time::Instant::now();
    let idle_timer = tokio::time::sleep_until(waiting_since + idle);
    tokio::pin!(idle_timer);
    loop {
        // Answer every complete request already buffered.
        loop {
            match conn.next_request(&daemon, &tenant).await {
                Ok(true) => {
                    let batch_done = !conn.lines.has_line() || conn.out.len() >= FLUSH_AT;
                    if batch_done && conn.flush().await.is_err() {
                        return;
                    }
                }
                Ok(false) => break,
                Err(()) => {
                    let _ = conn.flush().await;
                    return;
                }
            }
        }
        if conn.flush().await.is_err() {
            return;
        }
        if *shutdown.borrow() {
            return;
        }
        waiting_since = tokio::time::Instant::now();
        let read = loop {
            tokio::select! {
                r = conn.read_more() => break r,
                _ = shutdown.changed() => return,
                _ = &mut idle_timer => {
                    let deadline = waiting_since + idle;
                    if tokio::time::Instant::now() >= deadline {
                        log::debug!(
                            "connection from uid {} idle for {idle:?}; closing",
                            tenant.uid
                        );
                        return;
                    }
                    idle_timer.as_mut().reset(deadline);
                }
            }
        };
        match read {
            Ok(0) => return, // peer closed
            Ok(_) => {}
            Err(e) => {
                log::debug!("connection from uid {}: read error: {e}", tenant.uid);
                return;
            }
        }
    }
}

struct Connection {
    lines: LineBuffer,
    out: Vec<u8>,
    passed: VecDeque<PassedFds>,
    stream: UnixStream,
}

impl Connection {
    /// Handle the next buffered request. `Ok(false)`: none buffered; `Err`: close.
    async fn next_request(&mut self, daemon: &Arc<Daemon>, tenant: &Tenant) -> Result<bool, ()> {
        let decoded = match self.lines.next_line() {
            Ok(None) => return Ok(false),
            Ok(Some(line)) => decode_request(line),
            Err(LineError::TooLong { max }) => {
                let body = ErrorBody::new(
                    ErrorCode::TooLarge,
                    format!("request line exceeds {max} bytes; closing the connection"),
                );
                encode_line_into(&Response::<Reply>::failure(None, body), &mut self.out);
                return Err(());
            }
        };
        let (first, last) = self.lines.last_line_span();
        let (fds, truncated) = self.take_fds(first, last);
        let response = match decoded {
            Err(e) => Response::failure(e.tag, ErrorBody::new(ErrorCode::BadRequest, e.message)),
            Ok(_) if truncated => Response::failure(
                None,
                ErrorBody::new(
                    ErrorCode::BadRequest,
                    format!(
                        "too many file descriptors passed with one request (at most {})",
                        sys::MAX_FDS_PER_MESSAGE
                    ),
                ),
            ),
            Ok(mut req) => {
                let tag = req.take_tag();
                match cmd::dispatch(daemon, tenant, req, fds, cmd::Origin::Client).await {
                    Ok(reply) => Response::success(tag, reply),
                    Err(e) => Response::failure(tag, e.to_body()),
                }
            }
        };
        encode_line_into(&response, &mut self.out);
        Ok(true)
    }

    /// Descriptors that arrived with bytes of the line spanning `[first, last]`; older
    /// ones (sent with no request that used them) are closed.
    fn take_fds(&mut self, first: u64, last: u64) -> (Vec<OwnedFd>, bool) {
        let mut fds = Vec::new();
        let mut truncated = false;
        while let Some(p) = self.passed.front() {
            if p.offset > last {
                break;
            }
            let p = self.passed.pop_front().expect("front exists");
            if p.offset >= first {
                fds.extend(p.fds);
                truncated |= p.truncated;
            }
        }
        (fds, truncated)
    }

    /// Receive more bytes (and any descriptors). `Ok(0)` on end of stream.
    async fn read_more(&mut self) -> std::io::Result<usize> {
        loop {
            self.stream.readable().await?;
            let fd = self.stream.as_raw_fd();
            let spare = self.lines.spare(READ_CHUNK);
            let res = self
                .stream
                .try_io(Interest::READABLE, || sys::recv_with_fds(fd, spare));
            match res {
                Ok(r) => {
                    self.lines.commit(r.bytes);
                    if !r.fds.is_empty() || r.truncated {
                        // Ancillary data rides on the last segment received with it: tie it
                        // to the line holding the last byte of this read.
                        let offset = self.lines.received_total().saturating_sub(1);
                        self.passed.push_back(PassedFds {
                            offset,
                            fds: r.fds,
                            truncated: r.truncated,
                        });
                    }
                    return Ok(r.bytes);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    continue;
                }
                Err(e) => {
                    return Err(e);
                }
            }
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let r = self.stream.write_all(&self.out).await;
        self.out.clear();
        if self.out.capacity() > 1 << 20 {
            self.out.shrink_to(4096);
        }
        r
    }
}
