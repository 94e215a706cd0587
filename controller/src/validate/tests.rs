//! Tests of policy validation: every field, every message.

use super::*;
use crate::model::{Failover, GrpcHealthCheck, HashOn, HeaderMatch, PathMatch};

fn backend(name: &str) -> BackendRef {
    BackendRef {
        name: name.to_owned(),
        port: Some(80),
        ..BackendRef::default()
    }
}

fn minimal() -> TrafficPolicySpec {
    TrafficPolicySpec {
        hosts: vec!["shop".to_owned()],
        rules: vec![Rule {
            matches: vec![],
            backend_refs: vec![backend("shop-v1")],
            mirror: None,
        }],
        ..TrafficPolicySpec::default()
    }
}

/// The errors of `spec`, which must be invalid.
fn errors(spec: &TrafficPolicySpec) -> Vec<String> {
    match validate(spec) {
        Ok(route) => panic!("expected errors, got {route:?}"),
        Err(errors) => errors,
    }
}

fn assert_single_error(spec: &TrafficPolicySpec, expected: &str) {
    assert_eq!(errors(spec), vec![expected.to_owned()]);
}

fn valid(spec: &TrafficPolicySpec) -> pb::Route {
    match validate(spec) {
        Ok(route) => route,
        Err(errors) => panic!("expected a valid spec, got {errors:?}"),
    }
}

#[test]
fn a_minimal_policy_gets_the_documented_defaults() {
    let route = valid(&minimal());
    assert_eq!(route.name, "");
    assert_eq!(route.hosts, ["shop"]);
    assert_eq!(
        route.load_balancer,
        Some(pb::LoadBalancer {
            algorithm: pb::Algorithm::RoundRobin as i32,
            hash_on: None,
            load_aware: false,
            hash_balance_factor: 0,
            slow_start_window_ms: 0,
            slow_start_min_percent: 0,
        })
    );
    assert_eq!(route.min_healthy_percent, DEFAULT_MIN_HEALTHY_PERCENT);
    let backend = &route.rules[0].backends[0];
    assert_eq!(
        (
            backend.service.as_str(),
            backend.port,
            backend.tier,
            backend.weight
        ),
        ("shop-v1", 80, 0, 1)
    );
    assert!(backend.endpoints.is_empty());
    assert_eq!(route.timeouts, None);
    assert_eq!(route.retry, None);
    assert_eq!(route.health_check, None);
    assert_eq!(route.outlier_detection, None);
    assert_eq!(route.cache, None);
}

#[test]
fn a_backend_without_port_gets_port_zero_for_resolution_to_fill_in() {
    let mut spec = minimal();
    spec.rules[0].backend_refs[0].port = None;
    assert_eq!(valid(&spec).rules[0].backends[0].port, 0);
}

