#!/usr/bin/python3
"""What the tenant workers cost: memory of the broker plus N workers, and a tenant's first
execution after its worker exited against a warm one.

Runs a dev-mode wasmcored (target/release) on a temporary socket and state directory with
`workers.idle_timeout_s = 1`. N tenants (UIDs --first-uid…, no accounts needed; children of
this root process with those credentials) each load the uppercase plugin and execute it
once; then the RSS and PSS of the broker and of every worker are read from /proc. Then one tenant
times a connect + execute on a warm worker (--samples times, median) and, --samples times,
the same after its worker exited (idle), which starts a worker and restores its binary.
Needs root; bounded in time; the daemon is stopped at the end.
"""

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

from bench_tenants import REPO, as_user, load, start_daemon, stop_daemon


def execute_once(path):
    t = time.perf_counter()
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    f = s.makefile("rwb")
    f.write(b'{"op":"execute","binary":"up","input":"x"}\n')
    f.flush()
    r = json.loads(f.readline())
    took = time.perf_counter() - t
    s.close()
    assert r.get("ok"), r
    return took


def load_and_run(sock):
    load(sock, os.path.join(REPO, "plugins/dist/uppercase.wasm"), "up")
    return execute_once(sock)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pss_kib(pid):
    """Proportional set size: shared pages (the daemon's executable, the compiler's code)
    counted once over every process that maps them, as RSS does not."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def workers(path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    f = s.makefile("rwb")
    f.write(b'{"op":"status"}\n')
    f.flush()
    return json.loads(f.readline()).get("workers", [])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tenants", type=int, default=10)
    ap.add_argument("--first-uid", type=int, default=61200)
    ap.add_argument("--samples", type=int, default=7)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench-workers: run as root")
    tmp = tempfile.mkdtemp(prefix="wasmcore-workers-")
    os.chmod(tmp, 0o755)
    config = "[workers]\nidle_timeout_s = 1\n"

    def memory(d, uids, what):
        ws = [w for w in workers(sock) if w["uid"] in uids]
        broker = rss_kib(d.pid)
        total = broker + sum(rss_kib(w["pid"]) for w in ws)
        pss = pss_kib(d.pid) + sum(pss_kib(w["pid"]) for w in ws)
        print(f"memory, {what}: broker {broker / 1024:.1f} MiB + {len(ws)} workers: {total / 1024:.1f} MiB RSS in all ({(total - broker) / len(ws) / 1024:.1f} MiB per worker); {pss / 1024:.1f} MiB PSS in all")

    d, sock = start_daemon(tmp, config)
    try:
        uids = [a.first_uid + i for i in range(a.tenants)]
        for uid in uids:
            as_user(uid, load_and_run, sock)
        memory(d, uids, "each tenant loaded (compiled) a module and ran one execution")
        # Restarted: each worker restores its tenant's binary from the stored artifact.
        d.terminate()
        d.wait(timeout=20)
        d, sock = start_daemon(tmp, config)
        for uid in uids:
            as_user(uid, execute_once, sock)
        memory(d, uids, "after a restart, each tenant ran one execution")
        uid = uids[0]
        warm = [as_user(uid, execute_once, sock) for _ in range(a.samples)]
        cold = []
        for _ in range(a.samples):
            t = time.monotonic()
            while any(w["uid"] == uid for w in workers(sock)):
                assert time.monotonic() - t < 10, "the worker did not exit when idle"
                time.sleep(0.1)
            cold.append(as_user(uid, execute_once, sock))
        w_ms, c_ms = statistics.median(warm) * 1e3, statistics.median(cold) * 1e3
        print(f"first execute after the worker exited: {c_ms:.2f} ms (median of {len(cold)}); warm: {w_ms:.2f} ms; difference {c_ms - w_ms:.2f} ms (target <= 30 ms)")
    finally:
        stop_daemon(d, tmp)


if __name__ == "__main__":
    main()
