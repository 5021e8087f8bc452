//! `metrics`: a snapshot of the daemon's counters. A tenant sees its own figures and its own
//! binaries; an admin sees every tenant's, every binary, and the daemon-wide figures (pool,
//! connections, restore).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;

use wasmcore_proto::{
    BinaryMetrics, HistogramData, KindMetrics, MetricsRequest, MetricsResponse, ModuleKind,
    RestoreMetrics, TenantMetrics, sketch_quantile,
};

use crate::daemon::Daemon;
use crate::engine::WASMTIME_VERSION;
use crate::metrics::{Snapshot, TenantStats};
use crate::tenant::Tenant;

pub fn apply(daemon: &Daemon, tenant: &Tenant, _req: MetricsRequest) -> MetricsResponse {
    let all = tenant.is_admin();
    let visible = |uid: u32| all || tenant.is(uid);
    let by_owner: BTreeMap<u32, (usize, u64)> = daemon
        .registry
        .usage_by_owner()
        .into_iter()
        .map(|(uid, n, bytes)| (uid, (n, bytes)))
        .collect();
    let state = daemon.registry.state().usage_by_owner();
    // Every tenant with counters, binaries or state; a tenant who has done nothing yet
    // still sees its own (empty) entry.
    let mut uids: Vec<u32> = daemon
        .metrics
        .tenants()
        .into_iter()
        .map(|(uid, _)| uid)
        .chain(by_owner.keys().copied())
        .chain(state.keys().copied())
        .chain(std::iter::once(tenant.uid))
        .filter(|uid| visible(*uid))
        .collect();
    uids.sort_unstable();
    uids.dedup();
    let tenants = uids
        .into_iter()
        .map(|uid| {
            // Reading makes no entry: a tenant with binaries but no counters reads as zeros.
            let stats = daemon.metrics.existing(uid).unwrap_or_default();
            let (running, open) = daemon.tenant_load(uid);
            let (binaries, binary_bytes) = by_owner.get(&uid).copied().unwrap_or_default();
            tenant_metrics(
                uid,
                &stats,
                running,
                open,
                binaries as u64,
                binary_bytes,
                state.get(&uid).copied().unwrap_or(0),
            )
        })
        .collect();
    let binaries = daemon
        .registry
        .list(tenant, all)
        .unwrap_or_default()
        .into_iter()
        .filter(|b| visible(b.owner))
        .map(|b| {
            let sketch = b.stats.sketch();
            BinaryMetrics {
                binary: b.id.to_string(),
                name: b.name.clone(),
                owner_uid: b.owner,
                kind: b.kind,
                executions: b.stats.started(),
                errors: b.stats.errors(),
                wall_seconds_total: b.stats.wall_seconds(),
                fuel_total: b.stats.fuel(),
                memory_peak_bytes: b.stats.memory_peak(),
                p50_seconds: sketch_quantile(&sketch, 0.5),
                p99_seconds: sketch_quantile(&sketch, 0.99),
                sketch,
            }
        })
        .collect();
    let r = &daemon.restore_report;
    MetricsResponse {
        version: env!("CARGO_PKG_VERSION").to_string(),
        wasmtime_version: WASMTIME_VERSION.to_string(),
        protocol: wasmcore_proto::PROTOCOL_VERSION,
        uptime_seconds: daemon.started.elapsed().as_secs_f64(),
        all_tenants: all,
        connections_open: all.then(|| daemon.connections.load(Relaxed)),
        executions_running: all.then(|| daemon.executor.engine().running_count() as u64),
        pool: all.then(|| daemon.executor.engine().pool()).flatten(),
        restore: all.then_some(RestoreMetrics {
            restored: r.restored as u64,
            recompiled: r.recompiled as u64,
            quarantined: r.quarantined as u64,
        }),
        tenants,
        binaries,
    }
}

fn histogram((buckets, count, sum): Snapshot) -> HistogramData {
    HistogramData {
        buckets,
        count,
        sum,
    }
}

fn tenant_metrics(
    uid: u32,
    t: &TenantStats,
    running: u64,
    open: u64,
    binaries: u64,
    binary_bytes: u64,
    state_bytes: u64,
) -> TenantMetrics {
    let kinds = ModuleKind::ALL
        .iter()
        .map(|k| (*k, t.kind(*k)))
        .filter(|(_, s)| s.executions() > 0)
        .map(|(kind, s)| KindMetrics {
            kind,
            executions: s
                .outcomes()
                .into_iter()
                .map(|(o, n)| (o.to_string(), n))
                .collect(),
            fuel_total: s.fuel(),
            memory_peak_bytes: s.memory_peak(),
            latency_seconds: histogram(s.latency()),
        })
        .collect();
    TenantMetrics {
        uid,
        connections_open: open,
        connections_opened: t.connections_opened.load(Relaxed),
        executions_running: running,
        binaries,
        binary_bytes,
        state_bytes,
        loads_ok: t.loads_ok.load(Relaxed),
        loads_failed: t.loads_failed.load(Relaxed),
        compile_seconds: histogram(t.compile.snapshot()),
        refusals: t
            .refusals()
            .into_iter()
            .map(|(r, n)| (r.to_string(), n))
            .collect(),
        kinds,
        worker_failures: 0,
        worker: None,
    }
}
