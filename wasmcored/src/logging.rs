//! Logging. Under journald (stderr connected to the journal, as systemd sets it up), entries
//! go through the journal's native protocol with `systemd-journal-logger`: each carries the
//! record's key-values as journal fields, so load, unload, configure, failure, refusal and
//! quarantine entries have `TENANT_UID=`, `BINARY=`, `BINARY_NAME=` and `ERROR_CODE=`
//! (`journalctl -u wasm-core TENANT_UID=1001`). The field names are the literal keys of the
//! log calls, never built from tenant input. Otherwise: stderr, with `<N>` severity prefixes
//! when stderr is some other journal stream, plain `wasmcored: level: message` lines else.
//! The dependencies' debug lines (Cranelift writes hundreds per compile) are left out unless
//! the level is `trace`.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::Write;

/// Whether to pass on `m`: the daemon's own records at the level set; the dependencies'
/// (Wasmtime, Cranelift: hundreds of lines per compile at `debug`) at most `info` unless the
/// level is `trace`.
fn wanted(m: &Metadata<'_>) -> bool {
    m.target().starts_with("wasmcore")
        || m.level() <= Level::Info
        || log::max_level() >= LevelFilter::Trace
}

/// A logger with [`wanted`] in front.
struct Filtered<L>(L);

impl<L: Log> Log for Filtered<L> {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        wanted(m) && self.0.enabled(m)
    }

    fn log(&self, record: &Record<'_>) {
        if wanted(record.metadata()) {
            self.0.log(record);
        }
    }

    fn flush(&self) {
        self.0.flush();
    }
}

struct Logger {
    journal: bool,
    /// What plain lines start with: `wasmcored`, or `wasmcored[worker uid N]`.
    name: String,
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        wanted(m)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = if self.journal {
            let prio = match record.level() {
                Level::Error => 3,
                Level::Warn => 4,
                Level::Info => 6,
                Level::Debug | Level::Trace => 7,
            };
            format!("<{prio}>{}\n", record.args())
        } else {
            format!(
                "{}: {}: {}\n",
                self.name,
                record.level().as_str().to_lowercase(),
                record.args()
            )
        };
        // One write per line so concurrent lines do not interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Install the logger (once; later calls only change the level). `worker`: the tenant
/// whose worker this process is; its entries say so (`WORKER_UID=` in the journal).
pub fn init(level: LevelFilter, worker: Option<u32>) {
    if systemd_journal_logger::connected_to_journal()
        && let Ok(j) = systemd_journal_logger::JournalLog::new()
        && log::set_boxed_logger(Box::new(Filtered(
            j.with_syslog_identifier("wasmcored".into())
                .with_extra_fields(worker.map(|uid| ("WORKER_UID", uid.to_string()))),
        )))
        .is_ok()
    {
        log::set_max_level(level);
        return;
    }
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let name = match worker {
        Some(uid) => format!("wasmcored[worker uid {uid}]"),
        None => "wasmcored".to_string(),
    };
    let _ = log::set_boxed_logger(Box::new(Logger { journal, name }));
    log::set_max_level(level);
}
