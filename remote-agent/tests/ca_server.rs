//! The agent's workload CA over its real Unix socket: identities come from
//! the credential, each identity is rate-limited without slowing others,
//! issuance is counted, and `Watch` reports a new generation when the trust
//! bundle or the intermediate changes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use governor::Quota;
use isthmus_agent::ca_server::{self, Limits, Metrics};
use isthmus_agent::join::{Credentials, Live};
use isthmus_agent::registry::Registry;
use isthmus_api::pb::ca::certificate_service_client::CertificateServiceClient;
use isthmus_api::pb::ca::{CreateCertificateRequest, WatchRequest};
use isthmus_ca::{Authority, Signer, TrustBundle};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

fn registry(tokens: &[(&str, &str)]) -> Registry {
    let workloads: Vec<String> = tokens
        .iter()
        .enumerate()
        .map(|(i, (account, token))| {
            format!(
                "  - {{name: w{i}, namespace: demo, serviceAccount: {account}, address: 198.51.100.{}, tokenSha256: {}}}",
                10 + i,
                hex::encode(Sha256::digest(token.as_bytes()))
            )
        })
        .collect();
    Registry::parse(&format!(
        "services: []\nworkloads:\n{}\n",
        workloads.join("\n")
    ))
    .unwrap()
}

fn credentials(root: &Authority) -> (Credentials, String) {
    let (csr, key) = isthmus_ca::issue::generate_csr("east").unwrap();
    let inter = root.sign_intermediate(&csr, "east").unwrap();
    let creds = Credentials {
        signer: Signer::from_pem(&inter.pem, &key).unwrap(),
        bundle: TrustBundle::from_der("cluster.local", vec![root.cert().clone()]).unwrap(),
        intermediate_pem: inter.pem.clone(),
        bundle_sequence: 1,
        agent_key_pem: isthmus_ca::issue::generate_pinned_key().unwrap().0.into(),
    };
    (creds, key)
}

async fn ask(
    client: &mut CertificateServiceClient<tonic::transport::Channel>,
    token: &str,
) -> Result<isthmus_api::pb::ca::CreateCertificateResponse, tonic::Status> {
    ask_for(client, token, 0).await
}

async fn ask_for(
    client: &mut CertificateServiceClient<tonic::transport::Channel>,
    token: &str,
    validity_duration: i64,
) -> Result<isthmus_api::pb::ca::CreateCertificateResponse, tonic::Status> {
    let (csr, _) = isthmus_ca::issue::generate_csr("w").unwrap();
    let mut req = tonic::Request::new(CreateCertificateRequest {
        csr,
        validity_duration,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    client.create_certificate(req).await.map(|r| r.into_inner())
}

#[tokio::test]
async fn rate_limits_are_per_identity_and_watch_reports_changes() {
    isthmus_ca::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let root = Authority::generate("cluster.local").unwrap();
    let (creds, key) = credentials(&root);
    std::fs::write(dir.path().join("intermediate.pem"), &creds.intermediate_pem).unwrap();
    std::fs::write(dir.path().join("intermediate-key.pem"), &key).unwrap();
    let live = Arc::new(Live::new(dir.path(), creds));
    let (_reg_tx, reg_rx) = watch::channel(Arc::new(registry(&[
        ("busy", "t-busy"),
        ("calm", "t-calm"),
    ])));
    let metrics = Metrics::default();
    let socket = dir.path().join("ca.sock");
    // Three certificates per identity, then one an hour: the test cannot
    // outrun the refill.
    let limits = Limits {
        quota: Quota::per_hour(std::num::NonZeroU32::new(1).unwrap())
            .allow_burst(std::num::NonZeroU32::new(3).unwrap()),
        describe: "1/h (burst 3)".into(),
    };
    let server = ca_server::serve(
        socket.clone(),
        live.clone(),
        ca_server::WorkloadAuth::Registry(reg_rx),
        "east".into(),
        limits,
        metrics.clone(),
    )
    .unwrap();
    tokio::spawn(server);
    let mut client = CertificateServiceClient::new(isthmus_transport::uds_channel(socket));

    // Watch first: the current generation, then one per change.
    let mut req = tonic::Request::new(WatchRequest {});
    req.metadata_mut()
        .insert("authorization", "Bearer t-calm".parse().unwrap());
    let mut events = client.watch(req).await.unwrap().into_inner();
    let first = events.message().await.unwrap().unwrap();

    for _ in 0..3 {
        ask(&mut client, "t-busy").await.expect("within the burst");
    }
    let refused = ask(&mut client, "t-busy").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(
        refused
            .message()
            .contains("spiffe://cluster.local/ns/demo/sa/busy")
            && refused.message().contains("1/h (burst 3)"),
        "{refused}"
    );
    // Another identity is unaffected.
    let calm = ask(&mut client, "t-calm").await.expect("another identity");
    assert_eq!(calm.bundle_sequence, 1);
    // A negative lifetime is refused by name, not turned into the default.
    let negative = ask_for(&mut client, "t-calm", -5).await.unwrap_err();
    assert_eq!(negative.code(), tonic::Code::InvalidArgument, "{negative}");
    assert!(negative.message().contains("-5 is negative"), "{negative}");
    // An unknown credential is refused before any limit applies.
    let unknown = ask(&mut client, "t-nobody").await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::Unauthenticated);

    let mut text = String::new();
    let mut reg = prometheus_client::registry::Registry::default();
    metrics.register(&mut reg);
    prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
    let value = |needle: &str| -> f64 {
        text.lines()
            .filter(|l| l.contains(needle) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(
        value("certificates_issued_total{identity=\"spiffe://cluster.local/ns/demo/sa/busy\"}"),
        3.0,
        "{text}"
    );
    assert_eq!(
        value("certificate_requests_refused_total{reason=\"rate_limited\"}"),
        1.0,
        "{text}"
    );

    // A new bundle (a second root) bumps the generation; so does a new
    // intermediate, and certificates then come from it.
    let next = Authority::generate("cluster.local").unwrap();
    let roots = format!("{}{}", root.cert_pem(), next.cert_pem());
    assert!(
        live.update_bundle(&roots, "", &Default::default(), 2)
            .unwrap()
    );
    assert!(
        !live
            .update_bundle(&roots, "", &Default::default(), 2)
            .unwrap(),
        "an old sequence is ignored"
    );
    let bundle_event = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(bundle_event.generation > first.generation);
    assert_eq!(bundle_event.reason, "trust bundle");
    let (csr, new_key) = isthmus_ca::issue::generate_csr("east").unwrap();
    let new_inter = next.sign_intermediate(&csr, "east").unwrap();
    live.replace_intermediate(&new_inter.pem, &new_key).unwrap();
    let inter_event = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(inter_event.generation > bundle_event.generation);
    assert_eq!(inter_event.reason, "intermediate");
    let after = ask(&mut client, "t-calm").await.unwrap();
    assert_eq!(after.cert_chain[1], new_inter.pem);
    assert_eq!(after.trust_bundle.len(), 2);
    // Both survive a restart: they are on disk.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("intermediate.pem")).unwrap(),
        new_inter.pem
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("bundle-sequence")).unwrap(),
        "2"
    );
}
