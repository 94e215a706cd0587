//! Cache peer fill (`spec.cache.peers`, agents started with `--cache-peer-addr`): a memory
//! (and lower tier) miss asks the agent that owns the object before the origin. The owner
//! answers from its cache, or fetches the object from the origin, keeps it and answers, so
//! the origin sees about one fetch per object per zone however many agents ask for it (the
//! owner's coalescing merges the agents' concurrent misses as it merges its own clients').
//!
//! The controller pushes the agents of this agent's zone that serve peer fills
//! ([`PeerSet`]); the owner of a key is the peer with the highest rendezvous score
//! (highest-random-weight hashing): every agent computes the same owner from the same list,
//! and when a peer joins or leaves only the keys it wins or held move.
//!
//! The peer request is a plain HTTP/1.1 GET to the owner's proxy listener, carrying
//! `x-weir-peer` (this agent's node name): the loop guard. A request that carries it never
//! goes to a peer again, and the owner removes it before the origin sees the request. A
//! client that sends the field itself only turns peer fill off for its own request.
//!
//! What an unsafe request invalidates here (RFC 9111 §4.4: its URI, `Location`,
//! `Content-Location`) is invalidated at each target's owner too, before the client gets its
//! answer: a GET carrying `x-weir-peer` and `x-weir-invalidate`, answered `204` by the owner
//! after it dropped its copies. Without it a client's write followed by a read on the same
//! agent would get the old object back from the owner (this agent's miss asks it), and every
//! agent of the zone would keep filling from the owner's old copy until it expired. The wait
//! is bounded ([`INVALIDATE_WITHIN`]); an owner that does not answer is logged and counted,
//! its copy then lives until it expires, as in a cache without peers. The owner honours the
//! field only from the IP of an agent of its set, so a client cannot use it to empty caches.
//!
//! Failure costs little: a peer that cannot be reached is passed over for [`DOWN_FOR`]
//! (keys it owned go to the next peer by score, the same one on every agent); a peer that
//! answers with its own error (`x-weir-error`: it could not reach the origin, or does not
//! know the route yet) sends this agent to the origin itself. Only a peer that does not
//! answer within the route's timeout ends the request, as the origin would have.

use super::{Body, DEFAULT_TIMEOUT, Routed, Worker};
use crate::cache::tier::disk::fnv1a;
use crate::cache::{Cache, Fill, FillAction, PeerResult, TeeBody, X_CACHE, XCache};
use crate::health::now_ms;
use crate::http::body::UpBody;
use crate::http::headers::{VIA_11, X_WEIR_ERROR, strip_hop_by_hop};
use crate::http::reply::LocalReply;
use crate::upstream::{DownBody, Forwarded, Lease, RespBody, RetryKind};
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Either, Full};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime};

/// The loop guard: set on peer requests, never forwarded to an origin.
pub(crate) const X_WEIR_PEER: HeaderName = HeaderName::from_static("x-weir-peer");

/// With [`X_WEIR_PEER`]: drop this object (every variant) instead of answering it.
pub(crate) const X_WEIR_INVALIDATE: HeaderName = HeaderName::from_static("x-weir-invalidate");

/// How long an unsafe request waits for the owners of what it invalidated.
pub(crate) const INVALIDATE_WITHIN: Duration = Duration::from_secs(1);

/// How long a peer that could not be reached is passed over.
pub(crate) const DOWN_FOR: Duration = Duration::from_secs(10);

/// One agent of the set.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) node: Box<str>,
    pub(crate) addr: SocketAddr,
    /// This agent itself.
    pub(crate) me: bool,
    /// The node name's hash, mixed into each key's score.
    seed: u64,
    /// `health::now_ms` before which the peer is passed over (0: up).
    down_until_ms: AtomicU64,
}

impl Peer {
    pub(crate) fn is_down(&self, now_ms: u64) -> bool {
        self.down_until_ms.load(Relaxed) > now_ms
    }
}

/// The peers this agent hashes keys over (empty: peer fill is off).
#[derive(Debug)]
pub struct PeerSet {
    pub(crate) peers: Vec<Peer>,
    /// This agent's node name, what peer requests carry.
    me: HeaderValue,
}

impl Default for PeerSet {
    fn default() -> Self {
        Self {
            peers: Vec::new(),
            me: HeaderValue::from_static("agent"),
        }
    }
}

/// Why a peer list from the controller was (partly) refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cache peer {node}: address {address:?} is not an IP:port")]
pub struct PeerError {
    node: String,
    address: String,
}

