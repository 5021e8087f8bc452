//! wasmcorectl: the admin and tenant tool for wasm-core.
//!
//! [`Cli`] is the one flag definition (help, the man page and completions come from it);
//! [`ctl_main`] runs a command and returns the documented exit code. The protocol client is
//! in [`client`]; `bench` measures the daemon against a raw socket echo.

#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde_json::{Map, Value, json};

pub mod bench;
pub mod exporter;
pub mod oci;
pub mod openmetrics;
pub mod progress;
pub mod top;

use wasmcore_client::Client;

const AFTER_HELP: &str = "\
Naming a binary:
  UUID        that binary
  NAME        yours of that name, else the public one
  OWNER/NAME  user OWNER's (a user name or uid): its public
              binaries for everyone, any binary for admins

Exit status:
  0  success
  1  the execution failed: timeout, out_of_fuel,
     memory_limit, trap, plugin_error
  2  bad command line
  3  the daemon is unreachable, or its socket is not
     served by root, the wasm-core user or you
  4  forbidden
  5  not found (no such binary visible to you)
  6  refused: bad_request, invalid_module, too_large,
     already_exists; apply or reload with a refused
     file
  7  busy or quota_exceeded: retry later, free something
  8  the daemon failed (internal) or broke the protocol
  9  a local file could not be read or written

Environment:
  WASM_CORE_SOCKET  the daemon's socket (as --socket)

Files:
  /run/wasm-core/wasm-core.sock, /tmp/wasm-core.sock
      the daemon's sockets, tried in this order

See also: wasmcored(8), wasm-core.toml(5)";

/// Exit codes (documented in wasmcorectl(1) and docs/PROTOCOL.md).
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// The execution failed: timeout, out_of_fuel, memory_limit, trap, plugin_error.
    pub const EXECUTION_FAILED: u8 = 1;
    /// Bad command line.
    pub const USAGE: u8 = 2;
    /// The daemon is not reachable, or its socket is not trusted; or a registry is not
    /// reachable.
    pub const UNAVAILABLE: u8 = 3;
    /// The daemon refused: forbidden.
    pub const FORBIDDEN: u8 = 4;
    /// No such binary (or not visible to you).
    pub const NOT_FOUND: u8 = 5;
    /// The request was refused: bad_request, invalid_module, too_large, already_exists.
    pub const REFUSED: u8 = 6;
    /// Try again later or free something: busy, quota_exceeded.
    pub const BUSY: u8 = 7;
    /// The daemon failed (internal) or broke the protocol.
    pub const INTERNAL: u8 = 8;
    /// A local file could not be read or written.
    pub const IO: u8 = 9;
}

