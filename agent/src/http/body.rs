//! Request bodies that can be sent more than once, so a request can be retried without being
//! held back until its body has arrived.
//!
//! The first try streams the client's body through as it arrives while keeping a copy of each
//! chunk (a `Bytes` clone: a reference count, not a copy of the data). A retry replays the
//! chunks seen so far and then keeps reading the client's body where the first try stopped —
//! the body source is shared, not owned by one try, because hyper drops a failed request's
//! body. Past `limit` bytes the copies are dropped and the body can no longer be replayed:
//! the request simply is not retried (the idea of linkerd2-proxy's `ReplayBody`, written here
//! because it has to fit hyper 1's `Body` and our retry loop).

use super::h2::H2Body;
use super::tee::{ShadowBody, ShadowTee};
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// A client's request body: from hyper's HTTP/1.1 server, or from an h2c stream.
pub(crate) type ReqBody = http_body_util::Either<Incoming, H2Body>;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug)]
struct Source {
    body: ReqBody,
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    buffered: usize,
    /// Past the limit: copies dropped, no more replicas.
    overflow: bool,
    /// The client's body has ended.
    ended: bool,
}

/// One try's view of a replayable request body.
#[derive(Debug)]
pub(crate) struct ReplayBody {
    source: Arc<Mutex<Source>>,
    limit: usize,
    /// Chunks of `source.chunks` this replica has sent.
    pos: usize,
    trailers_sent: bool,
}

impl ReplayBody {
    pub(crate) fn new(body: ReqBody, limit: usize) -> Self {
        let ended = body.is_end_stream();
        Self {
            source: Arc::new(Mutex::new(Source {
                body,
                chunks: Vec::new(),
                trailers: None,
                buffered: 0,
                overflow: false,
                ended,
            })),
            limit,
            pos: 0,
            trailers_sent: false,
        }
    }

    /// A fresh replica for a retry, or `None` once the body outgrew the replay limit.
    pub(crate) fn replica(&self) -> Option<Self> {
        let src = self.source.lock().unwrap_or_else(|e| e.into_inner());
        if src.overflow {
            return None;
        }
        Some(Self {
            source: self.source.clone(),
            limit: self.limit,
            pos: 0,
            trailers_sent: false,
        })
    }

    /// Whether a retry could still replay this body.
    pub(crate) fn replayable(&self) -> bool {
        !self
            .source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .overflow
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut src = this.source.lock().unwrap_or_else(|e| e.into_inner());
        if this.pos < src.chunks.len() {
            let chunk = src.chunks[this.pos].clone();
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if src.ended {
            if !this.trailers_sent {
                this.trailers_sent = true;
                if let Some(t) = src.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        }
        match Pin::new(&mut src.body).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                src.ended = true;
                this.trailers_sent = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !src.overflow {
                        src.buffered += data.len();
                        if src.buffered > this.limit {
                            // Only this replica (the one reading the client) goes on.
                            src.overflow = true;
                            src.chunks = Vec::new();
                            this.pos = 0;
                        } else {
                            src.chunks.push(data.clone());
                            this.pos = src.chunks.len();
                        }
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    src.trailers = Some(t.clone());
                    src.ended = true;
                    this.trailers_sent = true;
                }
                if src.body.is_end_stream() {
                    src.ended = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let src = self.source.lock().unwrap_or_else(|e| e.into_inner());
        src.ended && self.pos >= src.chunks.len() && (self.trailers_sent || src.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let src = self.source.lock().unwrap_or_else(|e| e.into_inner());
        if self.pos == 0 && src.chunks.is_empty() {
            src.body.size_hint()
        } else {
            SizeHint::default()
        }
    }
}

/// An upstream request body.
#[derive(Debug)]
pub(crate) enum UpBody {
    /// Streamed once: the request will not be retried.
    Stream(ReqBody),
    Replay(ReplayBody),
    /// No body (a request the agent makes itself, such as a cache refresh).
    Empty,
    /// A body copied to a mirror as it streams (boxed: rare, and it nests an `UpBody`).
    Tee(Box<ShadowTee<UpBody>>),
    /// The mirror's copy.
    Shadow(ShadowBody),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpBody::Stream(b) => Pin::new(b).poll_frame(cx),
            UpBody::Replay(b) => Pin::new(b).poll_frame(cx),
            UpBody::Empty => Poll::Ready(None),
            UpBody::Tee(b) => Pin::new(&mut **b).poll_frame(cx),
            UpBody::Shadow(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Stream(b) => b.is_end_stream(),
            UpBody::Replay(b) => b.is_end_stream(),
            UpBody::Empty => true,
            UpBody::Tee(b) => b.is_end_stream(),
            UpBody::Shadow(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Stream(b) => b.size_hint(),
            UpBody::Replay(b) => b.size_hint(),
            UpBody::Empty => SizeHint::with_exact(0),
            UpBody::Tee(b) => b.size_hint(),
            UpBody::Shadow(b) => b.size_hint(),
        }
    }
}
