#!/usr/bin/env python3
"""What this machine allows a proxy at all: the throughput ceiling of proxy_bench.py's setup.

proxy_bench.py's goal asks for 1.2x nginx's saturation throughput. This script measures
whether any proxy could reach that here, by measuring the parts of one proxied request
that are not the proxy's HTTP work:

    python3 tests/bench/ceiling.py                  # 3 rounds, after a release build
    python3 tests/bench/ceiling.py --rounds 5 --no-build

Per round, each of these proxies (N=1, same origins and load as proxy_bench.py) runs
`taskset -c 0 wrk -t1 -c64` for --duration seconds:
  * nginx and HAProxy (HTTP mode), as in proxy_bench.py;
  * HAProxy in TCP mode: a byte relay that parses nothing (each client connection gets its
    own upstream connection), i.e. a proxy whose HTTP work costs nothing;
  * weir-agent.
For each run it records the rate, the proxy's user and system CPU per request, and the
CPU per request of the load generator (wrk) and of the origin (nginx, 1 worker), and the
machine's busy share. The ceiling of the whole setup is then

    2 CPUs / (wrk + origin + proxy) CPU per request

and the best any proxy could do is the ceiling with the TCP relay's cost (kernel work of
four loopback messages per request, almost no user space). The table prints each proxy's
rate and that ceiling as ratios to nginx from the same round (medians).
"""

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hot_path as hp  # noqa: E402
import proxy_bench as pb  # noqa: E402

RELAY_PORT = 18110


class HaproxyTcp(pb.Haproxy):
    """HAProxy as a plain TCP relay over the same origins (round robin per connection)."""

    name = "haproxy-tcp"
    port = RELAY_PORT

    def start(self):
        servers = "\n".join(
            f"    server o{i} {ip}:{pb.ORIGIN_PORT}" for i, ip in enumerate(pb.ORIGIN_IPS)
        )
        conf = f"""
global
    nbthread {self.workers}
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind 127.0.0.1:{self.port}
    default_backend be
backend be
    balance roundrobin
{servers}
"""
        path = f"{self.d}/haproxy-tcp.cfg"
        with open(path, "w") as f:
            f.write(conf)
        self.proc = pb.start([pb.exe("haproxy"), "-db", "-f", path], f"{self.d}/haproxy-tcp.log")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--no-install", action="store_true")
    args = ap.parse_args()
    pb.ensure_tools(args.no_install)
    pb.build(args.no_build)
    d = tempfile.mkdtemp(prefix="weir-ceiling-")
    classes = [("nginx", pb.Nginx), ("haproxy", pb.Haproxy), ("haproxy-tcp", HaproxyTcp), ("weir", pb.Weir)]
    rows = {n: [] for n, _ in classes}
    try:
        origins = pb.start_http_fixture(d)
        for rnd in range(args.rounds):
            for name, cls in classes:
                p = cls(d, 1)
                p.start()
                try:
                    p.wait_ready()
                    pb.wrk(p.url(), 2)
                    pids, opids = p.pids(), pb.proc_tree(origins.pid)
                    u0, k0 = hp.cpu_split(pids)
                    o0, w0, m0 = pb.cpu_seconds(opids), pb.children_cpu(), pb.system_cpu()
                    w = pb.wrk(p.url(), args.duration)
                    u1, k1 = hp.cpu_split(pids)
                    o1, w1, m1 = pb.cpu_seconds(opids), pb.children_cpu(), pb.system_cpu()
                    n = w["requests"]
                    row = {
                        "rps": w["rps"],
                        "user_us": (u1 - u0) * 1e6 / n,
                        "sys_us": (k1 - k0) * 1e6 / n,
                        "origin_us": (o1 - o0) * 1e6 / n,
                        "wrk_us": (w1 - w0) * 1e6 / n,
                        "busy": (m1[0] - m0[0]) / max(m1[1] - m0[1], 1e-9),
                    }
                    row["total_us"] = row["user_us"] + row["sys_us"] + row["origin_us"] + row["wrk_us"]
                    rows[name].append(row)
                    pb.log(f"round {rnd + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
                finally:
                    p.stop()
    finally:
        pb.cleanup()

    ncpu = os.cpu_count() or 1

    def med(name, key):
        return statistics.median(r[key] for r in rows[name])

    def ratio(name, f):
        return statistics.median(f(r) / b["rps"] for r, b in zip(rows[name], rows["nginx"]))

    print(f"| proxy (N=1) | rps | × nginx | proxy user µs/req | proxy system µs/req | wrk µs/req "
          f"| origin µs/req | machine busy | ceiling {ncpu} CPUs / total (× nginx) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, _ in classes:
        print(
            f"| {name} | {med(name, 'rps'):.0f} | {ratio(name, lambda r: r['rps']):.2f} "
            f"| {med(name, 'user_us'):.1f} | {med(name, 'sys_us'):.1f} | {med(name, 'wrk_us'):.1f} "
            f"| {med(name, 'origin_us'):.1f} | {100 * med(name, 'busy'):.0f} % "
            f"| {ratio(name, lambda r: ncpu * 1e6 / r['total_us']):.2f} |"
        )
    relay = ratio("haproxy-tcp", lambda r: ncpu * 1e6 / r["total_us"])
    print(f"\nA proxy that did no HTTP work at all (the TCP relay's cost) could reach at most "
          f"{relay:.2f}x nginx's rate on this machine (goal: 1.20x).")


if __name__ == "__main__":
    main()
