//! Telling HTTP/1.1 from h2c on an accepted socket by its first bytes, and giving those bytes
//! back to whichever server takes the connection ([`Rewind`]).

use super::framing::FramingScan;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The client connection preface of HTTP/2 with prior knowledge (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a client speaks, decided by its first bytes.
pub(super) enum Protocol {
    Http1(Rewind),
    H2(Rewind),
}

/// Reads until the first bytes either differ from the HTTP/2 preface (HTTP/1.1: the first
/// byte of any method but `PRI` does) or match all of it. `None` when the client closed or
/// broke the connection first.
pub(super) async fn detect(mut io: TcpStream) -> Option<Protocol> {
    let mut buf = [0u8; PREFACE.len()];
    let mut n = 0;
    while n < buf.len() {
        let read = io.read(&mut buf[n..]).await.ok()?;
        if read == 0 {
            return None;
        }
        n += read;
        if buf[..n] != PREFACE[..n] {
            return Some(Protocol::Http1(Rewind::new(io, &buf[..n])));
        }
    }
    Some(Protocol::H2(Rewind::new(io, &buf)))
}

/// A socket that first gives back the bytes the protocol check read.
pub(crate) struct Rewind {
    io: TcpStream,
    head: [u8; PREFACE.len()],
    pos: u8,
    len: u8,
    /// HTTP/1.1 only: sees every byte read, for what hyper's parser hides (`framing`).
    scan: Option<Box<FramingScan>>,
}

impl Rewind {
    fn new(io: TcpStream, read: &[u8]) -> Self {
        let mut head = [0u8; PREFACE.len()];
        head[..read.len()].copy_from_slice(read);
        Self {
            io,
            head,
            pos: 0,
            len: read.len() as u8,
            scan: None,
        }
    }

    /// Watches the request bytes for ambiguous framing (HTTP/1.1 connections).
    pub(super) fn scan_framing(&mut self, scan: FramingScan) {
        self.scan = Some(Box::new(scan));
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        if this.pos < this.len {
            let rest = &this.head[this.pos as usize..this.len as usize];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n as u8;
        } else {
            std::task::ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        }
        if let Some(scan) = this.scan.as_mut() {
            scan.scan(&buf.filled()[before..]);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// Accepts one connection whose client writes `sent` and then closes its side; returns
    /// what `detect` made of it and everything read back through the `Rewind`.
    async fn detect_bytes(sent: &'static [u8]) -> Option<(bool, Vec<u8>)> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            c.write_all(sent).await.expect("write");
            c.shutdown().await.expect("shutdown");
            c
        });
        let (io, _) = listener.accept().await.expect("accept");
        let proto = detect(io).await;
        let _client = client.await.expect("client");
        let (h2, mut io) = match proto? {
            Protocol::H2(io) => (true, io),
            Protocol::Http1(io) => (false, io),
        };
        let mut back = Vec::new();
        io.read_to_end(&mut back).await.expect("read back");
        Some((h2, back))
    }

    #[tokio::test]
    async fn a_request_shorter_than_the_preface_is_http1_and_reaches_hyper_whole() {
        let req = b"GET / HTTP/1.1\r\n\r\n";
        assert_eq!(detect_bytes(req).await, Some((false, req.to_vec())));
    }

    #[tokio::test]
    async fn the_preface_is_h2_and_is_given_back_with_what_follows() {
        let sent = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
        assert_eq!(detect_bytes(sent).await, Some((true, sent.to_vec())));
    }

    #[tokio::test]
    async fn bytes_that_leave_the_preface_late_are_http1() {
        let sent = b"PRI * HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(detect_bytes(sent).await, Some((false, sent.to_vec())));
    }

    #[tokio::test]
    async fn a_client_that_closes_mid_preface_is_dropped() {
        assert_eq!(detect_bytes(b"PRI * HTTP/2").await, None);
    }
}
