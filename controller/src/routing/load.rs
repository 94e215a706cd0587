//! Load-aware weights: from what every agent reports about each endpoint to per-endpoint
//! load factors (`Endpoint.load_permille`), for the routes of policies that opt in with
//! `loadBalancer.loadAware`. Pure: the server gathers the reports and the hub applies the
//! result.
//!
//! Each agent only sees its own requests; the controller sees them all, so an endpoint that is
//! slow for everybody (a noisy neighbour, a cold JVM, a degraded disk) is found even when
//! each agent sends it little. For every Service of a load-aware rule, an endpoint's *cost*
//! is its request-weighted latency EWMA times `1 + 10 × error ratio`; its target factor is
//! the Service's mean cost over its own, in per mille (an endpoint twice as slow as the mean
//! gets 500: half of an even share), clamped to the 4× bounds of
//! [`weir_proto::weights::MIN_LOAD_PERMILLE`] and [`weir_proto::weights::MAX_LOAD_PERMILLE`].
//!
//! Damping, so weights settle instead of chasing their own effect: each round moves a factor
//! half-way to its target, rounded to [`STEP`], and a move smaller than one step is not made
//! at all. An endpoint without enough samples in a round drifts back towards an even share.
//! A Service needs two endpoints with samples to compare anything.

use std::collections::BTreeMap;
use weir_proto::v1 as pb;
use weir_proto::weights::{MAX_LOAD_PERMILLE, MIN_LOAD_PERMILLE};

/// Per endpoint address: its load factor in per mille of an even share. Endpoints at 1000
/// are left out.
pub(crate) type LoadFactors = BTreeMap<String, u32>;

/// What all agents together saw of one endpoint during one round.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Sample {
    pub requests: u64,
    pub errors: u64,
    /// Σ requests × latency EWMA (ms) over agents; divided by `requests` for the mean.
    pub latency_weighted_ms: f64,
}

impl Sample {
    /// Adds one agent's report of the endpoint.
    pub(crate) fn add(&mut self, requests: u64, errors: u64, latency_ewma_ms: f64) {
        self.requests += requests;
        self.errors += errors.min(requests);
        if latency_ewma_ms.is_finite() && latency_ewma_ms >= 0.0 {
            self.latency_weighted_ms += requests as f64 * latency_ewma_ms;
        }
    }

    fn cost(&self) -> f64 {
        let requests = self.requests.max(1) as f64;
        let latency = (self.latency_weighted_ms / requests).max(MIN_LATENCY_MS);
        latency * (1.0 + ERROR_PENALTY * self.errors as f64 / requests)
    }
}

/// Factors move in steps of this many per mille; smaller moves are not made.
pub(crate) const STEP: u32 = 50;
/// Requests an endpoint needs in a round (over all agents) for its figures to count.
pub(crate) const MIN_REQUESTS: u64 = 20;
/// How much an error weighs against latency: 10 % errors cost as much as doubling latency.
const ERROR_PENALTY: f64 = 10.0;
/// Below this, latency differences are noise (loopback, cached answers).
const MIN_LATENCY_MS: f64 = 0.1;
const EVEN: u32 = 1000;

/// Sets `load_permille` on every endpoint of a load-aware route from `factors` (0 where it
/// has none), and clears it on other routes; [`weir_proto::weights::assign_weights`] then
/// applies it.
pub(crate) fn stamp(route: &mut pb::Route, factors: &LoadFactors) {
    let aware = route.load_balancer.as_ref().is_some_and(|lb| lb.load_aware);
    for endpoint in route
        .rules
        .iter_mut()
        .flat_map(|r| &mut r.backends)
        .flat_map(|b| &mut b.endpoints)
    {
        endpoint.load_permille = if aware {
            factors.get(&endpoint.address).copied().unwrap_or(0)
        } else {
            0
        };
    }
}

/// The next round's factors for the endpoints of the load-aware `routes`, from this round's
/// `samples` (by address) and the factors in force.
pub(crate) fn next_factors<'r>(
    routes: impl IntoIterator<Item = &'r pb::Route>,
    samples: &BTreeMap<String, Sample>,
    previous: &LoadFactors,
) -> LoadFactors {
    let mut next = LoadFactors::new();
    let mut decided = std::collections::BTreeSet::new();
    let routes = routes
        .into_iter()
        .filter(|r| r.load_balancer.as_ref().is_some_and(|lb| lb.load_aware));
    for backend in routes.flat_map(|r| &r.rules).flat_map(|r| &r.backends) {
        let serving: Vec<&pb::Endpoint> = backend
            .endpoints
            .iter()
            .filter(|e| backend.weight > 0 && e.weight > 0)
            .collect();
        let measured: Vec<(&str, f64)> = serving
            .iter()
            .filter_map(|e| {
                let s = samples.get(&e.address)?;
                (s.requests >= MIN_REQUESTS).then(|| (e.address.as_str(), s.cost()))
            })
            .collect();
        let mean = measured.iter().map(|(_, c)| c).sum::<f64>() / measured.len().max(1) as f64;
        for endpoint in &serving {
            // An address in several routes is decided by the first.
            if !decided.insert(endpoint.address.clone()) {
                continue;
            }
            let target = match measured.iter().find(|(a, _)| *a == endpoint.address) {
                Some((_, cost)) if measured.len() >= 2 => {
                    let t = (f64::from(EVEN) * mean / cost).round();
                    (t as u32).clamp(MIN_LOAD_PERMILLE, MAX_LOAD_PERMILLE)
                }
                _ => EVEN,
            };
            let old = previous.get(&endpoint.address).copied().unwrap_or(EVEN);
            let factor = damp(old, target);
            if factor != EVEN {
                next.insert(endpoint.address.clone(), factor);
            }
        }
    }
    next
}

