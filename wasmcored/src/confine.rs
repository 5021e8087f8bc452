//! The kernel's confinement of a tenant's worker, applied after it started and before it
//! runs any tenant code (docs/SECURITY.md has what an escape from Wasmtime can then reach).
//!
//! Two steps, because Landlock restricts only the thread that asks and the threads it
//! starts later:
//! 1. [`restrict_files`], while the worker has a single thread: `PR_SET_NO_NEW_PRIVS`, not
//!    dumpable (no ptrace and no `/proc/PID/mem` from another process of the same user),
//!    and a Landlock domain: read-write on the tenant's own subtree of the state directory,
//!    read-only on the public binaries (read-write for an admin's worker, which stores
//!    them), nothing else of the filesystem; no TCP bind or connect; no abstract Unix
//!    sockets or signals outside the domain. What the running kernel's Landlock ABI cannot
//!    enforce is logged as a warning, never skipped silently.
//! 2. [`restrict_syscalls`], once the runtime's threads exist: a seccomp allow-list on every
//!    thread (TSYNC). No `execve`, `ptrace`, `process_vm_*`, `socket`, mount or key calls;
//!    `kill` and `tgkill` only within the process; anything not listed fails with `EPERM`.

use std::collections::BTreeMap;
use std::path::Path;

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, LandlockStatus, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, path_beneath_rules,
};
use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

/// The Landlock ABI whose restrictions the worker asks for: files (1–3: refer, truncate),
/// TCP (4), device ioctls (5), scoped abstract sockets and signals (6).
const WANTED: ABI = ABI::V6;

/// What [`restrict_files`] could enforce on this kernel.
#[derive(Debug, Clone)]
pub struct Confined {
    /// The Landlock ABI the kernel offers (0: none).
    pub landlock_abi: u32,
    /// Every restriction asked for is in force.
    pub landlock_full: bool,
    /// Landlock restrictions the kernel lacks, for the log.
    pub missing: Vec<&'static str>,
}

/// Step 1 (single-threaded): no new privileges, not dumpable, Landlock over `own`
/// (read-write) and `public` (read-only unless `public_writable`).
pub fn restrict_files(
    own: &Path,
    public: &Path,
    public_writable: bool,
) -> anyhow::Result<Confined> {
    nix::sys::prctl::set_no_new_privs().map_err(|e| anyhow::anyhow!("PR_SET_NO_NEW_PRIVS: {e}"))?;
    nix::sys::prctl::set_dumpable(false).map_err(|e| anyhow::anyhow!("PR_SET_DUMPABLE: {e}"))?;
    let all = AccessFs::from_all(WANTED);
    let public_access = if public_writable {
        all
    } else {
        AccessFs::from_read(WANTED)
    };
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)?
        .handle_access(AccessNet::from_all(WANTED))?
        .scope(Scope::from_all(WANTED))?
        .create()?
        .add_rules(path_beneath_rules([own], all))?
        .add_rules(path_beneath_rules([public], public_access))?
        .restrict_self()?;
    let landlock_abi = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => effective_abi as u32,
        _ => 0,
    };
    let missing = [
        (1, "file access (ABI 1)"),
        (2, "renames and links across directories (ABI 2)"),
        (3, "truncation (ABI 3)"),
        (4, "TCP bind and connect (ABI 4; seccomp denies socket() anyway)"),
        (5, "device ioctls (ABI 5)"),
        (6, "abstract Unix sockets and signals outside the worker (ABI 6; seccomp limits kill to the worker anyway)"),
    ]
    .into_iter()
    .filter(|(abi, _)| landlock_abi < *abi)
    .map(|(_, what)| what)
    .collect();
    Ok(Confined {
        landlock_abi,
        landlock_full: status.ruleset == RulesetStatus::FullyEnforced,
        missing,
    })
}

/// Step 2: the seccomp allow-list, on every thread of the process.
pub fn restrict_syscalls() -> anyhow::Result<()> {
    let filter = SeccompFilter::new(
        allowed()?,
        SeccompAction::Errno(nix::libc::EPERM as u32),
        SeccompAction::Allow,
        std::env::consts::ARCH
            .try_into()
            .map_err(|e| anyhow::anyhow!("seccomp on {}: {e:?}", std::env::consts::ARCH))?,
    )?;
    let program: seccompiler::BpfProgram = filter.try_into()?;
    seccompiler::apply_filter_all_threads(&program)?;
    Ok(())
}

/// Argument `arg` equal to one of `values`.
fn any_of(arg: u8, values: &[u64]) -> anyhow::Result<Vec<SeccompRule>> {
    values
        .iter()
        .map(|v| {
            Ok(SeccompRule::new(vec![SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::Eq,
                *v,
            )?])?)
        })
        .collect()
}

