//! The endpoint figures of the agent's LoadReports: per endpoint, the requests and errors
//! since the previous report (deltas of the counters the request path keeps anyway for
//! `/metrics`), and the latency EWMA and requests in flight (current values of the
//! balancer's `EndpointLoad`). Reading them is a few relaxed loads per endpoint every
//! report; nothing is added to the request path.
//!
//! The counters are per endpoint address, shared by every route that names it (that is how
//! the request path counts), so an address used by several routes is reported once, under the
//! first of them by name. The controller adds the reports up by address anyway.

use crate::route::table::Table;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;
use weir_proto::v1::load_report::EndpointLoad;

/// Remembers the counters at the previous report, to report differences.
#[derive(Debug)]
pub(crate) struct LoadReporter {
    /// (requests, errors) at the previous report, by address, for the endpoints of the table
    /// in force then.
    last: HashMap<SocketAddr, (u64, u64)>,
    at: Instant,
}

impl LoadReporter {
    /// Starts counting at `now`: the first report covers what happens from then on.
    pub(crate) fn new(table: &Table, now: Instant) -> Self {
        let mut reporter = Self {
            last: HashMap::new(),
            at: now,
        };
        let _ = reporter.report(table, now);
        reporter
    }

    /// The endpoints of `table` that took requests since the previous report, and the
    /// milliseconds since it (`interval_ms`).
    pub(crate) fn report(&mut self, table: &Table, now: Instant) -> (Vec<EndpointLoad>, u64) {
        let mut next = HashMap::with_capacity(self.last.len());
        let mut out = Vec::new();
        for rt in table.routes() {
            for m in rt.rules.iter().flat_map(|rule| rule.members.iter()) {
                let std::collections::hash_map::Entry::Vacant(slot) = next.entry(m.addr) else {
                    continue; // reported under an earlier route
                };
                let now_counts = (m.counters.requests.get(), m.counters.failures.get());
                slot.insert(now_counts);
                let (requests, errors) = match self.last.get(&m.addr) {
                    // Counters only go down when the endpoint was forgotten and came back:
                    // everything they hold is new.
                    Some(&(r, e)) if now_counts.0 >= r => {
                        (now_counts.0 - r, now_counts.1.saturating_sub(e))
                    }
                    _ => now_counts,
                };
                if requests == 0 {
                    continue;
                }
                out.push(EndpointLoad {
                    route: rt.name.to_string(),
                    address: m.addr.to_string(),
                    requests,
                    errors: errors.min(requests),
                    latency_ewma_ms: m.load.latency_ewma_ms().unwrap_or(0.0),
                    in_flight: m.load.in_flight(),
                });
            }
        }
        let interval_ms = now.saturating_duration_since(self.at).as_millis() as u64;
        self.last = next;
        self.at = now;
        (out, interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::state::Shared;
    use std::time::Duration;
    use weir_proto::v1 as pb;

    fn route(name: &str, endpoints: &[&str]) -> pb::Route {
        pb::Route {
            name: name.into(),
            hosts: vec![name.into()],
            rules: vec![pb::Rule {
                backends: vec![pb::Backend {
                    service: "svc".into(),
                    weight: 1,
                    endpoints: endpoints
                        .iter()
                        .map(|a| pb::Endpoint {
                            address: a.to_string(),
                            ready: true,
                            weight: 1,
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn reports_what_each_endpoint_took_since_the_previous_report() {
        let s = Shared::new("n".into(), String::new(), None);
        let t = s
            .apply(pb::RoutingUpdate {
                version: 1,
                full: true,
                upserted: vec![
                    route("a", &["10.0.0.1:80", "10.0.0.2:80"]),
                    route("b", &["10.0.0.2:80", "10.0.0.3:80"]),
                ],
                ..Default::default()
            })
            .expect("table");
        let member = |addr: &str| {
            t.routes()
                .flat_map(|r| r.rules.iter())
                .flat_map(|r| r.members.iter())
                .find(|m| m.addr.to_string() == addr)
                .expect("member")
                .clone()
        };
        let (e1, e2) = (member("10.0.0.1:80"), member("10.0.0.2:80"));
        // Counts from before the reporter started are not reported.
        e1.counters.requests.inc_by(100);
        let t0 = Instant::now();
        let mut reporter = LoadReporter::new(&t, t0);
        e1.counters.requests.inc_by(5);
        e1.counters.failures.inc();
        e1.load.start();
        e1.load
            .end(Duration::from_millis(4), crate::health::now_nanos());
        e1.load.start();
        e2.counters.requests.inc_by(3);

        let (got, interval) = reporter.report(&t, t0 + Duration::from_millis(5_000));
        assert_eq!(interval, 5_000);
        assert_eq!(got.len(), 2, "10.0.0.3 took nothing: {got:?}");
        assert_eq!(
            (got[0].route.as_str(), got[0].address.as_str()),
            ("a", "10.0.0.1:80")
        );
        assert_eq!(
            (got[0].requests, got[0].errors, got[0].in_flight),
            (5, 1, 1)
        );
        assert!((got[0].latency_ewma_ms - 4.0).abs() < 1e-9, "{got:?}");
        // Shared by a and b: reported once, under a.
        assert_eq!(
            (
                got[1].route.as_str(),
                got[1].address.as_str(),
                got[1].requests
            ),
            ("a", "10.0.0.2:80", 3)
        );
        assert_eq!(got[1].latency_ewma_ms, 0.0, "no sample yet");

        e2.counters.requests.inc_by(2);
        let (got, interval) = reporter.report(&t, t0 + Duration::from_millis(9_000));
        assert_eq!(interval, 4_000);
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].address.as_str(), got[0].requests),
            ("10.0.0.2:80", 2)
        );
        let (got, _) = reporter.report(&t, t0 + Duration::from_millis(9_500));
        assert!(got.is_empty());
    }
}
