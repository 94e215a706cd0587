//! The controller binary's command line: failures at start-up are clear and exit non-zero.
//! (Also makes `cargo test` build the binary the e2e tests run.)

use std::process::Command;

#[test]
fn controller_refuses_a_config_dir_that_does_not_exist() {
    let out = Command::new(env!("CARGO_BIN_EXE_weir-controller"))
        .args([
            "--config-dir",
            "/nonexistent/weir-config",
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .output()
        .expect("run weir-controller");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read --config-dir /nonexistent/weir-config"),
        "{err}"
    );
}
