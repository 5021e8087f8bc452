//! `wasmcorectl top`: a live view of the daemon's binaries, like systemd-cgtop.
//!
//! Every interval it reads the `metrics` snapshot and shows one row per binary with the
//! rates over the interval (executions/s, errors/s, fuel/s), p50 and p99 wall time of the
//! interval's executions (from the difference of the binaries' latency sketches), and the
//! peak memory; a header with the daemon's totals, pool and connections. A tenant sees only
//! its own binaries. With `--tenants` (key `t`) the rows are the tenants instead: their
//! worker's pid, connections, executions and errors per second, and, for admins, the
//! worker's share of a CPU over the interval and its resident memory. On a terminal the view
//! redraws in place (keys: `q` quits; `e`, `r`, `p`, `f`, `m`, `n` sort by executions,
//! errors, p99, fuel, memory, name); otherwise, or with `--batch`, it prints one plain
//! snapshot per interval (`--json`: one JSON object per line, with both lists).

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use wasmcore_proto::{BinaryMetrics, MetricsResponse, TenantMetrics, sketch_quantile};

use crate::{Failure, exit};
use wasmcore_client::Client;

/// What the rows are sorted by (largest first; `name` alphabetically).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Order {
    Executions,
    Errors,
    P99,
    Fuel,
    Memory,
    Name,
}

/// Options of `top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// Seconds between refreshes.
    #[arg(short = 'd', long, default_value_t = 1.0, value_name = "SECONDS")]
    pub delay: f64,
    /// Stop after this many refreshes (default: run until `q` or Ctrl-C).
    #[arg(short = 'n', long, value_name = "N")]
    pub iterations: Option<u64>,
    /// Plain snapshots even on a terminal.
    #[arg(short = 'b', long)]
    pub batch: bool,
    /// The sort key.
    #[arg(long, value_enum, default_value_t = Order::Executions)]
    pub order: Order,
    /// At most this many rows (default: all in batch mode, what fits on a terminal).
    #[arg(long, value_name = "N")]
    pub rows: Option<usize>,
    /// One row per tenant (its worker process's CPU and memory) instead of one per binary.
    #[arg(long)]
    pub tenants: bool,
}

/// One binary's figures over an interval.
#[derive(Debug, Clone)]
struct Row {
    name: String,
    owner: u32,
    kind: String,
    exec_s: f64,
    err_s: f64,
    p50: Option<f64>,
    p99: Option<f64>,
    fuel_s: f64,
    memory: u64,
}

/// One tenant's figures over an interval.
#[derive(Debug, Clone)]
struct TenantRow {
    uid: u32,
    pid: Option<u32>,
    connections: u64,
    exec_s: f64,
    err_s: f64,
    /// Percent of one CPU its worker used over the interval (admins only).
    cpu_pct: Option<f64>,
    rss: Option<u64>,
}

/// The view of one interval.
struct View {
    header: Vec<String>,
    rows: Vec<Row>,
    tenants: Vec<TenantRow>,
    by_tenant: bool,
    json: Value,
}

/// Executions of `t` in total and those that failed.
fn tenant_executions(t: &TenantMetrics) -> (u64, u64) {
    let mut all = 0;
    let mut failed = 0;
    for k in &t.kinds {
        for (outcome, n) in &k.executions {
            all += n;
            if outcome != "ok" {
                failed += n;
            }
        }
    }
    (all, failed)
}

fn tenant_rows(prev: &MetricsResponse, now: &MetricsResponse, dt: f64) -> Vec<TenantRow> {
    let before: HashMap<u32, &TenantMetrics> = prev.tenants.iter().map(|t| (t.uid, t)).collect();
    let mut rows: Vec<TenantRow> = now
        .tenants
        .iter()
        .map(|t| {
            let p = before.get(&t.uid).copied();
            let (all, failed) = tenant_executions(t);
            let (all0, failed0) = p.map_or((0, 0), tenant_executions);
            // CPU over the interval, if the same worker was there at both ends.
            let cpu_pct = t.worker.as_ref().and_then(|w| {
                let w0 = p?.worker.as_ref().filter(|w0| w0.pid == w.pid)?;
                Some(w.cpu_us.saturating_sub(w0.cpu_us) as f64 / 1e4 / dt)
            });
            TenantRow {
                uid: t.uid,
                pid: t.worker.as_ref().map(|w| w.pid),
                connections: t.connections_open,
                exec_s: all.saturating_sub(all0) as f64 / dt,
                err_s: failed.saturating_sub(failed0) as f64 / dt,
                cpu_pct,
                rss: t.worker.as_ref().map(|w| w.rss_bytes),
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        let busy = |r: &TenantRow| r.cpu_pct.unwrap_or(0.0) + r.exec_s;
        busy(b)
            .partial_cmp(&busy(a))
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.uid.cmp(&b.uid))
    });
    rows
}