impl PeerSet {
    /// The set for the controller's list of (node, address); `me` is this agent's node name. A peer whose
    /// address does not parse is left out (and reported); the others still serve. A list
    /// without this agent in it turns peer fill off: this agent would ask peers that never
    /// ask it, and owners would disagree between agents.
    pub fn new<'a>(
        list: impl IntoIterator<Item = (&'a str, &'a str)>,
        me: &str,
    ) -> (Self, Vec<PeerError>) {
        let mut errors = Vec::new();
        let peers: Vec<Peer> = list
            .into_iter()
            .filter_map(|(node, address)| match address.parse() {
                Ok(addr) => Some(Peer {
                    node: node.into(),
                    addr,
                    me: node == me,
                    seed: fnv1a(node.bytes()),
                    down_until_ms: AtomicU64::new(0),
                }),
                Err(_) => {
                    errors.push(PeerError {
                        node: node.to_owned(),
                        address: address.to_owned(),
                    });
                    None
                }
            })
            .collect();
        let me = HeaderValue::from_str(me).unwrap_or(HeaderValue::from_static("agent"));
        if !peers.iter().any(|p| p.me) {
            return (Self::default(), errors);
        }
        (Self { peers, me }, errors)
    }

    /// The peer to ask for `host` + `path_and_query`: its index, or `None` when this agent
    /// owns the key (or there is no set). Peers that are down are passed over.
    pub(crate) fn owner(&self, host: &str, pq: &str, now_ms: u64) -> Option<usize> {
        if self.peers.len() < 2 {
            return None;
        }
        let key = fnv1a(host.bytes().chain(pq.bytes()));
        let (idx, _) = self
            .peers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.me || !p.is_down(now_ms))
            .map(|(i, p)| (i, mix(key ^ p.seed)))
            .max_by_key(|&(_, score)| score)?;
        (!self.peers[idx].me).then_some(idx)
    }

    /// Whether `ip` is the address of another agent of the set.
    fn is_peer_ip(&self, ip: IpAddr) -> bool {
        self.peers.iter().any(|p| !p.me && p.addr.ip() == ip)
    }

    fn mark_down(&self, idx: usize) {
        let until = now_ms() + u64::try_from(DOWN_FOR.as_millis()).unwrap_or(u64::MAX);
        self.peers[idx].down_until_ms.store(until, Relaxed);
    }
}

