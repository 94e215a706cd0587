//! Where the documents come from: in local mode, the controller's and the agent's admin
//! endpoints over plain HTTP; in a cluster, the Kubernetes API (kube-rs, from KUBECONFIG or
//! in-cluster config), which also reaches the same admin endpoints through its Service and
//! Pod proxy (`…/services/{svc}:{port}/proxy/state`, `…/pods/{pod}:{port}/proxy/config`),
//! so nothing but API access is needed. Every failure says what could not be reached, why,
//! and what to try.

use crate::contract::{Config, NodeAgentStatus, State, merge_states};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use std::collections::BTreeMap;
use std::time::Duration;

/// How long one request may take: admin endpoints answer at once, so anything slower is a
/// problem worth reporting rather than waiting on.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The chart's labels (charts/weir/templates/_helpers.tpl): every object has
/// `app.kubernetes.io/part-of: weir`, and the controller's and agents' carry
/// `app.kubernetes.io/component: controller|agent`. Names depend on the Helm release, so
/// objects are found by these labels, not by name.
const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "weir");
const COMPONENT: &str = "app.kubernetes.io/component";
/// The chart's default admin ports (values.yaml), used when a pod or Service does not name
/// an `admin` port.
pub(crate) const CONTROLLER_ADMIN_PORT: i32 = 18080;
pub(crate) const AGENT_ADMIN_PORT: i32 = 15000;
/// The CRDs the chart installs.
pub(crate) const CRDS: [&str; 2] = ["trafficpolicies.weir.dev", "nodeagents.weir.dev"];

#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("cannot reach {what} at {url}: {why}")]
    Unreachable {
        what: String,
        url: String,
        why: String,
    },
    #[error("{what} at {url} answered HTTP {status}: {body}")]
    Status {
        what: String,
        url: String,
        status: u16,
        body: String,
    },
    #[error("{what} at {url} sent a document that is not what weir serves: {why}")]
    Decode {
        what: String,
        url: String,
        why: String,
    },
    #[error("Kubernetes API: {0}")]
    Kube(String),
    #[error("{0}")]
    NotFound(String),
}

/// An answer: status and body.
#[derive(Debug, Clone)]
pub(crate) struct Got {
    pub status: u16,
    pub body: String,
}

/// The chain of causes of an error on one line (hyper's own message is often just
/// "client error (Connect)"; the cause says "Connection refused").
fn causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Where the plugin looks.
pub(crate) enum Target {
    // Boxed: the HTTP client is large, and clippy asks for variants of similar size.
    Local(Box<Local>),
    Cluster(Cluster),
}

/// Local mode: one controller and one agent at known admin URLs.
pub(crate) struct Local {
    pub controller: String,
    pub agent: String,
    http: HttpClient<HttpConnector, Empty<Bytes>>,
}

