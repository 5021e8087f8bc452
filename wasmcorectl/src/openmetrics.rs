//! The `metrics` snapshot as OpenMetrics text (or Prometheus' older text format), encoded by
//! `prometheus-client`: base units,
//! `_total` counters, a `wasm_core_build_info`, `tenant_uid` as the only per-tenant label, and
//! no binary UUIDs as labels (per-binary figures stay in the JSON snapshot and `top`).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use wasmcore_proto::{HistogramData, MetricsResponse};

type Labels = Vec<(&'static str, String)>;

/// The snapshot as one collector: every family is written from it at encode time.
#[derive(Debug)]
struct Snapshot(MetricsResponse);

/// A value of a family: one sample set per label set.
enum Value<'a> {
    Counter(u64),
    CounterF(f64),
    Gauge(f64),
    Histogram(&'a HistogramData),
}

struct Sample<'a>(Value<'a>);

impl EncodeMetric for Sample<'_> {
    fn encode(&self, mut e: MetricEncoder) -> Result<(), std::fmt::Error> {
        match &self.0 {
            Value::Counter(v) => e.encode_counter::<NoLabelSet, _, u64>(v, None),
            Value::CounterF(v) => e.encode_counter::<NoLabelSet, _, f64>(v, None),
            Value::Gauge(v) => e.encode_gauge(v),
            Value::Histogram(h) => {
                e.encode_histogram::<NoLabelSet>(h.sum, h.count, &per_bucket(h), None)
            }
        }
    }

    fn metric_type(&self) -> MetricType {
        match self.0 {
            Value::Counter(_) | Value::CounterF(_) => MetricType::Counter,
            Value::Gauge(_) => MetricType::Gauge,
            Value::Histogram(_) => MetricType::Histogram,
        }
    }
}

/// The encoder takes each bucket's own count and adds them up itself (with +Inf as the
/// infinite bound); the snapshot's buckets are cumulative.
fn per_bucket(h: &HistogramData) -> Vec<(f64, u64)> {
    let mut prev = 0;
    let mut out: Vec<(f64, u64)> = h
        .buckets
        .iter()
        .map(|(le, cum)| {
            let n = cum.saturating_sub(prev);
            prev = *cum;
            (*le, n)
        })
        .collect();
    out.push((f64::INFINITY, h.count.saturating_sub(prev)));
    out
}