fn fetch(c: &mut Client) -> Result<MetricsResponse, Failure> {
    let resp = crate::check(c.call_json(&json!({"op": "metrics"}), None)?)?;
    serde_json::from_value(resp)
        .map_err(|e| Failure::new(exit::INTERNAL, format!("unexpected metrics: {e}")))
}

/// The sketch buckets of `now` minus those of `before` (the interval's executions).
fn sketch_delta(now: &[(u32, u64)], before: Option<&BinaryMetrics>) -> Vec<(u32, u64)> {
    let old: HashMap<u32, u64> = before
        .map(|b| b.sketch.iter().copied().collect())
        .unwrap_or_default();
    now.iter()
        .map(|(i, c)| (*i, c.saturating_sub(old.get(i).copied().unwrap_or(0))))
        .filter(|(_, c)| *c > 0)
        .collect()
}

fn view(
    prev: &MetricsResponse,
    now: &MetricsResponse,
    dt: f64,
    order: Order,
    by_tenant: bool,
) -> View {
    let before: HashMap<&str, &BinaryMetrics> = prev
        .binaries
        .iter()
        .map(|b| (b.binary.as_str(), b))
        .collect();
    let dt = dt.max(1e-3);
    let mut rows: Vec<Row> = now
        .binaries
        .iter()
        .map(|b| {
            let p = before.get(b.binary.as_str()).copied();
            let d = |f: fn(&BinaryMetrics) -> u64| f(b).saturating_sub(p.map_or(0, f)) as f64 / dt;
            let sketch = sketch_delta(&b.sketch, p);
            Row {
                name: b.name.clone().unwrap_or_else(|| b.binary.clone()),
                owner: b.owner_uid,
                kind: b.kind.to_string(),
                exec_s: d(|b| b.executions),
                err_s: d(|b| b.errors),
                p50: sketch_quantile(&sketch, 0.5),
                p99: sketch_quantile(&sketch, 0.99),
                fuel_s: d(|b| b.fuel_total),
                memory: b.memory_peak_bytes,
            }
        })
        .collect();
    rows.sort_by(|a, b| sort_key(order, a, b));
    let tenants = tenant_rows(prev, now, dt);
    let total = |f: fn(&Row) -> f64| rows.iter().map(f).sum::<f64>();
    let mut header = vec![format!(
        "wasm-core {} up {}   binaries {}   executions/s {:.1}   errors/s {:.1}",
        now.version,
        uptime(now.uptime_seconds),
        rows.len(),
        total(|r| r.exec_s),
        total(|r| r.err_s),
    )];
    if let (Some(run), Some(conns)) = (now.executions_running, now.connections_open) {
        let pool = now.pool.as_ref().map_or(String::new(), |p| {
            format!(
                "   pool {}/{} instances, {} memories",
                p.core_instances, p.capacity, p.memories
            )
        });
        header.push(format!("running {run}   connections {conns}{pool}"));
    } else {
        header.push("(your own binaries only; admins see every tenant's)".into());
    }
    let json = json!({
        "uptime_seconds": now.uptime_seconds,
        "interval_seconds": dt,
        "executions_running": now.executions_running,
        "connections_open": now.connections_open,
        "pool": now.pool,
        "binaries": rows.iter().map(|r| json!({
            "name": r.name, "owner_uid": r.owner, "kind": r.kind,
            "executions_per_second": r.exec_s, "errors_per_second": r.err_s,
            "p50_seconds": r.p50, "p99_seconds": r.p99,
            "fuel_per_second": r.fuel_s, "memory_peak_bytes": r.memory,
        })).collect::<Vec<_>>(),
        "tenants": tenants.iter().map(|t| json!({
            "uid": t.uid, "worker_pid": t.pid, "connections": t.connections,
            "executions_per_second": t.exec_s, "errors_per_second": t.err_s,
            "worker_cpu_percent": t.cpu_pct, "worker_rss_bytes": t.rss,
        })).collect::<Vec<_>>(),
    });
    View {
        header,
        rows,
        tenants,
        by_tenant,
        json,
    }
}

