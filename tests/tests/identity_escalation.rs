//! No climbing from a workload to a cluster CA or to the primary, against a
//! real primary in process:
//! - a certificate that carries a cluster's agent identity, signed by that
//!   cluster's own intermediate but over a key other than the one the agent
//!   pinned at join, is refused on the sync stream and for
//!   `RenewIntermediate` (the real agent's certificate is accepted);
//! - a join that pins no agent key is refused;
//! - a server certificate for the primary's names (`isthmus-primary`,
//!   127.0.0.1), signed with a cluster intermediate's key, is refused by
//!   the TLS client every component uses for the primary and by the CLI's
//!   REST client.
//!
//! The agent CA refusing the agent's identity to workloads is covered in
//! `remote-agent/tests/tokenreview.rs` (Kubernetes mode) and by the
//! registry's and the signer's own tests (file registry).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use isthmus_api::pb::sync::sync_client::SyncClient;
use isthmus_api::pb::sync::{JoinRequest, RenewRequest};
use isthmus_ca::Signer;
use isthmus_e2e::{InProcessPrimary, TEST_AGENT_KEY, agent_tls, workload_tls};
use tokio_stream::wrappers::ReceiverStream;

#[tokio::test]
async fn a_forged_agent_certificate_is_refused_for_sync_and_renewal() {
    let p = InProcessPrimary::start().await;
    let (token, _) = p.register("east", 0).await;
    let (joined, key) = p.join("east", &token).await.unwrap();
    let signer = Signer::from_pem(&joined.intermediate_pem, &key).unwrap();

    // The forgery: the agent's identity from the cluster's own intermediate,
    // over a fresh key (what a workload would get if the agent's CA issued
    // it that identity).
    let forged = workload_tls(
        &signer,
        &joined.intermediate_pem,
        &joined.trust_bundle_pem,
        "isthmus-system",
        "isthmus-agent",
    );
    let mut client =
        SyncClient::new(isthmus_transport::tls_channel(&p.grpc, forged.clone()).unwrap());
    let (_tx, rx) = tokio::sync::mpsc::channel(1);
    let err = client
        .stream(ReceiverStream::new(rx))
        .await
        .expect_err("the forged agent may not stream");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(
        err.message()
            .contains("not the key its agent pinned at join"),
        "{err}"
    );
    let (csr, _) = isthmus_ca::issue::generate_csr("forged").unwrap();
    let err = client
        .renew_intermediate(RenewRequest { csr_pem: csr })
        .await
        .expect_err("the forged agent may not renew the intermediate");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");

    // The agent itself, over its pinned key, is accepted for both.
    let genuine = agent_tls(
        &signer,
        &joined.intermediate_pem,
        &joined.trust_bundle_pem,
        &TEST_AGENT_KEY.0,
    );
    let mut client = SyncClient::new(isthmus_transport::tls_channel(&p.grpc, genuine).unwrap());
    let (csr, _) = isthmus_ca::issue::generate_csr("genuine").unwrap();
    let renewed = client
        .renew_intermediate(RenewRequest { csr_pem: csr })
        .await
        .expect("the agent renews its intermediate")
        .into_inner();
    assert!(renewed.intermediate_pem.contains("BEGIN CERTIFICATE"));

    // A join that pins no agent key is refused, and the token stays unused.
    let (token, _) = p.register("west", 0).await;
    let pin = isthmus_api::join_token::parse(&token)
        .unwrap()
        .1
        .to_string();
    let tls = isthmus_transport::pinned_root_client_config(&pin).unwrap();
    let mut client =
        SyncClient::new(isthmus_transport::tls_channel(&p.grpc, Arc::new(tls)).unwrap());
    let (csr, _) = isthmus_ca::issue::generate_csr("old agent").unwrap();
    let err = client
        .join(JoinRequest {
            cluster: "west".into(),
            token: token.clone(),
            csr_pem: csr,
            agent_version: "old".into(),
            agent_key_sha256: String::new(),
        })
        .await
        .expect_err("a join without an agent key");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("agent_key_sha256"), "{err}");
    p.join("west", &token)
        .await
        .expect("the token still joins once");
}

#[tokio::test]
async fn a_cluster_intermediate_cannot_impersonate_the_primary() {
    let p = InProcessPrimary::start().await;
    let (token, _) = p.register("east", 0).await;
    let (joined, key) = p.join("east", &token).await.unwrap();
    let roots = joined.trust_bundle_pem.clone();

    // A server certificate for the primary's names, signed with the
    // cluster intermediate's key, served with the intermediate.
    let server_key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["isthmus-primary".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let inter_der = isthmus_ca::pem::certs(&joined.intermediate_pem, "intermediate").unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_der(&inter_der[0], rcgen::KeyPair::from_pem(&key).unwrap())
            .unwrap();
    let forged = params.signed_by(&server_key, &issuer).unwrap();
    let chain = vec![forged.der().clone(), inter_der[0].clone()];
    let server = rustls::ServerConfig::builder_with_provider(isthmus_ca::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            chain,
            rustls::pki_types::PrivateKeyDer::try_from(server_key.serialize_der()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(tcp).await;
            });
        }
    });

    // The TLS client agents, gateways and proxies use for the primary.
    let config = isthmus_transport::primary_client_config(&roots, None).unwrap();
    for name in ["isthmus-primary", "127.0.0.1"] {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let err = tokio_rustls::TlsConnector::from(Arc::new(config.clone()))
            .connect(rustls::pki_types::ServerName::try_from(name).unwrap(), tcp)
            .await
            .expect_err("the forged primary is refused");
        assert!(
            format!("{err:?}").contains("NameConstraint"),
            "{name}: {err:?}"
        );
    }
    // The CLI's REST client, trusting the mesh roots.
    let cli = isthmus_topology::client::PrimaryClient::new(
        &format!("https://127.0.0.1:{}", addr.port()),
        "token",
        Some(&roots),
    )
    .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), cli.ca_status())
        .await
        .expect("the CLI answers in time")
        .expect_err("the CLI refuses the forged primary");
    assert!(
        format!("{err:#}").to_lowercase().contains("certificate"),
        "{err:#}"
    );
}
