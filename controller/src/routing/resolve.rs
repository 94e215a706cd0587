//! Resolution: a validated route's backendRefs to Service ports, upstream protocols and
//! endpoints, from the Services and EndpointSlices of a snapshot.

use super::Snapshot;
use super::load::LoadFactors;
use crate::model::{EndpointSlice, ObjectKey, SERVICE_NAME_LABEL, Service};
use k8s_openapi::api::core::v1::ServicePort;
use k8s_openapi::api::discovery::v1::Endpoint as SliceEndpoint;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use weir_proto::v1 as pb;

/// The Service port `appProtocol` that selects HTTP/2 cleartext upstream.
pub(crate) const H2C_APP_PROTOCOL: &str = "kubernetes.io/h2c";

/// (namespace, Service name) → the keys of its EndpointSlices, in slice-key order. Kept up to
/// date across computations by [`super::Routing`], so an endpoint change does not re-index
/// every slice.
pub(crate) type SliceIndex = BTreeMap<(String, String), BTreeSet<ObjectKey>>;

/// Every Service port a rule sends requests to: its backends and its mirror's shadow.
pub(super) fn rule_backends(rule: &pb::Rule) -> impl Iterator<Item = &pb::Backend> {
    rule.backends
        .iter()
        .chain(rule.mirror.as_ref().and_then(|m| m.backend.as_ref()))
}

/// [`rule_backends`], to resolve in place.
pub(super) fn rule_backends_mut(rule: &mut pb::Rule) -> impl Iterator<Item = &mut pb::Backend> {
    rule.backends
        .iter_mut()
        .chain(rule.mirror.as_mut().and_then(|m| m.backend.as_mut()))
}

/// The Service an EndpointSlice belongs to (its `kubernetes.io/service-name` label), as a
/// [`SliceIndex`] key.
pub(crate) fn slice_owner(key: &ObjectKey, slice: &EndpointSlice) -> Option<(String, String)> {
    let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((key.namespace.clone(), service.clone()))
}

/// Indexes every slice of `slices` by its Service.
pub(crate) fn index_slices(slices: &BTreeMap<ObjectKey, Arc<EndpointSlice>>) -> SliceIndex {
    let mut index = SliceIndex::new();
    for (key, slice) in slices {
        if let Some(owner) = slice_owner(key, slice) {
            index.entry(owner).or_default().insert(key.clone());
        }
    }
    index
}

/// The Kubernetes objects a computation resolves against.
pub(super) struct Cluster<'a> {
    pub(super) services: &'a BTreeMap<ObjectKey, Arc<Service>>,
    pub(super) slices: &'a BTreeMap<ObjectKey, Arc<EndpointSlice>>,
    pub(super) index: &'a SliceIndex,
    /// Load factors for the routes of load-aware policies.
    pub(super) load: &'a LoadFactors,
}

/// Why a backendRef does not resolve; displayed after the backendRef's field path.
pub(super) enum Unresolved {
    NoService,
    NoTcpPort,
    NoSuchPort(u32, Vec<i32>),
    Ambiguous(Vec<i32>),
}

pub(super) struct UnresolvedMessage<'a> {
    pub(super) namespace: &'a str,
    pub(super) service: &'a str,
    pub(super) why: &'a Unresolved,
}

impl fmt::Display for UnresolvedMessage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (ns, svc) = (self.namespace, self.service);
        let list = |ports: &[i32]| {
            ports
                .iter()
                .map(i32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self.why {
            Unresolved::NoService => write!(f, ": Service {ns}/{svc} not found"),
            Unresolved::NoTcpPort => write!(f, ": Service {ns}/{svc} has no TCP port"),
            Unresolved::NoSuchPort(port, ports) => write!(
                f,
                ".port: Service {ns}/{svc} has no port {port} (it has {})",
                list(ports)
            ),
            Unresolved::Ambiguous(ports) => write!(
                f,
                ".port: Service {ns}/{svc} has several ports ({}); set port",
                list(ports)
            ),
        }
    }
}

impl<'a> Cluster<'a> {
    pub(super) fn new(
        snapshot: &'a Snapshot,
        index: &'a SliceIndex,
        load: &'a LoadFactors,
    ) -> Self {
        Self {
            services: &snapshot.services,
            slices: &snapshot.slices,
            index,
            load,
        }
    }

    /// Resolves every backend of `route` in place. Unresolved backends keep no endpoints; for
    /// each, an error naming the field goes to `errors` and the Service to `unresolved`.
    pub(super) fn resolve(
        &self,
        namespace: &str,
        route: &mut pb::Route,
        errors: &mut Vec<String>,
        unresolved: &mut BTreeSet<String>,
    ) {
        for (i, rule) in route.rules.iter_mut().enumerate() {
            for (j, backend) in rule.backends.iter_mut().enumerate() {
                if let Err(why) = self.resolve_backend(namespace, backend) {
                    errors.push(format!(
                        "spec.rules[{i}].backendRefs[{j}]{}",
                        UnresolvedMessage {
                            namespace,
                            service: &backend.service,
                            why: &why,
                        }
                    ));
                    unresolved.insert(backend.service.clone());
                }
            }
            if let Some(backend) = rule.mirror.as_mut().and_then(|m| m.backend.as_mut())
                && let Err(why) = self.resolve_backend(namespace, backend)
            {
                errors.push(format!(
                    "spec.rules[{i}].mirror.backendRef{}",
                    UnresolvedMessage {
                        namespace,
                        service: &backend.service,
                        why: &why,
                    }
                ));
                unresolved.insert(backend.service.clone());
            }
        }
    }

