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
        // isthmus-proxy or isthmus-gateway: clusters and their endpoints;
        // they take no listeners, routes or secrets over xDS.
        let dump = get("/config_dump".into()).await?;
        return Ok(match what {
            ProxyConfigKind::Clusters | ProxyConfigKind::Endpoints | ProxyConfigKind::All => dump,
            _ => serde_json::json!({
                "note": format!("{} takes only clusters and endpoints from xDS", c.name),
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
