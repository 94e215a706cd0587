//! Tests of the routing computation over whole snapshots.

use super::resolve::{H2C_APP_PROTOCOL, is_ready};
use super::*;
use crate::model::SERVICE_NAME_LABEL;
use crate::model::{BackendRef, Failover, Rule};
use k8s_openapi::api::core::v1::ServicePort;
use k8s_openapi::api::core::v1::ServiceSpec;
use k8s_openapi::api::discovery::v1::Endpoint as SliceEndpoint;
use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

const NS: &str = "default";

fn key(name: &str) -> ObjectKey {
    ObjectKey::new(NS, name)
}

fn service_port(name: Option<&str>, port: i32, target: Option<i32>) -> ServicePort {
    ServicePort {
        name: name.map(str::to_owned),
        port,
        target_port: target.map(IntOrString::Int),
        ..ServicePort::default()
    }
}

fn service(name: &str, ports: Vec<ServicePort>) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(NS.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn endpoint(address: &str, ready: Option<bool>) -> SliceEndpoint {
    SliceEndpoint {
        addresses: vec![address.to_owned()],
        conditions: Some(EndpointConditions {
            ready,
            ..EndpointConditions::default()
        }),
        zone: Some("z1".to_owned()),
        ..SliceEndpoint::default()
    }
}

fn slice(
    service: &str,
    address_type: &str,
    ports: &[(Option<&str>, i32)],
    endpoints: Vec<SliceEndpoint>,
) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            labels: Some(
                [(SERVICE_NAME_LABEL.to_owned(), service.to_owned())]
                    .into_iter()
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        address_type: address_type.to_owned(),
        endpoints,
        ports: Some(
            ports
                .iter()
                .map(|(name, port)| EndpointPort {
                    name: name.map(str::to_owned),
                    port: Some(*port),
                    ..EndpointPort::default()
                })
                .collect(),
        ),
    }
}

fn spec(hosts: &[&str], backends: &[(&str, i64, i64)]) -> TrafficPolicySpec {
    TrafficPolicySpec {
        hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
        rules: vec![Rule {
            matches: vec![],
            backend_refs: backends
                .iter()
                .map(|(name, weight, priority)| BackendRef {
                    name: (*name).to_owned(),
                    port: Some(80),
                    weight: Some(*weight),
                    priority: Some(*priority),
                })
                .collect(),
            mirror: None,
        }],
        ..TrafficPolicySpec::default()
    }
}

/// A small cluster in namespace `default`: Services with one port `http` 80 → 8080.
#[derive(Default)]
struct World {
    snapshot: Snapshot,
    subnets: u32,
}

impl World {
    fn service(&mut self, name: &str) -> &mut Self {
        let port = service_port(Some("http"), 80, Some(8080));
        self.snapshot
            .services
            .insert(key(name), service(name, vec![port]).into());
        self
    }

    /// Adds a slice with `ready` ready and `not_ready` not-ready pods to Service `name`.
    fn pods(&mut self, name: &str, ready: usize, not_ready: usize) -> &mut Self {
        self.subnets += 1;
        let subnet = self.subnets;
        let endpoints = (0..ready + not_ready)
            .map(|i| endpoint(&format!("10.0.{subnet}.{}", i + 1), Some(i < ready)))
            .collect();
        self.snapshot.slices.insert(
            key(&format!("{name}-{subnet}")),
            slice(name, "IPv4", &[(Some("http"), 8080)], endpoints).into(),
        );
        self
    }

    /// Replaces every slice of Service `name` by one with the given pods.
    fn repods(&mut self, name: &str, ready: usize, not_ready: usize) -> &mut Self {
        self.snapshot.slices.retain(|_, s| {
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .is_none_or(|svc| svc != name)
        });
        self.pods(name, ready, not_ready)
    }

    fn policy(&mut self, name: &str, spec: TrafficPolicySpec) -> &mut Self {
        self.input(name, Ok(spec))
    }

    fn input(&mut self, name: &str, spec: Result<TrafficPolicySpec, String>) -> &mut Self {
        self.snapshot.policies.retain(|p| p.key != key(name));
        self.snapshot.policies.push(
            PolicyInput {
                key: key(name),
                source: format!("{name}.yaml"),
                generation: Some(1),
                spec,
            }
            .into(),
        );
        self
    }

    fn compute(&self, last_good: &LastGood) -> Computed {
        compute(&self.snapshot, last_good)
    }
}

fn route<'c>(computed: &'c Computed, policy: &str) -> &'c pb::Route {
    let name = key(policy).to_string();
    computed
        .routes
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no route {name} in {:?}", computed.routes))
}

fn state<'c>(computed: &'c Computed, policy: &str) -> &'c PolicyState {
    &computed.policies[&key(policy)]
}

/// Rule 0's endpoint weights, per backend.
fn weights(computed: &Computed, policy: &str) -> Vec<(String, Vec<u32>)> {
    route(computed, policy).rules[0]
        .backends
        .iter()
        .map(|b| {
            (
                b.service.clone(),
                b.endpoints.iter().map(|e| e.weight).collect(),
            )
        })
        .collect()
}

fn backend_share(rule: &pb::Rule, service: &str) -> f64 {
    let sum = |pick: &dyn Fn(&pb::Backend) -> bool| -> u64 {
        rule.backends
            .iter()
            .filter(|b| pick(b))
            .flat_map(|b| &b.endpoints)
            .map(|e| u64::from(e.weight))
            .sum()
    };
    sum(&|b| b.service == service) as f64 / sum(&|_| true) as f64
}

