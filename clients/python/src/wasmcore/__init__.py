"""A client for the wasm-core daemon (``wasmcored``): load WebAssembly binaries, execute
and chain them over its Unix socket, as the calling user.

>>> import wasmcore
>>> with wasmcore.Client() as c:                                    # doctest: +SKIP
...     c.load("/usr/share/wasm-core/plugins/uppercase.wasm", name="up")
...     c.execute("up", b"hello").output
b'HELLO'

The daemon's error answers raise :class:`DaemonError` subclasses named after the wire
codes (:class:`NotFound`, :class:`Busy`, :class:`Timeout`, …), each with ``code``.
"""

from .client import (MAX_REPLY_LINE, RUN_SOCKET, SOCKET_ENV, TMP_SOCKET, Binary, Client,
                     Loaded, Output, Stats, resolve_socket)
from .errors import (AlreadyExists, BadRequest, Busy, ClientTimeout, DaemonError,
                     ExecutionError, Forbidden, Internal, InvalidModule, MemoryLimit,
                     NotFound, OutOfFuel, PluginError, ProtocolError, QuotaExceeded,
                     TooLarge, Trap, Timeout, Unavailable, UntrustedServer, WasmCoreError)

__version__ = "0.1.0"

__all__ = [
    "Client", "Output", "Stats", "Loaded", "Binary", "resolve_socket", "RUN_SOCKET",
    "TMP_SOCKET", "SOCKET_ENV", "MAX_REPLY_LINE", "WasmCoreError", "Unavailable",
    "UntrustedServer", "ProtocolError", "ClientTimeout", "DaemonError", "BadRequest",
    "TooLarge", "NotFound", "Forbidden", "InvalidModule", "ExecutionError", "Timeout",
    "OutOfFuel", "MemoryLimit", "Trap", "PluginError", "QuotaExceeded", "Busy",
    "AlreadyExists", "Internal", "__version__",
]
