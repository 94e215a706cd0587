//! HTTP/2 stream plumbing shared by the client side ([`crate::listen`]) and the upstream side
//! ([`crate::upstream`]): a body read from a stream with flow control given back as it is
//! passed on ([`H2Body`]), a body piped into a stream within its send capacity ([`Pipe`]),
//! and a PING keepalive.

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

/// Keeps an HTTP/2 connection alive from our side: a PING every `interval`, busy or not.
/// Returns when one goes unanswered for `timeout` (the peer is gone or stuck); never if the
/// connection gave no `PingPong`.
pub(crate) async fn keepalive(ping: Option<h2::PingPong>, interval: Duration, timeout: Duration) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
    }
}

/// Streams a body into an HTTP/2 stream, honouring the stream's flow control (the same steps
/// as hyper's own pipe: take a frame, claim send capacity for it, send). Used for request
/// bodies to endpoints and response bodies to clients.
pub(crate) struct Pipe<B> {
    body: B,
    stream: SendStream<Bytes>,
    /// A chunk waiting for send capacity, and whether it ends the body.
    pending: Option<(Bytes, bool)>,
    /// The first chunk may go without waiting for capacity (see [`Pipe::eager`]).
    eager: bool,
}

impl<B> Pipe<B> {
    pub(crate) fn new(body: B, stream: SendStream<Bytes>) -> Self {
        Self {
            body,
            stream,
            pending: None,
            eager: false,
        }
    }

    /// For a request: a first chunk of up to 16 KiB (one frame) is handed to h2 at once.
    /// Capacity on a stream that is not open yet comes only after the connection task wrote
    /// the HEADERS, so waiting for it cost a second write per request (unary calls: 0.6 →
    /// 0.46 syscalls per call at saturation); h2 holds the chunk until the stream's window
    /// (64 KiB unless the peer says less) lets it go, so flow control still holds. Responses
    /// do not need it: a client's stream is open, and capacity is granted at once.
    pub(crate) fn eager(mut self) -> Self {
        self.eager = true;
        self
    }
}

impl<B: Body<Data = Bytes> + Unpin> Future for Pipe<B> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            // The endpoint reset the stream (or answered and does not want the rest).
            if this.stream.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
            if let Some((chunk, eos)) = this.pending.take() {
                while this.stream.capacity() == 0 {
                    match this.stream.poll_capacity(cx) {
                        Poll::Pending => {
                            this.pending = Some((chunk, eos));
                            return Poll::Pending;
                        }
                        Poll::Ready(Some(Ok(0))) => {}
                        Poll::Ready(Some(Ok(_))) => break,
                        Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
                    }
                }
                if this.stream.send_data(chunk, eos).is_err() || eos {
                    return Poll::Ready(());
                }
                continue;
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(chunk) => {
                        let eos = this.body.is_end_stream();
                        if chunk.is_empty()
                            || (std::mem::take(&mut this.eager) && chunk.len() <= 16 * 1024)
                        {
                            if this.stream.send_data(chunk, eos).is_err() || eos {
                                return Poll::Ready(());
                            }
                            continue;
                        }
                        // A claim of one byte, not the chunk: h2 raises it to what is
                        // buffered, and a large claim per waiting stream can starve others
                        // of the connection window (hyper#4003).
                        this.stream.reserve_capacity(1);
                        this.pending = Some((chunk, eos));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            this.stream.reserve_capacity(0);
                            let _ = this.stream.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
                // The body broke off: the peer must not take the message as whole.
                Some(Err(_)) => {
                    this.stream.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(());
                }
                None => {
                    let _ = this.stream.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// A body read from an HTTP/2 stream (a response from an endpoint, or a request from a
/// client); received data is given back to the flow-control window as it is passed on, so
/// the sender sends only as fast as the other side reads.
#[derive(Debug)]
pub(crate) struct H2Body {
    recv: RecvStream,
    data_done: bool,
    done: bool,
    /// Bytes still to come when the message announced its length.
    remaining: Option<u64>,
}

impl H2Body {
    pub(crate) fn new(recv: RecvStream) -> Self {
        Self::request(recv, None)
    }

    /// A client's request body; `len` is its `Content-Length`, if any.
    pub(crate) fn request(recv: RecvStream, len: Option<u64>) -> Self {
        let done = recv.is_end_stream();
        Self {
            recv,
            data_done: done,
            done,
            remaining: len,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    let n = chunk.remaining();
                    if let Some(r) = this.remaining.as_mut() {
                        *r = r.saturating_sub(n as u64);
                    }
                    let _ = this.recv.flow_control().release_capacity(n);
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => this.data_done = true,
            }
        }
        let trailers: Result<Option<HeaderMap>, h2::Error> = ready!(this.recv.poll_trailers(cx));
        this.done = true;
        match trailers {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