#[test]
fn the_full_design_doc_example_normalises_every_field() {
    let spec: TrafficPolicySpec = serde_json::from_value(serde_json::json!({
        "hosts": ["Shop", "shop.default.svc"],
        "loadBalancer": {"algorithm": "RingHash", "hashOn": {"header": "X-User-Id"}},
        "rules": [
            {"matches": [{"method": "get"}, {"path": {"type": "Exact", "value": "/a"},
                          "headers": [{"name": "X-Canary", "value": "1"}]}],
             "backendRefs": [
                {"name": "shop-v1", "port": 80, "weight": 90},
                {"name": "shop-v2", "port": 80, "weight": 10},
                {"name": "shop-standby", "port": 80, "priority": 1}]},
            {"backendRefs": [{"name": "shop-primary", "port": 80}]}
        ],
        "failover": {"minHealthyPercent": 50},
        "healthCheck": {"path": "/healthz", "interval": "2s", "timeout": "1s",
                        "healthyThreshold": 2, "unhealthyThreshold": 3},
        "outlierDetection": {"consecutiveErrors": 5, "baseEjectionTime": "30s",
                             "maxEjectionPercent": 50},
        "retry": {"attempts": 2, "on": ["connect-failure", "reset", "503"],
                  "perTryTimeout": "1s", "budgetPercent": 20},
        "timeout": "15s",
        "cache": {"enabled": true, "maxSize": "64Mi", "staleWhileRevalidate": "10s",
                  "staleIfError": "5m"}
    }))
    .expect("the example parses");
    let route = valid(&spec);
    assert_eq!(route.hosts, ["shop", "shop.default.svc"]);
    assert_eq!(
        route.load_balancer,
        Some(pb::LoadBalancer {
            algorithm: pb::Algorithm::RingHash as i32,
            hash_on: Some(pb::HashOn {
                key: Some(pb::hash_on::Key::Header("x-user-id".to_owned()))
            }),
            load_aware: false,
            hash_balance_factor: 0,
            slow_start_window_ms: 0,
            slow_start_min_percent: 0,
        })
    );
    assert_eq!(route.rules.len(), 2);
    assert_eq!(route.rules[0].matches[0].method, "GET");
    assert_eq!(
        route.rules[0].matches[1].path,
        Some(pb::PathMatch {
            kind: pb::path_match::Kind::Exact as i32,
            value: "/a".to_owned()
        })
    );
    assert_eq!(route.rules[0].matches[1].headers[0].name, "x-canary");
    let tiers: Vec<(u32, u32)> = route.rules[0]
        .backends
        .iter()
        .map(|b| (b.weight, b.tier))
        .collect();
    assert_eq!(tiers, [(90, 0), (10, 0), (1, 1)]);
    assert_eq!(route.min_healthy_percent, 50);
    assert_eq!(
        route.timeouts,
        Some(pb::Timeouts {
            connect_ms: 0,
            request_ms: 15_000
        })
    );
    assert_eq!(
        route.health_check,
        Some(pb::HealthCheck {
            path: "/healthz".to_owned(),
            interval_ms: 2_000,
            timeout_ms: 1_000,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            grpc_service: None,
        })
    );
    assert_eq!(
        route.outlier_detection,
        Some(pb::OutlierDetection {
            consecutive_errors: 5,
            base_ejection_time_ms: 30_000,
            max_ejection_percent: 50
        })
    );
    assert_eq!(
        route.retry,
        Some(pb::RetryPolicy {
            attempts: 2,
            on: vec!["connect-failure".into(), "reset".into(), "503".into()],
            per_try_timeout_ms: 1_000,
            budget_percent: 20
        })
    );
    assert_eq!(
        route.cache,
        Some(pb::CachePolicy {
            enabled: true,
            max_size_bytes: 64 << 20,
            eviction: pb::Eviction::TinyLfu as i32,
            stale_while_revalidate_ms: 10_000,
            stale_if_error_ms: 300_000,
            disk_max_size_bytes: 0,
            shared: false,
            peers: false,
        })
    );
}

#[test]
fn cache_tiers_are_validated_with_field_paths() {
    let mut spec = minimal();
    spec.cache = Some(crate::model::Cache {
        enabled: true,
        max_size: Some("64Mi".into()),
        disk: Some(crate::model::CacheDisk {
            max_size: "1Gi".into(),
        }),
        shared: true,
        peers: true,
        ..Default::default()
    });
    let route = valid(&spec);
    let cache = route.cache.expect("cache");
    assert_eq!(
        (cache.disk_max_size_bytes, cache.shared, cache.peers),
        (1 << 30, true, true)
    );
    for (size, msg) in [
        ("0", "must be greater than 0"),
        ("1Mi", "smaller than spec.cache.maxSize"),
        ("lots", "spec.cache.disk.maxSize"),
    ] {
        let mut bad = spec.clone();
        if let Some(c) = bad.cache.as_mut() {
            c.disk = Some(crate::model::CacheDisk {
                max_size: size.into(),
            });
        }
        let errs = errors(&bad);
        assert!(
            errs.iter()
                .any(|e| e.contains("spec.cache.disk.maxSize") && e.contains(msg)),
            "{size}: {errs:?}"
        );
    }
}

#[test]
fn all_errors_are_reported_together() {
    let mut spec = minimal();
    spec.hosts.clear();
    spec.rules[0].backend_refs[0].weight = Some(-3);
    spec.timeout = Some("0s".to_owned());
    assert_eq!(
        errors(&spec),
        [
            "spec.hosts: must list at least one host name",
            "spec.rules[0].backendRefs[0].weight: must be >= 0, got -3",
            "spec.timeout: duration \"0s\" must be greater than 0",
        ]
    );
}

#[test]
fn hosts_are_lower_cased() {
    let mut spec = minimal();
    spec.hosts = vec!["Shop.Example.COM".to_owned()];
    assert_eq!(valid(&spec).hosts, ["shop.example.com"]);
}

#[test]
fn a_host_with_a_port_is_rejected() {
    let mut spec = minimal();
    spec.hosts = vec!["shop:80".to_owned()];
    assert_single_error(
        &spec,
        "spec.hosts[0]: host \"shop:80\" must not include a port (the port is ignored when matching)",
    );
}

