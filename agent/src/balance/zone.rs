//! Locality: zone-aware weights that keep a rule's traffic in the agent's zone while the zone
//! holds enough healthy capacity, decided per Service so the split between Services holds.

/// Where one target is, for [`zone_aware_weights`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placement<'a> {
    /// The weight the picker would use: already 0 for unhealthy, ejected or drained targets,
    /// which hold no capacity.
    pub(crate) weight: u32,
    /// The target's `topology.kubernetes.io/zone`; empty when unknown (never local, and not
    /// counted as a zone).
    pub(crate) zone: &'a str,
    /// The target's Service (e.g. the backend's index in the rule): locality is decided and
    /// applied per group, and each group keeps its total share, so a 90/10 split between
    /// Services holds in every zone.
    pub(crate) group: u32,
}

/// Zone-aware weights (Envoy's zone-aware routing, simplified to all-or-nothing).
///
/// Callers are assumed spread over zones like the capacity is: each zone's agents send about
/// 1/Z of the traffic, Z being the number of zones holding the group's capacity. So within
/// each group, if the local targets (zone == `my_zone`) hold at least `min_local_percent` % of
/// that even share — `local / total ≥ min_local_percent/100 × 1/Z` — the whole group's weight
/// moves to its local targets (in their own proportions) and its other targets get 0;
/// otherwise the group keeps its weights and spreads over all zones. Unhealthy targets
/// carrying weight 0, a zone losing endpoints loses the preference once it falls below the
/// threshold. An empty `my_zone` disables locality.
///
/// Returns one weight per target, in the same order. Weights are rescaled (and reduced by
/// their gcd) so that each group's share of the total is unchanged.
pub(crate) fn zone_aware_weights(
    targets: &[Placement<'_>],
    my_zone: &str,
    min_local_percent: u32,
) -> Vec<u32> {
    let unchanged = || targets.iter().map(|t| t.weight).collect::<Vec<u32>>();
    if my_zone.is_empty() {
        return unchanged();
    }
    let mut groups: Vec<u32> = targets
        .iter()
        .filter(|t| t.weight > 0)
        .map(|t| t.group)
        .collect();
    groups.sort_unstable();
    groups.dedup();
    // Per group: (total, local, stays local?).
    let decisions: Vec<(u128, u128, bool)> = groups
        .iter()
        .map(|&g| {
            let members = || targets.iter().filter(move |t| t.group == g && t.weight > 0);
            let total: u128 = members().map(|t| u128::from(t.weight)).sum();
            let local: u128 = members()
                .filter(|t| t.zone == my_zone)
                .map(|t| u128::from(t.weight))
                .sum();
            let mut zones: Vec<&str> = members()
                .map(|t| t.zone)
                .filter(|z| !z.is_empty())
                .collect();
            zones.sort_unstable();
            zones.dedup();
            let z = zones.len() as u128;
            let keep_local = local > 0
                && local < total
                && local * z * 100 >= total * u128::from(min_local_percent);
            (total, local, keep_local)
        })
        .collect();
    if !decisions.iter().any(|d| d.2) {
        return unchanged();
    }
    // Fixed point: a localized group's local weights grow by total/local; 2^16 keeps the
    // rounding error below 0.002 % before the gcd reduction makes the numbers small again.
    const SCALE: u128 = 1 << 16;
    let scaled: Vec<u128> = targets
        .iter()
        .map(|t| {
            let w = u128::from(t.weight);
            let Ok(g) = groups.binary_search(&t.group) else {
                return 0;
            };
            match decisions.get(g) {
                _ if w == 0 => 0,
                Some(&(total, local, true)) if t.zone == my_zone => {
                    ((w * total * SCALE + local / 2) / local).max(1)
                }
                Some(&(_, _, true)) => 0,
                _ => w * SCALE,
            }
        })
        .collect();
    let divisor = scaled.iter().copied().fold(0u128, gcd128).max(1);
    let max = scaled.iter().copied().max().unwrap_or(0) / divisor;
    scaled
        .iter()
        .map(|&w| {
            let w = w / divisor;
            if w == 0 {
                0
            } else if max > u128::from(u32::MAX) {
                // Still positive after scaling down: locality decides who is drained, rounding
                // must not.
                ((w * u128::from(u32::MAX)) / max).max(1) as u32
            } else {
                w as u32
            }
        })
        .collect()
}

#[cfg(test)]
/// [`zone_aware_weights`] for callers that only know whether each target is local: all
/// non-local targets are taken as one other zone and as one group. With more than two zones
/// this is conservative (traffic stays local only while the local zone holds
/// `min_local_percent`/2 % of all the weight), and it cannot keep a Service split intact when
/// a Service has no local endpoint; prefer [`zone_aware_weights`].
pub(crate) fn locality_weights(
    weights: &[u32],
    local: &[bool],
    min_local_percent: u32,
) -> Vec<u32> {
    let targets: Vec<Placement<'_>> = weights
        .iter()
        .enumerate()
        .map(|(i, &weight)| Placement {
            weight,
            zone: if local.get(i).copied().unwrap_or(false) {
                "local"
            } else {
                "other"
            },
            group: 0,
        })
        .collect();
    zone_aware_weights(&targets, "local", min_local_percent)
}

pub(super) fn gcd128(a: u128, b: u128) -> u128 {
    if b == 0 { a } else { gcd128(b, a % b) }
}
