//! The data of one execution's `Store`, shared by every module kind: limits, logs, output,
//! plugin-state changes, the WASI contexts, and the host traps that end an execution.
//!
//! This module sits below [`crate::kinds`] and [`crate::executor`]: it knows no kind's glue
//! and nothing of the registry, so both can use it without an import circle.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime::{Memory, ResourceLimiter, TypedFunc};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::blocks::Blocks;
use crate::state::StateTxn;

/// Why a host function stopped the guest. The executor turns these into error codes.
#[derive(Debug, thiserror::Error)]
pub enum HostTrap {
    #[error("{0}")]
    BadPointer(String),
    #[error("output exceeds the limit of {0} bytes")]
    OutputTooLarge(usize),
    #[error("{0}")]
    StateQuota(String),
    #[error("execution deadline passed")]
    TimedOut,
    /// A host-side allocation (an Extism block) would pass the execution's memory cap.
    #[error("memory limit reached")]
    MemoryLimit,
    /// A host function refused what the guest asked (an Extism host call's error).
    #[error("{0}")]
    Refused(String),
}

pub(crate) fn trap(t: HostTrap) -> wasmtime::Error {
    wasmtime::Error::new(t)
}

/// Check that `[ptr, ptr+len)` lies inside a memory of `size` bytes.
pub(crate) fn guest_range(
    func: &str,
    ptr: i32,
    len: i32,
    size: usize,
) -> wasmtime::Result<Range<usize>> {
    let (p, l) = (ptr as u32 as usize, len as u32 as usize);
    if ptr < 0 || len < 0 {
        return Err(trap(HostTrap::BadPointer(format!(
            "host.{func}: negative pointer or length (ptr={ptr}, len={len})"
        ))));
    }
    match p.checked_add(l) {
        Some(end) if end <= size => Ok(p..end),
        _ => Err(trap(HostTrap::BadPointer(format!(
            "host.{func}: range {p}+{l} is outside linear memory ({size} bytes)"
        )))),
    }
}

/// Log lines of one execution, capped in bytes.
#[derive(Debug, Default)]
pub(crate) struct Logs {
    lines: Vec<String>,
    bytes: usize,
    cap: usize,
    dropped: usize,
}

impl Logs {
    pub(crate) fn new(cap: usize) -> Self {
        Logs {
            cap,
            ..Logs::default()
        }
    }

    pub(crate) fn push(&mut self, line: &[u8]) {
        if self.bytes + line.len() > self.cap {
            self.dropped += 1;
            return;
        }
        self.bytes += line.len();
        self.lines.push(String::from_utf8_lossy(line).into_owned());
    }

    pub(crate) fn push_text(&mut self, text: &[u8]) {
        for line in text.split(|b| *b == b'\n') {
            if !line.is_empty() {
                self.push(line);
            }
        }
    }

    pub(crate) fn finish(mut self) -> Vec<String> {
        if self.dropped > 0 {
            self.lines.push(format!(
                "[{} log lines dropped: over the {}-byte limit]",
                self.dropped, self.cap
            ));
        }
        self.lines
    }
}

/// How many instances, memories and tables one store may create: one of each for a core
/// module; a component is made of several core instances (its own modules, adapters and
/// shims), each with at most one memory and one table.
#[derive(Debug, Clone, Copy)]
pub struct StoreShape {
    pub instances: usize,
    pub memories: usize,
    pub tables: usize,
}

impl StoreShape {
    pub const MODULE: StoreShape = StoreShape {
        instances: 1,
        memories: 1,
        tables: 1,
    };
    /// What the pool admits per component (engine.rs uses the same numbers).
    pub const COMPONENT: StoreShape = StoreShape {
        instances: 32,
        memories: 8,
        tables: 16,
    };
}

/// Memory and table limits of one store. The memory cap holds for the sum of every memory
/// the store has, plus host-side memory charged to it (Extism blocks); the peak of that sum
/// is reported.
#[derive(Debug)]
pub(crate) struct Limiter {
    pub(crate) max_memory: usize,
    pub(crate) max_table: usize,
    pub(crate) shape: StoreShape,
    pub(crate) used: usize,
    pub(crate) peak: usize,
    pub(crate) memory_refused: bool,
}

impl Limiter {
    pub(crate) fn new(max_memory: usize, max_table: usize, shape: StoreShape) -> Self {
        Limiter {
            max_memory,
            max_table,
            shape,
            used: 0,
            peak: 0,
            memory_refused: false,
        }
    }

