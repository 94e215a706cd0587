//! Which route and rule a request would get, decided exactly as the agent decides it
//! (`agent/src/http/headers.rs` `normalize_host`, `agent/src/route/matcher.rs`,
//! `RuleRt::matches`), but over the JSON of `/config` and saying *why* each rule does or
//! does not match.
//!
//! A port rather than a shared crate: the agent's matcher works on its hot-path types
//! (`http::Method`, `HeaderMap`, pre-built `MatchRt`) and the house rule is that the agent
//! shares only `weir-proto`. The unit tests below replay the agent's own cases.

use crate::contract::{Match, Route, Rule};

/// A request to explain.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    /// As the client sends it in Host; normalised by [`normalize_host`].
    pub host: String,
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// `(name, value)`; names compare case-insensitively, values exactly.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// Builds a request from command-line input: the method upper-cased (the agent compares
    /// methods exactly and clients send them upper-case), the query dropped (the agent
    /// matches `uri.path()`), a missing leading `/` added.
    pub(crate) fn from_cli(host: &str, path: Option<&str>, method: Option<&str>) -> Self {
        let path = path.unwrap_or("/");
        let path = path.split(['?', '#']).next().unwrap_or("");
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        Self {
            host: host.to_string(),
            method: method.unwrap_or("GET").to_ascii_uppercase(),
            path,
            headers: Vec::new(),
        }
    }
}

/// The host part of a Host value, lower-cased, without port, userinfo or a trailing dot;
/// `None` where the agent would answer 400 (empty, too long, or odd characters).
pub(crate) fn normalize_host(raw: &str) -> Option<String> {
    let raw = raw.rsplit_once('@').map_or(raw, |(_, h)| h);
    let host = if raw.starts_with('[') {
        &raw[..=raw.find(']')?]
    } else {
        raw.split(':').next().unwrap_or("")
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    // The agent's buffer is 256 bytes.
    if host.is_empty() || host.len() > 256 {
        return None;
    }
    host.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'[' | b']' | b':'))
        .then(|| host.to_ascii_lowercase())
}

/// The route that serves `host` (already normalised): the agent keys routes by their
/// lower-cased hosts.
pub(crate) fn route_for<'r>(routes: &'r [Route], host: &str) -> Option<&'r Route> {
    routes
        .iter()
        .find(|r| r.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)))
}

/// Why one match of a rule does or does not fit the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Fits,
    Method {
        want: String,
    },
    Path {
        kind: &'static str,
        want: String,
    },
    Header {
        name: String,
        want: String,
    },
    /// A match the agent would have refused to build (it NACKs such tables).
    Invalid(String),
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Fits => write!(f, "fits"),
            Verdict::Method { want } => write!(f, "method is not {want}"),
            Verdict::Path { kind, want } => write!(f, "path does not match {kind} {want}"),
            Verdict::Header { name, want } => write!(f, "header {name} is not {want:?}"),
            Verdict::Invalid(why) => write!(f, "invalid match: {why}"),
        }
    }
}

/// Whether `m` fits `req`, checked in the agent's order (method, path, headers).
pub(crate) fn check_match(m: &Match, req: &Request) -> Verdict {
    if let Some(want) = m.method.as_deref().filter(|s| !s.is_empty())
        && want != req.method
    {
        return Verdict::Method { want: want.into() };
    }
    if let Some(p) = &m.path {
        if !p.value.starts_with('/') {
            return Verdict::Invalid(format!("path {:?} does not start with /", p.value));
        }
        let fits = match p.kind.as_str() {
            "EXACT" => req.path == p.value,
            "PREFIX" => {
                // "/api/" and "/api" mean the same prefix; whole segments only, so /api
                // matches /api and /api/x but not /apix (Gateway API semantics).
                let v = p.value.trim_end_matches('/');
                req.path.starts_with(v)
                    && matches!(req.path.as_bytes().get(v.len()), None | Some(b'/'))
            }
            other => return Verdict::Invalid(format!("unknown path match kind {other}")),
        };
        if !fits {
            return Verdict::Path {
                kind: path_kind_name(&p.kind),
                want: p.value.clone(),
            };
        }
    }
    for h in &m.headers {
        let present = req
            .headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case(&h.name) && *v == h.value);
        if !present {
            return Verdict::Header {
                name: h.name.to_ascii_lowercase(),
                want: h.value.clone(),
            };
        }
    }
    Verdict::Fits
}

/// The Gateway API name of a path match kind, as users write it in the policy.
pub(crate) fn path_kind_name(kind: &str) -> &'static str {
    match kind {
        "EXACT" => "Exact",
        "PREFIX" => "PathPrefix",
        _ => "?",
    }
}

/// How a rule fared: the index of the match that fits (`None` with no matches at all, which
/// matches everything), or every match's verdict when none fits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RuleOutcome {
    MatchesAll,
    Matches(usize),
    NoMatch(Vec<Verdict>),
}

/// A rule matches when it has no matches or any of its matches fits.
pub(crate) fn check_rule(rule: &Rule, req: &Request) -> RuleOutcome {
    if rule.matches.is_empty() {
        return RuleOutcome::MatchesAll;
    }
    let mut verdicts = Vec::with_capacity(rule.matches.len());
    for (i, m) in rule.matches.iter().enumerate() {
        match check_match(m, req) {
            Verdict::Fits => return RuleOutcome::Matches(i),
            v => verdicts.push(v),
        }
    }
    RuleOutcome::NoMatch(verdicts)
}

