//! The asynchronous client, for Tokio: the same calls as [`crate::blocking::Client`], as
//! futures.

use std::collections::BTreeMap;
use std::future::Future;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use wasmcore_proto::{
    BinaryInfo, ConfigureRequest, Empty, InfoResponse, LineBuffer, ListRequest, ListResponse,
    LoadResponse, MetricsRequest, MetricsResponse, Request, RollbackResponse, StatusRequest,
    StatusResponse, VersionsResponse,
};

use crate::wire::{
    self, ExecOptions, LoadOptions, MAX_REPLY_LINE, Output, Timeout, binary_request, load_request,
};
use crate::{Error, error::io, socket};

/// A connection to the daemon, driven by Tokio.
///
/// Requests on one connection are answered in order; calls take `&mut self`. Open one
/// client per task, or pipeline with [`AsyncClient::execute_many`].
#[derive(Debug)]
pub struct AsyncClient {
    stream: UnixStream,
    buf: LineBuffer,
    out: Vec<u8>,
    socket: PathBuf,
    timeout: Timeout,
    broken: bool,
}

impl AsyncClient {
    /// Connect to the socket [`resolve_socket`](crate::resolve_socket) picks.
    pub async fn connect() -> Result<AsyncClient, Error> {
        AsyncClient::connect_to(crate::resolve_socket(None)).await
    }

    /// Connect to `socket`, and check who serves it before sending anything: root, the
    /// `wasm-core` service user, or the caller ([`Error::UntrustedServer`] otherwise).
    pub async fn connect_to(socket: impl AsRef<Path>) -> Result<AsyncClient, Error> {
        let socket = socket.as_ref();
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| Error::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        socket::check_server(&stream, socket)?;
        Ok(AsyncClient {
            stream,
            buf: LineBuffer::new(MAX_REPLY_LINE),
            out: Vec::with_capacity(4096),
            socket: socket.to_path_buf(),
            timeout: None,
            broken: false,
        })
    }

    /// How long one call may take, from sending its request to its reply (with
    /// [`AsyncClient::execute_many`], for the whole batch). `None` (the default) waits as
    /// long as the daemon takes. After a timeout the connection is unusable
    /// ([`Error::Closed`]).
    pub fn set_timeout(&mut self, timeout: Timeout) {
        self.timeout = timeout;
    }

    /// The socket this client is connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The pid of the daemon (`SO_PEERCRED` at connect time).
    pub fn server_pid(&self) -> Option<i32> {
        socket::server_pid(&self.stream)
    }

