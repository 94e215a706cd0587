#!/usr/bin/env python3
"""The control plane at scale: one local-mode weir-controller, thousands of simulated agents.

Usage (from anywhere in the repo; builds the release binaries first unless --no-build):

    python3 tests/bench/scale.py                       # the 1k run, then the 10k run
    python3 tests/bench/scale.py --runs 1k --no-build
    python3 tests/bench/scale.py --agents 2000 --services 500 --rate 20 --duration 15

Method (see tests/bench/README.md, "Control plane at scale"):
  * config: --services Services × --endpoints endpoints, each Service and its EndpointSlice
    (discovery.k8s.io/v1, label kubernetes.io/service-name) in one file svc-NNNN.yaml, one
    TrafficPolicy per Service (hosts [svc-NNNN.bench], one backendRef) in policy-NNNN.yaml;
  * `weir-controller --config-dir` on it (WEIR_LOG=warn), then `weir-sim` with --agents
    agents, one HTTP/2 connection each (tests/src/sim.rs: real streams, real protocol);
  * initial sync: from the simulator's start until every agent holds the newest version;
  * idle: controller CPU over --idle seconds with nothing changing; VmRSS and VmHWM from
    /proc/<pid>/status;
  * churn: --rate endpoint readiness flips per second for --duration seconds, open loop, each
    on a distinct endpoint (ready -> false), written as a user would: the Service's file is
    written whole to a dot-file in the same folder (ignored by the controller) and renamed
    over it. Convergence of a flip = the last agent's receive time of the update that made
    (route, address) not ready, minus the time just before the rename. Controller and
    simulator CPU over the churn window (vCPU = CPU seconds / wall seconds);
  * one isolated change on a quiet system: bytes of RoutingUpdate (protobuf encoded_len)
    per agent that received it;
  * reconnect storm: every agent drops its stream and reconnects at once (POST /reconnect);
    time until each holds a full table of the newest version again;
  * with --cache-peers, every simulated agent announces a cache peer address, so the
    controller also sends each the list of its zone's agents (--zones; one zone is the
    worst case): the time until every agent holds its whole zone's list, after the initial
    sync and after the storm, and the bytes of those lists; with a single zone, then one
    more agent joins it (a second weir-sim): the bytes each agent is sent for that.
Every wait is capped (--timeout); a phase that does not finish is reported as "did not
converge" and the run goes on.

Writes the raw results as JSON (--json) and prints a markdown table on stdout. Every process
it starts runs in its own session and is killed (by process group) on exit, Ctrl-C or
SIGTERM.
"""

import argparse
import datetime
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import proxy_bench as pb  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
BIN = os.path.join(REPO, "target", "release")  # --bin-dir
CTRL_GRPC = 18200
CTRL_ADMIN = 18201
SIM_ADMIN = 18202
PORT = 8080  # the endpoints' port (nothing listens: agents are simulated)
PRESETS = {
    "1k": dict(agents=1000, services=1000, endpoints=10, rate=50.0, duration=30.0),
    "10k": dict(agents=10000, services=1000, endpoints=10, rate=5.0, duration=20.0),
}

def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes (proxy_bench.py's)

# Each process started by `start` runs in its own session and is stopped by process group.
start, stop, cleanup, on_signal = pb.start, pb.stop, pb.cleanup, pb.on_signal


def cpu_seconds(pid):
    return pb.cpu_seconds([pid])


def mem_kib(pid):
    """{'VmRSS': kB, 'VmHWM': kB} of pid."""
    got = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in ("VmRSS", "VmHWM"):
                    got[key] = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return got


def http(url, method="GET", timeout=10.0):
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, urllib.error.URLError):
        return None, b""


def sim_stats(brief=True):
    status, body = http(f"http://127.0.0.1:{SIM_ADMIN}/stats" + ("?brief" if brief else ""), timeout=30.0)
    if status != 200:
        return None
    return json.loads(body)


def wait_until(pred, timeout, what, procs=(), interval=0.1):
    """Polls pred() until it returns a truthy value (returned); None after timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: process {p.args[0]} exited with {p.returncode}")
        v = pred()
        if v:
            return v
        time.sleep(interval)
    log(f"  timed out after {timeout:.0f}s waiting for {what}")
    return None


# ---------------------------------------------------------------- setup


def build(skip):
    if skip:
        return
    log("cargo build --release -p weir-controller -p weir-tests")
    subprocess.run(["cargo", "build", "--release", "-p", "weir-controller", "-p", "weir-tests"], cwd=REPO, check=True)


def raise_nofile():
    """One socket per agent on each side: the controller and the simulator inherit this."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as e:
            log(f"cannot raise RLIMIT_NOFILE ({e}); raise it with `ulimit -n`")
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def ip(s, e):
    return f"10.{s // 250}.{s % 250}.{e + 1}"


