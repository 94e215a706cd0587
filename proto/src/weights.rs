//! What `Endpoint.weight` means: the failover and weight arithmetic shared by both ends of
//! the protocol.
//!
//! The controller fills weights from EndpointSlice readiness; the agent recomputes them when
//! its own health checks and outlier detection mark endpoints up or down (health =
//! EndpointSlice ∧ active ∧ passive). Both must agree exactly on the formula, so it lives
//! here, beside the types it defines the meaning of, as pure functions over them — the one
//! exception to this crate holding only generated code.
//!
//! For each rule, backends are grouped by tier `t`. With `w_s` the backendRef weight of
//! Service `s`, `ready_s`/`total_s` its ready/all endpoints, and `M = minHealthyPercent/100`:
//!
//! ```text
//! h_t    = Σ_{s∈t, w_s>0} w_s·ready_s/total_s  ÷  Σ_{s∈t, w_s>0} w_s      (0 if Σ w_s = 0 or total_s = 0)
//! load_t = min(1 − Σ_{u<t} load_u,  h_t / M)                              (tiers in ascending order)
//! load_t ← load_t / Σ_u load_u                                            (when 0 < Σ load < 1)
//! ```
//!
//! This is Envoy's priority-level arithmetic with an overprovisioning factor of `1/M`: tier 0
//! keeps everything while `h_0 ≥ M` and spills the missing share, in proportion, downwards.
//! Inside tier `t`, Service `s` gets `w_s / Σ w` over the Services of `t` that have a ready
//! endpoint, and each of its ready endpoints gets an equal part of that, so the split between
//! Services does not depend on how many pods each has. Not-ready endpoints and weight-0
//! Services get 0 but stay listed.
//!
//! **Panic**: when every `h_t` is 0, all endpoints, ready or not, of the lowest tier that has
//! any endpoint (in a Service of weight > 0) get traffic by Service weight, then evenly.
//! Sending to endpoints that may be failing beats refusing every request.
//!
//! Integer weights: with one tier loaded, endpoint `e` of Service `s` gets `w_s · L / n_s`
//! where `n_s` is the number of serving endpoints of `s` and `L` the lcm of the `n_s`, so the
//! ratios are exact. With several tiers loaded, tier `t`'s integers are multiplied by
//! `(S / S_t) · k_t`, where `S_t` is the tier's integer sum, `S` the lcm of the `S_t`, and
//! `k_t = max(1, round(1000 · load_t))`: per-mille precision between tiers, exact within a
//! tier. The result is divided by the gcd of all weights. If the sum then exceeds
//! [`MAX_WEIGHT_SUM`] (or the exact integers would overflow), weights are recomputed from the
//! real-valued shares as `max(1, ⌊share · (MAX_WEIGHT_SUM − n)⌋)` with `n` the number of
//! endpoints that get traffic.

use crate::v1 as pb;
use std::collections::BTreeMap;

/// The largest sum of the endpoint weights of one rule, so that agents can use `u32`
/// arithmetic without overflow.
pub const MAX_WEIGHT_SUM: u64 = 1_000_000;

/// Tolerance when comparing a tier's capacity with the traffic still to place, so that float
/// rounding in `h_t / M` never spills a crumb of traffic to the next tier.
const EPSILON: f64 = 1e-9;

/// Fills in every endpoint weight of `rule` and its `active_tier` and `panic`, from the
/// backends' weights, tiers and endpoint readiness (see the module documentation).
pub fn assign_weights(rule: &mut pb::Rule, min_healthy_percent: u32) {
    let plan = plan_tiers(&rule.backends, min_healthy_percent);
    let per_endpoint = endpoint_weights(&rule.backends, &plan);
    let mut active_tier = None;
    for (backend, &weight) in rule.backends.iter_mut().zip(&per_endpoint) {
        for endpoint in &mut backend.endpoints {
            endpoint.weight = if plan.panic || endpoint.ready {
                weight
            } else {
                0
            };
        }
        if weight > 0 && !backend.endpoints.is_empty() {
            active_tier = active_tier.max(Some(backend.tier));
        }
    }
    rule.active_tier = active_tier.unwrap_or(0);
    rule.panic = plan.panic;
    apply_load_factors(rule);
}

