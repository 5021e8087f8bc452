//! wasmcored: the wasm-core daemon as a library.
//!
//! Data flows one way: socket → [`connection`] (line codec) → [`cmd`] (one file per op) →
//! [`registry`] / [`executor`] → response. The binary in `main.rs` only parses flags, takes
//! the listeners and calls [`run`].
//!
//! - [`config`]: validated settings.
//! - [`tenant`]: the caller's identity from SO_PEERCRED.
//! - [`engine`]: the Wasmtime engine and its epoch ticker.
//! - [`context`]: the data of one execution's store, shared by every kind.
//! - [`blocks`]: Extism's memory-block space (a leaf: plain data).
//! - [`kinds`]: the host glue of each module kind (process, wasi, extism, component).
//! - [`registry`]: compiled binaries, owner-scoped.
//! - [`executor`]: one execution or a chain, with limits and accounting.
//! - [`metrics`]: counters and histograms (a leaf), read by the `metrics` op.
//! - [`state`]: plugin state behind `get_state` / `set_state` and Extism's vars.
//! - [`store`]: persistence under the state directory; restores into the registry.
//! - [`daemon`]: the shared state commands use.
//! - [`server`], [`connection`], [`cmd`]: the socket service.
//! - [`systemd`]: listeners and readiness notification.
//!
//! Imports point down this list's dependency order: `cmd` uses `daemon`, never `server`;
//! the registry knows nothing of the store; `sys` (the unsafe code) imports no crate module.

pub mod blocks;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod connection;
pub mod context;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod executor;
pub mod kinds;
pub mod logging;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod state;
pub mod store;
mod sys;
pub mod systemd;
pub mod tenant;

pub use config::Config;
pub use daemon::Daemon;
pub use error::{Error, Result};
pub use server::{Signals, Stopped, run};
pub use tenant::Tenant;
