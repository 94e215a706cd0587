//! An HTTP-level fake Kubernetes API server for testing weir's Kubernetes mode with the real
//! kube-rs client. No real API server can run on these machines, so this implements just
//! the slice of the API that kube's reflectors, status patches and a Lease need:
//!
//! - LIST of a collection (all namespaces or one), with `metadata.resourceVersion`;
//! - WATCH (`?watch=true&resourceVersion=N`): newline-delimited JSON events after `N`, a
//!   BOOKMARK once caught up, and an ERROR event with code 410 (`Expired`) when `N` is older
//!   than the compacted history, which is what makes a client relist;
//! - GET, POST (create, 409 if it exists), PUT (replace, 409 on a stale resourceVersion),
//!   PATCH (JSON merge patch, also on `…/status`; a `metadata.resourceVersion` in the patch
//!   is a precondition, 409 when stale, as on a real server) and DELETE of single objects.
//!   Events (`events.k8s.io/v1`, which kube's `Recorder` creates, and PATCHes for a repeated
//!   event's `series`) are plain objects here, recorded like any other.
//! - The Service and Pod proxy (`GET /api/v1/namespaces/{ns}/services|pods/{name}:{port}/proxy/…`),
//!   forwarded over real HTTP to a loopback address a test registers with
//!   [`FakeApiServer::proxy`] (how `kubectl weir` reaches admin endpoints); unregistered
//!   targets answer 503 and unreachable ones 503 with the dial error, as an API server does.
//!   CustomResourceDefinitions, Deployments and Pods are stored like any other object.
//!
//! It is not a conformant API server: no selectors, no pagination, no validation, no
//! admission. Every write that reaches it is recorded (with the client's bearer token, so a
//! test can tell which controller wrote) for tests to poll.

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// One write a client made (POST, PUT or PATCH), as received.
#[derive(Clone, Debug)]
pub struct Write {
    /// `POST`, `PUT` or `PATCH`.
    pub method: String,
    /// The request path, e.g. `/apis/weir.dev/v1alpha1/namespaces/default/trafficpolicies/web/status`.
    pub path: String,
    /// The bearer token the client sent, if any.
    pub token: Option<String>,
    pub body: Value,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    /// `api/v1/services`, `apis/discovery.k8s.io/v1/endpointslices`, …
    coll: String,
    ns: String,
    name: String,
}

struct Event {
    rv: u64,
    key: Key,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Watches starting before this resourceVersion get `410 Gone`.
    compacted: u64,
    objects: BTreeMap<Key, Value>,
    events: Vec<Event>,
    writes: Vec<Write>,
    gone_sent: u64,
    lists: u64,
    /// Bumped by `expire_history`; a watch opened under an older value delivers nothing more.
    epoch: u64,
    /// Proxy targets: (`services` or `pods`, namespace, `name:port`) → where to forward.
    proxies: BTreeMap<(String, String, String), SocketAddr>,
    /// Every proxy request's path, in order.
    proxied: Vec<String>,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every change, to wake watches.
    changed: watch::Sender<u64>,
    /// Bumped to close every open watch.
    cut: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running fake API server on 127.0.0.1; stops when dropped.
pub struct FakeApiServer {
    /// Where it listens (plain HTTP).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = BoxBody<Bytes, Infallible>;

/// The collection path of a kind, as kube-rs derives it from `apiVersion` and `kind`.
fn collection(api_version: &str, kind: &str) -> anyhow::Result<String> {
    let plural = match kind {
        "Service" => "services",
        "EndpointSlice" => "endpointslices",
        "TrafficPolicy" => "trafficpolicies",
        "NodeAgent" => "nodeagents",
        "Lease" => "leases",
        "Node" => "nodes",
        "Event" => "events",
        "CustomResourceDefinition" => "customresourcedefinitions",
        "Deployment" => "deployments",
        "Pod" => "pods",
        other => bail!("the fake API server does not know kind {other}"),
    };
    let prefix = if api_version.contains('/') {
        "apis"
    } else {
        "api"
    };
    Ok(format!("{prefix}/{api_version}/{plural}"))
}

/// What a request path addresses.
struct Target {
    coll: String,
    /// The namespace, for namespaced paths (a filter for collections).
    ns: Option<String>,
    name: Option<String>,
    /// `status`, for the status subresource.
    sub: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let gv_len = match *segs.first()? {
        "api" => 2,
        "apis" => 3,
        _ => return None,
    };
    if segs.len() <= gv_len {
        return None;
    }
    let gv = segs[..gv_len].join("/");
    let mut rest = &segs[gv_len..];
    let mut ns = None;
    if rest.len() >= 3 && rest[0] == "namespaces" {
        ns = Some(rest[1].to_string());
        rest = &rest[2..];
    }
    let plural = rest.first()?;
    Some(Target {
        coll: format!("{gv}/{plural}"),
        ns,
        name: rest.get(1).map(|s| s.to_string()),
        sub: rest.get(2).map(|s| s.to_string()),
    })
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

impl FakeApiServer {
    /// Starts the server on a free port of 127.0.0.1.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 100,
                ..State::default()
            }),
            changed: watch::channel(0).0,
            cut: watch::channel(0).0,
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(handle(s, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self { addr, shared, task })
    }