#[test]
fn a_host_with_a_space_is_rejected() {
    let mut spec = minimal();
    spec.hosts = vec!["my shop".to_owned()];
    assert_single_error(
        &spec,
        "spec.hosts[0]: host \"my shop\" must not contain spaces",
    );
}

#[test]
fn a_wildcard_host_is_rejected() {
    let mut spec = minimal();
    spec.hosts = vec!["*.example.com".to_owned()];
    assert_single_error(
        &spec,
        "spec.hosts[0]: host \"*.example.com\": wildcards are not supported; list each host name",
    );
}

#[test]
fn hosts_that_are_not_dns_names_are_rejected() {
    for bad in [
        "sh_op",
        "-shop",
        "shop.",
        "a..b",
        "http://shop",
        "[::1]",
        "::1",
        "",
    ] {
        let mut spec = minimal();
        spec.hosts = vec![bad.to_owned()];
        let errs = errors(&spec);
        assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
        assert!(
            errs[0].starts_with("spec.hosts[0]: host"),
            "{bad}: {errs:?}"
        );
    }
    let mut spec = minimal();
    spec.hosts = vec!["a".repeat(64)];
    assert_eq!(errors(&spec).len(), 1);
}

#[test]
fn a_host_listed_twice_is_rejected() {
    let mut spec = minimal();
    spec.hosts = vec!["shop".to_owned(), "SHOP".to_owned()];
    assert_single_error(
        &spec,
        "spec.hosts[1]: host \"shop\" is listed twice (also spec.hosts[0])",
    );
}

#[test]
fn a_policy_needs_a_rule() {
    let mut spec = minimal();
    spec.rules.clear();
    assert_single_error(
        &spec,
        "spec.rules: must have at least one rule with backendRefs",
    );
}

#[test]
fn a_rule_needs_a_backend() {
    let mut spec = minimal();
    spec.rules[0].backend_refs.clear();
    assert_single_error(
        &spec,
        "spec.rules[0].backendRefs: must list at least one backend",
    );
}

#[test]
fn a_backend_needs_a_service_name() {
    let mut spec = minimal();
    spec.rules[0].backend_refs[0].name = String::new();
    assert_single_error(
        &spec,
        "spec.rules[0].backendRefs[0].name: must name a Service",
    );
    spec.rules[0].backend_refs[0].name = "Shop_V1".to_owned();
    assert_eq!(errors(&spec).len(), 1);
}

#[test]
fn a_service_port_listed_twice_in_one_rule_is_rejected() {
    let mut spec = minimal();
    spec.rules[0].backend_refs.push(backend("shop-v1"));
    assert_single_error(
        &spec,
        "spec.rules[0].backendRefs[1]: Service \"shop-v1\" is already listed as \
         backendRefs[0]; use one entry and combine the weights",
    );
}

#[test]
fn weight_must_be_between_zero_and_a_million() {
    let mut spec = minimal();
    spec.rules.push(Rule {
        matches: vec![],
        backend_refs: vec![BackendRef {
            weight: Some(-3),
            ..backend("b")
        }],
        mirror: None,
    });
    assert_single_error(
        &spec,
        "spec.rules[1].backendRefs[0].weight: must be >= 0, got -3",
    );
    spec.rules[1].backend_refs[0].weight = Some(MAX_WEIGHT + 1);
    assert_single_error(
        &spec,
        "spec.rules[1].backendRefs[0].weight: must be <= 1000000, got 1000001",
    );
}

#[test]
fn a_rule_whose_backends_all_weigh_zero_is_valid_and_drains() {
    let mut spec = minimal();
    spec.rules[0].backend_refs[0].weight = Some(0);
    assert_eq!(valid(&spec).rules[0].backends[0].weight, 0);
}

#[test]
fn priority_must_be_a_tier_from_0_to_15() {
    let mut spec = minimal();
    spec.rules[0].backend_refs[0].priority = Some(16);
    assert_single_error(
        &spec,
        "spec.rules[0].backendRefs[0].priority: must be <= 15, got 16",
    );
    spec.rules[0].backend_refs[0].priority = Some(15);
    assert_eq!(valid(&spec).rules[0].backends[0].tier, 15);
}

