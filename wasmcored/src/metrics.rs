//! Counters and histograms, cheap on the hot path; the `metrics` op reads them.
//!
//! Every figure is an atomic updated with `Relaxed` ordering: a snapshot is a consistent
//! enough picture for monitoring, and an execution pays a few uncontended atomic adds
//! (docs/PERFORMANCE.md measures it). What every execution adds to is sharded
//! ([`crate::shard`]): two cores running the same tenant's binary do not pass those cache
//! lines between them on every execution. Per tenant (the UID that asked) and kind: executions by
//! outcome, wall time and fuel totals, a latency histogram, the peak memory; admission
//! refusals by reason, connections opened, loads and their compile times. Per binary (kept
//! on the binary, so it goes when the binary is unloaded): errors, wall time, fuel, peak
//! memory and a bounded latency sketch for p50/p99.
//!
//! A leaf module: it knows the wire's kinds and error codes, nothing of the daemon.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwap;
use wasmcore_proto::{ErrorCode, ModuleKind};

use crate::shard::{Sharded, raise};

/// Upper bounds (seconds) of the execution latency histogram's buckets; +Inf follows.
pub const LATENCY_BOUNDS: [f64; 16] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.5, 1.0, 10.0,
];

/// Upper bounds (seconds) of the compile time histogram's buckets; +Inf follows.
pub const COMPILE_BOUNDS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

/// Why an admission was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The tenant's executions running at once (`quotas.concurrent_executions`): `busy`.
    ConcurrentExecutions,
    /// The tenant's loads compiling at once (`quotas.concurrent_loads`): `busy`.
    ConcurrentLoads,
    /// The daemon's compile slots (`registry.max_concurrent_loads`): `busy`.
    CompileSlots,
    /// The tenant's open connections (`quotas.connections`): `busy`.
    Connections,
    /// The daemon's open connections (`server.max_connections`): `busy`.
    MaxConnections,
    /// Every pool slot in use (`engine.pool_instances`): `busy`.
    Pool,
    /// The tenant's binaries (`quotas.binaries`): `quota_exceeded`.
    Binaries,
    /// The tenant's module bytes (`quotas.module_bytes`): `quota_exceeded`.
    ModuleBytes,
    /// The tenant's plugin state (`quotas.state_bytes`): `quota_exceeded`.
    StateBytes,
}

impl Refusal {
    pub const ALL: [Refusal; 9] = [
        Refusal::ConcurrentExecutions,
        Refusal::ConcurrentLoads,
        Refusal::CompileSlots,
        Refusal::Connections,
        Refusal::MaxConnections,
        Refusal::Pool,
        Refusal::Binaries,
        Refusal::ModuleBytes,
        Refusal::StateBytes,
    ];

    /// The reason's name on the wire and in labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::ConcurrentExecutions => "concurrent_executions",
            Refusal::ConcurrentLoads => "concurrent_loads",
            Refusal::CompileSlots => "compile_slots",
            Refusal::Connections => "connections",
            Refusal::MaxConnections => "max_connections",
            Refusal::Pool => "pool",
            Refusal::Binaries => "binaries",
            Refusal::ModuleBytes => "module_bytes",
            Refusal::StateBytes => "state_bytes",
        }
    }
}

/// Buckets of the largest histogram: the latency bounds and +Inf.
const MAX_BUCKETS: usize = LATENCY_BOUNDS.len() + 1;

/// A histogram with fixed bounds: counts per bucket (not cumulative) and the sum.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: [AtomicU64; MAX_BUCKETS],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        assert!(
            bounds.len() < MAX_BUCKETS,
            "a histogram of at most {MAX_BUCKETS} buckets"
        );
        Histogram {
            bounds,
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// Cumulative `(upper bound, count)` per bound, then the total count and the sum in
    /// seconds (the +Inf bucket is the total).
    pub fn snapshot(&self) -> Snapshot {
        Histogram::sum_of(&[self])
    }

    /// [`Histogram::snapshot`] of the sum of `hs`, histograms with the same bounds.
    fn sum_of(hs: &[&Histogram]) -> Snapshot {
        let bounds = hs.first().map_or(&[][..], |h| h.bounds);
        let count = |i: usize| hs.iter().map(|h| h.counts[i].load(Relaxed)).sum::<u64>();
        let mut acc = 0;
        let mut buckets = Vec::with_capacity(bounds.len());
        for (i, b) in bounds.iter().enumerate() {
            acc += count(i);
            buckets.push((*b, acc));
        }
        acc += count(bounds.len());
        let sum_ns: u64 = hs.iter().map(|h| h.sum_ns.load(Relaxed)).sum();
        (buckets, acc, sum_ns as f64 / 1e9)
    }
}