/// Half-way from `old` to `target`, on the [`STEP`] grid; `old` if that is less than a step.
fn damp(old: u32, target: u32) -> u32 {
    let half = (f64::from(old) + f64::from(target)) / 2.0;
    let stepped = ((half / f64::from(STEP)).round() as u32) * STEP;
    if stepped.abs_diff(old) < STEP {
        old
    } else {
        stepped.clamp(MIN_LOAD_PERMILLE, MAX_LOAD_PERMILLE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(aware: bool, addresses: &[&str]) -> pb::Route {
        pb::Route {
            name: "default/web".into(),
            load_balancer: Some(pb::LoadBalancer {
                load_aware: aware,
                ..pb::LoadBalancer::default()
            }),
            rules: vec![pb::Rule {
                backends: vec![pb::Backend {
                    service: "web".into(),
                    weight: 1,
                    endpoints: addresses
                        .iter()
                        .map(|a| pb::Endpoint {
                            address: (*a).into(),
                            ready: true,
                            weight: 1,
                            ..pb::Endpoint::default()
                        })
                        .collect(),
                    ..pb::Backend::default()
                }],
                ..pb::Rule::default()
            }],
            ..pb::Route::default()
        }
    }

    fn samples(list: &[(&str, u64, u64, f64)]) -> BTreeMap<String, Sample> {
        list.iter()
            .map(|(a, req, err, lat)| {
                let mut s = Sample::default();
                s.add(*req, *err, *lat);
                ((*a).to_owned(), s)
            })
            .collect()
    }

    #[test]
    fn a_slow_endpoint_loses_share_in_damped_steps_until_it_settles() {
        let r = route(true, &["a", "b", "c"]);
        // c is three times slower than a and b: mean cost 50/3·… → target 1000·(50/3)/30 ≈ 556.
        let s = samples(&[
            ("a", 100, 0, 10.0),
            ("b", 100, 0, 10.0),
            ("c", 100, 0, 30.0),
        ]);
        let mut factors = LoadFactors::new();
        let mut seen = Vec::new();
        for _ in 0..10 {
            factors = next_factors([&r], &s, &factors);
            seen.push(factors.get("c").copied().unwrap_or(EVEN));
        }
        assert_eq!(
            seen[0], 800,
            "half-way from 1000 towards ~556, on the step grid"
        );
        assert!(
            seen.windows(2).all(|w| w[1] <= w[0]),
            "moves one way: {seen:?}"
        );
        let last = seen[seen.len() - 1];
        assert_eq!(seen[seen.len() - 2], last, "settles: {seen:?}");
        assert!((550..=600).contains(&last), "{seen:?}");
        assert!(factors["a"] > EVEN && factors["a"] == factors["b"]);
    }

    #[test]
    fn errors_cost_like_latency_and_policies_that_did_not_opt_in_are_left_alone() {
        let s = samples(&[("a", 100, 0, 10.0), ("b", 100, 20, 10.0)]);
        let factors = next_factors([&route(true, &["a", "b"])], &s, &LoadFactors::new());
        assert!(factors["b"] < EVEN && factors["a"] > EVEN, "{factors:?}");
        assert!(next_factors([&route(false, &["a", "b"])], &s, &LoadFactors::new()).is_empty());
    }

    #[test]
    fn without_enough_samples_factors_drift_back_to_an_even_share() {
        let r = route(true, &["a", "b"]);
        let few = samples(&[("a", 5, 0, 10.0), ("b", 5, 0, 90.0)]);
        let before: LoadFactors = [("b".to_owned(), 400)].into_iter().collect();
        let after = next_factors([&r], &few, &before);
        assert_eq!(after.get("b"), Some(&700));
        let later = next_factors([&r], &few, &after);
        assert_eq!(later.get("b"), Some(&850));
    }

    #[test]
    fn stamping_sets_factors_only_on_load_aware_routes() {
        let factors: LoadFactors = [("a".to_owned(), 500)].into_iter().collect();
        let mut aware = route(true, &["a", "b"]);
        stamp(&mut aware, &factors);
        let got: Vec<u32> = aware.rules[0].backends[0]
            .endpoints
            .iter()
            .map(|e| e.load_permille)
            .collect();
        assert_eq!(got, [500, 0]);
        let mut plain = route(false, &["a"]);
        stamp(&mut plain, &factors);
        assert_eq!(plain.rules[0].backends[0].endpoints[0].load_permille, 0);
    }
}