/// The most an endpoint's load factor may move its weight from a fair split (4× down, 4× up).
pub const MIN_LOAD_PERMILLE: u32 = 250;
pub const MAX_LOAD_PERMILLE: u32 = 4000;

/// Load-aware weights: inside each backend, spreads the backend's weight over its serving
/// endpoints in proportion to their `load_permille` (0 = 1000, clamped to
/// [`MIN_LOAD_PERMILLE`, `MAX_LOAD_PERMILLE`]) instead of evenly. Each backend keeps its
/// total, so Service weights, tiers and spill are untouched: load moves between the pods of
/// one Service only. A no-op when no endpoint carries a factor.
///
/// Integers: the rule's weights are first scaled by `K = max(1, ⌊MAX_WEIGHT_SUM / (4·S)⌋)`
/// (`S` their sum) so that per-mille factors keep their precision, then endpoint `e` of a
/// backend with total `T` gets `max(1, round(T·K · f_e / Σ f))`, and all are divided by their
/// gcd. The sum stays within [`MAX_WEIGHT_SUM`] because factors are normalised per backend.
pub fn apply_load_factors(rule: &mut pb::Rule) {
    let factor = |e: &pb::Endpoint| match e.load_permille {
        0 => 1000,
        f => f.clamp(MIN_LOAD_PERMILLE, MAX_LOAD_PERMILLE),
    };
    let adjusted = rule
        .backends
        .iter()
        .flat_map(|b| &b.endpoints)
        .any(|e| e.weight > 0 && factor(e) != 1000);
    if !adjusted {
        return;
    }
    let sum: u64 = rule
        .backends
        .iter()
        .flat_map(|b| &b.endpoints)
        .map(|e| u64::from(e.weight))
        .sum();
    let k = (MAX_WEIGHT_SUM / (4 * sum.max(1))).max(1) as f64;
    let mut values: Vec<u128> = Vec::new();
    for backend in &rule.backends {
        let total: f64 = backend.endpoints.iter().map(|e| f64::from(e.weight)).sum();
        let factors: f64 = backend
            .endpoints
            .iter()
            .filter(|e| e.weight > 0)
            .map(|e| f64::from(factor(e)))
            .sum();
        for e in &backend.endpoints {
            values.push(if e.weight == 0 {
                0
            } else {
                ((total * k * f64::from(factor(e)) / factors).round() as u128).max(1)
            });
        }
    }
    reduce_by_gcd(&mut values);
    let mut values = values.into_iter();
    for e in rule.backends.iter_mut().flat_map(|b| &mut b.endpoints) {
        e.weight = values
            .next()
            .map_or(0, |v| u32::try_from(v).unwrap_or(u32::MAX));
    }
}

/// How one rule's traffic divides between its failover tiers.
#[derive(Clone, Debug, PartialEq)]
pub struct TierPlan {
    /// The tiers that take traffic, ascending, each with its share; shares sum to 1.
    pub loads: Vec<(u32, f64)>,
    /// No tier is healthy: `loads` is the one tier whose endpoints all take traffic.
    pub panic: bool,
}

fn ready_count(backend: &pb::Backend) -> usize {
    backend.endpoints.iter().filter(|e| e.ready).count()
}

/// How traffic divides between the failover tiers of `backends` (see the module docs).
pub fn plan_tiers(backends: &[pb::Backend], min_healthy_percent: u32) -> TierPlan {
    // tier → (Σ w, Σ w·ready/total)
    let mut tiers: BTreeMap<u32, (f64, f64)> = BTreeMap::new();
    for backend in backends.iter().filter(|b| b.weight > 0) {
        let weight = f64::from(backend.weight);
        let total = backend.endpoints.len();
        let healthy = if total == 0 {
            0.0
        } else {
            weight * ready_count(backend) as f64 / total as f64
        };
        let tier = tiers.entry(backend.tier).or_default();
        tier.0 += weight;
        tier.1 += healthy;
    }
    let min_healthy = f64::from(min_healthy_percent.clamp(1, 100)) / 100.0;
    let mut loads = Vec::new();
    let mut remaining = 1.0_f64;
    for (&tier, &(weight, healthy)) in &tiers {
        if healthy <= 0.0 {
            continue;
        }
        let capacity = healthy / weight / min_healthy;
        if capacity >= remaining - EPSILON {
            loads.push((tier, remaining));
            break;
        }
        loads.push((tier, capacity));
        remaining -= capacity;
    }
    if loads.is_empty() {
        let panic_tier = backends
            .iter()
            .filter(|b| b.weight > 0 && !b.endpoints.is_empty())
            .map(|b| b.tier)
            .min();
        return TierPlan {
            loads: panic_tier.map(|t| (t, 1.0)).into_iter().collect(),
            panic: panic_tier.is_some(),
        };
    }
    let sum: f64 = loads.iter().map(|(_, load)| load).sum();
    for (_, load) in &mut loads {
        *load /= sum;
    }
    TierPlan {
        loads,
        panic: false,
    }
}

