//! `kubectl weir`: a kubectl plugin (any `kubectl-weir` on PATH is one) that answers the
//! questions an operator of weir asks: is it installed and healthy (`check`), what would
//! this request get and why (`explain`), what does one agent run (`agent`), and where does
//! traffic go (`top`); and empties the agents' caches (`purge`). It reads a cluster through the Kubernetes API, or local mode's admin
//! endpoints with `--local`. This file owns the command line and the exit codes; the
//! decisions live in `check`, `explain` and `view`, the I/O in `fetch`.

mod check;
mod contract;
mod explain;
mod fetch;
mod matcher;
mod view;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use fetch::{Cluster, FetchError, Local, Target};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "kubectl-weir",
    bin_name = "kubectl weir",
    version,
    about = "Inspect weir: install sanity, request routing, agents and traffic",
    after_help = "Cluster mode (the default) uses KUBECONFIG or in-cluster config and reaches \
                  weir's admin endpoints through the API server's proxy. --local reads a local-mode \
                  controller and agent directly."
)]
struct Cli {
    /// Local mode: read the controller's and the agent's admin endpoints directly.
    #[arg(long, global = true, env = "WEIR_LOCAL")]
    local: bool,
    /// The controller's admin URL (local mode).
    #[arg(
        long,
        global = true,
        env = "WEIR_CONTROLLER_ADMIN",
        default_value = "http://127.0.0.1:18080"
    )]
    controller_admin: String,
    /// The agent's admin URL (local mode).
    #[arg(
        long,
        global = true,
        env = "WEIR_AGENT_ADMIN",
        default_value = "http://127.0.0.1:15000"
    )]
    agent_admin: String,
    /// The namespace weir is installed in (cluster mode).
    #[arg(
        short,
        long,
        global = true,
        env = "WEIR_NAMESPACE",
        default_value = "weir-system"
    )]
    namespace: String,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Install sanity: one line per check; exits 0 only when all pass.
    Check,
    /// Which route, rule, tier and endpoints a request would get, and why.
    Explain {
        /// The Host of the request (a port is ignored, as the agent does).
        host: String,
        /// The request path (default /); a query is ignored.
        path: Option<String>,
        /// The method (default GET).
        method: Option<String>,
        /// A request header, `name:value`; repeatable.
        #[arg(short = 'H', long = "header", value_name = "NAME:VALUE")]
        headers: Vec<String>,
        /// The node whose agent to ask (cluster mode; default: any ready agent).
        #[arg(long)]
        node: Option<String>,
    },
    /// One agent's table version, controller connection, routes and endpoint health.
    Agent {
        /// The node (cluster mode; local mode has one agent).
        node: Option<String>,
    },
    /// Empties the response caches of every agent (or of one node's): everything, one
    /// host's objects, or those whose path starts with a prefix. Exits 0 only when every
    /// agent answered.
    Purge {
        /// Only this host's objects (a port is ignored).
        #[arg(long)]
        host: Option<String>,
        /// Only objects whose path (and query) starts with this, e.g. /img/.
        #[arg(long)]
        prefix: Option<String>,
        /// Only the agent on this node (cluster mode).
        #[arg(long)]
        node: Option<String>,
    },
    /// Per-route traffic from the controller, busiest first.
    Top {
        /// Refresh every 2 seconds until interrupted.
        #[arg(short, long)]
        watch: bool,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let target = if cli.local {
        Target::Local(Box::new(Local::new(
            &cli.controller_admin,
            &cli.agent_admin,
        )))
    } else {
        Target::Cluster(Cluster::connect(&cli.namespace).await?)
    };
    match cli.command {
        Command::Check => check(&target, cli.output).await,
        Command::Explain {
            host,
            path,
            method,
            headers,
            node,
        } => {
            let mut req = matcher::Request::from_cli(&host, path.as_deref(), method.as_deref());
            for h in &headers {
                let (n, v) = h
                    .split_once(':')
                    .with_context(|| format!("header {h:?} is not NAME:VALUE"))?;
                if n.trim().is_empty() {
                    bail!("header {h:?} has no name");
                }
                // As curl does: the value starts after the colon's spaces.
                req.headers
                    .push((n.trim().to_string(), v.trim_start().to_string()));
            }
            explain(&target, node.as_deref(), &req, cli.output).await
        }
        Command::Agent { node } => agent(&target, node.as_deref(), cli.output).await,
        Command::Top { watch } => top(&target, watch, cli.output).await,
        Command::Purge { host, prefix, node } => {
            if node.is_some() && matches!(target, Target::Local(_)) {
                bail!("--node is for cluster mode; local mode has one agent (--agent-admin)");
            }
            let query = fetch::purge_query(host.as_deref(), prefix.as_deref());
            let results = target.purge(node.as_deref(), &query).await?;
            match cli.output {
                Output::Json => print_json(&results)?,
                Output::Table => print!("{}", view::purge(&results)),
            }
            Ok(if results.iter().all(|r| r.purged.is_some()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn check(target: &Target, output: Output) -> anyhow::Result<ExitCode> {
    let lines = match target {
        Target::Local(l) => {
            let c_url = format!("{}/readyz", l.controller);
            let a_url = format!("{}/readyz", l.agent);
            let (c_ready, a_ready, state, config) = tokio::join!(
                l.get("the controller", &c_url),
                l.get("the agent", &a_url),
                target.state(),
                target.config(None),
            );
            vec![
                check::readyz(
                    "controller ready",
                    &c_ready,
                    "is weir-controller running? its --admin-addr must match --controller-admin",
                ),
                check::readyz(
                    "agent ready",
                    &a_ready,
                    "is weir-agent running? its --admin-addr must match --agent-admin; \
                     \"no routing table yet\" means it has not reached the controller",
                ),
                check::local_sync(state.as_ref().ok(), config.as_ref().ok()),
            ]
        }
        Target::Cluster(c) => {
            let ns = &c.namespace;
            let (crds, deployments, ready, nodes, agents, expected) = tokio::join!(
                c.crds(),
                c.controller_deployments(),
                c.controller_get("/readyz"),
                c.nodes(),
                c.nodeagents(),
                c.expected_generations(),
            );
            let mut lines = vec![
                check::crds(&crds),
                check::controller_pods(&deployments, ns),
                check::readyz(
                    "controller /readyz",
                    &ready,
                    "reached through the API server's Service proxy: check the Service's endpoints \
                     and the controller's log",
                ),
            ];
            match (&nodes, &agents) {
                (Ok(nodes), Ok(agents)) => lines.push(check::nodes_connected(nodes, agents, ns)),
                (Err(e), _) | (_, Err(e)) => lines.push(unreadable("agents connected", e)),
            }
            match (&agents, &expected) {
                (Ok(agents), Ok(expected)) => lines.push(check::synced(agents, expected)),
                (Err(e), _) | (_, Err(e)) => lines.push(unreadable("agents synced", e)),
            }
            match &agents {
                Ok(agents) => lines.push(check::nacks(agents, jiff::Timestamp::now().as_second())),
                Err(e) => lines.push(unreadable("no NACKs", e)),
            }
            lines
        }
    };
    match output {
        Output::Json => print_json(&serde_json::json!({
            "ok": lines.iter().all(|l| l.ok),
            "checks": lines,
        }))?,
        Output::Table => print!("{}", view::check(&lines)),
    }
    Ok(if lines.iter().all(|l| l.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn unreadable(check: &str, e: &FetchError) -> check::Line {
    check::Line {
        ok: false,
        check: check.into(),
        detail: e.to_string(),
        hint: Some("check your access to the cluster".into()),
    }
}

async fn explain(
    target: &Target,
    node: Option<&str>,
    req: &matcher::Request,
    output: Output,
) -> anyhow::Result<ExitCode> {
    if node.is_some() && matches!(target, Target::Local(_)) {
        bail!("--node is for cluster mode; local mode has one agent (--agent-admin)");
    }
    let (config, state) = tokio::join!(target.config(node), target.state());
    let config = config?;
    // The policy's errors are extra: explain what the agent does even without them.
    let state = match state {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("note: policy status unavailable: {e}");
            None
        }
    };
    let e = match explain::explain(&config, state.as_ref().map(|s| &s.policies), req) {
        Ok(e) => e,
        Err(err) => {
            eprintln!("{err}");
            return Ok(ExitCode::FAILURE);
        }
    };
    match output {
        Output::Json => print_json(&e)?,
        Output::Table => print!("{}", view::explain(&e)),
    }
    Ok(if e.rule.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn agent(target: &Target, node: Option<&str>, output: Output) -> anyhow::Result<ExitCode> {
    let (config, node_agent) = match target {
        Target::Local(_) => {
            let config = target.config(None).await?;
            if let Some(n) = node.filter(|n| *n != config.node) {
                bail!(
                    "local mode has one agent, on node {:?}, not {n:?}; use --agent-admin for another",
                    config.node
                );
            }
            (config, None)
        }
        Target::Cluster(c) => {
            let Some(node) = node else {
                bail!(
                    "which node? `kubectl weir agent <node>` (`kubectl get nodeagents` lists them)"
                );
            };
            let (config, agents) = tokio::join!(target.config(Some(node)), c.nodeagents());
            let node_agent = match agents {
                Ok(mut a) => a.remove(node),
                Err(e) => {
                    eprintln!("note: NodeAgent status unavailable: {e}");
                    None
                }
            };
            (config?, node_agent)
        }
    };
    let v = view::AgentView {
        config: &config,
        node_agent: node_agent.as_ref(),
    };
    match output {
        Output::Json => print_json(&v)?,
        Output::Table => print!("{}", view::agent(&v)),
    }
    Ok(ExitCode::SUCCESS)
}

async fn top(target: &Target, watch: bool, output: Output) -> anyhow::Result<ExitCode> {
    loop {
        let state = target.traffic_state().await;
        let text = match (&state, output) {
            (Ok(s), Output::Json) => {
                let rows = view::top_rows(s);
                // One document per refresh: a line each when watching (NDJSON).
                if watch {
                    serde_json::to_string(&rows)?
                } else {
                    serde_json::to_string_pretty(&rows)?
                }
            }
            (Ok(s), Output::Table) => view::top(&view::top_rows(s)),
            (Err(e), _) if !watch => return Err(anyhow::anyhow!("{e}")),
            (Err(e), _) => format!("{e} (retrying)"),
        };
        if !watch {
            println!("{}", text.trim_end());
            return Ok(ExitCode::SUCCESS);
        }
        if output == Output::Table {
            // Clear the screen and home the cursor, as `watch` does.
            print!("\x1b[2J\x1b[H");
        }
        println!("{}", text.trim_end());
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
    }
}