impl Local {
    pub(crate) fn new(controller: &str, agent: &str) -> Self {
        Self {
            controller: controller.trim_end_matches('/').to_string(),
            agent: agent.trim_end_matches('/').to_string(),
            http: HttpClient::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }

    /// GETs `url`; any status is an answer, only transport failures are errors.
    pub(crate) async fn get(&self, what: &str, url: &str) -> Result<Got, FetchError> {
        self.send(http::Method::GET, what, url).await
    }

    /// `method` on `url` without a body; any status is an answer.
    pub(crate) async fn send(
        &self,
        method: http::Method,
        what: &str,
        url: &str,
    ) -> Result<Got, FetchError> {
        let unreachable = |why: String| FetchError::Unreachable {
            what: what.into(),
            url: url.into(),
            why,
        };
        let req = http::Request::builder()
            .method(method)
            .uri(url)
            .body(Empty::new())
            .map_err(|e| unreachable(format!("bad URL: {e}")))?;
        answer(self.http.request(req), unreachable).await
    }
}

/// The answer to a GET that `send` makes, within [`TIMEOUT`]: any status is an answer,
/// only transport failures (made into errors by `unreachable`) are errors.
async fn answer<B, E>(
    send: impl std::future::Future<Output = Result<http::Response<B>, E>>,
    unreachable: impl Fn(String) -> FetchError,
) -> Result<Got, FetchError>
where
    B: http_body::Body,
    B::Error: std::error::Error + 'static,
    E: std::error::Error + 'static,
{
    let fut = async {
        let resp = send.await.map_err(|e| unreachable(causes(&e)))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(causes(&e)))?
            .to_bytes();
        Ok(Got {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .map_err(|_| unreachable(format!("no answer within {}s", TIMEOUT.as_secs())))?
}

/// A cluster reached through the Kubernetes API.
#[derive(Clone)]
pub(crate) struct Cluster {
    pub client: kube::Client,
    pub namespace: String,
}

/// A pod of the controller Deployment or the agent DaemonSet.
#[derive(Debug, Clone)]
pub(crate) struct WeirPod {
    pub name: String,
    pub node: String,
    pub ready: bool,
    pub admin_port: i32,
}

/// The controller Deployment's readiness.
#[derive(Debug, Clone)]
pub(crate) struct ControllerDeployment {
    pub name: String,
    pub desired: i32,
    pub ready: i32,
}

fn labelled(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    component: &str,
) -> bool {
    meta.labels.as_ref().is_some_and(|l| {
        l.get(PART_OF.0).map(String::as_str) == Some(PART_OF.1)
            && l.get(COMPONENT).map(String::as_str) == Some(component)
    })
}

fn kube_err(e: kube::Error) -> FetchError {
    FetchError::Kube(format!(
        "{}; check KUBECONFIG / the current context (`kubectl cluster-info`) and that you may read weir's objects",
        causes(&e)
    ))
}

impl Cluster {
    pub(crate) async fn connect(namespace: &str) -> Result<Self, FetchError> {
        let client = tokio::time::timeout(TIMEOUT, kube::Client::try_default())
            .await
            .map_err(|_| FetchError::Kube("no client configuration within 5s".into()))?
            .map_err(|e| {
                FetchError::Kube(format!(
                    "no cluster configuration: {}; set KUBECONFIG, or use --local for local mode",
                    causes(&e)
                ))
            })?;
        Ok(Self {
            client,
            namespace: namespace.to_string(),
        })
    }

    /// GETs an API path (a proxy path, typically); any status is an answer.
    pub(crate) async fn get(&self, what: &str, path: &str) -> Result<Got, FetchError> {
        self.send(http::Method::GET, what, path).await
    }

    /// `method` on an API path without a body; any status is an answer.
    pub(crate) async fn send(
        &self,
        method: http::Method,
        what: &str,
        path: &str,
    ) -> Result<Got, FetchError> {
        let unreachable = |why: String| FetchError::Unreachable {
            what: what.into(),
            url: path.into(),
            why,
        };
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .body(kube::client::Body::empty())
            .map_err(|e| unreachable(e.to_string()))?;
        let got = answer(self.client.send(req), unreachable).await?;
        Ok(Got {
            body: api_status_message(&got.body).unwrap_or(got.body),
            ..got
        })
    }

    /// The controller Service's name and admin port.
    pub(crate) async fn controller_service(&self) -> Result<(String, i32), FetchError> {
        let services: Api<Service> = Api::namespaced(self.client.clone(), &self.namespace);
        let list = services
            .list(&ListParams::default())
            .await
            .map_err(kube_err)?;
        let svc = list
            .items
            .into_iter()
            .find(|s| labelled(&s.metadata, "controller"))
            .ok_or_else(|| {
                FetchError::NotFound(format!(
                    "no weir controller Service (labels {}={}, {COMPONENT}=controller) in namespace {}; \
                     is weir installed there? try --namespace",
                    PART_OF.0, PART_OF.1, self.namespace
                ))
            })?;
        let port = svc
            .spec
            .and_then(|s| s.ports)
            .unwrap_or_default()
            .into_iter()
            .find(|p| p.name.as_deref() == Some("admin"))
            .map_or(CONTROLLER_ADMIN_PORT, |p| p.port);
        Ok((svc.metadata.name.unwrap_or_default(), port))
    }

    /// GETs `path` (e.g. `/readyz`) of the controller through its Service.
    pub(crate) async fn controller_get(&self, path: &str) -> Result<Got, FetchError> {
        let (svc, port) = self.controller_service().await?;
        let proxy = format!(
            "/api/v1/namespaces/{}/services/{svc}:{port}/proxy{path}",
            self.namespace
        );
        self.get(&format!("controller Service {svc}"), &proxy).await
    }

    pub(crate) async fn controller_deployments(
        &self,
    ) -> Result<Vec<ControllerDeployment>, FetchError> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
        let list = api.list(&ListParams::default()).await.map_err(kube_err)?;
        Ok(list
            .items
            .into_iter()
            .filter(|d| labelled(&d.metadata, "controller"))
            .map(|d| ControllerDeployment {
                name: d.metadata.name.unwrap_or_default(),
                desired: d.spec.and_then(|s| s.replicas).unwrap_or(1),
                ready: d.status.and_then(|s| s.ready_replicas).unwrap_or(0),
            })
            .collect())
    }

    /// The pods of `component` (`controller` or `agent`), with their admin ports.
    async fn pods(&self, component: &str) -> Result<Vec<WeirPod>, FetchError> {
        let default_port = if component == "agent" {
            AGENT_ADMIN_PORT
        } else {
            CONTROLLER_ADMIN_PORT
        };
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let list = api.list(&ListParams::default()).await.map_err(kube_err)?;
        Ok(list
            .items
            .into_iter()
            .filter(|p| labelled(&p.metadata, component))
            .map(|p| {
                let ready = p
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                let spec = p.spec.unwrap_or_default();
                let admin_port = spec
                    .containers
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten())
                    .find(|p| p.name.as_deref() == Some("admin"))
                    .map_or(default_port, |p| p.container_port);
                WeirPod {
                    name: p.metadata.name.unwrap_or_default(),
                    node: spec.node_name.unwrap_or_default(),
                    ready,
                    admin_port,
                }
            })
            .collect())
    }

    pub(crate) async fn agent_pods(&self) -> Result<Vec<WeirPod>, FetchError> {
        self.pods("agent").await
    }

    /// Every ready controller replica's `/state`, merged (see [`merge_states`]): each
    /// replica aggregates the traffic of the agents connected to *it*, so one replica's
    /// view through the Service would show only part of it. Falls back to the Service when
    /// no replica pod can be read.
    pub(crate) async fn traffic_state(&self) -> Result<State, FetchError> {
        let pods = self.pods("controller").await.unwrap_or_default();
        let mut states = Vec::new();
        for pod in pods.iter().filter(|p| p.ready) {
            let path = format!(
                "/api/v1/namespaces/{}/pods/{}:{}/proxy/state",
                self.namespace, pod.name, pod.admin_port
            );
            let what = format!("controller {}", pod.name);
            if let Ok(s) = self
                .get(&what, &path)
                .await
                .and_then(|got| decode::<State>(&what, &path, got))
            {
                states.push(s);
            }
        }
        if states.is_empty() {
            let got = self.controller_get("/state").await?;
            return decode("the controller", "/state", got);
        }
        Ok(merge_states(states))
    }

    /// The agent pod on `node`, or any ready one.
    pub(crate) async fn pick_agent(&self, node: Option<&str>) -> Result<WeirPod, FetchError> {
        let pods = self.agent_pods().await?;
        let found = match node {
            Some(n) => pods.iter().find(|p| p.node == n),
            None => pods.iter().find(|p| p.ready),
        };
        found.cloned().ok_or_else(|| {
            let nodes: Vec<&str> = pods.iter().map(|p| p.node.as_str()).collect();
            FetchError::NotFound(match node {
                Some(n) => format!(
                    "no weir agent pod on node {n:?} in namespace {}; agents run on: {}",
                    self.namespace,
                    if nodes.is_empty() {
                        "-".into()
                    } else {
                        nodes.join(", ")
                    }
                ),
                None => format!(
                    "no ready weir agent pod in namespace {} ({} not ready); \
                     see `kubectl -n {} get pods -l {COMPONENT}=agent`",
                    self.namespace,
                    pods.len(),
                    self.namespace
                ),
            })
        })
    }

    pub(crate) async fn agent_config(&self, pod: &WeirPod) -> Result<Config, FetchError> {
        let path = format!(
            "/api/v1/namespaces/{}/pods/{}:{}/proxy/config",
            self.namespace, pod.name, pod.admin_port
        );
        let got = self
            .get(&format!("agent {} on node {}", pod.name, pod.node), &path)
            .await?;
        decode(&format!("agent {}", pod.name), &path, got)
    }

    /// POSTs `/cache/purge?{query}` to every agent pod (or the one on `node`), a few at a
    /// time; one result per pod, in node order.
    pub(crate) async fn purge(
        &self,
        node: Option<&str>,
        query: &str,
    ) -> Result<Vec<Purged>, FetchError> {
        /// Requests in flight at once: enough for a large fleet without a burst on the API
        /// server.
        const AT_ONCE: usize = 16;
        let pods = match node {
            Some(n) => vec![self.pick_agent(Some(n)).await?],
            None => self.agent_pods().await?,
        };
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
        let mut tasks = tokio::task::JoinSet::new();
        for pod in pods {
            let (me, gate) = (self.clone(), gate.clone());
            let path = format!(
                "/api/v1/namespaces/{}/pods/{}:{}/proxy/cache/purge?{query}",
                self.namespace, pod.name, pod.admin_port
            );
            tasks.spawn(async move {
                let _turn = gate.acquire_owned().await;
                let what = format!("agent {} on node {}", pod.name, pod.node);
                let got = me.send(http::Method::POST, &what, &path).await;
                Purged::of(pod.node, &what, &path, got)
            });
        }
        let mut out = Vec::new();
        while let Some(done) = tasks.join_next().await {
            if let Ok(p) = done {
                out.push(p);
            }
        }
        out.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(out)
    }

    /// Whether each CRD exists and is Established (`None`: absent).
    pub(crate) async fn crds(&self) -> Result<Vec<(String, Option<bool>)>, FetchError> {
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let mut out = Vec::new();
        for name in CRDS {
            let crd = api.get_opt(name).await.map_err(kube_err)?;
            let established = crd.map(|c| {
                c.status.and_then(|s| s.conditions).is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
            });
            out.push((name.to_string(), established));
        }
        Ok(out)
    }

    pub(crate) async fn nodes(&self) -> Result<Vec<String>, FetchError> {
        let api: Api<Node> = Api::all(self.client.clone());
        let list = api.list(&ListParams::default()).await.map_err(kube_err)?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect())
    }