    /// Writes a kubeconfig for this server to `path`; `token` tells clients apart in
    /// [`FakeApiServer::writes`].
    pub fn write_kubeconfig(&self, path: &Path, token: &str) -> anyhow::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             users:\n- name: fake\n  user:\n    token: {token}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\n",
            self.addr
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Creates or replaces the objects of a (multi-document) YAML manifest, as `kubectl
    /// apply` would; `metadata.generation` goes up when the spec changes.
    pub fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        for doc in yaml_serde::Deserializer::from_str(yaml) {
            let v: Value = serde::Deserialize::deserialize(doc)?;
            if v.is_null() {
                continue;
            }
            let key = object_key(&v)?;
            let mut st = self.shared.lock();
            let old = st.objects.get(&key).cloned();
            let mut obj = v;
            let generation = match &old {
                Some(o) if o.get("spec") == obj.get("spec") => o["metadata"]["generation"].clone(),
                Some(o) => json!(o["metadata"]["generation"].as_i64().unwrap_or(0) + 1),
                None => json!(1),
            };
            if let Some(o) = &old {
                obj["metadata"]["creationTimestamp"] = o["metadata"]["creationTimestamp"].clone();
                obj["metadata"]["uid"] = o["metadata"]["uid"].clone();
                if obj.get("status").is_none() && o.get("status").is_some() {
                    obj["status"] = o["status"].clone();
                }
            }
            obj["metadata"]["generation"] = generation;
            let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
            store(&mut st, &self.shared, key, obj, kind);
        }
        Ok(())
    }

