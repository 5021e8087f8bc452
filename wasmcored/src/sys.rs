//! The daemon's only unsafe code: system calls that `nix` does not wrap, and two Wasmtime
//! calls whose preconditions the registry establishes when a module is loaded.

#![allow(unsafe_code)]

use std::os::fd::RawFd;

/// SO_PEERGROUPS: the supplementary groups of a Unix socket's peer.
pub fn getsockopt_peergroups(fd: RawFd) -> std::io::Result<Vec<u32>> {
    let mut groups: Vec<nix::libc::gid_t> = vec![0; 64];
    loop {
        let mut len =
            (groups.len() * std::mem::size_of::<nix::libc::gid_t>()) as nix::libc::socklen_t;
        // SAFETY: `groups` is a writable buffer of `len` bytes that outlives the call; the
        // kernel writes at most `len` bytes and updates `len`.
        let rc = unsafe {
            nix::libc::getsockopt(
                fd,
                nix::libc::SOL_SOCKET,
                nix::libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<nix::libc::gid_t>();
        if rc == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        // ERANGE: the buffer was too small and `len` now holds the size needed.
        if err.raw_os_error() == Some(nix::libc::ERANGE) && n > groups.len() && n <= 65536 {
            groups.resize(n, 0);
            continue;
        }
        return Err(err);
    }
}

/// Most file descriptors accepted with one message; more are truncated by the kernel.
pub const MAX_FDS_PER_MESSAGE: usize = 4;

/// The result of [`recv_with_fds`].
#[derive(Debug)]
pub struct Received {
    pub bytes: usize,
    /// Every descriptor that arrived, owned (closed on drop).
    pub fds: Vec<std::os::fd::OwnedFd>,
    /// The kernel had to drop descriptors (more than [`MAX_FDS_PER_MESSAGE`]).
    pub truncated: bool,
}

/// `recvmsg` with room for [`MAX_FDS_PER_MESSAGE`] passed descriptors, received with
/// `MSG_CMSG_CLOEXEC`. Descriptors that arrive are always returned as owned values, also when
/// the control data was truncated, so none can leak.
pub fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> std::io::Result<Received> {
    use nix::libc;
    use std::os::fd::{FromRawFd, OwnedFd};
    const SPACE: usize = 128;
    // CMSG_SPACE for MAX_FDS_PER_MESSAGE ints is well under SPACE bytes.
    let mut cmsg = [0u64; SPACE / 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: zeroed msghdr is a valid "empty" header; all pointers set below point into
    // live local buffers for the duration of the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space =
        unsafe { libc::CMSG_SPACE((MAX_FDS_PER_MESSAGE * std::mem::size_of::<RawFd>()) as u32) }
            as usize;
    msg.msg_controllen = space.min(SPACE) as _;
    // SAFETY: msg describes valid buffers (above).
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* helpers walk the control buffer the kernel filled in, bounded by
    // msg_controllen; each SCM_RIGHTS payload is an array of fds now owned by this process.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = len / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(Received {
        bytes: n as usize,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// Load a precompiled module artifact.
///
/// Wasmtime cannot check that precompiled machine code is what it claims to be, so this is
/// `unsafe` in its API. The artifacts come only from this daemon's own state directory
/// (mode 0700, owned by the service user), were written by `Module::serialize` of an engine
/// with the same compatibility hash (their file name), and are checked against a SHA-256
/// written alongside them before this is called.
pub fn deserialize_module(
    engine: &wasmtime::Engine,
    path: &std::path::Path,
) -> wasmtime::Result<wasmtime::Module> {
    // SAFETY: see above: the file is our own serialize() output, checksum-verified, in a
    // directory no one else can write.
    unsafe { wasmtime::Module::deserialize_file(engine, path) }
}

/// The export `f` of `instance` as a typed function, without Wasmtime's per-call type check.
pub fn checked_typed_func<P, R>(
    store: &mut wasmtime::Store<crate::executor::ExecCtx>,
    instance: &wasmtime::Instance,
    f: &crate::registry::CheckedFunc<P, R>,
) -> Option<wasmtime::TypedFunc<P, R>>
where
    P: wasmtime::WasmParams,
    R: wasmtime::WasmResults,
{
    // `get_module_export` returns None unless `instance` is of the module `f` was checked on.
    match instance.get_module_export(&mut *store, f.export())? {
        // SAFETY: `CheckedFunc<P, R>` is only made for an export whose type the registry
        // verified to be exactly `P -> R` (check_abi), and `func` is that export of an
        // instance of that same module, owned by `store`.
        wasmtime::Extern::Func(func) => {
            Some(unsafe { wasmtime::TypedFunc::new_unchecked(&*store, func) })
        }
        _ => None,
    }
}
