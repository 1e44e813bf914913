//! The CA through the primary's API, in process: importing a CA in Istio's
//! plug-in layout (a P-384 root over an RSA signing CA), refusals that change
//! nothing, pausing and rolling back a rotation, finishing one, the SPIFFE
//! bundle endpoint, joining a cluster under the imported CA, and the
//! operations refused while another runs, each naming the way out.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use base64::Engine;
use isthmus_api::rest::{CaView, ImportRoot, RotateRoot};
use isthmus_ca::{Authority, Signer, SpiffeId, TrustBundle};
use isthmus_e2e::{InProcessPrimary, eventually};
use isthmus_topology::client::PrimaryClient;

const PATIENCE: Duration = Duration::from_secs(30);

/// A client that accepts any root the primary has trusted so far.
fn client(p: &InProcessPrimary, pins: &[String]) -> PrimaryClient {
    PrimaryClient::with_pins(&p.http, &p.admin_token, None, pins).unwrap()
}

async fn view(p: &InProcessPrimary, pins: &[String]) -> Option<CaView> {
    client(p, pins).ca_status().await.ok()
}

#[tokio::test]
async fn an_imported_plug_in_ca_is_rotated_in_and_signs_intermediates() {
    let p = InProcessPrimary::start().await;
    let first = p.api.ca_status().await.unwrap();
    assert_eq!(first.roots.len(), 1);
    let old = first.roots[0].fingerprint.clone();

    // Istio's plug-in layout: root-cert.pem (P-384), ca-cert.pem and
    // ca-key.pem (RSA 3072... here 2048, the CA under it), cert-chain.pem.
    let root = Authority::generate_with("cluster.local", &rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let (ca_cert, ca_key) = root.sign_subordinate(&rcgen::PKCS_RSA_SHA256).unwrap();
    let import = ImportRoot {
        root_cert: root.cert_pem().to_string(),
        ca_cert: ca_cert.clone(),
        ca_key: ca_key.clone(),
        cert_chain: format!("{ca_cert}{}", root.cert_pem()),
        until: 1,
    };

    // A key that is not the CA certificate's is refused, and nothing changes.
    let (_, other_key) = root.sign_subordinate(&rcgen::PKCS_RSA_SHA256).unwrap();
    let err = p
        .api
        .import_root(&ImportRoot {
            ca_key: other_key,
            ..import.clone()
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("400") && err.contains("ca-key.pem is not the key of ca-cert.pem"),
        "{err}"
    );
    let same = p.api.ca_status().await.unwrap();
    assert_eq!((same.roots.len(), same.rotation.is_none()), (1, true));

    // Phase 1, paused; both roots trusted, the old one still signs.
    p.api.import_root(&import).await.unwrap();
    let paused = eventually("phase 1 to pause", PATIENCE, || async {
        let v = p.api.ca_status().await.ok()?;
        v.rotation
            .as_ref()
            .is_some_and(|r| r.phase == 1 && r.waiting_for.iter().any(|w| w.starts_with("paused")))
            .then_some(v)
    })
    .await;
    let new = paused.rotation.as_ref().unwrap().to.clone();
    assert_eq!(paused.roots.len(), 2);
    assert!(
        paused
            .roots
            .iter()
            .any(|r| r.fingerprint == new && r.imported)
    );
    assert_eq!(paused.signing_root, old);
    // Another rotation cannot start over this one.
    let err = p.api.import_root(&import).await.unwrap_err().to_string();
    assert!(err.contains("409"), "{err}");

    // Roll back: the imported root leaves again.
    p.api
        .rotate_root(&RotateRoot {
            until: 3,
            rollback: true,
        })
        .await
        .unwrap();
    let rolled = eventually("the rollback to finish", PATIENCE, || async {
        let v = p.api.ca_status().await.ok()?;
        (v.rotation.as_ref()?.phase == 4).then_some(v)
    })
    .await;
    assert!(rolled.rotation.as_ref().unwrap().rolled_back);
    assert_eq!(rolled.roots.len(), 1);
    assert_eq!(rolled.roots[0].fingerprint, old);
    let err = p
        .api
        .rotate_root(&RotateRoot {
            until: 3,
            rollback: true,
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("409") && err.contains("no root rotation"),
        "{err}"
    );

    // Import again and let it run to the end.
    p.api
        .import_root(&ImportRoot {
            until: 3,
            ..import.clone()
        })
        .await
        .unwrap();
    let pins = vec![new.clone()];
    let done = eventually("the imported root to take over", PATIENCE, || async {
        let v = view(&p, &pins).await?;
        (v.rotation.as_ref()?.phase == 4).then_some(v)
    })
    .await;
    assert_eq!(done.signing_root, new);
    assert_eq!(done.roots.len(), 1);
    assert!(done.roots[0].imported);

    // The SPIFFE bundle: one P-384 key carrying the imported root.
    let jwks = client(&p, &pins).trust_bundle().await.unwrap();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{jwks}");
    assert_eq!(
        (keys[0]["kty"].as_str(), keys[0]["crv"].as_str()),
        (Some("EC"), Some("P-384"))
    );
    assert_eq!(keys[0]["use"], "x509-svid");
    let der = base64::engine::general_purpose::STANDARD
        .decode(keys[0]["x5c"][0].as_str().unwrap())
        .unwrap();
    assert_eq!(der, root.cert().as_ref());
    assert!(jwks["spiffe_sequence"].as_u64().unwrap() >= done.bundle_sequence);

    // A cluster joins under the imported CA: its chain runs intermediate,
    // RSA signing CA, P-384 root, and a leaf it signs verifies.
    let api = client(&p, &pins);
    let registered = api
        .register_cluster(&isthmus_api::rest::RegisterCluster {
            name: "east".into(),
            network: "net-east".into(),
            region: String::new(),
            zone: String::new(),
            gateways: vec![],
            token_ttl_seconds: 0,
        })
        .await
        .unwrap();
    let (joined, key) = p.join("east", &registered.join_token).await.unwrap();
    let chain = isthmus_ca::pem::certs(&joined.intermediate_pem, "chain").unwrap();
    assert_eq!(chain.len(), 2, "intermediate and the imported signing CA");
    let signer = Signer::from_pem(&joined.intermediate_pem, &key).unwrap();
    let id = SpiffeId::workload("cluster.local", "demo", "echo").unwrap();
    let (leaf, _) = signer.issue_workload(&id, Duration::ZERO).unwrap();
    let bundle = TrustBundle::from_pem("cluster.local", &joined.trust_bundle_pem).unwrap();
    assert_eq!(bundle.roots(), &[root.cert().clone()]);
    let algs = isthmus_ca::crypto_provider().signature_verification_algorithms;
    let verified = bundle
        .verify(
            &leaf.der,
            signer.chain(),
            rustls::pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            &algs,
        )
        .unwrap();
    assert_eq!(verified, id);
}

/// Operations that cannot run now are refused at once with the reason and
/// the command that unblocks them, and change nothing.
#[tokio::test]
async fn ca_operations_refused_while_another_runs_name_the_way_out() {
    let p = InProcessPrimary::start().await;
    let (token, _) = p.register("east", 0).await;
    p.join("east", &token).await.unwrap();

    // A root rotation in phase 1 (waiting for east's silent agent): no
    // intermediate rotation.
    p.api
        .rotate_root(&RotateRoot {
            until: 1,
            rollback: false,
        })
        .await
        .unwrap();
    let err = p
        .api
        .rotate_intermediate("east")
        .await
        .unwrap_err()
        .to_string();
    for want in [
        "409",
        "a root rotation is in phase 1/3",
        "isthmusctl ca rotate-root --rollback",
    ] {
        assert!(err.contains(want), "{want:?} missing from: {err}");
    }
    let v = p.api.ca_status().await.unwrap();
    let east = v.clusters.iter().find(|c| c.cluster == "east").unwrap();
    assert_eq!(east.rotation, None, "nothing started: {east:?}");

    // A second primary, whose only cluster's agent joined and went silent.
    let p = InProcessPrimary::start().await;
    let (token, _) = p.register("east", 0).await;
    p.join("east", &token).await.unwrap();

    // An intermediate rotation in progress (this agent never renews): no
    // root rotation or import, and no second intermediate rotation.
    p.api.rotate_intermediate("east").await.unwrap();
    let err = p
        .api
        .rotate_root(&RotateRoot {
            until: 3,
            rollback: false,
        })
        .await
        .unwrap_err()
        .to_string();
    for want in [
        "409",
        "cluster east is rotating its intermediate",
        "isthmusctl ca status",
    ] {
        assert!(err.contains(want), "{want:?} missing from: {err}");
    }
    let root = Authority::generate("cluster.local").unwrap();
    let (ca_cert, ca_key) = root
        .sign_subordinate(&rcgen::PKCS_ECDSA_P256_SHA256)
        .unwrap();
    let err = p
        .api
        .import_root(&ImportRoot {
            root_cert: root.cert_pem().to_string(),
            ca_cert,
            ca_key,
            cert_chain: String::new(),
            until: 3,
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("409") && err.contains("cluster east is rotating its intermediate"),
        "{err}"
    );
    let err = p
        .api
        .rotate_intermediate("east")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("409") && err.contains("already rotating"),
        "{err}"
    );
    let v = p.api.ca_status().await.unwrap();
    assert_eq!(v.roots.len(), 1, "no root was added: {v:?}");
    assert!(v.rotation.is_none(), "no rotation started: {v:?}");
}
