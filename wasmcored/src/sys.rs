//! The daemon's only unsafe code: system calls that `nix` does not wrap, and the Wasmtime
//! calls whose preconditions the daemon establishes when a module is loaded.
//!
//! It imports no other module of the crate: what the unsafe code relies on is defined here.

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

/// Load a precompiled component artifact: the same conditions as [`deserialize_module`],
/// for `Component::serialize` output.
pub fn deserialize_component(
    engine: &wasmtime::Engine,
    path: &std::path::Path,
) -> wasmtime::Result<wasmtime::component::Component> {
    // SAFETY: as for deserialize_module: our own checksum-verified serialize() output.
    unsafe { wasmtime::component::Component::deserialize_file(engine, path) }
}

/// Load the code another engine of this process compiled (or loaded) a moment ago, with
/// the same settings: the engines of one worker share each binary this way.
pub fn deserialize_module_bytes(
    engine: &wasmtime::Engine,
    bytes: &[u8],
) -> wasmtime::Result<wasmtime::Module> {
    // SAFETY: `bytes` is `Module::serialize` output of an engine of this process with the
    // same configuration, made from code that was compiled or checked as above.
    unsafe { wasmtime::Module::deserialize(engine, bytes) }
}

/// [`deserialize_module_bytes`] for a component.
pub fn deserialize_component_bytes(
    engine: &wasmtime::Engine,
    bytes: &[u8],
) -> wasmtime::Result<wasmtime::component::Component> {
    // SAFETY: as for deserialize_module_bytes, for `Component::serialize` output.
    unsafe { wasmtime::component::Component::deserialize(engine, bytes) }
}

/// A function export whose signature was checked to be `P -> R` when its module was
/// loaded; only [`CheckedFunc::verified`] makes one, after that check. Executions then
/// skip the per-call type check, which takes a lock in the engine's type registry
/// (docs/PERFORMANCE.md).
pub struct CheckedFunc<P, R> {
    export: wasmtime::ModuleExport,
    _sig: std::marker::PhantomData<fn(P) -> R>,
}

/// The wasm value types of the parameter and result lists plugin exports use.
pub trait Sig {
    fn types() -> Vec<wasmtime::ValType>;
}

impl Sig for () {
    fn types() -> Vec<wasmtime::ValType> {
        Vec::new()
    }
}

impl Sig for i32 {
    fn types() -> Vec<wasmtime::ValType> {
        vec![wasmtime::ValType::I32]
    }
}

impl Sig for (i32, i32) {
    fn types() -> Vec<wasmtime::ValType> {
        vec![wasmtime::ValType::I32, wasmtime::ValType::I32]
    }
}

impl<P, R> CheckedFunc<P, R>
where
    P: wasmtime::WasmParams + Sig,
    R: wasmtime::WasmResults + Sig,
{
    /// The export `name` of `module` if it is a function of exactly the type `P -> R`.
    pub fn verified(module: &wasmtime::Module, name: &str) -> Option<Self> {
        let wasmtime::ExternType::Func(ty) = module.get_export(name)? else {
            return None;
        };
        let same = |have: &mut dyn ExactSizeIterator<Item = wasmtime::ValType>,
                    want: Vec<wasmtime::ValType>| {
            have.len() == want.len() && have.zip(want).all(|(a, b)| wasmtime::ValType::eq(&a, &b))
        };
        if !same(&mut ty.params(), P::types()) || !same(&mut ty.results(), R::types()) {
            return None;
        }
        Some(CheckedFunc {
            export: module.get_export_index(name)?,
            _sig: std::marker::PhantomData,
        })
    }

    /// The export of `instance` as a typed function, without Wasmtime's per-call type
    /// check; `None` unless `instance` is of the module this was checked on.
    pub fn typed<T>(
        &self,
        store: &mut wasmtime::Store<T>,
        instance: &wasmtime::Instance,
    ) -> Option<wasmtime::TypedFunc<P, R>> {
        match instance.get_module_export(&mut *store, &self.export)? {
            // SAFETY: a `CheckedFunc<P, R>` is only made for an export whose type was
            // verified to be exactly `P -> R` (`verified`), and `func` is that export of an
            // instance of that same module (`get_module_export` checks), owned by `store`.
            wasmtime::Extern::Func(func) => {
                Some(unsafe { wasmtime::TypedFunc::new_unchecked(&*store, func) })
            }
            _ => None,
        }
    }
}

