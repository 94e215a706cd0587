#!/usr/bin/env python3
"""Fixed-rate latency of nginx and weir-agent (N=1) with the scheduler free, and with the
proxy and the origin pinned, to tell a proxy's own latency from where the kernel put it.

    python3 tests/bench/placement.py                   # 23k rps, 2 rounds, after a release build
    python3 tests/bench/placement.py --rate 15000 --rounds 3 --no-build

Same origins, proxies and open-loop generator as proxy_bench.py (`weir-load` pinned to
CPU 0, 64 connections). Placements:
  * free: as in proxy_bench.py (only the generator is pinned);
  * pinned: every thread of the proxy on CPU 1, the origin on CPU 0 (next to the generator).
For weir it also prints the share of requests whose upstream response head came within
0.5 ms (weir_agent_request_duration_seconds), which tells the agent's own wait from the
client's, and for both the voluntary and involuntary context switches per request of the
proxy's threads (from /proc/<pid>/task/*/status).
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import proxy_bench as pb  # noqa: E402


def pin(pids, cpus):
    for pid in pids:
        subprocess.run(["taskset", "-a", "-p", cpus, str(pid)], capture_output=True, check=False)


def switches(pids):
    vol = invol = 0
    for pid in pids:
        for status in glob.glob(f"/proc/{pid}/task/*/status"):
            try:
                with open(status) as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches"):
                            vol += int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches"):
                            invol += int(line.split()[1])
            except OSError:
                pass
    return vol, invol


def head_within_half_ms():
    """(requests ≤ 0.5 ms, all requests) of weir's route histogram."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{pb.WEIR_ADMIN}/metrics", timeout=5).read().decode()
    got = {}
    for line in text.splitlines():
        if line.startswith("weir_agent_request_duration_seconds_bucket") and 'route="default/bench"' in line:
            got[line.split('le="')[1].split('"')[0]] = float(line.split()[-1])
    return got.get("0.0005", 0.0), got.get("+Inf", 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=23000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=int, default=6)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--no-install", action="store_true")
    args = ap.parse_args()
    pb.ensure_tools(args.no_install)
    pb.build(args.no_build)
    d = tempfile.mkdtemp(prefix="weir-placement-")
    print("| round | proxy | placement | p50 (µs) | p99 (µs) | voluntary cs/req | involuntary cs/req | weir: heads ≤ 0.5 ms |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    try:
        origins = pb.start_http_fixture(d)
        for rnd in range(args.rounds):
            for name in ["nginx", "weir"]:
                for placement in ["free", "pinned"]:
                    p = pb.Nginx(d, 1) if name == "nginx" else pb.Weir(d, 1)
                    p.start()
                    try:
                        p.wait_ready()
                        pb.wrk(p.url(), 2)
                        pids, opids = p.pids(), pb.proc_tree(origins.pid)
                        pin(opids, "0-1")
                        if placement == "pinned":
                            pin(pids, "1")
                            pin(opids, "0")
                        s0 = switches(pids)
                        h0 = head_within_half_ms() if name == "weir" else None
                        lat = pb.weir_load(p.url(), args.rate, args.duration)
                        s1 = switches(pids)
                        n = max(lat["achieved_rps"] * args.duration, 1)
                        fast = "-"
                        if h0:
                            h1 = head_within_half_ms()
                            fast = f"{100 * (h1[0] - h0[0]) / max(h1[1] - h0[1], 1):.0f} %"
                        print(f"| {rnd + 1} | {name} | {placement} | {lat['p50_us']} | {lat['p99_us']} "
                              f"| {(s1[0] - s0[0]) / n:.2f} | {(s1[1] - s0[1]) / n:.2f} | {fast} |", flush=True)
                    finally:
                        p.stop()
    finally:
        pb.cleanup()


if __name__ == "__main__":
    main()
