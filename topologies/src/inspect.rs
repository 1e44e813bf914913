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
                pick(&["routeVersion", "outboundRoutes", "inboundPorts"])
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