    /// Deletes one object.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        ns: &str,
        name: &str,
    ) -> anyhow::Result<()> {
        let key = Key {
            coll: collection(api_version, kind)?,
            ns: ns.to_string(),
            name: name.to_string(),
        };
        let mut st = self.shared.lock();
        if let Some(obj) = st.objects.remove(&key) {
            st.rv += 1;
            let rv = st.rv;
            st.events.push(Event {
                rv,
                key,
                kind: "DELETED",
                object: obj,
            });
            self.shared.changed.send_replace(rv);
        }
        Ok(())
    }

    /// Forgets all history and closes every open watch, as an API server does after etcd
    /// compaction: clients resuming from their last resourceVersion get `410 Gone` and must
    /// relist.
    pub fn expire_history(&self) {
        let mut st = self.shared.lock();
        // Skip a resourceVersion so that every client's last one is now too old.
        st.rv += 1;
        st.compacted = st.rv;
        st.epoch += 1;
        let rv = st.rv;
        st.events.clear();
        drop(st);
        self.shared.cut.send_modify(|c| *c += 1);
        self.shared.changed.send_replace(rv);
    }

    /// Every write received so far.
    pub fn writes(&self) -> Vec<Write> {
        self.shared.lock().writes.clone()
    }

    /// The stored object, if any.
    pub fn object(&self, api_version: &str, kind: &str, ns: &str, name: &str) -> Option<Value> {
        let key = Key {
            coll: collection(api_version, kind).ok()?,
            ns: ns.to_string(),
            name: name.to_string(),
        };
        self.shared.lock().objects.get(&key).cloned()
    }

    /// Every stored object of a kind (all namespaces), e.g. `("events.k8s.io/v1", "Event")`.
    pub fn objects(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let Ok(coll) = collection(api_version, kind) else {
            return Vec::new();
        };
        self.shared
            .lock()
            .objects
            .iter()
            .filter(|(k, _)| k.coll == coll)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// How many `410 Gone` watch errors were sent.
    pub fn gone_sent(&self) -> u64 {
        self.shared.lock().gone_sent
    }

    /// Routes the API server's proxy for `kind` (`services` or `pods`) `name:port` in `ns`
    /// to `addr`, e.g. `("services", "weir-system", "weir-controller:18080", admin)`.
    pub fn proxy(&self, kind: &str, ns: &str, name_port: &str, addr: SocketAddr) {
        self.shared
            .lock()
            .proxies
            .insert((kind.into(), ns.into(), name_port.into()), addr);
    }

    /// The paths of every proxy request received so far.
    pub fn proxied(&self) -> Vec<String> {
        self.shared.lock().proxied.clone()
    }

    /// How many LIST requests were served.
    pub fn lists(&self) -> u64 {
        self.shared.lock().lists
    }
}

fn object_key(v: &Value) -> anyhow::Result<Key> {
    let api_version = v["apiVersion"].as_str().context("apiVersion missing")?;
    let kind = v["kind"].as_str().context("kind missing")?;
    let name = v["metadata"]["name"]
        .as_str()
        .context("metadata.name missing")?;
    let ns = v["metadata"]["namespace"].as_str().unwrap_or("");
    Ok(Key {
        coll: collection(api_version, kind)?,
        ns: ns.to_string(),
        name: name.to_string(),
    })
}

