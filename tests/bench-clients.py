#!/usr/bin/env python3
"""Pipelined throughput of the client libraries against `wasmcorectl bench` on the same
daemon, in the same run: one connection, `uppercase` on "hello world".

  tests/bench-clients.py [--rounds 3] [--requests 100000] [--batch 1000]

Starts a daemon of this checkout on a temporary socket, then alternates, per round:
`wasmcorectl bench --only pipe1` (32 in flight, raw request lines), the Rust client's
`execute_many` (the `pipeline` example) and the Python package's `execute_many`. Reports
the median req/s of each, its ratio to `wasmcorectl bench`, and the daemon's CPU time per
request over each run (utime + stime of the broker and its workers, from /proc). Needs `make build plugins`.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(top, "clients", "python", "src"))
import wasmcore  # noqa: E402

BIN = os.path.join(top, "target", "release")
TICK = os.sysconf("SC_CLK_TCK")


def stat_ticks(pid, reaped):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime + stime, and with `reaped` the children it has waited for (cutime + cstime).
    return sum(int(x) for x in fields[11:15 if reaped else 13])


def cpu_s(pid):
    """CPU seconds of the daemon: the broker, its tenants' workers (which serve the
    requests), and the workers it has reaped."""
    ticks = stat_ticks(pid, True)
    for task in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/children" % (pid, task)) as f:
                for child in f.read().split():
                    ticks += stat_ticks(int(child), False)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return ticks / TICK


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=100000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--duration-ms", type=int, default=1500)
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="wasmcore-clients-bench.")
    sock = os.path.join(tmp, "wasm-core.sock")
    os.mkdir(os.path.join(tmp, "state"))
    daemon = subprocess.Popen([os.path.join(BIN, "wasmcored"), "--listen", sock,
                               "--state-dir", os.path.join(tmp, "state"), "--log-level", "warn"])
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        env = dict(os.environ, WASM_CORE_SOCKET=sock)
        client = wasmcore.Client(sock)
        client.load(os.path.join(top, "plugins", "dist", "uppercase.wasm"), name="up")
        rows = {"wasmcorectl bench": [], "Rust execute_many": [], "Python execute_many": []}
        cpu = {k: [] for k in rows}

        def measured(name, run):
            c0 = cpu_s(daemon.pid)
            n, secs = run()
            rows[name].append(n / secs)
            cpu[name].append((cpu_s(daemon.pid) - c0) / n * 1e6)

        def ctl_bench():
            out = subprocess.run(
                [os.path.join(BIN, "wasmcorectl"), "--socket", sock, "bench", "--binary", "up",
                 "--only", "pipe1", "--rounds", "1", "--duration-ms", str(args.duration_ms),
                 "--executions", "0", "--copies", "0", "--rotate", "0", "--tenants", "0"],
                check=True, capture_output=True, text=True).stdout
            line = next(l for l in out.splitlines() if l.startswith("execute, 1 connection, pipelined"))
            rate = float(re.split(r"\s{2,}", line.strip())[3])
            return rate * args.duration_ms / 1000, args.duration_ms / 1000

        def rust():
            out = subprocess.run([os.path.join(BIN, "examples", "pipeline"), "up",
                                  str(args.requests), str(args.batch)],
                                 env=env, check=True, capture_output=True, text=True).stdout
            m = re.search(r"(\d+) requests in ([\d.]+) s", out)
            return int(m.group(1)), float(m.group(2))

        def python():
            inputs = ["hello world"] * args.batch
            done = 0
            start = time.perf_counter()
            while done < args.requests:
                k = min(args.batch, args.requests - done)
                for r in client.execute_many("up", inputs[:k]):
                    if isinstance(r, Exception):
                        raise r
                done += k
            return done, time.perf_counter() - start

        for _ in range(args.rounds):
            measured("wasmcorectl bench", ctl_bench)
            measured("Rust execute_many", rust)
            measured("Python execute_many", python)
        base = statistics.median(rows["wasmcorectl bench"])
        print("pipelined, 1 connection, uppercase on 'hello world'; median of %d rounds"
              % args.rounds)
        print("%-22s %12s %10s %18s" % ("client", "req/s", "ratio", "daemon CPU µs/req"))
        for name, rates in rows.items():
            med = statistics.median(rates)
            print("%-22s %12.0f %10.2f %18.2f" % (name, med, med / base,
                                                 statistics.median(cpu[name])))
        client.close()
    finally:
        daemon.terminate()
        daemon.wait()
        subprocess.run(["rm", "-rf", tmp])


if __name__ == "__main__":
    main()
