#!/usr/bin/env python3
"""weir-agent vs nginx vs HAProxy: round robin over 3 loopback origins with keep-alive.

Usage (root, from anywhere in the repo; installs nginx-light, haproxy and wrk from Debian
if they are missing, builds the release binaries, cleans up every process it starts):

    python3 tests/bench/proxy_bench.py                 # N=1 and N=2, 3 rounds
    python3 tests/bench/proxy_bench.py --workers 1 --rounds 5
    python3 tests/bench/proxy_bench.py --profile       # plus perf stat/record of weir N=1

Method (see tests/bench/README.md and DESIGN.md "Performance notes"):
  * origins: one nginx instance (1 worker) answering a 128-byte body on 127.0.77.{1,2,3}
    port 18090, keep-alive;
  * proxies under test, all with the same N workers/threads and upstream keep-alive:
    nginx (upstream keepalive 64, proxy_http_version 1.1, Connection ""), HAProxy
    (balance roundrobin, http-reuse always, nbthread N), weir-agent (--workers N, one
    RoundRobin TrafficPolicy over a Service with the 3 endpoints, via a local-mode
    weir-controller);
  * per run: start the proxy, idle RSS, 2 s wrk warm-up, then
      - saturation: `taskset -c 0 wrk -t1 -c64 -d10s` (throughput; CPU seconds of all the
        proxy's processes from /proc/<pid>/stat utime+stime over the run / (requests/100k);
        RSS after the run),
      - latency: `taskset -c 0 weir-load --connections 64 --rate R` open-loop for 10 s,
        R = half of nginx's saturation throughput (same N) from the same round;
  * rounds interleave nginx, haproxy, weir (for each N) and repeat; the table shows
    medians of absolute values and medians of per-round ratios to nginx with the same N;
  * finally weir's idle RSS with 1,000 routes (1,000 TrafficPolicies with distinct hosts);
  * shared machines: every run records the CPU that other processes used meanwhile; a
    round in which they used more than --max-noise of the machine is repeated (--retries)
    and the quietest attempt kept; the benchmark runs at --nice -10 (autogroup nice too).
    Expect ~9 minutes on a quiet machine, more when rounds are repeated.

Writes the raw results as JSON (--json) and prints a markdown table on stdout.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
ORIGIN_IPS = ["127.0.77.1", "127.0.77.2", "127.0.77.3"]
ORIGIN_PORT = 18090
HOST = "bench"
NGINX_PORT = 18101
HAPROXY_PORT = 18102
WEIR_LISTEN = 18103
WEIR_ADMIN = 18104
CTRL_GRPC = 18105
CTRL_ADMIN = 18106
BODY = "x" * 127 + "\n"  # 128 bytes
CLK_TCK = os.sysconf("SC_CLK_TCK")
BIN = os.path.join(REPO, "target", "release")  # --bin-dir

PROCS = []  # every Popen this script started (each in its own process group)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes and cleanup


NICE = 0  # --nice


def set_autogroup_nice(pid):
    if not NICE:
        return
    try:
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(str(NICE))
    except OSError:
        pass  # no autogroups in this kernel, or not allowed


def start(cmd, logfile, **kw):
    out = open(logfile, "ab")
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kw)
    out.close()
    PROCS.append(p)
    set_autogroup_nice(p.pid)
    return p


def stop(p, sig=signal.SIGTERM, timeout=5.0):
    """Stops one process we started, and its process group (nginx workers)."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    else:
        # The leader is gone; make sure nothing of its group survives.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if p in PROCS:
        PROCS.remove(p)


def cleanup(*_):
    for p in list(PROCS):
        stop(p, timeout=3.0)


def on_signal(signum, _frame):
    cleanup()
    sys.exit(128 + signum)


def children(pid):
    """Direct children of pid (nginx workers of a master)."""
    out = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            out = [int(x) for x in f.read().split()]
    except OSError:
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        st = f.read()
                    if int(st[st.rindex(")") + 2 :].split()[1]) == pid:
                        out.append(int(d))
                except (OSError, ValueError):
                    pass
    return out


