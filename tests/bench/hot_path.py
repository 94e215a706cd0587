#!/usr/bin/env python3
"""The proxy's cost per request, for iterating on the hot path on a shared machine.

A companion to proxy_bench.py (same origins, same proxy configs, N=1), not a substitute for
its throughput and latency table. Two measurements:

    python3 tests/bench/hot_path.py insn        # instructions per request of weir-agent
    python3 tests/bench/hot_path.py insn --bin-dir /tmp/old   # ... of another build
    python3 tests/bench/hot_path.py grpc-insn   # instructions per unary gRPC call (h2c upstream)
    python3 tests/bench/hot_path.py cpu         # CPU µs per request: nginx, HAProxy, weir
    python3 tests/bench/hot_path.py cpu --profile weir --keep  # + perf record (DWARF stacks)

* `insn` runs weir-agent under callgrind (valgrind, installed with apt-get if missing),
  zeroes the counters after a warm-up, sends wrk load (8 connections, 10 s) and divides the
  instructions the agent executed by the requests wrk completed. The count barely moves
  between runs or with other load on the machine (the VM exposes no hardware counters, so
  `perf stat -e instructions` is not an option), which makes it the figure to compare two
  builds with. It also prints the functions with the most self cost per request. nginx
  cannot be measured this way (callgrind_control cannot reach its worker), so the
  comparison with nginx is the `cpu` mode's.
* `cpu` attaches to every process of each proxy and takes user and system CPU time
  (/proc utime/stime) over a wrk run, per request; medians over --rounds.
"""

import argparse
import collections
import glob
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grpc_bench as gb  # noqa: E402
import proxy_bench as pb  # noqa: E402


def cpu_split(pids):
    """(user, system) CPU seconds of `pids`."""
    u = k = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                st = f.read()
            fields = st[st.rindex(")") + 2:].split()
            u, k = u + int(fields[11]), k + int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    return u / pb.CLK_TCK, k / pb.CLK_TCK


def self_costs(path):
    """Self cost per function from a callgrind output file (name-compressed format)."""
    names, cost = {}, collections.Counter()
    fn, after_call = None, False

    def name(tag):
        m = re.match(r"\((\d+)\)(?: (.*))?", tag)
        if not m:
            return tag
        if m.group(2):
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), m.group(1))

    total = 0
    for line in open(path, errors="ignore"):
        if line.startswith("fn="):
            fn = name(line[3:].strip())
        elif line.startswith("cfn="):
            name(line[4:].strip())
        elif line.startswith("calls="):
            after_call = True  # the next cost line is the call's inclusive cost
        elif line[:1].isdigit() or line[:1] in "+-*":
            parts = line.split()
            if len(parts) >= 2:
                if after_call:
                    after_call = False
                    continue
                cost[fn] += int(parts[1])
                total += int(parts[1])
    return total, cost