fn owned(pairs: &[(&str, &[u32])]) -> Vec<(String, Vec<u32>)> {
    pairs
        .iter()
        .map(|(s, w)| ((*s).to_owned(), w.to_vec()))
        .collect()
}

// --- weights ------------------------------------------------------------------------

#[test]
fn a_3_to_1_split_over_2_plus_2_endpoints_gives_weights_3_3_1_1() {
    let mut world = World::default();
    world
        .service("v1")
        .pods("v1", 2, 0)
        .service("v2")
        .pods("v2", 2, 0);
    world.policy("shop", spec(&["shop"], &[("v1", 3, 0), ("v2", 1, 0)]));
    let computed = world.compute(&LastGood::new());
    assert_eq!(
        weights(&computed, "shop"),
        owned(&[("v1", &[3, 3]), ("v2", &[1, 1])])
    );
    let shop = state(&computed, "shop");
    assert!(shop.accepted && shop.programmed && !shop.panic);
    assert_eq!(shop.active_tier, Some(0));
}

#[test]
fn scaling_v2_from_1_to_5_pods_keeps_the_90_10_split_between_services() {
    let mut world = World::default();
    world
        .service("v1")
        .pods("v1", 3, 0)
        .service("v2")
        .pods("v2", 1, 0);
    world.policy("shop", spec(&["shop"], &[("v1", 90, 0), ("v2", 10, 0)]));
    let before = world.compute(&LastGood::new());
    assert_eq!(
        weights(&before, "shop"),
        owned(&[("v1", &[3, 3, 3]), ("v2", &[1])])
    );
    world.repods("v2", 5, 0);
    let after = world.compute(&before.last_good);
    assert_eq!(
        weights(&after, "shop"),
        owned(&[("v1", &[15, 15, 15]), ("v2", &[1, 1, 1, 1, 1])])
    );
    for computed in [&before, &after] {
        let share = backend_share(&route(computed, "shop").rules[0], "v2");
        assert!((share - 0.1).abs() < 1e-12, "{share}");
    }
}

#[test]
fn a_service_without_ready_endpoints_gives_its_share_to_the_others_of_its_tier() {
    let mut world = World::default();
    world
        .service("v1")
        .pods("v1", 3, 0)
        .service("v2")
        .pods("v2", 0, 2);
    world.policy("shop", spec(&["shop"], &[("v1", 90, 0), ("v2", 10, 0)]));
    let computed = world.compute(&LastGood::new());
    assert_eq!(
        weights(&computed, "shop"),
        owned(&[("v1", &[1, 1, 1]), ("v2", &[0, 0])])
    );
}

#[test]
fn failover_sends_everything_to_tier_1_while_tier_0_has_no_ready_endpoint_and_returns() {
    let mut world = World::default();
    world
        .service("primary")
        .pods("primary", 0, 2)
        .service("standby")
        .pods("standby", 2, 0);
    world.policy(
        "shop",
        spec(&["shop"], &[("primary", 1, 0), ("standby", 1, 1)]),
    );
    let down = world.compute(&LastGood::new());
    assert_eq!(
        weights(&down, "shop"),
        owned(&[("primary", &[0, 0]), ("standby", &[1, 1])])
    );
    assert_eq!(route(&down, "shop").rules[0].active_tier, 1);
    assert_eq!(state(&down, "shop").active_tier, Some(1));
    assert!(!state(&down, "shop").panic);

    world.repods("primary", 2, 0);
    let recovered = world.compute(&down.last_good);
    assert_eq!(
        weights(&recovered, "shop"),
        owned(&[("primary", &[1, 1]), ("standby", &[0, 0])])
    );
    assert_eq!(state(&recovered, "shop").active_tier, Some(0));
}

#[test]
fn a_half_healthy_tier_0_spills_the_missing_share_to_tier_1_in_proportion() {
    let mut world = World::default();
    world
        .service("primary")
        .pods("primary", 1, 1)
        .service("standby")
        .pods("standby", 2, 0);
    world.policy(
        "shop",
        spec(&["shop"], &[("primary", 1, 0), ("standby", 1, 1)]),
    );
    let computed = world.compute(&LastGood::new());
    // h_0 = 0.5, M = 0.7: tier 0 takes 0.5/0.7 = 71.4 %, tier 1 the remaining 28.6 %.
    assert_eq!(
        weights(&computed, "shop"),
        owned(&[("primary", &[714, 0]), ("standby", &[143, 143])])
    );
    let rule = &route(&computed, "shop").rules[0];
    assert_eq!(rule.active_tier, 1);
    assert!((backend_share(rule, "primary") - 5.0 / 7.0).abs() < 1e-3);
}

#[test]
fn tier_0_keeps_everything_while_min_healthy_percent_of_it_is_ready() {
    let mut world = World::default();
    world
        .service("primary")
        .pods("primary", 7, 3)
        .service("standby")
        .pods("standby", 1, 0);
    world.policy(
        "shop",
        spec(&["shop"], &[("primary", 1, 0), ("standby", 1, 1)]),
    );
    let computed = world.compute(&LastGood::new());
    let rule = &route(&computed, "shop").rules[0];
    assert_eq!(backend_share(rule, "standby"), 0.0);
    assert_eq!(rule.active_tier, 0);

    let mut strict = spec(&["shop"], &[("primary", 1, 0), ("standby", 1, 1)]);
    strict.failover = Some(Failover {
        min_healthy_percent: Some(100),
    });
    world.policy("shop", strict);
    let computed = world.compute(&LastGood::new());
    let rule = &route(&computed, "shop").rules[0];
    assert!((backend_share(rule, "standby") - 0.3).abs() < 1e-3);
}

