//! `weir.v1.RoutingDiscovery` on the wire: the gRPC service at the HTTP/2 level, so that a
//! message encoded once is sent to every agent as the same bytes.
//!
//! A generated tonic server encodes each outgoing message into a per-stream buffer, which
//! then keeps the size of the largest message sent on it (a full table: ~0.5 MB at 1,000
//! routes) for the life of the stream; at 1,000 agents that alone was ~400 MB, and each
//! message was copied once per agent. Here the agent's requests are still decoded by tonic
//! ([`Streaming`]), but responses are framed by hand: gRPC's 5-byte prefix and the message's
//! shared [`Encoded`] bytes as their own DATA frame (small messages, such as pings and most
//! deltas, are copied into one frame with their prefix instead). Per stream that costs
//! nothing but the queued `Bytes` handles. The service is the same on the wire as the
//! generated `weir_proto::v1::routing_discovery_server` (agents use its generated client);
//! compression is not offered.

use crate::serve::server::{DiscoveryService, OutStream};
use http_body::Frame;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio_stream::Stream;
use tonic::codec::Streaming;
use tonic::codegen::{Body, Bytes, Service, StdError, http};
use tonic::server::NamedService;
use tonic::{Request, Status};
use tonic_prost::ProstDecoder;
use weir_proto::Encoded;
use weir_proto::v1::AgentMessage;

/// The one method of the service.
pub(crate) const STREAM_PATH: &str = "/weir.v1.RoutingDiscovery/Stream";
/// The largest message an agent may send (load reports of big tables).
const MAX_AGENT_MESSAGE: usize = 4 << 20;
/// Messages up to this size go out in one frame with their prefix (a copy); larger ones as
/// their own shared bytes.
const COPY_UP_TO: usize = 16 << 10;

/// The tower service tonic's router serves.
#[derive(Clone)]
pub struct RoutingDiscoveryServer {
    inner: Arc<DiscoveryService>,
}

impl RoutingDiscoveryServer {
    pub fn new(inner: DiscoveryService) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }
}

impl NamedService for RoutingDiscoveryServer {
    const NAME: &'static str = "weir.v1.RoutingDiscovery";
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, Infallible>> + Send>>;

impl<B> Service<http::Request<B>> for RoutingDiscoveryServer
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            if req.uri().path() != STREAM_PATH {
                return Ok(Status::unimplemented("no such method").into_http());
            }
            let compressed = req
                .headers()
                .get("grpc-encoding")
                .is_some_and(|v| v.as_bytes() != b"identity");
            if compressed {
                return Ok(
                    Status::unimplemented("compressed requests are not accepted").into_http(),
                );
            }
            let (parts, body) = req.into_parts();
            let messages = Streaming::new_request(
                ProstDecoder::<AgentMessage>::default(),
                body,
                None,
                Some(MAX_AGENT_MESSAGE),
            );
            let request = Request::from_http(http::Request::from_parts(parts, messages));
            Ok(match inner.stream(request).await {
                Ok(response) => {
                    let mut http = http::Response::new(tonic::body::Body::new(Frames {
                        messages: response.into_inner(),
                        pending: None,
                        done: false,
                    }));
                    http.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/grpc"),
                    );
                    http
                }
                Err(status) => status.into_http(),
            })
        })
    }
}

/// The response body: each message with its gRPC prefix, then the status as trailers.
struct Frames {
    messages: OutStream,
    /// A large message whose prefix went out in the previous frame.
    pending: Option<Bytes>,
    done: bool,
}

/// gRPC's length prefix: not compressed, then the length in big-endian.
fn prefix(len: usize) -> [u8; 5] {
    let len = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    [0, len[0], len[1], len[2], len[3]]
}

fn trailers(status: &Status) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        // Only a message that cannot be a header value fails; the code alone still tells.
        map.insert("grpc-status", http::HeaderValue::from(status.code() as i32));
    }
    map
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if let Some(message) = this.pending.take() {
            return Poll::Ready(Some(Ok(Frame::data(message))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.messages).poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(Encoded(message)))) => {
                let head = prefix(message.len());
                if message.len() <= COPY_UP_TO {
                    let mut frame = Vec::with_capacity(head.len() + message.len());
                    frame.extend_from_slice(&head);
                    frame.extend_from_slice(&message);
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from(frame)))))
                } else {
                    this.pending = Some(message);
                    Poll::Ready(Some(Ok(Frame::data(Bytes::copy_from_slice(&head)))))
                }
            }
            Poll::Ready(Some(Err(status))) => {
                this.done = true;
                Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))))
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(Some(Ok(Frame::trailers(trailers(&Status::ok(""))))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_is_an_uncompressed_flag_and_a_big_endian_length() {
        assert_eq!(prefix(0x0102_0304), [0, 1, 2, 3, 4]);
        assert_eq!(prefix(5), [0, 0, 0, 0, 5]);
    }

    #[test]
    fn an_ok_end_is_grpc_status_0_in_the_trailers() {
        let map = trailers(&Status::ok(""));
        assert_eq!(
            map.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"0"[..])
        );
    }
}
