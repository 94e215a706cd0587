#!/usr/bin/env python3
"""Load across zero-downtime agent restarts: requests, failures, and the longest stall.

Usage (from anywhere in the repo; builds the release binaries unless --no-build, cleans up
every process it starts):

    python3 tests/bench/restart.py                          # 3 restarts under 2,000 req/s
    python3 tests/bench/restart.py --restarts 5 --rate 5000 --connections 64

Method (see tests/bench/README.md, "Restart under load"):
  * origin: one `weir-demo-backend` on 127.0.78.1, behind a local-mode weir-controller;
  * agent 1 runs with --state-dir DIR (so its hand-off socket is DIR/handoff.sock);
  * the load generator is `weir-load` (open loop: requests are scheduled at a fixed rate
    and latency counts from the scheduled time, so a stall of S ms during a hand-off shows
    up as a latency of at least S ms in the requests scheduled in it: `max_us` is the
    longest any request waited, i.e. the longest gap in service) with --reconnect-closed:
    like any pooled client it sends a request on a new connection when the old agent closed
    the idle one first (or as the request went out: once, on a reused connection only);
    anything else is an error. --no-reconnect-closed counts those as errors too (one per
    idle connection per restart: the old agent closes idle keep-alive connections);
  * every --interval a new agent is started with the same flags; it takes the sockets over,
    says ready, and the old one drains and exits (its exit status is checked);
  * printed: requests sent, answered 2xx, errors, p50/p99/max latency, and per restart the
    time from the new agent's start to the old one's exit.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
ORIGIN = "127.0.78.1:18190"
HOST = "restart.bench"
LISTEN = "127.0.0.1:18191"
ADMIN = "127.0.0.1:18192"
GRPC = "127.0.0.1:18193"
CTRL_ADMIN = "127.0.0.1:18194"
PROCS = []


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def start(cmd, logfile, env=None):
    out = open(logfile, "ab")
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    PROCS.append(p)
    return p


def cleanup(*_):
    for p in PROCS:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def http_status(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except Exception:
        return 0


def wait_until(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {what}")


def manifests(d):
    ip, port = ORIGIN.split(":")
    with open(f"{d}/origin.yaml", "w") as f:
        f.write(
            "apiVersion: v1\nkind: Service\nmetadata: {name: origin, namespace: default}\n"
            f"spec:\n  ports: [{{name: http, port: 80, targetPort: {port}}}]\n---\n"
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: origin-1\n"
            "  namespace: default\n  labels: {kubernetes.io/service-name: origin}\naddressType: IPv4\n"
            f"ports: [{{name: http, port: {port}}}]\nendpoints:\n"
            f'  - addresses: ["{ip}"]\n    conditions: {{ready: true}}\n'
        )
    with open(f"{d}/policy.yaml", "w") as f:
        f.write(
            "apiVersion: weir.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: bench, namespace: default}\n"
            f'spec:\n  hosts: ["{HOST}"]\n  rules:\n    - backendRefs: [{{name: origin, port: 80}}]\n'
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--interval", type=float, default=3.0, help="seconds between restarts")
    ap.add_argument("--rate", type=float, default=2000)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--bin-dir", default=os.path.join(REPO, "target", "release"))
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--no-reconnect-closed", dest="reconnect_closed", action="store_false",
                    help="count a request on a connection the old agent closed as an error instead of sending it on a new connection")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (cleanup(), sys.exit(1)))

    if not args.no_build:
        subprocess.run(
            ["cargo", "build", "--release", "-q", "-p", "weir-agent", "-p", "weir-controller",
             "-p", "weir-tests", "--bin", "weir-agent", "--bin", "weir-controller",
             "--bin", "weir-load", "--bin", "weir-demo-backend"],
            cwd=REPO, check=True,
        )
    b = args.bin_dir
    d = tempfile.mkdtemp(prefix="weir-restart-bench-")
    cfg, state = f"{d}/config", f"{d}/state"
    os.makedirs(cfg)
    manifests(cfg)
    quiet = dict(os.environ, WEIR_LOG="info")
    try:
        origin = start([f"{b}/weir-demo-backend", "--listen", ORIGIN, "--name", "origin"], f"{d}/origin.log")
        start([f"{b}/weir-controller", "--config-dir", cfg, "--grpc-addr", GRPC, "--admin-addr", CTRL_ADMIN],
              f"{d}/controller.log", env=quiet)
        wait_until(lambda: http_status(f"http://{CTRL_ADMIN}/readyz") == 200, 30, "controller ready")
        agent_cmd = [f"{b}/weir-agent", "--controller", f"http://{GRPC}", "--listen", LISTEN,
                     "--admin-addr", ADMIN, "--state-dir", state, "--workers", str(args.workers),
                     "--node-name", "bench"]
        agent = start(agent_cmd, f"{d}/agent-0.log", env=quiet)
        wait_until(lambda: http_status(f"http://{ADMIN}/readyz") == 200, 30, "agent ready")
        wait_until(lambda: os.path.exists(f"{state}/handoff.sock"), 30, "hand-off socket")

        duration = args.interval * (args.restarts + 1)
        load = subprocess.Popen(
            [f"{b}/weir-load", "--url", f"http://{LISTEN}/", "--host", HOST, "--rate", str(args.rate),
             "--connections", str(args.connections), "--duration", f"{duration}s", "--warmup", "1s",
             *(["--reconnect-closed"] if args.reconnect_closed else [])],
            stdout=subprocess.PIPE, start_new_session=True,
        )
        PROCS.append(load)
        time.sleep(1.0 + args.interval)  # the warm-up, then one interval on the first agent
        swaps = []
        for i in range(1, args.restarts + 1):
            t0 = time.monotonic()
            new = start(agent_cmd, f"{d}/agent-{i}.log", env=quiet)
            code = agent.wait(timeout=60)
            swaps.append({"restart": i, "old_exit": code, "new_start_to_old_exit_ms": round((time.monotonic() - t0) * 1000)})
            log(f"restart {i}: old agent exited {code} {swaps[-1]['new_start_to_old_exit_ms']} ms after the new one started")
            if new.poll() is not None:
                raise SystemExit(f"the new agent {i} exited: see {d}/agent-{i}.log")
            agent = new
            if i < args.restarts:
                time.sleep(args.interval)
        out, _ = load.communicate(timeout=duration + 60)
        result = json.loads(out)
        origin_alive = origin.poll() is None
    finally:
        cleanup()
    summary = {
        "restarts": args.restarts,
        "rate": args.rate,
        "connections": args.connections,
        "sent": result["sent"],
        "ok": result["ok"],
        "errors": result["errors"],
        "retried": result.get("retried", 0),
        "p50_us": result["p50_us"],
        "p99_us": result["p99_us"],
        "max_us": result["max_us"],
        "swaps": swaps,
        "logs": d,
    }
    print(json.dumps(summary, indent=2))
    print(
        f"\n{result['sent']} requests across {args.restarts} restarts at {args.rate:.0f}/s: "
        f"{result['errors']} failed ({result.get('retried', 0)} sent again on a new connection); longest wait (gap) {result['max_us'] / 1000:.1f} ms, "
        f"p99 {result['p99_us'] / 1000:.2f} ms; every old agent exited 0: "
        f"{all(s['old_exit'] == 0 for s in swaps)}; origin alive: {origin_alive}"
    )
    if result["errors"] or any(s["old_exit"] != 0 for s in swaps):
        sys.exit(1)


if __name__ == "__main__":
    main()
