"""Helpers of the tenant benchmarks (bench-noisy.py, bench-workers.py): run code as another
UID, and the daemon under test in dev mode. Imported from the scripts' own directory."""

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(REPO, "target", "release")


def as_user(uid, fn, *args):
    """Run fn(*args) in a child with uid and gid `uid` and no groups (no account needed:
    the daemon learns the UID from the kernel); return its result, None if it failed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.write(w, json.dumps(fn(*args)).encode())
        except BaseException as e:
            sys.stderr.write(f"{os.path.basename(sys.argv[0])}: uid {uid}: {e!r}\n")
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data) if data else None


def load(sock, module, name):
    """Load `module` (.wasm or .wat) as `name` with wasmcorectl, which passes the open file."""
    out = subprocess.run([os.path.join(BIN, "wasmcorectl"), "--socket", sock, "load", module, "--name", name], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def start_daemon(tmp, config):
    """wasmcored on tmp/s.sock with state in tmp/state and `config` as its config file."""
    sock = os.path.join(tmp, "s.sock")
    cfg = os.path.join(tmp, "config.toml")
    with open(cfg, "w") as c:
        c.write(config)
    d = subprocess.Popen([os.path.join(BIN, "wasmcored"), "--listen", sock, "--state-dir", os.path.join(tmp, "state"), "--config", cfg], stderr=open(os.path.join(tmp, "log"), "ab"))
    t = time.monotonic()
    while not os.path.exists(sock):
        if d.poll() is not None or time.monotonic() - t > 20:
            sys.exit(f"wasmcored did not start: {open(os.path.join(tmp, 'log')).read()}")
        time.sleep(0.05)
    return d, sock


def stop_daemon(d, tmp):
    """Stop the daemon of `start_daemon` and remove its directory."""
    d.terminate()
    d.wait(timeout=20)
    subprocess.run(["rm", "-rf", tmp])
