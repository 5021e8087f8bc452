//! The wasm-core wire protocol, version 1: request and response types and the line codec.
//!
//! One JSON object per line in each direction. Every request carries `"op"` and may carry a
//! `"tag"` (any JSON value) that the daemon echoes back; every response carries `"ok"`.
//! Failures carry `"error": {"code", "message", …}` with a stable snake_case code.
//!
//! This crate is shared by the daemon, `wasmcorectl` and the tests. It has no I/O of its own:
//! [`LineBuffer`] splits bytes into capped lines, [`decode_request`] turns one line into a
//! [`Request`], and [`encode_line`] turns any response into one line. `docs/PROTOCOL.md` is
//! the reference for users; it must match this file.

#![forbid(unsafe_code)]

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// The protocol version reported by `status`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Default cap on one request line, in bytes (a 16 MiB module in base64 fits).
pub const DEFAULT_MAX_LINE: usize = 24 << 20;

/// Stable error codes. The wire form is the snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed: not JSON, unknown op, missing or invalid field.
    BadRequest,
    /// A request line, module, input or output exceeds its cap.
    TooLarge,
    /// No binary by that UUID or name is visible to the caller.
    NotFound,
    /// The caller is not allowed to do this.
    Forbidden,
    /// The module is not valid WebAssembly or does not follow the plugin ABI.
    InvalidModule,
    /// The execution ran past its deadline.
    Timeout,
    /// The execution used up its fuel.
    OutOfFuel,
    /// The execution needed more linear memory than its cap.
    MemoryLimit,
    /// The guest trapped.
    Trap,
    /// The plugin returned a non-zero code (or a WASI command exited non-zero).
    PluginError,
    /// A per-tenant quota would be exceeded.
    QuotaExceeded,
    /// A concurrency limit is reached; retry later.
    Busy,
    /// A binary with that name already exists for this owner.
    AlreadyExists,
    /// The daemon failed; details are in its log.
    Internal,
}

impl ErrorCode {
    /// Every code, in the order of the documentation.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::BadRequest,
        ErrorCode::TooLarge,
        ErrorCode::NotFound,
        ErrorCode::Forbidden,
        ErrorCode::InvalidModule,
        ErrorCode::Timeout,
        ErrorCode::OutOfFuel,
        ErrorCode::MemoryLimit,
        ErrorCode::Trap,
        ErrorCode::PluginError,
        ErrorCode::QuotaExceeded,
        ErrorCode::Busy,
        ErrorCode::AlreadyExists,
        ErrorCode::Internal,
    ];

    /// The wire name of the code.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::InvalidModule => "invalid_module",
            ErrorCode::Timeout => "timeout",
            ErrorCode::OutOfFuel => "out_of_fuel",
            ErrorCode::MemoryLimit => "memory_limit",
            ErrorCode::Trap => "trap",
            ErrorCode::PluginError => "plugin_error",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::Busy => "busy",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Limits a caller may ask for on `execute` and `chain`. Each may only lower the daemon's
/// configured maximum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
}

impl LimitsRequest {
    /// Asks for no limit of its own.
    pub fn is_empty(&self) -> bool {
        *self == LimitsRequest::default()
    }

    /// These limits, each one not given taken from `defaults`.
    pub fn or(self, defaults: &LimitsRequest) -> LimitsRequest {
        LimitsRequest {
            timeout_ms: self.timeout_ms.or(defaults.timeout_ms),
            memory_limit_mb: self.memory_limit_mb.or(defaults.memory_limit_mb),
            fuel: self.fuel.or(defaults.fuel),
        }
    }
}

/// `load`: register a module. Exactly one source: `wasm_base64`, `fd: true` (the module is
/// the file descriptor passed with SCM_RIGHTS together with this line), or `path` (admins).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm_base64: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fd: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub public: bool,
    /// Extism plugins: the configuration `config_get` reads (string keys and values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<BTreeMap<String, String>>,
    /// With `name`: when the caller already has a binary of that name, make the new module
    /// its current version (the old one is kept as its previous version) instead of failing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replace: bool,
    /// Where the client got the module (an OCI reference): kept with the binary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

/// Where a module came from, as the client that loaded it says: the `oci://` reference it
/// pulled and the digest of the manifest it pulled it by.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub reference: String,
    pub digest: String,
}

/// `configure`: replace the configuration of a binary (its owner or an admin).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigureRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<Value>,
    pub binary: String,
    pub config: BTreeMap<String, String>,
}

/// `execute`: run one binary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecuteRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<Value>,
    pub binary: String,
    /// The exported function to call (Extism plugins); needed only when there are several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_base64: Option<String>,
    #[serde(flatten)]
    pub limits: LimitsRequest,
}

/// `chain`: run binaries in order, each one's output the next one's input. A stage is a
/// binary reference (see [`split_owner`]), or `BINARY:FUNCTION` to call one function of an
/// Extism plugin.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<Value>,
    pub binaries: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_base64: Option<String>,
    #[serde(flatten)]
    pub limits: LimitsRequest,
}

/// `list`: the binaries visible to the caller (`all`: every tenant's, admins only).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<Value>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
}

/// `unload` and `info`: one binary by UUID, name or `OWNER/NAME`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BinaryRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<Value>,
    pub binary: String,
}

/// `status`: daemon-wide facts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<Value>,
}

