//! The control plane with many agents: 300 simulated agents (`weir_tests::sim`, real gRPC
//! streams in this process) follow a local-mode controller through a random sequence of
//! changes (readiness flips, weight changes, a policy added and one removed, a Service's
//! endpoints replaced) and must all end with the same table, and that table must be the one
//! a fresh controller computes from scratch on the same folder: deltas and latest-wins
//! coalescing lose nothing.
//!
//! Waits poll the controller's `/state` and the simulator's stats, bounded by [`WAIT`];
//! nothing sleeps and no timing is asserted. The sequence is random; its seed is printed and
//! `WEIR_SCALE_SEED=<seed>` replays it.

use std::collections::BTreeSet;
use std::path::Path;
use weir_tests::manifests::{docs, policy, service, slice};
use weir_tests::sim::{Sim, SimConfig};
use weir_tests::{Controller, wait_for, write_manifest};

const SERVICES: usize = 50;
const ENDPOINTS: usize = 4;
const AGENTS: usize = 300;
/// Policies 0..INITIAL_POLICIES exist at the start; one more is added later.
const INITIAL_POLICIES: usize = 45;
const STEPS: usize = 24;

/// A small deterministic generator, so a failing sequence can be replayed from its seed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// What the folder says, kept here so each change rewrites one file from it.
struct World {
    /// Per Service: (ip, ready) of each endpoint.
    endpoints: Vec<Vec<(String, bool)>>,
    /// Per policy: the weight of its first backendRef (its own Service).
    weights: Vec<i64>,
    policies: BTreeSet<usize>,
    /// Bumped when a Service's endpoints are replaced, so new addresses never repeat.
    generation: usize,
}

impl World {
    /// A random Service that some policy routes to: changing one that none uses would
    /// publish nothing, and each step waits for a new table.
    fn used_service(&self, rng: &mut XorShift) -> usize {
        let used: Vec<usize> = (0..SERVICES)
            .filter(|i| {
                self.policies.contains(i)
                    || self.policies.contains(&((i + SERVICES - 1) % SERVICES))
            })
            .collect();
        used[rng.below(used.len())]
    }

    fn new() -> Self {
        Self {
            endpoints: (0..SERVICES)
                .map(|i| {
                    (0..ENDPOINTS)
                        .map(|j| (format!("10.1.{i}.{}", j + 1), true))
                        .collect()
                })
                .collect(),
            weights: vec![3; SERVICES],
            policies: (0..INITIAL_POLICIES).collect(),
            generation: 0,
        }
    }

    fn write_service(&self, dir: &Path, i: usize) {
        let name = format!("svc-{i}");
        let eps: Vec<(&str, bool)> = self.endpoints[i]
            .iter()
            .map(|(ip, r)| (ip.as_str(), *r))
            .collect();
        write_manifest(
            dir,
            &format!("{name}.yaml"),
            &docs(&[service(&name, 80), slice(&name, 8080, &eps)]),
        );
    }

    /// Policy i sends to its own Service and, with weight 1, to the next one.
    fn write_policy(&self, dir: &Path, i: usize) {
        let own = format!("svc-{i}");
        let next = format!("svc-{}", (i + 1) % SERVICES);
        let host = format!("svc-{i}.test");
        write_manifest(
            dir,
            &format!("policy-{i}.yaml"),
            &policy(
                &format!("p{i}"),
                &[&host],
                &[(&own, 80, self.weights[i], 0), (&next, 80, 1, 0)],
                "",
            ),
        );
    }
}

#[derive(Debug, Clone, Copy)]
enum Change {
    Flip,
    Weight,
    ReplaceEndpoints,
    AddPolicy,
    RemovePolicy,
}