#[test]
fn port_must_be_a_tcp_port() {
    let mut spec = minimal();
    spec.rules[0].backend_refs[0].port = Some(0);
    assert_single_error(
        &spec,
        "spec.rules[0].backendRefs[0].port: must be >= 1, got 0",
    );
    spec.rules[0].backend_refs[0].port = Some(65536);
    assert_single_error(
        &spec,
        "spec.rules[0].backendRefs[0].port: must be <= 65535, got 65536",
    );
}

#[test]
fn an_unknown_algorithm_lists_the_known_ones() {
    let mut spec = minimal();
    spec.load_balancer = Some(LoadBalancer {
        algorithm: Some("Fastest".to_owned()),
        ..LoadBalancer::default()
    });
    assert_single_error(
        &spec,
        "spec.loadBalancer.algorithm: unknown algorithm \"Fastest\"; expected one of \
         RoundRobin, WeightedRoundRobin, LeastRequest, PeakEwma, RingHash, Maglev, Random",
    );
}

#[test]
fn every_documented_algorithm_is_accepted() {
    for (name, algorithm) in ALGORITHMS {
        let mut spec = minimal();
        spec.load_balancer = Some(LoadBalancer {
            algorithm: Some(name.to_owned()),
            hash_on: Some(HashOn {
                path: Some(true),
                ..HashOn::default()
            }),
            load_aware: None,
            hash_balance_factor: None,
            slow_start: None,
        });
        let lb = valid(&spec).load_balancer.expect("always set");
        assert_eq!(lb.algorithm, algorithm as i32);
    }
}

#[test]
fn consistent_hashing_needs_a_hash_key() {
    for name in ["RingHash", "Maglev"] {
        let mut spec = minimal();
        spec.load_balancer = Some(LoadBalancer {
            algorithm: Some(name.to_owned()),
            ..LoadBalancer::default()
        });
        assert_single_error(
            &spec,
            &format!(
                "spec.loadBalancer.hashOn: algorithm {name} needs hashOn with one of header, \
                 cookie or path"
            ),
        );
    }
}

#[test]
fn hash_on_takes_exactly_one_key() {
    let mut spec = minimal();
    spec.load_balancer = Some(LoadBalancer {
        algorithm: Some("Maglev".to_owned()),
        hash_on: Some(HashOn {
            header: Some("x-user".to_owned()),
            cookie: Some("session".to_owned()),
            path: None,
        }),
        ..LoadBalancer::default()
    });
    assert_single_error(
        &spec,
        "spec.loadBalancer.hashOn: set exactly one of header, cookie or path (got header, cookie)",
    );
    spec.load_balancer = Some(LoadBalancer {
        algorithm: None,
        hash_on: Some(HashOn {
            path: Some(false),
            ..HashOn::default()
        }),
        ..LoadBalancer::default()
    });
    assert_single_error(
        &spec,
        "spec.loadBalancer.hashOn: set exactly one of header, cookie or path (got none)",
    );
}

#[test]
fn hash_keys_must_be_valid_names() {
    let mut spec = minimal();
    spec.load_balancer = Some(LoadBalancer {
        algorithm: Some("RingHash".to_owned()),
        hash_on: Some(HashOn {
            header: Some("x user".to_owned()),
            ..HashOn::default()
        }),
        ..LoadBalancer::default()
    });
    assert_single_error(
        &spec,
        "spec.loadBalancer.hashOn.header: \"x user\" is not a valid HTTP header name",
    );
    spec.load_balancer = Some(LoadBalancer {
        algorithm: Some("RingHash".to_owned()),
        hash_on: Some(HashOn {
            cookie: Some("a=b".to_owned()),
            ..HashOn::default()
        }),
        ..LoadBalancer::default()
    });
    assert_single_error(
        &spec,
        "spec.loadBalancer.hashOn.cookie: \"a=b\" is not a valid cookie name",
    );
}

fn with_match(m: Match) -> TrafficPolicySpec {
    let mut spec = minimal();
    spec.rules[0].matches = vec![m];
    spec
}

#[test]
fn methods_are_upper_cased_tokens() {
    let spec = with_match(Match {
        method: Some("purge".to_owned()),
        ..Match::default()
    });
    assert_eq!(valid(&spec).rules[0].matches[0].method, "PURGE");
    let spec = with_match(Match {
        method: Some("GET POST".to_owned()),
        ..Match::default()
    });
    assert_single_error(
        &spec,
        "spec.rules[0].matches[0].method: \"GET POST\" is not an HTTP method",
    );
}