/// The splitmix64 finalizer: spreads a key's hash so each peer's score is independent.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Worker {
    /// Asks the owning peer for the object `fill` is for. `Ok`: the answer (the owner's,
    /// stored here as it streams, or a local reply when the owner did not answer in time).
    /// `Err`: this agent owns the key, or the owner failed; go to the origin with `fill`.
    pub(super) async fn ask_peer(
        &self,
        cache: &Cache,
        host: &str,
        parts: &http::request::Parts,
        routed: &Routed,
        fill: Fill,
    ) -> Result<Response<Body>, Fill> {
        let set = self.routing.peers.load_full();
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let Some(idx) = set.owner(host, pq, now_ms()) else {
            return Err(fill);
        };
        let peer = &set.peers[idx];
        let Some(up) = peer_request(parts, host, parts.uri.path_and_query().cloned(), &set.me)
        else {
            return Err(fill);
        };
        let route = &routed.route;
        let budget = route.timeout.unwrap_or(DEFAULT_TIMEOUT);
        let sent = self.send_to_peer(peer, up, routed);
        let (resp, lease) = match tokio::time::timeout(budget, sent).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                if e.retry_kind() == RetryKind::Connect {
                    set.mark_down(idx);
                }
                tracing::debug!(route = %route.name, peer = %peer.node, addr = %peer.addr, error = %e, "cache peer fill failed; asking the origin");
                cache.note_peer(PeerResult::Error);
                return Err(fill);
            }
            Err(_) => {
                cache.note_peer(PeerResult::Error);
                tracing::debug!(route = %route.name, peer = %peer.node, "cache peer did not answer in time");
                return Ok(super::outcome::fail(
                    LocalReply::UpstreamTimeout,
                    Some(fill),
                    false,
                    route,
                ));
            }
        };
        if resp.headers().contains_key(X_WEIR_ERROR) {
            tracing::debug!(route = %route.name, peer = %peer.node, status = %resp.status(), "cache peer could not answer; asking the origin");
            cache.note_peer(PeerResult::Error);
            return Err(fill);
        }
        let (mut rparts, rbody) = resp.into_parts();
        let hit = rparts.headers.get(X_CACHE).is_some_and(|v| {
            v.as_bytes() == b"HIT" || v.as_bytes() == b"STALE" || v.as_bytes() == b"PEER"
        });
        cache.note_peer(if hit {
            PeerResult::Hit
        } else {
            PeerResult::Fill
        });
        route.counters.response(rparts.status);
        let body = DownBody::new(rbody, None, lease);
        let action = fill.on_response(&mut rparts, SystemTime::now());
        if hit {
            XCache::Peer.mark(&mut rparts.headers);
        }
        Ok(match action {
            FillAction::Respond(r) => r.map(|b| Either::Right(Full::new(b))),
            FillAction::Store(collector) => Response::from_parts(
                rparts,
                Either::Left(Either::Right(TeeBody::new(body, collector))),
            ),
            FillAction::Forward => Response::from_parts(rparts, Either::Left(Either::Left(body))),
        })
    }

    /// Sends `req` to `peer` over the pool (plain HTTP/1.1), as a forward on behalf of the
    /// client of `routed`.
    fn send_to_peer(
        &self,
        peer: &Peer,
        req: Request<UpBody>,
        routed: &Routed,
    ) -> impl Future<Output = Result<(Response<RespBody>, Lease), crate::upstream::Error>> + use<>
    {
        let fwd = Forwarded {
            peer: routed.peer.clone(),
            via: VIA_11,
        };
        self.pool
            .send(peer.addr, false, req, Instant::now(), Some(fwd))
    }
    /// Invalidates `targets` (what an unsafe request on `head` invalidated here) at their
    /// owners, waiting at most [`INVALIDATE_WITHIN`] for them (see the module doc).
    pub(super) async fn invalidate_at_peers(
        &self,
        cache: &Cache,
        host: &str,
        head: &http::request::Parts,
        targets: &[String],
        routed: &Routed,
    ) {
        let set = self.routing.peers.load_full();
        let now = now_ms();
        let sends = targets.iter().filter_map(|pq| {
            let idx = set.owner(host, pq, now)?;
            let pq = PathAndQuery::try_from(pq.as_str()).ok();
            let mut req = peer_request(head, host, pq, &set.me)?;
            req.headers_mut()
                .insert(X_WEIR_INVALIDATE, HeaderValue::from_static("1"));
            let peer = &set.peers[idx];
            let sent = self.send_to_peer(peer, req, routed);
            Some(async move {
                let done = match sent.await {
                    Ok((resp, lease)) if resp.status() == StatusCode::NO_CONTENT => {
                        let _ = DownBody::new(resp.into_body(), None, lease).collect().await;
                        Ok(())
                    }
                    Ok((resp, _)) => Err(format!("answered {}", resp.status())),
                    Err(e) => Err(e.to_string()),
                };
                (peer, done)
            })
        });
        let all = futures::future::join_all(sends);
        let Ok(results) = tokio::time::timeout(INVALIDATE_WITHIN, all).await else {
            cache.note_peer(PeerResult::Error);
            tracing::warn!(route = %routed.route.name, host, "cache peers did not confirm an invalidation in time; their copies live until they expire");
            return;
        };
        for (peer, done) in results {
            if let Err(error) = done {
                cache.note_peer(PeerResult::Error);
                tracing::warn!(route = %routed.route.name, peer = %peer.node, host, error, "cache peer did not take an invalidation; its copy lives until it expires");
            }
        }
    }

    /// The owner's side of [`Self::invalidate_at_peers`]: drops the object and answers
    /// `204`. `None` when the request does not come from an agent of the set: it is then
    /// served as the GET it is.
    pub(super) fn peer_invalidation(
        &self,
        cache: &Cache,
        host: &str,
        parts: &http::request::Parts,
        routed: &Routed,
    ) -> Option<Response<Body>> {
        let ip: IpAddr = routed.peer.to_str().ok()?.parse().ok()?;
        if !self.routing.peers.load().is_peer_ip(ip) {
            return None;
        }
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        cache.invalidate(host, &[pq.to_owned()]);
        let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
        *resp.status_mut() = StatusCode::NO_CONTENT;
        Some(resp)
    }
}

