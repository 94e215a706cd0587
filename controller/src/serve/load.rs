//! Load-aware weights, the loop: every `--load-round` (10 s by default: two agent load
//! reports, so a round sees every agent), the endpoint figures of all agents' load
//! reports since the last round go through [`crate::routing::load::next_factors`] and the
//! result to the hub, which re-weights the routes of load-aware policies and publishes them
//! when a factor moved. The arithmetic and its damping are in [`crate::routing::load`].
//!
//! With several controller replicas, each one sees the reports of the agents connected to it
//! (a share of the cluster, picked by the agents' connections, so usually a fair sample).

use crate::serve::hub::Hub;
use crate::serve::server::Agents;
use std::sync::Arc;
use std::time::Duration;

/// Runs a round every `every` until `stop` turns true.
pub async fn run(
    hub: Arc<Hub>,
    agents: Arc<Agents>,
    every: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => round(&hub, &agents),
            () = crate::serve::stopping(stop.clone()) => return,
        }
    }
}

/// One round; public for tests.
pub(crate) fn round(hub: &Hub, agents: &Agents) {
    let samples = agents.take_samples();
    let table = hub.current();
    let previous = hub.load_factors();
    let aware = table
        .routes
        .values()
        .any(|r| r.load_balancer.as_ref().is_some_and(|lb| lb.load_aware));
    if !aware && previous.is_empty() {
        return;
    }
    let next = crate::routing::load::next_factors(
        table.routes.values().map(|r| &**r),
        &samples,
        &previous,
    );
    if next != previous {
        let version = hub.set_load(next);
        tracing::debug!(version, "load-aware weights moved");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjectKey;
    use crate::routing::{PolicyInput, Snapshot};
    use serde_json::json;
    use weir_proto::v1::LoadReport;
    use weir_proto::v1::load_report::EndpointLoad;

    fn snapshot(load_aware: bool) -> Snapshot {
        let key = ObjectKey::new("default", "web");
        let service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"ports": [{"port": 80}]}
        }))
        .expect("service");
        let slice = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"]},
                          {"addresses": ["10.0.0.3"]}],
            "ports": [{"port": 8080}]
        }))
        .expect("slice");
        let spec = serde_json::from_value(json!({
            "hosts": ["web"],
            "loadBalancer": {"loadAware": load_aware},
            "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]
        }))
        .expect("spec");
        Snapshot {
            policies: vec![Arc::new(PolicyInput {
                key: key.clone(),
                source: "web.yaml".into(),
                generation: None,
                spec: Ok(spec),
            })],
            services: [(key.clone(), Arc::new(service))].into_iter().collect(),
            slices: [(ObjectKey::new("default", "web-1"), Arc::new(slice))]
                .into_iter()
                .collect(),
        }
    }

    fn report(agents: &Agents, slow: f64) {
        let endpoint = |address: &str, latency| EndpointLoad {
            route: "default/web".into(),
            address: address.into(),
            requests: 100,
            errors: 0,
            latency_ewma_ms: latency,
            in_flight: 1,
        };
        agents.record_load(&LoadReport {
            endpoints: vec![
                endpoint("10.0.0.1:8080", 5.0),
                endpoint("10.0.0.2:8080", 5.0),
                endpoint("10.0.0.3:8080", slow),
            ],
            interval_ms: 5000,
            ..LoadReport::default()
        });
    }

    fn weights(hub: &Hub) -> Vec<(u32, u32)> {
        hub.current().routes["default/web"].rules[0].backends[0]
            .endpoints
            .iter()
            .map(|e| (e.weight, e.load_permille))
            .collect()
    }

    #[test]
    fn reports_of_all_agents_move_weight_away_from_a_slow_endpoint_of_a_load_aware_policy() {
        let hub = Hub::new(1);
        let agents = Agents::default();
        let v1 = hub.update(snapshot(true), Vec::new());
        assert_eq!(weights(&hub), [(1, 0), (1, 0), (1, 0)]);
        // Two agents, each seeing the third endpoint slow.
        report(&agents, 20.0);
        report(&agents, 20.0);
        round(&hub, &agents);
        let after = weights(&hub);
        assert!(
            hub.current().version > v1,
            "a new version carries the factors"
        );
        assert!(after[2].1 < 1000 && after[2].0 < after[0].0, "{after:?}");
        assert_eq!(after[0], after[1]);
        assert_eq!(hub.config_state().load_factors.len(), 3);
        // An endpoint change keeps the factors in force (incremental path).
        let mut snap = snapshot(true);
        let key = ObjectKey::new("default", "web-1");
        let mut slice = (*snap.slices[&key]).clone();
        slice
            .endpoints
            .push(serde_json::from_value(json!({"addresses": ["10.0.0.4"]})).expect("endpoint"));
        snap.slices.insert(key, Arc::new(slice));
        hub.update(snap, Vec::new());
        let more = weights(&hub);
        assert_eq!(more.len(), 4);
        assert_eq!(more[2].1, after[2].1, "{more:?}");
    }

    #[test]
    fn policies_that_did_not_opt_in_keep_even_weights() {
        let hub = Hub::new(1);
        let agents = Agents::default();
        let v1 = hub.update(snapshot(false), Vec::new());
        report(&agents, 50.0);
        round(&hub, &agents);
        assert_eq!(hub.current().version, v1);
        assert_eq!(weights(&hub), [(1, 0), (1, 0), (1, 0)]);
    }
}