/// `metrics`: the daemon's counters (the caller's own; every tenant's for admins).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<Value>,
}

/// `apply` (admins): bring the binaries to what the provisioning files declare, or with
/// `dry_run` only say what that would change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<Value>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// `reload` (admins): read the config file again and apply it, then apply the provisioning
/// files; answered once both are done (what `systemctl reload` runs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<Value>,
}

/// One request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Load(LoadRequest),
    Execute(ExecuteRequest),
    Chain(ChainRequest),
    List(ListRequest),
    Unload(BinaryRequest),
    Info(BinaryRequest),
    Status(StatusRequest),
    Configure(ConfigureRequest),
    Metrics(MetricsRequest),
    Rollback(BinaryRequest),
    Versions(BinaryRequest),
    Apply(ApplyRequest),
    Reload(ReloadRequest),
}

impl Request {
    /// The op name as on the wire.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Load(_) => "load",
            Request::Execute(_) => "execute",
            Request::Chain(_) => "chain",
            Request::List(_) => "list",
            Request::Unload(_) => "unload",
            Request::Info(_) => "info",
            Request::Status(_) => "status",
            Request::Configure(_) => "configure",
            Request::Metrics(_) => "metrics",
            Request::Rollback(_) => "rollback",
            Request::Versions(_) => "versions",
            Request::Apply(_) => "apply",
            Request::Reload(_) => "reload",
        }
    }

    /// The caller's tag, echoed in the response.
    pub fn take_tag(&mut self) -> Option<Value> {
        match self {
            Request::Load(r) => r.tag.take(),
            Request::Execute(r) => r.tag.take(),
            Request::Chain(r) => r.tag.take(),
            Request::List(r) => r.tag.take(),
            Request::Unload(r) | Request::Info(r) | Request::Rollback(r) | Request::Versions(r) => {
                r.tag.take()
            }
            Request::Status(r) => r.tag.take(),
            Request::Configure(r) => r.tag.take(),
            Request::Metrics(r) => r.tag.take(),
            Request::Apply(r) => r.tag.take(),
            Request::Reload(r) => r.tag.take(),
        }
    }
}

impl Request {
    /// The binary references the request names, in order (a chain's stages with their
    /// `:FUNCTION`: see [`split_stage`]).
    pub fn references(&self) -> &[String] {
        match self {
            Request::Execute(r) => std::slice::from_ref(&r.binary),
            Request::Info(r) | Request::Unload(r) | Request::Rollback(r) | Request::Versions(r) => {
                std::slice::from_ref(&r.binary)
            }
            Request::Configure(r) => std::slice::from_ref(&r.binary),
            Request::Chain(r) => &r.binaries,
            _ => &[],
        }
    }

    /// [`Request::references`], to be rewritten in place.
    pub fn references_mut(&mut self) -> &mut [String] {
        match self {
            Request::Execute(r) => std::slice::from_mut(&mut r.binary),
            Request::Info(r) | Request::Unload(r) | Request::Rollback(r) | Request::Versions(r) => {
                std::slice::from_mut(&mut r.binary)
            }
            Request::Configure(r) => std::slice::from_mut(&mut r.binary),
            Request::Chain(r) => &mut r.binaries,
            _ => &mut [],
        }
    }
}

/// A chain stage, `BINARY` or `BINARY:FUNCTION`: the binary reference and the function.
/// (UUIDs, names and user names have no colon.)
pub fn split_stage(stage: &str) -> (&str, Option<&str>) {
    match stage.split_once(':') {
        Some((binary, function)) => (binary, Some(function)),
        None => (stage, None),
    }
}

/// Whose binary an owner-qualified reference names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner<'a> {
    /// A uid, in decimal.
    Uid(u32),
    /// A user name, looked up in the host's user database.
    User(&'a str),
}

/// A binary reference of the form `OWNER/NAME`: the binary named NAME of the user OWNER (a
/// user name or a uid). `None` for a reference without a `/` (a UUID or a bare name); an
/// error, for the user, when either side is empty.
pub fn split_owner(reference: &str) -> Option<Result<(Owner<'_>, &str), String>> {
    let (owner, name) = reference.split_once('/')?;
    if owner.is_empty() || name.is_empty() || name.contains('/') {
        return Some(Err(format!(
            "invalid binary reference {reference:?}: an owner-qualified name is OWNER/NAME, OWNER a user name or a uid"
        )));
    }
    let owner = match owner.parse::<u32>() {
        Ok(uid) if owner.bytes().all(|b| b.is_ascii_digit()) => Owner::Uid(uid),
        _ => Owner::User(owner),
    };
    Some(Ok((owner, name)))
}

/// Why a line could not be decoded into a [`Request`].
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    /// The caller's tag, when the line was JSON with a `tag` field.
    pub tag: Option<Value>,
    pub message: String,
}

/// Decode one request line (without its newline).
pub fn decode_request(line: &[u8]) -> Result<Request, DecodeError> {
    let text = std::str::from_utf8(line).map_err(|e| DecodeError {
        tag: None,
        message: format!("request is not valid UTF-8 ({e}); a request is one JSON object per line"),
    })?;
    if let Some(req) = decode_execution(text) {
        return Ok(req);
    }
    serde_json::from_str::<Request>(text).map_err(|e| {
        // Recover the tag for the error response when the line is at least a JSON object.
        #[derive(Deserialize)]
        struct TagOnly {
            #[serde(default)]
            tag: Option<Value>,
        }
        let tag = serde_json::from_str::<TagOnly>(text)
            .ok()
            .and_then(|t| t.tag);
        DecodeError {
            tag,
            message: describe_json_error(text, &e),
        }
    })
}