def service_doc(s, endpoints, not_ready):
    name = f"svc-{s:04d}"
    eps = "".join(
        f'  - addresses: ["{ip(s, e)}"]\n    conditions: {{ready: {"false" if (s, e) in not_ready else "true"}}}\n'
        f"    zone: z{e % 3 + 1}\n"
        for e in range(endpoints)
    )
    return (
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n"
        f"spec:\n  ports: [{{name: http, port: 80, targetPort: {PORT}}}]\n---\n"
        f"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-abcde\n"
        f"  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\n"
        f"ports: [{{name: http, port: {PORT}}}]\nendpoints:\n{eps}"
    )


def policy_doc(s):
    name = f"svc-{s:04d}"
    return (
        "apiVersion: weir.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n"
        f"  name: {name}\n  namespace: default\nspec:\n  hosts: [\"{name}.bench\"]\n"
        "  loadBalancer: {algorithm: RoundRobin}\n"
        f"  rules:\n    - backendRefs: [{{name: {name}, port: 80}}]\n"
    )


def write_file(cfg, name, text):
    """As a user (or kubectl cp) would: whole into a dot-file the controller ignores, then
    renamed over the real one. Returns the time (ns) just before the rename."""
    tmp = os.path.join(cfg, f".{name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    t = time.time_ns()
    os.rename(tmp, os.path.join(cfg, name))
    return t


def manifests(cfg, services, endpoints):
    os.makedirs(cfg, exist_ok=True)
    for s in range(services):
        with open(f"{cfg}/svc-{s:04d}.yaml", "w") as f:
            f.write(service_doc(s, endpoints, ()))
        with open(f"{cfg}/policy-{s:04d}.yaml", "w") as f:
            f.write(policy_doc(s))


def controller_version():
    status, body = http(f"http://127.0.0.1:{CTRL_ADMIN}/metrics")
    if status != 200:
        return None
    for line in body.decode().splitlines():
        if line.startswith("weir_controller_table_version"):
            return int(float(line.split()[-1]))
    return None


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    k = min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))
    return xs[k]


# ---------------------------------------------------------------- one run


