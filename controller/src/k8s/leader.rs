//! Leader election on a `coordination.k8s.io/v1` Lease, so that only one replica writes
//! status while every replica serves agents.
//!
//! This is client-go's algorithm, kept small: the leader renews `spec.renewTime` every
//! [`Config::renew_every`]; a candidate takes the Lease over once it has seen the same Lease
//! record unchanged for a whole `leaseDurationSeconds` *by its own monotonic clock* (so clock
//! skew between replicas does not matter). Every write is a create or a replace carrying the
//! resourceVersion that was read, so two candidates racing for an expired Lease cannot both
//! win: the API server refuses the second replace with `409 Conflict`.
//!
//! Own code rather than a crate: `kube-leader-election` 0.44 and `kube-lease-manager` 0.12
//! both support kube 4, but this needs only get/create/replace, which keeps the fake API
//! server of the tests small and the optimistic concurrency explicit.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The Lease's name.
pub(crate) const LEASE_NAME: &str = "weir-controller";

/// Timing of the election.
#[derive(Clone, Debug)]
pub struct Config {
    /// How long a Lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How often the leader renews and candidates retry.
    pub renew_every: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }
}

/// The last Lease record seen, and when it was first seen unchanged.
struct Observed {
    record: (Option<String>, Option<MicroTime>),
    since: Instant,
}

/// Competes for the Lease `LEASE_NAME` in `namespace` as `identity` until `shutdown` turns
/// true, publishing whether this replica leads on `leader`. On shutdown a leader releases
/// the Lease (holder cleared), so another replica takes over at its next try instead of
/// waiting for the Lease to expire — a rolling update then leaves status unwritten for a
/// retry period, not a lease duration (client-go's `ReleaseOnCancel`).
pub async fn run(
    client: Client,
    namespace: String,
    identity: String,
    config: Config,
    leader: watch::Sender<bool>,
    shutdown: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let mut observed: Option<Observed> = None;
    let mut last_renew: Option<Instant> = None;
    loop {
        match try_acquire_or_renew(&api, &identity, &config, &mut observed).await {
            Ok(true) => {
                last_renew = Some(Instant::now());
                if !leader.send_replace(true) {
                    tracing::info!(%identity, lease = %format!("{namespace}/{LEASE_NAME}"), "became leader");
                }
            }
            Ok(false) => {
                if leader.send_replace(false) {
                    tracing::warn!(%identity, "lost the lease to another replica");
                }
                last_renew = None;
            }
            Err(e) => {
                // A leader that cannot renew steps down before its Lease can expire, so two
                // replicas never write at the same time.
                let stale = last_renew
                    .is_none_or(|t| t.elapsed() + config.renew_every >= config.lease_duration);
                if stale && leader.send_replace(false) {
                    tracing::warn!(%identity, error = %e, "cannot renew the lease; stepping down");
                } else {
                    tracing::warn!(%identity, error = %e, "lease request failed; retrying");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(config.renew_every) => {}
            () = crate::serve::stopping(shutdown.clone()) => {
                // Stop writing status first, then give the Lease up.
                if leader.send_replace(false) {
                    match release(&api, &identity).await {
                        Ok(true) => tracing::info!(%identity, "released the lease"),
                        Ok(false) => {}
                        Err(e) => tracing::warn!(%identity, error = %e, "could not release the lease; it will expire"),
                    }
                }
                return;
            }
        }
    }
}

/// Clears the holder of the Lease if it is `identity`; whether it did.
async fn release(api: &Api<Lease>, identity: &str) -> Result<bool, kube::Error> {
    let Some(mut lease) = api.get_opt(LEASE_NAME).await? else {
        return Ok(false);
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(identity) {
        return Ok(false);
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(now());
    replace(api, &lease).await
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// Writes `lease` back with the resourceVersion it was read with; `false` when another
/// writer got there first (409).
async fn replace(api: &Api<Lease>, lease: &Lease) -> Result<bool, kube::Error> {
    match api.replace(LEASE_NAME, &PostParams::default(), lease).await {
        Ok(_) => Ok(true),
        Err(e) if is_conflict(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// One round: returns whether this replica holds the Lease afterwards.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    identity: &str,
    config: &Config,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let duration_s = i32::try_from(config.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(LEASE_NAME).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.to_string()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(identity.to_string()),
                lease_duration_seconds: Some(duration_s),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let record = (holder.clone(), spec.renew_time.clone());
    let since = match observed {
        Some(o) if o.record == record => o.since,
        _ => Instant::now(),
    };
    *observed = Some(Observed { record, since });
    let held_by_me = holder.as_deref() == Some(identity);
    let their_duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(config.lease_duration, Duration::from_secs);
    let expired = holder.is_none() || since.elapsed() >= their_duration;
    if !held_by_me && !expired {
        return Ok(false);
    }
    if !held_by_me {
        spec.holder_identity = Some(identity.to_string());
        spec.acquire_time = Some(now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(now());
    spec.lease_duration_seconds = Some(duration_s);
    // The resourceVersion read above travels with the replace: a concurrent writer wins and
    // this one gets 409.
    replace(api, &lease).await
}