    fn weir_api(&self, kind: &str, plural: &str) -> Api<DynamicObject> {
        let gvk = GroupVersionKind::gvk("weir.dev", "v1alpha1", kind);
        Api::all_with(
            self.client.clone(),
            &ApiResource::from_gvk_with_plural(&gvk, plural),
        )
    }

    /// NodeAgents by name (= node name).
    pub(crate) async fn nodeagents(&self) -> Result<BTreeMap<String, NodeAgentStatus>, FetchError> {
        let list = self
            .weir_api("NodeAgent", "nodeagents")
            .list(&ListParams::default())
            .await
            .map_err(kube_err)?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|o| {
                let status = o
                    .data
                    .get("status")
                    .cloned()
                    .and_then(|s| serde_json::from_value(s).ok())
                    .unwrap_or_default();
                Some((o.metadata.name?, status))
            })
            .collect())
    }

    /// The generation every agent should run, per policy `namespace/name`: that of each
    /// TrafficPolicy whose current generation is Accepted and Programmed (a rejected spec
    /// never reaches agents, so it is not waited for).
    pub(crate) async fn expected_generations(&self) -> Result<BTreeMap<String, i64>, FetchError> {
        let list = self
            .weir_api("TrafficPolicy", "trafficpolicies")
            .list(&ListParams::default())
            .await
            .map_err(kube_err)?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|o| {
                let generation = o.metadata.generation?;
                let status = o.data.get("status")?;
                let current = status["observedGeneration"].as_i64() == Some(generation);
                let condition = |t: &str| {
                    status["conditions"].as_array().is_some_and(|cs| {
                        cs.iter().any(|c| c["type"] == t && c["status"] == "True")
                    })
                };
                (current && condition("Accepted") && condition("Programmed")).then(|| {
                    (
                        format!(
                            "{}/{}",
                            o.metadata.namespace.unwrap_or_default(),
                            o.metadata.name.unwrap_or_default()
                        ),
                        generation,
                    )
                })
            })
            .collect())
    }
}

