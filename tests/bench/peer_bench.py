#!/usr/bin/env python3
"""Cache peer fill: what a miss costs when the owning agent answers it, and how many fetches
the origin is spared.

    python3 tests/bench/peer_bench.py                  # 2000 keys, 3 rounds
    python3 tests/bench/peer_bench.py --keys 5000 --rounds 5 --no-build

Setup (per round, per mode): the nginx origin of cache_bench.py (4 KiB objects `/4k?i=K`,
`Cache-Control: max-age=3600`), one weir-controller in local mode and two weir-agents A and B
(`--workers 1`, each `--cache-peer-addr` its own listener), policy
`cache: {enabled: true, maxSize: 256Mi, peers: P}` with P true ("peers") or false ("alone").

Each round walks every key once through A, then once through B, then once more through B,
sequentially on one keep-alive connection (so each latency is a service time, not a queue;
the client is Python's http.client, whose own cost is in every figure alike):

  * pass 1 (A, cold): with peers, a key A owns is fetched from the origin by A ("origin"),
    a key B owns is fetched by B for A ("origin via peer": two hops, B keeps it);
  * pass 2 (B): with peers, a key A owns comes from A's cache (`x-cache: PEER`, "peer hit"),
    a key B owns is in B's memory already ("memory hit"); alone, every key is a miss again;
  * pass 3 (B): every key is a memory hit ("memory hit").

Ownership is read from pass 2's `x-cache` (PEER: A owns it). Reported: per class, p50 and
p99 latency in ms (medians over rounds), and the fetches the origin saw (from the agents'
`/config` counters: fills led minus those a peer answered) over the 2 × keys first touches.
"""

import argparse
import datetime
import http.client
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cache_bench as cb  # noqa: E402
import proxy_bench as pb  # noqa: E402

log = pb.log
AGENTS = {"A": (18211, 18212), "B": (18213, 18214)}  # name: (listen, admin)


def manifests(cfg, peers):
    cb.Weir.manifests(cfg)
    path = f"{cfg}/bench.yaml"
    with open(path) as f:
        text = f.read()
    cache = f"{{enabled: true, maxSize: 256Mi, peers: {'true' if peers else 'false'}}}"
    text = text.replace("  cache: {enabled: true, maxSize: 64Mi}\n", f"  cache: {cache}\n")
    with open(path, "w") as f:
        f.write(text)


def config(admin):
    s, _, b = cb.get(f"http://127.0.0.1:{admin}/config")
    return json.loads(b) if s == 200 else {}


def origin_fetches(admin):
    st = (config(admin).get("routes") or [{}])[0].get("cache", {}).get("stats", {})
    return st.get("misses", 0) - st.get("peerHits", 0) - st.get("peerFills", 0)


