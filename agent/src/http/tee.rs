//! Copying a request body to a mirror as it streams ([`ShadowTee`] on the real request,
//! [`ShadowBody`] on the copy), without ever holding the real request back.
//!
//! The real body hands each frame to a bounded channel with `try_send`: when the shadow does
//! not take frames as fast as the real upstream does, the channel fills and the copy is cut
//! (the shadow sees its body end in an error and aborts), rather than buffering without
//! bound or slowing the real request. The copy ends cleanly only if the real body was read to
//! its end through the tee.

use super::body::BoxError;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// Frames the copy may lag behind the real request before it is cut.
pub(crate) const SHADOW_LAG_FRAMES: usize = 16;

enum Msg {
    Frame(Frame<Bytes>),
    End,
}

/// The pair: the real body, teed, and the copy's body.
pub(crate) fn tee<B: Body<Data = Bytes> + Unpin>(body: B) -> (ShadowTee<B>, ShadowBody) {
    let (tx, rx) = mpsc::channel(SHADOW_LAG_FRAMES);
    let hint = body.size_hint();
    (
        ShadowTee {
            inner: body,
            tx: Some(tx),
        },
        ShadowBody {
            rx,
            ended: false,
            hint,
        },
    )
}

/// The real request's body, offering a copy of each frame to the shadow.
#[derive(Debug)]
pub(crate) struct ShadowTee<B> {
    inner: B,
    /// `None` once the copy is finished or cut.
    tx: Option<mpsc::Sender<Msg>>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Frame(_) => "Frame",
            Msg::End => "End",
        })
    }
}

impl<B> ShadowTee<B> {
    /// The real body inside.
    pub(crate) fn inner(&self) -> &B {
        &self.inner
    }

    fn offer(&mut self, msg: Msg) {
        if let Some(tx) = &self.tx
            && tx.try_send(msg).is_err()
        {
            // Full (the shadow lags) or closed (the shadow gave up): cut the copy.
            self.tx = None;
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for ShadowTee<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let copy = if let Some(data) = frame.data_ref() {
                    Some(Frame::data(data.clone()))
                } else {
                    frame.trailers_ref().map(|t| Frame::trailers(t.clone()))
                };
                if let Some(copy) = copy {
                    this.offer(Msg::Frame(copy));
                }
            }
            Poll::Ready(None) => {
                this.offer(Msg::End);
                this.tx = None;
            }
            // The real request fails anyway; the copy is cut by the sender's drop.
            Poll::Ready(Some(Err(_))) => this.tx = None,
            Poll::Pending => {}
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

/// The copy's body: the frames the tee offered, ending in an error if the copy was cut.
#[derive(Debug)]
pub(crate) struct ShadowBody {
    rx: mpsc::Receiver<Msg>,
    ended: bool,
    hint: SizeHint,
}

/// The copy was cut: the shadow lagged, or the real request's body did not end through the
/// tee (it failed, or a retry read the rest).
#[derive(Debug, thiserror::Error)]
#[error("mirror copy cut off")]
pub(crate) struct CopyCut;

impl Body for ShadowBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(Msg::Frame(f))) => Poll::Ready(Some(Ok(f))),
            Poll::Ready(Some(Msg::End)) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(Some(Err(Box::new(CopyCut))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    type Chunks =
        StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, BoxError>>>>;

    fn stream(chunks: &[&'static str]) -> Chunks {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        StreamBody::new(futures::stream::iter(frames))
    }

    #[tokio::test]
    async fn the_copy_gets_every_frame_and_ends_cleanly() {
        let (real, copy) = tee(stream(&["ab", "cd"]));
        let got = real.collect().await.expect("real body").to_bytes();
        assert_eq!(&got[..], b"abcd");
        let copied = copy.collect().await.expect("copy").to_bytes();
        assert_eq!(&copied[..], b"abcd");
    }

    #[tokio::test]
    async fn a_lagging_copy_is_cut_and_the_real_body_is_untouched() {
        let chunks: Vec<&'static str> = vec!["x"; SHADOW_LAG_FRAMES + 4];
        let (real, copy) = tee(stream(&chunks));
        let got = real.collect().await.expect("real body").to_bytes();
        assert_eq!(got.len(), SHADOW_LAG_FRAMES + 4);
        let err = copy.collect().await.expect_err("the copy was cut");
        assert!(err.to_string().contains("cut off"), "{err}");
    }

    #[tokio::test]
    async fn a_real_body_dropped_before_its_end_cuts_the_copy() {
        let (real, copy) = tee(stream(&["ab", "cd"]));
        drop(real);
        assert!(copy.collect().await.is_err());
    }
}
