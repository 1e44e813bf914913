//! Config turned into proxy config: a DestinationRule's subsets (by workload
//! labels: east's echo is `version: v1`, west's `v2`) and a VirtualService's
//! header match, weights, fault injection, retries, timeout and mirroring
//! become routes and subset clusters, which Envoy and isthmus-proxy follow
//! alike: requests go where the rules say, across networks for the subset
//! that lives in west. Then the whole valid corpus (every kind) is applied,
//! and every proxy ACKs every type: Envoy sidecars and gateways, and, on the
//! isthmus data plane, isthmus-proxy and isthmus-gateway. AuthorizationPolicies
//! become RBAC at echo's sidecar, Envoy or isthmus-proxy: DENY by path, ALLOW
//! by namespace, principal, method, port and a header condition, and traffic
//! flows again once they are gone. A DENY on `/admin` holds against a corpus
//! of path tricks (dot segments, doubled slashes, `%2F`, `%5C`, `%2e`,
//! encoded letters, query, fragment, path-carrying and repeated headers):
//! each is refused and the app's request log never shows it. Last,
//! PeerAuthentication modes decide
//! whether echo's sidecar takes plaintext, and a DestinationRule's
//! connection pool refuses isthmus-proxy's requests past its limits.
//! Needs root for network namespaces.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use isthmus_e2e::{Mesh, can_run, eventually};
use isthmus_topology::probe;
use isthmus_topology::runner::{DataPlane, NetMode};

const NODE: &str = env!("CARGO_BIN_EXE_isthmus-e2e-node");
const PATIENCE: Duration = Duration::from_secs(60);
const CORPUS: &str = include_str!("../fixtures/valid-corpus.yaml");

const RULES: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: demo}
spec:
  host: echo
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 100}, http: {http2MaxRequests: 1000, maxRetries: 5}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: demo}
spec:
  hosts: [echo]
  http:
  - name: canary
    match: [{headers: {x-canary: {exact: "true"}}}]
    route: [{destination: {host: echo, subset: v2}}]
  - name: teapot
    match: [{uri: {prefix: /teapot}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: echo, subset: v1}}]
  - name: default
    route:
    - {destination: {host: echo, subset: v1}, weight: 100}
    - {destination: {host: echo, subset: v2}, weight: 0}
    timeout: 5s
    retries: {attempts: 2, perTryTimeout: 2s}
    mirror: {host: echo, subset: v2}
    mirrorPercentage: {value: 100}
"#;

