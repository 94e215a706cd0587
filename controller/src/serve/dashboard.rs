//! The controller's web dashboard (`GET /dashboard` on the admin port): one server-rendered
//! HTML page, no external assets, showing the same [`View`] as `/state` — policies with
//! their hosts, acceptance, active tier and panic, backends by tier with weights, every
//! endpoint's readiness and health as the agents see it, per-route traffic, the connected
//! agents, and broken manifest files.
//!
//! The page refreshes itself with a few lines of inline JS that fetch `/dashboard?part=main`
//! (the same renderer, only the `<main>` element) every 2 s and swap it in; without JS a
//! `<noscript>` meta refresh reloads the page. Rendering stays in one place, here, so every
//! value — policy names, hosts and error messages are user input — goes through
//! [`esc`] exactly once on its way into HTML, and no client-side code ever builds markup.

use crate::serve::traffic::{AgentHealth, Traffic};
use crate::serve::view::{BackendView, View};
use std::borrow::Cow;
use std::fmt::Write;

/// The refresh period of the page.
const REFRESH_MS: u32 = 2000;

/// HTML-escapes text for element content and quoted attribute values (`&<>"'`).
fn esc(s: &str) -> Cow<'_, str> {
    html_escape::encode_quoted_attribute(s)
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f5f6f8}
header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;gap:24px;align-items:baseline}
header h1{font-size:18px;margin:0}
main{padding:12px 20px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:10px 14px;margin:0 0 14px}
h2{font-size:16px;margin:4px 0 8px}
table{border-collapse:collapse;width:100%;margin:6px 0}
th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eceff3;vertical-align:top}
th{font-weight:600;color:#566}
.ok{color:#18794e}.bad{color:#c62828;font-weight:600}.warn{color:#a05a00}.dim{color:#778}
.badge{display:inline-block;padding:0 6px;border-radius:4px;font-size:12px;border:1px solid}
.kv span{margin-right:18px}
code{font:12px ui-monospace,monospace}
";

const SCRIPT: &str = "
setInterval(async () => {
  try {
    const r = await fetch('/dashboard?part=main', {cache: 'no-store'});
    if (!r.ok) return;
    const m = document.getElementById('main');
    m.innerHTML = await r.text();
    m.dataset.refreshes = (+m.dataset.refreshes || 0) + 1;
  } catch (e) { /* the controller restarts: keep the last page */ }
}, 2000);
";

/// The whole page.
pub(crate) fn page(view: &View) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let _ = write!(
        out,
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
         <meta name=viewport content=\"width=device-width,initial-scale=1\">\
         <title>weir controller</title>\
         <noscript><meta http-equiv=refresh content=\"{}\"></noscript>\
         <style>{STYLE}</style></head><body>\
         <header><h1>weir controller</h1><span>dashboard</span>\
         <span class=dim>refreshes every {} s · <a style=color:#9cf href=/state>/state</a></span></header>\
         <main id=main>",
        REFRESH_MS / 1000 + 3,
        REFRESH_MS / 1000,
    );
    main(&mut out, view);
    let _ = write!(out, "</main><script>{SCRIPT}</script></body></html>");
    out
}

/// The content of `<main>`, also served alone for the page's refresh.
pub(crate) fn main(out: &mut String, view: &View) {
    let c = &view.config;
    let _ = write!(
        out,
        "<section class=kv><span>table version <b>{}</b></span>\
         <span>policies: {}</span><span>agents connected: {}</span>\
         <span>reporting load: {}</span>{}</section>",
        c.version,
        c.policies.len(),
        view.agents.len(),
        view.observed.agents,
        if c.loaded {
            ""
        } else {
            "<span class=bad>configuration not loaded yet</span>"
        },
    );
    files(out, view);
    for (key, state) in &c.policies {
        policy(out, view, key, state);
    }
    if c.policies.is_empty() {
        out.push_str("<section><h2>Policies</h2><p class=dim>none</p></section>");
    }
    agents(out, view);
}

fn files(out: &mut String, view: &View) {
    let broken: Vec<_> = view
        .config
        .files
        .iter()
        .filter(|f| f.error.is_some() || !f.warnings.is_empty())
        .collect();
    if broken.is_empty() {
        return;
    }
    out.push_str(
        "<section id=files><h2>Manifest files with problems</h2>\
         <p class=dim>The last good objects of a broken file stay in force.</p>\
         <table><tr><th>file</th><th>problem</th></tr>",
    );
    for f in broken {
        for (class, msg) in f
            .error
            .iter()
            .map(|e| ("bad", e))
            .chain(f.warnings.iter().map(|w| ("warn", w)))
        {
            let _ = write!(
                out,
                "<tr><td><code>{}</code></td><td class={class}>{}</td></tr>",
                esc(&f.path),
                esc(msg)
            );
        }
    }
    out.push_str("</table></section>");
}

fn policy(out: &mut String, view: &View, key: &str, state: &crate::routing::PolicyState) {
    let hosts = view.hosts(key);
    let _ = write!(
        out,
        "<section class=policy data-policy=\"{}\"><h2>{}</h2><div class=kv>",
        esc(key),
        esc(key)
    );
    let _ = write!(
        out,
        "<span>hosts: {}</span>",
        if hosts.is_empty() {
            "<span class=dim>none served</span>".to_string()
        } else {
            hosts
                .iter()
                .map(|h| format!("<code>{}</code>", esc(h)))
                .collect::<Vec<_>>()
                .join(" ")
        }
    );
    if state.accepted {
        out.push_str("<span class=\"badge ok\">Accepted</span>");
    } else {
        let _ = write!(
            out,
            "<span class=\"badge bad\">not accepted: {}</span>",
            esc(&format!("{:?}", state.reason))
        );
    }
    if state.serving_last_good {
        out.push_str("<span class=warn>serving the last good spec</span>");
    }
    match state.active_tier {
        Some(t) => {
            let _ = write!(out, "<span>active tier <b>{t}</b></span>");
        }
        None => out.push_str("<span class=dim>no active tier</span>"),
    }
    if state.panic {
        out.push_str("<span class=bad>PANIC: no healthy endpoint in any tier</span>");
    }
    let _ = write!(
        out,
        "<span class=dim>from {}</span></div>",
        esc(&state.source)
    );
    if !state.errors.is_empty() || !state.unresolved_refs.is_empty() {
        out.push_str("<ul class=errors>");
        for e in &state.errors {
            let _ = write!(out, "<li class=bad>{}</li>", esc(e));
        }
        for r in &state.unresolved_refs {
            let _ = write!(out, "<li class=warn>unresolved backendRef {}</li>", esc(r));
        }
        out.push_str("</ul>");
    }
    traffic(out, &view.traffic(key));
    backends(out, &view.backends(key, state));
    out.push_str("</section>");
}

fn traffic(out: &mut String, t: &Traffic) {
    let pct = |r: Option<f64>| r.map_or("–".to_string(), |r| format!("{:.1} %", r * 100.0));
    let _ = write!(
        out,
        "<div class=\"kv traffic\"><span>rps <b class=rps>{:.1}</b></span>\
         <span>errors (5xx) <b>{}</b></span><span>p99 <b>{}</b></span>\
         <span>cache hits <b>{}</b></span><span class=dim>from {} agent{}</span></div>",
        t.rps,
        pct(t.error_ratio),
        t.p99_ms.map_or("–".to_string(), |ms| format!("{ms:.1} ms")),
        pct(t.cache_hit_ratio),
        t.agents,
        if t.agents == 1 { "" } else { "s" },
    );
}

fn backends(out: &mut String, backends: &[BackendView]) {
    if backends.is_empty() {
        return;
    }
    out.push_str(
        "<table><tr><th>tier</th><th>service</th><th>weight</th><th>ready / healthy</th>\
         <th>endpoint</th><th>zone</th><th>ready</th><th>share</th><th>health as the agents see it</th></tr>",
    );
    for b in backends {
        let rows = b.endpoints.len().max(1);
        let _ = write!(
            out,
            "<tr><td rowspan={rows}>{}</td><td rowspan={rows}><b>{}</b></td><td rowspan={rows}>{}</td>\
             <td rowspan={rows}>{} / {}</td>",
            b.tier,
            esc(&b.name),
            b.weight.map_or("–".to_string(), |w| w.to_string()),
            b.ready,
            b.healthy,
        );
        if b.endpoints.is_empty() {
            out.push_str("<td colspan=5 class=dim>no endpoints</td></tr>");
            continue;
        }
        for (i, e) in b.endpoints.iter().enumerate() {
            if i > 0 {
                out.push_str("<tr>");
            }
            let _ = write!(
                out,
                "<td><code>{}</code></td><td>{}</td><td class={}>{}</td><td>{}</td>\
                 <td class=\"agent-health {}\">{}</td></tr>",
                esc(&e.address),
                esc(&e.zone),
                if e.ready { "ok" } else { "bad" },
                if e.ready { "ready" } else { "not ready" },
                e.weight,
                if e.agent_health.unhealthy_on > 0 {
                    "bad"
                } else {
                    "ok"
                },
                esc(&health_text(&e.agent_health)),
            );
        }
    }
    out.push_str("</table>");
}

/// E.g. "failing active check on 2/3 agents: active health check failing: HTTP 500".
pub(crate) fn health_text(h: &AgentHealth) -> String {
    if h.of == 0 {
        return "no agent reporting".into();
    }
    if h.unhealthy_on == 0 {
        return format!("healthy on {0}/{0} agents", h.of);
    }
    let mut parts = Vec::new();
    for (problem, label) in [
        ("activeCheckFailing", "failing active check"),
        ("ejected", "ejected"),
        ("throttled", "throttled"),
        ("unknown", "unhealthy"),
    ] {
        let mut nodes: Vec<&str> = Vec::new();
        let mut details: Vec<&str> = Vec::new();
        for r in h.reasons.iter().filter(|r| r.problem == problem) {
            if !nodes.contains(&r.node.as_str()) {
                nodes.push(&r.node);
            }
            if !r.detail.is_empty() && !details.contains(&r.detail.as_str()) {
                details.push(&r.detail);
            }
        }
        if nodes.is_empty() {
            continue;
        }
        let mut part = format!("{label} on {}/{} agents", nodes.len(), h.of);
        if !details.is_empty() {
            part.push_str(": ");
            part.push_str(&details.join("; "));
        }
        parts.push(part);
    }
    parts.join(" · ")
}

fn agents(out: &mut String, view: &View) {
    let current = view.config.version;
    out.push_str(
        "<section id=agents><h2>Agents</h2><table><tr><th>node</th><th>zone</th><th>agent</th>\
         <th>peer</th><th>applied version</th><th>last NACK</th><th>cache hit ratio</th>\
         <th>last load report</th></tr>",
    );
    if view.agents.is_empty() {
        out.push_str("<tr><td colspan=8 class=dim>no agent connected</td></tr>");
    }
    let now = crate::serve::server::now_ms();
    for a in &view.agents {
        let applied = if a.applied_version == 0 {
            "<span class=warn>none yet</span>".to_string()
        } else if a.applied_version == current {
            format!("<span class=ok>{} (current)</span>", a.applied_version)
        } else {
            format!(
                "<span class=warn>{} (current {current}, sent {})</span>",
                a.applied_version, a.sent_version
            )
        };
        let nack = a.last_nack.as_ref().map_or("–".to_string(), |n| {
            format!(
                "<span class=bad>version {}: {}</span>",
                n.version,
                esc(&n.error)
            )
        });
        let cache = a
            .cache
            .filter(|c| c.hits + c.misses > 0)
            .map_or("–".to_string(), |c| {
                format!(
                    "{:.1} %",
                    c.hits as f64 * 100.0 / (c.hits + c.misses) as f64
                )
            });
        let report = a.last_report_unix_ms.map_or("none yet".to_string(), |at| {
            format!("{:.1} s ago", now.saturating_sub(at) as f64 / 1000.0)
        });
        let _ = write!(
            out,
            "<tr class=agent><td><b>{}</b></td><td>{}</td><td>{}</td><td><code>{}</code></td>\
             <td>{applied}</td><td>{nack}</td><td>{cache}</td><td>{report}</td></tr>",
            esc(&a.node_name),
            esc(&a.zone),
            esc(&a.agent_version),
            esc(&a.peer),
        );
    }
    out.push_str("</table></section>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::traffic::HealthReason;

    fn reason(node: &str, problem: &'static str, detail: &str) -> HealthReason {
        HealthReason {
            node: node.into(),
            problem,
            detail: detail.into(),
        }
    }

    #[test]
    fn health_text_names_the_problem_the_share_of_agents_and_the_reasons() {
        let h = AgentHealth {
            unhealthy_on: 2,
            of: 3,
            reasons: vec![
                reason(
                    "n1",
                    "activeCheckFailing",
                    "active health check failing: HTTP 500",
                ),
                reason(
                    "n2",
                    "activeCheckFailing",
                    "active health check failing: HTTP 500",
                ),
                reason("n2", "throttled", "429"),
            ],
        };
        assert_eq!(
            health_text(&h),
            "failing active check on 2/3 agents: active health check failing: HTTP 500 · \
             throttled on 1/3 agents: 429"
        );
        let fine = AgentHealth {
            of: 2,
            ..AgentHealth::default()
        };
        assert_eq!(health_text(&fine), "healthy on 2/2 agents");
        assert_eq!(health_text(&AgentHealth::default()), "no agent reporting");
    }

    #[test]
    fn markup_in_user_input_is_escaped() {
        assert_eq!(
            esc("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&quot;"
        );
    }

    #[test]
    fn markup_in_policy_names_errors_files_and_agents_never_reaches_the_page_as_markup() {
        use crate::routing::PolicyState;
        use crate::serve::hub::{ConfigState, FileReport, Table};
        use crate::serve::server::{AgentState, NackState};
        let evil = "<img src=x onerror=alert(1)>";
        let mut config = ConfigState {
            version: 3,
            loaded: true,
            files: vec![FileReport {
                path: format!("{evil}.yaml"),
                error: Some(format!("bad YAML near <script>{evil}</script>")),
                warnings: Vec::new(),
            }],
            ..ConfigState::default()
        };
        config.policies.insert(
            format!("default/{evil}"),
            PolicyState {
                source: format!("{evil}.yaml"),
                errors: vec![format!("spec.hosts[0]: \"{evil}\" is not a host name")],
                ..PolicyState::default()
            },
        );
        let view = View {
            config,
            agents: vec![AgentState {
                node_name: evil.into(),
                zone: "<b>z</b>".into(),
                agent_version: "0.1.0".into(),
                peer: "127.0.0.1:1".into(),
                cache_peer_address: String::new(),
                connected_at_unix_ms: 0,
                sent_version: 3,
                applied_version: 2,
                last_ack_unix_ms: None,
                last_nack: Some(NackState {
                    version: 3,
                    error: format!("route {evil}: </td></tr></table><script>x()</script>"),
                    at_unix_ms: 0,
                }),
                cache: None,
                last_report_unix_ms: None,
            }],
            observed: Default::default(),
            table: std::sync::Arc::new(Table::default()),
        };
        let mut main_part = String::new();
        main(&mut main_part, &view);
        for bad in ["<img", "<script", "</script", "<b>z", "</table><script"] {
            assert!(
                !main_part.contains(bad),
                "{bad} rendered as markup: {main_part}"
            );
        }
        assert!(
            main_part.contains("&lt;img src=x onerror=alert(1)&gt;"),
            "{main_part}"
        );
        assert!(main_part.contains("not accepted"), "{main_part}");
        assert!(main_part.contains("version 3: route"), "{main_part}");
        // The page adds exactly one script of its own.
        assert_eq!(page(&view).matches("<script").count(), 1);
    }
}
