//! Upstream connections: one pool per worker, keyed by endpoint address — HTTP/1.1 driven
//! by the request's own task (see [`h1`] for why not hyper's HTTP/1.1 client),
//! HTTP/2 on the `h2` crate directly (see [`h2`] for why not hyper's HTTP/2 client).
//!
//! Why not hyper-util's `legacy::Client`: its pool is built for many threads sharing one
//! client — a mutex over a SipHash map keyed by cloned scheme + authority, a boxed race
//! between checkout and a lazy connect on every request, and a spawned task per HTTP/1
//! request to wait for the connection to become idle again. A worker here owns its pool and
//! never shares it across threads, so all of that is overhead on the hot path (it was the
//! largest single item of weir's own cost in the proxy profile). What this pool does:
//!
//! - **HTTP/1.1**: a LIFO stack of idle keep-alive connections per endpoint (the most recently
//!   used connection is the one least likely to have been closed by the server). A request
//!   takes one or opens a new one; the response body hands the connection back when it has
//!   been read to the end, so no task runs per connection or per request. A connection
//!   found closed when taken is dropped; one whose close raced an idempotent request without
//!   a body gives the request back and it goes to another connection, invisibly to the
//!   client.
//! - **HTTP/2 (h2c)**: a few multiplexed connections per endpoint. A call goes to the
//!   connection with the fewest streams in flight that is below the peer's
//!   `SETTINGS_MAX_CONCURRENT_STREAMS`; when every connection is full another one is opened
//!   (up to [`H2_MAX_CONNECTIONS`]), so a server with a low stream limit does not make calls
//!   queue behind each other. Connects to one endpoint are serialized, so a burst of calls
//!   opens one connection, not one per call. A connection that received GOAWAY takes no
//!   new calls (they go to a fresh one) while its open streams finish; every connection is
//!   PINGed every [`H2_PING_INTERVAL`] and dropped when a PING goes unanswered.
//! - **Upgrades** (WebSocket and other `Upgrade`s) take a fresh connection ([`Pool::tcp`])
//!   that never enters the pool: after a `101` it belongs to the tunnel ([`h1::upgrade`]).
//! - A connect failure returns the request untouched ([`Error::Connect`]), so retrying it
//!   costs no copy of its head.
//!
//! Idle HTTP/1.1 connections are closed after [`IDLE_TIMEOUT`], idle HTTP/2 connections after
//! [`H2_IDLE_TIMEOUT`] (they are kept alive with PINGs meanwhile), by a sweep every few
//! seconds ([`Pool::sweep`]).
//!
//! Layout: [`pool`] owns the connections and sends a request on one; [`h1`] (with its
//! `encode`, `parse` and `body` steps) and [`h2`] each run one exchange; [`body`] is the
//! response body handed downstream. Every failure is an [`Error`] that says, through
//! [`Error::retry_kind`], whether the request may have reached the endpoint — the route's
//! retry policy decides on that kind alone.

pub(crate) mod body;
pub(crate) mod h1;
pub(crate) mod h2;
pub(crate) mod pool;

pub(crate) use body::DownBody;
pub(crate) use pool::Pool;

use crate::http::body::UpBody;
use crate::http::h2::H2Body;
use crate::http::headers::append_forwarded_for;
use h1::{H1Body, H1Error};
use http::Request;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// No connection could be opened (or every one tried closed before the request was
    /// written); the request was not sent and is given back.
    #[error("{0}")]
    Connect(std::io::Error, Box<Request<UpBody>>),
    /// The HTTP/1.1 exchange failed (the request may have reached the endpoint).
    #[error("{0}")]
    Http(H1Error),
    /// The HTTP/2 exchange failed (the request may have reached the endpoint, unless
    /// [`Error::retry_kind`] says otherwise).
    #[error("{0}")]
    H2(::h2::Error),
}

/// What a failed try means for sending the request again (pingora's errors carry the same
/// thing). The route's retry policy maps each kind to "retry or not" (`route::retry`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RetryKind {
    /// No connection could be had: the request was not sent, and is given back
    /// ([`Error::into_unsent`]). Counts as a failure of the endpoint.
    Connect,
    /// The endpoint refused the stream, or a graceful GOAWAY cut it off before the endpoint
    /// saw it (its id was above the GOAWAY's last-stream-id): as safe to send again as a
    /// connect failure, and not a failure of the endpoint.
    Refused,
    /// The exchange broke once the request was on its way: it may have been processed.
    Reset,
    /// The client's own request body broke (a malformed chunk, a short body): no fault of
    /// the endpoint and never sent again; the client gets `400` and its connection closes.
    ClientBody,
}

impl Error {
    /// Whether, and how safely, the request may be sent again.
    pub(crate) fn retry_kind(&self) -> RetryKind {
        match self {
            Error::Connect(..) => RetryKind::Connect,
            Error::Http(H1Error::RequestBody(_)) => RetryKind::ClientBody,
            Error::Http(_) => RetryKind::Reset,
            Error::H2(e)
                if e.reason() == Some(::h2::Reason::REFUSED_STREAM)
                    || (e.is_go_away() && e.reason() == Some(::h2::Reason::NO_ERROR)) =>
            {
                RetryKind::Refused
            }
            Error::H2(_) => RetryKind::Reset,
        }
    }

    /// The request, when it was never sent (a connect failure), so a retry reuses it.
    pub(crate) fn into_unsent(self) -> Option<Request<UpBody>> {
        match self {
            Error::Connect(_, req) => Some(*req),
            Error::Http(_) | Error::H2(_) => None,
        }
    }
}

/// What the proxy adds to every request it forwards: the client's address to
/// `X-Forwarded-For` and itself to `Via`. Added as the request is written, once per try
/// (an HTTP/1.1 head gets them while it is encoded, without touching the header map), so a
/// request given back unsent never carries them twice.
#[derive(Debug, Clone)]
pub(crate) struct Forwarded {
    pub(crate) peer: http::HeaderValue,
    pub(crate) via: http::HeaderValue,
}

impl Forwarded {
    pub(crate) fn apply(self, headers: &mut http::HeaderMap) {
        append_forwarded_for(headers, self.peer);
        headers.append(http::header::VIA, self.via);
    }
}

/// A response body from an upstream, whichever protocol it came over: HTTP/1.1 (left) or
/// HTTP/2 (right).
pub(crate) type RespBody = http_body_util::Either<H1Body, H2Body>;

/// What a response holds on its connection until its body is dropped: a stream slot of an
/// HTTP/2 connection (an HTTP/1.1 body hands its connection back itself).
pub(crate) type Lease = Option<StreamSlot>;

/// Counts one stream in flight on an HTTP/2 connection until dropped.
#[derive(Debug)]
pub(crate) struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