def proc_tree(pid):
    pids = [pid]
    for c in children(pid):
        pids.extend(proc_tree(c))
    return pids


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                st = f.read()
            fields = st[st.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        except (OSError, ValueError, IndexError):
            pass
    return total / CLK_TCK


def mem_kb(pids):
    """(sum of VmRSS, sum of Pss) in kB over pids."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except (OSError, ValueError):
            pass
    return rss, pss


def system_cpu():
    """(busy, total, softirq) CPU seconds of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    total = sum(v[:8])
    idle = v[3] + v[4]
    return (total - idle) / CLK_TCK, total / CLK_TCK, v[6] / CLK_TCK


def children_cpu():
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def others_cpu():
    """CPU ticks of every user process that is not this script or started by it, with what
    their reaped children used (cutime/cstime): a snapshot, compared by `foreign_since`."""
    mine = set(proc_tree(os.getpid()))
    snap = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in mine:
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
            fields = st[st.rindex(")") + 2 :].split()
            if int(fields[6]) & 0x00200000:  # PF_KTHREAD: kernel threads (softirq work is ours)
                continue
            snap[int(d)] = sum(int(x) for x in fields[11:15])
        except (OSError, ValueError, IndexError):
            pass
    return snap


def foreign_since(before):
    """CPU seconds used by other processes since the snapshot `before` (new processes count
    from zero): the noise that a shared machine adds to a run. Approximate."""
    # Totals, not per process: an exited child's time moves into its parent's cutime, so it
    # must leave the "before" side with it. Processes that end unreaped are the error.
    after = others_cpu()
    return max(sum(after.values()) - sum(before.values()), 0) / CLK_TCK


def wait_quiet(limit, threshold=0.10):
    """Waits (up to `limit` s) until other processes use at most `threshold` of the machine
    over 1 s: on a shared machine a compile next door moves every number."""
    deadline = time.time() + limit
    ncpu = os.cpu_count() or 1
    while True:
        snap = others_cpu()
        time.sleep(1.0)
        busy = foreign_since(snap) / ncpu
        if busy <= threshold or time.time() >= deadline:
            if busy > threshold:
                log(f"  other processes still use {busy:.0%} of the machine; going on")
            return busy


def http_get(url, host=None, timeout=2.0):
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, urllib.error.URLError):
        return None, b""


def wait_until(pred, timeout, what, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        if pred():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


# ---------------------------------------------------------------- setup


def ensure_tools(skip):
    need = {"nginx": "nginx-light", "haproxy": "haproxy", "wrk": "wrk"}
    missing = [pkg for exe, pkg in need.items() if not shutil.which(exe) and not os.path.exists(f"/usr/sbin/{exe}")]
    if missing and not skip:
        log(f"installing {' '.join(missing)} from Debian")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)
    for exe in need:
        if not (shutil.which(exe) or os.path.exists(f"/usr/sbin/{exe}")):
            sys.exit(f"{exe} not found")
    # Debian starts the packaged nginx/haproxy services on install; they are not ours and
    # listen on :80, which does not collide with the ports used here, so they are left alone.


def ensure_perf(skip):
    if shutil.which("perf") or skip:
        return
    log("installing linux-perf from Debian")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-qq", "linux-perf"], env=env)


def exe(name):
    return shutil.which(name) or f"/usr/sbin/{name}"


def build(skip):
    if skip:
        return
    log("cargo build --release -p weir-controller -p weir-agent -p weir-tests")
    subprocess.run(
        ["cargo", "build", "--release", "-p", "weir-controller", "-p", "weir-agent", "-p", "weir-tests"],
        cwd=REPO,
        check=True,
    )


def nginx_conf(d, name, workers, http_body):
    os.makedirs(f"{d}/{name}-tmp", exist_ok=True)
    conf = f"""
worker_processes {workers};
daemon off;
master_process on;
pid {d}/{name}.pid;
error_log {d}/{name}-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/{name}-tmp/body;
    proxy_temp_path {d}/{name}-tmp/proxy;
    fastcgi_temp_path {d}/{name}-tmp/fastcgi;
    uwsgi_temp_path {d}/{name}-tmp/uwsgi;
    scgi_temp_path {d}/{name}-tmp/scgi;
    keepalive_timeout 300s;
    keepalive_requests 10000000;
{http_body}
}}
"""
    path = f"{d}/{name}.conf"
    with open(path, "w") as f:
        f.write(conf)
    return path