/// Make `cmd` start its child with `fds[i].0` at descriptor `fds[i].1` (open across exec,
/// every other descriptor keeps its close-on-exec flag) and with SIGKILL as its
/// parent-death signal, so that a worker never outlives the broker that started it. With
/// `join_cgroup` (an open `cgroup.procs`), the child first moves itself into that cgroup.
pub fn map_fds_and_die_with_parent(
    cmd: &mut std::process::Command,
    fds: [(RawFd, RawFd); 2],
    join_cgroup: Option<RawFd>,
) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (write, fcntl, dup2, close, close_range, prctl); it allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || {
            use nix::libc;
            // Into its cgroup before anything else: `0` moves the writing process. A failure
            // is left to the parent, which checks where the process landed.
            if let Some(fd) = join_cgroup {
                libc::write(fd, b"0".as_ptr().cast(), 1);
            }
            // First out of the way of every target number (a source may sit on another's
            // target), then into place; dup2 leaves the new descriptor open across exec.
            let mut high = [-1; 2];
            for (i, &(from, _)) in fds.iter().enumerate() {
                high[i] = libc::fcntl(from, libc::F_DUPFD_CLOEXEC, 64);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &(_, to)) in fds.iter().enumerate() {
                if libc::dup2(high[i], to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(high[i]);
            }
            // Nothing else the parent had open reaches the worker, not even a descriptor
            // its own parent leaked without FD_CLOEXEC.
            let first_free = fds.iter().map(|&(_, to)| to).max().unwrap_or(2) + 1;
            if libc::syscall(libc::SYS_close_range, first_free, libc::c_uint::MAX, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Take ownership of descriptor `fd`, inherited from the parent at a fixed number; an
/// error if it is not open.
pub fn inherited_fd(fd: RawFd) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: fcntl(F_GETFD) only inspects the descriptor table.
    let flags = unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) };
    if flags < 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "descriptor {fd} is not open (wasmcored --worker is started by the daemon, not by hand)"
            ),
        ));
    }
    // SAFETY: `fd` is open (checked above) and nothing else in this process owns it: it was
    // placed there by the parent for this process alone, and is taken once at start.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: as above; sets close-on-exec on a descriptor this process owns.
    unsafe { nix::libc::fcntl(fd, nix::libc::F_SETFD, flags | nix::libc::FD_CLOEXEC) };
    Ok(owned)
}

/// Ignore SIGTERM, SIGINT and SIGHUP in a worker: stopping is the broker's to decide (it
/// tells each worker over the control channel, and the kernel kills the workers when the
/// broker dies). systemd's stop and a terminal's Ctrl-C reach every process of the service
/// or of the process group; the workers must not die of them before the broker drained
/// their connections.
pub fn ignore_stop_signals() -> std::io::Result<()> {
    use nix::sys::signal::{SigHandler, Signal, signal};
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: SIG_IGN installs no handler code; nothing else in the worker handles
        // these signals.
        unsafe { signal(sig, SigHandler::SigIgn) }.map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// Give the heap's free memory back to the kernel: compiling a module leaves megabytes of
/// freed compiler buffers that a tenant's worker would otherwise keep resident for as long
/// as it lives. The Rust heap is mimalloc's (`mi_collect`, for the calling thread's heap
/// and what other threads abandoned); C code's is glibc's (`malloc_trim`).
pub fn release_free_memory() {
    // SAFETY: both only walk their allocator's own free lists, under its locks.
    unsafe {
        libmimalloc_sys::mi_collect(true);
        nix::libc::malloc_trim(0);
    }
}
