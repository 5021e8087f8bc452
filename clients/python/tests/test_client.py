"""The wasmcore package against a real daemon.

Run by wasm-core's `make test` (tests/tests/e2e/clients.rs) as an unprivileged user, with:
  WASMCORE_TEST_SOCKET    the daemon's socket
  WASMCORE_TEST_PLUGINS   a directory with uppercase.wasm and greet.wasm
  WASMCORE_TEST_FIXTURES  a directory with trap.wasm and loop.wasm
  WASMCORE_TEST_FOREIGN   the UUID of another user's private binary
  WASMCORE_TEST_SQUATTED  a socket served by another (unprivileged) user
Without them every test is skipped.
"""

import io
import os
import pwd

import pytest

import wasmcore

ENV = ("WASMCORE_TEST_SOCKET", "WASMCORE_TEST_PLUGINS", "WASMCORE_TEST_FIXTURES",
       "WASMCORE_TEST_FOREIGN", "WASMCORE_TEST_SQUATTED")
pytestmark = pytest.mark.skipif(any(v not in os.environ for v in ENV),
                                reason="needs a daemon: set %s" % ", ".join(ENV))

SOCKET = os.environ.get("WASMCORE_TEST_SOCKET", "")


def plugin(name):
    return os.path.join(os.environ["WASMCORE_TEST_PLUGINS"], name + ".wasm")


def fixture(name):
    return os.path.join(os.environ["WASMCORE_TEST_FIXTURES"], name + ".wasm")


@pytest.fixture
def client():
    with wasmcore.Client(SOCKET) as c:
        yield c
    with wasmcore.Client(SOCKET) as c:
        for b in c.list():
            c.unload(b.binary)


def test_load_execute_chain_unload(client):
    loaded = client.load(plugin("uppercase"), name="up")
    assert loaded.kind == "process" and loaded.name == "up" and len(loaded.binary) == 36
    out = client.execute("up", b"hello")
    assert out.output == b"HELLO" and out.text == "HELLO"
    assert out.stats.wall_us > 0 and out.stats.memory_peak_bytes > 0
    assert client.execute(loaded.binary, "text in").output == b"TEXT IN"
    chained = client.chain(["up", loaded.binary, "up"], b"abc")
    assert chained.output == b"ABC" and len(chained.stages) == 3
    # OWNER/NAME, OWNER a user name or a uid.
    me = pwd.getpwuid(os.getuid()).pw_name
    assert client.execute(me + "/up", b"q").output == b"Q"
    assert client.chain(["%d/up" % os.getuid(), me + "/up"], b"r").output == b"R"
    assert client.info(me + "/up")["binary"] == loaded.binary
    assert [b.name for b in client.list()] == ["up"]
    client.unload("up")
    with pytest.raises(wasmcore.NotFound) as e:
        client.execute("up", b"x")
    assert e.value.code == "not_found"
    assert client.list() == []


def test_every_way_to_load(client):
    with open(plugin("uppercase"), "rb") as f:
        wasm = f.read()
        f.seek(0)
        a = client.load(f, name="from-file-object")
    b = client.load(wasm, name="from-bytes")
    fd = os.open(plugin("uppercase"), os.O_RDONLY)
    try:
        c = client.load(fd, name="from-fd")
    finally:
        os.close(fd)
    assert a.sha256 == b.sha256 == c.sha256 and a.size == len(wasm)
    with pytest.raises(wasmcore.AlreadyExists):
        client.load(wasm, name="from-bytes")
    with pytest.raises(wasmcore.InvalidModule):
        client.load(b"\0asm\x01\0\0\0garbage")
    with pytest.raises(FileNotFoundError):
        client.load("/nonexistent/plugin.wasm")


def test_binary_input_and_output(client):
    client.load(plugin("uppercase"), name="up")
    data = bytes(range(256))
    out = client.execute("up", data)
    assert out.output == data.upper()


def test_errors_carry_the_wire_code(client):
    client.load(fixture("trap"), name="trap")
    client.load(fixture("loop"), name="loop")
    with pytest.raises(wasmcore.Trap) as e:
        client.execute("trap")
    assert isinstance(e.value, wasmcore.ExecutionError) and e.value.backtrace
    with pytest.raises(wasmcore.Timeout) as e:
        client.execute("loop", timeout_ms=50)
    assert e.value.code == "timeout"
    client.load(plugin("uppercase"), name="up")
    with pytest.raises(wasmcore.DaemonError) as e:
        client.chain(["up", "trap"], b"x")
    assert e.value.code == "trap" and e.value.stage == 1
    with pytest.raises(wasmcore.BadRequest):
        client.execute("up", timeout_ms=0)
    reply = client.call({"op": "frobnicate"})
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request"


