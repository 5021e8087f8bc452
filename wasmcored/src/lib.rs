//! wasmcored: the wasm-core daemon as a library.
//!
//! One process per role. The *broker* ([`server`], [`broker`]) takes the listeners, accepts,
//! reads each peer's credentials into a [`Tenant`] and hands the connection (SCM_RIGHTS) to
//! that tenant's *worker* ([`worker`]): a process of its own, started from this same binary,
//! which serves the connection from then on. Inside a worker data flows one way: socket →
//! [`connection`] (line codec) → [`cmd`] (one file per op) → [`registry`] / [`executor`] →
//! response. The binary in `main.rs` only parses flags, takes the listeners and calls [`run`]
//! (or [`worker::main`]).
//!
//! - [`config`]: validated settings.
//! - [`tenant`]: the caller's identity from SO_PEERCRED.
//! - [`shard`]: counters every execution writes, one copy per thread (a leaf).
//! - [`engine`]: the Wasmtime engine and its epoch ticker.
//! - [`context`]: the data of one execution's store, shared by every kind.
//! - [`blocks`]: Extism's memory-block space (a leaf: plain data).
//! - [`kinds`]: the host glue of each module kind (process, wasi, extism, component).
//! - [`registry`]: compiled binaries, owner-scoped.
//! - [`executor`]: one execution or a chain, with limits and accounting.
//! - [`metrics`]: counters and histograms (a leaf), read by the `metrics` op.
//! - [`state`]: plugin state behind `get_state` / `set_state` and Extism's vars.
//! - [`store`]: persistence under the state directory; restores into the registry.
//! - [`control`]: the broker ↔ worker channels and messages.
//! - [`daemon`]: the shared state commands use (one tenant's, in its worker).
//! - [`connection`], [`cmd`]: serving a connection, in a worker.
//! - [`confine`]: no_new_privs, Landlock and seccomp for a worker.
//! - [`worker`]: a tenant's worker process.
//! - [`cgroup`]: the workers' cgroups under a delegated subtree.
//! - [`broker`], [`server`]: the broker: workers, accept loops, life cycle.
//! - [`systemd`]: listeners and readiness notification.
//!
//! Imports point down this list's dependency order: `cmd` uses `daemon`, never `server`;
//! the registry knows nothing of the store; `sys` (the unsafe code) imports no crate module.

pub mod blocks;
pub mod broker;
pub mod cgroup;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod confine;
pub mod connection;
pub mod context;
pub mod control;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod executor;
pub mod kinds;
pub mod logging;
pub mod metrics;
pub mod provision;
pub mod registry;
pub mod server;
pub mod shard;
pub mod state;
pub mod store;
mod sys;
pub mod systemd;
pub mod tenant;
pub mod worker;

pub use config::Config;
pub use daemon::Daemon;
pub use error::{Error, Result};
pub use server::{ConfigLoader, Signals, Stopped, run};
pub use tenant::Tenant;