#[test]
fn with_no_healthy_tier_all_endpoints_of_the_lowest_tier_get_traffic_in_panic() {
    let mut world = World::default();
    world
        .service("primary")
        .pods("primary", 0, 3)
        .service("standby")
        .pods("standby", 0, 1);
    world.policy(
        "shop",
        spec(&["shop"], &[("primary", 1, 0), ("standby", 1, 1)]),
    );
    let computed = world.compute(&LastGood::new());
    assert_eq!(
        weights(&computed, "shop"),
        owned(&[("primary", &[1, 1, 1]), ("standby", &[0])])
    );
    let rule = &route(&computed, "shop").rules[0];
    assert!(rule.panic);
    assert_eq!(rule.active_tier, 0);
    assert!(state(&computed, "shop").panic);
}

#[test]
fn panic_skips_a_lowest_tier_that_has_no_endpoints() {
    let mut world = World::default();
    world
        .service("primary")
        .service("standby")
        .pods("standby", 0, 2);
    world.policy(
        "shop",
        spec(&["shop"], &[("primary", 1, 0), ("standby", 1, 1)]),
    );
    let computed = world.compute(&LastGood::new());
    assert_eq!(
        weights(&computed, "shop"),
        owned(&[("primary", &[]), ("standby", &[1, 1])])
    );
    assert_eq!(route(&computed, "shop").rules[0].active_tier, 1);
}

// --- hosts and last good --------------------------------------------------------------

#[test]
fn the_first_policy_in_snapshot_order_wins_a_new_host_and_the_loser_names_it() {
    let mut world = World::default();
    world.service("v1").pods("v1", 1, 0);
    world.policy("shop-a", spec(&["shop"], &[("v1", 1, 0)]));
    world.policy("shop-b", spec(&["other", "Shop"], &[("v1", 1, 0)]));
    let computed = world.compute(&LastGood::new());
    assert_eq!(computed.routes.len(), 1);
    assert_eq!(route(&computed, "shop-a").hosts, ["shop"]);
    let b = state(&computed, "shop-b");
    assert_eq!(
        b.errors,
        ["spec.hosts[1]: host \"shop\" is already served by TrafficPolicy default/shop-a"]
    );
    assert_eq!(b.reason, Reason::HostConflict);
    assert!(!b.accepted && !b.programmed);
    assert!(!computed.last_good.contains_key(&key("shop-b")));
}

#[test]
fn an_incumbent_keeps_its_host_against_a_policy_earlier_in_snapshot_order() {
    let mut world = World::default();
    world.service("v1").pods("v1", 1, 0);
    world.policy("shop-a", spec(&["shop"], &[("v1", 1, 0)]));
    let first = world.compute(&LastGood::new());
    world.snapshot.policies.insert(
        0,
        PolicyInput {
            key: key("shop-b"),
            source: "b.yaml".to_owned(),
            generation: None,
            spec: Ok(spec(&["shop"], &[("v1", 1, 0)])),
        }
        .into(),
    );
    let second = world.compute(&first.last_good);
    assert!(state(&second, "shop-a").accepted);
    assert_eq!(
        state(&second, "shop-b").errors,
        ["spec.hosts[0]: host \"shop\" is already served by TrafficPolicy default/shop-a"]
    );
    assert_eq!(second.routes.len(), 1);
}

#[test]
fn a_host_conflict_loser_with_a_last_good_spec_keeps_serving_it() {
    let mut world = World::default();
    world.service("v1").pods("v1", 1, 0);
    world.policy("shop-a", spec(&["shop"], &[("v1", 1, 0)]));
    world.policy("shop-b", spec(&["b"], &[("v1", 1, 0)]));
    let first = world.compute(&LastGood::new());
    world.policy("shop-b", spec(&["b", "shop"], &[("v1", 1, 0)]));
    let second = world.compute(&first.last_good);
    assert_eq!(route(&second, "shop-b").hosts, ["b"]);
    assert_eq!(route(&second, "shop-a").hosts, ["shop"]);
    let b = state(&second, "shop-b");
    assert!(b.serving_last_good && b.programmed && !b.accepted);
    assert_eq!(
        b.errors,
        ["spec.hosts[1]: host \"shop\" is already served by TrafficPolicy default/shop-a"]
    );
    assert_eq!(
        second.last_good[&key("shop-b")],
        spec(&["b"], &[("v1", 1, 0)])
    );
}

#[test]
fn a_host_dropped_by_its_holder_goes_to_another_policy_in_the_same_computation() {
    let mut world = World::default();
    world.service("v1").pods("v1", 1, 0);
    world.policy("shop-a", spec(&["shop"], &[("v1", 1, 0)]));
    let first = world.compute(&LastGood::new());
    world.policy("shop-a", spec(&["shop-new"], &[("v1", 1, 0)]));
    world.policy("shop-b", spec(&["shop"], &[("v1", 1, 0)]));
    world.snapshot.policies.reverse();
    let second = world.compute(&first.last_good);
    assert!(state(&second, "shop-a").accepted);
    assert!(state(&second, "shop-b").accepted, "{:?}", second.policies);
    assert_eq!(route(&second, "shop-b").hosts, ["shop"]);
    assert_eq!(route(&second, "shop-a").hosts, ["shop-new"]);
}

