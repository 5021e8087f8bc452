//! `wasm-core-metrics`: serves the daemon's metrics to Prometheus as OpenMetrics, from its
//! own process and unit, so that the daemon itself never speaks HTTP.
//!
//! Each scrape of `GET /metrics` asks the daemon for a `metrics` snapshot (as the exporter's
//! user: an admin, so every tenant's figures) and answers it as OpenMetrics text when the
//! scraper asks for it (Prometheus does), else in Prometheus' text format 0.0.4. Nothing
//! else is served: other paths are 404, other methods 405. What a client may send is capped
//! (request head 16 KiB, no body is read), a client gets 5 s to send its request head and
//! 60 s for its whole connection, and at most 32 connections are served at once (more are
//! closed at once).
//!
//! Listeners: the socket systemd passes (`wasm-core-metrics.socket`: TCP on 127.0.0.1:9788,
//! or a Unix socket an admin configures), else `--listen ADDR` (`HOST:PORT`, or a path for a
//! Unix socket), else 127.0.0.1:9788.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

use crate::openmetrics::Format;
use wasmcore_client::{Client, resolve_socket};

/// The port of the packaged socket unit.
pub const DEFAULT_PORT: u16 = 9788;
const MAX_CONNECTIONS: usize = 32;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_HEAD_BYTES: usize = 16 << 10;

/// Serve wasm-core's metrics to Prometheus (OpenMetrics on GET /metrics).
#[derive(Debug, Parser)]
#[command(name = "wasm-core-metrics", version)]
pub struct Args {
    /// The daemon's socket (default: as wasmcorectl resolves it).
    #[arg(long, env = "WASM_CORE_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Where to listen when not socket-activated: HOST:PORT, or the path of a Unix socket.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
}

/// Either kind of listener.
enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Listener {
    async fn accept(&self) -> std::io::Result<Box<dyn Io>> {
        Ok(match self {
            Listener::Tcp(l) => Box::new(l.accept().await?.0),
            Listener::Unix(l) => Box::new(l.accept().await?.0),
        })
    }
}

/// The listener systemd passed, else the one `--listen` names (or the default).
fn listener(args: &Args) -> anyhow::Result<Listener> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() > 0 {
        // The passed socket is TCP or Unix; asking for the wrong kind is an error.
        if let Ok(Some(l)) = fds.take_tcp_listener(0) {
            l.set_nonblocking(true)?;
            return Ok(Listener::Tcp(tokio::net::TcpListener::from_std(l)?));
        }
        if let Some(l) = fds.take_unix_listener(0)? {
            l.set_nonblocking(true)?;
            return Ok(Listener::Unix(tokio::net::UnixListener::from_std(l)?));
        }
    }
    let addr = args
        .listen
        .clone()
        .unwrap_or_else(|| format!("127.0.0.1:{DEFAULT_PORT}"));
    if addr.starts_with('/') || addr.starts_with('.') {
        let l = std::os::unix::net::UnixListener::bind(&addr)
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        l.set_nonblocking(true)?;
        return Ok(Listener::Unix(tokio::net::UnixListener::from_std(l)?));
    }
    let l = std::net::TcpListener::bind(&addr).map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {addr:?}: {e} (--listen takes HOST:PORT, or a Unix socket's path starting with / or .)"
        )
    })?;
    l.set_nonblocking(true)?;
    Ok(Listener::Tcp(tokio::net::TcpListener::from_std(l)?))
}

/// The daemon's snapshot as text in `format`.
fn scrape(socket: &std::path::Path, format: Format) -> Result<String, String> {
    let mut c = Client::connect_to(socket).map_err(|e| e.to_string())?;
    let resp = c
        .call_json(&json!({"op": "metrics"}), None)
        .map_err(|e| e.to_string())?;
    if resp["ok"] != json!(true) {
        return Err(format!("the daemon refused: {}", resp["error"]));
    }
    let m: wasmcore_proto::MetricsResponse =
        serde_json::from_value(resp).map_err(|e| format!("unexpected snapshot: {e}"))?;
    Ok(crate::openmetrics::render(&m, format))
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        content_type.parse().expect("a valid header value"),
    );
    r
}

async fn handle(
    socket: Arc<PathBuf>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    if req.uri().path() != "/metrics" {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "only /metrics is served here\n".into(),
        ));
    }
    if req.method() != Method::GET {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET is served here\n".into(),
        );
        r.headers_mut()
            .insert(hyper::header::ALLOW, "GET".parse().expect("a valid header"));
        return Ok(r);
    }
    let format = Format::negotiate(
        req.headers()
            .get(hyper::header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    // The daemon client blocks: keep it off the runtime's thread.
    let scraped = tokio::task::spawn_blocking(move || scrape(&socket, format))
        .await
        .unwrap_or_else(|e| Err(format!("scrape task failed: {e}")));
    Ok(match scraped {
        Ok(text) => reply(StatusCode::OK, format.content_type(), text),
        Err(e) => {
            eprintln!("wasm-core-metrics: scrape failed: {e}");
            reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                format!("cannot read wasm-core's metrics: {e}\n"),
            )
        }
    })
}

async fn serve(listener: Listener, socket: PathBuf) -> anyhow::Result<()> {
    let socket = Arc::new(socket);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let io = match listener.accept().await {
            Ok(io) => io,
            // A client that went away before accept, or a transient shortage: go on.
            Err(e) => {
                eprintln!("wasm-core-metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let socket = socket.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(
                    TokioIo::new(io),
                    hyper::service::service_fn(move |req| handle(socket.clone(), req)),
                );
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(slot);
        });
    }
}

/// The exporter's `main`.
pub fn main() -> ExitCode {
    let args = Args::parse();
    let socket = resolve_socket(args.socket.as_deref());
    let run = || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // Tokio's listeners are made inside the runtime's context.
        let _guard = rt.enter();
        let l = listener(&args)?;
        rt.block_on(serve(l, socket))
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wasm-core-metrics: {e:#}");
            ExitCode::from(crate::exit::UNAVAILABLE)
        }
    }
}
