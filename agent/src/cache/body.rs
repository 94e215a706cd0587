//! A response body that fills the cache as it streams to the client.
//!
//! The client is never delayed by caching: each frame is handed on as soon as it arrives,
//! and a copy of its bytes goes into the collector (one contiguous buffer, so the stored
//! body does not pin hyper's read buffers). A clean end stores the response; an error,
//! trailers, the per-object limit or the client going away store nothing.

use super::coalesce::Collector;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};

/// Wraps an upstream body, teeing its data into a [`Collector`].
pub struct TeeBody<B> {
    inner: B,
    collector: Option<Collector>,
}

impl<B: Body<Data = Bytes> + Unpin> TeeBody<B> {
    /// Starts the tee. An already finished body (no content) is stored at once, because
    /// hyper never polls a body that says it has ended.
    pub fn new(inner: B, collector: Collector) -> Self {
        let mut collector = Some(collector);
        if inner.is_end_stream()
            && let Some(c) = collector.take()
        {
            c.finish();
        }
        Self { inner, collector }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for TeeBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let Poll::Ready(item) = polled else {
            return Poll::Pending;
        };
        match &item {
            Some(Ok(frame)) => match frame.data_ref() {
                Some(data) => {
                    if let Some(c) = this.collector.as_mut()
                        && !c.push(data)
                    {
                        this.collector = None;
                    }
                    // hyper stops polling once the body reports its end, so the last data
                    // frame may be the last call we get.
                    if this.inner.is_end_stream()
                        && let Some(c) = this.collector.take()
                    {
                        c.finish();
                    }
                }
                // Trailers carry meaning we do not store (e.g. grpc-status): don't cache.
                None => this.collector = None,
            },
            Some(Err(_)) => this.collector = None,
            None => {
                if let Some(c) = this.collector.take() {
                    c.finish();
                }
            }
        }
        Poll::Ready(item)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