def start_nginx(d, name, conf):
    return start([exe("nginx"), "-p", d, "-e", f"{d}/{name}-error.log", "-c", conf], f"{d}/{name}.log")


def start_origins(d, workers):
    listens = "\n".join(f"        listen {ip}:{ORIGIN_PORT} reuseport;" for ip in ORIGIN_IPS)
    conf = nginx_conf(
        d,
        "origin",
        workers,
        f"""
    server {{
{listens}
        location / {{
            default_type text/plain;
            return 200 "{BODY[:-1]}\\n";
        }}
    }}""",
    )
    p = start_nginx(d, "origin", conf)
    for ip in ORIGIN_IPS:
        wait_until(lambda ip=ip: http_get(f"http://{ip}:{ORIGIN_PORT}/")[0] == 200, 10, f"origin {ip}", p)
    status, body = http_get(f"http://{ORIGIN_IPS[0]}:{ORIGIN_PORT}/")
    assert len(body) == 128, len(body)
    return p


def start_http_fixture(d):
    """The origins, plus a local-mode weir-controller with one route over them (shared by
    every weir run); returns the origins' process."""
    origins = start_origins(d, 1)
    weir_manifests(f"{d}/config", 1)
    Weir.controller = Weir.start_controller(d, f"{d}/config")
    return origins


class Proxy:
    name = "?"
    port = 0

    def __init__(self, d, workers):
        self.d, self.workers, self.proc = d, workers, None

    def url(self):
        return f"http://127.0.0.1:{self.port}/"

    def pids(self):
        return proc_tree(self.proc.pid)

    def wait_ready(self):
        wait_until(lambda: http_get(self.url(), HOST)[0] == 200, 30, f"{self.name} ready", self.proc)
        # Every origin reached once (upstream pools, round robin warm).
        for _ in range(6):
            http_get(self.url(), HOST)

    def stop(self):
        if self.proc:
            stop(self.proc, signal.SIGTERM)
            self.proc = None


class Nginx(Proxy):
    name = "nginx"
    port = NGINX_PORT

    def start(self):
        servers = "\n".join(f"        server {ip}:{ORIGIN_PORT};" for ip in ORIGIN_IPS)
        conf = nginx_conf(
            self.d,
            "proxy-nginx",
            self.workers,
            f"""
    upstream origins {{
{servers}
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{self.port} reuseport;
        location / {{
            proxy_pass http://origins;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}""",
        )
        self.proc = start_nginx(self.d, "proxy-nginx", conf)


class Haproxy(Proxy):
    name = "haproxy"
    port = HAPROXY_PORT

    def start(self):
        servers = "\n".join(f"    server o{i} {ip}:{ORIGIN_PORT}" for i, ip in enumerate(ORIGIN_IPS))
        conf = f"""
global
    nbthread {self.workers}
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    option http-keep-alive
frontend fe
    bind 127.0.0.1:{self.port}
    default_backend be
backend be
    balance roundrobin
    http-reuse always
{servers}
"""
        path = f"{self.d}/haproxy.cfg"
        with open(path, "w") as f:
            f.write(conf)
        self.proc = start([exe("haproxy"), "-db", "-f", path], f"{self.d}/haproxy.log")


def weir_manifests(d, routes):
    """Service + EndpointSlice over the 3 origins, and `routes` RoundRobin policies."""
    os.makedirs(d, exist_ok=True)
    eps = "".join(f'  - addresses: ["{ip}"]\n    conditions: {{ready: true}}\n' for ip in ORIGIN_IPS)
    svc = (
        "apiVersion: v1\nkind: Service\nmetadata: {name: origin, namespace: default}\n"
        "spec:\n  ports: [{name: http, port: 80, targetPort: %d}]\n---\n"
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: origin-1\n"
        "  namespace: default\n  labels: {kubernetes.io/service-name: origin}\naddressType: IPv4\n"
        "ports: [{name: http, port: %d}]\nendpoints:\n%s" % (ORIGIN_PORT, ORIGIN_PORT, eps)
    )
    with open(f"{d}/services.yaml", "w") as f:
        f.write(svc)
    docs = []
    for i in range(routes):
        name = "bench" if i == 0 else f"bench-{i:04d}"
        host = HOST if i == 0 else f"r{i:04d}.{HOST}"
        docs.append(
            "apiVersion: weir.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n"
            f"  name: {name}\n  namespace: default\nspec:\n  hosts: [\"{host}\"]\n"
            "  loadBalancer: {algorithm: RoundRobin}\n"
            "  rules:\n    - backendRefs: [{name: origin, port: 80}]\n"
        )
    with open(f"{d}/policies.yaml", "w") as f:
        f.write("---\n".join(docs))


