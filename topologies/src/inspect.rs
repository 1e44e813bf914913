//! Looking inside a running local mesh: what one proxy holds
//! (`isthmusctl proxy-config`), read from its admin endpoint from inside its
//! network namespace.

use anyhow::{Context, bail};

use crate::runner::MeshState;

/// What `proxy-config` shows.
#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum ProxyConfigKind {
    Listeners,
    Routes,
    Clusters,
    Endpoints,
    Secrets,
    All,
}

/// A proxy's admin endpoint: an Envoy or an Isthmus proxy or gateway.
#[derive(Debug, Clone)]
pub struct AdminTarget {
    /// How the output names it.
    pub name: String,
    pub admin: std::net::SocketAddr,
    /// The network namespace to reach it from, if any.
    pub netns: Option<String>,
}

/// Reads one proxy's config from its admin endpoint, inside its namespace,
/// finding it in the local mesh at `state_dir`.
pub async fn proxy_config(
    state_dir: &std::path::Path,
    proxy: &str,
    what: ProxyConfigKind,
) -> anyhow::Result<serde_json::Value> {
    let state = MeshState::load(state_dir)?;
    let c = [proxy.to_string(), format!("proxy-{proxy}")]
        .iter()
        .find_map(|n| state.component(n))
        .filter(|c| c.kind == "proxy" || c.kind == "gateway")
        .with_context(|| {
            format!("no proxy or gateway named {proxy:?} (see `isthmusctl status`)")
        })?;
    let admin = c
        .listeners
        .get("admin")
        .context("the proxy has no admin listener")?
        .parse()?;
    proxy_config_at(
        &AdminTarget {
            name: c.name.clone(),
            admin,
            netns: c.netns.clone(),
        },
        what,
    )
    .await
}

/// Reads the config of the proxy at an admin address. Envoy (whose config
/// dump has `configs`) is asked for the one kind; isthmus-proxy and
/// isthmus-gateway serve their own dump, with clusters and endpoints, and
/// for isthmus-proxy its routes.
pub async fn proxy_config_at(
    target: &AdminTarget,
    what: ProxyConfigKind,
) -> anyhow::Result<serde_json::Value> {
    let get = |path: String| async move {
        let (status, body) = crate::probe::get(target.netns.as_deref(), target.admin, &path)
            .await
            .with_context(|| format!("{}'s admin endpoint at {}", target.name, target.admin))?;
        if status != 200 {
            bail!("{path}: {status}: {body}");
        }
        serde_json::from_str::<serde_json::Value>(&body)
            .with_context(|| format!("{path} of {} is not JSON", target.name))
    };
    let dump = get("/config_dump".into()).await?;
    if dump.get("configs").is_none() {
        // isthmus-proxy or isthmus-gateway: their listeners are set by
        // flags and their certificates come from the agent, not SDS.
        let pick = |keys: &[&str]| {
            let picked: serde_json::Map<String, serde_json::Value> = keys
                .iter()
                .filter_map(|k| Some((k.to_string(), dump.get(*k)?.clone())))
                .collect();
            serde_json::Value::Object(picked)
        };
        return Ok(match what {
            ProxyConfigKind::Clusters | ProxyConfigKind::Endpoints | ProxyConfigKind::All => {
                dump.clone()
            }
            ProxyConfigKind::Routes if dump.get("routeVersion").is_some() => {
                pick(&["routeVersion", "outboundRoutes", "routes", "inboundPorts"])
            }
            _ => serde_json::json!({
                "note": format!(
                    "{} takes no {} over xDS: its listeners are set by flags and its certificate comes from the agent",
                    target.name,
                    format!("{what:?}").to_lowercase()
                ),
            }),
        });
    }
    let resource = match what {
        ProxyConfigKind::Listeners => "?resource=dynamic_listeners",
        ProxyConfigKind::Routes => "?resource=dynamic_route_configs",
        ProxyConfigKind::Clusters => "?resource=dynamic_active_clusters",
        ProxyConfigKind::Endpoints => "?resource=dynamic_endpoint_configs&include_eds",
        ProxyConfigKind::Secrets => "?resource=dynamic_active_secrets",
        ProxyConfigKind::All => "?include_eds",
    };
    get(format!("/config_dump{resource}")).await
}

