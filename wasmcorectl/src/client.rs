//! A blocking protocol client: socket resolution, the server identity check, request lines
//! (optionally with a passed file descriptor) and capped response lines.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Cap on one response line (outputs are capped by the daemon well below this).
pub const MAX_RESPONSE_LINE: u64 = 256 << 20;

/// The shipped socket for tenants with a private /tmp; preferred when present.
pub const RUN_SOCKET: &str = "/run/wasm-core/wasm-core.sock";
/// The socket fixed by the design.
pub const TMP_SOCKET: &str = "/tmp/wasm-core.sock";

/// Why talking to the daemon failed.
#[derive(Debug)]
pub enum ClientError {
    /// Cannot connect, or the socket is not trustworthy.
    Unavailable(String),
    /// The connection broke or the daemon sent something that is not protocol.
    Protocol(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Unavailable(m) | ClientError::Protocol(m) => f.write_str(m),
        }
    }
}

/// Which socket to use: the flag, else WASM_CORE_SOCKET (clap folds both into `explicit`),
/// else the /run socket if it exists, else /tmp.
pub fn resolve_socket(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if Path::new(RUN_SOCKET).exists() {
        return PathBuf::from(RUN_SOCKET);
    }
    PathBuf::from(TMP_SOCKET)
}

/// A connection to the daemon.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connect to `path` and check who is listening before sending anything: root, the
    /// packaged `wasm-core` service user, or the caller itself. Anything else may be a socket
    /// squatted on a shared directory by another user.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|e| {
            ClientError::Unavailable(format!(
                "cannot connect to {}: {e}\n  is the daemon running? start it with `systemctl start wasm-core.socket` (or `make dev` in a checkout), or point --socket / WASM_CORE_SOCKET at its socket",
                path.display()
            ))
        })?;
        check_server_identity(&stream, path)?;
        let writer = stream
            .try_clone()
            .map_err(|e| ClientError::Unavailable(format!("duplicating the socket: {e}")))?;
        Ok(Client {
            reader: BufReader::with_capacity(64 * 1024, stream),
            writer,
        })
    }

    /// The process id of the server (SO_PEERCRED at connect time).
    pub fn server_pid(&self) -> Option<i32> {
        use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
        getsockopt(&self.writer, PeerCredentials)
            .ok()
            .map(|c| c.pid())
    }

    /// Send one request line, with `fd` passed alongside when given.
    pub fn send(&mut self, request: &Value, fd: Option<BorrowedFd<'_>>) -> Result<(), ClientError> {
        let mut line =
            serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push(b'\n');
        let broken = |e: std::io::Error| ClientError::Protocol(format!("sending the request: {e}"));
        match fd {
            None => self.writer.write_all(&line).map_err(broken),
            Some(fd) => send_with_fd(&self.writer, &line, fd).map_err(broken),
        }
    }

    /// Read one response line as JSON.
    pub fn recv(&mut self) -> Result<Value, ClientError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_RESPONSE_LINE)
            .read_until(b'\n', &mut line)
            .map_err(|e| ClientError::Protocol(format!("reading the response: {e}")))?;
        if n == 0 {
            return Err(ClientError::Protocol(
                "the daemon closed the connection without answering (see its log: journalctl -u wasm-core)".into(),
            ));
        }
        if line.last() != Some(&b'\n') {
            return Err(ClientError::Protocol(
                "response line too long or cut off".into(),
            ));
        }
        serde_json::from_slice(&line)
            .map_err(|e| ClientError::Protocol(format!("the daemon sent invalid JSON: {e}")))
    }

    /// Send a request and read its response.
    pub fn call(
        &mut self,
        request: &Value,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, ClientError> {
        match self.send(request, fd) {
            Ok(()) => self.recv(),
            // The daemon may have refused the connection (not allowed, too many connections)
            // and closed it before our request arrived: its explanation is still readable.
            Err(e) => self.recv().map_err(|_| e),
        }
    }
}

fn send_with_fd(sock: &UnixStream, data: &[u8], fd: BorrowedFd<'_>) -> std::io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [std::io::IoSlice::new(data)];
    let sent = sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)?;
    // The descriptor went with the first bytes; the rest of the line follows plainly.
    let mut w = sock;
    w.write_all(&data[sent..])
}

fn check_server_identity(stream: &UnixStream, path: &Path) -> Result<(), ClientError> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(stream, PeerCredentials).map_err(|e| {
        ClientError::Unavailable(format!(
            "reading the server's credentials on {}: {e}",
            path.display()
        ))
    })?;
    let server = cred.uid();
    let me = nix::unistd::getuid().as_raw();
    let service = nix::unistd::User::from_name("wasm-core")
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw());
    if server == 0 || server == me || Some(server) == service {
        return Ok(());
    }
    Err(ClientError::Unavailable(format!(
        "refusing to talk to {}: it is served by uid {server}, which is neither root, the wasm-core service user, nor you (uid {me}).\n  Another user may have created this socket to intercept requests; ask an admin to check, or use --socket {RUN_SOCKET}",
        path.display()
    )))
}