/// The message of a Kubernetes `Status` body (the API server's own answer when it cannot
/// proxy, e.g. `no endpoints available for service …`), which reads better than its JSON.
fn api_status_message(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    if v["kind"] != "Status" {
        return None;
    }
    let message = v["message"].as_str()?;
    Some(match v["reason"].as_str() {
        Some(reason) => format!("{message} ({reason})"),
        None => message.to_string(),
    })
}

/// Parses a JSON document, or says why it is not one.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    what: &str,
    url: &str,
    got: Got,
) -> Result<T, FetchError> {
    if got.status != 200 {
        return Err(FetchError::Status {
            what: what.into(),
            url: url.into(),
            status: got.status,
            body: got.body.trim().chars().take(300).collect(),
        });
    }
    serde_json::from_str(&got.body).map_err(|e| FetchError::Decode {
        what: what.into(),
        url: url.into(),
        why: e.to_string(),
    })
}

/// What one agent said to a purge.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Purged {
    pub node: String,
    /// Objects removed from its memory (`None` when the purge failed).
    pub purged: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Purged {
    fn of(node: String, what: &str, url: &str, got: Result<Got, FetchError>) -> Self {
        #[derive(serde::Deserialize)]
        struct Answer {
            purged: u64,
        }
        match got.and_then(|g| decode::<Answer>(what, url, g)) {
            Ok(a) => Self {
                node,
                purged: Some(a.purged),
                error: None,
            },
            Err(e) => Self {
                node,
                purged: None,
                error: Some(e.to_string()),
            },
        }
    }
}