/// The fields of `execute` and `chain`, flat, as they come on the line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecutionLine {
    op: ExecutionOp,
    #[serde(default)]
    tag: Option<Value>,
    #[serde(default)]
    binary: Option<String>,
    #[serde(default)]
    binaries: Option<Vec<String>>,
    #[serde(default)]
    function: Option<String>,
    #[serde(default)]
    input: Option<String>,
    #[serde(default)]
    input_base64: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    memory_limit_mb: Option<u64>,
    #[serde(default)]
    fuel: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum ExecutionOp {
    Execute,
    Chain,
}

/// A well-formed `execute` or `chain` line, decoded in one pass: the tagged [`Request`]
/// buffers every field of a line (to find `op` first) and again for the flattened limits,
/// which is most of the cost of decoding a small request. `None` for anything else, which
/// [`decode_request`] then decodes (or refuses, with its messages) the general way; this
/// accepts only what that way accepts, and decodes it to the same value.
fn decode_execution(text: &str) -> Option<Request> {
    let line: ExecutionLine = serde_json::from_str(text).ok()?;
    let limits = LimitsRequest {
        timeout_ms: line.timeout_ms,
        memory_limit_mb: line.memory_limit_mb,
        fuel: line.fuel,
    };
    match (line.op, line.binary, line.binaries, line.function) {
        (ExecutionOp::Execute, Some(binary), None, function) => {
            Some(Request::Execute(ExecuteRequest {
                tag: line.tag,
                binary,
                function,
                input: line.input,
                input_base64: line.input_base64,
                limits,
            }))
        }
        (ExecutionOp::Chain, None, Some(binaries), None) => Some(Request::Chain(ChainRequest {
            tag: line.tag,
            binaries,
            input: line.input,
            input_base64: line.input_base64,
            limits,
        })),
        _ => None,
    }
}

fn describe_json_error(text: &str, e: &serde_json::Error) -> String {
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        return "empty request line; send one JSON object per line".to_string();
    }
    if !trimmed.starts_with('{') {
        if e.is_syntax() {
            return format!("request is not a JSON object: {e}");
        }
        let what = match trimmed.as_bytes()[0] {
            b'[' => "an array",
            b'"' => "a string",
            b't' | b'f' => "a boolean",
            b'n' => "null",
            _ => "a number",
        };
        return format!(
            "request is not a JSON object but {what}; send one object per line, such as {{\"op\":\"status\"}}"
        );
    }
    let msg = e.to_string();
    if msg.contains("missing field `op`") {
        return "missing field `op` (one of load, execute, chain, list, unload, info, status, configure, metrics)"
            .to_string();
    }
    if msg.starts_with("unknown variant") {
        return format!("unknown op: {msg}");
    }
    format!("invalid request: {msg}")
}

/// The per-execution accounting returned with every result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub wall_us: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel_used: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_peak_bytes: Option<u64>,
}

/// The error object of a failed response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// For `chain`: the 0-based index of the stage that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<usize>,
    /// For `plugin_error`: the plugin's return code or WASI exit status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_code: Option<i32>,
    /// For `trap`: the innermost wasm frames.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backtrace: Vec<String>,
    /// Log lines the guest wrote before it failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<String>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
            stage: None,
            plugin_code: None,
            backtrace: Vec::new(),
            logs: Vec::new(),
        }
    }
}

/// The kind of a binary, detected at load: the seed's `process` ABI, a WASI preview1
/// command, an Extism plugin, or a `wasi:cli/command` component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleKind {
    Process,
    Wasi,
    Extism,
    Component,
}

impl ModuleKind {
    /// Every kind, in the order the documentation lists them.
    pub const ALL: [ModuleKind; 4] = [
        ModuleKind::Process,
        ModuleKind::Wasi,
        ModuleKind::Extism,
        ModuleKind::Component,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ModuleKind::Process => "process",
            ModuleKind::Wasi => "wasi",
            ModuleKind::Extism => "extism",
            ModuleKind::Component => "component",
        }
    }
}

impl std::fmt::Display for ModuleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Response to `load`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadResponse {
    pub binary: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub sha256: String,
    pub size: u64,
    pub kind: ModuleKind,
    pub public: bool,
    pub compile_ms: f64,
    /// A `replace`: the UUID of the version that was current before (kept as the name's
    /// previous version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced: Option<String>,
    /// A `replace` with the bytes of the current version: nothing changed, and `binary` is
    /// the current version.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unchanged: bool,
}

/// Response to `execute` and `chain`. Output is `output` when it is UTF-8, else
/// `output_base64`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecuteResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_base64: Option<String>,
    pub stats: Stats,
    /// For `chain`: the stats of each stage in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<Stats>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<String>,
}

impl ExecuteResponse {
    /// Put `bytes` into `output` or `output_base64`.
    pub fn set_output(&mut self, bytes: Vec<u8>) {
        match String::from_utf8(bytes) {
            Ok(s) => {
                self.output = Some(s);
                self.output_base64 = None;
            }
            Err(e) => {
                self.output = None;
                self.output_base64 =
                    Some(base64::engine::general_purpose::STANDARD.encode(e.as_bytes()));
            }
        }
    }

