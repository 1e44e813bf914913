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

/// Reads one proxy's config from its admin endpoint, inside its namespace.
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
    let admin: std::net::SocketAddr = c
        .listeners
        .get("admin")
        .context("the proxy has no admin listener")?
        .parse()?;
    let get = |path: String| {
        let ns = c.netns.clone();
        async move {
            let (status, body) = crate::probe::get(ns.as_deref(), admin, &path).await?;
            if status != 200 {
                bail!("{path}: {status}: {body}");
            }
            Ok::<serde_json::Value, anyhow::Error>(serde_json::from_str(&body)?)
        }
    };
    if c.program.is_none() {
        // isthmus-proxy or isthmus-gateway: clusters and their endpoints,
        // and for isthmus-proxy its routes; their listeners are set by
        // flags and their certificates come from the agent, not SDS.
        let dump = get("/config_dump".into()).await?;
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
            ProxyConfigKind::Routes if c.kind == "proxy" => {
                pick(&["routeVersion", "outboundRoutes", "inboundPorts"])
            }
            _ => serde_json::json!({
                "note": format!(
                    "{} takes no {} over xDS: its listeners are set by flags and its certificate comes from the agent",
                    c.name,
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
