//! Measures how long a saved manifest takes to be in force on an agent: the time from the
//! rename of an edited file into the config folder to the controller seeing the agent's ACK
//! of the new version. Runs a real controller and agent (release build recommended):
//!
//!     cargo run --release -p weir-tests --bin weir-apply-latency -- --runs 20
//!
//! Prints every sample, the median and the worst. Also prints the agent's RSS.

use clap::Parser;
use std::time::{Duration, Instant};
use weir_tests::backend::start_group;
use weir_tests::manifests::{docs, policy, service, slice};
use weir_tests::{Agent, Controller};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 20)]
    runs: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let web = start_group(&["127.0.9.11", "127.0.9.12"], "web").await?;
    let port = web[0].addr.port();
    let write = |name: &str, text: &str| -> std::io::Result<()> {
        let tmp = dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, dir.path().join(name))
    };
    write(
        "web.yaml",
        &docs(&[
            service("web", 80),
            slice("web", port, &[("127.0.9.11", true), ("127.0.9.12", true)]),
        ]),
    )?;
    write(
        "policy.yaml",
        &policy("web", &["web.test"], &[("web", 80, 1, 0)], ""),
    )?;
    let controller = Controller::start(dir.path()).await?;
    let agent = Agent::start(&controller.url(), None).await?;
    agent.wait_ready().await;

    let acked = |s: &serde_json::Value| -> Option<u64> {
        s["agents"].as_array()?.first()?["appliedVersion"].as_u64()
    };
    let mut samples = Vec::with_capacity(args.runs);
    for i in 0..args.runs {
        let before = acked(&controller.state().await?).unwrap_or(0);
        // Alternate the second endpoint's readiness: a real change every time.
        let ready = i % 2 == 1;
        let text = docs(&[
            service("web", 80),
            slice("web", port, &[("127.0.9.11", true), ("127.0.9.12", ready)]),
        ]);
        let t0 = Instant::now();
        write("web.yaml", &text)?;
        loop {
            let s = controller.state().await?;
            if acked(&s).is_some_and(|v| v > before) {
                break;
            }
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(10), "no ACK within 10s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let dt = t0.elapsed();
        println!("run {i:2}: {:.1} ms", dt.as_secs_f64() * 1e3);
        samples.push(dt);
    }
    samples.sort();
    let median = samples[samples.len() / 2];
    let worst = samples[samples.len() - 1];
    println!(
        "file change -> agent ACK over {} runs: median {:.1} ms, worst {:.1} ms",
        samples.len(),
        median.as_secs_f64() * 1e3,
        worst.as_secs_f64() * 1e3
    );
    let rss = std::fs::read_to_string(format!("/proc/{}/status", agent.proc.child.id()))?
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .map(|l| l.to_string())
        .unwrap_or_default();
    println!("agent {rss}");
    Ok(())
}
