//! What both clients share: the options of each call, request lines, and decoding replies.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use wasmcore_proto::{
    BinaryRequest, ErrorBody, ExecuteResponse, LimitsRequest, LineBuffer, LoadRequest, Stats,
};

use crate::Error;

/// Cap on one reply line. The daemon caps outputs well below it; a longer line means the
/// peer is not a wasm-core daemon.
pub const MAX_REPLY_LINE: usize = 256 << 20;

/// Options of `load`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// A name unique among the caller's binaries; the binary can then be called by it.
    pub name: Option<String>,
    /// Let every tenant execute it (the owner alone may unload it).
    pub public: bool,
    /// Extism plugins: the configuration `config_get` reads. Empty on a replace: the
    /// current version's is kept.
    pub config: BTreeMap<String, String>,
    /// With a name the caller already has: make this module the name's current version
    /// in one step, keeping the old one for a rollback.
    pub replace: bool,
}

impl LoadOptions {
    /// No name, private, no configuration.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register the binary under `name`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Let every tenant execute the binary.
    pub fn public(mut self, public: bool) -> Self {
        self.public = public;
        self
    }

    /// With a name the caller already has, make the module its new version.
    pub fn replace(mut self, replace: bool) -> Self {
        self.replace = replace;
        self
    }

    /// Set one key of an Extism plugin's configuration.
    pub fn config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.insert(key.into(), value.into());
        self
    }
}

/// Options of `execute` and `chain`. Limits may only lower the daemon's maximums.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOptions {
    /// Extism plugins: the function to call (needed when the plugin exports several).
    pub function: Option<String>,
    /// Limits of this execution.
    pub limits: LimitsRequest,
}

impl ExecOptions {
    /// The daemon's default limits, the plugin's only function.
    pub fn new() -> Self {
        Self::default()
    }

    /// Call this function of an Extism plugin.
    pub fn function(mut self, name: impl Into<String>) -> Self {
        self.function = Some(name.into());
        self
    }

    /// Stop the execution after this long (rounded up to whole milliseconds).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.limits.timeout_ms = Some(timeout.as_nanos().div_ceil(1_000_000) as u64);
        self
    }

    /// Cap the guest's memory at this many MiB.
    pub fn memory_limit_mb(mut self, mb: u64) -> Self {
        self.limits.memory_limit_mb = Some(mb);
        self
    }

    /// Give the execution this much fuel (when the daemon meters fuel).
    pub fn fuel(mut self, fuel: u64) -> Self {
        self.limits.fuel = Some(fuel);
        self
    }
}

/// What an execution or a chain produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// The output bytes.
    pub bytes: Vec<u8>,
    /// Wall time, fuel and peak memory of the execution (of the whole chain).
    pub stats: Stats,
    /// For a chain: the stats of each stage, in order.
    pub stages: Vec<Stats>,
    /// Lines the guest logged.
    pub logs: Vec<String>,
}

impl Output {
    /// The output as text, when it is UTF-8.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.bytes).ok()
    }
}

impl TryFrom<ExecuteResponse> for Output {
    type Error = Error;
    fn try_from(r: ExecuteResponse) -> Result<Self, Error> {
        let bytes = match (r.output, r.output_base64) {
            (Some(s), _) => s.into_bytes(),
            (None, Some(b)) => wasmcore_proto::decode_base64(&b)
                .map_err(|e| Error::Protocol(format!("the daemon sent bad output: {e}")))?,
            (None, None) => Vec::new(),
        };
        Ok(Output {
            bytes,
            stats: r.stats,
            stages: r.stages,
            logs: r.logs,
        })
    }
}

/// Input bytes as the protocol carries them: `input` when UTF-8, else `input_base64`.
pub(crate) enum Input<'a> {
    Text(&'a str),
    Base64(String),
}

impl<'a> Input<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(s) => Input::Text(s),
            Err(_) => Input::Base64(wasmcore_proto::encode_base64(bytes)),
        }
    }
}

/// An `execute` or `chain` line, serialized without copying the input.
#[derive(Serialize)]
struct RunLine<'a> {
    op: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    binary: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    binaries: Option<&'a [&'a str]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    function: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    input: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    input_base64: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_limit_mb: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fuel: Option<u64>,
}

impl<'a> RunLine<'a> {
    fn new(op: &'static str, input: &'a Input<'a>, opts: &'a ExecOptions) -> Self {
        let (input, input_base64) = match input {
            Input::Text(s) => (Some(*s), None),
            Input::Base64(b) => (None, Some(b.as_str())),
        };
        RunLine {
            op,
            binary: None,
            binaries: None,
            function: opts.function.as_deref(),
            input,
            input_base64,
            timeout_ms: opts.limits.timeout_ms,
            memory_limit_mb: opts.limits.memory_limit_mb,
            fuel: opts.limits.fuel,
        }
    }
}