class Weir(Proxy):
    name = "weir"
    port = WEIR_LISTEN
    controller = None  # shared by every weir run; its CPU is not the data plane's

    @classmethod
    def start_controller(cls, d, cfg, grpc=CTRL_GRPC, admin=CTRL_ADMIN, tag="controller"):
        p = start(
            [
                f"{BIN}/weir-controller",
                "--config-dir", cfg,
                "--grpc-addr", f"127.0.0.1:{grpc}",
                "--admin-addr", f"127.0.0.1:{admin}",
            ],
            f"{d}/{tag}.log",
            env=dict(os.environ, WEIR_LOG="warn"),
        )
        wait_until(lambda: http_get(f"http://127.0.0.1:{admin}/readyz")[0] == 200, 30, "weir-controller ready", p)
        return p

    def start(self, grpc=CTRL_GRPC, listen=None, admin=None, tag="agent"):
        self.admin = admin or WEIR_ADMIN
        self.proc = start(
            [
                f"{BIN}/weir-agent",
                "--controller", f"http://127.0.0.1:{grpc}",
                "--listen", f"127.0.0.1:{listen or self.port}",
                "--admin-addr", f"127.0.0.1:{self.admin}",
                "--node-name", "bench",
                "--workers", str(self.workers),
            ],
            f"{self.d}/{tag}.log",
            env=dict(os.environ, WEIR_LOG="warn"),
        )

    def wait_ready(self):
        wait_until(
            lambda: http_get(f"http://127.0.0.1:{self.admin}/readyz")[0] == 200, 30, "weir-agent ready", self.proc
        )
        super().wait_ready()


# ---------------------------------------------------------------- load


def wrk(url, seconds, connections=64, cpu="0"):
    cmd = ["taskset", "-c", cpu, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-H", f"Host: {HOST}", url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    reqs = int(m.group(1))
    dur = float(m.group(2)) * {"s": 1, "ms": 1e-3, "m": 60}.get(m.group(3), 1)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(int(x) for x in sock.groups()) if sock else 0)
    return {"requests": reqs, "seconds": dur, "rps": rps, "errors": errors}


