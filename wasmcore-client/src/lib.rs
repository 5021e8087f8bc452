//! A client for the wasm-core daemon (`wasmcored`): load WebAssembly binaries, execute and
//! chain them, over the daemon's Unix socket, under the caller's own uid.
//!
//! Two clients share one behaviour:
//! - [`blocking::Client`], for threads;
//! - [`nonblocking::AsyncClient`], for Tokio (feature `tokio`, on by default).
//!
//! Both find the socket the way `wasmcorectl` does ([`resolve_socket`]), refuse a socket
//! served by anyone but root, the `wasm-core` service user or the caller before sending a
//! byte ([`Error::UntrustedServer`]), load files by passing an open descriptor (the daemon
//! never opens tenants' paths), pipeline many executions on one connection
//! (`execute_many`), apply an optional timeout, and return the daemon's error answers as
//! [`Error::Server`] with the wire [`ErrorCode`].
//!
//! ```no_run
//! use wasmcore_client::{Client, ErrorCode, LoadOptions};
//!
//! # fn main() -> Result<(), wasmcore_client::Error> {
//! let mut client = Client::connect()?;
//! client.load_file(
//!     "/usr/share/wasm-core/plugins/uppercase.wasm",
//!     &LoadOptions::new().name("up"),
//! )?;
//! let out = client.execute("up", b"hello")?;
//! assert_eq!(out.bytes, b"HELLO");
//! println!("{} µs in the daemon", out.stats.wall_us);
//!
//! // Many requests in flight on one connection, answered in order.
//! let inputs = ["a", "b", "c"];
//! for result in client.execute_many("up", inputs, &Default::default())? {
//!     println!("{:?}", result?.text());
//! }
//!
//! match client.execute("no-such-binary", b"") {
//!     Err(e) if e.code() == Some(ErrorCode::NotFound) => println!("not loaded"),
//!     other => println!("{other:?}"),
//! }
//! client.unload("up")?;
//! # Ok(())
//! # }
//! ```
//!
//! The protocol itself is described in wasm-core's `docs/PROTOCOL.md`; its types are
//! re-exported from [`wasmcore_proto`] as [`proto`].

pub mod blocking;
mod error;
#[cfg(feature = "tokio")]
pub mod nonblocking;
mod socket;
mod wire;

pub use blocking::Client;
pub use error::Error;
#[cfg(feature = "tokio")]
pub use nonblocking::AsyncClient;
pub use socket::{RUN_SOCKET, SOCKET_ENV, TMP_SOCKET, resolve_socket};
pub use wasmcore_proto as proto;
pub use wasmcore_proto::{
    BinaryInfo, ErrorBody, ErrorCode, InfoResponse, LoadResponse, MetricsResponse, ModuleKind,
    RollbackResponse, Stats, StatusResponse, VersionInfo, VersionsResponse,
};
pub use wire::{ExecOptions, LoadOptions, MAX_REPLY_LINE, Output};
