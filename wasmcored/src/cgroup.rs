//! The broker's cgroup v2 subtree: one child cgroup per tenant worker.
//!
//! Under systemd with `Delegate=` on the service, the service's cgroup belongs to the
//! daemon's user. The broker then moves itself into a leaf (`broker/`, as cgroup v2 allows
//! processes only in leaves once controllers are enabled below a cgroup), enables the `cpu`,
//! `memory` and `pids` controllers that the kernel offers there, and starts each worker in
//! `tenant-<uid>/` with `cpu.weight`, `memory.max` (swap off, the whole worker killed on
//! OOM) and `pids.max` from the tenant's quota. A controller the kernel does not offer (a
//! host whose controllers are bound to cgroup v1) is left out and the log says so; its
//! limit is then kept by the broker as well as it can (see `broker::Broker::tend`).
//!
//! Without a delegated cgroup v2 subtree (dev mode, a unit without `Delegate=`) there is no
//! [`Cgroups`] at all: the scheduler shares the CPU between the workers' equal thread
//! counts.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The controllers the broker sets limits with.
const WANTED: [&str; 3] = ["cpu", "memory", "pids"];

/// The controllers enabled for the workers' cgroups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Controllers {
    pub cpu: bool,
    pub memory: bool,
    pub pids: bool,
}

impl Controllers {
    fn names(self) -> Vec<&'static str> {
        let mut v = Vec::new();
        for (on, name) in [
            (self.cpu, "cpu"),
            (self.memory, "memory"),
            (self.pids, "pids"),
        ] {
            if on {
                v.push(name);
            }
        }
        v
    }
}

/// What a worker's cgroup is set to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `cpu.weight`, 1–10000.
    pub cpu_weight: u64,
    /// `memory.max` in bytes; 0: none.
    pub memory_bytes: u64,
    /// `pids.max`: threads and processes.
    pub pids: u64,
}

/// The delegated subtree the broker manages.
#[derive(Debug)]
pub struct Cgroups {
    /// The service's own cgroup (the delegated one).
    pub dir: PathBuf,
    pub controllers: Controllers,
}

/// A worker's cgroup, made ready before the worker starts.
#[derive(Debug)]
pub struct Slot {
    pub dir: PathBuf,
    /// `cgroup.procs` of `dir`, open for writing: the new process writes `0` to it before it
    /// runs the worker, so nothing of the worker is ever charged elsewhere.
    pub procs: OwnedFd,
}

impl Cgroups {
    /// Take over this process's cgroup if it is a delegated cgroup v2 subtree; `Err` says
    /// why not (for the log).
    pub fn setup() -> Result<Cgroups, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or("this process is in no cgroup v2 hierarchy")?
            .to_string();
        // Only a service's own cgroup is taken over: never a login session's scope that a
        // root shell started the daemon in (its other processes are not the daemon's).
        if !rel.ends_with(".service") {
            return Err(format!(
                "this process's cgroup {rel} is not a systemd service's"
            ));
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
        let mount = cgroup2_mount(&mounts).ok_or("no cgroup v2 file system is mounted")?;
        let dir = mount.join(rel.trim_start_matches('/'));
        for f in ["cgroup.procs", "cgroup.subtree_control"] {
            let p = dir.join(f);
            if nix::unistd::access(&p, nix::unistd::AccessFlags::W_OK).is_err() {
                return Err(format!(
                    "{} is not writable (no Delegate= on the service?)",
                    p.display()
                ));
            }
        }
        // Processes only in leaves: the broker (and anything else already here) moves to
        // `broker/` before controllers are enabled for the children.
        let leaf = dir.join("broker");
        mkdir(&leaf)?;
        let pids = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in pids.split_whitespace() {
            write(&leaf.join("cgroup.procs"), pid).or_else(|e| {
                // A process that has exited meanwhile cannot move.
                if pid == std::process::id().to_string() {
                    Err(e)
                } else {
                    Ok(())
                }
            })?;
        }
        let offered = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        let offered: Vec<&str> = offered.split_whitespace().collect();
        let mut controllers = Controllers::default();
        for name in WANTED {
            if offered.contains(&name)
                && write(&dir.join("cgroup.subtree_control"), &format!("+{name}")).is_ok()
            {
                match name {
                    "cpu" => controllers.cpu = true,
                    "memory" => controllers.memory = true,
                    _ => controllers.pids = true,
                }
            }
        }
        let cg = Cgroups { dir, controllers };
        cg.remove_stale();
        Ok(cg)
    }

    /// What the log says of this subtree.
    pub fn describe(&self) -> String {
        let on = self.controllers.names();
        let off: Vec<&str> = WANTED.iter().copied().filter(|c| !on.contains(c)).collect();
        let mut s = format!(
            "cgroups: each worker in a cgroup of its own under {}",
            self.dir.display()
        );
        if on.is_empty() {
            s.push_str(", without controllers (accounted, not limited)");
        } else {
            s.push_str(&format!(" with {}", on.join(", ")));
        }
        if !off.is_empty() {
            s.push_str(&format!(
                "; not offered here: {} (the broker keeps the memory quota by watching each worker's resident memory; cpu.weight and pids.max are not set)",
                off.join(", ")
            ));
        }
        s
    }

    fn tenant_dir(&self, uid: u32) -> PathBuf {
        self.dir.join(format!("tenant-{uid}"))
    }