def test_versions_replace_and_rollback(client):
    first = client.load(plugin("uppercase"), name="up")
    with pytest.raises(wasmcore.AlreadyExists):
        client.load(fixture("trap"), name="up")
    second = client.load(fixture("trap"), name="up", replace=True)
    assert second.replaced == first.binary and not second.unchanged
    again = client.load(fixture("trap"), name="up", replace=True)
    assert again.unchanged and again.binary == second.binary
    with pytest.raises(wasmcore.Trap):
        client.execute("up", b"x")
    versions = client.versions("up")
    assert [v["binary"] for v in versions] == [first.binary, second.binary]
    assert [v["current"] for v in versions] == [False, True]
    back = client.rollback("up")
    assert back["binary"] == first.binary and back["previous"] == second.binary
    assert client.execute("up", b"x").output == b"X"
    # The superseded version still runs by UUID.
    with pytest.raises(wasmcore.Trap):
        client.execute(second.binary, b"x")


def test_extism_functions_and_configuration(client):
    client.load(plugin("greet"), name="greet", config={"greeting": "Hi"})
    assert client.execute("greet", b"Ann", function="greet").text == "Hi, Ann!"
    client.configure("greet", {"greeting": "Howdy"})
    assert client.execute("greet", b"Ann", function="greet").text == "Howdy, Ann!"
    info = client.info("greet")
    assert info["kind"] == "extism" and "greet" in info["functions"]
    assert info["config"] == {"greeting": "Howdy"}
    with pytest.raises(wasmcore.PluginError):
        client.execute("greet", b"x", function="fail")


def test_execute_many_pipelines_in_order(client):
    client.load(plugin("uppercase"), name="up")
    # Over the inline batch size: written from a second thread while replies are read.
    inputs = ["input %d" % i for i in range(5000)]
    results = client.execute_many("up", inputs)
    assert [r.text for r in results] == [i.upper() for i in inputs]
    assert client.execute_many("up", []) == []
    client.load(fixture("trap"), name="trap")
    mixed = client.execute_many("trap", [b"a", b"b"])
    assert all(isinstance(r, wasmcore.Trap) for r in mixed)
    # The connection is still in step after error replies.
    assert client.execute("up", b"ok").output == b"OK"


def test_another_users_binary_is_invisible(client):
    foreign = os.environ["WASMCORE_TEST_FOREIGN"]
    for call in (lambda: client.execute(foreign, b"x"), lambda: client.info(foreign),
                 lambda: client.unload(foreign)):
        with pytest.raises(wasmcore.NotFound):
            call()
    assert foreign not in [b.binary for b in client.list()]
    with pytest.raises(wasmcore.Forbidden):
        client.list(all=True)


def test_status_and_metrics_are_the_callers(client):
    status = client.status()
    assert status["tenant"]["uid"] == os.getuid() and status["tenant"]["admin"] is False
    assert status["protocol"] == 1
    client.load(plugin("uppercase"), name="up")
    client.execute("up", b"x")
    m = client.metrics()
    assert [t["uid"] for t in m["tenants"]] == [os.getuid()]


def test_a_squatted_socket_is_refused():
    path = os.environ["WASMCORE_TEST_SQUATTED"]
    with pytest.raises(wasmcore.UntrustedServer) as e:
        wasmcore.Client(path)
    assert e.value.server_uid != os.getuid() and "refusing to talk" in str(e.value)


def test_no_daemon_is_unavailable(tmp_path):
    with pytest.raises(wasmcore.Unavailable) as e:
        wasmcore.Client(str(tmp_path / "none.sock"))
    assert "is the daemon running" in str(e.value)


def test_client_timeout_closes_the_connection():
    with wasmcore.Client(SOCKET, timeout=0.3) as c:
        c.load(fixture("loop"), name="slow")
        with pytest.raises(wasmcore.ClientTimeout):
            c.execute("slow", timeout_ms=3000)
        with pytest.raises(wasmcore.ProtocolError):
            c.execute("slow")
    with wasmcore.Client(SOCKET) as c:
        c.unload("slow")


def test_socket_resolution(monkeypatch):
    monkeypatch.setenv("WASM_CORE_SOCKET", "/x/y.sock")
    assert wasmcore.resolve_socket() == "/x/y.sock"
    assert wasmcore.resolve_socket("/explicit.sock") == "/explicit.sock"
    monkeypatch.delenv("WASM_CORE_SOCKET")
    expected = wasmcore.RUN_SOCKET if os.path.exists(wasmcore.RUN_SOCKET) else wasmcore.TMP_SOCKET
    assert wasmcore.resolve_socket() == expected


def test_closed_client_raises(client):
    client.close()
    with pytest.raises(wasmcore.ProtocolError):
        client.status()
    client.close()


def test_in_memory_file_and_repr(client):
    with open(plugin("uppercase"), "rb") as f:
        loaded = client.load(io.BytesIO(f.read()), name="up")
    assert repr(loaded).startswith("Loaded(") and "'up'" in repr(loaded)
    assert "HELLO" in repr(client.execute("up", "hello"))