/// Applies one change to the world and writes the file it touches.
fn apply(world: &mut World, rng: &mut XorShift, dir: &Path, change: Change) {
    match change {
        Change::Flip => {
            let i = world.used_service(rng);
            let j = rng.below(world.endpoints[i].len());
            let ep = &mut world.endpoints[i][j];
            ep.1 = !ep.1;
            world.write_service(dir, i);
        }
        Change::Weight => {
            let i = *world
                .policies
                .iter()
                .nth(rng.below(world.policies.len()))
                .expect("a policy");
            // 2..=9, never the current value, so the route really changes.
            let mut w = 2 + rng.below(8) as i64;
            if w == world.weights[i] {
                w = if w == 9 { 2 } else { w + 1 };
            }
            world.weights[i] = w;
            world.write_policy(dir, i);
        }
        Change::ReplaceEndpoints => {
            let i = world.used_service(rng);
            world.generation += 1;
            let g = world.generation;
            // One endpoint fewer, all at new addresses, one of them not ready.
            world.endpoints[i] = (0..ENDPOINTS - 1)
                .map(|j| (format!("10.2.{g}.{}", j + 1), j != 0))
                .collect();
            world.write_service(dir, i);
        }
        Change::AddPolicy => {
            let i = (INITIAL_POLICIES..SERVICES)
                .find(|i| !world.policies.contains(i))
                .expect("a policy left to add");
            world.policies.insert(i);
            world.write_policy(dir, i);
        }
        Change::RemovePolicy => {
            let i = *world
                .policies
                .iter()
                .nth(rng.below(world.policies.len()))
                .expect("a policy");
            world.policies.remove(&i);
            std::fs::remove_file(dir.join(format!("policy-{i}.yaml"))).expect("remove policy");
        }
    }
}

/// The controller's table version, once it has loaded the folder.
async fn controller_version(c: &Controller) -> Option<u64> {
    let s = c.state().await.ok()?;
    s["version"].as_u64().filter(|v| *v > 0)
}

