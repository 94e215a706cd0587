//! Access logs and tracing end to end, on real processes: a real controller (local mode), a
//! real agent started with `--access-log json --otlp-endpoint …`, a real origin, and an OTLP
//! collector made of a plain HTTP server that decodes what it receives with the OTLP wire
//! types. A request with a sampled `traceparent` is logged with its trace id, reaches the
//! origin with the agent's span as parent, and its span reaches the collector with the
//! caller's span as parent; an unsampled `traceparent` passes through untouched and is not
//! exported; a request the agent answers itself is logged with its reason.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use std::convert::Infallible;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncBufReadExt;
use weir_tests::backend::start_group;
use weir_tests::manifests::{docs, policy, service, slice};
use weir_tests::{
    Controller, bin_dir, free_local_addr, http_client, wait_for, wait_ok, write_manifest,
};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
const UNSAMPLED_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

/// A collector: every span of every OTLP/HTTP export it receives.
async fn collector() -> (std::net::SocketAddr, Arc<Mutex<Vec<Span>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind collector");
    let addr = listener.local_addr().expect("addr");
    let spans = Arc::new(Mutex::new(Vec::new()));
    let store = spans.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let store = store.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let store = store.clone();
                        async move {
                            let ok = req.uri().path() == "/v1/traces"
                                && req.headers()["content-type"] == "application/x-protobuf";
                            let body = req.into_body().collect().await.map(|b| b.to_bytes());
                            let decoded = body
                                .ok()
                                .and_then(|b| ExportTraceServiceRequest::decode(b).ok());
                            let status = match decoded {
                                Some(export) if ok => {
                                    let mut spans = store.lock().expect("lock");
                                    for rs in export.resource_spans {
                                        for ss in rs.scope_spans {
                                            spans.extend(ss.spans);
                                        }
                                    }
                                    200
                                }
                                _ => 400,
                            };
                            let mut resp = http::Response::new(Full::new(Bytes::new()));
                            *resp.status_mut() =
                                http::StatusCode::from_u16(status).expect("status");
                            Ok::<_, Infallible>(resp)
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, spans)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            AnyValue::StringValue(s) => s.clone(),
            AnyValue::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

async fn send(
    agent: std::net::SocketAddr,
    host: &str,
    traceparent: Option<&str>,
) -> http::Response<Bytes> {
    let mut req = http::Request::get(format!("http://{agent}/item")).header("host", host);
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    let resp = http_client()
        .request(req.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("request through agent");
    let (parts, body) = resp.into_parts();
    http::Response::from_parts(parts, body.collect().await.expect("body").to_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_logged_and_traced_with_w3c_context() {
    let dir = tempfile::tempdir().expect("tempdir");
    let web = start_group(&["127.0.64.1"], "web").await.expect("backend");
    let port = web[0].addr.port();
    write_manifest(
        dir.path(),
        "web.yaml",
        &docs(&[
            service("web", 80),
            slice("web", port, &[("127.0.64.1", true)]),
            policy("web", &["web.test"], &[("web", 80, 1, 0)], ""),
        ]),
    );
    let controller = Controller::start(dir.path()).await.expect("controller");
    let (collector, spans) = collector().await;
    let (listen, admin) = (free_local_addr(), free_local_addr());
    let mut agent = tokio::process::Command::new(bin_dir().join("weir-agent"))
        .args(["--controller", &controller.url()])
        .args([
            "--listen",
            &listen.to_string(),
            "--admin-addr",
            &admin.to_string(),
        ])
        .args(["--access-log", "json", "--trace-sample", "1"])
        .args(["--otlp-endpoint", &format!("http://{collector}")])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start agent");
    let mut lines = tokio::io::BufReader::new(agent.stdout.take().expect("stdout")).lines();
    wait_ok(&format!("http://{admin}/readyz")).await;

    let sampled = format!("00-{TRACE}-{PARENT}-01");
    let resp = send(listen, "web.test", Some(&sampled)).await;
    assert_eq!(resp.status(), 200);
    let forwarded = resp.headers()["x-echo-traceparent"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        forwarded.starts_with(&format!("00-{TRACE}-")),
        "{forwarded}"
    );
    assert!(
        forwarded.ends_with("-01") && !forwarded.contains(PARENT),
        "the agent's span is the parent: {forwarded}"
    );
    let agent_span = forwarded.split('-').nth(2).expect("span id").to_owned();

    let unsampled = format!("00-{UNSAMPLED_TRACE}-{PARENT}-00");
    let resp = send(listen, "web.test", Some(&unsampled)).await;
    assert_eq!(
        resp.headers()["x-echo-traceparent"],
        unsampled.as_str(),
        "passed through untouched"
    );

    let resp = send(listen, "web.test", None).await;
    let root = resp.headers()["x-echo-traceparent"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        root.starts_with("00-") && root.ends_with("-01"),
        "a new trace: {root}"
    );
    let root_trace = root.split('-').nth(1).expect("trace id").to_owned();

    let resp = send(listen, "nowhere.test", None).await;
    assert_eq!(resp.status(), 404);

    // The access log: one JSON line per request, in order.
    let mut logged = Vec::new();
    while logged.len() < 4 {
        let line = tokio::time::timeout(weir_tests::WAIT, lines.next_line())
            .await
            .expect("an access log line in time")
            .expect("stdout")
            .expect("a line");
        logged.push(serde_json::from_str::<serde_json::Value>(&line).expect("JSON line"));
    }
    let first = &logged[0];
    assert_eq!(first["method"], "GET");
    assert_eq!(first["host"], "web.test");
    assert_eq!(first["target"], "/item");
    assert_eq!(first["status"], 200);
    assert_eq!(first["route"], "default/web");
    assert_eq!(first["upstream"], web[0].addr.to_string());
    assert_eq!(first["traceId"], TRACE);
    assert_eq!(first["spanId"], agent_span);
    assert!(
        first["durationMs"].as_f64().is_some_and(|d| d > 0.0),
        "{first}"
    );
    assert!(
        logged[1]["traceId"].is_null(),
        "unsampled: no span: {}",
        logged[1]
    );
    assert_eq!(logged[2]["traceId"], root_trace.as_str());
    assert_eq!(logged[3]["status"], 404);
    assert_eq!(logged[3]["error"], "no-route");
    assert!(logged[3]["route"].is_null());

    // The spans: the caller's is the parent of the agent's; the unsampled one is absent.
    let exported = wait_for("the spans at the collector", || async {
        let spans = spans.lock().expect("lock").clone();
        (spans.len() >= 3).then_some(spans)
    })
    .await;
    let span = exported
        .iter()
        .find(|s| hex(&s.trace_id) == TRACE)
        .expect("the sampled request's span");
    assert_eq!(hex(&span.parent_span_id), PARENT);
    assert_eq!(hex(&span.span_id), agent_span);
    assert_eq!(
        attribute(span, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        attribute(span, "weir.route").as_deref(),
        Some("default/web")
    );
    assert_eq!(
        attribute(span, "http.request.method").as_deref(),
        Some("GET")
    );
    assert!(span.end_time_unix_nano >= span.start_time_unix_nano && span.start_time_unix_nano > 0);
    let root_span = exported
        .iter()
        .find(|s| hex(&s.trace_id) == root_trace)
        .expect("the new trace's span");
    assert!(root_span.parent_span_id.is_empty(), "a root span");
    assert!(exported.iter().all(|s| hex(&s.trace_id) != UNSAMPLED_TRACE));
    let not_found = exported
        .iter()
        .find(|s| attribute(s, "weir.error").as_deref() == Some("no-route"))
        .expect("the 404's span");
    assert_eq!(
        not_found.status.as_ref().map(|s| s.code),
        Some(2),
        "an error span"
    );
    drop(agent);
}
