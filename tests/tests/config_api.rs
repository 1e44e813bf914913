//! The config API's validation corpus, against a primary running in-process:
//! a valid baseline of every kind is stored, then every invalid document is
//! refused with a 4xx that names the field path, nothing of it is stored,
//! and the baseline stays exactly as it was.

// Test code: a panic is how an assertion fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use isthmus_e2e::InProcessPrimary;

const BASELINE: &str = include_str!("../fixtures/valid-corpus.yaml");

fn vs(route: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: bad, namespace: demo}}\nspec:\n  hosts: [echo]\n  http:\n  - {route}\n"
    )
}

/// (what, document, the field path the error must name)
fn corpus() -> Vec<(&'static str, String, &'static str)> {
    let dr = |spec: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: bad, namespace: demo}}\nspec: {spec}\n"
        )
    };
    let se = |spec: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: bad, namespace: demo}}\nspec: {spec}\n"
        )
    };
    let gw = |spec: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: bad, namespace: demo}}\nspec: {spec}\n"
        )
    };
    let sec = |kind: &str, spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata: {{name: bad, namespace: demo}}\nspec: {spec}\n"
        )
    };
    let mut big = String::from(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: big}\nspec: {servers: []}\n# ",
    );
    big.push_str(&"x".repeat(10 * 1024 * 1024));
    vec![
        ("weights not summing to 100", vs("route: [{destination: {host: echo}, weight: 60}, {destination: {host: echo}, weight: 30}]"), "spec.http[0].route[1].weight"),
        ("a weight over 100", vs("route: [{destination: {host: echo}, weight: 150}]"), "spec.http[0].route[0].weight"),
        ("a weight of the wrong type", vs("route: [{destination: {host: echo}, weight: heavy}]"), "spec.http[0].route[0].weight"),
        ("an unknown host", vs("route: [{destination: {host: nosuch}}]"), "spec.http[0].route[0].destination.host"),
        ("an unknown subset", vs("route: [{destination: {host: echo, subset: v9}}]"), "spec.http[0].route[0].destination.subset"),
        ("a route without destination", vs("route: [{weight: 100}]"), "spec.http[0].route[0].destination"),
        ("no route at all", vs("name: empty"), "spec.http[0].route"),
        ("a bad timeout", vs("route: [{destination: {host: echo}}]\n    timeout: soon"), "spec.http[0].timeout"),
        ("negative retries", vs("route: [{destination: {host: echo}}]\n    retries: {attempts: -1}"), "spec.http[0].retries.attempts"),
        ("an abort without status", vs("route: [{destination: {host: echo}}]\n    fault: {abort: {percentage: {value: 10}}}"), "spec.http[0].fault.abort.httpStatus"),
        ("a fault percentage over 100", vs("route: [{destination: {host: echo}}]\n    fault: {delay: {percentage: {value: 150}, fixedDelay: 1s}}"), "spec.http[0].fault.delay.percentage.value"),
        ("a string match with two kinds", vs("match: [{uri: {exact: /a, prefix: /b}}]\n    route: [{destination: {host: echo}}]"), "spec.http[0].match[0].uri"),
        ("a mirror to an unknown host", vs("route: [{destination: {host: echo}}]\n    mirror: {host: ghost}"), "spec.http[0].mirror.host"),
        ("no hosts", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad, namespace: demo}\nspec: {hosts: [], http: [{route: [{destination: {host: echo}}]}]}\n".into(), "spec.hosts"),
        ("hosts of the wrong type", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad, namespace: demo}\nspec: {hosts: echo}\n".into(), "spec.hosts"),
        ("duplicate route names", vs("name: a\n    route: [{destination: {host: echo}}]\n  - name: a\n    route: [{destination: {host: echo}}]"), "spec.http[1].name"),
        ("duplicate subset names", dr("{host: echo, subsets: [{name: v1}, {name: v1}]}"), "spec.subsets[1].name"),
        ("a subset name that is not a label", dr("{host: echo, subsets: [{name: V_1}]}"), "spec.subsets[0].name"),
        ("no host in a DestinationRule", dr("{subsets: []}"), "spec.host"),
        ("an unknown load balancer", dr("{host: echo, trafficPolicy: {loadBalancer: {simple: FASTEST}}}"), "spec.trafficPolicy.loadBalancer.simple"),
        ("a bad ejection interval", dr("{host: echo, trafficPolicy: {outlierDetection: {interval: often}}}"), "spec.trafficPolicy.outlierDetection.interval"),
        ("an ejection percent over 100", dr("{host: echo, trafficPolicy: {outlierDetection: {maxEjectionPercent: 101}}}"), "spec.trafficPolicy.outlierDetection.maxEjectionPercent"),
        ("an unknown TLS mode", dr("{host: echo, trafficPolicy: {tls: {mode: SOMETIMES}}}"), "spec.trafficPolicy.tls.mode"),
        ("a gateway port of 0", gw("{servers: [{port: {number: 0, name: x, protocol: HTTP}, hosts: [a]}]}"), "spec.servers[0].port.number"),
        ("a gateway protocol that does not exist", gw("{servers: [{port: {number: 80, name: x, protocol: GOPHER}, hosts: [a]}]}"), "spec.servers[0].port.protocol"),
        ("a gateway server without hosts", gw("{servers: [{port: {number: 80, name: x, protocol: HTTP}, hosts: []}]}"), "spec.servers[0].hosts"),
        ("duplicate ServiceEntry ports", se("{hosts: [a.example.com], ports: [{number: 80, name: a}, {number: 80, name: b}]}"), "spec.ports[1].number"),
        ("a STATIC entry without endpoints", se("{hosts: [a.example.com], resolution: STATIC}"), "spec.endpoints"),
        ("an endpoint that is not an IP", se("{hosts: [a.example.com], resolution: STATIC, endpoints: [{address: somewhere}]}"), "spec.endpoints[0].address"),
        ("an unknown resolution", se("{hosts: [a.example.com], resolution: ALWAYS}"), "spec.resolution"),
        ("an unknown mTLS mode", sec("PeerAuthentication", "{mtls: {mode: LOOSE}}"), "spec.mtls.mode"),
        ("a port-level mTLS key that is no port", sec("PeerAuthentication", "{portLevelMtls: {http: {mode: STRICT}}}"), "spec.portLevelMtls.http"),
        ("an unknown policy action", sec("AuthorizationPolicy", "{action: MAYBE}"), "spec.action"),
        ("a policy port that is no port", sec("AuthorizationPolicy", "{rules: [{to: [{operation: {ports: [eighty]}}]}]}"), "spec.rules[0].to[0].operation.ports[0]"),
        ("a condition without key", sec("AuthorizationPolicy", "{rules: [{when: [{values: [a]}]}]}"), "spec.rules[0].when[0].key"),
        ("a CUSTOM policy (no external authorizer)", sec("AuthorizationPolicy", "{action: CUSTOM}"), "spec.action"),
        ("a policy source by IP block (not supported)", sec("AuthorizationPolicy", "{rules: [{from: [{source: {ipBlocks: [10.0.0.0/8]}}]}]}"), "spec.rules[0].from[0].source.ipBlocks"),
        ("a policy on hosts (not supported)", sec("AuthorizationPolicy", "{rules: [{to: [{operation: {hosts: [a.example.com]}}]}]}"), "spec.rules[0].to[0].operation.hosts"),
        ("a policy namespace that is no namespace", sec("AuthorizationPolicy", "{rules: [{from: [{source: {namespaces: [\"a/b\"]}}]}]}"), "spec.rules[0].from[0].source.namespaces[0]"),
        ("a wildcard in the middle of a path", sec("AuthorizationPolicy", "{rules: [{to: [{operation: {paths: [\"/a*b\"]}}]}]}"), "spec.rules[0].to[0].operation.paths[0]"),
        ("an unsupported condition key", sec("AuthorizationPolicy", "{rules: [{when: [{key: source.ip, values: [10.0.0.1]}]}]}"), "spec.rules[0].when[0].key"),
        ("a condition without values", sec("AuthorizationPolicy", "{rules: [{when: [{key: source.namespace}]}]}"), "spec.rules[0].when[0]"),
        ("a JWT rule without issuer", sec("RequestAuthentication", "{jwtRules: [{jwksUri: \"https://a\"}]}"), "spec.jwtRules[0].issuer"),
        ("a plain-HTTP JWKS URL", sec("RequestAuthentication", "{jwtRules: [{issuer: a, jwksUri: \"http://a\"}]}"), "spec.jwtRules[0].jwksUri"),
        ("a Sidecar egress host without namespace", "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: bad, namespace: demo}\nspec: {egress: [{hosts: [echo]}]}\n".into(), "spec.egress[0].hosts[0]"),
        ("a cluster gateway that is no IP", "apiVersion: isthmus.io/v1\nkind: Cluster\nmetadata: {name: bad}\nspec: {network: net-x, gateways: [gw.example.com]}\n".into(), "spec.gateways[0]"),
        ("an uppercase trust domain", "apiVersion: isthmus.io/v1\nkind: Mesh\nmetadata: {name: bad}\nspec: {trustDomain: Cluster.Local}\n".into(), "spec.trustDomain"),
        ("an unknown kind", "apiVersion: networking.istio.io/v1\nkind: EnvoyFilter\nmetadata: {name: bad}\nspec: {}\n".into(), "kind"),
        ("a wrong API group", "apiVersion: security.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad}\nspec: {hosts: [echo], http: [{route: [{destination: {host: echo}}]}]}\n".into(), "apiVersion"),
        ("an invalid name", "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: Bad_Name}\nspec: {servers: [{port: {number: 80, name: x, protocol: HTTP}, hosts: [a]}]}\n".into(), "metadata.name"),
        ("a name of the wrong type", "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: [a]}\nspec: {}\n".into(), "metadata.name"),
        ("a spec that is no object", "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: a}\nspec: [1, 2]\n".into(), "spec"),
        ("the same object twice", format!("{}---\n{}", se("{hosts: [a.example.com]}"), se("{hosts: [b.example.com]}")), "metadata.name"),
        ("a valid document next to an invalid one", format!("{}---\n{}", gw("{servers: [{port: {number: 80, name: x, protocol: HTTP}, hosts: [a]}]}"), dr("{subsets: []}")), "spec.host"),
        ("broken YAML", "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: a\nspec: [".into(), "YAML"),
        ("a 10 MB document", big, "bytes"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_is_refused_with_its_field_path_and_nothing_is_stored() {
    let p = InProcessPrimary::start().await;
    let applied = p
        .api
        .apply(BASELINE.to_string())
        .await
        .expect("the baseline is valid");
    assert_eq!(applied.len(), 10);
    let snapshot = || async {
        let mut all = Vec::new();
        for k in isthmus_api::config::KINDS {
            all.extend(p.api.list_config(k.plural, None).await.unwrap());
        }
        serde_json::to_string(&all).unwrap()
    };
    let before = snapshot().await;

    let corpus = corpus();
    assert!(
        corpus.len() >= 30,
        "the corpus has {} documents",
        corpus.len()
    );
    for (what, doc, path) in corpus {
        let err = p.api.apply(doc).await.expect_err(what).to_string();
        assert!(err.starts_with("4"), "{what}: expected a 4xx, got {err}");
        assert!(
            err.contains(path),
            "{what}: the error does not name {path}: {err}"
        );
    }
    assert_eq!(
        snapshot().await,
        before,
        "refused documents changed what was stored"
    );
    assert!(p.api.get_config("gateways", "demo", "bad").await.is_err());
    assert!(
        p.api.get_config("gateways", "default", "a").await.is_err(),
        "half of a refused batch was stored"
    );

    // resourceVersion gives optimistic concurrency.
    let gw = p
        .api
        .get_config("Gateway", "demo", "ingress")
        .await
        .unwrap();
    let stale = gw.clone();
    let mut update = gw.clone();
    update.spec["servers"][0]["hosts"] = serde_json::json!(["api.example.com"]);
    let updated = p
        .api
        .apply(serde_json::to_string(&update).unwrap())
        .await
        .expect("update at the current version");
    assert_ne!(
        updated[0].metadata.resource_version,
        gw.metadata.resource_version
    );
    let conflict = p
        .api
        .apply(serde_json::to_string(&stale).unwrap())
        .await
        .expect_err("stale version");
    assert!(conflict.to_string().starts_with("409"), "{conflict}");
    assert_eq!(
        p.api
            .get_config("gateways", "demo", "ingress")
            .await
            .unwrap()
            .spec["servers"][0]["hosts"][0],
        "api.example.com"
    );

    p.api
        .delete_config("virtualservices", "demo", "echo")
        .await
        .unwrap();
    assert!(
        p.api
            .get_config("virtualservices", "demo", "echo")
            .await
            .is_err()
    );
}