/// Waits until every agent of `sim` applies `version` on a live stream; returns the digests.
async fn wait_synced(sim: &Sim, version: u64, what: &str) -> Vec<u64> {
    wait_for(what, || async move {
        let st = sim.stats(false);
        (st.synced == st.agents && st.newest_version == version).then(|| sim.tables_digest())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_converges_to_the_table_of_a_full_recompute() {
    let seed = std::env::var("WEIR_SCALE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| weir_tests::sim::unix_ns() | 1);
    eprintln!("scale test seed: {seed} (WEIR_SCALE_SEED={seed} replays it)");
    let mut rng = XorShift(seed);

    let dir = tempfile::tempdir().expect("tempdir");
    let mut world = World::new();
    for i in 0..SERVICES {
        world.write_service(dir.path(), i);
    }
    for &i in &world.policies {
        world.write_policy(dir.path(), i);
    }
    let controller = Controller::start(dir.path())
        .await
        .expect("start controller");
    let first = wait_for("controller table", || controller_version(&controller)).await;
    let sim = Sim::start(SimConfig::new(controller.url(), AGENTS)).expect("start sim");
    let digests = wait_synced(&sim, first, "all agents on the first table").await;
    assert!(digests.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(sim.route_names(0).len(), INITIAL_POLICIES);

    // The policy changes land at random places among the endpoint and weight changes.
    let mut plan: Vec<Change> = (0..STEPS)
        .map(|_| match rng.below(10) {
            0..=5 => Change::Flip,
            6..=8 => Change::Weight,
            _ => Change::ReplaceEndpoints,
        })
        .collect();
    plan[rng.below(STEPS)] = Change::ReplaceEndpoints;
    let add_at = rng.below(STEPS);
    plan[add_at] = Change::AddPolicy;
    plan[(add_at + 1 + rng.below(STEPS - 1)) % STEPS] = Change::RemovePolicy;
    eprintln!("changes: {plan:?}");

    let mut version = first;
    for (step, &change) in plan.iter().enumerate() {
        apply(&mut world, &mut rng, dir.path(), change);
        // Each change is a new table; the agents are not waited for, so slow ones get
        // coalesced deltas (latest wins) while the controller moves on.
        let before = version;
        version = wait_for(&format!("step {step} ({change:?}) published"), || async {
            controller_version(&controller)
                .await
                .filter(|v| *v > before)
        })
        .await;
    }
    // The last change may have been published in pieces: take the version in force once
    // the folder and the table agree, i.e. the latest the controller reports.
    let digests = wait_for("all agents on the controller's latest table", || async {
        let v = controller_version(&controller).await?;
        let st = sim.stats(false);
        (st.synced == st.agents && st.newest_version == v).then(|| sim.tables_digest())
    })
    .await;
    let distinct: BTreeSet<u64> = digests.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        1,
        "agents disagree on the table after the changes"
    );
    let names = sim.route_names(0);
    let expected: Vec<String> = world
        .policies
        .iter()
        .map(|i| format!("default/p{i}"))
        .collect();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert_eq!(names, expected_sorted, "route names after the changes");
    let st = sim.stats(false);
    assert_eq!(
        st.nacks_sent, 0,
        "every delta applied on the version it named"
    );
    assert_eq!(st.full_updates, AGENTS as u64, "one full table per agent");
    assert!(st.updates > st.full_updates, "the changes came as deltas");

    // A reconnect storm: every agent gets a full table again, and the same one.
    let epoch = sim.reconnect_all();
    let after_storm = wait_for("every agent back with a full table", || async {
        let st = sim.stats(false);
        (st.storm.epoch == epoch
            && st.storm.agents_with_full_table == AGENTS as u64
            && st.synced == st.agents)
            .then(|| sim.tables_digest())
    })
    .await;
    assert_eq!(after_storm, digests, "tables after the reconnect storm");

    // A fresh controller on the same folder computes everything from scratch.
    let fresh = Controller::start(dir.path())
        .await
        .expect("start fresh controller");
    let fresh_version = wait_for("fresh controller table", || controller_version(&fresh)).await;
    let mut cfg = SimConfig::new(fresh.url(), 1);
    cfg.prefix = "fresh".into();
    let check = Sim::start(cfg).expect("start fresh sim");
    let fresh_digest = wait_synced(&check, fresh_version, "the fresh agent's table").await;
    assert_eq!(
        fresh_digest[0],
        digests[0],
        "the agents' table differs from a full recompute: {:?} vs {:?}",
        check.route_names(0),
        names
    );
    check.shutdown().await;
    sim.shutdown().await;
}

/// The cache peer lists of one zone: agents that join or leave cost every other agent a
/// delta naming them, not the zone's whole list again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_joining_or_leaving_a_zone_costs_the_others_a_delta() {
    const ZONE: u64 = 40;
    let dir = tempfile::tempdir().expect("tempdir");
    write_manifest(
        dir.path(),
        "site.yaml",
        &docs(&[
            service("site", 80),
            slice("site", 8080, &[("10.9.0.1", true)]),
            policy("site", &["site.test"], &[("site", 80, 1, 0)], ""),
        ]),
    );
    let controller = Controller::start(dir.path())
        .await
        .expect("start controller");
    let sim_of = |agents: usize, prefix: &str| {
        let mut cfg = SimConfig::new(controller.url(), agents);
        cfg.prefix = prefix.into();
        cfg.zones = vec!["z".into()];
        cfg.cache_peers = true;
        Sim::start(cfg).expect("start sim")
    };
    let peers = |sim: &Sim| sim.stats(false).cache_peers;
    let zone = sim_of(ZONE as usize, "zone");
    let before = wait_for("every agent holds the whole zone", || async {
        let p = peers(&zone);
        (p.agents_with_whole_zone == ZONE).then_some(p)
    })
    .await;

    // One more agent joins the zone.
    let late = sim_of(1, "late");
    let joined = wait_for("every agent holds the zone with the late one", || async {
        let p = peers(&zone);
        (p.peers_held == ZONE * (ZONE + 1)).then_some(p)
    })
    .await;
    let lists = joined.lists_received - before.lists_received;
    assert_eq!(lists, ZONE, "one message each");
    assert_eq!(joined.deltas_received - before.deltas_received, ZONE);
    let late_peers = wait_for("the late agent's list", || async {
        let p = peers(&late);
        (p.peers_held == ZONE + 1).then_some(p)
    })
    .await;
    // Its stream starts with the whole list as it stood (without it), then the delta
    // that adds it.
    assert_eq!(
        (late_peers.lists_received, late_peers.deltas_received),
        (2, 1),
        "a new stream starts whole"
    );
    let whole_list = late_peers.bytes_received;
    let per_delta = (joined.bytes_received - before.bytes_received) / lists;
    assert!(
        per_delta * 10 < whole_list,
        "a delta ({per_delta} bytes) is a fraction of the whole list ({whole_list} bytes)"
    );

    // It leaves again.
    late.shutdown().await;
    let left = wait_for(
        "every agent holds the zone without the late one",
        || async {
            let p = peers(&zone);
            (p.peers_held == ZONE * ZONE).then_some(p)
        },
    )
    .await;
    assert_eq!(left.deltas_received - joined.deltas_received, ZONE);
    zone.shutdown().await;
}