/// The GET a peer is sent for `pq`: the client's fields (they may select the rule) but
/// hop-by-hop ones, those of a request body, and those that would make the answer partial or
/// conditional (this agent stores the whole object), with `Host` and the loop guard.
fn peer_request(
    parts: &http::request::Parts,
    host: &str,
    pq: Option<PathAndQuery>,
    me: &HeaderValue,
) -> Option<Request<UpBody>> {
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    for name in [
        header::CONTENT_LENGTH,
        header::CONTENT_TYPE,
        header::EXPECT,
        header::RANGE,
        header::IF_RANGE,
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
    ] {
        headers.remove(name);
    }
    if !headers.contains_key(header::HOST) {
        headers.insert(header::HOST, HeaderValue::from_str(host).ok()?);
    }
    headers.insert(X_WEIR_PEER, me.clone());
    let mut up = Request::new(UpBody::Empty);
    *up.method_mut() = Method::GET;
    *up.uri_mut() = super::forward::upstream_uri(None, pq).ok()?;
    *up.version_mut() = Version::HTTP_11;
    *up.headers_mut() = headers;
    Some(up)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (node, address) of `n` peers.
    fn list(n: usize) -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("node-{i}"), format!("127.0.0.1:{}", 20000 + i)))
            .collect()
    }

    /// `PeerSet::new` over an owned list.
    fn set_of(list: &[(String, String)], me: &str) -> (PeerSet, Vec<PeerError>) {
        PeerSet::new(list.iter().map(|(n, a)| (n.as_str(), a.as_str())), me)
    }

    fn owners(set: &PeerSet, keys: usize) -> Vec<Option<String>> {
        (0..keys)
            .map(|k| {
                set.owner("shop", &format!("/item/{k}"), 1)
                    .map(|i| set.peers[i].node.to_string())
            })
            .collect()
    }

    #[test]
    fn every_agent_computes_the_same_owner_and_owns_its_share() {
        let peers = list(4);
        let views: Vec<PeerSet> = (0..4)
            .map(|i| set_of(&peers, &format!("node-{i}")).0)
            .collect();
        let keys = 4000;
        let mut owned = [0usize; 4];
        for k in 0..keys {
            let pq = format!("/item/{k}");
            // Each agent either asks the owner, or is the owner.
            let names: Vec<String> = views
                .iter()
                .enumerate()
                .map(|(i, v)| match v.owner("shop", &pq, 1) {
                    Some(idx) => v.peers[idx].node.to_string(),
                    None => format!("node-{i}"),
                })
                .collect();
            assert!(names.windows(2).all(|w| w[0] == w[1]), "{pq}: {names:?}");
            let n: usize = names[0]["node-".len()..].parse().expect("index");
            owned[n] += 1;
        }
        for (i, n) in owned.iter().enumerate() {
            assert!(
                (800..1200).contains(n),
                "node-{i} owns {n} of {keys} keys: {owned:?}"
            );
        }
    }

    #[test]
    fn a_peer_leaving_moves_only_its_own_keys() {
        let before = set_of(&list(5), "node-0").0;
        let after = set_of(&list(4), "node-0").0; // node-4 left
        let (b, a) = (owners(&before, 3000), owners(&after, 3000));
        for (k, (b, a)) in b.iter().zip(&a).enumerate() {
            if b.as_deref() != Some("node-4") {
                assert_eq!(b, a, "key {k} moved though its owner stayed");
            }
        }
    }

    #[test]
    fn a_peer_marked_down_is_passed_over_by_its_keys_only() {
        let set = set_of(&list(3), "node-0").0;
        let before = owners(&set, 1000);
        let down = before
            .iter()
            .flatten()
            .next()
            .cloned()
            .expect("some key is owned by a peer");
        let idx = set
            .peers
            .iter()
            .position(|p| *p.node == *down)
            .expect("peer");
        set.mark_down(idx);
        let now = now_ms();
        for (k, was) in before.iter().enumerate() {
            let owner = set
                .owner("shop", &format!("/item/{k}"), now)
                .map(|i| set.peers[i].node.to_string());
            assert_ne!(owner.as_deref(), Some(down.as_str()));
            if was.as_deref() != Some(down.as_str()) {
                assert_eq!(&owner, was);
            }
        }
    }

    #[test]
    fn a_list_without_this_agent_or_with_one_peer_turns_peer_fill_off() {
        let (set, errors) = set_of(&list(3), "elsewhere");
        assert!(set.peers.is_empty() && errors.is_empty());
        let alone = set_of(&list(1), "node-0").0;
        assert_eq!(alone.owner("shop", "/", 1), None);
        let mut bad = list(2);
        bad[1].1 = "not an address".into();
        let (set, errors) = set_of(&bad, "node-0");
        assert_eq!(set.peers.len(), 1);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("node-1"));
    }
}
