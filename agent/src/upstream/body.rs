//! The response body handed downstream: the upstream's body, the connection lease it holds,
//! and — for a gRPC call — the tally that counts the call's final status.

use super::{Lease, RespBody};
use crate::http::body::BoxError;
use crate::metrics::GrpcTally;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};

/// A response body from upstream; for gRPC calls it watches the trailers for `grpc-status`
/// and counts the call by status when the body ends (without touching the data).
#[derive(Debug)]
pub(crate) struct DownBody {
    inner: RespBody,
    grpc: Option<GrpcTally>,
    /// Held until the body is dropped (an HTTP/2 stream slot).
    _lease: Lease,
}

impl DownBody {
    pub(crate) fn new(inner: RespBody, grpc: Option<GrpcTally>, lease: Lease) -> Self {
        Self {
            inner,
            grpc,
            _lease: lease,
        }
    }
}

impl Body for DownBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(tally) = &this.grpc {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(t) = frame.trailers_ref() {
                        let status = t
                            .get("grpc-status")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(2); // UNKNOWN: trailers without a status
                        tally.count(status);
                        this.grpc = None;
                    }
                }
                // The stream broke or ended without trailers: the client sees a failed call.
                Poll::Ready(Some(Err(_))) | Poll::Ready(None) => {
                    tally.count(2);
                    this.grpc = None;
                }
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