async fn ask(mesh: &Mesh, path: &str, headers: &[(&str, &str)]) -> Option<(u16, String)> {
    probe::get_with(
        mesh.netns("proxy-client-east"),
        mesh.listener("proxy-client-east", "outbound"),
        &format!("http://echo.demo.svc.cluster.local:8080{path}"),
        headers,
    )
    .await
    .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_services_and_destination_rules_route_envoy_traffic() {
    if !can_run(
        "virtual_services_and_destination_rules_route_envoy_traffic",
        true,
    ) {
        return;
    }
    let mesh = Mesh::up_data_plane(
        "multi-network",
        NetMode::Netns,
        NODE,
        None,
        DataPlane::Envoy,
        vec![],
    )
    .await
    .expect("mesh starts");
    let (s, body) = ask(&mesh, "/", &[]).await.unwrap();
    assert_eq!(s, 200);
    assert!(
        body.contains("\"cluster\": \"east\""),
        "same zone first: {body}"
    );

    routing_holds(&mesh).await;
    // Envoy holds the subset clusters, and mirrored the default route to v2.
    let (_, stats) = mesh
        .get("proxy-client-east", "admin", "/stats")
        .await
        .unwrap();
    let mirrored = isthmus_e2e::counter_value(
        &stats.replace(": ", " "),
        "cluster.outbound|8080|v2|echo.demo.svc.cluster.local.upstream_rq_total",
        &[],
    );
    assert!(mirrored >= 10.0, "v2 got the mirrored requests: {mirrored}");
    mesh.wait_all_synced(5, PATIENCE).await;

    // The whole valid corpus: every kind, and Envoy ACKs all that follows.
    apply_and_sync(&mesh, CORPUS).await;
    for proxy in ["proxy-client-east", "proxy-echo-west"] {
        let (_, stats) = mesh.get(proxy, "admin", "/stats").await.unwrap();
        for line in stats.lines().filter(|l| l.contains("update_rejected")) {
            assert!(line.ends_with(": 0"), "{proxy} rejected an update: {line}");
        }
    }
    // Envoy's config dump holds the very versions the primary sent it.
    // (Routes are left out: Envoy keeps a route table's old version_info
    // when an update leaves its content unchanged.)
    let proxies = mesh.state.client().unwrap().proxies().await.unwrap();
    let node = proxies
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["nodeId"] == "sidecar~east~client-east")
        .unwrap()
        .clone();
    let (_, dump) = mesh
        .get("proxy-client-east", "admin", "/config_dump")
        .await
        .unwrap();
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    for (section, ty) in [
        ("ClustersConfigDump", "Cluster"),
        ("ListenersConfigDump", "Listener"),
    ] {
        let config = dump["configs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["@type"].as_str().unwrap_or_default().ends_with(section))
            .unwrap();
        let text = config.to_string();
        let sent = node["types"][ty]["sentVersion"].as_str().unwrap();
        assert!(
            text.contains(&format!("\"version_info\":\"{sent}\"")),
            "Envoy's {section} does not hold version {sent}"
        );
    }
    let (s, _) = ask(&mesh, "/", &[]).await.unwrap();
    assert_eq!(s, 200, "traffic still flows under the corpus");

    authorization_holds(&mesh).await;
    path_rules_hold(&mesh, DataPlane::Envoy).await;
    peer_authentication_holds(&mesh).await;
    mesh.wait_all_synced(5, PATIENCE).await;
}

/// Applies `docs` and waits for the five proxies and gateways to ACK them.
async fn apply_and_sync(mesh: &Mesh, docs: &str) {
    mesh.state
        .client()
        .unwrap()
        .apply(docs.to_string())
        .await
        .unwrap();
    mesh.wait_all_synced(5, PATIENCE).await;
}

/// PeerAuthentication at echo's inbound listener, the same on both data
/// planes: under the corpus's STRICT, plaintext is refused; PERMISSIVE takes
/// it (and strips a forged x-forwarded-client-cert), mTLS still works; a
/// workload's port-level STRICT overrides its namespace's PERMISSIVE;
/// port-level DISABLE takes only plaintext.
async fn peer_authentication_holds(mesh: &Mesh) {
    let client = mesh.state.client().unwrap();
    let plain = || async {
        probe::get_with(
            mesh.netns("proxy-client-east"),
            mesh.listener("proxy-echo-east", "inbound"),
            "http://echo.demo.svc.cluster.local:8080/",
            &[(
                "x-forwarded-client-cert",
                "URI=spiffe://cluster.local/ns/demo/sa/forged",
            )],
        )
        .await
        .ok()
    };
    assert!(plain().await.is_none(), "STRICT refuses plaintext");
    client.apply(PERMISSIVE.to_string()).await.unwrap();
    let body = eventually("PERMISSIVE to take plaintext", PATIENCE, || async {
        let (s, body) = plain().await?;
        (s == 200).then_some(body)
    })
    .await;
    assert!(
        !body.contains("forged"),
        "a caller's XFCC reached the app: {body}"
    );
    let (s, _) = ask(mesh, "/", &[]).await.unwrap();
    assert_eq!(s, 200, "mTLS from the mesh still works under PERMISSIVE");
    client.apply(PORT_STRICT.to_string()).await.unwrap();
    eventually(
        "port-level STRICT to refuse plaintext",
        PATIENCE,
        || async { plain().await.is_none().then_some(()) },
    )
    .await;
    let (s, body) = ask(mesh, "/", &[]).await.unwrap();
    assert_eq!(s, 200, "mTLS from the mesh works under STRICT: {body}");
    // DISABLE: plaintext only, so the mesh's mTLS callers cannot reach it.
    client.apply(PORT_DISABLE.to_string()).await.unwrap();
    eventually("port-level DISABLE to take plaintext", PATIENCE, || async {
        let (s, _) = plain().await?;
        (s == 200).then_some(())
    })
    .await;
    eventually("port-level DISABLE to refuse mTLS", PATIENCE, || async {
        let (s, _) = ask(mesh, "/", &[]).await?;
        (s != 200).then_some(())
    })
    .await;
    client.apply(PORT_STRICT.to_string()).await.unwrap();
    eventually("STRICT again to take mTLS", PATIENCE, || async {
        let (s, _) = ask(mesh, "/", &[]).await?;
        (s == 200).then_some(())
    })
    .await;
}

/// RULES applied and followed, the same on both data planes: the canary
/// header goes to v2, which lives only in west (across networks), /teapot
/// gets the injected 418, the rest goes to v1 in east.
async fn routing_holds(mesh: &Mesh) {
    mesh.state
        .client()
        .unwrap()
        .apply(RULES.to_string())
        .await
        .unwrap();
    eventually("the canary route to reach west", PATIENCE, || async {
        let (s, body) = ask(mesh, "/", &[("x-canary", "true")]).await?;
        (s == 200 && body.contains("\"cluster\": \"west\"")).then_some(())
    })
    .await;
    eventually("the teapot fault to apply", PATIENCE, || async {
        let (s, _) = ask(mesh, "/teapot", &[]).await?;
        (s == 418).then_some(())
    })
    .await;
    for _ in 0..10 {
        let (s, body) = ask(mesh, "/", &[("x-canary", "true")]).await.unwrap();
        assert!(
            s == 200 && body.contains("\"cluster\": \"west\""),
            "{s} {body}"
        );
        let (s, body) = ask(mesh, "/", &[]).await.unwrap();
        assert!(
            s == 200 && body.contains("\"cluster\": \"east\""),
            "v1 is east: {s} {body}"
        );
    }
}

/// Authorization at echo's inbound listener, the same on both data planes.
/// The corpus ALLOWs demo/client's GETs on 8080, which is what the client
/// sends.
async fn authorization_holds(mesh: &Mesh) {
    let client = mesh.state.client().unwrap();
    client.apply(DENY_SECRET.to_string()).await.unwrap();
    eventually("a DENY policy to refuse /secret", PATIENCE, || async {
        let (s, body) = ask(mesh, "/secret/x", &[]).await?;
        (s == 403 && body.contains("RBAC: access denied")).then_some(())
    })
    .await;
    let (s, _) = ask(mesh, "/", &[]).await.unwrap();
    assert_eq!(s, 200, "the DENY policy leaves other paths alone");
    // Only ALLOW policies that do not match the client: refused; the one
    // with a header condition lets it in when the header is there.
    client
        .delete_config("authorizationpolicies", "demo", "echo")
        .await
        .unwrap();
    client.apply(ALLOW_OTHERS.to_string()).await.unwrap();
    eventually(
        "ALLOW policies that do not match to refuse",
        PATIENCE,
        || async {
            let (s, body) = ask(mesh, "/", &[]).await?;
            (s == 403 && body.contains("RBAC: access denied")).then_some(())
        },
    )
    .await;
    let (s, _) = ask(mesh, "/", &[("x-pass", "yes")]).await.unwrap();
    assert_eq!(s, 200, "the when-condition admits the request with x-pass");
    let (s, _) = ask(mesh, "/secret/x", &[("x-pass", "yes")]).await.unwrap();
    assert_eq!(s, 403, "DENY still comes first");
    for name in ["deny-secret", "prod-only", "with-pass"] {
        client
            .delete_config("authorizationpolicies", "demo", name)
            .await
            .unwrap();
    }
    eventually(
        "traffic to flow again without policies",
        PATIENCE,
        || async {
            let (s, _) = ask(mesh, "/", &[]).await?;
            (s == 200).then_some(())
        },
    )
    .await;
}

/// One raw HTTP/1.1 request line and headers, sent as written (curl and
/// hyper would normalise the path themselves) to the client's outbound
/// listener from inside its namespace; the status, or None if the
/// connection gave no status line.
async fn raw(mesh: &Mesh, target: &str, extra_headers: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = isthmus_topology::netns::connect(
        mesh.netns("proxy-client-east"),
        mesh.listener("proxy-client-east", "outbound"),
    )
    .await
    .ok()?;
    let request = format!(
        "GET {target} HTTP/1.1\r\nhost: echo.demo.svc.cluster.local:8080\r\n{extra_headers}connection: close\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
        .await
        .ok()?
        .ok()?;
    let answer = String::from_utf8_lossy(&answer);
    answer.split(' ').nth(1)?.parse().ok()
}

/// Lines of the echo apps' request logs (both clusters) for a path under
/// `/admin`: what the backend saw of the denied paths.
fn admin_requests_seen(mesh: &Mesh) -> Vec<String> {
    ["echo-east", "echo-west"]
        .iter()
        .flat_map(|app| {
            std::fs::read_to_string(mesh.dir().join("logs").join(format!("{app}.log")))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("request") && l.contains("path=\"/admin"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A DENY on `/admin` (and below it) holds against the path tricks of
/// Istio's normalisation advisories, on either data plane, under the
/// default DECODE_AND_MERGE_SLASHES: every variant is refused and the app
/// never sees it. Each entry: the request target, extra header lines, and
/// the statuses accepted from (Envoy, isthmus-proxy).
const PATH_CORPUS: &[(&str, &str, u16, u16)] = &[
    ("/admin", "", 403, 403),
    ("//admin", "", 403, 403),
    ("///admin", "", 403, 403),
    ("/./admin", "", 403, 403),
    ("/a/../admin", "", 403, 403),
    ("/admin/../admin", "", 403, 403),
    ("/../admin", "", 403, 403),
    ("/a//../../admin", "", 403, 403),
    ("/%2Fadmin", "", 403, 403),
    ("/%2fadmin", "", 403, 403),
    ("/a%2F..%2Fadmin", "", 403, 403),
    ("/%5Cadmin", "", 403, 403),
    ("/%5cadmin", "", 403, 403),
    ("/a\\..\\admin", "", 403, 403),
    ("/%2e/admin", "", 403, 403),
    ("/%2E/admin", "", 403, 403),
    ("/x/%2e%2e/admin", "", 403, 403),
    ("/x/.%2E/admin", "", 403, 403),
    ("/%61dmin", "", 403, 403),
    ("/%61%64%6D%69%6e", "", 403, 403),
    ("/ad%6Din", "", 403, 403),
    ("/admin?x", "", 403, 403),
    ("/admin?x=/public", "", 403, 403),
    ("/admin/", "", 403, 403),
    ("/admin/x", "", 403, 403),
    ("/admin//x/./y", "", 403, 403),
    // Envoy refuses a fragment outright; hyper drops it before
    // isthmus-proxy sees the path, which is then /admin.
    ("/admin#x", "", 400, 403),
    // Headers some apps take a path from change nothing.
    (
        "/admin",
        "x-original-url: /public\r\nx-rewrite-url: /public\r\nx-envoy-original-path: /public\r\n",
        403,
        403,
    ),
    // A duplicated and a multi-valued header: the path still decides.
    (
        "/admin",
        "x-pass: yes\r\nx-pass: no\r\naccept: a/b, */*\r\naccept: text/plain\r\n",
        403,
        403,
    ),
];

async fn path_rules_hold(mesh: &Mesh, plane: DataPlane) {
    let client = mesh.state.client().unwrap();
    client.apply(DENY_ADMIN.to_string()).await.unwrap();
    eventually("a DENY policy to refuse /admin", PATIENCE, || async {
        (raw(mesh, "/admin", "").await? == 403).then_some(())
    })
    .await;
    assert_eq!(raw(mesh, "/", "").await, Some(200), "other paths pass");
    // Requests sent before the policy arrived did reach the app.
    let before = admin_requests_seen(mesh);
    let mut wrong = Vec::new();
    for (target, headers, envoy, isthmus) in PATH_CORPUS {
        let want = if plane == DataPlane::Envoy {
            *envoy
        } else {
            *isthmus
        };
        let got = raw(mesh, target, headers).await;
        if got != Some(want) {
            wrong.push(format!("{target:?} {headers:?}: {got:?}, want {want}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{plane:?}: variants not refused: {wrong:#?}"
    );
    assert!(PATH_CORPUS.len() >= 20);
    // The app answers /public, so its log is being written, and holds no
    // request for /admin.
    assert_eq!(raw(mesh, "/public", "").await, Some(200));
    eventually("the app to log /public", PATIENCE, || async {
        ["echo-east", "echo-west"]
            .iter()
            .any(|app| {
                std::fs::read_to_string(mesh.dir().join("logs").join(format!("{app}.log")))
                    .unwrap_or_default()
                    .contains("path=\"/public\"")
            })
            .then_some(())
    })
    .await;
    let seen: Vec<String> = admin_requests_seen(mesh)
        .into_iter()
        .filter(|line| !before.contains(line))
        .collect();
    assert!(seen.is_empty(), "the app saw denied paths: {seen:#?}");
    // The Mesh object decides: under NONE the doubled slash is what Istio
    // warns of, a path the rule does not match; back to the default, it
    // is refused again.
    client.apply(mesh_paths("NONE")).await.unwrap();
    eventually("NONE to let //admin past the rule", PATIENCE, || async {
        (raw(mesh, "//admin", "").await? == 200).then_some(())
    })
    .await;
    assert_eq!(raw(mesh, "/admin", "").await, Some(403));
    client.apply(mesh_paths("DEFAULT")).await.unwrap();
    eventually("the default to refuse //admin again", PATIENCE, || async {
        (raw(mesh, "//admin", "").await? == 403).then_some(())
    })
    .await;
    client
        .delete_config("authorizationpolicies", "demo", "deny-admin")
        .await
        .unwrap();
    eventually("/admin to pass without the policy", PATIENCE, || async {
        (raw(mesh, "/admin", "").await? == 200).then_some(())
    })
    .await;
}

/// The corpus's Mesh object, with a path normalisation.
fn mesh_paths(normalization: &str) -> String {
    format!(
        "apiVersion: isthmus.io/v1\nkind: Mesh\nmetadata: {{name: mesh}}\n\
         spec: {{trustDomain: cluster.local, pathNormalization: {{normalization: {normalization}}}}}\n"
    )
}

const DENY_ADMIN: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin", "/admin/*"]}}]}]
"#;

const PERMISSIVE: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: demo}
spec: {mtls: {mode: PERMISSIVE}}
"#;

const PORT_STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: echo, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  mtls: {mode: UNSET}
  portLevelMtls: {"8080": {mode: STRICT}}
"#;

const PORT_DISABLE: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: echo, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  portLevelMtls: {"8080": {mode: DISABLE}}
"#;

const DENY_SECRET: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-secret, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/secret*"]}}]}]
"#;

const ALLOW_OTHERS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: prod-only, namespace: demo}
spec:
  action: ALLOW
  rules: [{from: [{source: {namespaces: [prod]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: with-pass, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/demo/sa/client"]}}]
    to: [{operation: {methods: [GET], ports: ["8080"]}}]
    when: [{key: "request.headers[x-pass]", values: ["yes"]}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isthmus_proxies_ack_the_whole_corpus() {
    if !can_run("isthmus_proxies_ack_the_whole_corpus", false) {
        return;
    }
    let mesh = Mesh::up(NetMode::Netns, NODE).await.expect("mesh starts");
    // isthmus-proxy follows the same VirtualService routes as Envoy, and
    // mirrored the default route's requests to v2.
    routing_holds(&mesh).await;
    let mirrored = mesh
        .counter(
            "proxy-client-east",
            "isthmus_proxy_upstream_requests_total",
            &["outbound|8080|v2|echo.demo.svc.cluster.local", "mirror"],
        )
        .await
        .unwrap();
    assert!(mirrored >= 10.0, "v2 got the mirrored requests: {mirrored}");
    // proxy-config shows the routes it follows, in match order.
    let routes = isthmus_topology::inspect::proxy_config(
        mesh.dir(),
        "client-east",
        isthmus_topology::inspect::ProxyConfigKind::Routes,
    )
    .await
    .unwrap();
    assert_eq!(
        routes["outboundRoutes"]["echo.demo.svc.cluster.local:8080"],
        serde_json::json!(["canary", "teapot", "default"]),
        "{routes}"
    );
    let by_address = isthmus_topology::inspect::proxy_config_at(
        &isthmus_topology::inspect::AdminTarget {
            name: "client".into(),
            admin: mesh.listener("proxy-client-east", "admin"),
            netns: mesh.netns("proxy-client-east").map(str::to_string),
        },
        isthmus_topology::inspect::ProxyConfigKind::Routes,
    )
    .await
    .unwrap();
    assert_eq!(by_address, routes, "the same by admin address alone");
    mesh.wait_all_synced(5, PATIENCE).await;
    apply_and_sync(&mesh, CORPUS).await;
    let (s, body) = ask(&mesh, "/", &[]).await.unwrap();
    assert_eq!(s, 200, "{body}");
    // isthmus-proxy enforces the same AuthorizationPolicies, from the same
    // RBAC rules in its inbound route configurations.
    authorization_holds(&mesh).await;
    path_rules_hold(&mesh, DataPlane::Isthmus).await;
    // ...and takes plaintext as PeerAuthentication says.
    peer_authentication_holds(&mesh).await;

    // A DestinationRule's connection pool: one connection and one waiting
    // request; of six concurrent slow requests, some are refused at once.
    mesh.state
        .client()
        .unwrap()
        .apply(ONE_CONNECTION.to_string())
        .await
        .unwrap();
    let (ok, refused) = eventually("the connection pool to overflow", PATIENCE, || async {
        let round = futures::future::join_all((0..6).map(|_| ask(&mesh, "/delay/500", &[]))).await;
        let ok = round.iter().flatten().filter(|(s, _)| *s == 200).count();
        let refused: Vec<String> = round
            .into_iter()
            .flatten()
            .filter(|(s, _)| *s == 503)
            .map(|(_, body)| body)
            .collect();
        (ok >= 1 && !refused.is_empty()).then_some((ok, refused))
    })
    .await;
    assert!(ok + refused.len() == 6, "every request was answered");
    assert!(
        refused
            .iter()
            .all(|b| b.contains("of the cluster's 1 connections (DestinationRule connectionPool)")),
        "{refused:?}"
    );
    mesh.wait_all_synced(5, PATIENCE).await;
}

const ONE_CONNECTION: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: demo}
spec:
  host: echo
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;
