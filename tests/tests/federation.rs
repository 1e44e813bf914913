//! Multi-mesh federation on a running mesh: a workload of another trust
//! domain, with a certificate from that mesh's own CA, is refused until this
//! mesh federates with that domain's SPIFFE bundle, then accepted by west's
//! echo sidecar (which sees its foreign SPIFFE ID), and refused again after
//! unfederating. The foreign root never vouches for this mesh's own trust
//! domain. Needs root for network namespaces (CI runs as root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use isthmus_ca::{Authority, Signer, SpiffeId, TrustBundle};
use isthmus_e2e::{Mesh, eventually, mesh_request};
use isthmus_topology::runner::NetMode;

const NODE: &str = env!("CARGO_BIN_EXE_isthmus-e2e-node");
const SNI: &str = "outbound_.8080_._.echo.demo.svc.cluster.local";
const PATIENCE: Duration = Duration::from_secs(60);

/// A certificate for `id` from the foreign mesh's CA: `[leaf, intermediate]`.
fn identity(signer: &Signer, id: &str) -> isthmus_transport::Identity {
    let (leaf, key) = signer
        .issue_workload(&SpiffeId::parse(id).unwrap(), Duration::from_secs(3600))
        .unwrap();
    let chain = format!(
        "{}{}",
        leaf.pem,
        isthmus_ca::pem::encode_certs(signer.chain())
    );
    isthmus_transport::Identity::from_pem(&chain, &key).unwrap()
}

/// The response west's echo gives the caller, through west's gateway.
async fn call(mesh: &Mesh, who: isthmus_transport::Identity) -> Option<String> {
    let east = mesh.netns("proxy-client-east").map(str::to_string);
    let bundle = mesh.bundle().ok()?;
    let x = mesh_request(
        east.as_deref(),
        mesh.listener("gateway-west", "gateway"),
        SNI,
        &bundle,
        who,
    )
    .await
    .ok()?;
    x.response.ok().filter(|r| r.starts_with("HTTP/1.1 200"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_trust_domain_is_trusted_through_its_own_roots_only() {
    if !isthmus_e2e::can_run(
        "a_federated_trust_domain_is_trusted_through_its_own_roots_only",
        false,
    ) {
        return;
    }
    let mesh = Mesh::up(NetMode::Netns, NODE).await.expect("mesh starts");
    // The other mesh, with its own CA.
    let other = Authority::generate("other.mesh").unwrap();
    let (csr, key) = isthmus_ca::issue::generate_csr("shop").unwrap();
    let inter = other.sign_intermediate(&csr, "shop").unwrap();
    let other_signer = Signer::from_pem(&inter.pem, &key).unwrap();
    let cart = "spiffe://other.mesh/ns/shop/sa/cart";

    assert!(
        call(&mesh, identity(&other_signer, cart)).await.is_none(),
        "a trust domain we do not federate with is refused"
    );

    // Federate with its SPIFFE bundle, as its primary would serve it.
    let jwks = TrustBundle::from_der("other.mesh", vec![other.cert().clone()])
        .unwrap()
        .to_jwks(1, 300);
    let client = mesh.state.client().unwrap();
    let view = client.federate("other.mesh", &jwks).await.unwrap();
    assert_eq!(view.federated.len(), 1);
    assert_eq!(view.federated[0].trust_domain, "other.mesh");
    assert_eq!(view.roots.len(), 1, "our own roots are unchanged");

    let answer = eventually(
        "west's echo to accept the federated workload",
        PATIENCE,
        || async { call(&mesh, identity(&other_signer, cart)).await },
    )
    .await;
    assert!(
        answer.contains(&format!("URI={cart}")),
        "the echo saw the foreign identity: {answer}"
    );
    // Never merged: the foreign root cannot vouch for our trust domain.
    assert!(
        call(
            &mesh,
            identity(&other_signer, "spiffe://cluster.local/ns/demo/sa/client")
        )
        .await
        .is_none(),
        "a foreign root vouched for an identity in cluster.local"
    );
    // Our own workloads are unaffected.
    let ours = mesh.workload_svid("east", "client-east").await.unwrap();
    assert!(call(&mesh, ours.identity()).await.is_some());

    client.unfederate("other.mesh").await.unwrap();
    eventually(
        "the federated workload to be refused again",
        PATIENCE,
        || async {
            call(&mesh, identity(&other_signer, cart))
                .await
                .is_none()
                .then_some(())
        },
    )
    .await;
}