def walk(port, keys):
    """GET every key once, in order, on one connection: [(key, ms, x-cache)]."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    out = []
    for k in range(1, keys + 1):
        t = time.perf_counter()
        conn.request("GET", f"/4k?i={k}", headers={"Host": cb.HOST})
        r = conn.getresponse()
        body = r.read()
        ms = (time.perf_counter() - t) * 1e3
        assert r.status == 200 and len(body) == 4096, (k, r.status, len(body))
        out.append((k, ms, r.getheader("x-cache", "")))
    conn.close()
    return out


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def one_round(d, rnd, peers, keys):
    mode = "peers" if peers else "alone"
    cfg = f"{d}/config-{mode}-{rnd}"
    manifests(cfg, peers)
    ctrl = pb.Weir.start_controller(d, cfg, grpc=cb.CTRL_GRPC, admin=cb.CTRL_ADMIN, tag=f"controller-{mode}-{rnd}")
    procs = []
    try:
        for name, (listen, admin) in AGENTS.items():
            procs.append(pb.start([f"{pb.BIN}/weir-agent", "--controller", f"http://127.0.0.1:{cb.CTRL_GRPC}",
                                   "--listen", f"127.0.0.1:{listen}", "--admin-addr", f"127.0.0.1:{admin}",
                                   "--node-name", name, "--workers", "1",
                                   "--cache-peer-addr", f"127.0.0.1:{listen}"],
                                  f"{d}/agent-{name}-{mode}-{rnd}.log", env=dict(os.environ, WEIR_LOG="warn")))
        for (listen, admin), p in zip(AGENTS.values(), procs):
            pb.wait_until(lambda: pb.http_get(f"http://127.0.0.1:{admin}/readyz")[0] == 200, 30, "agent ready", p)
            if peers:
                pb.wait_until(lambda: len(config(admin).get("cachePeers") or []) == 2, 30, "peer set", p)
        (a, a_admin), (b, b_admin) = AGENTS["A"], AGENTS["B"]
        first = walk(a, keys)
        second = walk(b, keys)
        third = walk(b, keys)
        fetched = origin_fetches(a_admin) + origin_fetches(b_admin)
    finally:
        for p in procs:
            pb.stop(p)
        pb.stop(ctrl)
    a_owns = {k for k, _, x in second if x == "PEER"}
    classes = {"memory hit": [ms for _, ms, _ in third]}
    if peers:
        classes["origin (A owns it)"] = [ms for k, ms, _ in first if k in a_owns]
        classes["origin via peer (B owns it)"] = [ms for k, ms, _ in first if k not in a_owns]
        classes["peer hit (A owns it)"] = [ms for k, ms, x in second if x == "PEER"]
        classes["memory hit after peer fill"] = [ms for k, ms, x in second if x == "HIT"]
    else:
        classes["origin"] = [ms for _, ms, _ in first] + [ms for _, ms, _ in second]
    return {"mode": mode, "round": rnd, "origin_fetches": fetched, "a_owns": len(a_owns),
            "classes": {c: {"n": len(v), "p50": pct(v, 0.5), "p99": pct(v, 0.99)} for c, v in classes.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-install", action="store_true")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--bin-dir", default=pb.BIN)
    ap.add_argument("--json", default="/tmp/weir-peer-bench.json")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    signal.signal(signal.SIGINT, pb.on_signal)
    signal.signal(signal.SIGTERM, pb.on_signal)
    if not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")):
        if args.no_install:
            sys.exit("nginx not found (run without --no-install to get it from Debian)")
        cb.ensure_tools(False)
    pb.build(args.no_build)
    d = tempfile.mkdtemp(prefix="weir-peer-bench-")
    os.makedirs(f"{d}/bin")
    for b in ["weir-agent", "weir-controller"]:
        shutil.copy2(f"{os.path.abspath(args.bin_dir)}/{b}", f"{d}/bin/{b}")
    pb.BIN = f"{d}/bin"
    started = datetime.datetime.now(datetime.timezone.utc)
    load1 = os.getloadavg()[0]
    results = []
    try:
        origin = cb.start_origin(d)
        for rnd in range(1, args.rounds + 1):
            for peers in (True, False):
                r = one_round(d, rnd, peers, args.keys)
                results.append(r)
                log(f"  {r['mode']} r{rnd}: origin fetches {r['origin_fetches']}  " + "  ".join(
                    f"{c} p50 {v['p50']:.3f} p99 {v['p99']:.3f}" for c, v in r["classes"].items()))
        pb.stop(origin)
    finally:
        pb.cleanup()
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
    with open(args.json, "w") as f:
        json.dump({"started": started.isoformat(), "args": vars(args), "runs": results}, f, indent=1)
    cmd = "python3 tests/bench/peer_bench.py " + " ".join(sys.argv[1:])
    print(f"### Cache peer fill ({started:%Y-%m-%d %H:%M} UTC, `{cmd.strip()}`)\n")
    print(f"{args.keys} distinct 4 KiB objects, each fetched once through agent A, then twice through B "
          f"(sequential, one keep-alive connection); medians of {args.rounds} round(s); load1 {load1:.2f} at start.\n")
    print("| mode | class | requests | p50 ms | p99 ms |")
    print("| --- | --- | ---: | ---: | ---: |")
    for mode in ("peers", "alone"):
        rs = [r for r in results if r["mode"] == mode]
        for c in rs[0]["classes"] if rs else []:
            med = lambda f: statistics.median(r["classes"][c][f] for r in rs)  # noqa: E731
            print(f"| {mode} | {c} | {med('n'):.0f} | {med('p50'):.3f} | {med('p99'):.3f} |")
    print("\n| mode | origin fetches for 2 × keys first touches |")
    print("| --- | ---: |")
    for mode in ("peers", "alone"):
        rs = [r for r in results if r["mode"] == mode]
        if rs:
            print(f"| {mode} | {statistics.median(r['origin_fetches'] for r in rs):.0f} of {2 * args.keys} |")
    log(f"raw results: {args.json}")


if __name__ == "__main__":
    main()
