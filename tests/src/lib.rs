//! Helpers for weir's end-to-end tests and the quickstart: start real `weir-controller` and
//! `weir-agent` processes on loopback, real HTTP backends, and wait on their readiness
//! signals (admin endpoints), never on sleeps.
//!
//! The binaries are the workspace's own build of `weir-controller` and `weir-agent`, found
//! next to the test executable: `cargo test --workspace` builds them, because both packages
//! have integration tests of their own (`CARGO_BIN_EXE_*`).

pub mod backend;
pub mod fake_apiserver;
pub mod grpc;
pub mod load;
pub mod manifests;
pub mod pki;
pub mod sim;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long any wait in a test may take before it fails (generous: CI machines are slow and
/// shared; the waits return as soon as their condition holds).
pub const WAIT: Duration = Duration::from_secs(30);

/// The folder of the running executable's build profile (`target/debug` or
/// `target/release`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The folder holding the workspace's `weir-controller` and `weir-agent` binaries.
pub fn bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = profile_dir();
        for b in ["weir-controller", "weir-agent"] {
            assert!(
                dir.join(b).exists(),
                "{} is missing: run the tests with `cargo test --workspace`, which builds it",
                dir.join(b).display()
            );
        }
        dir
    })
    .clone()
}

/// A free TCP port on `ip` (bound and released; good enough on a test machine).
pub fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A free port on 127.0.0.1, as an address.
pub fn free_local_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port("127.0.0.1")))
}

/// A child process that is killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Sends SIGTERM without waiting (the process drains, then exits).
    pub fn signal_term(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// The exit status if the process has exited (does not block).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(bin: &str, args: &[String], quiet: bool) -> anyhow::Result<Proc> {
    spawn_with(bin, args, quiet, &[])
}

/// Like [`spawn`], with extra environment variables (logs shown).
fn spawn_env(bin: &str, args: &[String], env: &[(&str, String)]) -> anyhow::Result<Proc> {
    spawn_with(bin, args, false, env)
}