    /// The output bytes, whichever field carries them.
    pub fn output_bytes(&self) -> Result<Vec<u8>, String> {
        match (&self.output, &self.output_base64) {
            (Some(s), _) => Ok(s.as_bytes().to_vec()),
            (None, Some(b)) => decode_base64(b),
            (None, None) => Ok(Vec::new()),
        }
    }
}

/// One entry of `list`, and the core of `info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BinaryInfo {
    pub binary: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub owner_uid: u32,
    pub size: u64,
    pub sha256: String,
    pub kind: ModuleKind,
    pub public: bool,
    /// Seconds since the Unix epoch.
    pub loaded_at: u64,
    pub executions: u64,
    /// A version of its name that is no longer current, kept for `rollback` (and executable
    /// by UUID).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub superseded: bool,
    /// Where it was pulled from, when it was loaded from an OCI registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// Declared by a provisioning file: only that file changes or removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioned: Option<Provisioned>,
}

/// What a provisioning file declares of a binary beyond its module: the file itself, and the
/// limits its executions get when they ask for none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provisioned {
    pub file: String,
    #[serde(default, skip_serializing_if = "LimitsRequest::is_empty")]
    pub limits: LimitsRequest,
}

/// What `apply` did (or, with `dry_run`, would do) for one provisioning file or one
/// provisioned binary whose file is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProvisionAction {
    /// Not loaded yet: load it.
    Load,
    /// The module changed: replace the name's current version.
    Replace,
    /// Same module, other configuration or limits: change them in place.
    Configure,
    /// Its file is gone: unload every version of its name.
    Unload,
    /// Already as declared.
    Unchanged,
    /// The file is refused (see `error`); what it declared before is left as it is.
    Invalid,
}

/// One line of an `apply` report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProvisionEntry {
    /// The provisioning file.
    pub file: String,
    pub action: ProvisionAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_uid: Option<u32>,
    /// The binary the name is on afterwards (for `unload`: the one it was on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<String>,
    /// The module's sha256: the declared one (`load`, `replace`, `unchanged`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// For `invalid`, or an action that failed: why, with the file's line when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// An `oci://…@sha256:…` source not in the daemon's cache yet: `wasmcorectl apply`
    /// pulls it there (as the caller, with the caller's credentials) and applies again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<String>,
}

/// Response to `apply`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplyResponse {
    /// The directory read (`provisioning.dir`).
    pub dir: String,
    /// Where `oci://` sources are taken from (`provisioning.oci_cache`): one
    /// `sha256-<manifest digest>/` directory each, with `manifest.json` and `module.wasm`.
    #[serde(default)]
    pub oci_cache: String,
    pub dry_run: bool,
    /// One entry per file (sorted by file name), then one per provisioned binary whose
    /// file is gone.
    pub entries: Vec<ProvisionEntry>,
}

impl ApplyResponse {
    /// Entries that were refused or failed.
    pub fn failed(&self) -> usize {
        self.entries.iter().filter(|e| e.error.is_some()).count()
    }
}

/// Response to `reload`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadResponse {
    /// The config file was read again and is in force (false: the daemon runs without
    /// one, or it was refused: `config_error`, and the running configuration stays).
    pub config_applied: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
    /// Keys that changed but take effect at the next start only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restart_needed: Vec<String>,
    /// What the provisioning files changed; absent when their directory could not be
    /// read (`provisioning_error`), and then nothing changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning: Option<ApplyResponse>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_error: Option<String>,
}

impl ReloadResponse {
    /// Whether anything was refused or failed.
    pub fn failed(&self) -> bool {
        self.config_error.is_some()
            || self.provisioning_error.is_some()
            || self.provisioning.as_ref().is_some_and(|p| p.failed() > 0)
    }
}

/// Response to `rollback`: the name now points to `binary`, the version that was current
/// before `previous`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollbackResponse {
    pub name: String,
    pub owner_uid: u32,
    pub binary: String,
    pub sha256: String,
    pub previous: String,
}

/// One version of a name, in `versions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub binary: String,
    pub sha256: String,
    pub size: u64,
    pub kind: ModuleKind,
    /// Seconds since the Unix epoch.
    pub loaded_at: u64,
    pub current: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

/// Response to `versions`: the versions a name keeps, in the order they became current
/// (the current one last; `rollback` goes to the one before it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionsResponse {
    pub name: String,
    pub owner_uid: u32,
    pub public: bool,
    pub versions: Vec<VersionInfo>,
}

/// Response to `list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListResponse {
    pub binaries: Vec<BinaryInfo>,
}

/// Effective limits of an execution (also reported by `info` and `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub timeout_ms: u64,
    pub memory_limit_mb: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
}

/// An import or export of a module, as reported by `info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExternInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    pub name: String,
    /// `func`, `memory`, `table` or `global`, with the function signature for `func`.
    #[serde(rename = "type")]
    pub ty: String,
}

