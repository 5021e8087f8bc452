"""The blocking client of the wasm-core daemon."""

import base64
import binascii
import contextlib
import json
import os
import pwd
import socket
import struct
import threading
from typing import (Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence,
                    Union)

from . import errors
from .errors import ClientTimeout, ProtocolError, Unavailable, UntrustedServer, WasmCoreError

__all__ = ["Client", "Output", "Stats", "Loaded", "Binary", "resolve_socket",
           "RUN_SOCKET", "TMP_SOCKET", "SOCKET_ENV", "MAX_REPLY_LINE"]

#: The packaged service's socket that tenants with a private /tmp can reach.
RUN_SOCKET = "/run/wasm-core/wasm-core.sock"
#: The socket fixed by the design, used when :data:`RUN_SOCKET` does not exist.
TMP_SOCKET = "/tmp/wasm-core.sock"
#: The environment variable that names the socket.
SOCKET_ENV = "WASM_CORE_SOCKET"
#: Cap on one reply line; a longer one means the peer is not a wasm-core daemon.
MAX_REPLY_LINE = 256 << 20
# Pipelined batches above this size are written from a second thread, so that neither
# side waits on the other; smaller ones fit the socket buffers.
_INLINE_BATCH = 64 * 1024

Input = Union[bytes, bytearray, memoryview, str]
Module = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, int, Any]


def resolve_socket(explicit: Optional[Union[str, "os.PathLike[str]"]] = None) -> str:
    """The socket to use, as ``wasmcorectl`` chooses it: ``explicit`` when given, else
    ``$WASM_CORE_SOCKET`` when set, else :data:`RUN_SOCKET` when it exists, else
    :data:`TMP_SOCKET`."""
    if explicit is not None:
        return os.fspath(explicit)
    env = os.environ.get(SOCKET_ENV)
    if env:
        return env
    if os.path.exists(RUN_SOCKET):
        return RUN_SOCKET
    return TMP_SOCKET


class Stats:
    """What an execution cost: wall time, fuel (when metered) and peak memory."""

    __slots__ = ("wall_us", "fuel_used", "memory_peak_bytes")

    def __init__(self, d: Mapping[str, Any]) -> None:
        self.wall_us: int = d.get("wall_us", 0)
        self.fuel_used: Optional[int] = d.get("fuel_used")
        self.memory_peak_bytes: Optional[int] = d.get("memory_peak_bytes")

    def __repr__(self) -> str:
        return "Stats(wall_us=%r, fuel_used=%r, memory_peak_bytes=%r)" % (
            self.wall_us, self.fuel_used, self.memory_peak_bytes)


class Output:
    """The result of an execution or a chain: ``output`` (bytes), ``stats``, ``stages``
    (a chain's per-stage stats) and ``logs`` (lines the guest logged)."""

    __slots__ = ("output", "stats", "stages", "logs")

    def __init__(self, reply: Mapping[str, Any]) -> None:
        text = reply.get("output")
        if text is not None:
            self.output: bytes = text.encode()
        elif "output_base64" in reply:
            try:
                self.output = base64.b64decode(reply["output_base64"], validate=True)
            except (binascii.Error, TypeError) as e:
                raise ProtocolError("the daemon sent bad output: %s" % e) from None
        else:
            self.output = b""
        self.stats = Stats(reply.get("stats", {}))
        self.stages: List[Stats] = [Stats(s) for s in reply.get("stages", ())]
        self.logs: List[str] = list(reply.get("logs", ()))

    @property
    def text(self) -> str:
        """The output decoded as UTF-8."""
        return self.output.decode()

    def __repr__(self) -> str:
        return "Output(output=%r, stats=%r, logs=%r)" % (self.output, self.stats, self.logs)


class Loaded:
    """A loaded binary: ``binary`` (its UUID), ``name``, ``sha256``, ``size``, ``kind``
    (``process``, ``wasi``, ``extism`` or ``component``), ``public``, ``compile_ms``; for a
    replace, ``replaced`` (the UUID of the version that was current) or ``unchanged``
    (the module was already the current version)."""

    __slots__ = ("binary", "name", "sha256", "size", "kind", "public", "compile_ms",
                 "replaced", "unchanged")

    def __init__(self, d: Mapping[str, Any]) -> None:
        self.binary: str = d["binary"]
        self.name: Optional[str] = d.get("name")
        self.sha256: str = d["sha256"]
        self.size: int = d["size"]
        self.kind: str = d["kind"]
        self.public: bool = d.get("public", False)
        self.compile_ms: float = d.get("compile_ms", 0.0)
        self.replaced: Optional[str] = d.get("replaced")
        self.unchanged: bool = d.get("unchanged", False)

    def __repr__(self) -> str:
        return "Loaded(binary=%r, name=%r, kind=%r, size=%r)" % (
            self.binary, self.name, self.kind, self.size)


