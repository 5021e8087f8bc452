//! The daemon's error type and its one mapping to wire error codes.
//!
//! Commands, the registry and the executor return [`Error`]; the connection layer turns it
//! into an [`ErrorBody`] with [`Error::to_body`] and nothing else decides a wire code.

use wasmcore_proto::{ErrorBody, ErrorCode};

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    InvalidModule(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Internal(String),
    #[error("{}", .0.failure)]
    Execution(Box<ExecError>),
    /// A failure another worker answered (an admin's request about another tenant's
    /// binary), passed on as it was.
    #[error("{}", .0.message)]
    Relayed(Box<ErrorBody>),
    /// A chain stage that could not start (its binary not found, a function it lacks):
    /// the stage's number, from 0, travels with the error.
    #[error("stage {stage} ({reference}): {inner}")]
    Stage {
        stage: usize,
        reference: String,
        inner: Box<Error>,
    },
}

/// A failed execution: what went wrong, which chain stage, and the guest's logs so far.
#[derive(Debug)]
pub struct ExecError {
    pub failure: ExecFailure,
    pub stage: Option<usize>,
    pub logs: Vec<String>,
}

/// How an execution failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecFailure {
    #[error("execution exceeded its timeout of {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    #[error("execution ran out of fuel (budget {fuel})")]
    OutOfFuel { fuel: u64 },
    #[error("execution needed more than its memory limit of {limit_mb} MiB")]
    MemoryLimit { limit_mb: u64 },
    #[error("wasm trap: {message}")]
    Trap {
        message: String,
        backtrace: Vec<String>,
    },
    #[error("plugin returned error code {code}")]
    Plugin { code: i32 },
    #[error("WASI command exited with status {code}")]
    WasiExit { code: i32 },
    /// An Extism call failed: the error the plugin set (or the host call's error), which is
    /// the message itself, or only the non-zero code it returned.
    #[error("{}", match message { Some(m) => m.clone(), None => format!("plugin returned error code {code}") })]
    Extism { code: i32, message: Option<String> },
    #[error("output exceeds the limit of {cap} bytes")]
    OutputTooLarge { cap: usize },
    #[error("plugin state quota exceeded: {0}")]
    StateQuota(String),
    #[error("all execution slots are in use; retry later")]
    PoolExhausted,
}

impl Error {
    /// This error with the binary references the dispatcher rewrote (`(as rewritten, as
    /// the caller wrote it)`: `OWNER/NAME` with a uid for the user name) shown as the caller
    /// wrote them, where the message quotes them or names a chain stage by them.
    pub fn as_written(self, rewritten: &[(String, String)]) -> Error {
        let fix = |mut text: String| {
            for (ours, theirs) in rewritten {
                for (from, to) in [
                    (format!("{ours:?}"), format!("{theirs:?}")),
                    (format!("({ours})"), format!("({theirs})")),
                    (format!("({ours}:"), format!("({theirs}:")),
                ] {
                    text = text.replace(&from, &to);
                }
            }
            text
        };
        match self {
            Error::BadRequest(m) => Error::BadRequest(fix(m)),
            Error::NotFound(m) => Error::NotFound(fix(m)),
            Error::Forbidden(m) => Error::Forbidden(fix(m)),
            Error::Relayed(mut body) => {
                body.message = fix(body.message);
                Error::Relayed(body)
            }
            Error::Stage {
                stage,
                reference,
                inner,
            } => {
                let (binary, function) = wasmcore_proto::split_stage(&reference);
                let reference = match rewritten.iter().find(|(ours, _)| ours == binary) {
                    Some((_, theirs)) => match function {
                        Some(f) => format!("{theirs}:{f}"),
                        None => theirs.clone(),
                    },
                    None => reference,
                };
                Error::Stage {
                    stage,
                    reference,
                    inner: Box::new(inner.as_written(rewritten)),
                }
            }
            other => other,
        }
    }

    pub fn bad_request(msg: impl Into<String>) -> Self {
        Error::BadRequest(msg.into())
    }

    pub fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(msg.into())
    }

    pub fn exec(failure: ExecFailure, logs: Vec<String>) -> Self {
        Error::Execution(Box::new(ExecError {
            failure,
            stage: None,
            logs,
        }))
    }

    /// The stable wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::BadRequest(_) => ErrorCode::BadRequest,
            Error::TooLarge(_) => ErrorCode::TooLarge,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::Forbidden(_) => ErrorCode::Forbidden,
            Error::InvalidModule(_) => ErrorCode::InvalidModule,
            Error::AlreadyExists(_) => ErrorCode::AlreadyExists,
            Error::QuotaExceeded(_) => ErrorCode::QuotaExceeded,
            Error::Busy(_) => ErrorCode::Busy,
            Error::Internal(_) => ErrorCode::Internal,
            Error::Relayed(b) => b.code,
            Error::Stage { inner, .. } => inner.code(),
            Error::Execution(e) => match e.failure {
                ExecFailure::Timeout { .. } => ErrorCode::Timeout,
                ExecFailure::OutOfFuel { .. } => ErrorCode::OutOfFuel,
                ExecFailure::MemoryLimit { .. } => ErrorCode::MemoryLimit,
                ExecFailure::Trap { .. } => ErrorCode::Trap,
                ExecFailure::Plugin { .. }
                | ExecFailure::WasiExit { .. }
                | ExecFailure::Extism { .. } => ErrorCode::PluginError,
                ExecFailure::OutputTooLarge { .. } => ErrorCode::TooLarge,
                ExecFailure::StateQuota(_) => ErrorCode::QuotaExceeded,
                ExecFailure::PoolExhausted => ErrorCode::Busy,
            },
        }
    }

    /// The wire form of this error.
    pub fn to_body(&self) -> ErrorBody {
        if let Error::Relayed(body) = self {
            return (**body).clone();
        }
        if let Error::Stage { stage, .. } = self {
            let mut body = ErrorBody::new(self.code(), self.to_string());
            body.stage = Some(*stage);
            return body;
        }
        let mut body = ErrorBody::new(self.code(), self.to_string());
        if let Error::Execution(e) = self {
            if let Some(stage) = e.stage {
                body.message = format!("stage {stage}: {}", e.failure);
            }
            body.stage = e.stage;
            body.logs = e.logs.clone();
            match &e.failure {
                ExecFailure::Plugin { code }
                | ExecFailure::WasiExit { code }
                | ExecFailure::Extism { code, .. } => body.plugin_code = Some(*code),
                ExecFailure::Trap { backtrace, .. } => body.backtrace = backtrace.clone(),
                _ => {}
            }
        }
        body
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn execution_errors_map_to_codes_and_details() {
        let mut e = Error::exec(ExecFailure::Plugin { code: 7 }, vec!["hi".into()]);
        if let Error::Execution(x) = &mut e {
            x.stage = Some(2);
        }
        let body = e.to_body();
        assert_eq!(body.code, ErrorCode::PluginError);
        assert_eq!(body.plugin_code, Some(7));
        assert_eq!(body.stage, Some(2));
        assert_eq!(body.logs, vec!["hi".to_string()]);
        assert!(body.message.starts_with("stage 2: "), "{}", body.message);
        let e = Error::exec(ExecFailure::OutputTooLarge { cap: 1 }, vec![]);
        assert_eq!(e.code(), ErrorCode::TooLarge);
        let e = Error::exec(ExecFailure::PoolExhausted, vec![]);
        assert_eq!(e.code(), ErrorCode::Busy);
    }
}
