//! `crdgen`: prints weir's CustomResourceDefinitions, generated from the Rust types, as one
//! YAML stream. The Helm chart ships this output verbatim:
//!
//! ```sh
//! cargo run -q -p weir-controller --bin crdgen > charts/weir/crds/crds.yaml
//! ```
//!
//! `tests/chart/run.sh` regenerates it and fails when the chart's copy differs.

// Until `nodeagent` is a module of the library, the binary compiles the file itself.
#[path = "../nodeagent.rs"]
mod nodeagent;

use kube::CustomResourceExt;
use weir_controller::model::TrafficPolicy;

const HEADER: &str = "\
# weir's CustomResourceDefinitions, generated from the Rust types. Do not edit: run
#   cargo run -q -p weir-controller --bin crdgen > charts/weir/crds/crds.yaml
";

fn main() -> anyhow::Result<()> {
    let mut out = String::from(HEADER);
    for crd in [TrafficPolicy::crd(), nodeagent::NodeAgent::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    print!("{out}");
    Ok(())
}