/// Write one family: its descriptor and every `(labels, value)` sample.
fn family<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    ty: MetricType,
    samples: impl IntoIterator<Item = (Labels, Value<'a>)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, unit.as_ref(), ty)?;
    for (labels, v) in samples {
        Sample(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn uid(u: u32) -> (&'static str, String) {
    ("tenant_uid", u.to_string())
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        {
            let mut e = enc.encode_descriptor(
                "wasm_core_build",
                "wasm-core's build",
                None,
                MetricType::Info,
            )?;
            e.encode_info(&vec![
                ("version", m.version.clone()),
                ("wasmtime_version", m.wasmtime_version.clone()),
                ("protocol", m.protocol.to_string()),
            ])?;
        }
        family(
            &mut enc,
            "wasm_core_uptime",
            "Time since the daemon started",
            Some(Unit::Seconds),
            MetricType::Gauge,
            [(vec![], Value::Gauge(m.uptime_seconds))],
        )?;
        if let Some(n) = m.connections_open {
            family(
                &mut enc,
                "wasm_core_connections_open",
                "Connections open now, all tenants",
                None,
                MetricType::Gauge,
                [(vec![], Value::Gauge(n as f64))],
            )?;
        }
        if let Some(n) = m.executions_running {
            family(
                &mut enc,
                "wasm_core_executions_running",
                "Executions running now, all tenants",
                None,
                MetricType::Gauge,
                [(vec![], Value::Gauge(n as f64))],
            )?;
        }
        if let Some(p) = &m.pool {
            family(
                &mut enc,
                "wasm_core_pool_capacity",
                "Slots of the instance pool (engine.pool_instances)",
                None,
                MetricType::Gauge,
                [(vec![], Value::Gauge(p.capacity as f64))],
            )?;
            family(
                &mut enc,
                "wasm_core_pool_in_use",
                "Slots of the instance pool in use, by resource",
                None,
                MetricType::Gauge,
                [
                    ("core_instances", p.core_instances),
                    ("component_instances", p.component_instances),
                    ("memories", p.memories),
                    ("tables", p.tables),
                ]
                .map(|(r, n)| (vec![("resource", r.to_string())], Value::Gauge(n as f64))),
            )?;
            family(
                &mut enc,
                "wasm_core_pool_warm_memories",
                "Unused memory slots kept warm for the module that used them last",
                None,
                MetricType::Gauge,
                [(vec![], Value::Gauge(p.unused_warm_memories as f64))],
            )?;
        }
        if let Some(r) = &m.restore {
            family(
                &mut enc,
                "wasm_core_restore_binaries",
                "Binaries the last start restored, recompiled or quarantined",
                None,
                MetricType::Gauge,
                [
                    ("restored", r.restored),
                    ("recompiled", r.recompiled),
                    ("quarantined", r.quarantined),
                ]
                .map(|(s, n)| (vec![("result", s.to_string())], Value::Gauge(n as f64))),
            )?;
        }
        let t = &m.tenants;
        let per_tenant = |f: fn(&wasmcore_proto::TenantMetrics) -> f64| {
            t.iter()
                .map(move |x| (vec![uid(x.uid)], Value::Gauge(f(x))))
                .collect::<Vec<_>>()
        };
        family(
            &mut enc,
            "wasm_core_tenant_connections_open",
            "Connections a tenant has open now",
            None,
            MetricType::Gauge,
            per_tenant(|x| x.connections_open as f64),
        )?;
        family(
            &mut enc,
            "wasm_core_connections_opened",
            "Connections a tenant opened (those refused for its own cap included)",
            None,
            MetricType::Counter,
            t.iter()
                .map(|x| (vec![uid(x.uid)], Value::Counter(x.connections_opened))),
        )?;
        if m.all_tenants {
            family(
                &mut enc,
                "wasm_core_worker_failures",
                "Times a tenant's worker process ended without being told to (crash, kill, out of memory)",
                None,
                MetricType::Counter,
                t.iter()
                    .map(|x| (vec![uid(x.uid)], Value::Counter(x.worker_failures))),
            )?;
            let workers = || t.iter().filter_map(|x| Some((x.uid, x.worker.as_ref()?)));
            family(
                &mut enc,
                "wasm_core_worker_cpu_seconds",
                "User and system CPU time of a tenant's live worker process (starts from 0 with each new worker)",
                Some(Unit::Seconds),
                MetricType::Counter,
                workers().map(|(u, w)| (vec![uid(u)], Value::CounterF(w.cpu_us as f64 / 1e6))),
            )?;
            family(
                &mut enc,
                "wasm_core_worker_resident_memory",
                "Resident memory of a tenant's live worker process",
                Some(Unit::Bytes),
                MetricType::Gauge,
                workers().map(|(u, w)| (vec![uid(u)], Value::Gauge(w.rss_bytes as f64))),
            )?;
        }
        family(
            &mut enc,
            "wasm_core_tenant_executions_running",
            "Executions a tenant has running now",
            None,
            MetricType::Gauge,
            per_tenant(|x| x.executions_running as f64),
        )?;
        family(
            &mut enc,
            "wasm_core_binaries",
            "Binaries a tenant has loaded",
            None,
            MetricType::Gauge,
            per_tenant(|x| x.binaries as f64),
        )?;
        family(
            &mut enc,
            "wasm_core_binary_size",
            "Bytes of the modules a tenant has loaded",
            Some(Unit::Bytes),
            MetricType::Gauge,
            per_tenant(|x| x.binary_bytes as f64),
        )?;
        family(
            &mut enc,
            "wasm_core_plugin_state_size",
            "Bytes of plugin state (and Extism vars) a tenant holds",
            Some(Unit::Bytes),
            MetricType::Gauge,
            per_tenant(|x| x.state_bytes as f64),
        )?;
        family(
            &mut enc,
            "wasm_core_loads",
            "Loads by outcome",
            None,
            MetricType::Counter,
            t.iter().flat_map(|x| {
                [("ok", x.loads_ok), ("failed", x.loads_failed)].map(|(o, n)| {
                    (
                        vec![uid(x.uid), ("outcome", o.to_string())],
                        Value::Counter(n),
                    )
                })
            }),
        )?;
        family(
            &mut enc,
            "wasm_core_compile_duration",
            "Compile time of successful loads",
            Some(Unit::Seconds),
            MetricType::Histogram,
            t.iter()
                .map(|x| (vec![uid(x.uid)], Value::Histogram(&x.compile_seconds))),
        )?;
        family(
            &mut enc,
            "wasm_core_refusals",
            "Requests refused at admission, by reason (busy: a concurrency cap; quota_exceeded: a quota)",
            None,
            MetricType::Counter,
            t.iter().flat_map(|x| {
                x.refusals
                    .iter()
                    .map(|(r, n)| (vec![uid(x.uid), ("reason", r.clone())], Value::Counter(*n)))
            }),
        )?;
        let kinds = || {
            t.iter()
                .flat_map(|x| x.kinds.iter().map(move |k| (x.uid, k)))
        };
        family(
            &mut enc,
            "wasm_core_executions",
            "Executions by tenant, kind and outcome (ok or the error code)",
            None,
            MetricType::Counter,
            kinds().flat_map(|(u, k)| {
                k.executions.iter().map(move |(o, n)| {
                    (
                        vec![uid(u), ("kind", k.kind.to_string()), ("outcome", o.clone())],
                        Value::Counter(*n),
                    )
                })
            }),
        )?;
        family(
            &mut enc,
            "wasm_core_execution_duration",
            "Wall time of executions",
            Some(Unit::Seconds),
            MetricType::Histogram,
            kinds().map(|(u, k)| {
                (
                    vec![uid(u), ("kind", k.kind.to_string())],
                    Value::Histogram(&k.latency_seconds),
                )
            }),
        )?;
        family(
            &mut enc,
            "wasm_core_fuel_consumed",
            "Fuel consumed by executions (with engine.fuel_metering)",
            None,
            MetricType::Counter,
            kinds().map(|(u, k)| {
                (
                    vec![uid(u), ("kind", k.kind.to_string())],
                    Value::CounterF(k.fuel_total as f64),
                )
            }),
        )?;
        family(
            &mut enc,
            "wasm_core_execution_memory_peak",
            "The largest memory one execution held",
            Some(Unit::Bytes),
            MetricType::Gauge,
            kinds().map(|(u, k)| {
                (
                    vec![uid(u), ("kind", k.kind.to_string())],
                    Value::Gauge(k.memory_peak_bytes as f64),
                )
            }),
        )?;
        Ok(())
    }
}

/// A text format for the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 (`application/openmetrics-text`), ending in `# EOF`.
    OpenMetrics,
    /// Prometheus' text format 0.0.4 (`text/plain`), for older scrapers and `promtool`.
    Prometheus,
}

impl Format {
    /// The HTTP content type of the format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// What a scraper's `Accept` header asks for: OpenMetrics when it names it (as
    /// Prometheus does), else the Prometheus text format.
    pub fn negotiate(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }
}

/// The snapshot in `format`.
pub fn render(m: &MetricsResponse, format: Format) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot(m.clone())));
    let mut out = String::new();
    // Writing into a String cannot fail.
    match format {
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        }
    }
    .expect("encoding into a String");
    out
}