def run(name, cfg_args, args, d):
    n = cfg_args["agents"]
    services, endpoints = cfg_args["services"], cfg_args["endpoints"]
    rate, duration = cfg_args["rate"], cfg_args["duration"]
    flips = int(rate * duration)
    if flips + 1 > services * endpoints:
        raise SystemExit(f"{name}: {flips} flips need as many distinct endpoints; only {services * endpoints}")
    r = {"name": name, **cfg_args}
    rd = f"{d}/{name}"
    cfg = f"{rd}/config"
    manifests(cfg, services, endpoints)
    log(f"[{name}] {services} services × {endpoints} endpoints, {n} agents")

    t = time.time()
    ctrl = start(
        [f"{BIN}/weir-controller", "--config-dir", cfg,
         "--grpc-addr", f"127.0.0.1:{CTRL_GRPC}", "--admin-addr", f"127.0.0.1:{CTRL_ADMIN}"],
        f"{rd}/controller.log",
        env=dict(os.environ, WEIR_LOG="warn"),
    )
    if not wait_until(lambda: http(f"http://127.0.0.1:{CTRL_ADMIN}/readyz", timeout=2)[0] == 200, args.timeout,
                      "controller ready", [ctrl]):
        r["error"] = "controller not ready"
        return r
    r["controller_load_s"] = time.time() - t
    r["controller_after_load"] = mem_kib(ctrl.pid)
    version = controller_version()

    t0 = time.time()
    cpu_c0 = cpu_seconds(ctrl.pid)
    sim = start(
        [f"{BIN}/weir-sim", "--controller", f"http://127.0.0.1:{CTRL_GRPC}", "--agents", str(n),
         "--admin-addr", f"127.0.0.1:{SIM_ADMIN}", "--report", f"{rd}/sim-report.json",
         "--channels", str(args.channels), "--zones", args.zones]
        + (["--cache-peers"] if args.cache_peers else []),
        f"{rd}/sim.log",
    )
    procs = [ctrl, sim]
    synced = wait_until(
        lambda: (lambda s: s if s and s["synced"] == n and s["newest_version"] >= (version or 0) else None)(sim_stats()),
        args.timeout, f"{n} agents synced", procs, interval=0.05)
    if not synced:
        s = sim_stats() or {}
        r["initial_sync"] = {"converged": False, "synced": s.get("synced"), "connected": s.get("connected")}
        r["final_sim"] = s
        stop(sim)
        stop(ctrl)
        return r
    r["initial_sync"] = {"converged": True, "seconds": time.time() - t0,
                         "controller_cpu_s": cpu_seconds(ctrl.pid) - cpu_c0, "sim_cpu_s": synced["cpu_seconds"]}
    log(f"  initial sync {r['initial_sync']['seconds']:.2f}s")
    if args.cache_peers:
        whole = wait_until(
            lambda: (lambda s: s if s and s["cache_peers"]["agents_with_whole_zone"] >= n else None)(sim_stats()),
            args.timeout, "every agent holds its zone's peer list", procs, interval=0.05)
        p = (whole or sim_stats() or {}).get("cache_peers", {})
        r["peers_initial"] = {
            "converged": bool(whole), "lists": p.get("lists_received"), "bytes": p.get("bytes_received"),
            "seconds": (p["last_list_unix_ns"] / 1e9 - t0) if whole else None,
            "agents_with_whole_zone": p.get("agents_with_whole_zone"),
        }
        log(f"  peer lists: {r['peers_initial']}")

    # Idle: nothing changes (the controller still rescans its folder and pings agents).
    time.sleep(2)
    c0, s0, w0 = cpu_seconds(ctrl.pid), cpu_seconds(sim.pid), time.time()
    time.sleep(args.idle)
    w = time.time() - w0
    r["idle"] = {"controller_vcpu": (cpu_seconds(ctrl.pid) - c0) / w, "sim_vcpu": (cpu_seconds(sim.pid) - s0) / w,
                 "seconds": w, "controller_mem_kib": mem_kib(ctrl.pid)}
    log(f"  idle controller {r['idle']['controller_vcpu']:.3f} vCPU, "
        f"RSS {r['idle']['controller_mem_kib'].get('VmRSS', 0) / 1024:.0f} MiB")

    # Churn: flip k makes endpoint (k mod S, k div S) not ready; earlier flips stay.
    not_ready = set()
    targets = [(k % services, (k // services) % endpoints) for k in range(flips + 1)]
    writes = []
    c0, s0 = cpu_seconds(ctrl.pid), cpu_seconds(sim.pid)
    start_t = time.time() + 0.1
    for k in range(flips):
        due = start_t + k / rate
        delay = due - time.time()
        if delay > 0:
            time.sleep(delay)
        s, e = targets[k]
        not_ready.add((s, e))
        at = write_file(cfg, f"svc-{s:04d}.yaml", service_doc(s, endpoints, not_ready))
        writes.append({"route": f"default/svc-{s:04d}", "address": f"{ip(s, e)}:{PORT}", "write_ns": at})
    wall = time.time() - start_t
    churn = {"flips": flips, "seconds": wall, "late_s": max(0.0, wall - duration),
             "controller_vcpu": (cpu_seconds(ctrl.pid) - c0) / wall, "sim_vcpu": (cpu_seconds(sim.pid) - s0) / wall}
    log(f"  {flips} flips written in {wall:.1f}s; waiting for every agent to see them")
    done = wait_until(lambda: (lambda s: s if s and s["changes_seen_by_all"] >= flips else None)(sim_stats()),
                      args.timeout, "every agent saw every flip", procs, interval=0.25)
    churn["all_seen_wait_s"] = time.time() - start_t - wall
    churn["controller_vcpu_until_converged"] = (cpu_seconds(ctrl.pid) - c0) / (time.time() - start_t)
    full = sim_stats(brief=False) or {}
    obs = {(o["route"], o["address"], o["ready"]): o for o in full.get("observations", [])}
    conv, missing, partial = [], 0, 0
    for wr in writes:
        o = obs.get((wr["route"], wr["address"], False))
        if o is None:
            missing += 1
        elif o["agents"] < n:
            partial += 1
        else:
            conv.append((o["last_unix_ns"] - wr["write_ns"]) / 1e9)
            wr["first_s"] = (o["first_unix_ns"] - wr["write_ns"]) / 1e9
            wr["last_s"] = conv[-1]
    churn.update({
        "converged": bool(done), "every_agent_saw_every_flip": len(conv) == flips,
        "flips_seen_by_all": len(conv), "flips_seen_by_none": missing, "flips_seen_by_some": partial,
        "p50_s": pct(conv, 50), "p99_s": pct(conv, 99), "max_s": max(conv) if conv else None,
        "first_agent_p50_s": pct([w["first_s"] for w in writes if "first_s" in w], 50),
        "versions": len([v for v in full.get("by_version", {}) if int(v) > (synced["newest_version"])]),
        "controller_mem_kib": mem_kib(ctrl.pid), "writes": writes,
    })
    r["churn"] = churn
    log(f"  churn: p50 {churn['p50_s']}, p99 {churn['p99_s']}, max {churn['max_s']}; "
        f"seen by all {len(conv)}/{flips}; controller {churn['controller_vcpu']:.2f} vCPU")

    # One isolated change, once everything is quiet.
    quiet = wait_until(lambda: (lambda s: s if s and s["synced"] == n else None)(sim_stats()), args.timeout,
                       "quiet before the isolated change", procs)
    if quiet:
        before = quiet["newest_version"]
        s, e = targets[flips]
        not_ready.add((s, e))
        at = write_file(cfg, f"svc-{s:04d}.yaml", service_doc(s, endpoints, not_ready))
        key = (f"default/svc-{s:04d}", f"{ip(s, e)}:{PORT}", False)
        seen = wait_until(lambda: (lambda st: st if st and st["changes_seen_by_all"] >= flips + 1 else None)(sim_stats()),
                          args.timeout, "the isolated change seen by every agent", procs)
        full = sim_stats(brief=False) or {}
        newer = {int(v): x for v, x in full.get("by_version", {}).items() if int(v) > before}
        agents = sum(x["agents"] for x in newer.values())
        total = sum(x["bytes"] for x in newer.values())
        o = next((o for o in full.get("observations", []) if (o["route"], o["address"], o["ready"]) == key), None)
        r["isolated"] = {
            "converged": bool(seen), "versions": sorted(newer), "updates": agents, "bytes": total,
            "bytes_per_agent": total / agents if agents else None,
            "routes_per_update": sum(x["upserted"] for x in newer.values()) / agents if agents else None,
            "full_updates": sum(x["full"] for x in newer.values()),
            "last_agent_s": (o["last_unix_ns"] - at) / 1e9 if o and o["agents"] >= n else None,
        }
        log(f"  isolated change: {r['isolated']['bytes_per_agent']} bytes per agent over {agents} updates")

    # Reconnect storm.
    r["peer_lists_before_storm"] = ((sim_stats() or {}).get("cache_peers") or {}).get("lists_received", 0)
    c0, s0, t = cpu_seconds(ctrl.pid), cpu_seconds(sim.pid), time.time()
    status, body = http(f"http://127.0.0.1:{SIM_ADMIN}/reconnect", method="POST")
    epoch = json.loads(body)["epoch"] if status == 200 else None
    storm = wait_until(
        lambda: (lambda s: s if s and s["storm"]["epoch"] == epoch and s["storm"]["agents_with_full_table"] >= n
                 and s["synced"] == n else None)(sim_stats()),
        args.timeout, "every agent back with a full table", procs, interval=0.05)
    s = storm or sim_stats() or {}
    st = s.get("storm", {})
    if args.cache_peers and storm:
        lists0 = r.get("peer_lists_before_storm", 0)
        whole = wait_until(
            lambda: (lambda s: s if s and s["cache_peers"]["whole_zone_since_storm"] >= n else None)(sim_stats()),
            args.timeout, "every agent holds its zone's peer list again", procs, interval=0.05)
        p = (whole or sim_stats() or {}).get("cache_peers", {})
        r["peers_storm"] = {
            "converged": bool(whole),
            "seconds": (p["last_list_unix_ns"] - st["started_unix_ns"]) / 1e9 if whole else None,
            "lists": p.get("lists_received", 0) - lists0,
        }
        log(f"  peer lists after the storm: {r['peers_storm']}")
    w = time.time() - t
    r["storm"] = {
        "converged": bool(storm),
        "seconds": (st["last_full_unix_ns"] - st["started_unix_ns"]) / 1e9 if storm else None,
        "agents_with_full_table": st.get("agents_with_full_table"),
        "controller_vcpu": (cpu_seconds(ctrl.pid) - c0) / w, "sim_vcpu": (cpu_seconds(sim.pid) - s0) / w,
        "controller_mem_kib": mem_kib(ctrl.pid),
    }
    log(f"  reconnect storm: {r['storm']['seconds']}s")

    if args.cache_peers and "," not in args.zones:
        # One more agent joins the (single) zone: what each of the others is sent.
        before = (sim_stats() or {}).get("cache_peers", {})
        t = time.time()
        late = start(
            [f"{BIN}/weir-sim", "--controller", f"http://127.0.0.1:{CTRL_GRPC}", "--agents", "1",
             "--prefix", "late", "--zones", args.zones, "--cache-peers",
             "--admin-addr", f"127.0.0.1:{SIM_ADMIN + 1}"],
            f"{rd}/sim-late.log",
        )
        joined = wait_until(
            lambda: (lambda s: s if s and s["cache_peers"]["peers_held"] >= n * (n + 1) else None)(sim_stats()),
            args.timeout, "every agent holds the zone with one more agent", procs + [late], interval=0.05)
        p = (joined or {}).get("cache_peers", {})
        lists = p.get("lists_received", 0) - before.get("lists_received", 0)
        r["peers_join"] = {
            "converged": bool(joined),
            "seconds": (p["last_list_unix_ns"] / 1e9 - t) if joined else None,
            "lists": lists, "deltas": p.get("deltas_received", 0) - before.get("deltas_received", 0),
            "bytes_per_agent": (p.get("bytes_received", 0) - before.get("bytes_received", 0)) / lists if lists else None,
            "whole_list_bytes": before.get("bytes_received", 0) / before["lists_received"]
            if before.get("lists_received") else None,
        }
        log(f"  one agent joins the zone: {r['peers_join']}")
        stop(late)

    r["controller_final_mem_kib"] = mem_kib(ctrl.pid)
    r["final_sim"] = sim_stats() or {}
    stop(sim)
    stop(ctrl)
    return r


# ---------------------------------------------------------------- report


def f(x, nd=2, unit=""):
    return "–" if x is None else f"{x:.{nd}f}{unit}"


def table(results):
    cols = [r["name"] for r in results]
    rows = []

    def row(label, fn):
        cells = []
        for r in results:
            try:
                cells.append(fn(r))
            except (KeyError, TypeError):
                cells.append("–")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")

    dnc = "did not converge"
    row("agents × services × endpoints", lambda r: f"{r['agents']:,} × {r['services']:,} × {r['endpoints']}")
    row("initial sync of all agents (s)",
        lambda r: f(r["initial_sync"]["seconds"]) if r["initial_sync"]["converged"]
        else f"{dnc} ({r['initial_sync']['synced']} synced)")
    row("controller idle (vCPU)", lambda r: f(r["idle"]["controller_vcpu"], 3))
    row("controller VmRSS / VmHWM after sync (MiB)",
        lambda r: f"{r['idle']['controller_mem_kib']['VmRSS'] / 1024:.0f} / {r['idle']['controller_mem_kib']['VmHWM'] / 1024:.0f}")
    row("churn: flips (rate × s)", lambda r: f"{r['churn']['flips']} ({r['rate']:g}/s × {r['duration']:g})")
    row("churn: convergence p50 / p99 / max (s)",
        lambda r: f"{f(r['churn']['p50_s'])} / {f(r['churn']['p99_s'])} / {f(r['churn']['max_s'])}")
    row("churn: every agent saw every change",
        lambda r: "yes" if r["churn"]["every_agent_saw_every_flip"]
        else f"no ({r['churn']['flips_seen_by_all']}/{r['churn']['flips']}; {dnc})")
    row("churn: versions published", lambda r: str(r["churn"]["versions"]))
    row("churn: controller vCPU / simulator vCPU",
        lambda r: f"{f(r['churn']['controller_vcpu'])} / {f(r['churn']['sim_vcpu'])}")
    row("isolated change: bytes per affected agent (routes per update)",
        lambda r: f"{r['isolated']['bytes_per_agent']:,.0f} ({r['isolated']['routes_per_update']:g})")
    row("reconnect storm: all agents on a full table (s)",
        lambda r: f(r["storm"]["seconds"]) if r["storm"]["converged"]
        else f"{dnc} ({r['storm']['agents_with_full_table']} done)")
    row("reconnect storm: controller vCPU", lambda r: f(r["storm"]["controller_vcpu"]))
    if any("peers_initial" in r for r in results):
        row("cache peers: every agent holds its zone's list, from the start (s)",
            lambda r: f(r["peers_initial"]["seconds"]) if r["peers_initial"]["converged"] else dnc)
        row("cache peers: lists / bytes sent until then",
            lambda r: f"{r['peers_initial']['lists']:,} / {r['peers_initial']['bytes']:,}")
        row("cache peers: one agent joins a one-zone fleet: bytes to each agent (a whole list)",
            lambda r: f"{r['peers_join']['bytes_per_agent']:,.0f} ({r['peers_join']['whole_list_bytes']:,.0f}); "
            f"{r['peers_join']['deltas']:,} deltas of {r['peers_join']['lists']:,} messages")
        row("cache peers: after the storm, every agent holds its zone's list (s); lists sent",
            lambda r: f"{f(r['peers_storm']['seconds'])}; {r['peers_storm']['lists']:,}" if r["peers_storm"]["converged"]
            else dnc)
    row("controller VmRSS / VmHWM at the end (MiB)",
        lambda r: f"{r['controller_final_mem_kib']['VmRSS'] / 1024:.0f} / {r['controller_final_mem_kib']['VmHWM'] / 1024:.0f}")
    row("simulator CPU s total / VmHWM (MiB)",
        lambda r: f"{r['final_sim']['cpu_seconds']:.1f} / {r['final_sim']['hwm_kib'] / 1024:.0f}")
    return "\n".join([f"| | {' | '.join(cols)} |", "|---|" + "---:|" * len(cols), *rows])


def main():
    global BIN
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="1k,10k", help=f"comma-separated presets: {', '.join(PRESETS)}")
    ap.add_argument("--agents", type=int, help="a custom run instead of the presets (with the flags below)")
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--rate", type=float, default=50.0, help="readiness flips per second")
    ap.add_argument("--duration", type=float, default=30.0, help="churn seconds")
    ap.add_argument("--idle", type=float, default=10.0, help="idle CPU window, seconds")
    ap.add_argument("--channels", type=int, default=0, help="weir-sim --channels (0: a connection per agent)")
    ap.add_argument("--timeout", type=float, default=180.0, help="cap of every wait, seconds")
    ap.add_argument("--zones", default="z1,z2,z3", help="weir-sim --zones (agents spread round robin)")
    ap.add_argument("--cache-peers", action="store_true",
                    help="agents announce cache peer addresses; measure the peer lists too")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--bin-dir", default=BIN, help="where weir-controller and weir-sim are")
    ap.add_argument("--json", default="/tmp/weir-scale-bench.json", help="raw results file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs, sim reports)")
    args = ap.parse_args()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    build(args.no_build)
    BIN = os.path.abspath(args.bin_dir)
    for b in ["weir-controller", "weir-sim"]:
        if not os.access(f"{BIN}/{b}", os.X_OK):
            sys.exit(f"{BIN}/{b} missing (build failed?)")
    if args.agents:
        runs = [("custom", dict(agents=args.agents, services=args.services, endpoints=args.endpoints,
                                rate=args.rate, duration=args.duration))]
    else:
        runs = [(x, PRESETS[x]) for x in args.runs.split(",") if x]
    nofile = raise_nofile()
    if nofile < max(c["agents"] for _, c in runs) + 256:
        log(f"RLIMIT_NOFILE is {nofile}: too low for one connection per agent; expect connect failures "
            "(raise the hard limit, or use --channels)")

    d = tempfile.mkdtemp(prefix="weir-scale-")
    log(f"work dir {d}")
    # Snapshot the binaries: a concurrent `cargo build` must not swap them mid-benchmark.
    os.makedirs(f"{d}/bin")
    for b in ["weir-controller", "weir-sim"]:
        shutil.copy2(f"{BIN}/{b}", f"{d}/bin/{b}")
    BIN = f"{d}/bin"
    started = datetime.datetime.now(datetime.timezone.utc)
    results = []
    try:
        for name, c in runs:
            results.append(run(name, c, args, d))
            with open(args.json, "w") as fh:
                json.dump({"started": started.isoformat(), "args": vars(args), "runs": results}, fh, indent=1)
    finally:
        cleanup()
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)

    cmd = "python3 tests/bench/scale.py " + " ".join(sys.argv[1:])
    print(f"### Control plane at scale ({started:%Y-%m-%d %H:%M} UTC, `{cmd.strip()}`)\n")
    print(table(results))
    for r in results:
        if r.get("error"):
            print(f"\n{r['name']}: {r['error']}")
    log(f"raw results: {args.json}")


if __name__ == "__main__":
    main()
