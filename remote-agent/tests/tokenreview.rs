//! Kubernetes-mode workload authentication: the agent's CA, on its real
//! Unix socket, asks the API server (kube's client over tower-test's mock,
//! answering with TokenReview JSON as an API server does) whose projected
//! token each caller presents, and issues only that service account's
//! identity; never the reserved one of the agent itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{Request, Response};
use http_body_util::BodyExt;
use isthmus_agent::ca_server::{self, Limits, Metrics, WorkloadAuth};
use isthmus_agent::join::{Credentials, Live};
use isthmus_agent::tokenreview::TokenReviewer;
use isthmus_api::pb::ca::CreateCertificateRequest;
use isthmus_api::pb::ca::certificate_service_client::CertificateServiceClient;
use isthmus_ca::{Authority, Signer, TrustBundle};
use kube::client::Body;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Plays the API server's TokenReview endpoint.
async fn api_server(mut handle: Handle, reviews: Arc<AtomicUsize>) {
    while let Some((req, send)) = handle.next_request().await {
        assert_eq!(req.method(), http::Method::POST);
        assert_eq!(
            req.uri().path(),
            "/apis/authentication.k8s.io/v1/tokenreviews"
        );
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let review: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(review["kind"], "TokenReview");
        assert_eq!(
            review["spec"]["audiences"],
            serde_json::json!(["isthmus-ca"])
        );
        reviews.fetch_add(1, Ordering::SeqCst);
        let token = review["spec"]["token"].as_str().unwrap().to_string();
        let ok = include_str!("fixtures/tokenreview-authenticated.json").replace("TOKEN", &token);
        let answer = match token.as_str() {
            "echo-token" => ok
                .replace("USERNAME", "system:serviceaccount:demo:echo")
                .replace("AUDIENCES", r#"["isthmus-ca"]"#),
            "admin-token" => ok
                .replace("USERNAME", "system:admin")
                .replace("AUDIENCES", r#"["isthmus-ca"]"#),
            "agent-sa-token" => ok
                .replace(
                    "USERNAME",
                    "system:serviceaccount:isthmus-system:isthmus-agent",
                )
                .replace("AUDIENCES", r#"["isthmus-ca"]"#),
            "other-audience" => ok
                .replace("USERNAME", "system:serviceaccount:demo:echo")
                .replace("AUDIENCES", r#"["vault"]"#),
            _ => include_str!("fixtures/tokenreview-refused.json").replace("TOKEN", &token),
        };
        send.send_response(
            Response::builder()
                .status(201)
                .header("content-type", "application/json")
                .body(Body::from(answer.into_bytes()))
                .unwrap(),
        );
    }
}

async fn ask(
    client: &mut CertificateServiceClient<tonic::transport::Channel>,
    token: &str,
) -> Result<isthmus_api::pb::ca::CreateCertificateResponse, tonic::Status> {
    // The CSR asks for another identity; only the token counts.
    let (csr, _) =
        isthmus_ca::issue::generate_csr("spiffe://cluster.local/ns/kube-system/sa/admin").unwrap();
    let mut req = tonic::Request::new(CreateCertificateRequest {
        csr,
        validity_duration: 0,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    client.create_certificate(req).await.map(|r| r.into_inner())
}

#[tokio::test]
async fn projected_tokens_are_reviewed_and_only_service_accounts_get_identities() {
    isthmus_ca::install_crypto_provider();
    let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let reviews = Arc::new(AtomicUsize::new(0));
    tokio::spawn(api_server(handle, reviews.clone()));
    let kube = kube::Client::new(mock, "default");

    let dir = tempfile::tempdir().unwrap();
    let root = Authority::generate("cluster.local").unwrap();
    let (csr, key) = isthmus_ca::issue::generate_csr("east").unwrap();
    let inter = root.sign_intermediate(&csr, "east").unwrap();
    let live = Arc::new(Live::new(
        dir.path(),
        Credentials {
            signer: Signer::from_pem(&inter.pem, &key).unwrap(),
            bundle: TrustBundle::from_der("cluster.local", vec![root.cert().clone()]).unwrap(),
            intermediate_pem: inter.pem.clone(),
            bundle_sequence: 1,
            agent_key_pem: isthmus_ca::issue::generate_pinned_key().unwrap().0.into(),
        },
    ));
    let socket = dir.path().join("ca.sock");
    let server = ca_server::serve(
        socket.clone(),
        live,
        WorkloadAuth::Kubernetes(Arc::new(TokenReviewer::new(kube, "isthmus-ca"))),
        "east".into(),
        Limits::per_second(100.try_into().unwrap(), 100.try_into().unwrap()),
        Metrics::default(),
    )
    .unwrap();
    tokio::spawn(server);
    let mut client = CertificateServiceClient::new(isthmus_transport::uds_channel(socket));

    let issued = ask(&mut client, "echo-token")
        .await
        .expect("a service account's token");
    let chain = isthmus_ca::pem::certs(&issued.cert_chain.concat(), "chain").unwrap();
    let leaf = isthmus_ca::svid::inspect(&chain[0]).unwrap();
    assert_eq!(
        leaf.spiffe_id.unwrap().as_str(),
        "spiffe://cluster.local/ns/demo/sa/echo"
    );
    // A renewal within the cache time costs no second review.
    ask(&mut client, "echo-token").await.unwrap();
    assert_eq!(reviews.load(Ordering::SeqCst), 1);

    for (token, expect) in [
        ("expired-token", "service account token has expired"),
        ("admin-token", "not a service account"),
        ("other-audience", "not bound to audience \"isthmus-ca\""),
    ] {
        let err = ask(&mut client, token).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{token}: {err}");
        assert!(err.message().contains(expect), "{token}: {err}");
    }
    // Refusals are not cached: each was asked about.
    assert_eq!(reviews.load(Ordering::SeqCst), 4);

    // A pod running as the agent's own service account is authenticated by
    // Kubernetes, and still refused: that identity is reserved.
    let err = ask(&mut client, "agent-sa-token").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(
        err.message()
            .contains("reserved for Isthmus's own components"),
        "{err}"
    );
}