#[test]
fn path_matches_default_to_prefix_and_must_start_with_a_slash() {
    let spec = with_match(Match {
        path: Some(PathMatch {
            kind: None,
            value: "/api".to_owned(),
        }),
        ..Match::default()
    });
    let path = valid(&spec).rules[0].matches[0].path.clone();
    assert_eq!(
        path.map(|p| p.kind),
        Some(pb::path_match::Kind::Prefix as i32)
    );
    let spec = with_match(Match {
        path: Some(PathMatch {
            kind: Some("Regex".to_owned()),
            value: "api".to_owned(),
        }),
        ..Match::default()
    });
    assert_eq!(
        errors(&spec),
        [
            "spec.rules[0].matches[0].path.type: unknown path match type \"Regex\"; \
             expected PathPrefix or Exact",
            "spec.rules[0].matches[0].path.value: path \"api\" must start with '/'",
        ]
    );
}

#[test]
fn header_match_names_are_lower_cased_and_checked() {
    let spec = with_match(Match {
        headers: vec![HeaderMatch {
            name: "X-Env".to_owned(),
            value: "Canary".to_owned(),
        }],
        ..Match::default()
    });
    let header = &valid(&spec).rules[0].matches[0].headers[0];
    assert_eq!(
        (header.name.as_str(), header.value.as_str()),
        ("x-env", "Canary")
    );
    let spec = with_match(Match {
        headers: vec![HeaderMatch {
            name: "x:env".to_owned(),
            value: "a\r\nb".to_owned(),
        }],
        ..Match::default()
    });
    assert_eq!(
        errors(&spec),
        [
            "spec.rules[0].matches[0].headers[0].name: \"x:env\" is not a valid HTTP header name",
            "spec.rules[0].matches[0].headers[0].value: must not contain control characters \
             such as CR or LF",
        ]
    );
}

#[test]
fn min_healthy_percent_is_between_1_and_100() {
    let mut spec = minimal();
    spec.failover = Some(Failover {
        min_healthy_percent: Some(0),
    });
    assert_single_error(
        &spec,
        "spec.failover.minHealthyPercent: must be >= 1, got 0",
    );
    spec.failover = Some(Failover {
        min_healthy_percent: Some(101),
    });
    assert_single_error(
        &spec,
        "spec.failover.minHealthyPercent: must be <= 100, got 101",
    );
    spec.failover = Some(Failover {
        min_healthy_percent: None,
    });
    assert_eq!(valid(&spec).min_healthy_percent, 70);
}

#[test]
fn durations_must_parse_and_be_positive() {
    let mut spec = minimal();
    spec.timeout = Some("15".to_owned());
    let errs = errors(&spec);
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("spec.timeout: invalid duration \"15\""),
        "{errs:?}"
    );
    spec.timeout = Some("1m 30s".to_owned());
    assert_eq!(valid(&spec).timeouts.map(|t| t.request_ms), Some(90_000));
    spec.timeout = Some("500us".to_owned());
    assert_eq!(valid(&spec).timeouts.map(|t| t.request_ms), Some(1));
}

#[test]
fn every_duration_field_is_checked() {
    let mut spec = minimal();
    spec.health_check = Some(HealthCheck {
        interval: Some("0ms".to_owned()),
        timeout: Some("soon".to_owned()),
        ..HealthCheck::default()
    });
    spec.outlier_detection = Some(OutlierDetection {
        base_ejection_time: Some("0s".to_owned()),
        ..OutlierDetection::default()
    });
    spec.retry = Some(Retry {
        per_try_timeout: Some("-1s".to_owned()),
        ..Retry::default()
    });
    spec.cache = Some(Cache {
        stale_while_revalidate: Some("0s".to_owned()),
        stale_if_error: Some("x".to_owned()),
        ..Cache::default()
    });
    let fields: Vec<String> = errors(&spec)
        .iter()
        .map(|e| e.split(':').next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        fields,
        [
            "spec.retry.perTryTimeout",
            "spec.healthCheck.interval",
            "spec.healthCheck.timeout",
            "spec.outlierDetection.baseEjectionTime",
            "spec.cache.staleWhileRevalidate",
            "spec.cache.staleIfError",
        ]
    );
}