class Binary:
    """One entry of :meth:`Client.list`."""

    __slots__ = ("binary", "name", "owner_uid", "size", "sha256", "kind", "public",
                 "loaded_at", "executions")

    def __init__(self, d: Mapping[str, Any]) -> None:
        self.binary: str = d["binary"]
        self.name: Optional[str] = d.get("name")
        self.owner_uid: int = d["owner_uid"]
        self.size: int = d["size"]
        self.sha256: str = d["sha256"]
        self.kind: str = d["kind"]
        self.public: bool = d.get("public", False)
        self.loaded_at: int = d.get("loaded_at", 0)
        self.executions: int = d.get("executions", 0)

    def __repr__(self) -> str:
        return "Binary(binary=%r, name=%r, kind=%r, owner_uid=%r)" % (
            self.binary, self.name, self.kind, self.owner_uid)


def _input_field(data: Input) -> str:
    """`"input":…` or `"input_base64":…` for a request line."""
    if isinstance(data, str):
        return '"input":' + json.dumps(data)
    raw = bytes(data)
    try:
        return '"input":' + json.dumps(raw.decode())
    except UnicodeDecodeError:
        return '"input_base64":"' + base64.b64encode(raw).decode() + '"'


def _limits(function: Optional[str], timeout_ms: Optional[int],
            memory_limit_mb: Optional[int], fuel: Optional[int]) -> str:
    out = ""
    if function is not None:
        out += ',"function":' + json.dumps(function)
    for key, value in (("timeout_ms", timeout_ms), ("memory_limit_mb", memory_limit_mb),
                       ("fuel", fuel)):
        if value is not None:
            out += ',"%s":%d' % (key, int(value))
    return out


def _trusted(server_uid: int) -> bool:
    if server_uid in (0, os.getuid()):
        return True
    try:
        return pwd.getpwnam("wasm-core").pw_uid == server_uid
    except KeyError:
        return False


