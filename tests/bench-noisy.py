#!/usr/bin/python3
"""The noisy neighbour, measured: one tenant floods the daemon while another does ping-pong.

Runs a dev-mode wasmcored (target/release) on a temporary socket and state directory, with
two tenants that need no account (UIDs --flood-uid and --victim-uid, as root's children
with those credentials):
- the flood: 10 connections x 32 pipelined executions of a CPU-bound module (spin.wat)
  calibrated to ~4 ms each;
- the victim: one connection, ping-pong executions of the uppercase plugin.

Three phases of --seconds each, in one run: the victim alone, the flood alone, both. It
prints the victim's p50/p99 and throughput alone and under the flood, the flood's
throughput alone and with the victim, the ratios the tenant-isolation targets name
(docs/PERFORMANCE.md, "Noisy neighbour"), and each worker's CPU time per request. Needs
root. Bounded in time; the daemon is stopped at the end.
"""

import argparse
import base64
import json
import os
import socket
import sys
import tempfile
import threading
import time

from bench_tenants import REPO, as_user, load, start_daemon, stop_daemon


def connect(path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    return s, s.makefile("rwb")


def call(f, req):
    f.write(json.dumps(req).encode() + b"\n")
    f.flush()
    return json.loads(f.readline())


def calibrate(path, target_ms):
    _, f = connect(path)
    n = 1_000_000
    r = call(f, {"op": "execute", "binary": "spin", "input_base64": base64.b64encode(n.to_bytes(4, "little")).decode(), "timeout_ms": 60000})
    assert r.get("ok"), r
    per = r["stats"]["wall_us"] / n
    return max(1, int(target_ms * 1000 / per))


def victim(path, seconds):
    _, f = connect(path)
    lat = []
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        t = time.perf_counter()
        r = call(f, {"op": "execute", "binary": "up", "input": "x", "tag": i})
        lat.append(time.perf_counter() - t)
        assert r.get("ok") and r.get("tag") == i, r
        i += 1
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1e6
    return {"n": len(lat), "rps": len(lat) / seconds, "p50_us": q(0.5), "p99_us": q(0.99)}


def flood(path, seconds, count, conns=10, depth=32):
    inp = base64.b64encode(count.to_bytes(4, "little")).decode()
    done = [0] * conns
    bad = []
    walls = []
    end = time.monotonic() + seconds

    def one(k):
        _, f = connect(path)
        sent = got = 0

        def send():
            nonlocal sent
            f.write(json.dumps({"op": "execute", "binary": "spin", "input_base64": inp, "tag": sent, "timeout_ms": 60000}).encode() + b"\n")
            sent += 1

        for _ in range(depth):
            send()
        f.flush()
        while got < sent:
            r = json.loads(f.readline())
            if not (r.get("ok") and r.get("tag") == got):
                bad.append(r)
            elif k == 0:
                walls.append(r["stats"]["wall_us"])
            got += 1
            if time.monotonic() < end:
                send()
                f.flush()
            done[k] = got

    ts = [threading.Thread(target=one, args=(k,)) for k in range(conns)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    took = time.monotonic() - t0
    # Completions per second within the measured window (the drain of the last requests
    # in flight is not counted as extra throughput).
    walls.sort()
    return {"n": sum(done), "rps": sum(done) / max(took, seconds), "exec_wall_us_p50": walls[len(walls) // 2] if walls else None, "errors": len(bad), "first_error": bad[0] if bad else None}


def worker_cpu(path, uid):
    _, f = connect(path)
    r = call(f, {"op": "status"})
    for w in r.get("workers", []):
        if w["uid"] == uid:
            return w["cpu_us"]
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--flood-uid", type=int, default=61100)
    ap.add_argument("--victim-uid", type=int, default=61101)
    ap.add_argument("--exec-ms", type=float, default=4.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench-noisy: run as root (the two tenants are child processes under their own UIDs)")
    tmp = tempfile.mkdtemp(prefix="wasmcore-noisy-")
    os.chmod(tmp, 0o755)
    d, sock = start_daemon(tmp, "[quotas]\nconcurrent_executions = 64\n[limits]\nmax_timeout_ms = 60000\n")
    try:
        spin = os.path.join(REPO, "wasmcored/tests/fixtures/spin.wat")
        up = os.path.join(REPO, "plugins/dist/uppercase.wasm")
        as_user(a.flood_uid, load, sock, spin, "spin")
        as_user(a.victim_uid, load, sock, up, "up")
        count = as_user(a.flood_uid, calibrate, sock, a.exec_ms)
        s = a.seconds
        alone = as_user(a.victim_uid, victim, sock, s)
        cpu0 = worker_cpu(sock, a.flood_uid)
        f_alone = as_user(a.flood_uid, flood, sock, s, count)
        cpu1 = worker_cpu(sock, a.flood_uid)
        res = {}
        th = threading.Thread(target=lambda: res.update(f=as_user(a.flood_uid, flood, sock, s, count)))
        th.start()
        time.sleep(0.3)
        under = as_user(a.victim_uid, victim, sock, s - 0.6)
        th.join()
        f_with = res["f"]
        out = {
            "exec_ms": a.exec_ms,
            "victim_alone": alone,
            "victim_under_flood": under,
            "flood_alone": f_alone,
            "flood_with_victim": f_with,
            "victim_p99_added_ms": (under["p99_us"] - alone["p99_us"]) / 1000,
            "victim_throughput_ratio": under["rps"] / alone["rps"],
            "flood_throughput_ratio": f_with["rps"] / f_alone["rps"],
            "flood_worker_cpu_us_per_request": (cpu1 - cpu0) / f_alone["n"] if cpu0 is not None and cpu1 is not None and f_alone["n"] else None,
        }
        if a.json:
            print(json.dumps(out, indent=2))
        else:
            print(f"noisy neighbour ({a.exec_ms} ms executions, 10 x 32 pipelined flood, {s:.0f} s phases)")
            print(f"  victim alone        p50 {alone['p50_us']:8.0f} us  p99 {alone['p99_us']:8.0f} us  {alone['rps']:8.0f} req/s")
            print(f"  victim under flood  p50 {under['p50_us']:8.0f} us  p99 {under['p99_us']:8.0f} us  {under['rps']:8.0f} req/s")
            print(f"  flood alone         {f_alone['rps']:8.1f} req/s   with the victim {f_with['rps']:8.1f} req/s  (errors {f_alone['errors'] + f_with['errors']}; one execution's wall time p50 {f_alone['exec_wall_us_p50']} us alone)")
            if out["flood_worker_cpu_us_per_request"] is not None:
                print(f"  flood worker CPU    {out['flood_worker_cpu_us_per_request']:.0f} us per request (alone)")
            print(f"  victim p99 added    {out['victim_p99_added_ms']:.2f} ms (target <= 1 ms)")
            print(f"  victim throughput   {out['victim_throughput_ratio']:.2f} of alone (target >= 0.5)")
            print(f"  flood throughput    {out['flood_throughput_ratio']:.2f} of alone (target >= 0.45)")
        if f_alone["errors"] or f_with["errors"]:
            sys.exit(f"bench-noisy: the flood got errors: {f_alone['first_error'] or f_with['first_error']}")
    finally:
        stop_daemon(d, tmp)


if __name__ == "__main__":
    main()
