"""The exceptions of wasmcore: one class per wire error code, and the client's own."""

from typing import Any, Dict, List, Optional, Type

__all__ = [
    "WasmCoreError", "Unavailable", "UntrustedServer", "ProtocolError", "ClientTimeout",
    "DaemonError", "BadRequest", "TooLarge", "NotFound", "Forbidden", "InvalidModule",
    "ExecutionError", "Timeout", "OutOfFuel", "MemoryLimit", "Trap", "PluginError",
    "QuotaExceeded", "Busy", "AlreadyExists", "Internal", "from_reply",
]


class WasmCoreError(Exception):
    """Base class of every error raised by wasmcore."""


class Unavailable(WasmCoreError):
    """Nothing accepts connections on the socket (is the daemon running?)."""


class UntrustedServer(Unavailable):
    """The socket is served by a process that is neither root, the ``wasm-core`` service
    user, nor the caller: another user may have created it to intercept requests. Nothing
    was sent on it."""

    def __init__(self, message: str, socket_path: str, server_uid: int) -> None:
        super().__init__(message)
        self.socket_path = socket_path
        self.server_uid = server_uid


class ProtocolError(WasmCoreError):
    """The daemon closed the connection, or sent something that is not the protocol. The
    client is closed."""


class ClientTimeout(WasmCoreError, TimeoutError):
    """The daemon did not answer within the client's ``timeout``. The client is closed (a
    late answer could otherwise be taken for the next request's)."""


class DaemonError(WasmCoreError):
    """The daemon answered a request with an error.

    ``code`` is the wire error code (``"not_found"``, ``"busy"``, …); ``stage`` the failed
    stage of a chain, ``plugin_code`` a plugin's return code or exit status, ``backtrace``
    the innermost wasm frames of a trap, ``logs`` what the guest logged before failing.
    """

    code = "internal"

    def __init__(self, error: Dict[str, Any]) -> None:
        self.message: str = str(error.get("message", ""))
        super().__init__("%s: %s" % (error.get("code", self.code), self.message))
        self.code = str(error.get("code", self.code))
        self.stage: Optional[int] = error.get("stage")
        self.plugin_code: Optional[int] = error.get("plugin_code")
        self.backtrace: List[str] = list(error.get("backtrace", []))
        self.logs: List[str] = list(error.get("logs", []))


class BadRequest(DaemonError):
    """The request is malformed (``bad_request``)."""
    code = "bad_request"


class TooLarge(DaemonError):
    """A module, input or output exceeds its cap (``too_large``)."""
    code = "too_large"


class NotFound(DaemonError):
    """No binary by that UUID or name is visible to the caller (``not_found``)."""
    code = "not_found"


class Forbidden(DaemonError):
    """The caller is not allowed to do this (``forbidden``)."""
    code = "forbidden"


class InvalidModule(DaemonError):
    """The module is not valid WebAssembly of a kind wasm-core runs (``invalid_module``)."""
    code = "invalid_module"


class ExecutionError(DaemonError):
    """The guest's execution failed (the base of the five execution errors)."""


class Timeout(ExecutionError):
    """The execution ran past its deadline (``timeout``)."""
    code = "timeout"


class OutOfFuel(ExecutionError):
    """The execution used up its fuel (``out_of_fuel``)."""
    code = "out_of_fuel"


class MemoryLimit(ExecutionError):
    """The execution needed more memory than its cap (``memory_limit``)."""
    code = "memory_limit"


class Trap(ExecutionError):
    """The guest trapped (``trap``)."""
    code = "trap"


class PluginError(ExecutionError):
    """The plugin returned a non-zero code or exited non-zero (``plugin_error``)."""
    code = "plugin_error"


class QuotaExceeded(DaemonError):
    """A per-tenant quota would be exceeded (``quota_exceeded``)."""
    code = "quota_exceeded"


class Busy(DaemonError):
    """A concurrency limit is reached; retry later (``busy``)."""
    code = "busy"


class AlreadyExists(DaemonError):
    """The caller already has a binary by that name (``already_exists``)."""
    code = "already_exists"


class Internal(DaemonError):
    """The daemon failed; details are in its log (``internal``)."""
    code = "internal"


_BY_CODE: Dict[str, Type[DaemonError]] = {
    cls.code: cls
    for cls in (BadRequest, TooLarge, NotFound, Forbidden, InvalidModule, Timeout, OutOfFuel,
                MemoryLimit, Trap, PluginError, QuotaExceeded, Busy, AlreadyExists, Internal)
}


def from_reply(error: Any) -> DaemonError:
    """The exception for an error reply's ``error`` object (``DaemonError`` for a code this
    version does not know)."""
    if not isinstance(error, dict):
        error = {"code": "internal", "message": "the daemon sent an error without details"}
    return _BY_CODE.get(str(error.get("code")), DaemonError)(error)
