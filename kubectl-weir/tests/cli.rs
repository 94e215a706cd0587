//! The command line itself, run as users run it. Being an integration test of this package
//! also makes `cargo test --workspace` build the `kubectl-weir` binary, which the end-to-end
//! tests in `tests/tests/kubectl.rs` run.

use std::process::Command;

fn plugin(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-weir"))
        .args(args)
        .output()
        .expect("run kubectl-weir");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_lists_every_command_as_kubectl_weir() {
    let (code, out, _) = plugin(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("Usage: kubectl weir"), "{out}");
    for cmd in ["check", "explain", "agent", "top"] {
        assert!(
            out.lines().any(|l| l.trim_start().starts_with(cmd)),
            "{cmd} in\n{out}"
        );
    }
}

#[test]
fn a_header_without_a_colon_is_refused_before_anything_is_fetched() {
    let (code, _, err) = plugin(&[
        "--local",
        "--agent-admin",
        "http://127.0.0.1:1",
        "explain",
        "shop",
        "-H",
        "x-canary",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("header \"x-canary\" is not NAME:VALUE"),
        "{err}"
    );
}

#[test]
fn local_flags_reject_node_selection() {
    let (code, _, err) = plugin(&["--local", "explain", "shop", "--node", "n1"]);
    assert_eq!(code, 1);
    assert!(err.contains("--node is for cluster mode"), "{err}");
}
