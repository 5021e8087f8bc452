//! The one error type of the client.

use std::fmt;
use std::io;
use std::path::PathBuf;

use wasmcore_proto::{ErrorBody, ErrorCode};

/// Why a call did not succeed.
///
/// [`Error::Server`] is the daemon's own answer and carries the wire error code
/// ([`Error::code`]); every other variant is about reaching the daemon at all.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// Nothing accepts connections on the socket.
    Connect {
        /// The socket tried.
        socket: PathBuf,
        /// What `connect(2)` said.
        source: io::Error,
    },
    /// The process serving the socket is neither root, the `wasm-core` service user, nor the
    /// caller: another user may have created it to intercept requests. Nothing was sent.
    UntrustedServer {
        /// The socket tried.
        socket: PathBuf,
        /// The uid of the process that listens on it.
        server_uid: u32,
        /// The caller's uid.
        own_uid: u32,
    },
    /// The daemon answered the request with an error.
    Server(Box<ErrorBody>),
    /// The daemon did not answer within the client's timeout. The connection is closed: a
    /// late answer could otherwise be taken for the next request's.
    TimedOut,
    /// Reading from or writing to the socket failed.
    Io(io::Error),
    /// The daemon closed the connection, or sent something that is not the protocol.
    Protocol(String),
    /// A file given to `load` could not be opened or read.
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// An earlier failure (a timeout, a broken connection) left this connection unusable;
    /// connect again.
    Closed,
}

impl Error {
    /// The wire error code when the daemon answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server(body) => Some(body.code),
            _ => None,
        }
    }

    /// The daemon's error answer, with its details (stage, plugin code, backtrace, logs).
    pub fn server_error(&self) -> Option<&ErrorBody> {
        match self {
            Error::Server(body) => Some(body),
            _ => None,
        }
    }

    /// Whether the daemon could not be reached or was not trusted (as opposed to a request
    /// that reached it and failed).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Connect { .. } | Error::UntrustedServer { .. })
    }

    /// Whether retrying the same request later may succeed: the daemon was busy.
    pub fn is_retryable(&self) -> bool {
        self.code() == Some(ErrorCode::Busy)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect { socket, source } => write!(
                f,
                "cannot connect to {}: {source}\n  is the daemon running? start it with `systemctl start wasm-core.socket` (or `make dev` in a checkout), or point WASM_CORE_SOCKET at its socket",
                socket.display()
            ),
            Error::UntrustedServer {
                socket,
                server_uid,
                own_uid,
            } => write!(
                f,
                "refusing to talk to {}: it is served by uid {server_uid}, which is neither root, the wasm-core service user, nor you (uid {own_uid}).\n  Another user may have created this socket to intercept requests; ask an admin to check, or use {}",
                socket.display(),
                crate::RUN_SOCKET
            ),
            Error::Server(body) => write!(f, "{}: {}", body.code, body.message),
            Error::TimedOut => f.write_str("the daemon did not answer in time"),
            Error::Io(e) => write!(f, "talking to the daemon: {e}"),
            Error::Protocol(m) => f.write_str(m),
            Error::File { path, source } => write!(f, "cannot read {}: {source}", path.display()),
            Error::Closed => {
                f.write_str("the connection is unusable after an earlier failure; connect again")
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect { source, .. } | Error::File { source, .. } => Some(source),
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<ErrorBody> for Error {
    fn from(body: ErrorBody) -> Self {
        Error::Server(Box::new(body))
    }
}

/// An I/O error of the socket: a timeout becomes [`Error::TimedOut`].
pub(crate) fn io(e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::TimedOut,
        _ => Error::Io(e),
    }
}