#[test]
fn two_policies_swapping_hosts_at_once_both_keep_their_last_good_spec() {
    let mut world = World::default();
    world.service("v1").pods("v1", 1, 0);
    world.policy("a", spec(&["x"], &[("v1", 1, 0)]));
    world.policy("b", spec(&["y"], &[("v1", 1, 0)]));
    let first = world.compute(&LastGood::new());
    world.policy("a", spec(&["y"], &[("v1", 1, 0)]));
    world.policy("b", spec(&["x"], &[("v1", 1, 0)]));
    let second = world.compute(&first.last_good);
    assert_eq!(route(&second, "a").hosts, ["x"]);
    assert_eq!(route(&second, "b").hosts, ["y"]);
    assert!(state(&second, "a").serving_last_good && state(&second, "b").serving_last_good);
}

#[test]
fn a_new_policy_with_an_unresolved_ref_is_programmed_and_the_others_take_its_share() {
    let mut world = World::default();
    world.service("v1").pods("v1", 2, 0);
    world.policy("shop", spec(&["shop"], &[("v1", 1, 0), ("ghost", 1, 0)]));
    let computed = world.compute(&LastGood::new());
    assert_eq!(
        weights(&computed, "shop"),
        owned(&[("v1", &[1, 1]), ("ghost", &[])])
    );
    let shop = state(&computed, "shop");
    assert!(shop.programmed && !shop.accepted && !shop.serving_last_good);
    assert_eq!(shop.reason, Reason::UnresolvedRefs);
    assert_eq!(shop.unresolved_refs, ["ghost"]);
    assert_eq!(
        shop.errors,
        ["spec.rules[0].backendRefs[1]: Service default/ghost not found"]
    );
    assert!(computed.last_good.is_empty());
}

#[test]
fn an_unresolved_ref_in_a_changed_spec_keeps_the_last_good_spec_serving() {
    let mut world = World::default();
    world.service("v1").pods("v1", 2, 0);
    world.policy("shop", spec(&["shop"], &[("v1", 1, 0)]));
    let first = world.compute(&LastGood::new());
    world.policy("shop", spec(&["shop"], &[("v1", 1, 0), ("ghost", 1, 0)]));
    let second = world.compute(&first.last_good);
    assert_eq!(weights(&second, "shop"), owned(&[("v1", &[1, 1])]));
    let shop = state(&second, "shop");
    assert!(shop.serving_last_good && !shop.accepted);
    assert_eq!(shop.unresolved_refs, ["ghost"]);
    assert_eq!(second.last_good, first.last_good);
}

#[test]
fn an_invalid_spec_leaves_the_last_good_route_in_force_with_fresh_endpoints() {
    let mut world = World::default();
    world.service("v1").pods("v1", 2, 0);
    world.policy("shop", spec(&["shop"], &[("v1", 1, 0)]));
    let first = world.compute(&LastGood::new());
    world.policy("shop", spec(&["shop"], &[("v1", -3, 0)]));
    world.pods("v1", 1, 0);
    let second = world.compute(&first.last_good);
    assert_eq!(weights(&second, "shop"), owned(&[("v1", &[1, 1, 1])]));
    let shop = state(&second, "shop");
    assert!(shop.serving_last_good && shop.programmed && !shop.accepted);
    assert_eq!(shop.reason, Reason::Invalid);
    assert_eq!(
        shop.errors,
        ["spec.rules[0].backendRefs[0].weight: must be >= 0, got -3"]
    );
    assert_eq!(second.last_good, first.last_good);
}

#[test]
fn an_invalid_spec_without_a_last_good_one_programs_nothing() {
    let mut world = World::default();
    world.policy("shop", spec(&[], &[("v1", 1, 0)]));
    let computed = world.compute(&LastGood::new());
    assert!(computed.routes.is_empty());
    let shop = state(&computed, "shop");
    assert!(!shop.programmed && !shop.serving_last_good);
    assert_eq!(
        shop.errors,
        ["spec.hosts: must list at least one host name"]
    );
    assert_eq!(shop.active_tier, None);
}

#[test]
fn an_unreadable_document_reports_why_and_keeps_the_last_good_route() {
    let mut world = World::default();
    world.service("v1").pods("v1", 1, 0);
    world.policy("shop", spec(&["shop"], &[("v1", 1, 0)]));
    let first = world.compute(&LastGood::new());
    world.input("shop", Err("spec.rules: invalid type: string".to_owned()));
    let second = world.compute(&first.last_good);
    let shop = state(&second, "shop");
    assert_eq!(shop.reason, Reason::Unreadable);
    assert_eq!(shop.errors, ["spec.rules: invalid type: string"]);
    assert!(shop.serving_last_good);
    assert_eq!(route(&second, "shop").hosts, ["shop"]);
}

#[test]
fn an_accepted_spec_becomes_the_last_good_and_removed_policies_drop_out() {
    let mut world = World::default();
    world.service("v1").pods("v1", 1, 0);
    world.policy("a", spec(&["a"], &[("v1", 1, 0)]));
    world.policy("b", spec(&["b"], &[("v1", 1, 0)]));
    let first = world.compute(&LastGood::new());
    assert_eq!(first.last_good.len(), 2);
    world.snapshot.policies.retain(|p| p.key.name == "a");
    world.policy("a", spec(&["a2"], &[("v1", 1, 0)]));
    let second = world.compute(&first.last_good);
    assert_eq!(
        second.last_good.into_iter().collect::<Vec<_>>(),
        [(key("a"), spec(&["a2"], &[("v1", 1, 0)]))]
    );
    assert_eq!(second.policies.len(), 1);
}

// --- resolution -------------------------------------------------------------------------