/// The weight of each serving endpoint, per backend (0: the backend serves nothing).
fn endpoint_weights(backends: &[pb::Backend], plan: &TierPlan) -> Vec<u32> {
    // How many endpoints of each backend share its traffic.
    let counts: Vec<u64> = backends
        .iter()
        .map(|b| {
            let serving = match b.weight {
                0 => 0,
                _ if plan.panic => b.endpoints.len(),
                _ => ready_count(b),
            };
            u64::try_from(serving).unwrap_or(u64::MAX)
        })
        .collect();
    let Some(mut exact) = exact_weights(backends, &counts, plan) else {
        return fit_shares(&real_shares(backends, &counts, plan), &counts);
    };
    reduce_by_gcd(&mut exact);
    let sum = exact.iter().zip(&counts).try_fold(0u128, |acc, (v, c)| {
        acc.checked_add(v.checked_mul(u128::from(*c))?)
    });
    if sum.is_some_and(|s| s <= u128::from(MAX_WEIGHT_SUM)) {
        return exact
            .into_iter()
            .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
            .collect();
    }
    let total: f64 = exact
        .iter()
        .zip(&counts)
        .map(|(v, c)| *v as f64 * *c as f64)
        .sum();
    let shares: Vec<f64> = exact.iter().map(|v| *v as f64 / total).collect();
    fit_shares(&shares, &counts)
}

/// Each serving endpoint's share of the rule's traffic, per backend, straight from the
/// formula: `load_t · (w_s / Σ w) / n_s`.
fn real_shares(backends: &[pb::Backend], counts: &[u64], plan: &TierPlan) -> Vec<f64> {
    backends
        .iter()
        .zip(counts)
        .map(|(b, &count)| {
            let Some(&(_, load)) = plan.loads.iter().find(|(t, _)| *t == b.tier) else {
                return 0.0;
            };
            if count == 0 {
                return 0.0;
            }
            let tier_weight: f64 = backends
                .iter()
                .zip(counts)
                .filter(|(o, c)| o.tier == b.tier && **c > 0)
                .map(|(o, _)| f64::from(o.weight))
                .sum();
            load * f64::from(b.weight) / tier_weight / count as f64
        })
        .collect()
}

/// Integer weights proportional to per-endpoint `shares` (summing to 1 over all serving
/// endpoints): `max(1, ⌊share · (MAX_WEIGHT_SUM − n)⌋)`, so the sum stays within
/// [`MAX_WEIGHT_SUM`] and no serving endpoint drops to 0.
fn fit_shares(shares: &[f64], counts: &[u64]) -> Vec<u32> {
    let serving: u64 = shares
        .iter()
        .zip(counts)
        .filter(|(s, _)| **s > 0.0)
        .map(|(_, c)| *c)
        .sum();
    let budget = MAX_WEIGHT_SUM.saturating_sub(serving) as f64;
    let mut values: Vec<u128> = shares
        .iter()
        .map(|&share| {
            if share > 0.0 && share.is_finite() {
                ((share * budget).floor() as u128).max(1)
            } else {
                0
            }
        })
        .collect();
    reduce_by_gcd(&mut values);
    values
        .into_iter()
        .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
        .collect()
}