/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)` (96 bytes), which Wasmtime's pooling
/// allocator uses to find the pages an instance dirtied.
const PAGEMAP_SCAN: u64 = 0xc060_6610;

/// The system calls a worker makes once it serves: I/O on descriptors it holds, files in
/// its subtree, memory (Wasmtime maps and protects code and linear memories), threads and
/// futexes, timers, signals within the process (Wasmtime's traps).
fn allowed() -> anyhow::Result<BTreeMap<i64, Vec<SeccompRule>>> {
    use nix::libc::*;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = [
        // Descriptors: sockets handed over, files in its subtree, the runtime's epoll.
        SYS_read,
        SYS_write,
        SYS_readv,
        SYS_writev,
        SYS_pread64,
        SYS_pwrite64,
        SYS_close,
        SYS_lseek,
        SYS_fcntl,
        SYS_dup,
        SYS_dup3,
        SYS_pipe2,
        SYS_recvmsg,
        SYS_sendmsg,
        SYS_recvfrom,
        SYS_sendto,
        SYS_shutdown,
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_pwait,
        SYS_epoll_pwait2,
        SYS_eventfd2,
        SYS_ppoll,
        // Files (Landlock decides which).
        SYS_openat,
        SYS_newfstatat,
        SYS_fstat,
        SYS_statx,
        SYS_fstatfs,
        SYS_getdents64,
        SYS_mkdirat,
        SYS_unlinkat,
        SYS_renameat,
        SYS_renameat2,
        SYS_fsync,
        SYS_fdatasync,
        SYS_ftruncate,
        SYS_fallocate,
        SYS_readlinkat,
        SYS_faccessat,
        SYS_faccessat2,
        SYS_getcwd,
        // Memory: linear memories, code, copy-on-write images.
        SYS_mmap,
        SYS_munmap,
        SYS_mprotect,
        SYS_mremap,
        SYS_madvise,
        SYS_brk,
        SYS_mincore,
        SYS_msync,
        SYS_memfd_create,
        SYS_membarrier,
        // Threads, scheduling, time.
        SYS_clone,
        SYS_clone3,
        SYS_futex,
        SYS_set_robust_list,
        SYS_get_robust_list,
        SYS_rseq,
        SYS_sched_yield,
        SYS_sched_getaffinity,
        SYS_nanosleep,
        SYS_clock_nanosleep,
        SYS_clock_gettime,
        SYS_clock_getres,
        SYS_gettimeofday,
        SYS_exit,
        SYS_exit_group,
        SYS_restart_syscall,
        // Identity and facts about itself.
        SYS_getpid,
        SYS_gettid,
        SYS_getppid,
        SYS_getuid,
        SYS_geteuid,
        SYS_getgid,
        SYS_getegid,
        SYS_uname,
        SYS_sysinfo,
        SYS_getrusage,
        SYS_getrandom,
        // Signals: Wasmtime turns guest faults into traps with handlers.
        SYS_rt_sigaction,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_sigaltstack,
    ]
    .into_iter()
    .map(|n| (n, Vec::new()))
    .collect();
    #[cfg(target_arch = "x86_64")]
    for n in [
        SYS_open,
        SYS_stat,
        SYS_lstat,
        SYS_access,
        SYS_rename,
        SYS_mkdir,
        SYS_rmdir,
        SYS_unlink,
        SYS_readlink,
        SYS_poll,
        SYS_epoll_wait,
        SYS_dup2,
        SYS_pipe,
        SYS_arch_prctl,
    ] {
        rules.insert(n, Vec::new());
    }
    // Narrowed by argument.
    let pid = u64::from(std::process::id());
    rules.insert(
        SYS_ioctl,
        any_of(1, &[FIONBIO, FIOCLEX, FIONCLEX, TCGETS, PAGEMAP_SCAN])?,
    );
    rules.insert(
        SYS_prctl,
        any_of(
            0,
            &[PR_SET_NAME as u64, PR_GET_NAME as u64, PR_SET_VMA as u64],
        )?,
    );
    // Reading limits only (the new limit pointer is NULL).
    rules.insert(SYS_prlimit64, any_of(2, &[0])?);
    // Signals to its own threads only.
    rules.insert(SYS_tgkill, any_of(0, &[pid])?);
    rules.insert(SYS_kill, any_of(0, &[pid])?);
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_list_compiles_for_this_machine_and_leaves_out_the_dangerous_calls() {
        let rules = allowed().unwrap();
        for denied in [
            nix::libc::SYS_execve,
            nix::libc::SYS_execveat,
            nix::libc::SYS_ptrace,
            nix::libc::SYS_process_vm_readv,
            nix::libc::SYS_process_vm_writev,
            nix::libc::SYS_socket,
            nix::libc::SYS_connect,
            nix::libc::SYS_bind,
            nix::libc::SYS_mount,
            nix::libc::SYS_umount2,
            nix::libc::SYS_add_key,
            nix::libc::SYS_request_key,
            nix::libc::SYS_keyctl,
            nix::libc::SYS_bpf,
            nix::libc::SYS_unshare,
            nix::libc::SYS_setns,
        ] {
            assert!(!rules.contains_key(&denied), "{denied}");
        }
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Errno(1),
            SeccompAction::Allow,
            std::env::consts::ARCH.try_into().unwrap(),
        )
        .unwrap();
        let program: seccompiler::BpfProgram = filter.try_into().unwrap();
        assert!(!program.is_empty());
    }
}