/// Resolves `backend_ref` of a fresh policy in `snapshot` and returns rule 0's first
/// backend and the policy state.
fn resolve_one(mut snapshot: Snapshot, port: Option<i32>) -> (pb::Backend, PolicyState) {
    let mut policy = spec(&["shop"], &[("web", 1, 0)]);
    policy.rules[0].backend_refs[0].port = port;
    snapshot.policies.push(
        PolicyInput {
            key: key("shop"),
            source: "kubernetes".to_owned(),
            generation: None,
            spec: Ok(policy),
        }
        .into(),
    );
    let mut computed = compute(&snapshot, &LastGood::new());
    let state = computed.policies.remove(&key("shop")).unwrap_or_default();
    let backend = computed
        .routes
        .pop()
        .and_then(|r| r.rules.into_iter().next())
        .and_then(|r| r.backends.into_iter().next())
        .unwrap_or_default();
    (backend, state)
}

fn snapshot_with(service: Service, slices: Vec<EndpointSlice>) -> Snapshot {
    let mut snapshot = Snapshot::default();
    snapshot.services.insert(key("web"), service.into());
    for (i, s) in slices.into_iter().enumerate() {
        snapshot.slices.insert(key(&format!("web-{i}")), s.into());
    }
    snapshot
}

fn addresses(backend: &pb::Backend) -> Vec<(&str, bool)> {
    backend
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.ready))
        .collect()
}

#[test]
fn endpoints_listen_on_the_slice_port_named_like_the_service_port() {
    let web = service(
        "web",
        vec![
            service_port(Some("http"), 80, Some(8080)),
            service_port(Some("admin"), 9000, None),
        ],
    );
    let slices = vec![slice(
        "web",
        "IPv4",
        &[(Some("admin"), 9001), (Some("http"), 8081)],
        vec![endpoint("10.0.0.1", Some(true))],
    )];
    let (backend, state) = resolve_one(snapshot_with(web, slices), Some(80));
    assert!(state.accepted, "{state:?}");
    assert_eq!(backend.port, 80);
    assert_eq!(addresses(&backend), [("10.0.0.1:8081", true)]);
    assert_eq!(backend.endpoints[0].zone, "z1");
    assert_eq!(backend.protocol, pb::Protocol::Http1 as i32);
}

#[test]
fn without_a_matching_slice_port_the_integer_target_port_then_the_service_port_is_used() {
    let slices = || {
        vec![slice(
            "web",
            "IPv4",
            &[(Some("other"), 1)],
            vec![endpoint("10.0.0.1", Some(true))],
        )]
    };
    let with_target = service("web", vec![service_port(None, 80, Some(8080))]);
    let (backend, _) = resolve_one(snapshot_with(with_target, slices()), None);
    assert_eq!(addresses(&backend), [("10.0.0.1:8080", true)]);
    let without = service("web", vec![service_port(None, 80, None)]);
    let (backend, _) = resolve_one(snapshot_with(without, slices()), None);
    assert_eq!(addresses(&backend), [("10.0.0.1:80", true)]);
}

#[test]
fn an_unnamed_service_port_matches_an_empty_named_slice_port() {
    let web = service("web", vec![service_port(None, 80, Some(8080))]);
    let slices = vec![slice(
        "web",
        "IPv4",
        &[(Some(""), 9090)],
        vec![endpoint("10.0.0.1", None)],
    )];
    let (backend, _) = resolve_one(snapshot_with(web, slices), None);
    assert_eq!(addresses(&backend), [("10.0.0.1:9090", true)]);
}

#[test]
fn ipv6_addresses_are_bracketed_and_fqdn_slices_are_ignored() {
    let web = service("web", vec![service_port(Some("http"), 80, None)]);
    let slices = vec![
        slice(
            "web",
            "IPv6",
            &[(Some("http"), 8080)],
            vec![endpoint("fd00::1", Some(true))],
        ),
        slice(
            "web",
            "FQDN",
            &[(Some("http"), 8080)],
            vec![endpoint("web.example.com", Some(true))],
        ),
    ];
    let (backend, _) = resolve_one(snapshot_with(web, slices), Some(80));
    assert_eq!(addresses(&backend), [("[fd00::1]:8080", true)]);
}

#[test]
fn an_address_in_two_slices_is_listed_once_ready_if_either_copy_is_and_sorted() {
    let web = service("web", vec![service_port(Some("http"), 80, None)]);
    let port = [(Some("http"), 8080)];
    let slices = vec![
        slice(
            "web",
            "IPv4",
            &port,
            vec![
                endpoint("10.0.0.2", Some(false)),
                endpoint("10.0.0.3", Some(true)),
            ],
        ),
        slice(
            "web",
            "IPv4",
            &port,
            vec![
                endpoint("10.0.0.2", Some(true)),
                endpoint("10.0.0.1", Some(false)),
                endpoint("10.0.0.3", Some(false)),
            ],
        ),
    ];
    let (backend, _) = resolve_one(snapshot_with(web, slices), Some(80));
    assert_eq!(
        addresses(&backend),
        [
            ("10.0.0.1:8080", false),
            ("10.0.0.2:8080", true),
            ("10.0.0.3:8080", true)
        ]
    );
}