/// Response to `info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InfoResponse {
    #[serde(flatten)]
    pub info: BinaryInfo,
    pub imports: Vec<ExternInfo>,
    pub exports: Vec<ExternInfo>,
    pub limits: Limits,
    /// Bytes of plugin state the caller holds for this binary.
    pub state_bytes: u64,
    /// Bytes the binary takes in the state directory (original module + precompiled code).
    pub stored_bytes: u64,
    /// Extism plugins: the functions `execute` may call (`function`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub functions: Vec<String>,
    /// Extism plugins: the configuration `config_get` reads.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
}

/// Response to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusResponse {
    pub version: String,
    pub protocol: u32,
    pub uptime_s: u64,
    pub binaries: u64,
    pub executions: u64,
    pub executions_running: u64,
    pub connections: u64,
    pub fuel_metering: bool,
    pub default_limits: Limits,
    pub max_limits: Limits,
    pub max_module_bytes: u64,
    pub max_request_bytes: u64,
    /// Bytes of binaries in the state directory (original modules + precompiled code).
    pub stored_bytes: u64,
    /// Bytes of plugin state held by all tenants.
    pub state_bytes: u64,
    /// The caller as the daemon sees it.
    pub tenant: TenantInfo,
    /// Admins only: the live tenant workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<Vec<WorkerInfo>>,
}

/// A live tenant worker (the process that runs one tenant's code).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// The tenant it serves.
    pub uid: u32,
    pub pid: u32,
    /// Connections it serves now.
    pub connections: u64,
    /// Resident memory.
    pub rss_bytes: u64,
    /// User plus system CPU time since it started, in microseconds.
    pub cpu_us: u64,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
}

/// A histogram: cumulative counts per upper bound (seconds), the total count and the sum.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistogramData {
    /// `[upper bound, cumulative count]` pairs, ascending; +Inf is `count`.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum: f64,
}

/// Executions of one kind by one tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KindMetrics {
    pub kind: ModuleKind,
    /// Executions by outcome: `ok` or the error code.
    pub executions: BTreeMap<String, u64>,
    pub fuel_total: u64,
    /// The largest memory one execution held.
    pub memory_peak_bytes: u64,
    /// Wall time per execution, in seconds.
    pub latency_seconds: HistogramData,
}

/// One tenant's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantMetrics {
    pub uid: u32,
    pub connections_open: u64,
    pub connections_opened: u64,
    pub executions_running: u64,
    pub binaries: u64,
    pub binary_bytes: u64,
    pub state_bytes: u64,
    pub loads_ok: u64,
    pub loads_failed: u64,
    /// Compile time of successful loads, in seconds.
    pub compile_seconds: HistogramData,
    /// Refused requests by reason.
    pub refusals: BTreeMap<String, u64>,
    /// One entry per kind this tenant has executed.
    pub kinds: Vec<KindMetrics>,
    /// Times this tenant's worker ended other than when told to (admins' view).
    #[serde(default)]
    pub worker_failures: u64,
    /// The tenant's live worker process, with its CPU time and memory (admins' view).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<WorkerInfo>,
}

/// One binary's figures, since it was loaded (or the daemon started).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BinaryMetrics {
    pub binary: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub owner_uid: u32,
    pub kind: ModuleKind,
    pub executions: u64,
    pub errors: u64,
    pub wall_seconds_total: f64,
    pub fuel_total: u64,
    pub memory_peak_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_seconds: Option<f64>,
    /// The latency sketch: `[bucket, count]` for non-empty buckets (see [`sketch_quantile`]).
    pub sketch: Vec<(u32, u64)>,
}

/// Wasmtime's pooling allocator: slots in use and its capacity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolMetrics {
    pub capacity: u64,
    pub core_instances: u64,
    pub component_instances: u64,
    pub memories: u64,
    pub tables: u64,
    pub unused_warm_memories: u64,
}

/// What the last start restored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreMetrics {
    pub restored: u64,
    pub recompiled: u64,
    pub quarantined: u64,
}

/// Response to `metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsResponse {
    pub version: String,
    pub wasmtime_version: String,
    pub protocol: u32,
    pub uptime_seconds: f64,
    /// Whether every tenant is included (the caller is an admin).
    pub all_tenants: bool,
    /// Daemon-wide figures: admins only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_open: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executions_running: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolMetrics>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreMetrics>,
    pub tenants: Vec<TenantMetrics>,
    pub binaries: Vec<BinaryMetrics>,
}

/// Buckets of a binary's latency sketch: bucket `i` counts executions shorter than
/// 2^((i+1)/2) µs; 64 buckets reach 71 minutes, each √2 wide.
pub const SKETCH_BUCKETS: usize = 64;

/// The upper bound of sketch bucket `i`, in seconds.
pub fn sketch_bound(i: u32) -> f64 {
    2f64.powf((i as f64 + 1.0) / 2.0) / 1e6
}

/// The `q` quantile (0 to 1) of sketch buckets `(index, count)` (ascending), in seconds:
/// the upper bound of the bucket it falls in, so within a factor √2 of the true value.
/// `None` when there are no samples.
pub fn sketch_quantile(buckets: &[(u32, u64)], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().map(|(_, c)| c).sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, c) in buckets {
        seen += c;
        if seen >= rank {
            return Some(sketch_bound(*i));
        }
    }
    buckets.last().map(|(i, _)| sketch_bound(*i))
}

/// Who the daemon thinks the caller is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantInfo {
    pub uid: u32,
    pub gid: u32,
    pub admin: bool,
}