/// The routes `proxy_config` returned, as a table with one row per route:
/// the authority it serves, its name, its match, its destinations (subset
/// or other service, with each one's share of requests), timeout, retries,
/// and mirror and faults. Reads isthmus-proxy's `routes` and Envoy's
/// `dynamic_route_configs`; `None` for an answer that holds neither.
pub fn routes_table(answer: &serde_json::Value) -> Option<String> {
    let rows = match answer.get("routes").and_then(|r| r.as_array()) {
        Some(routes) => routes.clone(),
        None => envoy_routes(answer)?,
    };
    let header = [
        "AUTHORITY",
        "ROUTE",
        "MATCH",
        "DESTINATIONS",
        "TIMEOUT",
        "RETRIES",
        "MIRROR/FAULT",
    ];
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    let pct = |v: &serde_json::Value| {
        let p = v.as_f64().unwrap_or(0.0);
        if p.fract() == 0.0 {
            format!("{p:.0}%")
        } else {
            format!("{p:.2}%")
        }
    };
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let authority = text(&r["authority"]);
            let destinations: Vec<String> = r["destinations"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|d| {
                    let service = match (d["host"].as_str(), d["port"].as_u64()) {
                        (Some(h), Some(p)) if format!("{h}:{p}") == authority => String::new(),
                        (Some(h), Some(p)) => format!("{h}:{p}"),
                        _ => text(&d["cluster"]),
                    };
                    let subset = d["subset"].as_str().map(|s| format!("subset {s}"));
                    let what = match (service.is_empty(), subset) {
                        (true, Some(s)) => s,
                        (true, None) => "all endpoints".into(),
                        (false, Some(s)) => format!("{service} {s}"),
                        (false, None) => service,
                    };
                    format!("{what} {}", pct(&d["percent"]))
                })
                .collect();
            let retries = match r["retries"].as_object() {
                None => "-".to_string(),
                Some(t) => {
                    let on: Vec<String> = t
                        .get("on")
                        .and_then(|o| o.as_array())
                        .map(|o| o.iter().map(text).collect())
                        .unwrap_or_default();
                    let mut s = format!(
                        "{}x",
                        t.get("attempts").and_then(|a| a.as_u64()).unwrap_or(0)
                    );
                    if let Some(per_try) = t.get("perTryTimeout").and_then(|p| p.as_str()) {
                        s += &format!(" {per_try} each");
                    }
                    if !on.is_empty() {
                        s += &format!(" on {}", on.join(","));
                    }
                    s
                }
            };
            let mut extras = Vec::new();
            if let Some(m) = r["mirror"].as_object() {
                extras.push(format!(
                    "mirror {} {}",
                    m.get("cluster").map(text).unwrap_or_default(),
                    pct(m.get("percent").unwrap_or(&serde_json::Value::Null))
                ));
            }
            if let Some(d) = r["fault"]["delay"].as_object() {
                extras.push(format!(
                    "delay {} {}",
                    d.get("delay").map(text).unwrap_or_default(),
                    pct(d.get("percent").unwrap_or(&serde_json::Value::Null))
                ));
            }
            if let Some(a) = r["fault"]["abort"].as_object() {
                extras.push(format!(
                    "abort {} {}",
                    a.get("status").map(|s| s.to_string()).unwrap_or_default(),
                    pct(a.get("percent").unwrap_or(&serde_json::Value::Null))
                ));
            }
            vec![
                authority,
                text(&r["name"]),
                text(&r["match"]),
                if destinations.is_empty() {
                    "-".into()
                } else {
                    destinations.join(", ")
                },
                text(&r["timeout"]),
                retries,
                if extras.is_empty() {
                    "-".into()
                } else {
                    extras.join(", ")
                },
            ]
        })
        .collect();
    Some(columns(&header, &body))
}