#[test]
fn readiness_needs_ready_and_serving_and_not_terminating_with_nil_meaning_ready() {
    let conditions = |ready, serving, terminating| SliceEndpoint {
        conditions: Some(EndpointConditions {
            ready,
            serving,
            terminating,
        }),
        ..endpoint("10.0.0.1", None)
    };
    assert!(is_ready(&conditions(None, None, None)));
    assert!(is_ready(&conditions(Some(true), Some(true), Some(false))));
    assert!(!is_ready(&conditions(Some(false), None, None)));
    assert!(!is_ready(&conditions(None, Some(false), None)));
    assert!(!is_ready(&conditions(Some(true), Some(true), Some(true))));
    assert!(is_ready(&SliceEndpoint {
        conditions: None,
        ..endpoint("10.0.0.1", None)
    }));
}

#[test]
fn the_h2c_app_protocol_selects_http2_cleartext() {
    let mut port = service_port(Some("grpc"), 50051, None);
    port.app_protocol = Some(H2C_APP_PROTOCOL.to_owned());
    let (backend, _) = resolve_one(snapshot_with(service("web", vec![port]), vec![]), None);
    assert_eq!(backend.protocol, pb::Protocol::H2c as i32);
    assert_eq!(backend.port, 50051);
}

#[test]
fn a_backend_without_port_needs_a_service_with_exactly_one_tcp_port() {
    let mut udp = service_port(Some("dns"), 53, None);
    udp.protocol = Some("UDP".to_owned());
    let one_tcp = service(
        "web",
        vec![udp.clone(), service_port(Some("http"), 80, None)],
    );
    let (backend, state) = resolve_one(snapshot_with(one_tcp, vec![]), None);
    assert!(state.accepted, "{state:?}");
    assert_eq!(backend.port, 80);

    let two = service(
        "web",
        vec![
            service_port(Some("http"), 80, None),
            service_port(Some("https"), 443, None),
        ],
    );
    let (_, state) = resolve_one(snapshot_with(two, vec![]), None);
    assert_eq!(
        state.errors,
        [
            "spec.rules[0].backendRefs[0].port: Service default/web has several ports \
             (80, 443); set port"
        ]
    );
    assert_eq!(state.unresolved_refs, ["web"]);

    let (_, state) = resolve_one(snapshot_with(service("web", vec![udp]), vec![]), None);
    assert_eq!(
        state.errors,
        ["spec.rules[0].backendRefs[0]: Service default/web has no TCP port"]
    );
}

#[test]
fn a_port_the_service_does_not_have_is_an_unresolved_ref() {
    let web = service("web", vec![service_port(Some("http"), 80, None)]);
    let (backend, state) = resolve_one(snapshot_with(web, vec![]), Some(8080));
    assert_eq!(
        state.errors,
        ["spec.rules[0].backendRefs[0].port: Service default/web has no port 8080 (it has 80)"]
    );
    assert_eq!(state.reason, Reason::UnresolvedRefs);
    assert!(state.programmed);
    assert!(backend.endpoints.is_empty());
}

#[test]
fn slices_of_other_services_or_namespaces_are_ignored() {
    let web = service("web", vec![service_port(Some("http"), 80, None)]);
    let mut snapshot = snapshot_with(web, vec![]);
    let port = [(Some("http"), 8080)];
    snapshot.slices.insert(
        ObjectKey::new("other", "web-x"),
        slice("web", "IPv4", &port, vec![endpoint("10.0.0.1", None)]).into(),
    );
    snapshot.slices.insert(
        key("api-x"),
        slice("api", "IPv4", &port, vec![endpoint("10.0.0.2", None)]).into(),
    );
    let (backend, _) = resolve_one(snapshot, Some(80));
    assert!(backend.endpoints.is_empty());
}

// --- state and determinism --------------------------------------------------------------

#[test]
fn the_state_lists_each_service_and_tier_once_and_serialises_in_camel_case() {
    let mut world = World::default();
    world
        .service("v1")
        .pods("v1", 2, 1)
        .service("standby")
        .pods("standby", 1, 0);
    let mut policy = spec(&["shop"], &[("v1", 1, 0), ("standby", 1, 1)]);
    policy.rules.push(policy.rules[0].clone());
    world.policy("shop", policy);
    let computed = world.compute(&LastGood::new());
    let shop = state(&computed, "shop");
    assert_eq!(
        shop.backends,
        [
            BackendStatus {
                name: "v1".to_owned(),
                tier: 0,
                ready: 2,
                healthy: 2
            },
            BackendStatus {
                name: "standby".to_owned(),
                tier: 1,
                ready: 1,
                healthy: 1
            },
        ]
    );
    let json = serde_json::to_value(shop).unwrap_or_default();
    assert_eq!(json["servingLastGood"], false);
    assert_eq!(json["unresolvedRefs"], serde_json::json!([]));
    assert_eq!(json["activeTier"], 1);
    assert_eq!(json["reason"], "Accepted");
    assert_eq!(json["source"], "shop.yaml");
}

#[test]
fn routes_are_sorted_by_name_and_the_same_input_gives_the_same_output() {
    let mut world = World::default();
    world.service("v1").pods("v1", 2, 0).pods("v1", 1, 1);
    world.policy("b", spec(&["b"], &[("v1", 1, 0)]));
    world.policy("a", spec(&["a"], &[("v1", 1, 0)]));
    world.snapshot.policies.push(
        PolicyInput {
            key: ObjectKey::new("a-b", "z"),
            source: "kubernetes".to_owned(),
            generation: None,
            spec: Ok(spec(&["z"], &[("v1", 1, 0)])),
        }
        .into(),
    );
    let first = world.compute(&LastGood::new());
    let names: Vec<&str> = first.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["a-b/z", "default/a", "default/b"]);
    assert_eq!(world.compute(&LastGood::new()), first);
    assert_eq!(world.compute(&first.last_good).routes, first.routes);
}