#[test]
fn health_check_thresholds_are_at_least_one_and_paths_start_with_a_slash() {
    let mut spec = minimal();
    spec.health_check = Some(HealthCheck {
        path: Some("healthz".to_owned()),
        healthy_threshold: Some(0),
        unhealthy_threshold: Some(-1),
        ..HealthCheck::default()
    });
    assert_eq!(
        errors(&spec),
        [
            "spec.healthCheck.path: path \"healthz\" must start with '/'",
            "spec.healthCheck.healthyThreshold: must be >= 1, got 0",
            "spec.healthCheck.unhealthyThreshold: must be >= 1, got -1",
        ]
    );
}

#[test]
fn a_grpc_health_check_maps_to_grpc_service_and_excludes_a_path() {
    let mut spec = minimal();
    spec.health_check = Some(HealthCheck {
        grpc: Some(GrpcHealthCheck {
            service: "shop.v1.Shop".to_owned(),
        }),
        ..HealthCheck::default()
    });
    let check = valid(&spec).health_check.expect("set");
    assert_eq!(check.grpc_service.as_deref(), Some("shop.v1.Shop"));
    assert_eq!(check.path, "");
    spec.health_check = Some(HealthCheck {
        path: Some("/healthz".to_owned()),
        grpc: Some(GrpcHealthCheck::default()),
        ..HealthCheck::default()
    });
    assert_single_error(
        &spec,
        "spec.healthCheck: set either path (HTTP check) or grpc (gRPC health check), not both",
    );
}

#[test]
fn outlier_detection_bounds_are_checked() {
    let mut spec = minimal();
    spec.outlier_detection = Some(OutlierDetection {
        consecutive_errors: Some(0),
        max_ejection_percent: Some(101),
        base_ejection_time: None,
    });
    assert_eq!(
        errors(&spec),
        [
            "spec.outlierDetection.consecutiveErrors: must be >= 1, got 0",
            "spec.outlierDetection.maxEjectionPercent: must be <= 100, got 101",
        ]
    );
}

#[test]
fn retry_bounds_and_conditions_are_checked() {
    let mut spec = minimal();
    spec.retry = Some(Retry {
        attempts: Some(11),
        budget_percent: Some(-1),
        on: vec![
            "503".into(),
            "5xx".into(),
            "unavailable".into(),
            "404".into(),
            "always".into(),
        ],
        per_try_timeout: None,
    });
    let errs = errors(&spec);
    assert_eq!(errs.len(), 4, "{errs:?}");
    assert_eq!(errs[0], "spec.retry.attempts: must be <= 10, got 11");
    assert_eq!(errs[1], "spec.retry.budgetPercent: must be >= 0, got -1");
    assert!(errs[2].starts_with("spec.retry.on[3]: unknown retry condition \"404\""));
    assert!(errs[3].starts_with("spec.retry.on[4]: unknown retry condition \"always\""));
}

#[test]
fn every_documented_retry_condition_is_accepted() {
    let mut spec = minimal();
    let mut on: Vec<String> = RETRY_CONDITIONS.iter().map(|s| (*s).to_owned()).collect();
    on.extend(["500".to_owned(), "599".to_owned()]);
    spec.retry = Some(Retry {
        on: on.clone(),
        ..Retry::default()
    });
    assert_eq!(valid(&spec).retry.map(|r| r.on), Some(on));
}

#[test]
fn cache_sizes_are_kubernetes_quantities() {
    assert_eq!(parse_quantity("64Mi"), Ok(64 << 20));
    assert_eq!(parse_quantity("1Gi"), Ok(1 << 30));
    assert_eq!(parse_quantity("500M"), Ok(500_000_000));
    assert_eq!(parse_quantity("1000"), Ok(1000));
    assert_eq!(parse_quantity("1.5Gi"), Ok(1_610_612_736));
    assert_eq!(parse_quantity("1k"), Ok(1000));
    assert_eq!(parse_quantity("1e3"), Ok(1000));
    assert_eq!(parse_quantity("0.5"), Ok(1));
    for bad in [
        "", "Mi", "-1Mi", "1.2.3", "10mb", "0", "500m", "1e40", "99999Ei",
    ] {
        assert!(parse_quantity(bad).is_err(), "{bad} should be rejected");
    }
}

#[test]
fn cache_eviction_defaults_to_tiny_lfu_and_must_be_known() {
    let mut spec = minimal();
    spec.cache = Some(Cache {
        enabled: true,
        max_size: Some("1Gi".to_owned()),
        ..Cache::default()
    });
    let cache = valid(&spec).cache.expect("set");
    assert_eq!(
        (cache.eviction(), cache.max_size_bytes),
        (pb::Eviction::TinyLfu, 1 << 30)
    );
    spec.cache = Some(Cache {
        eviction: Some("Random".to_owned()),
        max_size: Some("lots".to_owned()),
        ..Cache::default()
    });
    let errs = errors(&spec);
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(errs[0].starts_with("spec.cache.maxSize: invalid size \"lots\""));
    assert_eq!(
        errs[1],
        "spec.cache.eviction: unknown eviction policy \"Random\"; expected one of Lru, Lfu, \
         Fifo, TinyLfu"
    );
}