class Client:
    """A connection to the wasm-core daemon, as the calling user.

    The socket is :func:`resolve_socket`'s unless ``socket_path`` is given. Before anything
    is sent, the process serving it must be root, the ``wasm-core`` service user, or the
    caller, else :class:`~wasmcore.errors.UntrustedServer` is raised. ``timeout`` (seconds)
    bounds how long one call waits for the daemon; ``None`` (the default) waits as long as
    the daemon takes, which enforces its own execution deadlines.

    Requests on one connection are answered in order; a client is not shared between
    threads without a lock. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, socket_path: Optional[Union[str, "os.PathLike[str]"]] = None, *,
                 timeout: Optional[float] = None) -> None:
        self.socket_path = resolve_socket(socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(self.socket_path)
            except OSError as e:
                raise Unavailable(
                    "cannot connect to %s: %s\n  is the daemon running? start it with "
                    "`systemctl start wasm-core.socket`, or point WASM_CORE_SOCKET at its socket"
                    % (self.socket_path, e.strerror or e)) from None
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", cred)
            if not _trusted(uid):
                raise UntrustedServer(
                    "refusing to talk to %s: it is served by uid %d, which is neither root, "
                    "the wasm-core service user, nor you (uid %d). Another user may have "
                    "created this socket to intercept requests; ask an admin to check, or use %s"
                    % (self.socket_path, uid, os.getuid(), RUN_SOCKET), self.socket_path, uid)
        except BaseException:
            sock.close()
            raise
        self.server_pid: int = pid
        self._sock: Optional[socket.socket] = sock
        self._rfile = sock.makefile("rb", buffering=64 * 1024)

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._sock is not None:
            self._rfile.close()
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- the operations --------------------------------------------------------------

    def load(self, module: Module, *, name: Optional[str] = None, public: bool = False,
             config: Optional[Mapping[str, str]] = None, replace: bool = False) -> Loaded:
        """Load a module and return its identity.

        ``module`` is a path (the file is opened here, as the caller, and its descriptor
        passed to the daemon, which never opens tenants' paths), an open regular file or
        its descriptor (passed likewise; the daemon refuses pipes), or the
        module's bytes or an in-memory file object such as ``io.BytesIO`` (sent inline). ``name`` makes
        it callable by name; ``public`` lets every tenant execute it; ``config`` is an
        Extism plugin's configuration. With ``replace`` and a name the caller already has,
        the module becomes that name's current version in one step (the old one is kept for
        ``rollback``); ``config=None`` then keeps the current version's configuration.
        """
        req: Dict[str, Any] = {"op": "load"}
        if name is not None:
            req["name"] = name
        if public:
            req["public"] = True
        if replace:
            req["replace"] = True
        if config is not None and (config or replace):
            req["config"] = {str(k): str(v) for k, v in config.items()}
        if isinstance(module, (bytes, bytearray, memoryview)):
            req["wasm_base64"] = base64.b64encode(bytes(module)).decode()
            return Loaded(self._call(req))
        if isinstance(module, int):
            req["fd"] = True
            return Loaded(self._call(req, fd=module))
        if hasattr(module, "read"):
            try:
                fd = module.fileno()
            except (AttributeError, OSError, ValueError):
                # An in-memory file object (io.BytesIO): its remaining bytes, inline.
                req["wasm_base64"] = base64.b64encode(bytes(module.read())).decode()
                return Loaded(self._call(req))
            req["fd"] = True
            return Loaded(self._call(req, fd=fd))
        fd = os.open(os.fspath(module), os.O_RDONLY | os.O_CLOEXEC)
        try:
            req["fd"] = True
            return Loaded(self._call(req, fd=fd))
        finally:
            os.close(fd)

    def execute(self, binary: str, input: Input = b"", *, function: Optional[str] = None,
                timeout_ms: Optional[int] = None, memory_limit_mb: Optional[int] = None,
                fuel: Optional[int] = None) -> Output:
        """Execute ``binary`` (UUID, name or ``OWNER/NAME``) on ``input``. ``function``
        picks an Extism plugin's function; the limits may only lower the daemon's maximums.
        Raises a :class:`~wasmcore.errors.DaemonError` subclass when the daemon answers an
        error."""
        line = ('{"op":"execute","binary":' + json.dumps(binary) + ","
                + _input_field(input)
                + _limits(function, timeout_ms, memory_limit_mb, fuel) + "}\n")
        return Output(self._exchange(line.encode()))

    def execute_many(self, binary: str, inputs: Iterable[Input], *,
                     function: Optional[str] = None, timeout_ms: Optional[int] = None,
                     memory_limit_mb: Optional[int] = None, fuel: Optional[int] = None
                     ) -> List[Union[Output, errors.DaemonError]]:
        """Execute ``binary`` once per input with every request in flight on this one
        connection, and return the results in the order of ``inputs``: an :class:`Output`,
        or the :class:`~wasmcore.errors.DaemonError` the daemon answered for that input
        (returned, not raised). A broken connection raises."""
        head = '{"op":"execute","binary":' + json.dumps(binary) + ","
        tail = _limits(function, timeout_ms, memory_limit_mb, fuel) + "}\n"
        payload = "".join([head + _input_field(i) + tail for i in inputs]).encode()
        n = payload.count(b"\n")
        sock = self._live()
        writer: Optional[threading.Thread] = None
        results: List[Union[Output, errors.DaemonError]] = []
        try:
            with self._guarded():
                if len(payload) <= _INLINE_BATCH:
                    self._send(payload)
                else:
                    def write() -> None:
                        try:
                            sock.sendall(payload)
                        except OSError:
                            pass  # the daemon closed the connection: the reader reports it
                    writer = threading.Thread(target=write, name="wasmcore-writer",
                                              daemon=True)
                    writer.start()
                readline = self._rfile.readline
                for _ in range(n):
                    reply = self._decode(readline(MAX_REPLY_LINE + 1))
                    if reply.get("ok") is True:
                        results.append(Output(reply))
                    else:
                        results.append(errors.from_reply(reply.get("error")))
        finally:
            # After the guard gave the connection up, which wakes a blocked writer.
            if writer is not None:
                writer.join()
        return results

    def chain(self, binaries: Sequence[str], input: Input = b"", *,
              timeout_ms: Optional[int] = None, memory_limit_mb: Optional[int] = None,
              fuel: Optional[int] = None) -> Output:
        """Run binaries in order, each one's output the next one's input. A stage is a
        UUID, a name, or ``BINARY:FUNCTION`` for one function of an Extism plugin."""
        line = ('{"op":"chain","binaries":' + json.dumps(list(binaries)) + ","
                + _input_field(input)
                + _limits(None, timeout_ms, memory_limit_mb, fuel) + "}\n")
        return Output(self._exchange(line.encode()))

    def list(self, all: bool = False) -> List[Binary]:
        """The binaries the caller may execute (``all``: every tenant's; admins only)."""
        req: Dict[str, Any] = {"op": "list"}
        if all:
            req["all"] = True
        return [Binary(b) for b in self._call(req)["binaries"]]

    def info(self, binary: str) -> Dict[str, Any]:
        """One binary's details as the daemon reports them (docs/PROTOCOL.md, ``info``):
        kind, imports, exports, limits, functions, configuration, the caller's state."""
        return self._body(self._call({"op": "info", "binary": binary}))

    def unload(self, binary: str) -> None:
        """Unload a binary (its owner or an admin); its plugin state goes with it."""
        self._call({"op": "unload", "binary": binary})

    def rollback(self, binary: str) -> Dict[str, Any]:
        """Move a name back to the version that was current before its current one (its
        owner or an admin); a second rollback undoes the first. Returns ``name``,
        ``binary`` (now current), ``previous`` and ``sha256``."""
        return self._body(self._call({"op": "rollback", "binary": binary}))

    def versions(self, binary: str) -> List[Dict[str, Any]]:
        """The versions a name keeps (``binary``, ``sha256``, ``size``, ``kind``,
        ``loaded_at``, ``current``), in the order they became current: the current one last."""
        return self._body(self._call({"op": "versions", "binary": binary}))["versions"]

    def configure(self, binary: str, config: Mapping[str, str]) -> None:
        """Replace an Extism plugin's configuration (its owner or an admin)."""
        self._call({"op": "configure", "binary": binary,
                    "config": {str(k): str(v) for k, v in config.items()}})

    def status(self) -> Dict[str, Any]:
        """Daemon-wide facts, and the caller as the daemon sees it (``tenant``)."""
        return self._body(self._call({"op": "status"}))

    def metrics(self) -> Dict[str, Any]:
        """The daemon's counters: the caller's own, or every tenant's for admins."""
        return self._body(self._call({"op": "metrics"}))

    def call(self, request: Mapping[str, Any]) -> Dict[str, Any]:
        """Send any request (a dict with ``op``) and return its reply, error replies
        included, as the daemon sent it."""
        return self._exchange((json.dumps(request, separators=(",", ":")) + "\n").encode(),
                              check=False)

    # -- plumbing --------------------------------------------------------------------

    @staticmethod
    def _body(reply: Dict[str, Any]) -> Dict[str, Any]:
        reply.pop("ok", None)
        reply.pop("tag", None)
        return reply

    def _live(self) -> socket.socket:
        if self._sock is None:
            raise ProtocolError("the client is closed (after an earlier failure, connect again)")
        return self._sock

    def _abandon(self) -> None:
        """After a failure replies can no longer be matched to requests: shut the
        connection down (which also wakes a pipelined batch's writer) and close it."""
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.close()

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        """Turn a failure while talking to the daemon into wasmcore's errors, and give the
        connection up: after one, replies can no longer be matched to requests."""
        try:
            yield
        except WasmCoreError:
            self._abandon()
            raise
        except socket.timeout:
            self._abandon()
            raise ClientTimeout("the daemon did not answer in time") from None
        except OSError as e:
            self._abandon()
            raise ProtocolError("talking to the daemon: %s" % e) from None
        except BaseException:
            self._abandon()
            raise

    def _send(self, data: bytes, fd: Optional[int] = None) -> None:
        sock = self._live()
        try:
            if fd is None:
                sock.sendall(data)
            else:
                sent = socket.send_fds(sock, [data], [fd])
                if sent < len(data):
                    sock.sendall(data[sent:])
        except socket.timeout:
            raise ClientTimeout("the daemon did not take the request in time") from None

    def _decode(self, line: bytes) -> Dict[str, Any]:
        if not line:
            raise ProtocolError("the daemon closed the connection without answering "
                                "(see its log: journalctl -u wasm-core)")
        if not line.endswith(b"\n"):
            raise ProtocolError("a reply line is longer than %d bytes: the peer is not a "
                                "wasm-core daemon" % MAX_REPLY_LINE)
        try:
            reply = json.loads(line)
        except ValueError as e:
            raise ProtocolError("the daemon sent invalid JSON: %s" % e) from None
        if not isinstance(reply, dict):
            raise ProtocolError("the daemon sent a reply that is not an object")
        return reply

    def _exchange(self, data: bytes, fd: Optional[int] = None,
                  check: bool = True) -> Dict[str, Any]:
        self._live()
        with self._guarded():
            try:
                self._send(data, fd)
            except ClientTimeout:
                raise
            except OSError:
                # A refused connection (too many, not allowed) is closed by the daemon with
                # an explanation, which is still readable.
                pass
            reply = self._decode(self._rfile.readline(MAX_REPLY_LINE + 1))
        if check and reply.get("ok") is not True:
            raise errors.from_reply(reply.get("error"))
        return reply

    def _call(self, request: Mapping[str, Any], fd: Optional[int] = None) -> Dict[str, Any]:
        return self._exchange((json.dumps(request, separators=(",", ":")) + "\n").encode(), fd)
