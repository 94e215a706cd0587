#!/usr/bin/env python3
"""Cache hit path: weir-agent (spec.cache) vs Varnish vs nginx proxy_cache, every request a hit.

Usage (root, from anywhere in the repo; installs varnish, nginx-light and wrk from Debian if
they are missing, builds the release binaries, cleans up every process it starts):

    python3 tests/bench/cache_bench.py                     # N=1 and N=2, 3 rounds, 128 B object
    python3 tests/bench/cache_bench.py --objects small,4k  # both objects (twice as long)
    python3 tests/bench/cache_bench.py --workers 1 --rounds 5

Method (helpers shared with tests/bench/proxy_bench.py: processes, /proc CPU and RSS,
noise accounting, wrk and weir-load wrappers):
  * origin: one nginx (1 worker) on 127.0.78.1:18190 serving the static files /small (128 B)
    and /4k (4096 B) with `Cache-Control: max-age=3600` (plus nginx's ETag/Last-Modified),
    keep-alive;
  * caches under test, all in front of that origin with upstream keep-alive, N workers:
      - nginx: worker_processes N, proxy_cache (proxy_cache_path in the work dir under /tmp,
        keys_zone 16m, max_size 64m), proxy_cache_valid 200 1h, upstream keepalive 64,
        `add_header X-Cache-Status $upstream_cache_status`, sendfile on (Debian's default);
      - varnish: varnishd -F -s malloc,64m, -p thread_pools=N (one pool per worker, the
        knob closest to a worker count; Varnish is thread-per-connection so each pool keeps
        ≥ 100 threads for the 64 connections), and with N=1 the whole varnishd pinned to one
        CPU with taskset (N=2: the two CPUs) so it cannot use more cores than the others;
        VCL: the backend plus `X-Cache: HIT|MISS` (obj.hits) in vcl_deliver;
      - weir: weir-agent --workers N, one TrafficPolicy with `cache: {enabled: true,
        maxSize: 64Mi}` over a Service with the origin as its only endpoint (local-mode
        weir-controller);
  * per (round, N) all three are started, warmed (each object fetched until it is a hit,
    checked: weir `x-cache: HIT`, nginx `X-Cache-Status: HIT`, varnish `X-Varnish` with two
    ids), then for each object
      - saturation, one cache after the other: 2 s wrk warm-up, then
        `taskset -c 0 wrk -t1 -c64 -d10s` (CPU seconds of the cache's processes from
        /proc/<pid>/stat per 100k requests; origin CPU during the run shows it was not asked),
      - latency: `taskset -c 0 weir-load -c 64` open loop for 10 s at R = half of the faster
        of nginx's and varnish's saturation rps from the same round and N;
    the order of the three rotates from round to round;
  * table: medians over rounds of absolute values and of per-round ratios to the *faster* of
    nginx and varnish (same round, N, object) for throughput, and to the *better* (lower) of
    their p99s for p99.

Tier mode (`--tiers`): hit ratio and latency of each cache tier of weir alone:

    python3 tests/bench/cache_bench.py --tiers                 # 4 setups, 1 round
    python3 tests/bench/cache_bench.py --tiers --keys 5000 --rounds 3

  * the same nginx origin; a redis-server of its own (Debian's, installed if missing) on
    127.0.0.1:18208, flushed before each setup;
  * four setups of one weir-agent (--workers 1, fresh --cache-dir), each over --keys distinct
    4 KiB objects (`/4k?i=K`):
      - origin:  no cache (every request goes to the origin: the reference);
      - memory:  `maxSize: 256Mi` (everything fits in memory);
      - disk:    `maxSize: 1Mi` (≈ 200 objects) + `disk: {maxSize: 256Mi}`;
      - redis:   `maxSize: 1Mi` + `shared: true` (no disk);
    each warmed by fetching every key once, in order, then waiting until every object is
    written behind or dropped (`/config` tier `writes`, `writesDropped`);
  * load: `taskset -c 0 wrk -t1 -c8 -d{--duration}s --latency` with a Lua script picking a
    uniformly random key per request (closed loop at low concurrency, so latency is the
    service time, not a queue);
  * per setup: requests/s, p50/p99 from wrk, and the share of requests answered by each tier
    from the agent's `/config` counters over the run (memory hits, disk hits, Redis hits,
    origin = memory misses not answered below).

Before the first measurement it waits (up to --wait-idle s) until no proxy_bench.py runs and
the 1-minute load average is below 1.0; before each run, until other processes use ≤ 10 %
of the machine (up to --wait-quiet s). Other processes' CPU during each run is recorded.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import proxy_bench as pb  # noqa: E402

log = pb.log
ORIGIN_IP = "127.0.78.1"
ORIGIN_PORT = 18190
PORTS = {"nginx": 18201, "varnish": 18202, "weir": 18203}
WEIR_ADMIN = 18204
CTRL_GRPC = 18205
CTRL_ADMIN = 18206
VARNISH_ADMIN = 18207
HOST = "bench"
OBJECTS = {"small": 128, "4k": 4096}


def get(url, host=HOST, timeout=2.0):
    req = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except Exception:  # noqa: BLE001
        return None, {}, b""


def wait_idle_machine(limit):
    """No colleague benchmark and load average < 1.0 (up to `limit` s)."""
    deadline = time.time() + limit
    while True:
        others = subprocess.run(["pgrep", "-f", "proxy_bench.py"], capture_output=True, text=True).stdout.split()
        others = [p for p in others if int(p) not in pb.proc_tree(os.getpid())]
        load1 = os.getloadavg()[0]
        if (not others and load1 < 1.0) or time.time() >= deadline:
            if others or load1 >= 1.0:
                log(f"  machine not idle (proxy_bench.py pids {others}, load {load1:.2f}); going on")
            return {"proxy_bench_running": bool(others), "load1": load1}
        log(f"  waiting for an idle machine (proxy_bench.py pids {others}, load {load1:.2f})")
        time.sleep(10)


def ensure_tools(skip):
    need = {"nginx": "nginx-light", "varnishd": "varnish", "wrk": "wrk"}
    missing = [pkg for exe, pkg in need.items() if not shutil.which(exe) and not os.path.exists(f"/usr/sbin/{exe}")]
    if missing and not skip:
        log(f"installing {' '.join(missing)} from Debian")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)
    for exe in need:
        if not (shutil.which(exe) or os.path.exists(f"/usr/sbin/{exe}")):
            sys.exit(f"{exe} not found")


def start_origin(d):
    os.makedirs(f"{d}/www", exist_ok=True)
    os.chmod(d, 0o755)  # nginx workers run as nobody: they must reach the files
    for name, size in OBJECTS.items():
        with open(f"{d}/www/{name}", "w") as f:
            f.write("x" * (size - 1) + "\n")
    locs = f"""
        location / {{
            root {d}/www;
            default_type text/plain;
            add_header Cache-Control "max-age=3600";
        }}"""
    conf = pb.nginx_conf(d, "origin", 1, f"""
    server {{
        listen {ORIGIN_IP}:{ORIGIN_PORT} reuseport;{locs}
    }}""")
    p = pb.start_nginx(d, "origin", conf)
    pb.wait_until(lambda: get(f"http://{ORIGIN_IP}:{ORIGIN_PORT}/small")[0] == 200, 10, "origin", p)
    for name, size in OBJECTS.items():
        s, h, b = get(f"http://{ORIGIN_IP}:{ORIGIN_PORT}/{name}")
        assert s == 200 and len(b) == size and "max-age=3600" in h.get("cache-control", ""), (name, s, len(b), h)
    return p


class Cache:
    name = "?"

    def __init__(self, d, workers):
        self.d, self.workers, self.proc = d, workers, None
        self.port = PORTS[self.name]

    def url(self, obj):
        return f"http://127.0.0.1:{self.port}/{obj}"

    def pids(self):
        return pb.proc_tree(self.proc.pid)

    def is_hit(self, h):
        raise NotImplementedError

    def warm(self, objects):
        pb.wait_until(lambda: get(self.url(objects[0]))[0] == 200, 30, f"{self.name} ready", self.proc)
        proof = {}
        for obj in objects:
            for _ in range(50):
                s, h, b = get(self.url(obj))
                if s == 200 and len(b) == OBJECTS[obj] and self.is_hit(h):
                    proof[obj] = {k: h[k] for k in ("x-cache", "x-cache-status", "x-varnish", "age") if k in h}
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError(f"{self.name}: {obj} never became a cache hit (last headers {h})")
        return proof

    def stop(self):
        if self.proc:
            pb.stop(self.proc)
            self.proc = None


class Nginx(Cache):
    name = "nginx"

    def start(self):
        os.makedirs(f"{self.d}/nginx-cache-{self.workers}", exist_ok=True)
        conf = pb.nginx_conf(self.d, f"cache-nginx-{self.workers}", self.workers, f"""
    sendfile on;
    tcp_nopush on;
    proxy_cache_path {self.d}/nginx-cache-{self.workers} levels=1:2 keys_zone=c:16m max_size=64m inactive=1h use_temp_path=off;
    upstream origin {{
        server {ORIGIN_IP}:{ORIGIN_PORT};
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{self.port} reuseport;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache c;
            proxy_cache_valid 200 1h;
            add_header X-Cache-Status $upstream_cache_status;
        }}
    }}""")
        self.proc = pb.start_nginx(self.d, f"cache-nginx-{self.workers}", conf)

    def is_hit(self, h):
        return h.get("x-cache-status") == "HIT"


class Varnish(Cache):
    name = "varnish"

    def start(self):
        vcl = f"""vcl 4.1;