#[test]
fn load_aware_weights_are_off_by_default_and_refused_with_consistent_hashing() {
    let mut spec = minimal();
    assert!(!valid(&spec).load_balancer.expect("set").load_aware);
    spec.load_balancer = Some(LoadBalancer {
        load_aware: Some(true),
        ..LoadBalancer::default()
    });
    assert!(valid(&spec).load_balancer.expect("set").load_aware);
    spec.load_balancer = Some(LoadBalancer {
        algorithm: Some("Maglev".to_owned()),
        hash_on: Some(HashOn {
            header: Some("x-user".to_owned()),
            ..HashOn::default()
        }),
        load_aware: Some(true),
        hash_balance_factor: None,
        slow_start: None,
    });
    let errs = errors(&spec);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].starts_with("spec.loadBalancer.loadAware: cannot be combined"));
}

#[test]
fn hash_balance_factor_is_checked_and_needs_consistent_hashing() {
    let hashing = |algorithm: &str, factor: Option<u32>| {
        let mut spec = minimal();
        spec.load_balancer = Some(LoadBalancer {
            algorithm: Some(algorithm.to_owned()),
            hash_on: Some(HashOn {
                header: Some("x-user".to_owned()),
                ..HashOn::default()
            }),
            hash_balance_factor: factor,
            ..LoadBalancer::default()
        });
        spec
    };
    // Off unless set.
    let lb = valid(&hashing("RingHash", None))
        .load_balancer
        .expect("set");
    assert_eq!(lb.hash_balance_factor, 0);
    for algorithm in ["RingHash", "Maglev"] {
        for f in [101, 125, 1000] {
            let lb = valid(&hashing(algorithm, Some(f)))
                .load_balancer
                .expect("set");
            assert_eq!(lb.hash_balance_factor, f);
        }
        for f in [0, 50, 100, 1001] {
            assert_single_error(
                &hashing(algorithm, Some(f)),
                &format!(
                    "spec.loadBalancer.hashBalanceFactor: {f} is out of range: a percent of the \
                     mean load from 101 to 1000 (125 caps every endpoint at 1.25 x the mean; 100 \
                     or less would leave no room to hash at all)"
                ),
            );
        }
    }
    let mut spec = minimal();
    spec.load_balancer = Some(LoadBalancer {
        algorithm: Some("LeastRequest".to_owned()),
        hash_balance_factor: Some(125),
        ..LoadBalancer::default()
    });
    assert_single_error(
        &spec,
        "spec.loadBalancer.hashBalanceFactor: 125 is set but only applies to RingHash and Maglev \
         (bounded-load consistent hashing); remove it or choose one of those algorithms",
    );
}

