//! The agent binary's command line: failures at start-up are clear and exit non-zero.
//! (Also makes `cargo test` build the binary the e2e tests run.)

use std::process::Command;

#[test]
fn agent_refuses_a_listen_address_in_use_with_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("admin port");
    let out = Command::new(env!("CARGO_BIN_EXE_weir-agent"))
        .args([
            "--listen",
            &addr.to_string(),
            "--admin-addr",
            &admin.to_string(),
        ])
        .output()
        .expect("run weir-agent");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen on --listen"), "{err}");
}

#[test]
fn agent_rejects_unknown_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_weir-agent"))
        .arg("--no-such-flag")
        .output()
        .expect("run weir-agent");
    assert!(!out.status.success());
}

#[test]
fn a_second_agent_cannot_share_the_listen_address_of_a_running_one() {
    let port = |_| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .to_string()
    };
    let (listen, admin1, admin2) = (port(0), port(1), port(2));
    let mut first = Command::new(env!("CARGO_BIN_EXE_weir-agent"))
        .args([
            "--listen",
            &listen,
            "--admin-addr",
            &admin1,
            "--controller",
            "http://127.0.0.1:1",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run first agent");
    // Wait until the first agent listens (its admin API answers once workers are bound).
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(&admin1).is_err() {
        assert!(start.elapsed().as_secs() < 30, "first agent did not start");
        std::thread::yield_now();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_weir-agent"))
        .args(["--listen", &listen, "--admin-addr", &admin2])
        .output()
        .expect("run second agent");
    let _ = first.kill();
    let _ = first.wait();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen on --listen"), "{err}");
}
