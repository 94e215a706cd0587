#!/usr/bin/env python3
"""gRPC unary calls: weir-agent (h2c upstream) vs nginx grpc_pass over 3 tonic echo servers.

Usage (root, from anywhere in the repo; installs nginx-light and wrk from Debian if missing,
builds the release binaries, cleans up every process it starts):

    python3 tests/bench/grpc_bench.py                      # K=1 and K=8 connections, 3 rounds
    python3 tests/bench/grpc_bench.py --conns 1 --rounds 5 --workers 1

Method (helpers shared with tests/bench/proxy_bench.py: processes, /proc CPU and RSS,
noise accounting):
  * endpoints: 3 `weir-echo-grpc` (tonic, one current-thread runtime each) on
    127.0.79.{1,2,3}:18290;
  * proxies, both with N workers (default 2 = the machine's cores):
      - nginx: worker_processes N, `listen 127.0.0.1:18301 http2` (h2c), `grpc_pass
        grpc://echo` to an upstream of the 3 endpoints with `keepalive 64` (nginx opens one
        upstream HTTP/2 connection per call in flight and reuses it), keepalive_requests
        10M on both sides;
      - weir: weir-agent --workers N, a RoundRobin TrafficPolicy for host `echo` over a
        Service whose port has `appProtocol: kubernetes.io/h2c` (multiplexed upstream
        connections per endpoint per worker, another opened when one's streams are full);
  * load: `weir-grpc-load` (tonic client, one current-thread runtime, pinned with
    `taskset -c 0`), unary Echo calls with a 64-byte payload, K client HTTP/2 connections:
      - saturation: closed loop, 64 calls in flight over K connections for 10 s (after a 2 s
        warm-up run): calls/s, CPU seconds of the proxy's processes per 100k calls;
      - latency: open loop at R = half of nginx's saturation calls/s (same round, same K)
        for 10 s, each call timed from its scheduled start: p50/p99;
  * per round both proxies run side by side (idle while the other is measured); for each K:
    saturation of each (order alternating between rounds), then latency of each at the rate
    from nginx's saturation in that round; the table shows medians, and medians of per-round
    ratios to nginx.

Before the first measurement it waits (up to --wait-idle s) until no proxy_bench.py runs and
the 1-minute load average is below 1.0; before each run, until other processes use ≤ 10 %
of the machine (up to --wait-quiet s). Other processes' CPU during each run is recorded.
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import proxy_bench as pb  # noqa: E402
from cache_bench import wait_idle_machine  # noqa: E402

log = pb.log
EP_IPS = ["127.0.79.1", "127.0.79.2", "127.0.79.3"]
EP_PORT = 18290
PORTS = {"nginx": 18301, "weir": 18303}
WEIR_ADMIN = 18304
CTRL_GRPC = 18305
CTRL_ADMIN = 18306
HOST = "echo"


def grpc_load(port, conns, seconds, rate=None, concurrency=64, warmup=1, cpu="0"):
    cmd = ["taskset", "-c", cpu, f"{pb.BIN}/weir-grpc-load", "--url", f"http://127.0.0.1:{port}", "--host", HOST,
           "--connections", str(conns), "--concurrency", str(concurrency), "--duration", f"{seconds}s",
           "--warmup", f"{warmup}s"]
    if rate:
        cmd += ["--rate", f"{rate:.0f}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def start_endpoints(d):
    procs = []
    for i, ip in enumerate(EP_IPS):
        p = pb.start([f"{pb.BIN}/weir-echo-grpc", "--listen", f"{ip}:{EP_PORT}", "--name", f"e{i + 1}"], f"{d}/echo-{i + 1}.log")
        procs.append(p)
    for i, p in enumerate(procs):
        pb.wait_until(lambda i=i: "listening" in open(f"{d}/echo-{i + 1}.log").read(), 10, f"echo {i + 1}", p)
    return procs


class Proxy:
    name = "?"

    def __init__(self, d, workers):
        self.d, self.workers, self.proc = d, workers, None
        self.port = PORTS[self.name]

    def pids(self):
        return pb.proc_tree(self.proc.pid)

    def wait_ready(self):
        deadline = time.time() + 30
        while True:
            try:
                r = grpc_load(self.port, 1, 0.2, concurrency=1, warmup=0)
                if r["ok"] > 0 and r["errors"] == 0:
                    return
            except (subprocess.CalledProcessError, ValueError, IndexError):
                pass
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} not answering gRPC calls")
            time.sleep(0.2)

    def stop(self):
        if self.proc:
            pb.stop(self.proc)
            self.proc = None


class Nginx(Proxy):
    name = "nginx"

    def start(self):
        servers = "\n".join(f"        server {ip}:{EP_PORT};" for ip in EP_IPS)
        conf = pb.nginx_conf(self.d, f"grpc-nginx-{self.workers}", self.workers, f"""
    upstream echo {{
{servers}
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{self.port} http2 reuseport;
        http2_max_concurrent_streams 1024;
        location / {{
            grpc_pass grpc://echo;
        }}
    }}""")
        self.proc = pb.start_nginx(self.d, f"grpc-nginx-{self.workers}", conf)


class Weir(Proxy):
    name = "weir"

    @staticmethod
    def manifests(cfg):
        os.makedirs(cfg, exist_ok=True)
        eps = "".join(f'  - addresses: ["{ip}"]\n    conditions: {{ready: true}}\n' for ip in EP_IPS)
        with open(f"{cfg}/echo.yaml", "w") as f:
            # The Service as tests/src/manifests.rs::service_h2c writes it.
            f.write(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: default\nspec:\n  ports:\n"
                "    - port: 80\n      appProtocol: kubernetes.io/h2c\n---\n"
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: default\n"
                "  labels:\n    kubernetes.io/service-name: echo\naddressType: IPv4\nports:\n"
                f"  - port: {EP_PORT}\nendpoints:\n{eps}---\n"
                "apiVersion: weir.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: echo\n  namespace: default\n"
                f'spec:\n  hosts: ["{HOST}"]\n  loadBalancer: {{algorithm: RoundRobin}}\n'
                "  rules:\n    - backendRefs: [{name: echo, port: 80}]\n"
            )

    def start(self):
        self.proc = pb.start(
            [f"{pb.BIN}/weir-agent", "--controller", f"http://127.0.0.1:{CTRL_GRPC}", "--listen",
             f"127.0.0.1:{self.port}", "--admin-addr", f"127.0.0.1:{WEIR_ADMIN}", "--node-name", "bench",
             "--workers", str(self.workers)],
            f"{self.d}/agent-{self.workers}.log",
            env=dict(os.environ, WEIR_LOG="warn"),
        )
        pb.wait_until(lambda: pb.http_get(f"http://127.0.0.1:{WEIR_ADMIN}/readyz")[0] == 200, 30, "weir-agent ready", self.proc)


CLASSES = {"nginx": Nginx, "weir": Weir}


def saturation(p, k, args, eps):
    pb.wait_quiet(args.wait_quiet)
    grpc_load(p.port, k, args.warmup, concurrency=args.concurrency, warmup=0)
    pids = p.pids()
    epids = [x for e in eps for x in pb.proc_tree(e.pid)]
    f0, e0, c0 = pb.others_cpu(), pb.cpu_seconds(epids), pb.cpu_seconds(pids)
    sat = grpc_load(p.port, k, args.duration, concurrency=args.concurrency, warmup=0)
    c1, e1 = pb.cpu_seconds(pids), pb.cpu_seconds(epids)
    foreign = pb.foreign_since(f0)
    rss, _ = pb.mem_kb(pids)
    calls = sat["ok"]
    r = {"proxy": p.name, "workers": p.workers, "conns": k, "cps": sat["calls_per_s"], "calls": calls,
         "sat_errors": sat["errors"], "sat_p50_us": sat["p50_us"], "sat_p99_us": sat["p99_us"],
         "cpu_s": c1 - c0, "cpu_per_100k": (c1 - c0) / max(calls / 1e5, 1e-9), "endpoint_cpu_s": e1 - e0,
         "rss_kb": rss, "foreign_cpu_s": foreign}
    log(f"  {p.name:5} N={p.workers} K={k}: {sat['calls_per_s']:8.0f} calls/s cpu/100k {r['cpu_per_100k']:.2f}s "
        f"endpoints cpu {r['endpoint_cpu_s']:.1f}s err {sat['errors']} foreign {foreign:.1f}s")
    return r


def latency(p, k, args, rate, r):
    pb.wait_quiet(args.wait_quiet)
    pids = p.pids()
    f0, c0 = pb.others_cpu(), pb.cpu_seconds(pids)
    lat = grpc_load(p.port, k, args.lat_duration, rate=rate, warmup=1)
    r["lat_proxy_cpu_s"] = pb.cpu_seconds(pids) - c0
    r["lat_foreign_cpu_s"] = pb.foreign_since(f0)
    r["lat"], r["lat_rate"] = lat, rate
    r["p50_us"], r["p99_us"] = lat["p50_us"], lat["p99_us"]
    r["overloaded"] = lat["achieved_rps"] < 0.95 * rate or lat.get("unfinished", 0) > 0
    log(f"  {p.name:5} N={p.workers} K={k}: @{rate:.0f}/s p50 {lat['p50_us']} us p99 {lat['p99_us']} us "
        f"(achieved {lat['achieved_rps']:.0f}, err {lat['errors']}, lag p99 {lat['sched_lag_p99_us']} us, "
        f"foreign {r['lat_foreign_cpu_s']:.1f}s)")


def table(results, conns, names):
    med, fmt = pb.med, pb.fmt
    lines = ["| proxy | client conns | calls/s | × nginx | p50 (µs) | × nginx | p99 (µs) | × nginx "
             "| CPU s / 100k calls | × nginx | RSS after (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    summary = {}
    for k in conns:
        rows = [r for r in results if r["conns"] == k]
        by_round = {}
        for r in rows:
            by_round.setdefault(r["round"], {})[r["proxy"]] = r
        for name in names:
            runs = [r for r in rows if r["proxy"] == name]
            if not runs:
                continue

            def ratio(key):
                return med([rr[name][key] / rr["nginx"][key] for rr in by_round.values()
                            if name in rr and "nginx" in rr and rr["nginx"].get(key)])

            row = {"cps": med([r["cps"] for r in runs]), "cps_x": ratio("cps"), "p50": med([r["p50_us"] for r in runs]),
                   "p50_x": ratio("p50_us"), "p99": med([r["p99_us"] for r in runs]), "p99_x": ratio("p99_us"),
                   "cpu": med([r["cpu_per_100k"] for r in runs]), "cpu_x": ratio("cpu_per_100k"),
                   "rss": med([r["rss_kb"] for r in runs]) / 1024}
            over = sum(1 for r in runs if r.get("overloaded"))
            mark = f" †{over}" if over else ""
            summary[(name, k)] = row
            lines.append(f"| {name} | {k} | {fmt(row['cps'])} | {fmt(row['cps_x'], 2)} | {fmt(row['p50'])}{mark} "
                         f"| {fmt(row['p50_x'], 2)} | {fmt(row['p99'])}{mark} | {fmt(row['p99_x'], 2)} "
                         f"| {fmt(row['cpu'], 2)} | {fmt(row['cpu_x'], 2)} | {fmt(row['rss'], 1)} |")
    return "\n".join(lines), summary


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", default="1,8", help="client HTTP/2 connections (comma-separated)")
    ap.add_argument("--concurrency", type=int, default=64, help="calls in flight in the closed loop")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--proxies", default="nginx,weir")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--lat-duration", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--wait-quiet", type=float, default=20)
    ap.add_argument("--wait-idle", type=float, default=180)
    ap.add_argument("--nice", type=int, default=-10)
    ap.add_argument("--no-install", action="store_true")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--json", default="/tmp/weir-grpc-bench.json")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--bin-dir", default=pb.BIN)
    args = ap.parse_args()
    conns = [int(x) for x in args.conns.split(",")]
    names = [x for x in args.proxies.split(",") if x]
    if names[0] != "nginx":
        sys.exit("--proxies must start with nginx (the reference and the source of the fixed rate)")
    pb.NICE = args.nice
    if pb.NICE:
        try:
            os.nice(pb.NICE)
            try:
                os.setsid()
            except OSError:
                pass
            pb.set_autogroup_nice(os.getpid())
        except PermissionError:
            pb.NICE = 0
    signal.signal(signal.SIGINT, pb.on_signal)
    signal.signal(signal.SIGTERM, pb.on_signal)
    if not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")) and not args.no_install:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light"], check=True, env=env)
    pb.build(args.no_build)
    d = tempfile.mkdtemp(prefix="weir-grpc-bench-")
    log(f"work dir {d}")
    os.makedirs(f"{d}/bin")
    for b in ["weir-grpc-load", "weir-echo-grpc", "weir-agent", "weir-controller"]:
        shutil.copy2(f"{os.path.abspath(args.bin_dir)}/{b}", f"{d}/bin/{b}")
    pb.BIN = f"{d}/bin"
    started = datetime.datetime.now(datetime.timezone.utc)
    results, idle = [], None
    try:
        eps = start_endpoints(d)
        if "weir" in names:
            Weir.manifests(f"{d}/config")
            pb.Weir.start_controller(d, f"{d}/config", grpc=CTRL_GRPC, admin=CTRL_ADMIN)
        idle = wait_idle_machine(args.wait_idle)
        for rnd in range(1, args.rounds + 1):
            order = names if rnd % 2 else list(reversed(names))
            log(f"round {rnd}/{args.rounds}, order {order}")
            procs = [CLASSES[name](d, args.workers) for name in order]
            try:
                for p in procs:
                    p.start()
                for p in procs:
                    p.wait_ready()
                for k in conns:
                    runs = {}
                    for p in procs:
                        runs[p.name] = saturation(p, k, args, eps)
                        runs[p.name]["round"] = rnd
                    rate = runs["nginx"]["cps"] / 2
                    for p in procs:
                        latency(p, k, args, rate, runs[p.name])
                    results.extend(runs.values())
            finally:
                for p in procs:
                    p.stop()
    finally:
        pb.cleanup()
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)

    tbl, summary = table(results, conns, names)
    with open(args.json, "w") as f:
        json.dump({"started": started.isoformat(), "args": vars(args), "idle_before": idle, "runs": results}, f, indent=1)
    cmd = "python3 tests/bench/grpc_bench.py " + " ".join(sys.argv[1:])
    print(f"### gRPC unary ({started:%Y-%m-%d %H:%M} UTC, `{cmd.strip()}`)\n")
    print(f"Medians of {args.rounds} interleaved rounds; × nginx = median of per-round ratios. N={args.workers} workers "
          f"each. Saturation: weir-grpc-load closed loop, {args.concurrency} calls in flight, {args.duration}s, on CPU 0; "
          f"latency: open loop at half of nginx's saturation calls/s, {args.lat_duration}s.\n")
    print(tbl)
    if any(r.get("overloaded") for r in results):
        print("\n† k: in k rounds the proxy did not keep up with the fixed rate (percentiles measure a queue).")
    if "weir" in names:
        print("\nGoals (weir):")
        for k in conns:
            w = summary.get(("weir", k))
            if w:
                print(f"- K={k}: calls/s {pb.fmt(w['cps_x'], 2)}× nginx (goal ≥ 1.20) {'✓' if w['cps_x'] and w['cps_x'] >= 1.2 else '✗'}; "
                      f"p99 {pb.fmt(w['p99_x'], 2)}× nginx (goal ≤ 1.00) {'✓' if w['p99_x'] and w['p99_x'] <= 1.0 else '✗'}")
    noise = [max(r["foreign_cpu_s"] / (2 * args.duration), r["lat_foreign_cpu_s"] / (2 * (args.lat_duration + 1))) for r in results]
    if noise:
        print(f"\nNoise: CPU share of other processes during a run: median {pb.med(noise):.0%}, max {max(noise):.0%}; "
              f"before the first run: load1 {idle['load1']:.2f}, proxy_bench.py running: {idle['proxy_bench_running']}.")
    errs = [r for r in results if r["sat_errors"] or r["lat"]["errors"]]
    if errs:
        print("\nErrors: " + ", ".join(f"{r['proxy']} K={r['conns']} r{r['round']}: sat {r['sat_errors']}, lat {r['lat']['errors']}" for r in errs))
    log(f"raw results: {args.json}")


if __name__ == "__main__":
    main()