#[test]
fn slow_start_is_checked_and_refused_with_consistent_hashing() {
    let with = |algorithm: &str, window: &str, min: Option<u32>| {
        let mut spec = minimal();
        spec.load_balancer = Some(LoadBalancer {
            algorithm: Some(algorithm.to_owned()),
            slow_start: Some(SlowStart {
                window: window.to_owned(),
                min_weight_percent: min,
            }),
            ..LoadBalancer::default()
        });
        spec
    };
    let lb = valid(&minimal()).load_balancer.expect("set");
    assert_eq!((lb.slow_start_window_ms, lb.slow_start_min_percent), (0, 0));
    for algorithm in [
        "RoundRobin",
        "WeightedRoundRobin",
        "LeastRequest",
        "PeakEwma",
        "Random",
    ] {
        let lb = valid(&with(algorithm, "30s", None))
            .load_balancer
            .expect("set");
        assert_eq!(
            (lb.slow_start_window_ms, lb.slow_start_min_percent),
            (30_000, 10)
        );
    }
    for (window, ms) in [("1s", 1_000), ("1m 30s", 90_000), ("10m", 600_000)] {
        let lb = valid(&with("RoundRobin", window, Some(100)))
            .load_balancer
            .expect("set");
        assert_eq!(
            (lb.slow_start_window_ms, lb.slow_start_min_percent),
            (ms, 100)
        );
    }
    for window in ["999ms", "11m"] {
        assert_single_error(
            &with("RoundRobin", window, Some(1)),
            &format!(
                "spec.loadBalancer.slowStart.window: {window:?} is out of range: from 1 s to 10 \
                 min (the time a new endpoint takes to reach its full weight)"
            ),
        );
    }
    let errs = errors(&with("RoundRobin", "soon", None));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].starts_with("spec.loadBalancer.slowStart.window: invalid duration"));
    for min in [0, 101] {
        assert_single_error(
            &with("RoundRobin", "30s", Some(min)),
            &format!(
                "spec.loadBalancer.slowStart.minWeightPercent: {min} is out of range: the \
                 percent of its weight a warming endpoint starts with, from 1 to 100 (0 would \
                 leave it no traffic to warm up on)"
            ),
        );
    }
    for algorithm in ["RingHash", "Maglev"] {
        let mut spec = with(algorithm, "30s", None);
        if let Some(lb) = spec.load_balancer.as_mut() {
            lb.hash_on = Some(HashOn {
                path: Some(true),
                ..HashOn::default()
            });
        }
        assert_single_error(
            &spec,
            "spec.loadBalancer.slowStart: cannot be combined with RingHash or Maglev: weights \
             that ramp up would move keys between endpoints during every warm-up",
        );
    }
}

#[test]
fn rate_limit_is_checked_and_burst_defaults_to_the_rate() {
    let with = |rps: i64, burst: Option<i64>| {
        let mut spec = minimal();
        spec.rate_limit = Some(RateLimit {
            requests_per_second: rps,
            burst,
        });
        spec
    };
    assert_eq!(valid(&minimal()).rate_limit, None);
    let r = valid(&with(100, None)).rate_limit.expect("set");
    assert_eq!((r.requests_per_second, r.burst), (100, 100));
    let r = valid(&with(5, Some(50))).rate_limit.expect("set");
    assert_eq!((r.requests_per_second, r.burst), (5, 50));
    assert_single_error(
        &with(0, None),
        "spec.rateLimit.requestsPerSecond: must be >= 1, got 0",
    );
    assert_single_error(
        &with(1_000_001, None),
        "spec.rateLimit.requestsPerSecond: must be <= 1000000, got 1000001",
    );
    assert_single_error(
        &with(10, Some(0)),
        "spec.rateLimit.burst: must be >= 1, got 0",
    );
}

#[test]
fn a_mirror_names_a_service_and_a_percent() {
    let with = |name: &str, port: Option<i32>, percent: Option<i64>| {
        let mut spec = minimal();
        spec.rules[0].mirror = Some(Mirror {
            backend_ref: crate::model::MirrorRef {
                name: name.to_owned(),
                port,
            },
            percent,
        });
        spec
    };
    assert_eq!(valid(&minimal()).rules[0].mirror, None);
    let m = valid(&with("shop-shadow", Some(8080), None)).rules[0]
        .mirror
        .clone()
        .expect("set");
    assert_eq!(m.percent, 100);
    let b = m.backend.expect("backend");
    assert_eq!((b.service.as_str(), b.port), ("shop-shadow", 8080));
    let m = valid(&with("shop-shadow", None, Some(5))).rules[0]
        .mirror
        .clone()
        .expect("set");
    assert_eq!((m.percent, m.backend.expect("backend").port), (5, 0));
    assert_single_error(
        &with("shop-shadow", None, Some(0)),
        "spec.rules[0].mirror.percent: must be >= 1, got 0",
    );
    assert_single_error(
        &with("shop-shadow", None, Some(101)),
        "spec.rules[0].mirror.percent: must be <= 100, got 101",
    );
    assert_single_error(
        &with("Shop_Shadow", None, None),
        "spec.rules[0].mirror.backendRef.name: \"Shop_Shadow\" is not a Service name \
         (lower-case letters, digits and '-', at most 63 characters)",
    );
    assert_single_error(
        &with("", None, None),
        "spec.rules[0].mirror.backendRef.name: must name a Service",
    );
}

#[test]
fn retry_on_accepts_429() {
    let mut spec = minimal();
    spec.retry = Some(Retry {
        on: vec!["429".to_owned(), "503".to_owned()],
        ..Retry::default()
    });
    assert_eq!(
        valid(&spec).retry.expect("set").on,
        vec!["429".to_owned(), "503".to_owned()]
    );
}