/// Stores `obj` under a new resourceVersion and records the watch event.
fn store(st: &mut State, shared: &Shared, key: Key, mut obj: Value, kind: &'static str) -> Value {
    st.rv += 1;
    let rv = st.rv;
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    if obj["metadata"]["creationTimestamp"].is_null() {
        // Distinct, increasing timestamps keep creation order meaningful in tests.
        obj["metadata"]["creationTimestamp"] = json!(format!(
            "2026-01-01T00:{:02}:{:02}Z",
            (rv / 60) % 60,
            rv % 60
        ));
    }
    if obj["metadata"]["uid"].is_null() {
        obj["metadata"]["uid"] = json!(format!("uid-{rv}"));
    }
    st.objects.insert(key.clone(), obj.clone());
    st.events.push(Event {
        rv,
        key,
        kind,
        object: obj.clone(),
    });
    shared.changed.send_replace(rv);
    obj
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    if let Some((kind, ns, name_port, rest)) = proxy_path(&path) {
        shared.lock().proxied.push(path.clone());
        let method = req.method().clone();
        return proxied(
            &shared,
            method,
            kind,
            ns,
            name_port,
            rest,
            req.uri().query(),
        )
        .await;
    }
    let Some(Target {
        coll,
        ns,
        name,
        sub,
    }) = parse_path(&path)
    else {
        return json_response(
            StatusCode::NOT_FOUND,
            &status_body(404, "NotFound", &format!("no route for {path}")),
        );
    };
    let q = query(&req);
    let method = req.method().clone();
    let token = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    match (method.clone(), name) {
        (Method::GET, None) => {
            let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
            if watching {
                watch_response(shared, coll, ns, &q)
            } else {
                let mut st = shared.lock();
                st.lists += 1;
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|(k, _)| k.coll == coll && ns.as_ref().is_none_or(|n| *n == k.ns))
                    .map(|(_, v)| v.clone())
                    .collect();
                let body = json!({"kind": "List", "apiVersion": "v1",
                    "metadata": {"resourceVersion": st.rv.to_string()}, "items": items});
                json_response(StatusCode::OK, &body)
            }
        }
        (Method::GET, Some(name)) => {
            let key = Key {
                coll,
                ns: ns.unwrap_or_default(),
                name,
            };
            match shared.lock().objects.get(&key) {
                Some(v) => json_response(StatusCode::OK, v),
                None => json_response(
                    StatusCode::NOT_FOUND,
                    &status_body(404, "NotFound", &format!("{} not found", key.name)),
                ),
            }
        }
        (m, name) if m == Method::POST || m == Method::PUT || m == Method::PATCH => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        &status_body(400, "BadRequest", &e.to_string()),
                    );
                }
            };
            let Ok(body) = serde_json::from_slice::<Value>(&body) else {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &status_body(400, "BadRequest", "body is not JSON"),
                );
            };
            let name = name
                .or_else(|| body["metadata"]["name"].as_str().map(str::to_string))
                .unwrap_or_default();
            let key = Key {
                coll,
                ns: ns.unwrap_or_default(),
                name,
            };
            let mut st = shared.lock();
            st.writes.push(Write {
                method: m.to_string(),
                path: path.clone(),
                token,
                body: body.clone(),
            });
            let old = st.objects.get(&key).cloned();
            match (m, old) {
                (Method::POST, Some(_)) => json_response(
                    StatusCode::CONFLICT,
                    &status_body(409, "AlreadyExists", "object already exists"),
                ),
                (Method::POST, None) => {
                    let obj = store(&mut st, &shared, key, body, "ADDED");
                    json_response(StatusCode::CREATED, &obj)
                }
                (_, None) => json_response(
                    StatusCode::NOT_FOUND,
                    &status_body(404, "NotFound", "object not found"),
                ),
                (Method::PUT, Some(old)) => {
                    let sent = &body["metadata"]["resourceVersion"];
                    if !sent.is_null() && *sent != old["metadata"]["resourceVersion"] {
                        return json_response(
                            StatusCode::CONFLICT,
                            &status_body(409, "Conflict", "the object has been modified"),
                        );
                    }
                    let mut obj = body;
                    obj["metadata"]["creationTimestamp"] =
                        old["metadata"]["creationTimestamp"].clone();
                    obj["metadata"]["uid"] = old["metadata"]["uid"].clone();
                    let obj = store(&mut st, &shared, key, obj, "MODIFIED");
                    json_response(StatusCode::OK, &obj)
                }
                (_, Some(mut obj)) => {
                    let sent = &body["metadata"]["resourceVersion"];
                    if !sent.is_null() && *sent != obj["metadata"]["resourceVersion"] {
                        return json_response(
                            StatusCode::CONFLICT,
                            &status_body(409, "Conflict", "the object has been modified"),
                        );
                    }
                    // PATCH: a status patch may only change status, as on a real server.
                    if sub.as_deref() == Some("status") {
                        merge(&mut obj["status"], &body["status"]);
                    } else {
                        merge(&mut obj, &body);
                    }
                    let obj = store(&mut st, &shared, key, obj, "MODIFIED");
                    json_response(StatusCode::OK, &obj)
                }
            }
        }
        (Method::DELETE, Some(name)) => {
            let key = Key {
                coll,
                ns: ns.unwrap_or_default(),
                name,
            };
            let mut st = shared.lock();
            st.writes.push(Write {
                method: "DELETE".into(),
                path: path.clone(),
                token,
                body: Value::Null,
            });
            match st.objects.remove(&key) {
                Some(obj) => {
                    st.rv += 1;
                    let rv = st.rv;
                    st.events.push(Event {
                        rv,
                        key,
                        kind: "DELETED",
                        object: obj.clone(),
                    });
                    shared.changed.send_replace(rv);
                    json_response(StatusCode::OK, &obj)
                }
                None => json_response(
                    StatusCode::NOT_FOUND,
                    &status_body(404, "NotFound", "object not found"),
                ),
            }
        }
        _ => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &status_body(405, "MethodNotAllowed", "not supported by the fake"),
        ),
    }
}

fn line(v: &Value) -> Result<Frame<Bytes>, Infallible> {
    let mut s = v.to_string();
    s.push('\n');
    Ok(Frame::data(Bytes::from(s)))
}

