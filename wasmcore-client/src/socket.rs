//! Which socket to use, whom to trust behind it, and passing a file descriptor.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use crate::Error;

/// The socket of the packaged service that tenants with a private `/tmp` can reach; used
/// when it exists.
pub const RUN_SOCKET: &str = "/run/wasm-core/wasm-core.sock";
/// The socket fixed by the design, used when [`RUN_SOCKET`] does not exist.
pub const TMP_SOCKET: &str = "/tmp/wasm-core.sock";
/// The environment variable that names the socket.
pub const SOCKET_ENV: &str = "WASM_CORE_SOCKET";

/// The socket to connect to, as `wasmcorectl` chooses it: `explicit` when given, else
/// `$WASM_CORE_SOCKET` when set and not empty, else [`RUN_SOCKET`] when it exists, else
/// [`TMP_SOCKET`].
pub fn resolve_socket(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os(SOCKET_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if Path::new(RUN_SOCKET).exists() {
        return PathBuf::from(RUN_SOCKET);
    }
    PathBuf::from(TMP_SOCKET)
}

/// The uids a client talks to: root, the `wasm-core` service user (when it exists) and
/// the caller.
fn trusted(server: u32) -> bool {
    let me = nix::unistd::getuid().as_raw();
    server == 0
        || server == me
        || nix::unistd::User::from_name("wasm-core")
            .ok()
            .flatten()
            .is_some_and(|u| u.uid.as_raw() == server)
}

/// Check who serves a freshly connected socket, before anything is sent on it.
pub(crate) fn check_server(stream: &impl AsFd, socket: &Path) -> Result<(), Error> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(stream, PeerCredentials).map_err(|e| Error::Connect {
        socket: socket.to_path_buf(),
        source: io::Error::from(e),
    })?;
    if trusted(cred.uid()) {
        return Ok(());
    }
    Err(Error::UntrustedServer {
        socket: socket.to_path_buf(),
        server_uid: cred.uid(),
        own_uid: nix::unistd::getuid().as_raw(),
    })
}

/// The pid of the process that accepted the connection (`SO_PEERCRED`).
pub(crate) fn server_pid(stream: &impl AsFd) -> Option<i32> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    getsockopt(stream, PeerCredentials).ok().map(|c| c.pid())
}

/// Send the first bytes of `data` with `fd` attached (`SCM_RIGHTS`); returns how many bytes
/// went (the rest is written plainly by the caller).
pub(crate) fn send_fd(sock: &impl AsFd, data: &[u8], fd: BorrowedFd<'_>) -> io::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [io::IoSlice::new(data)];
    Ok(sendmsg::<()>(
        sock.as_fd().as_raw_fd(),
        &iov,
        &cmsg,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?)
}