backend default {{ .host = "{ORIGIN_IP}"; .port = "{ORIGIN_PORT}"; }}
sub vcl_deliver {{
    if (obj.hits > 0) {{ set resp.http.X-Cache = "HIT"; }} else {{ set resp.http.X-Cache = "MISS"; }}
}}
"""
        path = f"{self.d}/varnish.vcl"
        with open(path, "w") as f:
            f.write(vcl)
        workdir = f"{self.d}/varnish-{self.workers}"
        os.makedirs(workdir, exist_ok=True)
        cpus = "1" if self.workers == 1 else ",".join(str(i) for i in range(min(self.workers, os.cpu_count() or 1)))
        self.proc = pb.start(
            [
                "taskset", "-c", cpus, pb.exe("varnishd"), "-F", "-j", "none",
                "-n", workdir, "-a", f"127.0.0.1:{self.port}", "-T", f"127.0.0.1:{VARNISH_ADMIN}",
                "-f", path, "-s", "malloc,64m",
                "-p", f"thread_pools={self.workers}", "-p", "thread_pool_min=100", "-p", "thread_pool_max=1000",
            ],
            f"{self.d}/varnish-{self.workers}.log",
        )

    def is_hit(self, h):
        return len(h.get("x-varnish", "").split()) == 2 and h.get("x-cache") == "HIT"


class Weir(Cache):
    name = "weir"
    controller = None

    @staticmethod
    def manifests(cfg):
        os.makedirs(cfg, exist_ok=True)
        with open(f"{cfg}/bench.yaml", "w") as f:
            f.write(
                "apiVersion: v1\nkind: Service\nmetadata: {name: origin, namespace: default}\n"
                f"spec:\n  ports: [{{name: http, port: 80, targetPort: {ORIGIN_PORT}}}]\n---\n"
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: origin-1\n"
                "  namespace: default\n  labels: {kubernetes.io/service-name: origin}\naddressType: IPv4\n"
                f"ports: [{{name: http, port: {ORIGIN_PORT}}}]\nendpoints:\n"
                f'  - addresses: ["{ORIGIN_IP}"]\n    conditions: {{ready: true}}\n---\n'
                "apiVersion: weir.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: bench, namespace: default}\n"
                f'spec:\n  hosts: ["{HOST}"]\n  rules:\n    - backendRefs: [{{name: origin, port: 80}}]\n'
                "  cache: {enabled: true, maxSize: 64Mi}\n"
            )

    def start(self):
        self.proc = pb.start(
            [
                f"{pb.BIN}/weir-agent",
                "--controller", f"http://127.0.0.1:{CTRL_GRPC}",
                "--listen", f"127.0.0.1:{self.port}",
                "--admin-addr", f"127.0.0.1:{WEIR_ADMIN}",
                "--node-name", "bench",
                "--workers", str(self.workers),
            ],
            f"{self.d}/agent-{self.workers}.log",
            env=dict(os.environ, WEIR_LOG="warn"),
        )
        pb.wait_until(lambda: pb.http_get(f"http://127.0.0.1:{WEIR_ADMIN}/readyz")[0] == 200, 30, "weir-agent ready", self.proc)

    def is_hit(self, h):
        return h.get("x-cache") == "HIT"


CLASSES = {"nginx": Nginx, "varnish": Varnish, "weir": Weir}


def saturation(c, obj, args, origin):
    quiet = pb.wait_quiet(args.wait_quiet)
    pb.wrk(c.url(obj), args.warmup)
    pids, opids = c.pids(), pb.proc_tree(origin.pid)
    f0, o0, c0 = pb.others_cpu(), pb.cpu_seconds(opids), pb.cpu_seconds(pids)
    sat = pb.wrk(c.url(obj), args.duration)
    c1, o1 = pb.cpu_seconds(pids), pb.cpu_seconds(opids)
    foreign = pb.foreign_since(f0)
    rss, _ = pb.mem_kb(pids)
    s, h, _ = get(c.url(obj))
    r = {
        "cache": c.name, "workers": c.workers, "object": obj, "rps": sat["rps"], "requests": sat["requests"],
        "sat_errors": sat["errors"], "cpu_s": c1 - c0, "cpu_per_100k": (c1 - c0) / (sat["requests"] / 1e5),
        "origin_cpu_s": o1 - o0, "rss_kb": rss, "foreign_cpu_s": foreign, "busy_before": quiet,
        "hit_after": c.is_hit(h),
    }
    log(f"  {c.name:7} N={c.workers} {obj:5}: {sat['rps']:9.0f} rps  cpu/100k {r['cpu_per_100k']:.2f}s  "
        f"origin cpu {r['origin_cpu_s']:.2f}s  rss {rss / 1024:.1f} MB  foreign {foreign:.1f}s  err {sat['errors']}")
    return r


def latency(c, obj, rate, args, r):
    pb.wait_quiet(args.wait_quiet)
    pids = c.pids()
    f0, c0 = pb.others_cpu(), pb.cpu_seconds(pids)
    lat = pb.weir_load(c.url(obj), rate, args.lat_duration)
    r["lat_proxy_cpu_s"] = pb.cpu_seconds(pids) - c0
    r["lat_foreign_cpu_s"] = pb.foreign_since(f0)
    r["lat"], r["lat_rate"] = lat, rate
    r["p50_us"], r["p99_us"] = lat["p50_us"], lat["p99_us"]
    r["overloaded"] = lat["achieved_rps"] < 0.95 * lat["target_rps"] or lat.get("unfinished", 0) > 0
    log(f"  {c.name:7} N={c.workers} {obj:5}: @{rate:.0f} rps p50 {lat['p50_us']} us p99 {lat['p99_us']} us "
        f"(achieved {lat['achieved_rps']:.0f}, err {lat['errors']}, lag p99 {lat['sched_lag_p99_us']} us, "
        f"foreign {r['lat_foreign_cpu_s']:.1f}s)")


def table(results, workers_list, objects, names):
    med, fmt = pb.med, pb.fmt
    lines = [
        "| cache | N | object | throughput (rps) | × best peer | p50 (µs) | p99 (µs) | × best peer p99 "
        "| CPU s / 100k req | RSS after (MB) | origin CPU s during run |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary = {}
    for n in workers_list:
        for obj in objects:
            rows = [r for r in results if r["workers"] == n and r["object"] == obj]
            by_round = {}
            for r in rows:
                by_round.setdefault(r["round"], {})[r["cache"]] = r
            for name in names:
                runs = [r for r in rows if r["cache"] == name]
                if not runs:
                    continue
                rx, px = [], []
                for rr in by_round.values():
                    peers = [rr[p] for p in ("nginx", "varnish") if p in rr]
                    if name in rr and peers:
                        rx.append(rr[name]["rps"] / max(p["rps"] for p in peers))
                        if all(p.get("p99_us") for p in peers) and rr[name].get("p99_us"):
                            px.append(rr[name]["p99_us"] / min(p["p99_us"] for p in peers))
                over = sum(1 for r in runs if r.get("overloaded"))
                row = {
                    "rps": med([r["rps"] for r in runs]), "rps_x": med(rx),
                    "p50": med([r.get("p50_us") for r in runs]), "p99": med([r.get("p99_us") for r in runs]),
                    "p99_x": med(px), "cpu": med([r["cpu_per_100k"] for r in runs]),
                    "rss": med([r["rss_kb"] for r in runs]) / 1024, "origin": med([r["origin_cpu_s"] for r in runs]),
                }
                summary[(name, n, obj)] = row
                mark = f" †{over}" if over else ""
                lines.append(
                    f"| {name} | {n} | {obj} ({OBJECTS[obj]} B) | {fmt(row['rps'])} | {fmt(row['rps_x'], 2)} "
                    f"| {fmt(row['p50'])}{mark} | {fmt(row['p99'])}{mark} | {fmt(row['p99_x'], 2)} | {fmt(row['cpu'], 2)} "
                    f"| {fmt(row['rss'], 1)} | {fmt(row['origin'], 2)} |"
                )
    return "\n".join(lines), summary


REDIS_PORT = 18208
TIER_SETUPS = {
    "origin": None,
    "memory": "{enabled: true, maxSize: 256Mi}",
    "disk": "{enabled: true, maxSize: 1Mi, disk: {maxSize: 256Mi}}",
    "redis": "{enabled: true, maxSize: 1Mi, shared: true}",
}


def tier_manifests(cfg, cache):
    Weir.manifests(cfg)
    path = f"{cfg}/bench.yaml"
    with open(path) as f:
        text = f.read()
    text = text.replace("  cache: {enabled: true, maxSize: 64Mi}\n", f"  cache: {cache}\n" if cache else "")
    with open(path, "w") as f:
        f.write(text)


def agent_cache(admin):
    s, _, b = get(f"http://127.0.0.1:{admin}/config")
    if s != 200:
        return {}
    c = json.loads(b)["routes"][0].get("cache") or {}
    st, t = c.get("stats", {}), c.get("tiers") or {}
    return {"hits": st.get("hits", 0) + st.get("stale", 0), "misses": st.get("misses", 0),
            "bypass": st.get("bypass", 0), "coalesced": st.get("coalesced", 0),
            "disk": t.get("diskHits", 0), "redis": t.get("sharedHits", 0),
            "writes": t.get("writes", 0) + t.get("writesDropped", 0), "dropped": t.get("writesDropped", 0),
            "shared_errors": t.get("sharedErrors", 0)}


def wrk_random(port, keys, seconds, connections, d):
    script = f"{d}/random.lua"
    with open(script, "w") as f:
        f.write(f'wrk.headers["Host"] = "{HOST}"\n'
                f'request = function() return wrk.format(nil, "/4k?i=" .. math.random(1, {keys})) end\n')
    cmd = ["taskset", "-c", "0", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script,
           f"http://127.0.0.1:{port}/"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    def ms(label):
        m = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", out)
        return float(m.group(1)) * {"us": 1e-3, "ms": 1, "s": 1e3}[m.group(2)] if m else None

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": ms("50%"), "p99_ms": ms("99%"), "errors": int(non2xx.group(1)) if non2xx else 0}


def tiers_main(args):
    if not shutil.which("redis-server") and not args.no_install:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True, env=env)
    # Only nginx (the origin) and wrk are needed here, not varnish.
    for exe in ("nginx", "wrk", "redis-server"):
        if not (shutil.which(exe) or os.path.exists(f"/usr/sbin/{exe}")):
            sys.exit(f"{exe} not found (run without --no-install to get it from Debian)")
    pb.build(args.no_build)
    d = tempfile.mkdtemp(prefix="weir-tier-bench-")
    os.makedirs(f"{d}/bin")
    for b in ["weir-agent", "weir-controller"]:
        shutil.copy2(f"{os.path.abspath(args.bin_dir)}/{b}", f"{d}/bin/{b}")
    pb.BIN = f"{d}/bin"
    started = datetime.datetime.now(datetime.timezone.utc)
    results = []
    try:
        origin = start_origin(d)
        redis = pb.start(["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no"], f"{d}/redis.log")
        pb.wait_until(lambda: subprocess.run(["redis-cli", "-p", str(REDIS_PORT), "ping"], capture_output=True,
                                             text=True).stdout.strip() == "PONG", 10, "redis", redis)
        idle = wait_idle_machine(args.wait_idle)
        for rnd in range(1, args.rounds + 1):
            for name, cache in TIER_SETUPS.items():
                subprocess.run(["redis-cli", "-p", str(REDIS_PORT), "flushall"], capture_output=True, check=True)
                cfg = f"{d}/config-{name}-{rnd}"
                tier_manifests(cfg, cache)
                ctrl = pb.Weir.start_controller(d, cfg, grpc=CTRL_GRPC, admin=CTRL_ADMIN, tag=f"controller-{name}")
                cache_dir = f"{d}/cache-{name}-{rnd}"
                agent = pb.start([f"{pb.BIN}/weir-agent", "--controller", f"http://127.0.0.1:{CTRL_GRPC}",
                                  "--listen", f"127.0.0.1:{PORTS['weir']}", "--admin-addr", f"127.0.0.1:{WEIR_ADMIN}",
                                  "--node-name", "bench", "--workers", "1", "--cache-dir", cache_dir,
                                  "--cache-redis", f"redis://127.0.0.1:{REDIS_PORT}"],
                                 f"{d}/agent-{name}-{rnd}.log", env=dict(os.environ, WEIR_LOG="warn"))
                try:
                    pb.wait_until(lambda: pb.http_get(f"http://127.0.0.1:{WEIR_ADMIN}/readyz")[0] == 200, 30,
                                  "weir-agent ready", agent)
                    for k in range(1, args.keys + 1):
                        s, _, _ = get(f"http://127.0.0.1:{PORTS['weir']}/4k?i={k}")
                        assert s == 200, (name, k, s)
                    if cache and ("disk" in cache or "shared" in cache):
                        pb.wait_until(lambda: agent_cache(WEIR_ADMIN).get("writes", 0) >= args.keys, 60,
                                      "tier writes", agent)
                    pb.wait_quiet(args.wait_quiet)
                    before = agent_cache(WEIR_ADMIN)
                    r = wrk_random(PORTS["weir"], args.keys, args.duration, 8, d)
                    after = agent_cache(WEIR_ADMIN)
                finally:
                    pb.stop(agent)
                    pb.stop(ctrl)
                delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                total = max(1, delta.get("hits", 0) + delta.get("misses", 0) + delta.get("bypass", 0)
                            + delta.get("coalesced", 0)) if cache else 1
                share = {
                    "memory": delta.get("hits", 0) / total if cache else 0.0,
                    "disk": delta.get("disk", 0) / total if cache else 0.0,
                    "redis": delta.get("redis", 0) / total if cache else 0.0,
                }
                share["origin"] = 1.0 - sum(share.values())
                r.update({"setup": name, "round": rnd, "share": share, "counters": delta})
                results.append(r)
                log(f"  {name:7} r{rnd}: {r['rps']:8.0f} rps  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  "
                    + "  ".join(f"{k} {v:.1%}" for k, v in share.items()) + f"  err {r['errors']}")
        pb.stop(redis)
        pb.stop(origin)
    finally:
        pb.cleanup()
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
    with open(args.json, "w") as f:
        json.dump({"started": started.isoformat(), "args": vars(args), "runs": results}, f, indent=1)
    cmd = "python3 tests/bench/cache_bench.py " + " ".join(sys.argv[1:])
    print(f"### Cache tiers ({started:%Y-%m-%d %H:%M} UTC, `{cmd.strip()}`)\n")
    print(f"{args.keys} distinct 4 KiB objects, uniformly random; `wrk -t1 -c8 -d{args.duration}s --latency` on CPU 0; "
          f"weir-agent --workers 1; medians of {args.rounds} round(s).\n")
    print("| setup | req/s | p50 ms | p99 ms | memory hits | disk hits | Redis hits | origin |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in TIER_SETUPS:
        rs = [r for r in results if r["setup"] == name]
        if not rs:
            continue
        sh = {k: pb.med([r["share"][k] for r in rs]) for k in ("memory", "disk", "redis", "origin")}
        print(f"| {name} | {pb.med([r['rps'] for r in rs]):.0f} | {pb.med([r['p50_ms'] for r in rs]):.3f} | "
              f"{pb.med([r['p99_ms'] for r in rs]):.3f} | {sh['memory']:.1%} | {sh['disk']:.1%} | {sh['redis']:.1%} | "
              f"{sh['origin']:.1%} |")
    print(f"\nBefore the first run: load1 {idle['load1']:.2f}.")
    log(f"raw results: {args.json}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--objects", default="small", help="comma-separated of: " + ",".join(OBJECTS))
    ap.add_argument("--caches", default="nginx,varnish,weir")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--lat-duration", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--wait-quiet", type=float, default=20)
    ap.add_argument("--wait-idle", type=float, default=180, help="wait up to this long for no proxy_bench.py and load < 1")
    ap.add_argument("--nice", type=int, default=-10)
    ap.add_argument("--no-install", action="store_true")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--json", default="/tmp/weir-cache-bench.json")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--bin-dir", default=pb.BIN)
    ap.add_argument("--tiers", action="store_true", help="measure weir's cache tiers (memory, disk, Redis) instead")
    ap.add_argument("--keys", type=int, default=5000, help="--tiers: distinct objects")
    args = ap.parse_args()
    if args.tiers:
        if args.rounds == 3 and "--rounds" not in sys.argv:
            args.rounds = 1
        signal.signal(signal.SIGINT, pb.on_signal)
        signal.signal(signal.SIGTERM, pb.on_signal)
        return tiers_main(args)
    workers_list = [int(x) for x in args.workers.split(",")]
    objects = [x for x in args.objects.split(",") if x]
    names = [x for x in args.caches.split(",") if x]
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
    ensure_tools(args.no_install)
    pb.build(args.no_build)
    d = tempfile.mkdtemp(prefix="weir-cache-bench-")
    log(f"work dir {d}")
    os.makedirs(f"{d}/bin")
    for b in ["weir-load", "weir-agent", "weir-controller"]:
        shutil.copy2(f"{os.path.abspath(args.bin_dir)}/{b}", f"{d}/bin/{b}")
    pb.BIN = f"{d}/bin"
    started = datetime.datetime.now(datetime.timezone.utc)
    results, proofs = [], []
    idle = None
    try:
        origin = start_origin(d)
        if "weir" in names:
            Weir.manifests(f"{d}/config")
            Weir.controller = pb.Weir.start_controller(d, f"{d}/config", grpc=CTRL_GRPC, admin=CTRL_ADMIN)
        idle = wait_idle_machine(args.wait_idle)
        for rnd in range(1, args.rounds + 1):
            order = names[(rnd - 1) % len(names):] + names[: (rnd - 1) % len(names)]
            for n in workers_list:
                log(f"round {rnd}/{args.rounds}, N={n}, order {order}")
                caches = [CLASSES[name](d, n) for name in order]
                try:
                    for c in caches:
                        c.start()
                    for c in caches:
                        proofs.append({"round": rnd, "workers": n, "cache": c.name, "proof": c.warm(objects)})
                    for obj in objects:
                        runs = {}
                        for c in caches:
                            r = saturation(c, obj, args, origin)
                            r["round"] = rnd
                            runs[c.name] = r
                        peers = [runs[p]["rps"] for p in ("nginx", "varnish") if p in runs]
                        rate = max(peers) / 2 if peers else runs[order[0]]["rps"] / 2
                        for c in caches:
                            latency(c, obj, rate, args, runs[c.name])
                        results.extend(runs.values())
                finally:
                    for c in caches:
                        c.stop()
        pb.stop(origin)
    finally:
        pb.cleanup()
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)

    tbl, summary = table(results, workers_list, objects, names)
    with open(args.json, "w") as f:
        json.dump({"started": started.isoformat(), "args": vars(args), "idle_before": idle, "runs": results,
                   "hit_proofs": proofs}, f, indent=1)
    cmd = "python3 tests/bench/cache_bench.py " + " ".join(sys.argv[1:])
    print(f"### Cache hit path ({started:%Y-%m-%d %H:%M} UTC, `{cmd.strip()}`)\n")
    print(f"Medians of {args.rounds} interleaved rounds. × best peer = median of per-round ratios to the faster of "
          "nginx/varnish (throughput) or to the lower of their p99s (same round, N, object).")
    print(f"Saturation `wrk -t1 -c64 -d{args.duration}s` on CPU 0; latency `weir-load -c 64` open loop {args.lat_duration}s "
          "at half the faster peer's saturation rps.\n")
    print(tbl)
    if any(r.get("overloaded") for r in results):
        print("\n† k: in k rounds the cache did not keep up with the fixed rate (percentiles measure a queue).")
    if "weir" in names:
        print("\nGoals (weir):")
        for n in workers_list:
            for obj in objects:
                w = summary.get(("weir", n, obj))
                if w:
                    print(f"- N={n} {obj}: throughput {pb.fmt(w['rps_x'], 2)}× best peer (goal ≥ 1.20) "
                          f"{'✓' if w['rps_x'] and w['rps_x'] >= 1.2 else '✗'}; p99 {pb.fmt(w['p99_x'], 2)}× best peer "
                          f"(goal ≤ 1.00) {'✓' if w['p99_x'] and w['p99_x'] <= 1.0 else '✗'}")
    noise = [max(r["foreign_cpu_s"] / (2 * args.duration), r.get("lat_foreign_cpu_s", 0) / (2 * (args.lat_duration + 1)))
             for r in results]
    if noise:
        print(f"\nNoise: CPU share of other processes during a run: median {pb.med(noise):.0%}, max {max(noise):.0%}; "
              f"before the first run: load1 {idle['load1']:.2f}, proxy_bench.py running: {idle['proxy_bench_running']}.")
    errs = [r for r in results if r["sat_errors"] or r.get("lat", {}).get("errors")]
    if errs:
        print("\nErrors: " + ", ".join(f"{r['cache']} N={r['workers']} r{r['round']}: wrk {r['sat_errors']}, "
                                      f"weir-load {r.get('lat', {}).get('errors')}" for r in errs))
    if not all(r["hit_after"] for r in results):
        print("\nWARNING: some runs were not answering hits after saturation: " +
              ", ".join(f"{r['cache']} N={r['workers']} r{r['round']}" for r in results if not r["hit_after"]))
    log(f"raw results: {args.json}")


if __name__ == "__main__":
    main()