/// A response line: `ok`, the echoed `tag`, then either the op's fields or `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response<B> {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    #[serde(flatten)]
    pub body: Option<B>,
}

impl<B> Response<B> {
    pub fn success(tag: Option<Value>, body: B) -> Self {
        Response {
            ok: true,
            tag,
            error: None,
            body: Some(body),
        }
    }
    pub fn failure(tag: Option<Value>, error: ErrorBody) -> Self {
        Response {
            ok: false,
            tag,
            error: Some(error),
            body: None,
        }
    }
}

/// A response with no fields of its own (`unload`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// Serialize `value` as one line, newline included.
pub fn encode_line<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    encode_line_into(value, &mut out);
    out
}

/// Append `value` as one line, newline included, to `out`.
pub fn encode_line_into<T: Serialize>(value: &T, out: &mut Vec<u8>) {
    // Serializing our own types into a Vec cannot fail: no maps with non-string keys.
    serde_json::to_writer(&mut *out, value).expect("protocol values always serialize");
    out.push(b'\n');
}

/// Standard base64 (with padding), as used by `wasm_base64`, `input_base64`, `output_base64`.
pub fn encode_base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decode standard base64, with a message fit for an error response.
pub fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("invalid base64: {e}"))
}

/// What [`LineBuffer::next_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum LineError {
    /// A line is longer than the cap; the stream cannot be resynchronised.
    TooLong { max: usize },
}

/// Splits a byte stream into lines of at most `max` bytes (newline excluded).
///
/// Bytes are appended with [`LineBuffer::extend`] (or written into [`LineBuffer::spare`]);
/// complete lines are taken with [`LineBuffer::next_line`]. A line over the cap is an error
/// as soon as the cap is passed, so a peer cannot make the buffer grow past `max` + one read.
#[derive(Debug)]
pub struct LineBuffer {
    /// Initialised storage; only `buf[..end]` holds received bytes. The tail stays
    /// initialised so handing out spare room never writes zeros on the hot path.
    buf: Vec<u8>,
    /// End of the received bytes.
    end: usize,
    /// Start of the unconsumed bytes.
    start: usize,
    /// How far `buf[start..end]` has been searched for a newline.
    scanned: usize,
    max: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
    last_span: (u64, u64),
}

impl LineBuffer {
    pub fn new(max: usize) -> Self {
        LineBuffer {
            buf: Vec::new(),
            end: 0,
            start: 0,
            scanned: 0,
            max,
            base: 0,
            last_span: (0, 0),
        }
    }

    /// The cap on one line.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Bytes received and not yet taken as lines.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Total bytes received so far on the stream. With [`LineBuffer::last_line_span`] it ties
    /// ancillary data (passed fds) to the line it arrived with.
    pub fn received_total(&self) -> u64 {
        self.base + self.end as u64
    }

    /// Stream offsets `[first, last]` of the line last returned by `next_line`, newline
    /// included.
    pub fn last_line_span(&self) -> (u64, u64) {
        self.last_span
    }

    /// Move unconsumed bytes to the front once the consumed prefix is worth reclaiming.
    fn compact(&mut self) {
        if self.start > 0 && (self.start == self.end || self.start >= 64 * 1024) {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.base += self.start as u64;
            self.start = 0;
        }
        // A connection that once sent a large module should not keep its buffer.
        if self.end == 0 && self.buf.len() > SHRINK_ABOVE {
            self.buf = Vec::new();
        }
    }

    /// Append received bytes.
    pub fn extend(&mut self, data: &[u8]) {
        self.spare(data.len())[..data.len()].copy_from_slice(data);
        self.end += data.len();
    }