def insn(args, d):
    if not shutil.which("valgrind"):
        pb.log("installing valgrind from Debian")
        subprocess.run(["apt-get", "install", "-y", "-qq", "valgrind"], check=True)
    out = f"{d}/callgrind"
    os.makedirs(out)
    grpc = args.mode == "grpc-insn"
    if grpc:
        gb.start_endpoints(d)
        gb.Weir.manifests(f"{d}/config")
        pb.Weir.start_controller(d, f"{d}/config", grpc=gb.CTRL_GRPC, admin=gb.CTRL_ADMIN)
        agent = gb.Weir(d, 1)
    else:
        pb.start_http_fixture(d)
        agent = pb.Weir(d, 1)
    plain_start = pb.start
    pb.start = lambda cmd, logfile, **kw: plain_start(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.%p", *cmd], logfile, **kw)
    try:
        agent.start()
    finally:
        pb.start = plain_start
    if grpc:
        agent.wait_ready()

        def load(seconds):  # closed loop, 16 calls in flight on one connection
            return gb.grpc_load(agent.port, 1, seconds, concurrency=16, warmup=0)["ok"]
    else:
        pb.wait_until(lambda: pb.http_get(agent.url(), pb.HOST, timeout=10)[0] == 200, 120, "agent", agent.proc)

        def load(seconds):
            return pb.wrk(agent.url(), seconds, connections=8)["requests"]
    load(3)
    subprocess.run(["callgrind_control", "-z", str(agent.proc.pid)], capture_output=True, check=True)
    reqs = load(args.duration)
    subprocess.run(["callgrind_control", "-d", "measured", str(agent.proc.pid)], capture_output=True, check=True)
    agent.stop()
    dumps = [f for f in glob.glob(f"{out}/cg.*") if f.endswith(".1")]
    total, cost = self_costs(dumps[0])
    what = "call" if grpc else "request"
    print(f"weir-agent: {total / reqs:.0f} instructions per {what} ({reqs} {what}s, {dumps[0]})\n")
    print(f"| instructions/{what} | share | function (self cost) |\n|---|---|---|")
    for f, c in cost.most_common(args.top):
        print(f"| {c / reqs:.0f} | {100 * c / total:.1f} % | `{f[:110]}` |")


def cpu(args, d):
    names = [n for n in args.proxies.split(",") if n]
    classes = {"nginx": pb.Nginx, "haproxy": pb.Haproxy, "weir": pb.Weir}
    rows = {n: [] for n in names}
    origins = pb.start_origins(d, 1)
    if "weir" in names:
        pb.weir_manifests(f"{d}/config", 1)
        pb.Weir.controller = pb.Weir.start_controller(d, f"{d}/config")
    for rnd in range(args.rounds):
        for n in names:
            p = classes[n](d, 1)
            p.start()
            try:
                p.wait_ready()
                pb.wrk(p.url(), 1)
                pids = p.pids()
                u0, k0 = cpu_split(pids)
                rec = None
                if n == args.profile and rnd == args.rounds - 1:
                    rec = subprocess.Popen(
                        ["perf", "record", "-F", "499", "--call-graph", "dwarf,32768",
                         "-p", ",".join(map(str, pids)), "-o", f"{d}/perf-{n}.data", "--",
                         "sleep", str(args.duration)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )
                w = pb.wrk(p.url(), args.duration)
                u1, k1 = cpu_split(pids)
                if rec:
                    rec.wait()
                    pb.log(f"profile: perf report -i {d}/perf-{n}.data")
                reqs = w["requests"]
                rows[n].append({"rps": w["rps"], "user_us": (u1 - u0) * 1e6 / reqs,
                                "sys_us": (k1 - k0) * 1e6 / reqs})
                pb.log(f"round {rnd + 1} {n}: {rows[n][-1]}")
            finally:
                p.stop()
    pb.stop(origins)

    def med(n, k):
        return statistics.median(r[k] for r in rows[n])

    print("| proxy (N=1) | rps | user µs/req | system µs/req | CPU × first |\n|---|---|---|---|---|")
    base = med(names[0], "user_us") + med(names[0], "sys_us")
    for n in names:
        u, k = med(n, "user_us"), med(n, "sys_us")
        print(f"| {n} | {med(n, 'rps'):.0f} | {u:.1f} | {k:.1f} | {(u + k) / base:.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["insn", "grpc-insn", "cpu"])
    ap.add_argument("--rounds", type=int, default=2, help="cpu: rounds")
    ap.add_argument("--duration", type=int, default=10, help="seconds of measured load")
    ap.add_argument("--proxies", default="nginx,haproxy,weir", help="cpu: proxies, the first is the reference")
    ap.add_argument("--profile", default="", help="cpu: perf record this proxy in the last round")
    ap.add_argument("--top", type=int, default=25, help="insn: functions listed")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--bin-dir", default=pb.BIN, help="where weir-agent and weir-controller are")
    args = ap.parse_args()
    pb.BIN = os.path.abspath(args.bin_dir)
    if args.profile:
        pb.ensure_perf(False)
    pb.ensure_tools(False)
    pb.build(args.no_build)
    d = tempfile.mkdtemp(prefix="weir-hot-path-")
    # Snapshot the binaries: a concurrent `cargo build` must not swap them mid-run.
    os.makedirs(f"{d}/bin")
    for b in ["weir-agent", "weir-controller", "weir-grpc-load", "weir-echo-grpc"]:
        if os.path.exists(f"{pb.BIN}/{b}"):
            shutil.copy2(f"{pb.BIN}/{b}", f"{d}/bin/{b}")
    pb.BIN = f"{d}/bin"
    try:
        (cpu if args.mode == "cpu" else insn)(args, d)
    finally:
        pb.cleanup()
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
