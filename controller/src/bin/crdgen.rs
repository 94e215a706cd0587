//! `crdgen`: prints weir's CustomResourceDefinitions, generated from the Rust types, as one
//! YAML stream. The Helm chart ships this output verbatim:
//!
//! ```sh
//! cargo run -q -p weir-controller --bin crdgen > charts/weir/crds/crds.yaml
//! ```
//!
//! `tests/chart/run.sh` regenerates it and fails when the chart's copy differs.

use anyhow::{Context, ensure};
use kube::CustomResourceExt;
use weir_controller::model::NodeAgent;
use weir_controller::model::TrafficPolicy;

const HEADER: &str = "\
# weir's CustomResourceDefinitions, generated from the Rust types. Do not edit: run
#   cargo run -q -p weir-controller --bin crdgen > charts/weir/crds/crds.yaml
";

fn main() -> anyhow::Result<()> {
    let mut out = String::from(HEADER);
    for crd in [TrafficPolicy::crd(), NodeAgent::crd()] {
        let value = serde_json::to_value(&crd)?;
        let yaml = yaml11_safe(&serde_yaml::to_string(&value)?);
        let back: serde_json::Value =
            serde_yaml::from_str(&yaml).context("crdgen produced YAML it cannot read back")?;
        ensure!(
            back == value,
            "quoting changed the CRD {:?}",
            crd.metadata.name
        );
        out.push_str("---\n");
        out.push_str(&yaml);
    }
    print!("{out}");
    Ok(())
}

/// Plain scalars that YAML 1.1 reads as booleans. serde_yaml writes YAML 1.2 and leaves them
/// unquoted, but Kubernetes decodes YAML 1.1 (go-yaml v2 behind kubectl and Helm), where the
/// schema property `on` (`spec.retry.on`) would become the key `"true"`.
const YAML11_BOOLS: [&str; 16] = [
    "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off",
    "OFF",
];

fn quote_yaml11(scalar: &str) -> String {
    if YAML11_BOOLS.contains(&scalar) {
        format!("'{scalar}'")
    } else {
        scalar.to_owned()
    }
}

/// Quotes the YAML 1.1 booleans among the keys and plain values of serde_yaml's block-style
/// output, leaving block scalars (`|-` descriptions) alone. The caller checks that the result
/// still reads back as the same value.
fn yaml11_safe(yaml: &str) -> String {
    let mut out = String::with_capacity(yaml.len() + 64);
    let mut block_scalar_indent: Option<usize> = None;
    for line in yaml.lines() {
        let body = line.trim_start();
        let indent = line.len() - body.len();
        if let Some(parent) = block_scalar_indent {
            if body.is_empty() || indent > parent {
                out.push_str(line);
                out.push('\n');
                continue;
            }
            block_scalar_indent = None;
        }
        let mut rest = body;
        let mut prefix = &line[..indent];
        while let Some(item) = rest.strip_prefix("- ") {
            prefix = &line[..line.len() - item.len()];
            rest = item;
        }
        let fixed = if let Some((key, value)) = rest.split_once(": ") {
            if value.starts_with('|') || value.starts_with('>') {
                block_scalar_indent = Some(indent);
            }
            format!("{}: {}", quote_yaml11(key), quote_yaml11(value))
        } else if let Some(key) = rest.strip_suffix(':') {
            format!("{}:", quote_yaml11(key))
        } else {
            if rest.starts_with('|') || rest.starts_with('>') {
                block_scalar_indent = Some(indent);
            }
            quote_yaml11(rest)
        };
        out.push_str(prefix);
        out.push_str(&fixed);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::yaml11_safe;

    #[test]
    fn quotes_yaml11_booleans_in_keys_values_and_items() {
        let yaml = "on:\n  type: array\nenum:\n- 'yes'\n- no\n- name: off\n  b: 'x'\n";
        assert_eq!(
            yaml11_safe(yaml),
            "'on':\n  type: array\nenum:\n- 'yes'\n- 'no'\n- name: 'off'\n  b: 'x'\n"
        );
    }

    #[test]
    fn leaves_block_scalars_alone() {
        let yaml = "description: |-\n  on\n  no: more\nno: x\n";
        assert_eq!(
            yaml11_safe(yaml),
            "description: |-\n  on\n  no: more\n'no': x\n"
        );
    }
}
