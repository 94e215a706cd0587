//! The cached path: a request on a route with a response cache is answered from the cache
//! where RFC 9111 allows, otherwise forwarded with the cache filled from the answer as it
//! streams to the client (concurrent misses for one object wait for the first one's answer;
//! a stale answer is refreshed once in the background). A miss may ask the agent that owns
//! the object first, and what an unsafe request invalidates is invalidated at its owner too
//! ([`super::peer`]).

use super::peer::{X_WEIR_INVALIDATE, X_WEIR_PEER};
use super::{Body, Routed, Worker, up_body};
use crate::cache::policy::{WEIR_CACHE_CONTROL, invalidation_targets};
use crate::cache::{Cache, Lookup, XCache};
use crate::http::body::{ReqBody, UpBody};
use crate::http::headers::X_WEIR_ERROR;
use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Body as _;
use std::sync::Arc;
use std::time::SystemTime;

impl Worker {
    /// See the module doc.
    pub(super) async fn cached(
        self: &Arc<Self>,
        cache: Cache,
        host: String,
        mut parts: http::request::Parts,
        body: ReqBody,
        routed: Routed,
    ) -> Response<Body> {
        let now = SystemTime::now();
        let full = |r: Response<Bytes>| r.map(|b| Either::Right(Full::new(b)));
        // The loop guard of peer fill: a peer's request is answered here (from the cache or
        // the origin), never passed to another peer, and the origin does not see the field.
        let from_peer = parts.headers.remove(X_WEIR_PEER).is_some();
        if from_peer
            && parts.headers.remove(X_WEIR_INVALIDATE).is_some()
            && let Some(r) = self.peer_invalidation(&cache, &host, &parts, &routed)
        {
            return r;
        }
        let fill = match cache.lookup(&host, &parts, now) {
            Lookup::Hit(r) => return full(r),
            Lookup::Stale { response, refresh } => {
                if let Some(fill) = refresh {
                    // Answer stale now, refresh once in the background.
                    let me = self.clone();
                    let routed = Routed {
                        grpc: false,
                        ..routed.clone()
                    };
                    tokio::spawn(async move {
                        let mut fill = fill;
                        let head = fill.refresh_request();
                        let _ = me
                            .forward(head, UpBody::Empty, routed, Some(fill))
                            .await
                            .into_body()
                            .collect()
                            .await;
                    });
                }
                return full(response);
            }
            Lookup::Miss(fill) => match fill.from_tiers(&parts.headers, now).await {
                Ok(r) => return full(r),
                Err(fill) => {
                    let mut fill = if cache.config().peers
                        && !from_peer
                        && parts.method == Method::GET
                        && body.is_end_stream()
                        && cache.peers_open(now)
                    {
                        match self.ask_peer(&cache, &host, &parts, &routed, fill).await {
                            Ok(resp) => return resp,
                            Err(fill) => fill,
                        }
                    } else {
                        fill
                    };
                    fill.add_validators(&mut parts.headers);
                    Some(fill)
                }
            },
            Lookup::NotCached(r) => return full(r),
            Lookup::Wait(waiter) => match waiter.wait(&parts.headers, now).await {
                Some(r) => return full(r),
                None => None,
            },
            Lookup::Bypass => None,
        };
        let bypass = fill.is_none();
        let method = parts.method.clone();
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        // Kept only for what may be answered stale when the upstream fails.
        let stale_key = (bypass && (method == Method::GET || method == Method::HEAD))
            .then(|| head_copy(&parts));
        // Kept for telling the owning peers what an unsafe request invalidated.
        let unsafe_head = (bypass && !method.is_safe() && cache.config().peers)
            .then(|| (head_copy(&parts), routed.clone()));
        let mut resp = self.forward(parts, up_body(body), routed, fill).await;
        // Meant for this cache alone (RFC 9213 targeted field); stored copies keep it.
        resp.headers_mut().remove(WEIR_CACHE_CONTROL);
        if bypass {
            // A failed upstream may still be covered by a stale copy (staleIfError).
            if resp.headers().contains_key(X_WEIR_ERROR)
                && let Some(head) = &stale_key
                && let Some(r) = cache.stale_for_error(&host, head, SystemTime::now())
            {
                return full(r);
            }
            if !method.is_safe() {
                let targets =
                    invalidation_targets(&host, &method, &pq, resp.status(), resp.headers());
                cache.invalidate(&host, &targets);
                if let Some((head, routed)) = &unsafe_head
                    && !targets.is_empty()
                {
                    self.invalidate_at_peers(&cache, &host, head, &targets, routed)
                        .await;
                }
            }
            XCache::Bypass.mark(resp.headers_mut());
        }
        resp
    }
}

/// A copy of a request head (`request::Parts` is not `Clone`: extensions are left behind).
fn head_copy(parts: &http::request::Parts) -> http::request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
}