    /// A writable area of at least `want` bytes after the received bytes; call
    /// [`LineBuffer::commit`] with how many bytes were written into it.
    pub fn spare(&mut self, want: usize) -> &mut [u8] {
        self.compact();
        if self.buf.len() < self.end + want {
            self.buf.resize(self.end + want, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Count `n` bytes written into the area returned by [`LineBuffer::spare`].
    pub fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Take the next complete line (without its `\n`, and without a `\r` before it).
    /// `Ok(None)`: no complete line yet.
    pub fn next_line(&mut self) -> Result<Option<&[u8]>, LineError> {
        let pending = &self.buf[self.start..self.end];
        match memchr_newline(&pending[self.scanned..]) {
            Some(i) => {
                let end = self.scanned + i;
                if end > self.max {
                    return Err(LineError::TooLong { max: self.max });
                }
                let line_start = self.start;
                self.start += end + 1;
                self.last_span = (
                    self.base + line_start as u64,
                    self.base + (line_start + end) as u64,
                );
                self.scanned = 0;
                let mut line = &self.buf[line_start..line_start + end];
                if let Some(stripped) = line.strip_suffix(b"\r") {
                    line = stripped;
                }
                Ok(Some(line))
            }
            None => {
                self.scanned = pending.len();
                if pending.len() > self.max {
                    Err(LineError::TooLong { max: self.max })
                } else {
                    Ok(None)
                }
            }
        }
    }

    /// Whether a complete line is already buffered (used to decide when to flush replies).
    pub fn has_line(&self) -> bool {
        memchr_newline(&self.buf[self.start + self.scanned..self.end]).is_some()
    }
}

/// An empty [`LineBuffer`] larger than this gives its memory back.
const SHRINK_ABOVE: usize = 1 << 20;

fn memchr_newline(hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn owner_qualified_references() {
        assert_eq!(split_owner("resize"), None);
        assert_eq!(
            split_owner("alice/resize"),
            Some(Ok((Owner::User("alice"), "resize")))
        );
        assert_eq!(
            split_owner("984/resize"),
            Some(Ok((Owner::Uid(984), "resize")))
        );
        assert_eq!(split_owner("+984/r"), Some(Ok((Owner::User("+984"), "r"))));
        for bad in ["/resize", "alice/", "a/b/c"] {
            let err = split_owner(bad).unwrap().unwrap_err();
            assert!(err.contains("OWNER/NAME"), "{err}");
        }
        assert_eq!(
            split_stage("alice/greet:hello"),
            ("alice/greet", Some("hello"))
        );
        assert_eq!(split_stage("greet"), ("greet", None));
        let chain = decode_request(br#"{"op":"chain","binaries":["a","b:f"]}"#).unwrap();
        assert_eq!(chain.references(), ["a", "b:f"]);
        let list = decode_request(br#"{"op":"list"}"#).unwrap();
        assert!(list.references().is_empty());
    }

    #[test]
    fn decodes_every_op() {
        let cases = [
            (
                r#"{"op":"load","wasm_base64":"AGFzbQ==","name":"x"}"#,
                "load",
            ),
            (
                r#"{"op":"execute","binary":"b","input":"hi","timeout_ms":5}"#,
                "execute",
            ),
            (
                r#"{"op":"chain","binaries":["a","b"],"input_base64":"AA=="}"#,
                "chain",
            ),
            (r#"{"op":"list","all":true}"#, "list"),
            (r#"{"op":"unload","binary":"b"}"#, "unload"),
            (r#"{"op":"info","binary":"b"}"#, "info"),
            (r#"{"op":"rollback","binary":"b"}"#, "rollback"),
            (r#"{"op":"versions","binary":"b"}"#, "versions"),
            (
                r#"{"op":"load","fd":true,"name":"b","replace":true}"#,
                "load",
            ),
            (r#"{"op":"status"}"#, "status"),
            (
                r#"{"op":"configure","binary":"b","config":{"k":"v"}}"#,
                "configure",
            ),
        ];
        for (line, op) in cases {
            let r = decode_request(line.as_bytes()).unwrap();
            assert_eq!(r.op(), op);
        }
        let r = decode_request(br#"{"op":"execute","binary":"b","fuel":7}"#).unwrap();
        match r {
            Request::Execute(e) => assert_eq!(e.limits.fuel, Some(7)),
            _ => panic!("wrong op"),
        }
        let r = decode_request(br#"{"op":"execute","binary":"b","function":"f"}"#).unwrap();
        match r {
            Request::Execute(e) => assert_eq!(e.function.as_deref(), Some("f")),
            _ => panic!("wrong op"),
        }
        let r = decode_request(br#"{"op":"load","fd":true,"config":{"a":"1"}}"#).unwrap();
        match r {
            Request::Load(l) => assert_eq!(l.config.unwrap()["a"], "1"),
            _ => panic!("wrong op"),
        }
        let e = decode_request(br#"{"op":"load","fd":true,"config":{"a":1}}"#).unwrap_err();
        assert!(e.message.contains("invalid type"), "{}", e.message);
    }

    /// The one-pass decoding of executions accepts only what the general decoding accepts,
    /// and decodes it to the same request.
    #[test]
    fn executions_decode_as_the_general_way_does() {
        let lines = [
            r#"{"op":"execute","binary":"b"}"#,
            r#"{"binary":"b","input":"h\u00e9\n","op":"execute","tag":[1,{"x":null}]}"#,
            r#"{"op":"execute","binary":"b","input_base64":"AA==","input":"x","fuel":1}"#,
            r#"{"op":"execute","binary":"b","timeout_ms":5,"memory_limit_mb":2,"fuel":null}"#,
            r#"{"op":"execute","binary":"b","function":"f","tag":null}"#,
            r#"{"op":"chain","binaries":["a","b:f"],"input":"x","timeout_ms":1}"#,
            r#"{"op":"chain","binaries":[]}"#,
            // Refused both ways.
            r#"{"op":"execute","binaries":["a"]}"#,
            r#"{"op":"execute","binary":"b","binaries":["a"]}"#,
            r#"{"op":"chain","binaries":["a"],"function":"f"}"#,
            r#"{"op":"chain","binary":"a"}"#,
            r#"{"op":"execute","binary":"b","fuel":-1}"#,
            r#"{"op":"execute","binary":"b","fuel":1.5}"#,
            r#"{"op":"execute","binary":"b","bogus":1}"#,
            r#"{"op":"execute","binary":"b","binary":"c"}"#,
            r#"{"op":"execute","op":"execute","binary":"b"}"#,
            r#"{"op":"execute","binary":null}"#,
            r#"{"op":"execute","binary":"b"} x"#,
            r#"{"op":"list","binary":"b"}"#,
        ];
        for line in lines {
            let general = serde_json::from_str::<Request>(line).ok();
            let fast = decode_execution(line);
            if fast.is_some() {
                assert_eq!(fast, general, "{line}");
            }
            assert_eq!(
                decode_request(line.as_bytes()).ok(),
                general,
                "{line}: decode_request differs from the general decoding"
            );
        }
        assert!(decode_execution(r#"{"op":"execute","binary":"b","input":"x"}"#).is_some());
        assert!(decode_execution(r#"{"op":"chain","binaries":["a"]}"#).is_some());
    }

    #[test]
    fn tag_is_kept_and_recovered_on_error() {
        let mut r = decode_request(br#"{"op":"status","tag":{"n":1}}"#).unwrap();
        assert_eq!(r.take_tag(), Some(json!({"n":1})));
        let e = decode_request(br#"{"op":"nope","tag":7}"#).unwrap_err();
        assert_eq!(e.tag, Some(json!(7)));
        assert!(e.message.contains("unknown op"), "{}", e.message);
    }

    #[test]
    fn clear_errors_for_bad_lines() {
        let e = decode_request(b"\xff\xfe").unwrap_err();
        assert!(e.message.contains("UTF-8"));
        let e = decode_request(b"hello").unwrap_err();
        assert!(e.message.contains("not a JSON object"), "{}", e.message);
        // Valid JSON, not an object: said so, not serde's "expected variant identifier".
        for (line, what) in [
            (&b"[1,2]"[..], "an array"),
            (b"42", "a number"),
            (b"\"op\"", "a string"),
            (b"null", "null"),
            (b"true", "a boolean"),
        ] {
            let e = decode_request(line).unwrap_err();
            assert!(
                e.message.starts_with("request is not a JSON object but")
                    && e.message.contains(what),
                "{}",
                e.message
            );
        }
        let e = decode_request(br#"{"binary":"x"}"#).unwrap_err();
        assert!(e.message.contains("missing field `op`"), "{}", e.message);
        let e = decode_request(br#"{"op":"execute"}"#).unwrap_err();
        assert!(e.message.contains("binary"), "{}", e.message);
        let e = decode_request(br#"{"op":"status","bogus":1}"#).unwrap_err();
        assert!(e.message.contains("bogus"), "{}", e.message);
        let e = decode_request(b"").unwrap_err();
        assert!(e.message.contains("empty"), "{}", e.message);
    }

    #[test]
    fn deeply_nested_json_is_an_error_not_a_crash() {
        let line = format!(
            "{{\"op\":\"status\",\"tag\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let e = decode_request(line.as_bytes()).unwrap_err();
        assert!(e.message.contains("recursion"), "{}", e.message);
    }

    #[test]
    fn responses_have_the_documented_shape() {
        let mut body = ExecuteResponse::default();
        body.set_output(b"HELLO".to_vec());
        body.stats.wall_us = 12;
        let line = encode_line(&Response::success(Some(json!("t")), body));
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            json!({"ok":true,"tag":"t","output":"HELLO","stats":{"wall_us":12}})
        );

        let line = encode_line(&Response::<Empty>::failure(
            None,
            ErrorBody::new(ErrorCode::NotFound, "no such binary"),
        ));
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            json!({"ok":false,"error":{"code":"not_found","message":"no such binary"}})
        );

        let line = encode_line(&Response::success(None, Empty {}));
        assert_eq!(line, b"{\"ok\":true}\n");
    }

    #[test]
    fn non_utf8_output_goes_to_base64_and_back() {
        let mut body = ExecuteResponse::default();
        let bytes: Vec<u8> = (0..=255).collect();
        body.set_output(bytes.clone());
        assert!(body.output.is_none());
        assert_eq!(body.output_bytes().unwrap(), bytes);
    }

    #[test]
    fn line_buffer_splits_and_caps() {
        let mut lb = LineBuffer::new(8);
        lb.extend(b"abc\r\nde");
        assert_eq!(lb.next_line().unwrap(), Some(&b"abc"[..]));
        assert_eq!(lb.next_line().unwrap(), None);
        assert!(!lb.has_line());
        lb.extend(b"f\n12345678\n");
        assert!(lb.has_line());
        assert_eq!(lb.next_line().unwrap(), Some(&b"def"[..]));
        assert_eq!(lb.next_line().unwrap(), Some(&b"12345678"[..]));
        lb.extend(b"123456789");
        assert_eq!(lb.next_line(), Err(LineError::TooLong { max: 8 }));
        let mut lb = LineBuffer::new(8);
        lb.extend(b"123456789\n");
        assert_eq!(lb.next_line(), Err(LineError::TooLong { max: 8 }));
    }

    #[test]
    fn line_buffer_spare_and_commit() {
        let mut lb = LineBuffer::new(100);
        let spare = lb.spare(16);
        assert!(spare.len() >= 16);
        spare[..3].copy_from_slice(b"x\ny");
        lb.commit(3);
        assert_eq!(lb.next_line().unwrap(), Some(&b"x"[..]));
        assert_eq!(lb.pending(), b"y");
        assert_eq!(lb.received_total(), 3);
        lb.extend(b"z\n");
        assert_eq!(lb.next_line().unwrap(), Some(&b"yz"[..]));
        assert_eq!(lb.last_line_span(), (2, 4));
        // Consumed bytes are reclaimed; offsets keep counting.
        lb.extend(b"w\n");
        assert_eq!(lb.next_line().unwrap(), Some(&b"w"[..]));
        assert_eq!(lb.last_line_span(), (5, 6));
    }
}
