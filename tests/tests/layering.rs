//! The layering of the controller and the agent, checked: each crate's top-level modules are
//! listed from the bottom layer up, and no module may name (`crate::x`) a module of a layer
//! above its own. Comments are skipped, since documentation may point anywhere. A new
//! top-level module must be placed in the list, so the order stays a decision, not an
//! accident.

use std::path::{Path, PathBuf};

/// Modules from the bottom up; modules on one line (a slice) share a layer.
const CONTROLLER: &[&[&str]] = &[
    &["model"],
    &["validate"],
    &["routing"],
    &["serve"],
    &["source"],
    &["k8s"],
];

const AGENT: &[&[&str]] = &[
    &["http"],
    &["metrics", "balance", "cache", "observe"],
    &["health", "upstream"],
    &["route"],
    &["listen", "control"],
    &["admin"],
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The `crate::x` names in a file's code (not its comments).
fn crate_refs(text: &str) -> Vec<String> {
    let mut refs = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // `use crate::{a::b, c};` on one line.
                let inner = group.split('}').next().unwrap_or("");
                for part in inner.split(',') {
                    refs.push(ident(part.trim()));
                }
            } else {
                refs.push(ident(rest));
            }
        }
    }
    refs.retain(|r| !r.is_empty());
    refs
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

fn check(crate_dir: &str, layers: &[&[&str]]) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(crate_dir)
        .join("src");
    let layer_of = |module: &str| layers.iter().position(|l| l.contains(&module));
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut upward = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let top = rel
            .components()
            .next()
            .map(|c| {
                c.as_os_str()
                    .to_string_lossy()
                    .trim_end_matches(".rs")
                    .to_string()
            })
            .unwrap_or_default();
        if matches!(top.as_str(), "lib" | "main" | "bin") {
            continue;
        }
        let Some(own) = layer_of(&top) else {
            panic!("{crate_dir}: module {top} is in no layer of tests/tests/layering.rs");
        };
        let text = std::fs::read_to_string(&file).expect("read source");
        for r in crate_refs(&text) {
            if let Some(theirs) = layer_of(&r)
                && theirs > own
            {
                upward.push(format!("{}: crate::{r}", rel.display()));
            }
        }
    }
    assert!(upward.is_empty(), "{crate_dir} imports upward: {upward:#?}");
}

#[test]
fn the_controller_only_imports_downward() {
    check("controller", CONTROLLER);
}

#[test]
fn the_agent_only_imports_downward() {
    check("agent", AGENT);
}

#[test]
fn the_reference_scanner_sees_grouped_and_plain_paths_but_not_comments() {
    let refs =
        crate_refs("use crate::{serve::hub, model};\nlet x = crate::routing::f(); // crate::k8s");
    assert_eq!(refs, ["serve", "model", "routing"]);
}