def weir_load(url, rate, seconds, connections=64, cpu="0"):
    cmd = [
        "taskset", "-c", cpu, f"{BIN}/weir-load",
        "--url", url, "--host", HOST, "--rate", f"{rate:.0f}",
        "--connections", str(connections), "--duration", f"{seconds}s", "--warmup", "1s",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_one(proxy, args, origins, rate=None):
    """One run of one proxy: idle RSS, warm-up, saturation, RSS, latency at `rate`."""
    busy_before = wait_quiet(args.wait_quiet)
    proxy.start()
    try:
        proxy.wait_ready()
        time.sleep(0.3)
        pids = proxy.pids()
        idle_rss, idle_pss = mem_kb(pids)
        wrk(proxy.url(), args.warmup)
        pids = proxy.pids()
        opids = proc_tree(origins.pid)
        f0, q0, o0, w0, c0 = others_cpu(), system_cpu()[2], cpu_seconds(opids), children_cpu(), cpu_seconds(pids)
        sat = wrk(proxy.url(), args.duration)
        c1, w1, o1, q1 = cpu_seconds(pids), children_cpu(), cpu_seconds(opids), system_cpu()[2]
        # CPU used during the run by processes that are not part of the benchmark (noise).
        foreign = foreign_since(f0)
        rss, pss = mem_kb(pids)
        res = {
            "proxy": proxy.name,
            "workers": proxy.workers,
            "rps": sat["rps"],
            "requests": sat["requests"],
            "sat_errors": sat["errors"],
            "cpu_s": c1 - c0,
            "cpu_per_100k": (c1 - c0) / (sat["requests"] / 1e5),
            "idle_rss_kb": idle_rss,
            "idle_pss_kb": idle_pss,
            "rss_kb": rss,
            "pss_kb": pss,
            "processes": len(pids),
            "origin_cpu_s": o1 - o0,
            "wrk_cpu_s": w1 - w0,
            "foreign_cpu_s": foreign,
            "softirq_cpu_s": q1 - q0,
            "busy_before": busy_before,
        }
        if rate is None:
            rate = sat["rps"] / 2
        f0, o0, w0, c0 = others_cpu(), cpu_seconds(opids), children_cpu(), cpu_seconds(pids)
        lat = weir_load(proxy.url(), rate, args.lat_duration)
        c1, w1, o1 = cpu_seconds(pids), children_cpu(), cpu_seconds(opids)
        res["lat_foreign_cpu_s"] = foreign_since(f0)
        res["lat_proxy_cpu_s"], res["lat_origin_cpu_s"], res["lat_loadgen_cpu_s"] = c1 - c0, o1 - o0, w1 - w0
        res["lat"] = lat
        # Could not keep up with the fixed rate: the percentiles then measure a queue.
        res["overloaded"] = lat["achieved_rps"] < 0.95 * lat["target_rps"] or lat.get("unfinished", 0) > 0
        res["p50_us"], res["p99_us"] = lat["p50_us"], lat["p99_us"]
        log(
            f"  {proxy.name:7} N={proxy.workers}: {sat['rps']:9.0f} rps  cpu/100k {res['cpu_per_100k']:.2f}s  "
            f"rss {rss / 1024:.1f} MB (foreign cpu {foreign:.1f}s) | @{rate:.0f} rps p50 {lat['p50_us']} us p99 {lat['p99_us']} us "
            f"(achieved {lat['achieved_rps']:.0f} rps, err {lat['errors']}, proxy cpu {c1 - c0:.1f}s, "
            f"foreign {res['lat_foreign_cpu_s']:.1f}s, lag p99 {lat['sched_lag_p99_us']} us)"
        )
        return res
    finally:
        proxy.stop()


def weir_routes_rss(d, workers, routes):
    """Idle RSS of a fresh agent with `routes` policies applied."""
    cfg = f"{d}/routes-{routes}"
    weir_manifests(cfg, routes)
    ctrl = Weir.start_controller(d, cfg, grpc=CTRL_GRPC + 10, admin=CTRL_ADMIN + 10, tag=f"controller-{routes}")
    agent = Weir(d, workers)
    try:
        agent.start(grpc=CTRL_GRPC + 10, listen=WEIR_LISTEN + 10, admin=WEIR_ADMIN + 10, tag=f"agent-{routes}")
        t0 = time.time()

        def loaded():
            code, body = http_get(f"http://127.0.0.1:{agent.admin}/config", timeout=10)
            if code != 200:
                return False
            return len(json.loads(body).get("routes", [])) >= routes

        wait_until(loaded, 120, f"{routes} routes on the agent", agent.proc)
        applied = time.time() - t0
        # One request on the listener so every lazily built structure exists, then idle.
        status, _ = http_get(f"http://127.0.0.1:{WEIR_LISTEN + 10}/", f"r{routes - 1:04d}.{HOST}" if routes > 1 else HOST)
        time.sleep(2)
        rss, pss = mem_kb(agent.pids())
        return {"routes": routes, "workers": workers, "rss_kb": rss, "pss_kb": pss, "applied_s": applied, "probe_status": status}
    finally:
        agent.stop()
        stop(ctrl)


def profile_weir(d, workers, seconds):
    """perf stat + perf record of weir-agent under wrk saturation (not part of the table)."""
    if not shutil.which("perf"):
        log("perf not found (apt-get install linux-perf); skipping profile")
        return None
    agent = Weir(d, workers)
    agent.start()
    try:
        agent.wait_ready()
        wrk(agent.url(), 2)
        pid = str(agent.proc.pid)
        data = f"{d}/perf.data"
        stat = subprocess.Popen(
            ["perf", "stat", "-p", pid, "-e", "task-clock,context-switches,cycles,instructions", "--", "sleep", str(seconds)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        rec = subprocess.Popen(
            ["perf", "record", "-F", "999", "-g", "-p", pid, "-o", data, "--", "sleep", str(seconds)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        sat = wrk(agent.url(), seconds)
        stat_out = stat.communicate()[0]
        rec.wait()
        def report(*opts, limit=40):
            out = subprocess.run(
                ["perf", "report", "-i", data, "--stdio", "-g", "none", *opts], capture_output=True, text=True
            ).stdout
            lines = [re.sub(r"(\s+-)+\s*$", "", l).rstrip() for l in out.splitlines()]
            return [l for l in lines if l.strip() and not l.startswith("#")][:limit]

        by_dso = report("--no-children", "--sort", "dso", limit=10)
        top = report("--no-children", "--sort", "dso,symbol", "--percent-limit", "0.7")
        top_children = report("--children", "--sort", "symbol", "--percent-limit", "4")
        return {"wrk": sat, "perf_stat": stat_out, "by_dso": by_dso, "top_self": top, "top_children": top_children}
    finally:
        agent.stop()


# ---------------------------------------------------------------- report


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=0):
    if x is None:
        return "–"
    return f"{x:,.{nd}f}"


def table(results, workers_list, names):
    lines = [
        "| proxy | N | throughput (rps) | × nginx | p50 (µs) | × nginx | p99 (µs) | × nginx "
        "| CPU s / 100k req | × nginx | RSS idle (MB) | RSS after run (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary = {}
    for n in workers_list:
        rounds = [r for r in results if r["workers"] == n]
        by_round = {}
        for r in rounds:
            by_round.setdefault(r["round"], {})[r["proxy"]] = r
        for name in names:
            runs = [r for r in rounds if r["proxy"] == name]
            if not runs:
                continue

            def ratio(key):
                xs = []
                for rr in by_round.values():
                    if name in rr and "nginx" in rr and rr["nginx"].get(key):
                        xs.append(rr[name][key] / rr["nginx"][key])
                return med(xs)

            row = {
                "rps": med([r["rps"] for r in runs]),
                "rps_x": ratio("rps"),
                "p50": med([r["p50_us"] for r in runs]),
                "p50_x": ratio("p50_us"),
                "p99": med([r["p99_us"] for r in runs]),
                "p99_x": ratio("p99_us"),
                "over": sum(1 for r in runs if r.get("overloaded")),
                "cpu": med([r["cpu_per_100k"] for r in runs]),
                "cpu_x": ratio("cpu_per_100k"),
                "idle": med([r["idle_rss_kb"] for r in runs]) / 1024,
                "rss": med([r["rss_kb"] for r in runs]) / 1024,
            }
            summary[(name, n)] = row
            mark = f" †{row['over']}" if row["over"] else ""
            lines.append(
                f"| {name} | {n} | {fmt(row['rps'])} | {fmt(row['rps_x'], 2)} | {fmt(row['p50'])}{mark} | {fmt(row['p50_x'], 2)} "
                f"| {fmt(row['p99'])}{mark} | {fmt(row['p99_x'], 2)} | {fmt(row['cpu'], 2)} | {fmt(row['cpu_x'], 2)} "
                f"| {fmt(row['idle'], 1)} | {fmt(row['rss'], 1)} |"
            )
    return "\n".join(lines), summary


def main():
    global BIN
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2", help="comma-separated N values (default 1,2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="saturation run, seconds")
    ap.add_argument("--lat-duration", type=int, default=10, help="fixed-rate latency run, seconds")
    ap.add_argument("--warmup", type=int, default=2, help="wrk warm-up before each saturation run, seconds")
    ap.add_argument("--proxies", default="nginx,haproxy,weir")
    ap.add_argument("--origin-workers", type=int, default=1)
    ap.add_argument("--routes", type=int, default=1000, help="routes for the idle-RSS measurement (0: skip)")
    ap.add_argument("--profile", action="store_true", help="perf stat/record weir-agent N=1 under wrk")
    ap.add_argument("--wait-quiet", type=float, default=10,
                    help="before each run wait up to this many seconds for the machine to be idle")
    ap.add_argument("--max-noise", type=float, default=0.05,
                    help="a round in which other processes used more than this share of the CPUs is repeated")
    ap.add_argument("--retries", type=int, default=1, help="repetitions of a noisy round (the quietest attempt is kept)")
    ap.add_argument("--nice", type=int, default=-10,
                    help="niceness increment for the benchmark and everything it starts (0: leave as is)")
    ap.add_argument("--no-install", action="store_true")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--json", default="/tmp/weir-proxy-bench.json", help="raw results file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    ap.add_argument("--bin-dir", default=BIN, help="where weir-agent, weir-controller and weir-load are")
    args = ap.parse_args()
    BIN = os.path.abspath(args.bin_dir)

    global NICE
    NICE = args.nice
    if NICE:
        # Every process started from here on (proxies, origins, load generators) inherits it,
        # so background jobs on a shared machine disturb the runs less (CFS weights). With
        # autogroups (kernel.sched_autogroup_enabled) the weight that counts between sessions
        # is the session's autogroup nice, so this script gets a session of its own and every
        # session it starts gets the same autogroup nice.
        try:
            os.nice(NICE)
            try:
                os.setsid()
            except OSError:
                pass  # already a session or process-group leader: keep its autogroup
            set_autogroup_nice(os.getpid())
        except PermissionError:
            log("cannot raise priority (not root?); running at normal priority")
            NICE = 0
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    workers_list = [int(x) for x in args.workers.split(",")]
    names = [x for x in args.proxies.split(",") if x]
    if names[0] != "nginx":
        sys.exit("--proxies must start with nginx (the reference and the source of the fixed rate)")

    ensure_tools(args.no_install)
    if args.profile:
        ensure_perf(args.no_install)
    build(args.no_build)
    for b in ["weir-load"] + (["weir-agent", "weir-controller"] if "weir" in names else []):
        if not os.access(f"{BIN}/{b}", os.X_OK):
            sys.exit(f"{BIN}/{b} missing (build failed?)")

    d = tempfile.mkdtemp(prefix="weir-bench-")
    log(f"work dir {d}")
    # Snapshot the binaries: a concurrent `cargo build` must not swap them mid-benchmark.
    os.makedirs(f"{d}/bin")
    for b in ["weir-load", "weir-agent", "weir-controller"]:
        if os.path.exists(f"{BIN}/{b}"):
            shutil.copy2(f"{BIN}/{b}", f"{d}/bin/{b}")
    BIN = f"{d}/bin"
    started = datetime.datetime.now(datetime.timezone.utc)
    results, discarded, extra = [], [], {}
    try:
        origins = start_origins(d, args.origin_workers)
        if "weir" in names:
            weir_manifests(f"{d}/config", 1)
            Weir.controller = Weir.start_controller(d, f"{d}/config")
        classes = {"nginx": Nginx, "haproxy": Haproxy, "weir": Weir}
        for rnd in range(1, args.rounds + 1):
            for n in workers_list:
                best = None
                for attempt in range(args.retries + 1):
                    log(f"round {rnd}/{args.rounds}, N={n}" + (f", attempt {attempt + 1}" if attempt else ""))
                    rate, triple = None, []
                    for name in names:
                        r = run_one(classes[name](d, n), args, origins, rate)
                        r["round"], r["attempt"] = rnd, attempt
                        triple.append(r)
                        if name == "nginx":
                            rate = r["rps"] / 2
                            r["lat_rate"] = rate
                    # Noise: CPU used by other processes during this triple's runs, as a
                    # share of the machine.
                    noise = max(
                        max(r["foreign_cpu_s"] / (2 * args.duration), r["lat_foreign_cpu_s"] / (2 * (args.lat_duration + 1)))
                        for r in triple
                    )
                    for r in triple:
                        r["round_noise"] = noise
                    if best is None or noise < best[0]:
                        if best is not None:
                            discarded.extend(best[1])
                        best = (noise, triple)
                    else:
                        discarded.extend(triple)
                    if noise <= args.max_noise:
                        break
                    log(f"  other processes used {noise:.0%} of the machine during this round"
                        + (" - repeating it" if attempt < args.retries else " - keeping the quietest attempt"))
                results.extend(best[1])
        if "weir" in names and args.routes:
            stop(Weir.controller)
            for n in workers_list:
                for routes in (1, args.routes):
                    m = weir_routes_rss(d, n, routes)
                    log(f"  weir N={n} idle with {routes} routes: RSS {m['rss_kb'] / 1024:.1f} MB (applied in {m['applied_s']:.1f}s)")
                    extra.setdefault("routes_rss", []).append(m)
        if "weir" in names and args.profile:
            if Weir.controller is None or Weir.controller.poll() is not None:
                Weir.controller = Weir.start_controller(d, f"{d}/config")
            extra["profile"] = profile_weir(d, 1, args.duration)
        stop(origins)
    finally:
        cleanup()
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)

    tbl, summary = table(results, workers_list, names)
    with open(args.json, "w") as f:
        json.dump(
            {"started": started.isoformat(), "args": vars(args), "runs": results, "discarded_noisy_runs": discarded, **extra},
            f,
            indent=1,
        )

    cmd = "python3 tests/bench/proxy_bench.py " + " ".join(sys.argv[1:])
    print(f"### Results ({started:%Y-%m-%d %H:%M} UTC, `{cmd.strip()}`)\n")
    print(f"Medians of {args.rounds} interleaved rounds; × nginx = median of per-round ratios to nginx with the same N.")
    print(f"Saturation: `wrk -t1 -c64 -d{args.duration}s` on CPU 0; latency: `weir-load -c 64` open loop at half of nginx's")
    print(f"saturation rps (same round, same N) for {args.lat_duration}s; RSS = sum of VmRSS of the proxy's processes.\n")
    print(tbl)
    if any(r.get("overloaded") for r in results):
        print("\n† k: in k rounds the proxy did not keep up with the fixed rate (answers completed in the period "
              "< 95 % of the rate, or requests still unanswered 5 s after the schedule): those percentiles measure a queue.")
    if extra.get("routes_rss"):
        print("\n| weir-agent idle | N | routes | RSS (MB) | PSS (MB) | applied in (s) |")
        print("|---|---|---:|---:|---:|---:|")
        for m in extra["routes_rss"]:
            print(f"| | {m['workers']} | {m['routes']} | {m['rss_kb'] / 1024:.1f} | {m['pss_kb'] / 1024:.1f} | {m['applied_s']:.1f} |")
    goals = []
    for n in workers_list:
        w, h = summary.get(("weir", n)), summary.get(("haproxy", n))
        if not w:
            continue
        goals.append(f"- N={n}: throughput {fmt(w['rps_x'], 2)}× nginx (goal ≥ 1.20) "
                     f"{'✓' if w['rps_x'] and w['rps_x'] >= 1.2 else '✗'}; "
                     f"vs HAProxy {fmt(w['rps'] / h['rps'] if h else None, 2)}× (goal ≥ 1.00) "
                     f"{'✓' if h and w['rps'] >= h['rps'] else '✗'}; "
                     f"p99 {fmt(w['p99_x'], 2)}× nginx (goal ≤ 1.00) {'✓' if w['p99_x'] and w['p99_x'] <= 1.0 else '✗'}")
    for m in extra.get("routes_rss", []):
        if m["routes"] == args.routes:
            goals.append(f"- idle RSS with {m['routes']} routes, N={m['workers']}: {m['rss_kb'] / 1024:.1f} MB (goal ≤ 20) "
                         f"{'✓' if m['rss_kb'] <= 20 * 1024 else '✗'}")
    if goals:
        print("\nGoals (weir):\n" + "\n".join(goals))
    noise = sorted({(r["round"], r["workers"]): r["round_noise"] for r in results}.values())
    if noise:
        print(f"\nNoise: CPU share used by other processes during a round (max over its runs): median {med(noise):.0%}, "
              f"max {max(noise):.0%} over {len(noise)} rounds kept; {len(discarded) // max(len(names), 1)} noisier "
              f"round(s) repeated (threshold {args.max_noise:.0%}).")
    errs = [r for r in results if r["sat_errors"] or r["lat"]["errors"]]
    if errs:
        print("\nErrors seen: " + ", ".join(f"{r['proxy']} N={r['workers']} round {r['round']}: wrk {r['sat_errors']}, weir-load {r['lat']['errors']}" for r in errs))
    if extra.get("profile"):
        p = extra["profile"]
        print("\n<details><summary>perf (weir-agent N=1 under wrk)</summary>\n\n```")
        print(p["perf_stat"].strip())
        print("\n# self time by object\n" + "\n".join(p["by_dso"]))
        print("\n# self time by symbol\n" + "\n".join(p["top_self"]))
        print("\n# with children\n" + "\n".join(p["top_children"]))
        print("```\n</details>")
    log(f"raw results: {args.json}")


if __name__ == "__main__":
    main()