#[test]
fn a_policy_listed_twice_is_read_once() {
    let mut world = World::default();
    world.service("v1").pods("v1", 1, 0);
    world.policy("a", spec(&["a"], &[("v1", 1, 0)]));
    let duplicate = world.snapshot.policies[0].clone();
    world.snapshot.policies.push(duplicate);
    let computed = world.compute(&LastGood::new());
    assert_eq!(computed.routes.len(), 1);
    assert!(state(&computed, "a").accepted);
}

// --- incremental updates ------------------------------------------------------------------

mod incremental {
    use super::*;
    use proptest::prelude::*;

    const SERVICES: [&str; 4] = ["a", "b", "c", "d"];

    /// One change to a cluster, as a source would see it.
    #[derive(Clone, Debug)]
    enum Op {
        SetReady {
            slice: usize,
            ep: usize,
            ready: bool,
        },
        AddEndpoint {
            slice: usize,
            addr: u8,
            ready: bool,
        },
        RemoveSlice {
            slice: usize,
        },
        AddSlice {
            slice: usize,
            service: usize,
            eps: Vec<(u8, bool)>,
        },
        Relabel {
            slice: usize,
            service: usize,
        },
        ToggleService {
            service: usize,
        },
        PolicyWeight {
            weight: i64,
        },
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..6usize, 0..4usize, any::<bool>())
                .prop_map(|(slice, ep, ready)| Op::SetReady { slice, ep, ready }),
            2 => (0..6usize, 0..12u8, any::<bool>())
                .prop_map(|(slice, addr, ready)| Op::AddEndpoint { slice, addr, ready }),
            1 => (0..6usize).prop_map(|slice| Op::RemoveSlice { slice }),
            2 => (0..6usize, 0..4usize, prop::collection::vec((0..12u8, any::<bool>()), 0..4))
                .prop_map(|(slice, service, eps)| Op::AddSlice { slice, service, eps }),
            1 => (0..6usize, 0..4usize).prop_map(|(slice, service)| Op::Relabel { slice, service }),
            1 => (0..4usize).prop_map(|service| Op::ToggleService { service }),
            1 => (0..3i64).prop_map(|weight| Op::PolicyWeight { weight }),
        ]
    }

    fn slice_key(i: usize) -> ObjectKey {
        key(&format!("s{i}"))
    }

    fn new_slice(service: &str, eps: &[(u8, bool)]) -> Arc<EndpointSlice> {
        let endpoints = eps
            .iter()
            .map(|(addr, ready)| endpoint(&format!("10.1.0.{addr}"), Some(*ready)))
            .collect();
        Arc::new(slice(service, "IPv4", &[(Some("http"), 8080)], endpoints))
    }

    fn policy(name: &str, spec: TrafficPolicySpec) -> Arc<PolicyInput> {
        Arc::new(PolicyInput {
            key: key(name),
            source: format!("{name}.yaml"),
            generation: Some(1),
            spec: Ok(spec),
        })
    }

    fn start() -> Snapshot {
        let mut snap = Snapshot::default();
        for name in &SERVICES[..3] {
            let port = service_port(Some("http"), 80, Some(8080));
            snap.services
                .insert(key(name), Arc::new(service(name, vec![port])));
        }
        for (i, name) in SERVICES.iter().enumerate() {
            snap.slices.insert(
                slice_key(i),
                new_slice(name, &[(i as u8, true), (i as u8 + 4, false)]),
            );
        }
        snap.policies = vec![
            policy(
                "p1",
                spec(&["p1"], &[("a", 3, 0), ("b", 1, 0), ("c", 1, 1)]),
            ),
            policy("p2", spec(&["p2"], &[("b", 1, 0)])),
            policy("p3", spec(&["p3"], &[("c", 1, 0), ("d", 1, 0)])),
            // Wants p1's host: loses it, and serves nothing.
            policy("p4", spec(&["p1", "p4"], &[("a", 1, 0)])),
        ];
        snap
    }

    fn apply(snap: &mut Snapshot, op: &Op) {
        match op {
            Op::SetReady { slice, ep, ready } => {
                if let Some(s) = snap.slices.get_mut(&slice_key(*slice)) {
                    let mut s2 = (**s).clone();
                    if let Some(e) = s2.endpoints.get_mut(*ep) {
                        e.conditions = Some(EndpointConditions {
                            ready: Some(*ready),
                            ..EndpointConditions::default()
                        });
                        *s = Arc::new(s2);
                    }
                }
            }
            Op::AddEndpoint { slice, addr, ready } => {
                if let Some(s) = snap.slices.get_mut(&slice_key(*slice)) {
                    let mut s2 = (**s).clone();
                    s2.endpoints
                        .push(endpoint(&format!("10.1.0.{addr}"), Some(*ready)));
                    *s = Arc::new(s2);
                }
            }
            Op::RemoveSlice { slice } => {
                snap.slices.remove(&slice_key(*slice));
            }
            Op::AddSlice {
                slice,
                service,
                eps,
            } => {
                snap.slices
                    .insert(slice_key(*slice), new_slice(SERVICES[*service], eps));
            }
            Op::Relabel { slice, service } => {
                if let Some(s) = snap.slices.get_mut(&slice_key(*slice)) {
                    let mut s2 = (**s).clone();
                    s2.metadata.labels = Some(
                        [(SERVICE_NAME_LABEL.to_owned(), SERVICES[*service].to_owned())]
                            .into_iter()
                            .collect(),
                    );
                    *s = Arc::new(s2);
                }
            }
            Op::ToggleService { service: i } => {
                let name = SERVICES[*i];
                if snap.services.remove(&key(name)).is_none() {
                    let port = service_port(Some("http"), 80, Some(8080));
                    snap.services
                        .insert(key(name), Arc::new(service(name, vec![port])));
                }
            }
            Op::PolicyWeight { weight } => {
                snap.policies[1] = policy("p2", spec(&["p2"], &[("b", *weight, 0), ("a", 1, 0)]));
            }
        }
    }

    fn values(routing: &Routing) -> Vec<pb::Route> {
        routing.routes().values().map(|r| (**r).clone()).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn incremental_updates_equal_the_full_computation(ops in prop::collection::vec(arb_op(), 1..25)) {
            let mut snap = start();
            let mut routing = Routing::new();
            routing.update(snap.clone());
            let mut expected = compute(&snap, &LastGood::new());
            prop_assert_eq!(values(&routing), expected.routes.clone());
            for op in &ops {
                apply(&mut snap, op);
                let before = routing.routes().clone();
                expected = compute(&snap, &expected.last_good);
                let changes = routing.update(snap.clone());
                prop_assert_eq!(values(&routing), expected.routes.clone(), "after {:?}", op);
                prop_assert_eq!(routing.policies(), &expected.policies, "after {:?}", op);
                prop_assert_eq!(routing.last_good(), &expected.last_good);
                // The changes name exactly the routes whose value changed.
                let upserted: Vec<String> = routing.routes().iter()
                    .filter(|(n, r)| before.get(*n).is_none_or(|b| b != *r))
                    .map(|(n, _)| n.clone())
                    .collect();
                let removed: Vec<String> = before.keys()
                    .filter(|n| !routing.routes().contains_key(*n))
                    .cloned()
                    .collect();
                prop_assert_eq!(&changes.upserted, &upserted, "after {:?}", op);
                prop_assert_eq!(&changes.removed, &removed);
                // Unchanged routes keep their pointers.
                for (n, r) in routing.routes() {
                    if !upserted.contains(n) {
                        prop_assert!(Arc::ptr_eq(r, &before[n]));
                    }
                }
            }
        }
    }

    #[test]
    fn a_readiness_flip_updates_only_the_routes_of_its_service_without_a_full_computation() {
        let mut snap = start();
        let mut routing = Routing::new();
        assert!(routing.update(snap.clone()).full);
        // Slice s1 belongs to Service b, which p1 and p2 use.
        apply(
            &mut snap,
            &Op::SetReady {
                slice: 1,
                ep: 1,
                ready: true,
            },
        );
        let changes = routing.update(snap.clone());
        assert!(!changes.full, "endpoint changes take the incremental path");
        assert_eq!(changes.upserted, ["default/p1", "default/p2"]);
        assert!(changes.removed.is_empty());
        assert_eq!(
            values(&routing),
            compute(&snap, routing.last_good()).routes,
            "same result as the full computation"
        );
        assert_eq!(routing.policies()[&key("p2")].backends[0].ready, 2);
        // Nothing changed: nothing to send.
        assert!(routing.update(snap).is_empty());
    }
}