/// Manage and run WebAssembly binaries on a wasm-core daemon.
///
/// Tenants load modules, run them and chain them; admins (root and members of the
/// wasm-core-admin group) also see, inspect and unload every tenant's binaries. Who you
/// are is what the kernel says about your process: run wasmcorectl as the user whose
/// binaries you manage.
#[derive(Debug, Parser)]
#[command(name = "wasmcorectl", version, about, long_about, after_long_help = AFTER_HELP)]
pub struct Cli {
    /// Daemon socket [default: /run/wasm-core/wasm-core.sock if present, else /tmp/wasm-core.sock]
    #[arg(long, global = true, env = "WASM_CORE_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print the daemon's full JSON response instead of human output.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load a module (.wasm, or .wat text) and print its UUID.
    Load(LoadArgs),
    /// Run a binary; its output goes to stdout as raw bytes.
    ///
    /// On a terminal, an output that does not end in a newline gets one, so that the prompt
    /// starts on a line of its own; into a pipe or a file the bytes are exactly the output.
    Execute {
        /// UUID, NAME, or OWNER/NAME (OWNER a user name or uid).
        binary: String,
        /// The function to call, for an Extism plugin that exports several.
        #[arg(long, value_name = "NAME")]
        function: Option<String>,
        #[command(flatten)]
        input: InputArgs,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Run binaries in order, each one's output the next one's input.
    ///
    /// The last output goes to stdout as `execute` writes it (a final newline added on a
    /// terminal only).
    Chain {
        /// UUIDs, names or OWNER/NAMEs, in order; BINARY:FUNCTION calls one function of an
        /// Extism plugin.
        #[arg(required = true, num_args = 1..)]
        binaries: Vec<String>,
        #[command(flatten)]
        input: InputArgs,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// List your binaries and public ones.
    List {
        /// Every tenant's binaries (admins only).
        #[arg(long)]
        all: bool,
    },
    /// Move a name back to the version that was current before its current one (a second
    /// rollback undoes the first).
    Rollback {
        /// NAME or OWNER/NAME (OWNER a user name or uid), or the UUID of one of its versions.
        binary: String,
    },
    /// List the versions a name keeps, in the order they became current (the current one
    /// last).
    Versions {
        /// NAME or OWNER/NAME (OWNER a user name or uid), or the UUID of one of its versions.
        binary: String,
    },
    /// Remove a binary and its plugin state; by name, every version of the name.
    Unload {
        /// UUID, NAME, or OWNER/NAME (OWNER a user name or uid).
        binary: String,
    },
    /// Show a binary's metadata, imports, exports and limits.
    Info {
        /// UUID, NAME, or OWNER/NAME (OWNER a user name or uid).
        binary: String,
    },
    /// Replace an Extism plugin's configuration without reloading it.
    Configure {
        /// UUID, NAME, or OWNER/NAME (OWNER a user name or uid).
        binary: String,
        /// The new configuration, whole (repeatable; none clears it).
        #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_config_entry)]
        config: Vec<(String, String)>,
    },
    /// Publish a module or component to an OCI registry as a Wasm artifact (the CNCF
    /// layout), with your registry credentials; print its reference pinned by digest.
    Push {
        /// The .wasm file (or .wat text).
        file: PathBuf,
        /// oci://REGISTRY/REPOSITORY:TAG
        reference: String,
        /// Allow plain HTTP to the registry (always allowed for localhost, 127.0.0.1 and
        /// [::1]).
        #[arg(long)]
        insecure: bool,
    },
    /// Bring the binaries to what the provisioning files declare (admins): load, replace,
    /// reconfigure and unload as the files in provisioning.dir say, as the daemon does at
    /// start and on reload; print what changed.
    ///
    /// A file that cannot be used is reported with its path and line and changes nothing
    /// (what it declared before stays); the other files still apply, and the exit status
    /// is then 6.
    ///
    /// An oci://…@sha256:… source the daemon does not have yet is pulled first, as you
    /// (with your registry credentials), into the daemon's cache (provisioning.oci_cache),
    /// also with --dry-run: the daemon itself never reaches a registry.
    Apply {
        /// Only print what would change.
        #[arg(long)]
        dry_run: bool,
        /// Allow plain HTTP to the registries of oci:// sources (always allowed for
        /// localhost, 127.0.0.1 and [::1]).
        #[arg(long)]
        insecure: bool,
    },
    /// Read the config file again and apply the provisioning files (admins), as SIGHUP
    /// does, and say what changed once both are done: what `systemctl reload wasm-core`
    /// runs. The exit status is 6 if the config file or a provisioning file was refused.
    Reload,
    /// Show the daemon's version, counts and limits, and who it thinks you are.
    Status,
    /// Print the daemon's counters as OpenMetrics text (--json: the snapshot as the daemon
    /// sends it). A tenant sees its own figures; an admin sees every tenant's.
    Metrics {
        /// Prometheus' text format 0.0.4 instead of OpenMetrics.
        #[arg(long)]
        prometheus: bool,
    },
    /// A live view of the binaries (rates, latency, fuel, memory) or, with --tenants, of the tenants and their workers, like systemd-cgtop.
    Top(top::TopArgs),
    /// Measure every performance target against echo baselines in the same run.
    Bench(bench::BenchArgs),
}

/// What `load` loads, and how.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The module file, opened by you and passed to the daemon as an open file; or
    /// oci://REGISTRY/REPOSITORY:TAG (or @sha256:DIGEST), a Wasm artifact pulled by you, with
    /// your registry credentials, and kept with its reference and digest.
    file: PathBuf,
    /// A name to refer to the binary by (unique among your binaries).
    #[arg(long)]
    name: Option<String>,
    /// When you already have a binary of that name: make this module its current version
    /// in one step, keeping the old one for `rollback` (registry.keep_versions). A module
    /// with the current version's bytes changes nothing.
    #[arg(long, requires = "name")]
    replace: bool,
    /// Let every tenant run it (admins only).
    #[arg(long)]
    public: bool,
    /// Send the bytes inline (base64) instead of passing the open file.
    #[arg(long)]
    inline: bool,
    /// Allow plain HTTP to the registry of an oci:// reference (always allowed for
    /// localhost, 127.0.0.1 and [::1]).
    #[arg(long)]
    insecure: bool,
    /// A configuration entry an Extism plugin reads with `config_get` (repeatable). A
    /// replace without any keeps the current version's configuration.
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_config_entry)]
    config: Vec<(String, String)>,
}

/// Where the input comes from (default: stdin when it is not a terminal, else empty).
#[derive(Debug, Args)]
pub struct InputArgs {
    /// The input as a string.
    #[arg(long, conflicts_with = "input_file")]
    pub input: Option<String>,
    /// Read the input from a file.
    #[arg(long, value_name = "FILE")]
    pub input_file: Option<PathBuf>,
}

