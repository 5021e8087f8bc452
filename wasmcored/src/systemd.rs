//! Listeners and the service manager.
//!
//! Under socket activation the listeners come from systemd (`listenfd`, taken in `main`
//! before the runtime starts) and are never unlinked. Without it the daemon binds its
//! socket paths itself (dev mode): mode 0666 because access is decided by peer credentials,
//! never over a path that is not a socket, never over a live daemon.
//! Readiness and status go to systemd with `sd-notify`; without NOTIFY_SOCKET every call is
//! a no-op.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// A listening socket and where it came from.
#[derive(Debug)]
pub struct Listener {
    pub listener: UnixListener,
    /// The path this daemon bound and must remove at exit; `None` for inherited sockets.
    pub bound_path: Option<PathBuf>,
    /// For logs.
    pub describe: String,
}

/// Take the Unix listeners passed by systemd (LISTEN_FDS). Call before any thread starts:
/// it reads and clears the environment.
pub fn take_activated() -> anyhow::Result<Vec<Listener>> {
    let mut fds = listenfd::ListenFd::from_env();
    let mut out = Vec::new();
    for i in 0..fds.len() {
        match fds.take_unix_listener(i) {
            Ok(Some(l)) => {
                let describe = l
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
                    .unwrap_or_else(|| format!("passed fd #{i}"));
                out.push(Listener {
                    listener: l,
                    bound_path: None,
                    describe,
                });
            }
            Ok(None) => {}
            Err(e) => bail!("passed file descriptor #{i} is not a Unix stream listener: {e}"),
        }
    }
    Ok(out)
}

/// Bind `path` for dev mode.
pub fn bind(path: &Path) -> anyhow::Result<Listener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                bail!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                );
            }
            if UnixStream::connect(path).is_ok() {
                bail!(
                    "a daemon is already listening on {}; stop it first or choose another --listen path",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    }
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("setting mode 0666 on {}", path.display()))?;
    Ok(Listener {
        listener,
        bound_path: Some(path.to_path_buf()),
        describe: path.display().to_string(),
    })
}

/// Tell systemd we are ready, with a status line.
pub fn notify_ready(status: &str) {
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(status),
        ],
    );
}

/// Update the status line.
pub fn notify_status(status: &str) {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(status)]);
}

/// Tell systemd we are stopping.
pub fn notify_stopping() {
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("stopping"),
        ],
    );
}

/// Tell systemd a reload started (READY=1 follows when it is done).
pub fn notify_reloading() {
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Reloading,
            sd_notify::NotifyState::Status("reloading"),
        ],
    );
}

/// Pet the watchdog.
pub fn notify_watchdog() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
}

/// The watchdog interval systemd asked for, with the semantics of sd_watchdog_enabled(3):
/// WATCHDOG_USEC gives the interval; WATCHDOG_PID, when set, must be this process.
/// (sd-notify's own helper insists on WATCHDOG_PID being present.)
pub fn watchdog_interval() -> Option<std::time::Duration> {
    watchdog_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<std::time::Duration> {
    let usec: u64 = usec?.parse().ok().filter(|u| *u > 0)?;
    if let Some(pid) = pid
        && pid.parse::<u32>().ok() != Some(me)
    {
        return None;
    }
    Some(std::time::Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::watchdog_from;
    use std::time::Duration;

    #[test]
    fn watchdog_follows_sd_watchdog_enabled() {
        assert_eq!(
            watchdog_from(Some("400000"), None, 7),
            Some(Duration::from_millis(400))
        );
        assert_eq!(
            watchdog_from(Some("400000"), Some("7"), 7),
            Some(Duration::from_millis(400))
        );
        assert_eq!(watchdog_from(Some("400000"), Some("8"), 7), None);
        assert_eq!(watchdog_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_from(Some("x"), None, 7), None);
        assert_eq!(watchdog_from(None, Some("7"), 7), None);
    }
}