/// A histogram read: cumulative `(upper bound, count)`, the count, the sum in seconds.
pub type Snapshot = (Vec<(f64, u64)>, u64, f64);

/// Outcomes of executions: ok, then one per error code.
const OUTCOMES: usize = 1 + ErrorCode::ALL.len();

fn outcome_index(outcome: Option<ErrorCode>) -> usize {
    match outcome {
        None => 0,
        Some(c) => 1 + ErrorCode::ALL.iter().position(|x| *x == c).unwrap_or(0),
    }
}

/// The name of an outcome: `ok` or the error code.
pub fn outcome_name(i: usize) -> &'static str {
    match i {
        0 => "ok",
        i => ErrorCode::ALL[i - 1].as_str(),
    }
}

/// One execution, as the executor saw it end.
#[derive(Debug, Clone, Copy)]
pub struct Execution {
    pub kind: ModuleKind,
    pub outcome: Option<ErrorCode>,
    pub wall: Duration,
    pub fuel: u64,
    pub memory_peak: u64,
}

/// Executions of one kind by one tenant, one shard.
#[derive(Debug)]
struct KindShard {
    outcomes: [AtomicU64; OUTCOMES],
    latency: Histogram,
    fuel: AtomicU64,
    memory_peak: AtomicU64,
}

/// Executions of one kind by one tenant.
#[derive(Debug)]
pub struct KindStats {
    shards: Sharded<KindShard>,
}

impl KindStats {
    fn new() -> KindStats {
        KindStats {
            shards: Sharded::new(|| KindShard {
                outcomes: std::array::from_fn(|_| AtomicU64::new(0)),
                latency: Histogram::new(&LATENCY_BOUNDS),
                fuel: AtomicU64::new(0),
                memory_peak: AtomicU64::new(0),
            }),
        }
    }

    fn record(&self, e: &Execution) {
        let s = self.shards.mine();
        s.outcomes[outcome_index(e.outcome)].fetch_add(1, Relaxed);
        s.latency.observe(e.wall);
        s.fuel.fetch_add(e.fuel, Relaxed);
        raise(&s.memory_peak, e.memory_peak);
    }

    /// `(outcome, count)` for every outcome seen.
    pub fn outcomes(&self) -> Vec<(&'static str, u64)> {
        (0..OUTCOMES)
            .map(|i| (outcome_name(i), self.shards.sum(|s| &s.outcomes[i])))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    pub fn executions(&self) -> u64 {
        (0..OUTCOMES)
            .map(|i| self.shards.sum(|s| &s.outcomes[i]))
            .sum()
    }

    pub fn fuel(&self) -> u64 {
        self.shards.sum(|s| &s.fuel)
    }

    pub fn memory_peak(&self) -> u64 {
        self.shards.max(|s| &s.memory_peak)
    }

    /// The latency histogram, all shards summed.
    pub fn latency(&self) -> Snapshot {
        let shards: Vec<&Histogram> = self.shards.all().map(|s| &s.latency).collect();
        Histogram::sum_of(&shards)
    }
}

/// Everything counted for one tenant.
#[derive(Debug)]
pub struct TenantStats {
    kinds: [KindStats; 4],
    refusals: [AtomicU64; Refusal::ALL.len()],
    pub connections_opened: AtomicU64,
    pub loads_ok: AtomicU64,
    pub loads_failed: AtomicU64,
    pub compile: Histogram,
}

impl Default for TenantStats {
    fn default() -> Self {
        TenantStats::new()
    }
}

impl TenantStats {
    fn new() -> TenantStats {
        TenantStats {
            kinds: std::array::from_fn(|_| KindStats::new()),
            refusals: std::array::from_fn(|_| AtomicU64::new(0)),
            connections_opened: AtomicU64::new(0),
            loads_ok: AtomicU64::new(0),
            loads_failed: AtomicU64::new(0),
            compile: Histogram::new(&COMPILE_BOUNDS),
        }
    }

    /// The stats of `kind`.
    pub fn kind(&self, kind: ModuleKind) -> &KindStats {
        let i = ModuleKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        &self.kinds[i]
    }