fn uptime(s: f64) -> String {
    let s = s as u64;
    match s {
        0..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn duration(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(s) if s < 1e-3 => format!("{:.0}µs", s * 1e6),
        Some(s) if s < 1.0 => format!("{:.1}ms", s * 1e3),
        Some(s) => format!("{s:.2}s"),
    }
}

fn bytes(n: u64) -> String {
    match n {
        0..1024 => format!("{n}B"),
        1024..1_048_576 => format!("{:.1}K", n as f64 / 1024.0),
        _ => format!("{:.1}M", n as f64 / 1_048_576.0),
    }
}

/// The view as text lines, at most `rows` rows.
fn lines(v: &View, rows: usize) -> Vec<String> {
    let mut out = v.header.clone();
    out.push(String::new());
    if v.by_tenant {
        out.push(format!(
            "{:>10} {:>8} {:>6} {:>10} {:>9} {:>7} {:>8}",
            "TENANT", "WORKER", "CONNS", "EXEC/S", "ERR/S", "CPU%", "RSS"
        ));
        let or_dash = |o: Option<String>| o.unwrap_or_else(|| "-".into());
        for t in v.tenants.iter().take(rows) {
            out.push(format!(
                "{:>10} {:>8} {:>6} {:>10.1} {:>9.1} {:>7} {:>8}",
                t.uid,
                or_dash(t.pid.map(|p| p.to_string())),
                t.connections,
                t.exec_s,
                t.err_s,
                or_dash(t.cpu_pct.map(|c| format!("{c:.1}"))),
                or_dash(t.rss.map(bytes)),
            ));
        }
        return out;
    }
    out.push(format!(
        "{:<28} {:>6} {:<9} {:>10} {:>9} {:>8} {:>8} {:>11} {:>8}",
        "BINARY", "OWNER", "KIND", "EXEC/S", "ERR/S", "P50", "P99", "FUEL/S", "MEMORY"
    ));
    for r in v.rows.iter().take(rows) {
        let mut name = r.name.clone();
        if name.len() > 28 {
            name.truncate(27);
            name.push('…');
        }
        out.push(format!(
            "{:<28} {:>6} {:<9} {:>10.1} {:>9.1} {:>8} {:>8} {:>11.0} {:>8}",
            name,
            r.owner,
            r.kind,
            r.exec_s,
            r.err_s,
            duration(r.p50),
            duration(r.p99),
            r.fuel_s,
            bytes(r.memory),
        ));
    }
    out
}

pub fn run(c: &mut Client, args: &TopArgs, json_out: bool) -> Result<(), Failure> {
    if !(args.delay > 0.0 && args.delay.is_finite()) {
        return Err(Failure::new(
            exit::USAGE,
            "--delay must be a positive number of seconds",
        ));
    }
    let delay = Duration::from_secs_f64(args.delay);
    let interactive = !args.batch && !json_out && std::io::stdout().is_terminal();
    if interactive {
        return live(c, args, delay);
    }
    let mut prev = fetch(c)?;
    let mut at = Instant::now();
    let mut n = 0;
    loop {
        std::thread::sleep(delay);
        let now = fetch(c)?;
        let v = view(
            &prev,
            &now,
            at.elapsed().as_secs_f64(),
            args.order,
            args.tenants,
        );
        at = Instant::now();
        let mut out = std::io::stdout().lock();
        let written = if json_out {
            writeln!(out, "{}", v.json)
        } else {
            writeln!(
                out,
                "{}\n",
                lines(&v, args.rows.unwrap_or(usize::MAX)).join("\n")
            )
        };
        if written.and_then(|()| out.flush()).is_err() {
            // The reader went away (a pipe into `head`): done.
            return Ok(());
        }
        prev = now;
        n += 1;
        if args.iterations.is_some_and(|max| n >= max) {
            return Ok(());
        }
    }
}

/// The in-place view on a terminal: alternate screen, raw mode for the keys, restored on
/// every way out.
fn live(c: &mut Client, args: &TopArgs, delay: Duration) -> Result<(), Failure> {
    use crossterm::{cursor, event, execute, terminal};
    let io = |e: std::io::Error| Failure::new(exit::IO, format!("terminal: {e}"));
    let mut out = std::io::stdout();
    terminal::enable_raw_mode().map_err(io)?;
    execute!(out, terminal::EnterAlternateScreen, cursor::Hide).map_err(io)?;
    let result = (|| -> Result<(), Failure> {
        let mut order = args.order;
        let mut by_tenant = args.tenants;
        let mut prev = fetch(c)?;
        let mut at = Instant::now();
        let mut n = 0;
        let mut shown: Option<View> = None;
        loop {
            // Wait for the next refresh, acting on keys meanwhile.
            let next = at + delay;
            loop {
                let left = next.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                if event::poll(left).map_err(io)?
                    && let event::Event::Key(k) = event::read().map_err(io)?
                    && k.kind == event::KeyEventKind::Press
                {
                    let new = match k.code {
                        event::KeyCode::Char('q') | event::KeyCode::Esc => return Ok(()),
                        event::KeyCode::Char('c')
                            if k.modifiers.contains(event::KeyModifiers::CONTROL) =>
                        {
                            return Ok(());
                        }
                        event::KeyCode::Char('e') => Some(Order::Executions),
                        event::KeyCode::Char('r') => Some(Order::Errors),
                        event::KeyCode::Char('p') => Some(Order::P99),
                        event::KeyCode::Char('f') => Some(Order::Fuel),
                        event::KeyCode::Char('m') => Some(Order::Memory),
                        event::KeyCode::Char('n') => Some(Order::Name),
                        _ => None,
                    };
                    if k.code == event::KeyCode::Char('t')
                        && let Some(v) = shown.as_mut()
                    {
                        by_tenant = !by_tenant;
                        v.by_tenant = by_tenant;
                        draw(&mut out, v, args).map_err(io)?;
                    }
                    if let (Some(o), Some(v)) = (new, shown.as_mut()) {
                        order = o;
                        v.rows.sort_by(|a, b| sort_key(order, a, b));
                        draw(&mut out, v, args).map_err(io)?;
                    }
                }
            }
            let now = fetch(c)?;
            let v = view(&prev, &now, at.elapsed().as_secs_f64(), order, by_tenant);
            at = Instant::now();
            draw(&mut out, &v, args).map_err(io)?;
            shown = Some(v);
            prev = now;
            n += 1;
            if args.iterations.is_some_and(|max| n >= max) {
                return Ok(());
            }
        }
    })();
    let _ = execute!(out, cursor::Show, terminal::LeaveAlternateScreen);
    let _ = terminal::disable_raw_mode();
    result
}

/// Rows in `order`: largest first (`name`: alphabetical), ties by name.
fn sort_key(order: Order, a: &Row, b: &Row) -> std::cmp::Ordering {
    let desc = |x: f64, y: f64| y.partial_cmp(&x).unwrap_or(std::cmp::Ordering::Equal);
    match order {
        Order::Executions => desc(a.exec_s, b.exec_s),
        Order::Errors => desc(a.err_s, b.err_s),
        Order::P99 => desc(a.p99.unwrap_or(0.0), b.p99.unwrap_or(0.0)),
        Order::Fuel => desc(a.fuel_s, b.fuel_s),
        Order::Memory => b.memory.cmp(&a.memory),
        Order::Name => a.name.cmp(&b.name),
    }
    .then_with(|| a.name.cmp(&b.name))
}

fn draw(out: &mut std::io::Stdout, v: &View, args: &TopArgs) -> std::io::Result<()> {
    use crossterm::{cursor, queue, terminal};
    let (_, height) = terminal::size().unwrap_or((120, 40));
    let fit = (height as usize).saturating_sub(5);
    let mut text = lines(v, args.rows.unwrap_or(fit).min(fit));
    text.push(String::new());
    text.push(
        "q quit · t tenants/binaries · sort: e executions  r errors  p p99  f fuel  m memory  n name"
            .into(),
    );
    queue!(
        out,
        cursor::MoveTo(0, 0),
        terminal::Clear(terminal::ClearType::All)
    )?;
    for (i, l) in text.iter().enumerate() {
        queue!(out, cursor::MoveTo(0, i as u16))?;
        write!(out, "{l}")?;
    }
    out.flush()
}
