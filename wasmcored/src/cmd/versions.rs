//! `versions`: the versions a name keeps, in the order they became current.

use wasmcore_proto::{BinaryRequest, VersionInfo, VersionsResponse};

use crate::daemon::Daemon;
use crate::error::Result;
use crate::tenant::Tenant;

pub fn apply(daemon: &Daemon, tenant: &Tenant, req: BinaryRequest) -> Result<VersionsResponse> {
    let versions = daemon.registry.versions(tenant, &req.binary)?;
    let current = versions.last().map(|b| b.id);
    let first = versions.first();
    Ok(VersionsResponse {
        name: first.map(|b| b.display_name()).unwrap_or_default(),
        owner_uid: first.map_or(tenant.uid, |b| b.owner),
        public: first.is_some_and(|b| b.public),
        versions: versions
            .iter()
            .map(|b| VersionInfo {
                binary: b.id.to_string(),
                sha256: b.sha256.clone(),
                size: b.size,
                kind: b.kind,
                loaded_at: b.loaded_at,
                current: Some(b.id) == current,
                source: b.source.clone(),
            })
            .collect(),
    })
}
