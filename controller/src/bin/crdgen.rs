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
        let mut value = serde_json::to_value(&crd)?;
        for version in value
            .pointer_mut("/spec/versions")
            .and_then(serde_json::Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(schema) = version.pointer_mut("/schema/openAPIV3Schema") {
                kubernetes_formats(schema);
            }
        }
        let yaml = yaml11_safe(&yaml_serde::to_string(&value)?);
        let back: serde_json::Value =
            yaml_serde::from_str(&yaml).context("crdgen produced YAML it cannot read back")?;
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

/// The `format` values Kubernetes knows (apiextensions' OpenAPI validation: kube-openapi's
/// `strfmt` registry plus the numeric formats of OpenAPI itself). Others make
/// `kubectl apply` warn ("unrecognized format") and validate nothing.
const KUBERNETES_FORMATS: [&str; 29] = [
    "int32",
    "int64",
    "float",
    "double",
    "byte",
    "binary",
    "password",
    "date",
    "date-time",
    "datetime",
    "duration",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
    "isbn",
    "isbn10",
    "isbn13",
    "creditcard",
    "ssn",
    "hexcolor",
    "rgbcolor",
];

/// The Kubernetes format for schemars' integer formats: the smallest signed one whose range
/// holds the Rust type's (`minimum: 0` stays in the schema, so nothing is lost for unsigned
/// types), or none.
fn kubernetes_integer_format(format: &str) -> Option<&'static str> {
    match format {
        "int8" | "int16" | "uint8" | "uint16" => Some("int32"),
        "uint32" | "uint64" | "uint" | "int" => Some("int64"),
        _ => None,
    }
}

/// Rewrites the `format`s of a schema and of every schema under it into ones Kubernetes
/// knows, dropping the rest. Walks only schema positions, so a property that happens to be
/// called `format` is left alone. Written by hand because kube's derive builds the schema
/// with its own schemars settings, where no transform can be plugged in.
fn kubernetes_formats(schema: &mut serde_json::Value) {
    use serde_json::Value;
    let Value::Object(map) = schema else {
        return;
    };
    if let Some(Value::String(format)) = map.get("format")
        && !KUBERNETES_FORMATS.contains(&format.as_str())
    {
        match kubernetes_integer_format(format) {
            Some(known) => {
                map.insert("format".into(), Value::String(known.into()));
            }
            None => {
                map.remove("format");
            }
        }
    }
    for (key, value) in map.iter_mut() {
        match (key.as_str(), value) {
            ("properties" | "patternProperties" | "definitions" | "$defs", Value::Object(m)) => {
                m.values_mut().for_each(kubernetes_formats)
            }
            ("items" | "additionalProperties" | "not", v @ Value::Object(_)) => {
                kubernetes_formats(v)
            }
            ("items" | "allOf" | "anyOf" | "oneOf", Value::Array(list)) => {
                list.iter_mut().for_each(kubernetes_formats)
            }
            _ => {}
        }
    }
}

/// Plain scalars that YAML 1.1 reads as booleans. yaml_serde writes YAML 1.2 and leaves them
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

/// Quotes the YAML 1.1 booleans among the keys and plain values of yaml_serde's block-style
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
    use super::{kubernetes_formats, yaml11_safe};

    #[test]
    fn unknown_formats_are_mapped_or_dropped_and_properties_named_format_kept() {
        let mut schema = serde_json::json!({
            "type": "object",
            "properties": {
                "a": {"type": "integer", "format": "uint32", "minimum": 0},
                "b": {"type": "integer", "format": "uint16"},
                "c": {"type": "string", "format": "date-time"},
                "d": {"type": "array", "items": {"type": "string", "format": "weird"}},
                "format": {"type": "string"},
                "e": {"anyOf": [{"type": "integer", "format": "uint64"}]},
            },
            "additionalProperties": {"type": "number", "format": "double"},
        });
        kubernetes_formats(&mut schema);
        assert_eq!(
            schema,
            serde_json::json!({
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "format": "int64", "minimum": 0},
                    "b": {"type": "integer", "format": "int32"},
                    "c": {"type": "string", "format": "date-time"},
                    "d": {"type": "array", "items": {"type": "string"}},
                    "format": {"type": "string"},
                    "e": {"anyOf": [{"type": "integer", "format": "int64"}]},
                },
                "additionalProperties": {"type": "number", "format": "double"},
            })
        );
    }

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
