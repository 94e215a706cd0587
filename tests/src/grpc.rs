//! A real tonic gRPC echo server for the gRPC end-to-end tests: unary, server-streaming and
//! bidirectional calls, failures with details, delays, a call counter, the standard health
//! service, and graceful shutdown (HTTP/2 GOAWAY) on demand.

pub mod pb {
    #![allow(clippy::all)]
    tonic::include_proto!("weir.test.v1");
}

use pb::echo_server::{Echo, EchoServer};
use pb::{EchoReply, EchoRequest, StreamRequest};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// Largest message the test servers and clients accept (the tests send 3 MiB).
pub const MAX_MESSAGE: usize = 8 * 1024 * 1024;

/// The details every failed call carries, so a test can check they arrive unchanged.
pub const FAILURE_DETAILS: &[u8] = b"\x08\x96\x01weir-test-details";

#[derive(Clone)]
struct EchoService {
    name: String,
    calls: Arc<AtomicU64>,
    /// Unary calls in progress now, and the most ever at once.
    in_flight: Arc<AtomicU64>,
    peak: Arc<AtomicU64>,
}

struct Decrement<'a>(&'a AtomicU64);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let _done = Decrement(&self.in_flight);
        let req = req.into_inner();
        if req.delay_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(u64::from(req.delay_ms))).await;
        }
        if req.fail {
            return Err(Status::with_details(
                tonic::Code::FailedPrecondition,
                "asked to fail",
                FAILURE_DETAILS.to_vec().into(),
            ));
        }
        Ok(Response::new(EchoReply {
            payload: req.payload,
            server: self.name.clone(),
        }))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        req: Request<StreamRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let count = req.into_inner().count;
        let name = self.name.clone();
        let stream = tokio_stream::iter(0..count).map(move |i| {
            Ok(EchoReply {
                payload: i.to_be_bytes().to_vec(),
                server: name.clone(),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let name = self.name.clone();
        let stream = req.into_inner().map(move |m| {
            m.map(|m| EchoReply {
                payload: m.payload,
                server: name.clone(),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Options of a test server.
#[derive(Clone, Default)]
pub struct Options {
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`.
    pub max_concurrent_streams: Option<u32>,
}

/// A running echo server.
pub struct EchoHandle {
    pub addr: SocketAddr,
    pub name: String,
    calls: Arc<AtomicU64>,
    peak: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    pub health: tonic_health::server::HealthReporter,
}

impl EchoHandle {
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// The most unary calls this server ever had in progress at once.
    pub fn peak_in_flight(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }

    /// TCP connections this server accepted.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Graceful shutdown: GOAWAY, finish calls in flight, stop.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits until the server has stopped (after [`EchoHandle::shutdown`]).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

/// Starts an echo server on `addr` (port 0 picks one).
pub async fn start(addr: SocketAddr, name: &str, opts: Options) -> std::io::Result<EchoHandle> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let calls = Arc::new(AtomicU64::new(0));
    let peak = Arc::new(AtomicU64::new(0));
    let connections = Arc::new(AtomicU64::new(0));
    let svc = EchoServer::new(EchoService {
        name: name.to_string(),
        calls: calls.clone(),
        in_flight: Arc::new(AtomicU64::new(0)),
        peak: peak.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE);
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<EchoServer<EchoService>>().await;
    let (tx, rx) = oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder();
    if let Some(n) = opts.max_concurrent_streams {
        builder = builder.max_concurrent_streams(n);
    }
    let router = builder.add_service(health_svc).add_service(svc);
    let connections_out = connections.clone();
    let task = tokio::spawn(async move {
        let accepted = connections.clone();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(move |c| {
            if c.is_ok() {
                accepted.fetch_add(1, Ordering::SeqCst);
            }
            c
        });
        let _ = router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await;
    });
    Ok(EchoHandle {
        addr,
        name: name.to_string(),
        calls,
        peak,
        connections: connections_out,
        shutdown: Some(tx),
        task,
        health,
    })
}

/// A client for `http://{agent}` that sends `:authority` = `host` on one HTTP/2 connection.
pub async fn client(
    agent: SocketAddr,
    host: &str,
) -> anyhow::Result<pb::echo_client::EchoClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{agent}"))?
        .origin(format!("http://{host}").parse()?)
        .connect()
        .await?;
    Ok(pb::echo_client::EchoClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}
