#!/usr/bin/env python3
"""CPU time per proxied request (user and kernel): weir-agent vs nginx vs HAProxy.

A quick companion to proxy_bench.py (same origins, same proxy configs, same wrk load, N=1)
for iterating on the hot path. Throughput and latency swing with whatever else the machine
is doing; the CPU a proxy spends per request swings much less, so it is the figure to watch
while optimizing on a shared machine. (Instruction counts would be steadier still, but this
VM exposes no hardware counters to perf.) It is not a substitute for proxy_bench.py's
throughput and latency table.

    python3 tests/bench/insn_bench.py                  # 2 rounds of 5 s each, N=1
    python3 tests/bench/insn_bench.py --rounds 3 --duration 8 --profile weir

User and system CPU time of every process of the proxy (utime/stime from /proc) over the wrk
run; the table gives per-request medians over the rounds. --profile NAME adds a
`perf record` of that proxy (report in the work dir, kept with --keep).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--proxies", default="nginx,haproxy,weir")
    ap.add_argument("--profile", default="", help="perf record this proxy in the last round")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--bin-dir", default=pb.BIN, help="where weir-agent and weir-controller are")
    args = ap.parse_args()
    pb.BIN = os.path.abspath(args.bin_dir)
    if args.profile:
        pb.ensure_perf(False)
    pb.ensure_tools(False)
    pb.build(args.no_build)
    d = tempfile.mkdtemp(prefix="weir-insn-")
    os.makedirs(f"{d}/bin")
    for b in ["weir-agent", "weir-controller"]:
        shutil.copy2(f"{pb.BIN}/{b}", f"{d}/bin/{b}")
    pb.BIN = f"{d}/bin"
    names = [n for n in args.proxies.split(",") if n]
    classes = {"nginx": pb.Nginx, "haproxy": pb.Haproxy, "weir": pb.Weir}
    rows = {n: [] for n in names}
    try:
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
                            ["perf", "record", "-F", "499", "--call-graph", "dwarf,32768", "-p", ",".join(map(str, pids)),
                             "-o", f"{d}/perf-{n}.data", "--", "sleep", str(args.duration)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        )
                    w = pb.wrk(p.url(), args.duration)
                    u1, k1 = cpu_split(pids)
                    if rec:
                        rec.wait()
                        with open(f"{d}/perf-{n}.txt", "w") as f:
                            subprocess.run(
                                ["perf", "report", "-i", f"{d}/perf-{n}.data", "--stdio", "--no-children",
                                 "-g", "none", "--percent-limit", "0.5"], stdout=f, stderr=subprocess.DEVNULL)
                        pb.log(f"profile: {d}/perf-{n}.txt")
                    reqs = w["requests"]
                    rows[n].append({
                        "rps": w["rps"],
                        "user_us": (u1 - u0) * 1e6 / reqs,
                        "sys_us": (k1 - k0) * 1e6 / reqs,
                    })
                    pb.log(f"round {rnd + 1} {n}: {rows[n][-1]}")
                finally:
                    p.stop()
        pb.stop(origins)
    finally:
        pb.cleanup()
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)

    med = lambda n, k: statistics.median(r[k] for r in rows[n])  # noqa: E731
    print("| proxy (N=1) | rps | user µs/req | system µs/req | CPU × first |")
    print("|---|---|---|---|---|")
    base = med(names[0], "user_us") + med(names[0], "sys_us")
    for n in names:
        u, k = med(n, "user_us"), med(n, "sys_us")
        print(f"| {n} | {med(n, 'rps'):.0f} | {u:.1f} | {k:.1f} | {(u + k) / base:.2f} |")


if __name__ == "__main__":
    main()