/// Limits for one execution; each may only lower the daemon's maximum.
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Wall-time limit of the execution (a chain: of all its stages), in milliseconds
    /// [default: the daemon's limits.default_timeout_ms, 5000; at most max_timeout_ms].
    #[arg(long, value_name = "MS")]
    pub timeout_ms: Option<u64>,
    /// Linear-memory limit of the execution, in MiB [default: the daemon's
    /// limits.default_memory_mb, 64; at most max_memory_mb].
    #[arg(long, value_name = "MIB")]
    pub memory_limit_mb: Option<u64>,
    /// Fuel budget (deterministic CPU limit).
    #[arg(long, value_name = "N")]
    pub fuel: Option<u64>,
}

/// A failure with its exit code and message.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl From<wasmcore_client::Error> for Failure {
    fn from(e: wasmcore_client::Error) -> Self {
        let code = match &e {
            e if e.is_unavailable() => exit::UNAVAILABLE,
            wasmcore_client::Error::File { .. } => exit::IO,
            _ => exit::INTERNAL,
        };
        Failure::new(code, e.to_string())
    }
}

/// Parse the command line, run it, and return the exit code.
pub fn ctl_main() -> ExitCode {
    // `bench` runs its echo baselines as child processes of this same program.
    if let Some(kind) = std::env::var_os(bench::ECHO_ENV) {
        let code = match bench::serve_echo(&kind.to_string_lossy()) {
            Ok(()) => exit::OK,
            Err(f) => {
                eprintln!("wasmcorectl: {}", f.message);
                f.code
            }
        };
        return ExitCode::from(code);
    }
    // … and the clients of its multi-tenant scenario, under other UIDs.
    if let Some(socket) = std::env::var_os(bench::TENANT_ENV) {
        return match bench::serve_tenant_client(Path::new(&socket)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(f) => {
                eprintln!("wasmcorectl: {}", f.message);
                ExitCode::from(f.code)
            }
        };
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if !f.message.is_empty() {
                eprintln!("wasmcorectl: {}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}

/// Run a parsed command.
pub fn run(cli: Cli) -> Result<(), Failure> {
    let socket = wasmcore_client::resolve_socket(cli.socket.as_deref());
    if let Command::Bench(args) = &cli.command {
        return bench::run(&socket, args);
    }
    // Talks to a registry only, never to the daemon.
    if let Command::Push {
        file,
        reference,
        insecure,
    } = &cli.command
    {
        return push(cli.json, file, reference, *insecure);
    }
    let mut c = Client::connect_to(&socket)?;
    let json = cli.json;
    match cli.command {
        Command::Load(args) => load(&mut c, json, args),
        Command::Execute {
            binary,
            function,
            input,
            limits,
        } => {
            let mut req = json!({"op": "execute", "binary": binary});
            if let Some(f) = function {
                req["function"] = json!(f);
            }
            add_input_and_limits(&mut req, &input, &limits)?;
            execution(&mut c, json, &req)
        }
        Command::Chain {
            binaries,
            input,
            limits,
        } => {
            let mut req = json!({"op": "chain", "binaries": binaries});
            add_input_and_limits(&mut req, &input, &limits)?;
            execution(&mut c, json, &req)
        }
        Command::List { all } => {
            let mut req = json!({"op": "list"});
            if all {
                req["all"] = json!(true);
            }
            let resp = call(&mut c, &req)?;
            if json {
                return print_json(&resp);
            }
            print_list(&resp);
            Ok(())
        }
        Command::Rollback { binary } => {
            let resp = call(&mut c, &json!({"op": "rollback", "binary": binary}))?;
            if json {
                return print_json(&resp);
            }
            println!(
                "{} is now {} (was {})",
                text(&resp["name"]),
                text(&resp["binary"]),
                text(&resp["previous"])
            );
            Ok(())
        }
        Command::Versions { binary } => {
            let resp = call(&mut c, &json!({"op": "versions", "binary": binary}))?;
            if json {
                return print_json(&resp);
            }
            print_versions(&resp);
            Ok(())
        }
        Command::Reload => {
            let resp = call(&mut c, &json!({"op": "reload"}))?;
            let report: wasmcore_proto::ReloadResponse = serde_json::from_value(resp.clone())
                .map_err(|e| Failure::new(exit::INTERNAL, format!("the reload report: {e}")))?;
            if json {
                print_json(&resp)?;
            } else {
                match (&report.config_error, report.config_applied) {
                    (Some(e), _) => eprintln!("configuration refused, the running one stays: {e}"),
                    (None, true) if report.restart_needed.is_empty() => {
                        println!("configuration applied")
                    }
                    (None, true) => println!(
                        "configuration applied; these keys need a restart: {}",
                        report.restart_needed.join(", ")
                    ),
                    (None, false) => println!("no config file in use"),
                }
                if let Some(e) = &report.provisioning_error {
                    eprintln!("provisioning: {e}");
                }
                if report.provisioning.is_some() {
                    print_apply(&resp["provisioning"]);
                }
            }
            if report.failed() {
                return Err(Failure::new(
                    exit::REFUSED,
                    "the reload refused the config file or a provisioning file (see above)",
                ));
            }
            Ok(())
        }
        Command::Apply { dry_run, insecure } => apply(&mut c, json, dry_run, insecure),
        Command::Unload { binary } => {
            let resp = call(&mut c, &json!({"op": "unload", "binary": binary}))?;
            if json {
                return print_json(&resp);
            }
            Ok(())
        }
        Command::Info { binary } => {
            let resp = call(&mut c, &json!({"op": "info", "binary": binary}))?;
            if json {
                return print_json(&resp);
            }
            print_fields(&resp, &["ok"]);
            Ok(())
        }
        Command::Configure { binary, config } => {
            let req = json!({"op": "configure", "binary": binary, "config": config_object(config)});
            let resp = call(&mut c, &req)?;
            if json {
                return print_json(&resp);
            }
            Ok(())
        }
        Command::Metrics { prometheus } => {
            let resp = call(&mut c, &json!({"op": "metrics"}))?;
            if json {
                return print_json(&resp);
            }
            let m: wasmcore_proto::MetricsResponse = serde_json::from_value(resp)
                .map_err(|e| Failure::new(exit::INTERNAL, format!("unexpected metrics: {e}")))?;
            let format = if prometheus {
                openmetrics::Format::Prometheus
            } else {
                openmetrics::Format::OpenMetrics
            };
            write_stdout(openmetrics::render(&m, format).as_bytes())
        }
        Command::Status => {
            let resp = call(&mut c, &json!({"op": "status"}))?;
            if json {
                return print_json(&resp);
            }
            print_fields(&resp, &["ok", "workers"]);
            if let Some(workers) = resp["workers"].as_array() {
                let _ = write_stdout(workers_table(workers, now_secs()).as_bytes());
            }
            Ok(())
        }
        Command::Top(args) => top::run(&mut c, &args, json),
        Command::Bench(_) | Command::Push { .. } => unreachable!("handled above"),
    }
}

/// `--config` entries as the wire's string map.
fn config_object(entries: Vec<(String, String)>) -> Value {
    Value::Object(
        entries
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect(),
    )
}

/// `KEY=VALUE` of `--config`; the value may be empty and may contain `=`.
fn parse_config_entry(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Send, receive, and turn an error response into a [`Failure`].
fn call(c: &mut Client, req: &Value) -> Result<Value, Failure> {
    let resp = c.call_json(req, None)?;
    check(resp)
}

pub(crate) fn check(resp: Value) -> Result<Value, Failure> {
    if resp["ok"] == json!(true) {
        return Ok(resp);
    }
    Err(failure_from(&resp))
}

/// The exit code and message for an error response.
pub fn failure_from(resp: &Value) -> Failure {
    let code = resp["error"]["code"].as_str().unwrap_or("internal");
    let msg = resp["error"]["message"]
        .as_str()
        .unwrap_or("the daemon reported an error without a message");
    let exit_code = match code {
        "timeout" | "out_of_fuel" | "memory_limit" | "trap" | "plugin_error" => {
            exit::EXECUTION_FAILED
        }
        "forbidden" => exit::FORBIDDEN,
        "not_found" => exit::NOT_FOUND,
        "bad_request" | "invalid_module" | "too_large" | "already_exists" => exit::REFUSED,
        "busy" | "quota_exceeded" => exit::BUSY,
        _ => exit::INTERNAL,
    };
    let mut message = format!("{code}: {msg}");
    // The plugin's own error code (the message names the chain stage, counted from 0).
    if let Some(pc) = resp["error"]["plugin_code"].as_i64()
        && !msg.ends_with(&format!(" {pc}"))
    {
        message.push_str(&format!(" (plugin code {pc})"));
    }
    if let Some(bt) = resp["error"]["backtrace"].as_array() {
        for f in bt {
            message.push_str(&format!("\n    at {}", f.as_str().unwrap_or("?")));
        }
    }
    Failure::new(exit_code, message)
}

fn load(c: &mut Client, json: bool, args: LoadArgs) -> Result<(), Failure> {
    let LoadArgs {
        file,
        name,
        replace,
        public,
        inline,
        insecure,
        config,
    } = args;
    let io_err =
        |e: std::io::Error| Failure::new(exit::IO, format!("cannot read {}: {e}", file.display()));
    let mut req = json!({"op": "load"});
    if !config.is_empty() {
        req["config"] = config_object(config);
    }
    if let Some(n) = name {
        req["name"] = json!(n);
    }
    if public {
        req["public"] = json!(true);
    }
    if replace {
        req["replace"] = json!(true);
    }
    if let Some(text) = file.to_str().filter(|f| f.starts_with(oci::SCHEME)) {
        let reference = oci::OciRef::parse(text)?;
        let pulled = oci::pull(&reference, insecure)?;
        req["source"] = json!({"reference": reference.text, "digest": pulled.manifest_digest});
        let progress = progress::Progress::start(format!("compiling {text}…"));
        let resp = if inline {
            req["wasm_base64"] = json!(wasmcore_proto::encode_base64(&pulled.bytes));
            c.call_json(&req, None)?
        } else {
            let f = in_memory_file(&pulled.bytes)?;
            req["fd"] = json!(true);
            c.call_json(&req, Some(f.as_fd()))?
        };
        drop(progress);
        let resp = check(resp).map_err(|mut f| {
            f.message = format!("{text}: {}", f.message);
            f
        })?;
        return loaded(json, &resp);
    }
    // What the daemon would refuse, said here with the path the user gave.
    let meta = std::fs::metadata(&file).map_err(io_err)?;
    if meta.is_dir() {
        return Err(Failure::new(
            exit::USAGE,
            format!(
                "cannot load {}: it is a directory, not a module file",
                file.display()
            ),
        ));
    }
    if !meta.is_file() {
        return Err(Failure::new(
            exit::USAGE,
            format!("cannot load {}: not a regular file", file.display()),
        ));
    }
    let is_text = file.extension().is_some_and(|e| e == "wat");
    // On a terminal: the daemon answers once the module is compiled and stored.
    let progress = progress::Progress::start(format!("compiling {}…", file.display()));
    let resp = if is_text || inline {
        let bytes = std::fs::read(&file).map_err(io_err)?;
        let bytes = if is_text {
            wat::parse_bytes(&bytes)
                .map_err(|e| Failure::new(exit::REFUSED, format!("{}: {e}", file.display())))?
                .into_owned()
        } else {
            bytes
        };
        req["wasm_base64"] = json!(wasmcore_proto::encode_base64(&bytes));
        c.call_json(&req, None)?
    } else {
        // Opened as the caller: the daemon never opens tenants' paths itself.
        let f = File::open(&file).map_err(io_err)?;
        req["fd"] = json!(true);
        c.call_json(&req, Some(f.as_fd()))?
    };
    drop(progress);
    // What the daemon says of the module, said of the file the user named.
    let of_file = matches!(
        resp["error"]["code"].as_str(),
        Some("invalid_module" | "too_large")
    );
    let resp = check(resp).map_err(|mut f| {
        if of_file {
            f.message = f
                .message
                .replacen(": ", &format!(": {}: ", file.display()), 1);
        }
        f
    })?;
    loaded(json, &resp)
}

/// A pulled module as a file to pass to the daemon: an anonymous in-memory file, read from
/// its start.
fn in_memory_file(bytes: &[u8]) -> Result<File, Failure> {
    use std::io::{Seek, SeekFrom};
    let io = |e: std::io::Error| Failure::new(exit::IO, format!("an in-memory file: {e}"));
    let fd =
        nix::sys::memfd::memfd_create(c"wasmcore-pulled", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(|e| io(e.into()))?;
    let mut f = File::from(fd);
    f.write_all(bytes).map_err(io)?;
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    Ok(f)
}

/// `push`: publish a file to a registry.
fn push(json: bool, file: &Path, reference: &str, insecure: bool) -> Result<(), Failure> {
    let r = oci::OciRef::parse(reference)?;
    let bytes = std::fs::read(file)
        .map_err(|e| Failure::new(exit::IO, format!("cannot read {}: {e}", file.display())))?;
    let bytes = if file.extension().is_some_and(|e| e == "wat") {
        wat::parse_bytes(&bytes)
            .map_err(|e| Failure::new(exit::REFUSED, format!("{}: {e}", file.display())))?
            .into_owned()
    } else {
        bytes
    };
    if bytes.len() < 8 || bytes[..4] != *b"\0asm" {
        return Err(Failure::new(
            exit::REFUSED,
            format!(
                "{}: not a WebAssembly binary (missing the \\0asm header)",
                file.display()
            ),
        ));
    }
    let pushed = oci::push(bytes, &r, insecure)?;
    let pinned = pinned(reference, &pushed.manifest_digest);
    if json {
        return print_json(&json!({
            "reference": reference,
            "pinned": pinned,
            "digest": pushed.manifest_digest,
            "layer_digest": pushed.layer_digest,
            "os": pushed.os,
        }));
    }
    println!("{pinned}");
    Ok(())
}

/// `oci://REGISTRY/REPOSITORY@DIGEST` for a reference with a tag or a digest.
fn pinned(reference: &str, digest: &str) -> String {
    let base = reference.split_once('@').map_or(reference, |(b, _)| b);
    let slash = base.rfind('/').unwrap_or(0);
    let base = match base[slash..].rfind(':') {
        Some(colon) => &base[..slash + colon],
        None => base,
    };
    format!("{base}@{digest}")
}

/// What `load` prints once the daemon answered.
fn loaded(json: bool, resp: &Value) -> Result<(), Failure> {
    if json {
        return print_json(resp);
    }
    println!("{}", resp["binary"].as_str().unwrap_or_default());
    if resp["unchanged"] == json!(true) {
        eprintln!(
            "{} already has these bytes (sha256 {}) as its current version: nothing changed",
            text(&resp["name"]),
            text(&resp["sha256"])
        );
    } else if let Some(previous) = resp["replaced"].as_str() {
        eprintln!(
            "{} is now this version; {previous} is kept as its previous version (wasmcorectl rollback {})",
            text(&resp["name"]),
            text(&resp["name"])
        );
    }
    Ok(())
}

fn add_input_and_limits(
    req: &mut Value,
    input: &InputArgs,
    limits: &LimitArgs,
) -> Result<(), Failure> {
    let bytes = if let Some(s) = &input.input {
        s.clone().into_bytes()
    } else if let Some(path) = &input.input_file {
        std::fs::read(path)
            .map_err(|e| Failure::new(exit::IO, format!("cannot read {}: {e}", path.display())))?
    } else if !std::io::stdin().is_terminal() {
        let mut v = Vec::new();
        std::io::stdin()
            .read_to_end(&mut v)
            .map_err(|e| Failure::new(exit::IO, format!("reading stdin: {e}")))?;
        v
    } else {
        Vec::new()
    };
    match String::from_utf8(bytes) {
        Ok(s) => req["input"] = json!(s),
        Err(e) => req["input_base64"] = json!(wasmcore_proto::encode_base64(e.as_bytes())),
    }
    if let Some(v) = limits.timeout_ms {
        req["timeout_ms"] = json!(v);
    }
    if let Some(v) = limits.memory_limit_mb {
        req["memory_limit_mb"] = json!(v);
    }
    if let Some(v) = limits.fuel {
        req["fuel"] = json!(v);
    }
    Ok(())
}

fn execution(c: &mut Client, json: bool, req: &Value) -> Result<(), Failure> {
    let resp = c.call_json(req, None)?;
    if json {
        print_json(&resp)?;
        return if resp["ok"] == json!(true) {
            Ok(())
        } else {
            Err(Failure {
                message: String::new(),
                ..failure_from(&resp)
            })
        };
    }
    let logs = if resp["ok"] == json!(true) {
        &resp["logs"]
    } else {
        &resp["error"]["logs"]
    };
    if let Some(logs) = logs.as_array() {
        for l in logs {
            eprintln!("log: {}", l.as_str().unwrap_or_default());
        }
    }
    let resp = check(resp)?;
    let out: wasmcore_proto::ExecuteResponse = serde_json::from_value(resp)
        .map_err(|e| Failure::new(exit::INTERNAL, format!("unexpected response: {e}")))?;
    let mut bytes = out
        .output_bytes()
        .map_err(|e| Failure::new(exit::INTERNAL, e))?;
    // On a terminal, an output without a final newline would run into the prompt; a pipe
    // or a file gets the bytes exactly.
    if !bytes.is_empty() && !bytes.ends_with(b"\n") && std::io::stdout().is_terminal() {
        bytes.push(b'\n');
    }
    write_stdout(&bytes)
}

fn write_stdout(bytes: &[u8]) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        // A closed pipe (`| head`) is not an error of ours.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure::new(exit::IO, format!("writing stdout: {e}"))),
    }
}

fn print_json(v: &Value) -> Result<(), Failure> {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    write_stdout(s.as_bytes())
}

fn print_list(resp: &Value) {
    let empty = Vec::new();
    let rows = resp["binaries"].as_array().unwrap_or(&empty);
    let mut table = vec![
        [
            "BINARY",
            "NAME",
            "OWNER",
            "KIND",
            "SIZE",
            "PUBLIC",
            "EXECUTIONS",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for b in rows {
        let mut name = text(&b["name"]);
        if b["superseded"] == json!(true) {
            name.push_str(" (superseded)");
        }
        if !b["provisioned"].is_null() {
            name.push_str(" (provisioned)");
        }
        table.push(vec![
            text(&b["binary"]),
            name,
            owner(&b["owner_uid"]),
            text(&b["kind"]),
            text(&b["size"]),
            if b["public"] == json!(true) {
                "yes".into()
            } else {
                "no".into()
            },
            text(&b["executions"]),
        ]);
    }
    let _ = write_stdout(render_table(&table).as_bytes());
}

/// `apply`: pull the `oci://` sources the daemon lacks into its cache, then apply (or, with
/// `dry_run`, say what would change) and print the report.
fn apply(c: &mut Client, json: bool, dry_run: bool, insecure: bool) -> Result<(), Failure> {
    let ask = |c: &mut Client, dry_run: bool| -> Result<Value, Failure> {
        call(c, &json!({"op": "apply", "dry_run": dry_run}))
    };
    let first = ask(c, true)?;
    let mut pulls: Vec<String> = first["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["pull"].as_str().map(str::to_string))
        .collect();
    pulls.sort();
    pulls.dedup();
    let cache = PathBuf::from(text(&first["oci_cache"]));
    let mut pull_failure = None;
    for reference in &pulls {
        match oci::OciRef::parse(reference).and_then(|r| oci::pull_to_cache(&r, insecure, &cache)) {
            Ok(entry) => eprintln!("pulled {reference} into {}", entry.display()),
            Err(f) => {
                eprintln!("wasmcorectl: {}", f.message);
                pull_failure.get_or_insert(f);
            }
        }
    }
    let resp = if dry_run && pulls.is_empty() {
        first
    } else {
        ask(c, dry_run)?
    };
    if json {
        print_json(&resp)?;
    } else {
        print_apply(&resp);
    }
    let report: wasmcore_proto::ApplyResponse = serde_json::from_value(resp)
        .map_err(|e| Failure::new(exit::INTERNAL, format!("the apply report: {e}")))?;
    if let Some(f) = pull_failure {
        return Err(Failure::new(
            f.code,
            "a source could not be pulled (see above); its file is refused, the others applied",
        ));
    }
    match report.failed() {
        0 => Ok(()),
        n => Err(Failure::new(
            exit::REFUSED,
            format!(
                "{n} of {} provisioning entries were refused or failed; the others {}",
                report.entries.len(),
                if dry_run { "would apply" } else { "applied" }
            ),
        )),
    }
}

/// `apply`: one row per entry, then each error with its file and line.
fn print_apply(resp: &Value) {
    let empty = Vec::new();
    let rows = resp["entries"].as_array().unwrap_or(&empty);
    let dry_run = resp["dry_run"] == json!(true);
    let mut table = vec![
        [
            "FILE",
            if dry_run { "WOULD" } else { "ACTION" },
            "NAME",
            "OWNER",
            "BINARY",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let mut errors = String::new();
    for e in rows {
        let file = text(&e["file"]);
        let short = Path::new(&file)
            .file_name()
            .map_or(file.clone(), |f| f.to_string_lossy().into_owned());
        let mut action = text(&e["action"]);
        if let Some(err) = e["error"].as_str() {
            if action != "invalid" {
                action.push_str(" (failed)");
            }
            let line = e["line"]
                .as_u64()
                .map(|l| format!(":{l}"))
                .unwrap_or_default();
            errors.push_str(&format!("{file}{line}: {err}\n"));
        }
        table.push(vec![
            short,
            action,
            text(&e["name"]),
            if e["owner_uid"].is_null() {
                "-".into()
            } else {
                owner(&e["owner_uid"])
            },
            text(&e["binary"]),
        ]);
    }
    if rows.is_empty() {
        println!("{} declares no binary", text(&resp["dir"]));
        return;
    }
    let _ = write_stdout(render_table(&table).as_bytes());
    if !errors.is_empty() {
        eprint!("{errors}");
    }
}

/// `versions`: one row per version, the current one marked.
fn print_versions(resp: &Value) {
    let empty = Vec::new();
    let rows = resp["versions"].as_array().unwrap_or(&empty);
    let mut table = vec![
        ["BINARY", "SHA256", "KIND", "SIZE", "LOADED", "CURRENT"]
            .map(String::from)
            .to_vec(),
    ];
    for v in rows {
        let sha = text(&v["sha256"]);
        table.push(vec![
            text(&v["binary"]),
            sha.get(..16).unwrap_or(&sha).to_string(),
            text(&v["kind"]),
            text(&v["size"]),
            v["loaded_at"].as_u64().map_or_else(|| "-".into(), utc_time),
            if v["current"] == json!(true) {
                "yes".into()
            } else {
                "no".into()
            },
        ]);
    }
    let _ = write_stdout(render_table(&table).as_bytes());
}

/// Seconds since the epoch as an RFC 3339 UTC time.
fn utc_time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

/// Columns padded to their widest cell, two spaces apart.
fn render_table(table: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..table[0].len())
        .map(|i| table.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in table {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A binary's owner as `OWNER/NAME` references take it: the user name where this host has
/// one, else the uid.
fn owner(uid: &Value) -> String {
    uid.as_u64()
        .and_then(|uid| u32::try_from(uid).ok())
        .and_then(|uid| nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok())
        .flatten()
        .map_or_else(|| text(uid), |user| user.name)
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The live tenant workers of `status` (admins), one row each.
fn workers_table(workers: &[Value], now: u64) -> String {
    let mut out = format!(
        "workers:\n  {:<8} {:<8} {:>11} {:>10} {:>10} {:>9}\n",
        "UID", "PID", "CONNECTIONS", "RSS", "CPU", "UP"
    );
    for w in workers {
        let n = |k: &str| w[k].as_u64().unwrap_or(0);
        let up = now.saturating_sub(n("started_at"));
        out.push_str(&format!(
            "  {:<8} {:<8} {:>11} {:>10} {:>10} {:>9}\n",
            n("uid"),
            n("pid"),
            n("connections"),
            format!("{:.1} MiB", n("rss_bytes") as f64 / 1048576.0),
            format!("{:.2} s", n("cpu_us") as f64 / 1e6),
            format!("{}m{:02}s", up / 60, up % 60),
        ));
    }
    out
}

fn print_fields(resp: &Value, skip: &[&str]) {
    let mut out = String::new();
    if let Some(map) = resp.as_object() {
        write_fields(&mut out, map, skip, "");
    }
    let _ = write_stdout(out.as_bytes());
}

fn write_fields(out: &mut String, map: &Map<String, Value>, skip: &[&str], prefix: &str) {
    for (k, v) in map {
        if skip.contains(&k.as_str()) {
            continue;
        }
        match v {
            Value::Object(inner) => write_fields(out, inner, &[], &format!("{prefix}{k}.")),
            Value::Array(items) if items.iter().all(Value::is_object) && !items.is_empty() => {
                out.push_str(&format!("{prefix}{k}:\n"));
                for item in items {
                    let parts: Vec<String> = item
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(ik, iv)| format!("{ik}={}", text(iv)))
                        .collect();
                    out.push_str(&format!("  {}\n", parts.join(" ")));
                }
            }
            _ => out.push_str(&format!("{prefix}{k}: {}\n", text(v))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pushed_reference_is_pinned_by_its_digest() {
        let d = "sha256:ab";
        for (given, pinned_as) in [
            (
                "oci://r.example/team/x:1.2",
                "oci://r.example/team/x@sha256:ab",
            ),
            (
                "oci://127.0.0.1:5000/x:1",
                "oci://127.0.0.1:5000/x@sha256:ab",
            ),
            ("oci://127.0.0.1:5000/x", "oci://127.0.0.1:5000/x@sha256:ab"),
            ("oci://r.example/x@sha256:cd", "oci://r.example/x@sha256:ab"),
        ] {
            assert_eq!(pinned(given, d), pinned_as);
        }
    }

    #[test]
    fn workers_are_a_table() {
        let w = json!([{"uid": 1001, "pid": 42, "connections": 3, "rss_bytes": 3145728,
            "cpu_us": 1_250_000, "started_at": 1000}]);
        let t = workers_table(w.as_array().unwrap(), 1075);
        let row = t.lines().nth(2).unwrap();
        assert_eq!(
            row.split_whitespace().collect::<Vec<_>>(),
            ["1001", "42", "3", "3.0", "MiB", "1.25", "s", "1m15s"],
            "{t}"
        );
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn error_codes_map_to_documented_exit_codes() {
        let f = |code: &str| {
            failure_from(&json!({"ok": false, "error": {"code": code, "message": "m"}})).code
        };
        assert_eq!(f("trap"), exit::EXECUTION_FAILED);
        assert_eq!(f("forbidden"), exit::FORBIDDEN);
        assert_eq!(f("not_found"), exit::NOT_FOUND);
        assert_eq!(f("invalid_module"), exit::REFUSED);
        assert_eq!(f("busy"), exit::BUSY);
        assert_eq!(f("internal"), exit::INTERNAL);
    }
}