/// Envoy's route config dump as the rows [`routes_table`] reads.
fn envoy_routes(answer: &serde_json::Value) -> Option<Vec<serde_json::Value>> {
    let configs = answer.get("configs")?.as_array()?;
    let mut rows = Vec::new();
    for c in configs {
        let Some(vhosts) = c["route_config"]["virtual_hosts"].as_array() else {
            continue;
        };
        for vh in vhosts {
            let authority = vh["domains"]
                .as_array()
                .and_then(|d| d.first())
                .and_then(|d| d.as_str())
                .unwrap_or_else(|| vh["name"].as_str().unwrap_or("-"));
            for r in vh["routes"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                let m = &r["match"];
                let mut matched = ["prefix", "path", "safe_regex"]
                    .iter()
                    .find_map(|k| {
                        let v = &m[*k];
                        let v = v.as_str().or_else(|| v["regex"].as_str())?;
                        Some(format!("{} {v}", if *k == "path" { "exact" } else { k }))
                    })
                    .unwrap_or_else(|| "-".into());
                for h in m["headers"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                {
                    let not = if h["invert_match"].as_bool() == Some(true) {
                        "!"
                    } else {
                        ""
                    };
                    matched += &format!(", {not}header {}", text_of(&h["name"]));
                }
                let action = &r["route"];
                let weighted: Vec<(String, f64)> =
                    match action["weighted_clusters"]["clusters"].as_array() {
                        Some(cs) => cs
                            .iter()
                            .map(|c| (text_of(&c["name"]), c["weight"].as_f64().unwrap_or(0.0)))
                            .collect(),
                        None => action["cluster"]
                            .as_str()
                            .map(|c| vec![(c.to_string(), 1.0)])
                            .unwrap_or_default(),
                    };
                let total: f64 = weighted.iter().map(|(_, w)| w).sum();
                let destinations: Vec<serde_json::Value> = weighted
                    .iter()
                    .map(|(cluster, w)| {
                        let percent = if total > 0.0 { w * 100.0 / total } else { 0.0 };
                        isthmus_api::names::destination_view(cluster, percent)
                    })
                    .collect();
                let retry = &action["retry_policy"];
                rows.push(serde_json::json!({
                    "authority": authority,
                    "name": r["name"],
                    "match": matched,
                    "destinations": destinations,
                    "timeout": action["timeout"],
                    "retries": retry.as_object().map(|_| serde_json::json!({
                        "attempts": retry["num_retries"].as_u64().unwrap_or(1),
                        "perTryTimeout": retry["per_try_timeout"],
                        "on": retry["retry_on"].as_str().map(|s| s.split(',').map(str::to_string).collect::<Vec<_>>()).unwrap_or_default(),
                    })),
                }));
            }
        }
    }
    Some(rows)
}

fn text_of(v: &serde_json::Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// Left-aligned columns, each as wide as its widest cell.
fn columns(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}   "));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// isthmus-proxy's routes, as its config dump writes them.
    #[test]
    fn isthmus_proxy_routes_show_subsets_weights_and_retries() {
        let answer = serde_json::json!({
            "routeVersion": "7",
            "routes": [
                {
                    "authority": "echo.demo.svc.cluster.local:8080",
                    "name": "canary",
                    "match": "prefix /, header x-canary",
                    "destinations": [{
                        "cluster": "outbound|8080|v2|echo.demo.svc.cluster.local",
                        "host": "echo.demo.svc.cluster.local", "port": 8080, "subset": "v2",
                        "weight": 1, "percent": 100.0
                    }],
                    "timeout": null, "retries": null, "mirror": null,
                    "fault": {"delay": null, "abort": {"status": 418, "percent": 50.0}}
                },
                {
                    "authority": "echo.demo.svc.cluster.local:8080",
                    "name": "default",
                    "match": "prefix /",
                    "destinations": [
                        {"cluster": "outbound|8080|v1|echo.demo.svc.cluster.local",
                         "host": "echo.demo.svc.cluster.local", "port": 8080, "subset": "v1",
                         "weight": 90, "percent": 90.0},
                        {"cluster": "outbound|8080||other.demo.svc.cluster.local",
                         "host": "other.demo.svc.cluster.local", "port": 8080, "subset": null,
                         "weight": 10, "percent": 10.0}
                    ],
                    "timeout": "5s",
                    "retries": {"attempts": 2, "perTryTimeout": "1.5s", "on": ["connect-failure", "503"]},
                    "mirror": {"cluster": "outbound|8080|v3|echo.demo.svc.cluster.local", "percent": 12.5},
                    "fault": {"delay": null, "abort": null}
                }
            ]
        });
        let table = routes_table(&answer).expect("a table");
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        fn cols(l: &str) -> Vec<&str> {
            l.split("   ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        }
        assert_eq!(
            cols(lines[0]),
            [
                "AUTHORITY",
                "ROUTE",
                "MATCH",
                "DESTINATIONS",
                "TIMEOUT",
                "RETRIES",
                "MIRROR/FAULT"
            ]
        );
        assert_eq!(
            cols(lines[1]),
            [
                "echo.demo.svc.cluster.local:8080",
                "canary",
                "prefix /, header x-canary",
                "subset v2 100%",
                "-",
                "-",
                "abort 418 50%"
            ]
        );
        assert_eq!(
            cols(lines[2]),
            [
                "echo.demo.svc.cluster.local:8080",
                "default",
                "prefix /",
                "subset v1 90%, other.demo.svc.cluster.local:8080 10%",
                "5s",
                "2x 1.5s each on connect-failure,503",
                "mirror outbound|8080|v3|echo.demo.svc.cluster.local 12.50%"
            ]
        );
        // The columns line up: every row's second column starts where the
        // header's does.
        let at = lines[0].find("ROUTE").expect("the header");
        assert!(
            lines[1..].iter().all(|l| l[at..].starts_with(['c', 'd'])),
            "{table}"
        );
    }

    /// Envoy's dynamic route configs give the same rows.
    #[test]
    fn envoy_routes_give_the_same_rows() {
        let answer = serde_json::json!({"configs": [{
            "route_config": {"name": "outbound", "virtual_hosts": [{
                "name": "echo.demo.svc.cluster.local:8080",
                "domains": ["echo.demo.svc.cluster.local:8080", "echo.demo.svc.cluster.local"],
                "routes": [{
                    "name": "default",
                    "match": {"prefix": "/", "headers": [{"name": "x-canary", "string_match": {"exact": "true"}}]},
                    "route": {
                        "weighted_clusters": {"clusters": [
                            {"name": "outbound|8080|v1|echo.demo.svc.cluster.local", "weight": 75},
                            {"name": "outbound|8080|v2|echo.demo.svc.cluster.local", "weight": 25}
                        ]},
                        "timeout": "2s",
                        "retry_policy": {"retry_on": "5xx,connect-failure", "num_retries": 3}
                    }
                }]
            }]}
        }]});
        let table = routes_table(&answer).expect("a table");
        let row = table.lines().nth(1).expect("one route");
        assert!(row.contains("prefix /, header x-canary"), "{table}");
        assert!(row.contains("subset v1 75%, subset v2 25%"), "{table}");
        assert!(row.contains("3x on 5xx,connect-failure"), "{table}");
        assert!(row.contains("2s"), "{table}");
        assert_eq!(
            routes_table(&serde_json::json!({"note": "a gateway"})),
            None
        );
    }
}