fn watch_response(
    shared: Arc<Shared>,
    coll: String,
    ns: Option<String>,
    q: &BTreeMap<String, String>,
) -> Response<Body> {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    let mut changed = shared.changed.subscribe();
    let mut cut = shared.cut.subscribe();
    cut.borrow_and_update();
    tokio::spawn(async move {
        let mut last = from;
        let (gone, epoch) = {
            let mut st = shared.lock();
            let gone = from < st.compacted;
            st.gone_sent += u64::from(gone);
            (gone, st.epoch)
        };
        {
            if gone {
                let err = json!({"type": "ERROR", "object": status_body(410, "Expired",
                    &format!("too old resource version: {from}"))});
                let _ = tx.send(line(&err)).await;
                return;
            }
        }
        let mut first = true;
        loop {
            changed.borrow_and_update();
            let (events, now) = {
                let st = shared.lock();
                // A watch cut by `expire_history` must not deliver anything newer: its client
                // has to come back with its old resourceVersion and get `410 Gone`.
                if st.epoch != epoch {
                    return;
                }
                let events: Vec<Value> = st
                    .events
                    .iter()
                    .filter(|e| {
                        e.rv > last
                            && e.key.coll == coll
                            && ns.as_ref().is_none_or(|n| *n == e.key.ns)
                    })
                    .map(|e| json!({"type": e.kind, "object": e.object}))
                    .collect();
                (events, st.rv)
            };
            for e in &events {
                if tx.send(line(e)).await.is_err() {
                    return;
                }
            }
            last = now;
            if first && bookmarks {
                let bm = json!({"type": "BOOKMARK", "object": {"apiVersion": "v1", "kind": "Bookmark",
                    "metadata": {"resourceVersion": now.to_string()}}});
                if tx.send(line(&bm)).await.is_err() {
                    return;
                }
            }
            first = false;
            tokio::select! {
                biased;
                _ = cut.changed() => return,
                r = changed.changed() => if r.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(ReceiverStream::new(rx))));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// `/api/v1/namespaces/{ns}/{services|pods}/{name:port}/proxy{rest}` → its parts.
fn proxy_path(path: &str) -> Option<(&str, &str, &str, &str)> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let (ns, rest) = rest.split_once('/')?;
    let (kind, rest) = rest.split_once('/')?;
    if kind != "services" && kind != "pods" {
        return None;
    }
    let (name_port, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("proxy")?;
    Some((
        kind,
        ns,
        name_port,
        if rest.is_empty() { "/" } else { rest },
    ))
}

/// Forwards a proxy request (method and target; no body) to the registered address and
/// relays status and body.
async fn proxied(
    shared: &Shared,
    method: http::Method,
    kind: &str,
    ns: &str,
    name_port: &str,
    rest: &str,
    query: Option<&str>,
) -> Response<Body> {
    let target = shared
        .lock()
        .proxies
        .get(&(kind.to_string(), ns.to_string(), name_port.to_string()))
        .copied();
    let Some(addr) = target else {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &status_body(
                503,
                "ServiceUnavailable",
                &format!("no endpoints available for {kind} \"{name_port}\""),
            ),
        );
    };
    let uri = match query {
        Some(q) => format!("http://{addr}{rest}?{q}"),
        None => format!("http://{addr}{rest}"),
    };
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let Ok(req) = Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::new(Bytes::new()))
    else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &status_body(400, "BadRequest", "bad proxy path"),
        );
    };
    let resp = match client.request(req).await {
        Ok(r) => r,
        Err(e) => {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &status_body(
                    503,
                    "ServiceUnavailable",
                    &format!("error trying to reach {kind}: dial tcp {addr}: {e:?}"),
                ),
            );
        }
    };
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut r = Response::new(Full::new(body).boxed());
    *r.status_mut() = parts.status;
    if let Some(ct) = parts.headers.get(http::header::CONTENT_TYPE) {
        r.headers_mut()
            .insert(http::header::CONTENT_TYPE, ct.clone());
    }
    r
}