    /// Charge `bytes` more to the memory cap; false (and nothing charged) past it.
    pub(crate) fn charge(&mut self, bytes: usize) -> bool {
        match self.used.checked_add(bytes) {
            Some(total) if total <= self.max_memory => {
                self.used = total;
                self.peak = self.peak.max(total);
                true
            }
            _ => {
                self.memory_refused = true;
                false
            }
        }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(self.charge(desired.saturating_sub(current)))
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.max_table)
    }

    fn instances(&self) -> usize {
        self.shape.instances
    }
    fn tables(&self) -> usize {
        self.shape.tables
    }
    fn memories(&self) -> usize {
        self.shape.memories
    }
}

/// The pipes of a WASI context, read after the run.
#[derive(Debug, Clone)]
pub(crate) struct Pipes {
    pub(crate) stdout: MemoryOutputPipe,
    pub(crate) stderr: MemoryOutputPipe,
}

/// A WASI preview 2 context (components).
pub(crate) struct P2 {
    pub(crate) ctx: WasiCtx,
    pub(crate) table: ResourceTable,
}

/// Extism's per-execution state: the block space, and the binary's configuration as the
/// execution started.
#[derive(Debug)]
pub(crate) struct ExtismCtx {
    pub(crate) blocks: Blocks,
    pub(crate) config: Arc<BTreeMap<String, String>>,
}

/// The data of one execution's `Store`.
pub struct ExecCtx {
    pub(crate) limiter: Limiter,
    /// The guest's memory, cached after instantiation.
    pub(crate) memory: Option<Memory>,
    /// The guest's `alloc`, for `get_state` to hand values back.
    pub(crate) alloc: Option<TypedFunc<i32, i32>>,
    pub(crate) output: Vec<u8>,
    pub(crate) output_cap: usize,
    pub(crate) logs: Logs,
    pub(crate) state: StateTxn,
    pub(crate) max_key: usize,
    pub(crate) deadline: Instant,
    /// The guest runs inline, on the calling thread (its kind said so before instantiating):
    /// the epoch callback cannot yield, it hands the thread's runtime work to another.
    pub(crate) inline: bool,
    /// Epoch ticks this execution has seen.
    pub(crate) ticks: u32,
    pub(crate) pipes: Option<Pipes>,
    pub(crate) wasi: Option<WasiP1Ctx>,
    pub(crate) p2: Option<P2>,
    pub(crate) extism: Option<ExtismCtx>,
}

impl std::fmt::Debug for ExecCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecCtx").finish_non_exhaustive()
    }
}

impl WasiView for ExecCtx {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let p2 = self
            .p2
            .as_mut()
            .expect("a WASI preview 2 context exists for every component execution");
        WasiCtxView {
            ctx: &mut p2.ctx,
            table: &mut p2.table,
        }
    }
}

impl ExecCtx {
    /// Move what the guest wrote to stdout into the output, checking the output cap (a
    /// capped pipe keeps one byte past the cap, so overflowing is seen).
    pub(crate) fn take_stdout_as_output(&mut self) -> Result<(), HostTrap> {
        if let Some(p) = &self.pipes {
            let out = p.stdout.contents();
            if out.len() > self.output_cap {
                return Err(HostTrap::OutputTooLarge(self.output_cap));
            }
            self.output = out.to_vec();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked() {
        assert_eq!(guest_range("f", 0, 0, 0).unwrap(), 0..0);
        assert_eq!(guest_range("f", 10, 5, 15).unwrap(), 10..15);
        assert!(guest_range("f", 10, 6, 15).is_err());
        assert!(guest_range("f", -1, 1, 100).is_err());
        assert!(guest_range("f", 1, -1, 100).is_err());
        assert!(guest_range("f", i32::MAX, i32::MAX, usize::MAX >> 1).is_ok());
        assert!(guest_range("f", i32::MAX, 2, i32::MAX as usize).is_err());
    }

    #[test]
    fn the_memory_cap_holds_for_the_sum_of_memories() {
        let mut l = Limiter::new(100, 10, StoreShape::COMPONENT);
        assert!(l.memory_growing(0, 60, None).unwrap());
        assert!(l.memory_growing(0, 40, None).unwrap());
        assert!(!l.memory_growing(40, 41, None).unwrap());
        assert!(l.memory_refused);
        assert_eq!(l.peak, 100);
        assert!(!l.charge(usize::MAX));
    }
}
