//! The quickstart's own manifests (`examples/quickstart/`) on real processes: what the README
//! and `cargo quickstart` tell a new user to try must keep working. The cache demo: the first
//! answer is a MISS, the next a HIT with `Age` (the same numbered answer), and once the
//! origin's `max-age` runs out the origin answers again.

use std::path::PathBuf;
use weir_tests::backend::Backend;
use weir_tests::{Agent, Controller, get, http_client, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_cache_demo_shows_miss_hit_and_expiry() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
    // The catalog Service's one endpoint, as examples/quickstart/services.yaml lists it.
    let catalog = Backend::start("127.0.0.41:9084".parse().expect("addr"), "catalog")
        .await
        .expect("catalog backend");
    let controller = Controller::start(&dir).await.expect("controller");
    let agent = Agent::start(&controller.url(), None).await.expect("agent");
    agent.wait_ready().await;
    let client = http_client();

    let first = get(&client, agent.listen, "catalog", "/item/1?max-age=1")
        .await
        .expect("first request");
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.headers["x-cache"], "MISS");
    assert!(first.body.contains("request #1"), "{}", first.body);

    let second = get(&client, agent.listen, "catalog", "/item/1?max-age=1")
        .await
        .expect("second request");
    assert_eq!(second.headers["x-cache"], "HIT");
    assert!(second.headers.contains_key("age"), "{:?}", second.headers);
    assert_eq!(second.body, first.body, "the stored answer");
    assert_eq!(catalog.hits(), 1, "the origin saw one request");

    // max-age=1: the copy expires and the origin answers again.
    let fresh = wait_for("the cached copy to expire", || async {
        let got = get(&client, agent.listen, "catalog", "/item/1?max-age=1")
            .await
            .ok()?;
        (got.headers["x-cache"] != "HIT").then_some(got)
    })
    .await;
    assert!(!fresh.body.contains("request #1"), "{}", fresh.body);
    assert!(catalog.hits() >= 2);
}