    /// The cgroup for `uid`'s next worker, with `limits` set.
    pub fn prepare(&self, uid: u32, limits: Limits) -> Result<Slot, String> {
        let dir = self.tenant_dir(uid);
        mkdir(&dir)?;
        self.set(&dir, limits)?;
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
            .map_err(|e| format!("opening {}/cgroup.procs: {e}", dir.display()))?;
        Ok(Slot {
            dir,
            procs: procs.into(),
        })
    }

    /// Set `limits` on the cgroup of `uid` (at a worker's start and on reload).
    pub fn apply(&self, uid: u32, limits: Limits) -> Result<(), String> {
        let dir = self.tenant_dir(uid);
        if !dir.exists() {
            return Ok(());
        }
        self.set(&dir, limits)
    }

    fn set(&self, dir: &Path, limits: Limits) -> Result<(), String> {
        let c = self.controllers;
        if c.cpu {
            write(&dir.join("cpu.weight"), &limits.cpu_weight.to_string())?;
        }
        if c.memory {
            let max = match limits.memory_bytes {
                0 => "max".to_string(),
                n => n.to_string(),
            };
            write(&dir.join("memory.max"), &max)?;
            // Over its quota a worker is killed, not pushed into swap; and killed whole.
            if dir.join("memory.swap.max").exists() {
                write(&dir.join("memory.swap.max"), "0")?;
            }
            write(&dir.join("memory.oom.group"), "1")?;
        }
        if c.pids {
            write(&dir.join("pids.max"), &limits.pids.to_string())?;
        }
        Ok(())
    }

    /// Whether process `pid` is in `slot`'s cgroup.
    pub fn holds(&self, slot: &Slot, pid: u32) -> bool {
        let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            return false;
        };
        let Some(rel) = s.lines().find_map(|l| l.strip_prefix("0::")) else {
            return false;
        };
        slot.dir.ends_with(rel.trim_start_matches('/'))
    }

    /// Move process `pid` into `slot` (when it could not move itself).
    pub fn admit(&self, slot: &Slot, pid: u32) -> Result<(), String> {
        write(&slot.dir.join("cgroup.procs"), &pid.to_string())
    }

    /// The OOM kills counted in `uid`'s worker cgroup (`memory.events`; 0 without one).
    pub fn oom_kills(&self, uid: u32) -> u64 {
        std::fs::read_to_string(self.tenant_dir(uid).join("memory.events"))
            .ok()
            .and_then(|s| keyed(&s, "oom_kill"))
            .unwrap_or(0)
    }

    /// Remove `uid`'s worker cgroup once its worker has been reaped.
    pub fn remove(&self, uid: u32) {
        let dir = self.tenant_dir(uid);
        // Busy: the tenant's next worker already runs there.
        if let Err(e) = std::fs::remove_dir(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
            && e.raw_os_error() != Some(nix::libc::EBUSY)
        {
            log::warn!(tenant_uid = uid; "removing {}: {e}", dir.display());
        }
    }

    /// Worker cgroups left by an earlier run (their processes ended with it).
    fn remove_stale(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().starts_with("tenant-") {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
}

impl Slot {
    /// The raw descriptor the new process writes `0` to.
    pub fn procs_fd(&self) -> std::os::fd::RawFd {
        self.procs.as_raw_fd()
    }
}

/// The mount point of the cgroup v2 file system whose root is the hierarchy's root.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    // `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER`
    mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let f: Vec<&str> = pre.split_whitespace().collect();
        if *f.get(3)? != "/" {
            return None;
        }
        Some(PathBuf::from(unescape(f.get(4)?)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The value of `key` in a flat-keyed cgroup file (`key value` lines).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

fn mkdir(p: &Path) -> Result<(), String> {
    match std::fs::create_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("creating {}: {e}", p.display())),
    }
}

fn write(p: &Path, value: &str) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| format!("writing {value:?} to {}: {e}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_unified_hierarchy_in_pure_and_hybrid_layouts() {
        let pure =
            "30 1 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        let hybrid = "\
25 1 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
27 25 0:24 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu
";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        // A bind mount of a sub-cgroup is not the hierarchy's root.
        let sub = "40 1 0:26 /system.slice /mnt/cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(sub), None);
        assert_eq!(cgroup2_mount("1 0 8:1 / / rw - ext4 /dev/vda rw\n"), None);
    }

    #[test]
    fn reads_flat_keyed_files() {
        let stat = "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n";
        assert_eq!(keyed(stat, "usage_usec"), Some(1234));
        assert_eq!(keyed(stat, "system_usec"), Some(234));
        assert_eq!(keyed(stat, "nr_periods"), None);
        let events = "low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\noom_group_kill 1\n";
        assert_eq!(keyed(events, "oom_kill"), Some(1));
    }

    #[test]
    fn describes_what_it_enforces() {
        let cg = Cgroups {
            dir: PathBuf::from("/sys/fs/cgroup/system.slice/wasm-core.service"),
            controllers: Controllers {
                cpu: true,
                memory: true,
                pids: true,
            },
        };
        let d = cg.describe();
        assert!(d.contains("with cpu, memory, pids"), "{d}");
        assert!(!d.contains("not offered"), "{d}");
        let bare = Cgroups {
            controllers: Controllers::default(),
            ..cg
        };
        let d = bare.describe();
        assert!(d.contains("without controllers"), "{d}");
        assert!(d.contains("not offered here: cpu, memory, pids"), "{d}");
    }
}
