//! Who is calling: a [`Tenant`] is built once per connection from the peer's kernel
//! credentials (SO_PEERCRED, SO_PEERGROUPS) and passed by reference to every decision.
//!
//! Access is decided on uid/gid only, never on pid and never on strings.

use std::os::fd::AsFd;

/// The caller of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, when the kernel reported them.
    pub groups: Vec<u32>,
    is_admin: bool,
    /// The daemon's provisioning, acting for this tenant on the binaries its files declare
    /// (which no one else may change).
    provisioning: bool,
}

impl Tenant {
    /// A tenant with the given identity; `admin_gids` are the groups whose members are admins.
    /// Root always is, and so is the daemon's own user (the service's `wasm-core`, which
    /// owns the state directory anyway): its `ExecReload=` runs `wasmcorectl reload` as it.
    pub fn new(uid: u32, gid: u32, groups: Vec<u32>, admin_gids: &[u32]) -> Self {
        let is_admin = uid == 0
            || uid == nix::unistd::geteuid().as_raw()
            || admin_gids.iter().any(|g| *g == gid || groups.contains(g));
        Tenant {
            uid,
            gid,
            groups,
            is_admin,
            provisioning: false,
        }
    }

    /// A tenant whose identity and admin standing another part of the daemon already
    /// established from the kernel's credentials: the broker, for a connection it handed to
    /// a worker ([`crate::control::TenantWire`]).
    pub fn established(uid: u32, gid: u32, groups: Vec<u32>, is_admin: bool) -> Self {
        Tenant {
            uid,
            gid,
            groups,
            is_admin,
            provisioning: false,
        }
    }

    /// This tenant as the daemon's provisioning acts for it: only the broker makes one, for
    /// what a provisioning file declares ([`crate::control::Call::Provision`]).
    pub fn provisioning(self) -> Self {
        Tenant {
            provisioning: true,
            ..self
        }
    }

    /// Whether this is the daemon's provisioning acting for the tenant.
    pub fn is_provisioning(&self) -> bool {
        self.provisioning
    }

    /// Root, the daemon's own user, or a member of an admin group.
    pub fn is_admin(&self) -> bool {
        self.is_admin
    }

    /// Whether `uid` is this tenant.
    pub fn is(&self, uid: u32) -> bool {
        self.uid == uid
    }

    /// Read the peer's credentials from a connected Unix socket.
    pub fn from_peer(sock: &impl AsFd, admin_gids: &[u32]) -> std::io::Result<Tenant> {
        use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
        let cred = getsockopt(sock, PeerCredentials).map_err(std::io::Error::from)?;
        let groups = peer_groups(sock).unwrap_or_default();
        Ok(Tenant::new(cred.uid(), cred.gid(), groups, admin_gids))
    }
}

/// Whose binaries a daemon process holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every tenant's (one process for all: in-process tests and benchmarks).
    All,
    /// A tenant's worker: the binaries `uid` owns, the public binaries, and `uid`'s plugin
    /// state.
    Tenant(u32),
}

impl Scope {
    /// Whether a binary of `owner` (public or not) belongs in this process.
    pub fn holds(self, owner: u32, public: bool) -> bool {
        match self {
            Scope::All => true,
            Scope::Tenant(uid) => public || owner == uid,
        }
    }
}

/// The uid of user `name` in the host's user database (blocking: NSS may ask a server).
pub fn uid_of_user(name: &str) -> crate::error::Result<u32> {
    use crate::error::Error;
    match nix::unistd::User::from_name(name) {
        Ok(Some(user)) => Ok(user.uid.as_raw()),
        Ok(None) => Err(Error::NotFound(format!(
            "no user named {name:?} on this host (OWNER in OWNER/NAME is a user name or a uid)"
        ))),
        Err(e) => Err(Error::internal(format!("looking up user {name:?}: {e}"))),
    }
}

/// The user name of `uid`, when the host's user database has one (blocking).
pub fn user_name_of(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// SO_PEERGROUPS (Linux ≥ 4.13): the peer's supplementary groups at connect time.
fn peer_groups(sock: &impl AsFd) -> std::io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd;
    // nix has no wrapper for SO_PEERGROUPS; the raw call lives in `sys` with the rest of the
    // crate's unsafe code.
    crate::sys::getsockopt_peergroups(sock.as_fd().as_raw_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_admin_group_members_are_admins() {
        assert!(Tenant::new(0, 0, vec![], &[]).is_admin());
        assert!(!Tenant::new(1000, 1000, vec![], &[999]).is_admin());
        assert!(Tenant::new(1000, 1000, vec![5, 999], &[999]).is_admin());
        assert!(Tenant::new(1000, 999, vec![], &[999]).is_admin());
    }

    #[test]
    fn reads_own_credentials_from_a_socketpair() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let t = Tenant::from_peer(&a, &[]).unwrap();
        assert_eq!(t.uid, nix::unistd::getuid().as_raw());
        assert_eq!(t.gid, nix::unistd::getgid().as_raw());
    }
}