/// Every rule's outcome up to and including the first that matches (first match wins).
pub(crate) fn first_rule(route: &Route, req: &Request) -> (Option<usize>, Vec<RuleOutcome>) {
    let mut seen = Vec::new();
    for (i, rule) in route.rules.iter().enumerate() {
        let o = check_rule(rule, req);
        let hit = !matches!(o, RuleOutcome::NoMatch(_));
        seen.push(o);
        if hit {
            return (Some(i), seen);
        }
    }
    (None, seen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{HeaderMatch, PathMatch};

    fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> Request {
        Request {
            host: "h".into(),
            method: method.into(),
            path: path.into(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn prefix(v: &str) -> Match {
        Match {
            path: Some(PathMatch {
                kind: "PREFIX".into(),
                value: v.into(),
            }),
            ..Match::default()
        }
    }

    // The agent's `prefix_matches_whole_segments_only` (agent/src/route/table.rs).
    #[test]
    fn prefix_matches_whole_segments_only() {
        let m = prefix("/api/");
        assert_eq!(check_match(&m, &req("GET", "/api", &[])), Verdict::Fits);
        assert_eq!(check_match(&m, &req("GET", "/api/x", &[])), Verdict::Fits);
        assert!(matches!(
            check_match(&m, &req("GET", "/apix", &[])),
            Verdict::Path { .. }
        ));
    }

    #[test]
    fn root_prefix_matches_every_path() {
        let m = prefix("/");
        assert_eq!(check_match(&m, &req("GET", "/", &[])), Verdict::Fits);
        assert_eq!(check_match(&m, &req("GET", "/a/b", &[])), Verdict::Fits);
    }

    #[test]
    fn exact_path_is_exact() {
        let m = Match {
            path: Some(PathMatch {
                kind: "EXACT".into(),
                value: "/login".into(),
            }),
            ..Match::default()
        };
        assert_eq!(check_match(&m, &req("GET", "/login", &[])), Verdict::Fits);
        assert!(matches!(
            check_match(&m, &req("GET", "/login/", &[])),
            Verdict::Path { kind: "Exact", .. }
        ));
    }

    #[test]
    fn method_is_compared_exactly_and_first() {
        let m = Match {
            method: Some("GET".into()),
            ..prefix("/nope")
        };
        assert_eq!(
            check_match(&m, &req("POST", "/x", &[])),
            Verdict::Method { want: "GET".into() }
        );
    }

    #[test]
    fn header_names_ignore_case_and_values_do_not() {
        let m = Match {
            headers: vec![HeaderMatch {
                name: "X-User".into(),
                value: "Ann".into(),
            }],
            ..Match::default()
        };
        assert_eq!(
            check_match(&m, &req("GET", "/", &[("x-user", "Ann")])),
            Verdict::Fits
        );
        assert!(matches!(
            check_match(&m, &req("GET", "/", &[("x-user", "ann")])),
            Verdict::Header { .. }
        ));
        // Any of several values of the header will do, as `get_all` in the agent.
        assert_eq!(
            check_match(
                &m,
                &req("GET", "/", &[("x-user", "Bob"), ("X-USER", "Ann")])
            ),
            Verdict::Fits
        );
    }

    #[test]
    fn first_matching_rule_wins_and_a_rule_without_matches_takes_the_rest() {
        let route = Route {
            rules: vec![
                Rule {
                    matches: vec![
                        Match {
                            method: Some("GET".into()),
                            ..Match::default()
                        },
                        Match {
                            method: Some("HEAD".into()),
                            ..Match::default()
                        },
                    ],
                    ..Rule::default()
                },
                Rule::default(),
            ],
            ..Route::default()
        };
        let (hit, seen) = first_rule(&route, &req("HEAD", "/", &[]));
        assert_eq!(
            (hit, seen.last()),
            (Some(0), Some(&RuleOutcome::Matches(1)))
        );
        let (hit, seen) = first_rule(&route, &req("POST", "/", &[]));
        assert_eq!(hit, Some(1));
        assert!(matches!(&seen[0], RuleOutcome::NoMatch(v) if v.len() == 2));
        assert_eq!(seen[1], RuleOutcome::MatchesAll);
    }

    #[test]
    fn hosts_are_normalised_as_the_agent_does() {
        assert_eq!(
            normalize_host("Shop.Test:8080").as_deref(),
            Some("shop.test")
        );
        assert_eq!(normalize_host("shop.test.").as_deref(), Some("shop.test"));
        assert_eq!(normalize_host("u@shop:1").as_deref(), Some("shop"));
        assert_eq!(normalize_host("[::1]:80").as_deref(), Some("[::1]"));
        assert_eq!(normalize_host(""), None);
        assert_eq!(normalize_host("bad host"), None);
    }

    #[test]
    fn cli_requests_drop_the_query_and_upper_case_the_method() {
        let r = Request::from_cli("h", Some("api/x?y=1"), Some("post"));
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/api/x"));
    }
}
