//! wasmcored: the wasm-core daemon as a library.
//!
//! Data flows one way: socket → [`connection`] (line codec) → [`cmd`] (one file per op) →
//! [`registry`] / [`executor`] → response. The binary in `main.rs` only parses flags, takes
//! the listeners and calls [`run`].
//!
//! - [`config`]: validated settings.
//! - [`tenant`]: the caller's identity from SO_PEERCRED.
//! - [`engine`]: the Wasmtime engine and its epoch ticker.
//! - [`registry`]: compiled binaries, owner-scoped.
//! - [`executor`]: one execution or a chain, with limits and accounting.
//! - [`abi`]: the `host` functions of the plugin ABI.
//! - [`state`]: plugin state behind `get_state` / `set_state`.
//! - [`store`]: persistence under the state directory.
//! - [`server`], [`connection`], [`cmd`]: the socket service.
//! - [`systemd`]: listeners and readiness notification.

pub mod abi;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod connection;
pub mod engine;
pub mod error;
pub mod executor;
pub mod logging;
pub mod registry;
pub mod server;
pub mod state;
pub mod store;
mod sys;
pub mod systemd;
pub mod tenant;

pub use config::Config;
pub use error::{Error, Result};
pub use server::{Daemon, Signals, Stopped, run};
pub use tenant::Tenant;