    pub(super) fn resolve_backend(
        &self,
        namespace: &str,
        backend: &mut pb::Backend,
    ) -> Result<(), Unresolved> {
        let key = ObjectKey::new(namespace, backend.service.as_str());
        let service = self.services.get(&key).ok_or(Unresolved::NoService)?;
        // HTTP needs TCP; a UDP port that shares the number (DNS-style) is not a candidate.
        let tcp_ports = || {
            service
                .spec
                .iter()
                .flat_map(|spec| spec.ports.iter().flatten())
                .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
        };
        let port = if backend.port == 0 {
            let mut ports = tcp_ports();
            match (ports.next(), ports.next()) {
                (None, _) => return Err(Unresolved::NoTcpPort),
                (Some(only), None) => only,
                (Some(_), Some(_)) => {
                    return Err(Unresolved::Ambiguous(tcp_ports().map(|p| p.port).collect()));
                }
            }
        } else {
            tcp_ports()
                .find(|p| u32::try_from(p.port).ok() == Some(backend.port))
                .ok_or_else(|| {
                    Unresolved::NoSuchPort(backend.port, tcp_ports().map(|p| p.port).collect())
                })?
        };
        backend.port = u32::try_from(port.port).unwrap_or(0);
        backend.protocol = if port.app_protocol.as_deref() == Some(H2C_APP_PROTOCOL) {
            pb::Protocol::H2c
        } else {
            pb::Protocol::Http1
        } as i32;
        backend.endpoints = self.endpoints(namespace, &backend.service, port);
        Ok(())
    }

    /// The endpoints of one Service port: de-duplicated by address (a ready copy wins, as a
    /// pod can briefly sit in two slices), sorted by address.
    pub(super) fn endpoints(
        &self,
        namespace: &str,
        service: &str,
        port: &ServicePort,
    ) -> Vec<pb::Endpoint> {
        let Some(keys) = self.index.get(&(namespace.to_owned(), service.to_owned())) else {
            return Vec::new();
        };
        let slices = keys.iter().filter_map(|k| self.slices.get(k));
        let mut endpoints = Vec::new();
        for slice in slices {
            // FQDN slices name hosts, not addresses the agent can dial.
            if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
                continue;
            }
            let Some(target_port) = slice_port(slice, port) else {
                continue;
            };
            for endpoint in &slice.endpoints {
                // Kubernetes: the addresses of one endpoint are fungible and consumers may use
                // only the first, as kube-proxy does; using all would count a pod twice.
                let Some(ip) = endpoint
                    .addresses
                    .first()
                    .and_then(|a| a.parse::<IpAddr>().ok())
                else {
                    continue;
                };
                endpoints.push(pb::Endpoint {
                    address: SocketAddr::new(ip, target_port).to_string(),
                    ready: is_ready(endpoint),
                    zone: endpoint.zone.clone().unwrap_or_default(),
                    weight: 0,
                    load_permille: 0,
                });
            }
        }
        // Stable sort: among copies of one address, slice-key order decides unless one is ready.
        endpoints.sort_by(|a, b| a.address.cmp(&b.address));
        endpoints.dedup_by(|later, kept| {
            if later.address != kept.address {
                return false;
            }
            if later.ready && !kept.ready {
                kept.ready = true;
                kept.zone = std::mem::take(&mut later.zone);
            }
            true
        });
        endpoints
    }
}

/// The port endpoints of `slice` listen on for the Service port `port`: the slice port of the
/// same name, else an integer `targetPort`, else the Service port itself.
pub(super) fn slice_port(slice: &EndpointSlice, port: &ServicePort) -> Option<u16> {
    let name = port.name.as_deref().unwrap_or("");
    let number = slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref().unwrap_or("") == name)
        .and_then(|p| p.port)
        .or(match &port.target_port {
            Some(IntOrString::Int(target)) => Some(*target),
            _ => None,
        })
        .unwrap_or(port.port);
    u16::try_from(number).ok().filter(|p| *p != 0)
}

/// EndpointSlice readiness as Kubernetes defines it: a missing `ready` means ready, and a
/// terminating endpoint takes no new requests even while it still serves old ones.
pub(super) fn is_ready(endpoint: &SliceEndpoint) -> bool {
    endpoint.conditions.as_ref().is_none_or(|c| {
        c.ready != Some(false) && c.serving != Some(false) && c.terminating != Some(true)
    })
}