/// Exact integer weights per serving endpoint of each backend (see the module documentation),
/// or `None` when they would overflow.
fn exact_weights(backends: &[pb::Backend], counts: &[u64], plan: &TierPlan) -> Option<Vec<u128>> {
    let mut values = vec![0u128; backends.len()];
    let mut tier_sums = Vec::with_capacity(plan.loads.len());
    for &(tier, _) in &plan.loads {
        let serving = || {
            backends
                .iter()
                .zip(counts)
                .enumerate()
                .filter(move |(_, (b, c))| b.tier == tier && **c > 0)
                .map(|(i, (b, c))| (i, u128::from(b.weight), u128::from(*c)))
        };
        let lcm_count = serving().try_fold(1u128, |acc, (_, _, c)| lcm(acc, c))?;
        let mut sum = 0u128;
        for (i, weight, count) in serving() {
            values[i] = weight.checked_mul(lcm_count / count)?;
            sum = sum.checked_add(values[i].checked_mul(count)?)?;
        }
        if sum == 0 {
            return None;
        }
        tier_sums.push(sum);
    }
    if plan.loads.len() > 1 {
        let common = tier_sums.iter().try_fold(1u128, |acc, &s| lcm(acc, s))?;
        for (&(tier, load), &sum) in plan.loads.iter().zip(&tier_sums) {
            let per_mille = ((load * 1000.0).round() as u128).max(1);
            let factor = (common / sum).checked_mul(per_mille)?;
            for (backend, value) in backends.iter().zip(values.iter_mut()) {
                if backend.tier == tier {
                    *value = value.checked_mul(factor)?;
                }
            }
        }
    }
    Some(values)
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn lcm(a: u128, b: u128) -> Option<u128> {
    if a == 0 || b == 0 {
        return Some(0);
    }
    (a / gcd(a, b)).checked_mul(b)
}

fn reduce_by_gcd(values: &mut [u128]) {
    let divisor = values.iter().fold(0, |acc, &v| gcd(acc, v));
    if divisor > 1 {
        for value in values {
            *value /= divisor;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn backend(tier: u32, weight: u32, ready: &[bool]) -> pb::Backend {
        pb::Backend {
            tier,
            weight,
            endpoints: ready
                .iter()
                .enumerate()
                .map(|(k, &ready)| pb::Endpoint {
                    address: format!("10.0.0.{k}:80"),
                    ready,
                    ..pb::Endpoint::default()
                })
                .collect(),
            ..pb::Backend::default()
        }
    }

    fn endpoint_weight_list(rule: &pb::Rule) -> Vec<u32> {
        rule.backends
            .iter()
            .flat_map(|b| &b.endpoints)
            .map(|e| e.weight)
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

    #[test]
    fn weights_that_would_overflow_stay_under_the_sum_cap_without_zeroing_anyone() {
        // Ready counts of distinct primes make the exact lcm enormous.
        let primes = [
            101usize, 103, 107, 109, 113, 127, 131, 137, 139, 149, 151, 157, 163, 167, 173, 179,
            181, 191, 193, 197,
        ];
        let mut rule = pb::Rule {
            backends: primes
                .iter()
                .enumerate()
                .map(|(i, &p)| pb::Backend {
                    service: format!("s{i}"),
                    ..backend(0, if i == 0 { 1_000_000 } else { 1 }, &vec![true; p])
                })
                .collect(),
            ..pb::Rule::default()
        };
        let counts: Vec<u64> = primes.iter().map(|p| *p as u64).collect();
        let plan = plan_tiers(&rule.backends, 70);
        assert_eq!(exact_weights(&rule.backends, &counts, &plan), None);
        assign_weights(&mut rule, 70);
        let all = endpoint_weight_list(&rule);
        assert!(all.iter().all(|w| *w > 0));
        assert!(all.iter().map(|w| u64::from(*w)).sum::<u64>() <= MAX_WEIGHT_SUM);
        let first = backend_share(&rule, "s0");
        assert!(first > 0.99, "{first}");
    }

    #[test]
    fn a_rule_with_only_weight_0_backends_routes_nothing_and_is_not_panic() {
        let mut rule = pb::Rule {
            backends: vec![backend(0, 0, &[true, false])],
            ..pb::Rule::default()
        };
        assign_weights(&mut rule, 70);
        assert_eq!(endpoint_weight_list(&rule), [0, 0]);
        assert!(!rule.panic);
        assert_eq!(rule.active_tier, 0);
    }

    // --- properties -------------------------------------------------------------------------

    fn arb_rule() -> impl Strategy<Value = (pb::Rule, u32)> {
        let arb_backend = (
            0u32..3,
            prop_oneof![Just(0u32), 1u32..10, 1u32..1_000_000],
            prop::collection::vec(any::<bool>(), 0..6),
        );
        (prop::collection::vec(arb_backend, 1..7), 1u32..=100).prop_map(|(backends, pct)| {
            let rule = pb::Rule {
                backends: backends
                    .into_iter()
                    .enumerate()
                    .map(|(i, (tier, weight, ready))| pb::Backend {
                        service: format!("s{i}"),
                        ..backend(tier, weight, &ready)
                    })
                    .collect(),
                ..pb::Rule::default()
            };
            (rule, pct)
        })
    }

    fn tier_share(rule: &pb::Rule, tier: u32) -> f64 {
        let total: u64 = endpoint_weight_list(rule)
            .iter()
            .map(|w| u64::from(*w))
            .sum();
        let in_tier: u64 = rule
            .backends
            .iter()
            .filter(|b| b.tier == tier)
            .flat_map(|b| &b.endpoints)
            .map(|e| u64::from(e.weight))
            .sum();
        if total == 0 {
            0.0
        } else {
            in_tier as f64 / total as f64
        }
    }

    fn plan_share(plan: &TierPlan, tier: u32) -> f64 {
        plan.loads
            .iter()
            .filter(|(t, _)| *t == tier)
            .map(|(_, l)| l)
            .sum()
    }

    proptest! {
        #[test]
        fn traffic_flows_exactly_when_a_weighted_backend_has_an_endpoint((mut rule, pct) in arb_rule()) {
            let plan = plan_tiers(&rule.backends, pct);
            assign_weights(&mut rule, pct);
            let sum: u64 = endpoint_weight_list(&rule).iter().map(|w| u64::from(*w)).sum();
            let reachable = rule.backends.iter().any(|b| b.weight > 0 && !b.endpoints.is_empty());
            prop_assert_eq!(sum > 0, reachable);
            prop_assert!(sum <= MAX_WEIGHT_SUM);
            if reachable {
                let loads: f64 = plan.loads.iter().map(|(_, l)| l).sum();
                prop_assert!((loads - 1.0).abs() < 1e-9, "loads {:?}", plan.loads);
            }
        }

        #[test]
        fn a_weight_0_backend_gets_nothing((mut rule, pct) in arb_rule()) {
            assign_weights(&mut rule, pct);
            for b in rule.backends.iter().filter(|b| b.weight == 0) {
                prop_assert!(b.endpoints.iter().all(|e| e.weight == 0));
            }
        }

        #[test]
        fn a_not_ready_endpoint_gets_nothing_unless_in_panic((mut rule, pct) in arb_rule()) {
            assign_weights(&mut rule, pct);
            if !rule.panic {
                for e in rule.backends.iter().flat_map(|b| &b.endpoints).filter(|e| !e.ready) {
                    prop_assert_eq!(e.weight, 0);
                }
            }
        }

        #[test]
        fn the_serving_endpoints_of_one_service_get_equal_weights((mut rule, pct) in arb_rule()) {
            assign_weights(&mut rule, pct);
            for b in &rule.backends {
                let serving: BTreeSet<u32> = b.endpoints.iter()
                    .filter(|e| rule.panic || e.ready)
                    .map(|e| e.weight)
                    .collect();
                prop_assert!(serving.len() <= 1, "{:?}", b);
            }
        }

        #[test]
        fn integer_weights_follow_the_tier_loads_and_service_weights((mut rule, pct) in arb_rule()) {
            let plan = plan_tiers(&rule.backends, pct);
            assign_weights(&mut rule, pct);
            for b in &rule.backends {
                let serving = |o: &pb::Backend| o.weight > 0 && o.endpoints.iter().any(|e| plan.panic || e.ready);
                let tier_weight: f64 = rule.backends.iter()
                    .filter(|o| o.tier == b.tier && serving(o))
                    .map(|o| f64::from(o.weight))
                    .sum();
                let expected = if serving(b) {
                    plan_share(&plan, b.tier) * f64::from(b.weight) / tier_weight
                } else {
                    0.0
                };
                let actual = backend_share(&rule, &b.service);
                let actual = if actual.is_nan() { 0.0 } else { actual };
                prop_assert!((actual - expected).abs() < 3e-3, "{} expected {} got {} in {:?}", b.service, expected, actual, rule);
            }
        }

        #[test]
        fn making_one_more_tier_0_endpoint_ready_never_lowers_tier_0_share((mut rule, pct) in arb_rule()) {
            let flip = rule.backends.iter().enumerate()
                .filter(|(_, b)| b.tier == 0)
                .find_map(|(i, b)| b.endpoints.iter().position(|e| !e.ready).map(|k| (i, k)));
            if let Some((i, k)) = flip {
                let before_plan = plan_tiers(&rule.backends, pct);
                let mut before = rule.clone();
                assign_weights(&mut before, pct);
                rule.backends[i].endpoints[k].ready = true;
                let after_plan = plan_tiers(&rule.backends, pct);
                assign_weights(&mut rule, pct);
                prop_assert!(plan_share(&after_plan, 0) >= plan_share(&before_plan, 0) - 1e-12);
                prop_assert!(tier_share(&rule, 0) >= tier_share(&before, 0) - 2e-3);
            }
        }
    }

    fn with_factors(mut rule: pb::Rule, factors: &[u32]) -> pb::Rule {
        for (e, f) in rule
            .backends
            .iter_mut()
            .flat_map(|b| &mut b.endpoints)
            .zip(factors.iter().cycle())
        {
            e.load_permille = *f;
        }
        rule
    }

    proptest! {
        #[test]
        fn load_factors_move_traffic_inside_a_service_only(
            (rule, pct) in arb_rule(),
            factors in prop::collection::vec(prop_oneof![Just(0u32), 100u32..5000], 1..8),
        ) {
            let mut even = rule.clone();
            assign_weights(&mut even, pct);
            let mut loaded = with_factors(rule, &factors);
            assign_weights(&mut loaded, pct);
            prop_assert_eq!(even.active_tier, loaded.active_tier);
            prop_assert_eq!(even.panic, loaded.panic);
            let sum: u64 = endpoint_weight_list(&loaded).iter().map(|w| u64::from(*w)).sum();
            prop_assert!(sum <= MAX_WEIGHT_SUM);
            for (a, b) in even.backends.iter().zip(&loaded.backends) {
                // Who gets traffic does not change, and each Service keeps its share.
                for (x, y) in a.endpoints.iter().zip(&b.endpoints) {
                    prop_assert_eq!(x.weight > 0, y.weight > 0);
                }
                let share_even = backend_share(&even, &a.service);
                let share_loaded = backend_share(&loaded, &b.service);
                if share_even.is_finite() {
                    prop_assert!((share_even - share_loaded).abs() < 2e-3,
                        "{} {} vs {}", a.service, share_even, share_loaded);
                }
                // Inside a Service, a higher factor never gets less.
                let serving: Vec<&pb::Endpoint> = b.endpoints.iter().filter(|e| e.weight > 0).collect();
                for x in &serving {
                    for y in &serving {
                        let f = |e: &pb::Endpoint| if e.load_permille == 0 { 1000 } else {
                            e.load_permille.clamp(MIN_LOAD_PERMILLE, MAX_LOAD_PERMILLE)
                        };
                        if f(x) > f(y) {
                            prop_assert!(x.weight >= y.weight);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_slow_endpoint_gets_its_factor_of_an_even_split() {
        let mut rule = pb::Rule {
            backends: vec![backend(0, 1, &[true, true, true])],
            ..pb::Rule::default()
        };
        rule.backends[0].endpoints[0].load_permille = 500;
        assign_weights(&mut rule, 70);
        let w = endpoint_weight_list(&rule);
        // 0.5 : 1 : 1 of the Service's traffic.
        assert_eq!(w[1], w[2]);
        assert_eq!(w[0] * 2, w[1], "{w:?}");
    }
}