    /// `(reason, count)` for every reason seen.
    pub fn refusals(&self) -> Vec<(&'static str, u64)> {
        Refusal::ALL
            .iter()
            .zip(self.refusals.iter())
            .map(|(r, c)| (r.as_str(), c.load(Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// The daemon's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// One entry per tenant seen since start; a tenant's entry is made once and then only
    /// read, from a snapshot of the map (no lock, no allocation, on the execute path).
    tenants: ArcSwap<HashMap<u32, Arc<TenantStats>>>,
}

impl Metrics {
    /// The stats of tenant `uid` (made on first use).
    pub fn tenant(&self, uid: u32) -> Arc<TenantStats> {
        if let Some(t) = self.existing(uid) {
            return t;
        }
        self.tenants.rcu(|tenants| {
            let mut tenants = HashMap::clone(tenants);
            tenants
                .entry(uid)
                .or_insert_with(|| Arc::new(TenantStats::new()));
            tenants
        });
        self.tenants.load()[&uid].clone()
    }

    /// The stats of tenant `uid` if it has any, without making an entry (for readers).
    pub fn existing(&self, uid: u32) -> Option<Arc<TenantStats>> {
        self.tenants.load().get(&uid).cloned()
    }

    /// Count one finished execution of `uid` (and of the binary, through `binary`).
    pub fn execution(&self, uid: u32, binary: &BinaryStats, e: &Execution) {
        match self.tenants.load().get(&uid) {
            Some(t) => t.kind(e.kind).record(e),
            None => self.tenant(uid).kind(e.kind).record(e),
        }
        binary.record(e);
        match e.outcome {
            Some(ErrorCode::Busy) => self.refused(uid, Refusal::Pool),
            Some(ErrorCode::QuotaExceeded) => self.refused(uid, Refusal::StateBytes),
            _ => {}
        }
    }

    /// Count one refusal of `uid`'s request.
    pub fn refused(&self, uid: u32, why: Refusal) {
        let i = Refusal::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.tenant(uid).refusals[i].fetch_add(1, Relaxed);
    }

    /// Count one load of `uid`: its compile time when it compiled.
    pub fn load(&self, uid: u32, compiled: Option<Duration>) {
        let t = self.tenant(uid);
        match compiled {
            Some(d) => {
                t.loads_ok.fetch_add(1, Relaxed);
                t.compile.observe(d);
            }
            None => {
                t.loads_failed.fetch_add(1, Relaxed);
            }
        }
    }

    /// Every tenant seen, by UID.
    pub fn tenants(&self) -> Vec<(u32, Arc<TenantStats>)> {
        let mut v: Vec<_> = self
            .tenants
            .load()
            .iter()
            .map(|(uid, t)| (*uid, t.clone()))
            .collect();
        v.sort_by_key(|(uid, _)| *uid);
        v
    }
}

const SKETCH_BUCKETS: usize = wasmcore_proto::SKETCH_BUCKETS;

/// Per-binary figures of one shard.
#[derive(Debug)]
struct BinaryShard {
    started: AtomicU64,
    errors: AtomicU64,
    wall_ns: AtomicU64,
    fuel: AtomicU64,
    memory_peak: AtomicU64,
    sketch: [AtomicU64; SKETCH_BUCKETS],
}

/// Per-binary figures, kept on the binary (and so dropped when it is unloaded). The latency
/// sketch is `wasmcore_proto`'s: 64 buckets √2 wide, 512 bytes per binary and shard (2.5 KiB
/// per binary with its other figures and the padding).
#[derive(Debug)]
pub struct BinaryStats {
    shards: Sharded<BinaryShard>,
}

impl Default for BinaryStats {
    fn default() -> Self {
        BinaryStats {
            shards: Sharded::new(|| BinaryShard {
                started: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                wall_ns: AtomicU64::new(0),
                fuel: AtomicU64::new(0),
                memory_peak: AtomicU64::new(0),
                sketch: std::array::from_fn(|_| AtomicU64::new(0)),
            }),
        }
    }
}

/// The sketch bucket of a latency.
fn sketch_bucket(d: Duration) -> usize {
    let us = d.as_micros().clamp(1, u64::MAX as u128) as u64;
    // floor(2 · log2(us)): the whole octave, plus one when past its √2 point.
    let octave = 63 - us.leading_zeros() as usize;
    let half = (us as u128 * us as u128) >= (1u128 << (2 * octave + 1));
    (2 * octave + usize::from(half)).min(SKETCH_BUCKETS - 1)
}

impl BinaryStats {
    /// Count one execution started.
    pub fn start(&self) {
        self.shards.mine().started.fetch_add(1, Relaxed);
    }

    /// Executions started.
    pub fn started(&self) -> u64 {
        self.shards.sum(|s| &s.started)
    }

    fn record(&self, e: &Execution) {
        let s = self.shards.mine();
        if e.outcome.is_some() {
            s.errors.fetch_add(1, Relaxed);
        }
        s.wall_ns
            .fetch_add(e.wall.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
        s.fuel.fetch_add(e.fuel, Relaxed);
        raise(&s.memory_peak, e.memory_peak);
        s.sketch[sketch_bucket(e.wall)].fetch_add(1, Relaxed);
    }

    /// Executions that failed.
    pub fn errors(&self) -> u64 {
        self.shards.sum(|s| &s.errors)
    }

    pub fn wall_seconds(&self) -> f64 {
        self.shards.sum(|s| &s.wall_ns) as f64 / 1e9
    }

    pub fn fuel(&self) -> u64 {
        self.shards.sum(|s| &s.fuel)
    }

    pub fn memory_peak(&self) -> u64 {
        self.shards.max(|s| &s.memory_peak)
    }

    /// The sketch's non-empty buckets, `(index, count)`.
    pub fn sketch(&self) -> Vec<(u32, u64)> {
        (0..SKETCH_BUCKETS)
            .map(|i| (i as u32, self.shards.sum(|s| &s.sketch[i])))
            .filter(|(_, c)| *c > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmcore_proto::sketch_quantile;

    #[test]
    fn histograms_are_cumulative_with_a_sum() {
        let h = Histogram::new(&LATENCY_BOUNDS);
        h.observe(Duration::from_micros(5));
        h.observe(Duration::from_micros(30));
        h.observe(Duration::from_secs(20));
        let (b, n, sum) = h.snapshot();
        assert_eq!(n, 3);
        assert_eq!(b[0], (0.000_01, 1));
        assert_eq!(b[2], (0.000_05, 2));
        assert_eq!(b.last().unwrap().1, 2, "20 s is only in +Inf");
        assert!((sum - 20.000_035).abs() < 1e-9);
    }

    #[test]
    fn executions_count_by_tenant_kind_outcome_and_binary() {
        let m = Metrics::default();
        let b = BinaryStats::default();
        let e = |outcome, us| Execution {
            kind: ModuleKind::Extism,
            outcome,
            wall: Duration::from_micros(us),
            fuel: 10,
            memory_peak: us,
        };
        m.execution(7, &b, &e(None, 100));
        m.execution(7, &b, &e(Some(ErrorCode::Timeout), 300));
        m.execution(7, &b, &e(Some(ErrorCode::Busy), 1));
        let t = m.tenant(7);
        let k = t.kind(ModuleKind::Extism);
        assert_eq!(k.outcomes(), vec![("ok", 1), ("timeout", 1), ("busy", 1)]);
        assert_eq!((k.executions(), k.fuel(), k.memory_peak()), (3, 30, 300));
        assert_eq!(t.kind(ModuleKind::Process).executions(), 0);
        assert_eq!(t.refusals(), vec![("pool", 1)]);
        assert_eq!(b.errors(), 2);
        assert_eq!(m.tenants().len(), 1);
    }

    #[test]
    fn the_sketch_gives_quantiles_within_a_bucket() {
        assert_eq!(sketch_bucket(Duration::from_micros(1)), 0);
        assert_eq!(sketch_bucket(Duration::from_micros(2)), 2);
        assert_eq!(sketch_bucket(Duration::from_micros(3)), 3);
        assert_eq!(
            sketch_bucket(Duration::from_secs(1 << 40)),
            SKETCH_BUCKETS - 1
        );
        let b = BinaryStats::default();
        for us in 1..=100u64 {
            b.record(&Execution {
                kind: ModuleKind::Process,
                outcome: None,
                wall: Duration::from_micros(us * 10),
                fuel: 0,
                memory_peak: 0,
            });
        }
        let s = b.sketch();
        let p50 = sketch_quantile(&s, 0.5).unwrap();
        let p99 = sketch_quantile(&s, 0.99).unwrap();
        assert!((0.000_5..=0.000_5 * 1.42).contains(&p50), "{p50}");
        assert!((0.000_99..=0.000_99 * 1.42).contains(&p99), "{p99}");
        assert_eq!(sketch_quantile(&[], 0.5), None);
    }
}