fn spawn_with(
    bin: &str,
    args: &[String],
    quiet: bool,
    env: &[(&str, String)],
) -> anyhow::Result<Proc> {
    let path = bin_dir().join(bin);
    let mut cmd = Command::new(&path);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env(
            "WEIR_LOG",
            std::env::var("WEIR_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null());
    if quiet {
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("start {}", path.display()))?;
    Ok(Proc {
        child,
        name: bin.into(),
    })
}

/// A plain HTTP/1.1 client for admin endpoints and traffic.
pub fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build(HttpConnector::new())
}

/// A response with its body read.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

/// Sends `GET http://{addr}{path}` with `Host: host`.
pub async fn get(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> anyhow::Result<Got> {
    request(client, "GET", &format!("http://{addr}{path}"), Some(host)).await
}

/// Sends a request; `host` overrides the Host header when given.
pub async fn request(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: &str,
    uri: &str,
    host: Option<&str>,
) -> anyhow::Result<Got> {
    let mut b = http::Request::builder().method(method).uri(uri);
    if let Some(h) = host {
        b = b.header(http::header::HOST, h);
    }
    let req = b.body(Full::new(Bytes::new()))?;
    let resp = tokio::time::timeout(WAIT, client.request(req))
        .await
        .context("request timed out")??;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Got {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// GETs a JSON admin document.
pub async fn get_json(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
) -> anyhow::Result<Value> {
    let got = request(client, "GET", url, None).await?;
    if got.status != 200 {
        bail!("{url}: HTTP {}: {}", got.status, got.body);
    }
    Ok(serde_json::from_str(&got.body)?)
}

/// Polls `check` until it returns `Some`, failing after [`WAIT`] with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `url` answers 200.
pub async fn wait_ok(url: &str) {
    let client = http_client();
    wait_for(url, || {
        let client = client.clone();
        async move {
            request(&client, "GET", url, None)
                .await
                .ok()
                .filter(|g| g.status == 200)
        }
    })
    .await;
}

/// Writes a manifest the way editors and `kubectl cp` do: whole, then renamed into place, so
/// the controller never reads half a file.
pub fn write_manifest(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write manifest");
    std::fs::rename(&tmp, dir.join(name)).expect("rename manifest");
}

/// Starts one `bin` process (`weir-demo-backend`, `weir-echo-grpc`) per address in `ips`, all
/// on one port, each named after its IP; waits for each to print `listening on …`.
pub fn listening_processes(bin: &str, ips: &[&str]) -> (Vec<Proc>, u16) {
    use std::io::{BufRead, BufReader};
    'port: for _ in 0..20 {
        let port = free_port(ips[0]);
        let mut procs = Vec::new();
        for ip in ips {
            let mut child = Command::new(profile_dir().join(bin))
                .args(["--listen", &format!("{ip}:{port}"), "--name", ip])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("start {bin}: {e}"));
            // Its first line says it listens (or it exits if the port is taken).
            let mut line = String::new();
            if let Some(out) = child.stdout.take() {
                let _ = BufReader::new(out).read_line(&mut line);
            }
            let p = Proc {
                child,
                name: ip.to_string(),
            };
            if !line.starts_with("listening") {
                continue 'port;
            }
            procs.push(p);
        }
        return (procs, port);
    }
    panic!("no common free port for {bin} on {ips:?}");
}

/// A running controller in local mode.
pub struct Controller {
    pub proc: Proc,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
}

impl Controller {
    /// Starts a controller on `dir` at the given addresses and waits until `/readyz`.
    pub async fn start_at(dir: &Path, grpc: SocketAddr, admin: SocketAddr) -> anyhow::Result<Self> {
        Self::start_with(dir, grpc, admin, &[]).await
    }

    /// [`Controller::start_at`] with more flags (e.g. `--tls-cert …`).
    pub async fn start_with(
        dir: &Path,
        grpc: SocketAddr,
        admin: SocketAddr,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut args: Vec<String> = vec![
            "--config-dir".into(),
            dir.display().to_string(),
            "--grpc-addr".into(),
            grpc.to_string(),
            "--admin-addr".into(),
            admin.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = spawn("weir-controller", &args, false)?;
        let c = Self { proc, grpc, admin };
        wait_ok(&format!("http://{admin}/readyz")).await;
        Ok(c)
    }

    /// Starts a controller in Kubernetes mode (no `--config-dir`) against the API server
    /// named in `kubeconfig` with the flags `extra`, and waits until `/readyz`, which means
    /// every reflector has listed once. The agent stream is plain text unless `extra` has
    /// `--tls-cert`.
    pub async fn start_kube(kubeconfig: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let grpc = free_local_addr();
        let admin = free_local_addr();
        let mut args: Vec<String> = vec![
            "--grpc-addr".into(),
            grpc.to_string(),
            "--admin-addr".into(),
            admin.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        if !extra.contains(&"--tls-cert") {
            args.push("--plaintext".into());
        }
        let proc = spawn_env(
            "weir-controller",
            &args,
            &[("KUBECONFIG", kubeconfig.display().to_string())],
        )?;
        let c = Self { proc, grpc, admin };
        wait_ok(&format!("http://{admin}/readyz")).await;
        Ok(c)
    }

    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let grpc = free_local_addr();
        let admin = free_local_addr();
        Self::start_at(dir, grpc, admin).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub async fn state(&self) -> anyhow::Result<Value> {
        get_json(&http_client(), &format!("http://{}/state", self.admin)).await
    }
}

/// A running agent.
pub struct Agent {
    pub proc: Proc,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

impl Agent {
    /// Starts an agent on free ports and waits until its admin API answers (not for a
    /// table: see [`Agent::wait_ready`]).
    pub async fn start(controller_url: &str, state_dir: Option<&Path>) -> anyhow::Result<Self> {
        let listen = free_local_addr();
        let admin = free_local_addr();
        Self::start_at(controller_url, listen, admin, state_dir).await
    }

    /// Starts an agent at the given addresses and waits until its admin API answers.
    pub async fn start_at(
        controller_url: &str,
        listen: SocketAddr,
        admin: SocketAddr,
        state_dir: Option<&Path>,
    ) -> anyhow::Result<Self> {
        Self::start_with(controller_url, listen, admin, state_dir, &[]).await
    }

    /// [`Agent::start_at`] with more flags (e.g. `--tls-ca …`).
    pub async fn start_with(
        controller_url: &str,
        listen: SocketAddr,
        admin: SocketAddr,
        state_dir: Option<&Path>,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut args: Vec<String> = vec![
            "--controller".into(),
            controller_url.to_string(),
            "--listen".into(),
            listen.to_string(),
            "--admin-addr".into(),
            admin.to_string(),
            "--workers".into(),
            "2".into(),
            "--header-read-timeout".into(),
            "1s".into(),
        ];
        // `--node-name` in `extra` names the node; flags may not repeat.
        if !extra.contains(&"--node-name") {
            args.push("--node-name".into());
            args.push("test-node".into());
        }
        if let Some(d) = state_dir {
            args.push("--state-dir".into());
            args.push(d.display().to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = spawn("weir-agent", &args, false)?;
        let a = Self {
            proc,
            listen,
            admin,
        };
        wait_ok(&format!("http://{admin}/healthz")).await;
        Ok(a)
    }

    pub async fn config(&self) -> anyhow::Result<Value> {
        get_json(&http_client(), &format!("http://{}/config", self.admin)).await
    }

    /// The version of the table in force (0 before any).
    pub async fn version(&self) -> u64 {
        self.config()
            .await
            .ok()
            .and_then(|c| c["version"].as_u64())
            .unwrap_or(0)
    }

    /// Waits until a table is in force; returns its version.
    pub async fn wait_ready(&self) -> u64 {
        wait_for("agent table", || async move {
            let v = self.version().await;
            (v > 0).then_some(v)
        })
        .await
    }

    /// Waits until the agent applies a version newer than `after` whose `/config` satisfies
    /// `check`; returns the config.
    pub async fn wait_config(&self, after: u64, check: impl Fn(&Value) -> bool) -> Value {
        let check = &check;
        wait_for("agent config", || async move {
            let c = self.config().await.ok()?;
            (c["version"].as_u64().unwrap_or(0) > after && check(&c)).then_some(c)
        })
        .await
    }
}

/// The weight the agent gives endpoint `addr` in the first rule of `route`.
pub fn endpoint_weight(config: &Value, route: &str, addr: &str) -> Option<u64> {
    config["routes"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == route)?["rules"][0]["backends"]
        .as_array()?
        .iter()
        .flat_map(|b| b["endpoints"].as_array().into_iter().flatten())
        .find(|e| e["address"] == addr)?["weight"]
        .as_u64()
}

/// What a process writes to stderr, collected line by line as it comes (and echoed to the
/// test's own stderr), so a test can wait for a log line as a readiness signal.
#[derive(Clone, Default)]
pub struct Log {
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Log {
    /// Follows `stderr` on a thread of its own until it closes.
    fn follow(stderr: std::process::ChildStderr, name: String) -> Self {
        use std::io::{BufRead, BufReader};
        let log = Log::default();
        let lines = log.lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{name}] {line}");
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        log
    }

    /// Whether a line containing `needle` was written.
    pub fn contains(&self, needle: &str) -> bool {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|l| l.contains(needle))
    }

    /// Waits until a line containing `needle` is written.
    pub async fn wait_for_line(&self, needle: &str) {
        wait_for(&format!("log line {needle:?}"), || async {
            self.contains(needle).then_some(())
        })
        .await;
    }
}

impl Agent {
    /// [`Agent::start_with`], with the agent's stderr collected in a [`Log`]; `name` prefixes
    /// its lines in the test output.
    pub async fn start_logged(
        name: &str,
        controller_url: &str,
        listen: SocketAddr,
        admin: SocketAddr,
        state_dir: Option<&Path>,
        extra: &[&str],
    ) -> anyhow::Result<(Self, Log)> {
        let mut args: Vec<String> = vec![
            "--controller".into(),
            controller_url.to_string(),
            "--listen".into(),
            listen.to_string(),
            "--admin-addr".into(),
            admin.to_string(),
            "--workers".into(),
            "2".into(),
            "--node-name".into(),
            "test-node".into(),
        ];
        if let Some(d) = state_dir {
            args.push("--state-dir".into());
            args.push(d.display().to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let path = bin_dir().join("weir-agent");
        let mut child = Command::new(&path)
            .args(&args)
            .env(
                "WEIR_LOG",
                std::env::var("WEIR_LOG").unwrap_or_else(|_| "info".into()),
            )
            // Plain lines to match on, whatever the terminal.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {}", path.display()))?;
        let log = match child.stderr.take() {
            Some(stderr) => Log::follow(stderr, name.to_string()),
            None => Log::default(),
        };
        let agent = Self {
            proc: Proc {
                child,
                name: name.into(),
            },
            listen,
            admin,
        };
        wait_ok(&format!("http://{admin}/healthz")).await;
        Ok((agent, log))
    }

    /// The requests this agent has counted (`weir_agent_requests_total`, all routes and
    /// classes).
    pub async fn requests_served(&self) -> anyhow::Result<u64> {
        let got = request(
            &http_client(),
            "GET",
            &format!("http://{}/metrics", self.admin),
            None,
        )
        .await?;
        Ok(got
            .body
            .lines()
            .filter(|l| l.starts_with("weir_agent_requests_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64)
    }
}

/// One origin (Service `origin`, a backend on `ip`) behind `host`, and a controller in local
/// mode serving it from `dir`.
pub async fn origin_and_controller(
    dir: &Path,
    ip: &str,
    host: &str,
) -> (Vec<backend::Backend>, Controller) {
    use manifests::{docs, policy, service, slice};
    let group = backend::start_group(&[ip], "origin")
        .await
        .expect("backend");
    write_manifest(
        dir,
        "origin.yaml",
        &docs(&[
            service("origin", 80),
            slice("origin", group[0].addr.port(), &[(ip, true)]),
        ]),
    );
    write_manifest(
        dir,
        "policy.yaml",
        &policy("origin", &[host], &[("origin", 80, 1, 0)], ""),
    );
    let controller = Controller::start(dir).await.expect("controller");
    (group, controller)
}
