//! `cargo quickstart`: runs weir's main job in local mode on one machine — the controller on
//! `examples/quickstart/`, one agent, and a demo backend on every endpoint address the
//! manifests list — prints what to try, and stops everything on Ctrl-C.

use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use weir_tests::backend::Backend;
use weir_tests::{Agent, Controller};

#[derive(Parser)]
#[command(about = "Run weir locally: controller + agent + demo backends")]
struct Args {
    /// Folder of manifests (default: the repository's examples/quickstart).
    #[arg(long)]
    config_dir: Option<PathBuf>,
    /// Agent proxy listener.
    #[arg(long, default_value = "127.0.0.1:15001")]
    listen: SocketAddr,
    /// Agent admin API.
    #[arg(long, default_value = "127.0.0.1:15000")]
    agent_admin: SocketAddr,
    /// Controller gRPC address.
    #[arg(long, default_value = "127.0.0.1:18000")]
    grpc: SocketAddr,
    /// Controller admin API.
    #[arg(long, default_value = "127.0.0.1:18080")]
    controller_admin: SocketAddr,
}

/// A progress line, so a first run that builds for minutes does not look stuck.
fn step(what: &str) {
    eprintln!("weir-quickstart: {what} ...");
}

/// Every (service, ip:port) an EndpointSlice in `dir` names.
fn endpoints(dir: &std::path::Path) -> anyhow::Result<Vec<(String, SocketAddr)>> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        for doc in yaml_serde::Deserializer::from_str(&text) {
            let v = yaml_serde::Value::deserialize(doc)
                .with_context(|| format!("{}", path.display()))?;
            if v["kind"].as_str() != Some("EndpointSlice") {
                continue;
            }
            let svc = v["metadata"]["labels"]["kubernetes.io/service-name"]
                .as_str()
                .unwrap_or("backend")
                .to_string();
            let port = v["ports"][0]["port"].as_u64().unwrap_or(80) as u16;
            for ep in v["endpoints"].as_sequence().into_iter().flatten() {
                for a in ep["addresses"].as_sequence().into_iter().flatten() {
                    if let Some(ip) = a.as_str().and_then(|s| s.parse().ok()) {
                        out.push((svc.clone(), SocketAddr::new(ip, port)));
                    }
                }
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = args.config_dir.unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart")
    });
    let dir = dir
        .canonicalize()
        .with_context(|| format!("config dir {}", dir.display()))?;
    // Under `cargo run`, make sure the controller and agent binaries are current too. Not
    // quiet: on a fresh machine this is minutes of work, and cargo's progress shows it moves.
    if let Ok(cargo) = std::env::var("CARGO") {
        let release = weir_tests::profile_dir().ends_with("release");
        step("building weir-controller and weir-agent (the first build takes a few minutes)");
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "-p", "weir-controller", "-p", "weir-agent"]);
        if release {
            cmd.arg("--release");
        }
        anyhow::ensure!(cmd.status()?.success(), "building weir failed");
    }

    let mut backends = Vec::new();
    step("starting the demo backends");
    for (svc, addr) in endpoints(&dir)? {
        let b = Backend::start(addr, &svc)
            .await
            .with_context(|| format!("demo backend {svc} on {addr}"))?;
        backends.push(b);
    }
    step(&format!("starting the controller on {}", dir.display()));
    let controller = Controller::start_at(&dir, args.grpc, args.controller_admin).await?;
    step("starting the agent and waiting for its first routing table");
    let state_dir = std::env::temp_dir().join("weir-quickstart-state");
    let agent = Agent::start_at(
        &controller.url(),
        args.listen,
        args.agent_admin,
        Some(&state_dir),
    )
    .await?;
    agent.wait_ready().await;

    let l = args.listen;
    println!();
    println!(
        "weir is running: controller on {}, agent on {l}, {} demo backends:",
        controller.grpc,
        backends.len()
    );
    for b in &backends {
        println!("  {:<14} {}", b.name, b.addr);
    }
    println!();
    println!("Try:");
    println!("  curl -s -H 'Host: shop' http://{l}/");
    println!(
        "  for i in $(seq 100); do curl -s -H 'Host: shop' http://{l}/; done | sort | uniq -c"
    );
    println!();
    println!("The cache (policy `catalog`): the first answer is a MISS, the next ones HITs with");
    println!("an Age, and after 10 s the copy expires and the origin answers again:");
    println!(
        "  curl -si -H 'Host: catalog' 'http://{l}/item/1?max-age=10' | grep -iE '^(x-cache|age)|request #'"
    );
    println!();
    println!(
        "Then edit {}/ (weights, `ready: false`) and run the loop again.",
        dir.display()
    );
    println!("  agent:      curl -s http://{}/config", args.agent_admin);
    println!(
        "  controller: curl -s http://{}/state",
        args.controller_admin
    );
    println!();
    println!("Ctrl-C stops everything.");
    tokio::signal::ctrl_c().await?;
    println!("stopping");
    drop(agent);
    drop(controller);
    Ok(())
}
