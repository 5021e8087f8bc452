//! The blocking client: one connection, one call at a time, or many in flight with
//! [`Client::execute_many`].

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;
use wasmcore_proto::{
    BinaryInfo, ConfigureRequest, Empty, InfoResponse, LineBuffer, ListRequest, ListResponse,
    LoadResponse, MetricsRequest, MetricsResponse, Request, RollbackResponse, StatusRequest,
    StatusResponse, VersionsResponse,
};

use crate::wire::{
    self, ExecOptions, LoadOptions, MAX_REPLY_LINE, Output, Timeout, binary_request, load_request,
};
use crate::{Error, error::io, socket};

/// A connection to the daemon.
///
/// Requests on one connection are answered in order. A `Client` is not shared between
/// threads (calls take `&mut self`); open one per thread, or pipeline with
/// [`Client::execute_many`].
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    buf: LineBuffer,
    out: Vec<u8>,
    socket: PathBuf,
    /// Set by a failure after which replies can no longer be matched to requests.
    broken: bool,
}

impl Client {
    /// Connect to the socket [`resolve_socket`](crate::resolve_socket) picks.
    pub fn connect() -> Result<Client, Error> {
        Client::connect_to(crate::resolve_socket(None))
    }

    /// Connect to `socket`, and check who serves it before sending anything: root, the
    /// `wasm-core` service user, or the caller ([`Error::UntrustedServer`] otherwise).
    pub fn connect_to(socket: impl AsRef<Path>) -> Result<Client, Error> {
        let socket = socket.as_ref();
        let stream = UnixStream::connect(socket).map_err(|source| Error::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
        socket::check_server(&stream, socket)?;
        Ok(Client {
            stream,
            buf: LineBuffer::new(MAX_REPLY_LINE),
            out: Vec::with_capacity(4096),
            socket: socket.to_path_buf(),
            broken: false,
        })
    }

    /// How long one call may wait for the daemon: for its request to be sent and for its
    /// reply (with [`Client::execute_many`], for each reply). `None` (the default) waits as
    /// long as the daemon takes; it enforces its own execution deadlines. After a timeout
    /// the connection is unusable ([`Error::Closed`]).
    pub fn set_timeout(&mut self, timeout: Timeout) -> Result<(), Error> {
        self.stream.set_read_timeout(timeout).map_err(Error::Io)?;
        self.stream.set_write_timeout(timeout).map_err(Error::Io)
    }

    /// The socket this client is connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The pid of the daemon (`SO_PEERCRED` at connect time).
    pub fn server_pid(&self) -> Option<i32> {
        socket::server_pid(&self.stream)
    }

    /// Load a module from a file. The file is opened here, as the caller, and its
    /// descriptor passed to the daemon, which never opens tenants' paths itself.
    pub fn load_file(
        &mut self,
        path: impl AsRef<Path>,
        opts: &LoadOptions,
    ) -> Result<LoadResponse, Error> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|source| Error::File {
            path: path.to_path_buf(),
            source,
        })?;
        self.load_fd(file.as_fd(), opts)
    }

    /// Load the module in the regular file open on `fd` (the daemon reads all of it).
    pub fn load_fd(
        &mut self,
        fd: BorrowedFd<'_>,
        opts: &LoadOptions,
    ) -> Result<LoadResponse, Error> {
        let req = load_request(opts, |r| r.fd = true);
        self.call(&Request::Load(req), Some(fd))
    }

    /// Load a module from its bytes (sent inline, base64).
    pub fn load_bytes(&mut self, wasm: &[u8], opts: &LoadOptions) -> Result<LoadResponse, Error> {
        let req = load_request(opts, |r| {
            r.wasm_base64 = Some(wasmcore_proto::encode_base64(wasm))
        });
        self.call(&Request::Load(req), None)
    }

    /// Execute a binary (UUID, name or `OWNER/NAME`) on `input` with the daemon's default limits.
    pub fn execute(&mut self, binary: &str, input: &[u8]) -> Result<Output, Error> {
        self.execute_with(binary, input, &ExecOptions::default())
    }

    /// Execute a binary with options: an Extism function, limits.
    pub fn execute_with(
        &mut self,
        binary: &str,
        input: &[u8],
        opts: &ExecOptions,
    ) -> Result<Output, Error> {
        self.out.clear();
        wire::execute_line(binary, input, opts, &mut self.out);
        self.round_trip(None, wire::decode_output)
    }

    /// Execute `binary` once per input, every request in flight on this connection at
    /// once; the results come back in the order of `inputs`. The outer error is a failure
    /// of the connection (nothing after it was answered); the inner ones are the daemon's
    /// answers to single requests.
    pub fn execute_many<I>(
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
        let result = pipeline(&self.stream, &mut self.buf, &self.out, n);
        self.broken = result.is_err();
        wire::release(&mut self.out);
        result
    }

    /// Run a chain: each binary's output is the next one's input. A stage is a UUID, a
    /// name, or `BINARY:FUNCTION` for one function of an Extism plugin.
    pub fn chain(&mut self, binaries: &[&str], input: &[u8]) -> Result<Output, Error> {
        self.chain_with(binaries, input, &ExecOptions::default())
    }

    /// Run a chain with limits (which apply to the chain as a whole).
    pub fn chain_with(
        &mut self,
        binaries: &[&str],
        input: &[u8],
        opts: &ExecOptions,
    ) -> Result<Output, Error> {
        self.out.clear();
        wire::chain_line(binaries, input, opts, &mut self.out);
        self.round_trip(None, wire::decode_output)
    }

    /// The binaries the caller may execute (`all`: every tenant's; admins only).
    pub fn list(&mut self, all: bool) -> Result<Vec<BinaryInfo>, Error> {
        let r: ListResponse = self.call(&Request::List(ListRequest { tag: None, all }), None)?;
        Ok(r.binaries)
    }

    /// One binary's details: kind, imports, exports, limits, the caller's state.
    pub fn info(&mut self, binary: &str) -> Result<InfoResponse, Error> {
        self.call(&Request::Info(binary_request(binary)), None)
    }

    /// Unload a binary (its owner or an admin); the caller's plugin state for it goes too.
    pub fn unload(&mut self, binary: &str) -> Result<(), Error> {
        let _: Empty = self.call(&Request::Unload(binary_request(binary)), None)?;
        Ok(())
    }

    /// Move a name back to the version that was current before its current one (its
    /// owner or an admin); a second rollback undoes the first.
    pub fn rollback(&mut self, binary: &str) -> Result<RollbackResponse, Error> {
        self.call(&Request::Rollback(binary_request(binary)), None)
    }

    /// The versions a name keeps, in the order they became current (the current one last).
    pub fn versions(&mut self, binary: &str) -> Result<VersionsResponse, Error> {
        self.call(&Request::Versions(binary_request(binary)), None)
    }

    /// Replace an Extism plugin's configuration (its owner or an admin).
    pub fn configure(
        &mut self,
        binary: &str,
        config: std::collections::BTreeMap<String, String>,
    ) -> Result<(), Error> {
        let req = ConfigureRequest {
            tag: None,
            binary: binary.to_string(),
            config,
        };
        let _: Empty = self.call(&Request::Configure(req), None)?;
        Ok(())
    }

    /// Daemon-wide facts, and the caller as the daemon sees it.
    pub fn status(&mut self) -> Result<StatusResponse, Error> {
        self.call(&Request::Status(StatusRequest::default()), None)
    }

    /// The daemon's counters: the caller's own, or every tenant's for admins.
    pub fn metrics(&mut self) -> Result<MetricsResponse, Error> {
        self.call(&Request::Metrics(MetricsRequest::default()), None)
    }

    /// Send any request and decode its reply as `B`.
    pub fn call<B: DeserializeOwned>(
        &mut self,
        request: &Request,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<B, Error> {
        self.out.clear();
        wasmcore_proto::encode_line_into(request, &mut self.out);
        self.round_trip(fd, wire::decode)
    }

    /// Send a request given as JSON and return the reply as JSON, error replies included
    /// (for tools that pass replies through, as `wasmcorectl --json` does).
    pub fn call_json(
        &mut self,
        request: &Value,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, Error> {
        self.out.clear();
        serde_json::to_writer(&mut self.out, request)
            .map_err(|e| Error::Protocol(format!("encoding the request: {e}")))?;
        self.out.push(b'\n');
        self.round_trip(fd, wire::decode_json)
    }

    fn usable(&self) -> Result<(), Error> {
        if self.broken {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    /// Send `self.out`, read one reply, decode it. A failure to send or receive leaves the
    /// connection broken; an error reply does not.
    fn round_trip<R>(
        &mut self,
        fd: Option<BorrowedFd<'_>>,
        decode: impl FnOnce(&[u8]) -> Result<R, Error>,
    ) -> Result<R, Error> {
        self.usable()?;
        let sent = send(&self.stream, &self.out, fd);
        // The daemon may have refused the connection (too many, not allowed) and closed it
        // before the request arrived: its explanation is still readable.
        let line = read_line(&self.stream, &mut self.buf);
        let result = match (sent, line) {
            (_, Ok(())) => Ok(()),
            (Err(e), Err(_)) | (Ok(()), Err(e)) => Err(e),
        };
        if let Err(e) = result {
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

fn send(mut stream: &UnixStream, data: &[u8], fd: Option<BorrowedFd<'_>>) -> Result<(), Error> {
    let sent = match fd {
        Some(fd) => socket::send_fd(&stream, data, fd).map_err(io)?,
        None => 0,
    };
    stream.write_all(&data[sent..]).map_err(io)
}

/// Read until `buf` holds a complete line.
fn read_line(mut stream: &UnixStream, buf: &mut LineBuffer) -> Result<(), Error> {
    while !buf.has_line() {
        if buf.pending().len() > MAX_REPLY_LINE {
            return Err(wire::too_long());
        }
        let room = buf.spare(64 * 1024);
        let n = stream.read(room).map_err(io)?;
        if n == 0 {
            return Err(wire::closed_early());
        }
        buf.commit(n);
    }
    Ok(())
}

/// Write `lines` (`n` execute requests) and read `n` replies. Batches larger than the
/// socket buffers are written from a second thread so that neither side waits on the
/// other.
fn pipeline(
    stream: &UnixStream,
    buf: &mut LineBuffer,
    lines: &[u8],
    n: usize,
) -> Result<Vec<Result<Output, Error>>, Error> {
    let read_all = |buf: &mut LineBuffer| {
        let mut results = Vec::with_capacity(n);
        for _ in 0..n {
            read_line(stream, buf)?;
            results.push(wire::batch_reply(buf)?);
        }
        Ok(results)
    };
    if lines.len() <= wire::INLINE_BATCH {
        send(stream, lines, None)?;
        return read_all(buf);
    }
    std::thread::scope(|s| {
        let writer = s.spawn(move || send(stream, lines, None));
        let results = read_all(buf);
        if results.is_err() {
            // Unblock the writer: the connection is given up.
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        // Every reply read means every request was written; a write error also ends the
        // reading (the daemon closes the connection), so the reader's result says it all.
        let _ = writer.join();
        results
    })
}