    /// Load a module from a file, passing its descriptor (opened here, as the caller).
    pub async fn load_file(
        &mut self,
        path: impl AsRef<Path>,
        opts: &LoadOptions,
    ) -> Result<LoadResponse, Error> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|source| Error::File {
            path: path.to_path_buf(),
            source,
        })?;
        self.load_fd(file.as_fd(), opts).await
    }

    /// Load the module in the regular file open on `fd` (the daemon reads all of it).
    pub async fn load_fd(
        &mut self,
        fd: BorrowedFd<'_>,
        opts: &LoadOptions,
    ) -> Result<LoadResponse, Error> {
        let req = load_request(opts, |r| r.fd = true);
        self.call(&Request::Load(req), Some(fd)).await
    }

    /// Load a module from its bytes (sent inline, base64).
    pub async fn load_bytes(
        &mut self,
        wasm: &[u8],
        opts: &LoadOptions,
    ) -> Result<LoadResponse, Error> {
        let req = load_request(opts, |r| {
            r.wasm_base64 = Some(wasmcore_proto::encode_base64(wasm))
        });
        self.call(&Request::Load(req), None).await
    }

    /// Execute a binary (UUID, name or `OWNER/NAME`) on `input` with the daemon's default limits.
    pub async fn execute(&mut self, binary: &str, input: &[u8]) -> Result<Output, Error> {
        self.execute_with(binary, input, &ExecOptions::default())
            .await
    }

    /// Execute a binary with options: an Extism function, limits.
    pub async fn execute_with(
        &mut self,
        binary: &str,
        input: &[u8],
        opts: &ExecOptions,
    ) -> Result<Output, Error> {
        self.out.clear();
        wire::execute_line(binary, input, opts, &mut self.out);
        self.round_trip(None, wire::decode_output).await
    }

    /// Execute `binary` once per input, every request in flight on this connection at
    /// once; results in the order of `inputs`. The outer error is a failure of the
    /// connection; the inner ones are the daemon's answers to single requests.
    pub async fn execute_many<I>(
        &mut self,
        binary: &str,
        inputs: I,
        opts: &ExecOptions,
    ) -> Result<Vec<Result<Output, Error>>, Error>
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        self.usable()?;
        let n = wire::execute_lines(binary, inputs, opts, &mut self.out);
        let (mut rd, mut wr) = self.stream.split();
        let buf = &mut self.buf;
        let lines = &self.out;
        let work = async {
            let read_all = async {
                let mut results = Vec::with_capacity(n);
                for _ in 0..n {
                    read_line(&mut rd, buf).await?;
                    results.push(wire::batch_reply(buf)?);
                }
                Ok(results)
            };
            let write_all = async { wr.write_all(lines).await.map_err(io) };
            // Written and read at once, so that neither side waits on the other. The replies
            // decide: a failed write also ends the reading (the daemon closes the
            // connection), and a failed read abandons the writing.
            tokio::pin!(read_all, write_all);
            let mut writing = true;
            loop {
                tokio::select! {
                    read = &mut read_all => return read,
                    _ = &mut write_all, if writing => writing = false,
                }
            }
        };
        let result = with_timeout(self.timeout, work).await;
        self.broken = result.is_err();
        wire::release(&mut self.out);
        result
    }

    /// Run a chain: each binary's output is the next one's input (`BINARY:FUNCTION` calls
    /// one function of an Extism plugin).
    pub async fn chain(&mut self, binaries: &[&str], input: &[u8]) -> Result<Output, Error> {
        self.chain_with(binaries, input, &ExecOptions::default())
            .await
    }

    /// Run a chain with limits (which apply to the chain as a whole).
    pub async fn chain_with(
        &mut self,
        binaries: &[&str],
        input: &[u8],
        opts: &ExecOptions,
    ) -> Result<Output, Error> {
        self.out.clear();
        wire::chain_line(binaries, input, opts, &mut self.out);
        self.round_trip(None, wire::decode_output).await
    }

    /// The binaries the caller may execute (`all`: every tenant's; admins only).
    pub async fn list(&mut self, all: bool) -> Result<Vec<BinaryInfo>, Error> {
        let r: ListResponse = self
            .call(&Request::List(ListRequest { tag: None, all }), None)
            .await?;
        Ok(r.binaries)
    }

    /// One binary's details.
    pub async fn info(&mut self, binary: &str) -> Result<InfoResponse, Error> {
        self.call(&Request::Info(binary_request(binary)), None)
            .await
    }

    /// Unload a binary (its owner or an admin).
    pub async fn unload(&mut self, binary: &str) -> Result<(), Error> {
        let _: Empty = self
            .call(&Request::Unload(binary_request(binary)), None)
            .await?;
        Ok(())
    }

    /// Move a name back to the version that was current before its current one (its
    /// owner or an admin); a second rollback undoes the first.
    pub async fn rollback(&mut self, binary: &str) -> Result<RollbackResponse, Error> {
        self.call(&Request::Rollback(binary_request(binary)), None)
            .await
    }

    /// The versions a name keeps, in the order they became current (the current one last).
    pub async fn versions(&mut self, binary: &str) -> Result<VersionsResponse, Error> {
        self.call(&Request::Versions(binary_request(binary)), None)
            .await
    }

    /// Replace an Extism plugin's configuration (its owner or an admin).
    pub async fn configure(
        &mut self,
        binary: &str,
        config: BTreeMap<String, String>,
    ) -> Result<(), Error> {
        let req = ConfigureRequest {
            tag: None,
            binary: binary.to_string(),
            config,
        };
        let _: Empty = self.call(&Request::Configure(req), None).await?;
        Ok(())
    }

    /// Daemon-wide facts, and the caller as the daemon sees it.
    pub async fn status(&mut self) -> Result<StatusResponse, Error> {
        self.call(&Request::Status(StatusRequest::default()), None)
            .await
    }

    /// The daemon's counters: the caller's own, or every tenant's for admins.
    pub async fn metrics(&mut self) -> Result<MetricsResponse, Error> {
        self.call(&Request::Metrics(MetricsRequest::default()), None)
            .await
    }

    /// Send any request and decode its reply as `B`.
    pub async fn call<B: DeserializeOwned>(
        &mut self,
        request: &Request,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<B, Error> {
        self.out.clear();
        wasmcore_proto::encode_line_into(request, &mut self.out);
        self.round_trip(fd, wire::decode).await
    }

    /// Send a request given as JSON and return the reply as JSON, error replies included.
    pub async fn call_json(
        &mut self,
        request: &Value,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, Error> {
        self.out.clear();
        serde_json::to_writer(&mut self.out, request)
            .map_err(|e| Error::Protocol(format!("encoding the request: {e}")))?;
        self.out.push(b'\n');
        self.round_trip(fd, wire::decode_json).await
    }

    fn usable(&self) -> Result<(), Error> {
        if self.broken {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    async fn round_trip<R>(
        &mut self,
        fd: Option<BorrowedFd<'_>>,
        decode: impl FnOnce(&[u8]) -> Result<R, Error>,
    ) -> Result<R, Error> {
        self.usable()?;
        let stream = &mut self.stream;
        let buf = &mut self.buf;
        let out = &self.out;
        let exchange = async {
            let sent = send(stream, out, fd).await;
            // A refused connection's explanation is readable although sending failed.
            match (sent, read_line(stream, buf).await) {
                (_, Ok(())) => Ok(()),
                (Err(e), Err(_)) | (Ok(()), Err(e)) => Err(e),
            }
        };
        if let Err(e) = with_timeout(self.timeout, exchange).await {
            self.broken = true;
            return Err(e);
        }
        let decoded = wire::take_reply(&mut self.buf, decode);
        if matches!(decoded, Err(Error::Protocol(_))) {
            self.broken = true;
        }
        decoded
    }
}

async fn with_timeout<R>(
    timeout: Timeout,
    work: impl Future<Output = Result<R, Error>>,
) -> Result<R, Error> {
    match timeout {
        None => work.await,
        Some(t) => tokio::time::timeout(t, work)
            .await
            .unwrap_or(Err(Error::TimedOut)),
    }
}

async fn send(
    stream: &mut UnixStream,
    data: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), Error> {
    let sent = match fd {
        Some(fd) => stream
            .async_io(Interest::WRITABLE, || socket::send_fd(&*stream, data, fd))
            .await
            .map_err(io)?,
        None => 0,
    };
    stream.write_all(&data[sent..]).await.map_err(io)
}

async fn read_line(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut LineBuffer,
) -> Result<(), Error> {
    while !buf.has_line() {
        if buf.pending().len() > MAX_REPLY_LINE {
            return Err(wire::too_long());
        }
        let n = stream.read(buf.spare(64 * 1024)).await.map_err(io)?;
        if n == 0 {
            return Err(wire::closed_early());
        }
        buf.commit(n);
    }
    Ok(())
}
