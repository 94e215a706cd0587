#!/usr/bin/env python3
"""A/B of weir-agent builds, side by side with nginx, for deciding whether a change helps.

proxy_bench.py and grpc_bench.py produce the reported tables; this is the quick loop used
while changing the hot path: several agent builds (each a directory holding weir-agent and
weir-controller, e.g. copies of target/release from before and after a change) are run in
alternating order in the same session, against the same origins, with nginx as the
reference, and the medians per build are printed.

    python3 tests/bench/ab.py http --builds before=/tmp/a,after=target/release
    python3 tests/bench/ab.py grpc --builds before=/tmp/a,after=target/release --conns 1,8
    python3 tests/bench/ab.py http --builds x=target/release --no-nginx --rate 20000

Per run: saturation (wrk -c64 for HTTP/1.1, closed-loop weir-grpc-load with 64 calls in
flight for gRPC) with CPU µs per request of the proxy's processes and syscalls and context
switches per request (perf stat, if perf is installed); then the
open-loop latency at --rate (default: half of the first nginx saturation figure).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grpc_bench as gb  # noqa: E402
import proxy_bench as pb  # noqa: E402


def perf_counts(pids, seconds):
    """Starts `perf stat` of syscalls and context switches on `pids`; returns the process."""
    if not shutil.which("perf"):
        return None
    return subprocess.Popen(
        ["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter,context-switches",
         "-p", ",".join(map(str, pids)), "--", "sleep", str(seconds)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def perf_result(proc, requests):
    if not proc:
        return ""
    counts = [float(line.split(",")[0]) for line in proc.communicate()[1].splitlines()
              if line[:1].isdigit()]
    if len(counts) < 2 or not requests:
        return ""
    return f" syscalls/req {counts[0] / requests:.2f} cs/req {counts[1] / requests:.2f}"


def run_http(p, args, rate, res, label):
    pb.wrk(p.url(), 2)
    pids = p.pids()
    stat = perf_counts(pids, args.duration - 1)
    c0 = pb.cpu_seconds(pids)
    s = pb.wrk(p.url(), args.duration)
    c1 = pb.cpu_seconds(pids)
    extra = perf_result(stat, s["rps"] * (args.duration - 1))
    rate = rate or s["rps"] / 2
    lat = pb.weir_load(p.url(), rate, args.duration)
    cpu = (c1 - c0) * 1e6 / s["requests"]
    record(res, label, "-", s["rps"], cpu, lat)
    return rate, f"sat {s['rps']:7.0f}/s cpu/req {cpu:5.1f}us{extra} | @{rate:.0f}/s " + lat_text(lat)


def run_grpc(p, args, rate, res, label, k):
    gb.grpc_load(p.port, k, 2, concurrency=64, warmup=0)
    pids = p.pids()
    stat = perf_counts(pids, args.duration - 1)
    c0 = pb.cpu_seconds(pids)
    s = gb.grpc_load(p.port, k, args.duration, concurrency=64, warmup=0)
    c1 = pb.cpu_seconds(pids)
    extra = perf_result(stat, s["calls_per_s"] * (args.duration - 1))
    rate = rate or s["calls_per_s"] / 2
    lat = gb.grpc_load(p.port, k, args.duration, rate=rate, warmup=1)
    cpu = (c1 - c0) * 1e6 / max(s["ok"], 1)
    record(res, label, k, s["calls_per_s"], cpu, lat)
    return rate, f"sat {s['calls_per_s']:7.0f}/s cpu/call {cpu:5.1f}us{extra} | @{rate:.0f}/s " + lat_text(lat)


def lat_text(lat):
    return f"p50 {lat['p50_us']:5} p99 {lat['p99_us']:6} (generator lag p99 {lat['sched_lag_p99_us']} us)"


def record(res, label, k, sat, cpu, lat):
    for key, v in [("sat", sat), ("cpu_us", cpu), ("p50_us", lat["p50_us"]), ("p99_us", lat["p99_us"])]:
        res.setdefault((k, label, key), []).append(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["http", "grpc"])
    ap.add_argument("--builds", required=True, help="label=dir,... (each dir holds weir-agent and weir-controller)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--rate", type=float, default=0, help="open-loop rate (0: half of nginx's saturation)")
    ap.add_argument("--conns", default="1,8", help="grpc: client connections")
    ap.add_argument("--no-nginx", action="store_true")
    args = ap.parse_args()
    builds = [b.split("=", 1) for b in args.builds.split(",")]
    # weir-load, weir-grpc-load and weir-echo-grpc come from the first build's directory
    # if it has them, else from target/release.
    pb.BIN = builds[0][1] if os.path.exists(f"{builds[0][1]}/weir-load") else pb.BIN
    pb.ensure_tools(False)
    d = tempfile.mkdtemp(prefix="weir-ab-")
    res, rates = {}, {}
    conns = [int(k) for k in args.conns.split(",")] if args.mode == "grpc" else ["-"]
    tools = pb.BIN
    try:
        if args.mode == "http":
            pb.start_http_fixture(d)
        else:
            gb.start_endpoints(d)
            gb.Weir.manifests(f"{d}/config")
            pb.Weir.start_controller(d, f"{d}/config", grpc=gb.CTRL_GRPC, admin=gb.CTRL_ADMIN)
        for rnd in range(args.rounds):
            order = builds if rnd % 2 == 0 else builds[::-1]
            runs = ([] if args.no_nginx else [("nginx", None)]) + order
            for label, bin_dir in runs:
                pb.BIN = bin_dir or tools
                if args.mode == "http":
                    p = pb.Weir(d, args.workers) if bin_dir else pb.Nginx(d, args.workers)
                else:
                    p = gb.Weir(d, args.workers) if bin_dir else gb.Nginx(d, args.workers)
                p.start()
                pb.BIN = tools  # load generators
                try:
                    p.wait_ready()
                    for k in conns:
                        if args.mode == "http":
                            r, text = run_http(p, args, args.rate or rates.get(k), res, label)
                        else:
                            r, text = run_grpc(p, args, args.rate or rates.get(k), res, label, k)
                        rates.setdefault(k, r)  # the first run (nginx unless --no-nginx) sets it
                        print(f"round {rnd + 1} {label:>8} K={k}: {text}", flush=True)
                finally:
                    p.stop()
        print("\nmedians:")
        for key in sorted(res, key=str):
            print(f"  K={key[0]} {key[1]:>8} {key[2]:>7}: {statistics.median(res[key]):.1f}")
    finally:
        pb.cleanup()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