/// Append an `execute` line to `out`.
pub(crate) fn execute_line(binary: &str, input: &[u8], opts: &ExecOptions, out: &mut Vec<u8>) {
    let input = Input::new(input);
    let mut line = RunLine::new("execute", &input, opts);
    line.binary = Some(binary);
    wasmcore_proto::encode_line_into(&line, out);
}

/// Append a `chain` line to `out`. The function of `opts` does not apply (name it per
/// stage as `BINARY:FUNCTION`).
pub(crate) fn chain_line(binaries: &[&str], input: &[u8], opts: &ExecOptions, out: &mut Vec<u8>) {
    let input = Input::new(input);
    let mut line = RunLine::new("chain", &input, opts);
    line.function = None;
    line.binaries = Some(binaries);
    wasmcore_proto::encode_line_into(&line, out);
}

/// Append one `execute` line per input to `out` (cleared first); returns how many.
pub(crate) fn execute_lines<I>(
    binary: &str,
    inputs: I,
    opts: &ExecOptions,
    out: &mut Vec<u8>,
) -> usize
where
    I: IntoIterator,
    I::Item: AsRef<[u8]>,
{
    out.clear();
    inputs
        .into_iter()
        .map(|input| execute_line(binary, input.as_ref(), opts, out))
        .count()
}

/// Decode the reply line `buf` holds (read until it holds one). [`Error::Protocol`] means
/// the connection can no longer be trusted.
pub(crate) fn take_reply<R>(
    buf: &mut LineBuffer,
    decode: impl FnOnce(&[u8]) -> Result<R, Error>,
) -> Result<R, Error> {
    let line = buf.next_line().ok().flatten().ok_or_else(too_long)?;
    decode(line)
}

/// One result of a pipelined batch: the outer error ends the batch (the connection is
/// broken), the inner one is the daemon's answer to that request.
pub(crate) fn batch_reply(buf: &mut LineBuffer) -> Result<Result<Output, Error>, Error> {
    match take_reply(buf, decode_output) {
        Err(e @ Error::Protocol(_)) => Err(e),
        r => Ok(r),
    }
}

/// The part of every reply that says whether it succeeded.
#[derive(Deserialize)]
struct Head {
    ok: bool,
    #[serde(default)]
    error: Option<ErrorBody>,
}

/// Decode one reply line: the op's fields on success, [`Error::Server`] on an error reply.
pub(crate) fn decode<B: DeserializeOwned>(line: &[u8]) -> Result<B, Error> {
    let bad =
        |e: serde_json::Error| Error::Protocol(format!("the daemon sent an invalid reply: {e}"));
    let head: Head = serde_json::from_slice(line).map_err(bad)?;
    if !head.ok {
        return Err(match head.error {
            Some(body) => Error::from(body),
            None => Error::Protocol("the daemon sent an error reply without an error".into()),
        });
    }
    serde_json::from_slice(line).map_err(bad)
}

/// Decode an `execute` or `chain` reply.
pub(crate) fn decode_output(line: &[u8]) -> Result<Output, Error> {
    decode::<ExecuteResponse>(line)?.try_into()
}

/// A reply line as JSON, whatever it says.
pub(crate) fn decode_json(line: &[u8]) -> Result<serde_json::Value, Error> {
    serde_json::from_slice(line)
        .map_err(|e| Error::Protocol(format!("the daemon sent invalid JSON: {e}")))
}

/// The error for a connection the daemon closed before answering.
pub(crate) fn closed_early() -> Error {
    Error::Protocol(
        "the daemon closed the connection without answering (see its log: journalctl -u wasm-core)"
            .into(),
    )
}

/// The error for a reply longer than [`MAX_REPLY_LINE`].
pub(crate) fn too_long() -> Error {
    Error::Protocol(format!(
        "a reply line is longer than {MAX_REPLY_LINE} bytes: the peer is not a wasm-core daemon"
    ))
}

/// The pipelined batches are written from a second thread or task only above this size;
/// smaller ones fit the socket buffers and are written before the replies are read.
pub(crate) const INLINE_BATCH: usize = 64 * 1024;

/// Drop a request buffer that a large batch grew, rather than keep its memory for the
/// connection's lifetime.
pub(crate) fn release(out: &mut Vec<u8>) {
    if out.capacity() > 1 << 20 {
        *out = Vec::new();
    }
}

/// Passing `None` for a timeout means waiting as long as the daemon takes (it enforces its
/// own execution deadlines).
pub(crate) type Timeout = Option<Duration>;

/// A `load` request with the options of `opts` and its source set by `source`.
pub(crate) fn load_request(
    opts: &LoadOptions,
    source: impl FnOnce(&mut LoadRequest),
) -> LoadRequest {
    let mut req = LoadRequest {
        name: opts.name.clone(),
        public: opts.public,
        config: (!opts.config.is_empty()).then(|| opts.config.clone()),
        replace: opts.replace,
        ..LoadRequest::default()
    };
    source(&mut req);
    req
}

pub(crate) fn binary_request(binary: &str) -> BinaryRequest {
    BinaryRequest {
        tag: None,
        binary: binary.to_string(),
    }
}