/// The query of `POST /cache/purge`: `host` and `prefix`, percent-encoded (the agent
/// decodes them), so a prefix may hold `&`, `=`, `%` or `#`.
pub(crate) fn purge_query(host: Option<&str>, prefix: Option<&str>) -> String {
    use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
    const KEEP: &percent_encoding::AsciiSet = &NON_ALPHANUMERIC
        .remove(b'/')
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~')
        .remove(b':');
    [("host", host), ("prefix", prefix)]
        .into_iter()
        .filter_map(|(k, v)| Some(format!("{k}={}", utf8_percent_encode(v?, KEEP))))
        .collect::<Vec<_>>()
        .join("&")
}

impl Target {
    /// `POST /cache/purge?{query}` on local mode's agent, or on every agent of the cluster
    /// (the one on `node` when given).
    pub(crate) async fn purge(
        &self,
        node: Option<&str>,
        query: &str,
    ) -> Result<Vec<Purged>, FetchError> {
        match self {
            Target::Local(l) => {
                let url = format!("{}/cache/purge?{query}", l.agent);
                let got = l.send(http::Method::POST, "the agent", &url).await;
                Ok(vec![Purged::of("local".into(), "the agent", &url, got)])
            }
            Target::Cluster(c) => c.purge(node, query).await,
        }
    }

    /// The controller's `/state`.
    pub(crate) async fn state(&self) -> Result<State, FetchError> {
        match self {
            Target::Local(l) => {
                let url = format!("{}/state", l.controller);
                let got = l.get("the controller", &url).await?;
                decode("the controller", &url, got)
            }
            Target::Cluster(c) => {
                let got = c.controller_get("/state").await?;
                decode("the controller", "/state", got)
            }
        }
    }

    /// The controller's `/state` with the traffic of every replica (see
    /// [`Cluster::traffic_state`]).
    pub(crate) async fn traffic_state(&self) -> Result<State, FetchError> {
        match self {
            Target::Local(_) => self.state().await,
            Target::Cluster(c) => c.traffic_state().await,
        }
    }

    /// An agent's `/config`: local mode's one agent, or in a cluster the one on `node` (any
    /// ready one without).
    pub(crate) async fn config(&self, node: Option<&str>) -> Result<Config, FetchError> {
        match self {
            Target::Local(l) => {
                let url = format!("{}/config", l.agent);
                let got = l.get("the agent", &url).await?;
                decode("the agent", &url, got)
            }
            Target::Cluster(c) => {
                let pod = c.pick_agent(node).await?;
                c.agent_config(&pod).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_queries_are_percent_encoded_for_the_agent_to_decode() {
        assert_eq!(purge_query(None, None), "");
        assert_eq!(purge_query(Some("shop.test"), None), "host=shop.test");
        assert_eq!(
            purge_query(Some("shop.test:8080"), Some("/a b&c=d%/#x")),
            "host=shop.test:8080&prefix=/a%20b%26c%3Dd%25/%23x"
        );
    }

    #[test]
    fn api_server_status_bodies_read_as_their_message() {
        let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"no endpoints available for service \"weir-controller:18080\"","reason":"ServiceUnavailable","code":503}"#;
        assert_eq!(
            api_status_message(body).as_deref(),
            Some(
                "no endpoints available for service \"weir-controller:18080\" (ServiceUnavailable)"
            )
        );
        assert_eq!(api_status_message("not ready: draining"), None);
        assert_eq!(api_status_message(r#"{"kind":"List"}"#), None);
    }
}
