//! One exchange on an upstream HTTP/2 connection, straight on the `h2` crate: the request
//! head is handed to the connection by the calling task, the request body is piped from that
//! same task while it waits for the response head, and the response body is read from the
//! stream as the client's connection asks for it.
//!
//! Why not hyper's HTTP/2 client: it routes every request through a channel to its
//! connection task and spawns two tasks per request (one to pipe the request body, one to
//! wait for the response and send it back over a oneshot). For a unary gRPC call that was
//! four extra task wake-ups between the client's stream and the endpoint's, and the relay
//! cost ~12k of ~92k instructions per call (callgrind, `tests/bench/hot_path.py grpc-insn`).
//! Here the task that handles the
//! client's stream drives the upstream stream itself; only a request body still streaming
//! when the response head arrives (client or bidirectional streaming) is handed to a task of
//! its own, so it keeps flowing while the response streams back (full duplex).

use crate::http::body::UpBody;
use crate::http::h2::{H2Body, Pipe};
use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use std::future::Future;
use std::pin::Pin;

/// Sends `req` on `send` (which must have been polled ready) and waits for the response head
/// while piping the request body.
pub(crate) async fn exchange(
    send: &mut h2::client::SendRequest<Bytes>,
    req: Request<UpBody>,
) -> Result<Response<H2Body>, h2::Error> {
    let (parts, body) = req.into_parts();
    let eos = body.is_end_stream();
    let (mut response, stream) = send.send_request(Request::from_parts(parts, ()), eos)?;
    let mut pipe = (!eos).then(|| Pipe::new(body, stream).eager());
    let head = std::future::poll_fn(|cx| {
        if let Some(p) = pipe.as_mut()
            && Pin::new(p).poll(cx).is_ready()
        {
            pipe = None;
        }
        Pin::new(&mut response).poll(cx)
    })
    .await;
    let head = head?;
    if let Some(p) = pipe {
        // The client is still sending while the endpoint answers (streaming calls).
        tokio::spawn(p);
    }
    Ok(head.map(H2Body::new))
}