/// A rule's mirror is resolved like a backend, takes no part in the weights, and a change to
/// the shadow Service's endpoints reaches the route through the incremental path.
#[test]
fn a_mirror_is_resolved_and_follows_its_service_endpoints() {
    let mut world = World::default();
    world
        .service("shop-v1")
        .pods("shop-v1", 2, 0)
        .service("shop-shadow")
        .pods("shop-shadow", 1, 0);
    let mut spec = spec(&["shop"], &[("shop-v1", 1, 0)]);
    spec.rules[0].mirror = Some(crate::model::Mirror {
        backend_ref: crate::model::MirrorRef {
            name: "shop-shadow".to_owned(),
            port: None,
        },
        percent: Some(25),
    });
    world.policy("shop", spec.clone());
    let computed = world.compute(&LastGood::default());
    let rule = &route(&computed, "shop").rules[0];
    let mirror = rule.mirror.as_ref().expect("mirror");
    let shadow = mirror.backend.as_ref().expect("backend");
    assert_eq!((mirror.percent, shadow.port), (25, 80));
    assert_eq!(shadow.endpoints.len(), 1);
    assert!(shadow.endpoints[0].ready);
    assert_eq!(rule.backends.len(), 1, "the shadow is not a backend");
    assert_eq!(weights(&computed, "shop")[0].1, vec![1, 1]);
    assert!(state(&computed, "shop").unresolved_refs.is_empty());

    let mut routing = Routing::new();
    routing.update(world.snapshot.clone());
    world.repods("shop-shadow", 2, 1);
    let changes = routing.update(world.snapshot.clone());
    assert!(!changes.full, "endpoint changes take the incremental path");
    assert_eq!(changes.upserted, ["default/shop"]);
    let route = &routing.routes()["default/shop"];
    let shadow = route.rules[0]
        .mirror
        .as_ref()
        .and_then(|m| m.backend.as_ref());
    assert_eq!(shadow.map(|b| b.endpoints.len()), Some(3));

    // A mirror of a Service that does not exist is an unresolved ref, like a backend's.
    spec.rules[0].mirror.as_mut().expect("set").backend_ref.name = "nope".to_owned();
    world.policy("shop", spec);
    let computed = world.compute(&LastGood::default());
    let errors = &state(&computed, "shop").errors;
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("spec.rules[0].mirror.backendRef")),
        "{errors:?}"
    );
}
