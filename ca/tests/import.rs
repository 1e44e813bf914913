//! Importing CAs made by OpenSSL in Istio's plug-in layout
//! (`tests/fixtures/istio-*`: a P-384 root; under it an RSA 3072 CA with a
//! PKCS#1 key and a DNS SAN, as Istio's tooling makes, or a P-256 CA with a
//! SEC1 key), then signing a cluster intermediate and a workload leaf that
//! verify to the imported root. `istio-pathlen0` is a CA with `pathlen:0`,
//! which has no room for cluster intermediates.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use isthmus_ca::{Authority, Signer, SpiffeId, TrustBundle};

fn read(dir: &str, name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{dir}/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

#[test]
fn openssl_made_plug_in_cas_import_and_sign() {
    for (dir, key_header) in [
        ("istio-rsa", "-----BEGIN RSA PRIVATE KEY-----"),
        ("istio-ec", "-----BEGIN EC PRIVATE KEY-----"),
    ] {
        let key = read(dir, "ca-key.pem");
        assert!(key.starts_with(key_header), "{dir}: fixture key format");
        let ca = Authority::from_parts(
            &read(dir, "root-cert.pem"),
            &format!(
                "{}{}",
                read(dir, "ca-cert.pem"),
                read(dir, "cert-chain.pem")
            ),
            &key,
            "cluster.local",
        )
        .unwrap_or_else(|e| panic!("{dir}: {e}"));
        let (csr, inter_key) = isthmus_ca::issue::generate_csr("east").unwrap();
        let inter = ca.sign_intermediate(&csr, "east").unwrap();
        let signer =
            Signer::from_pem(&format!("{}{}", inter.pem, ca.chain_pem()), &inter_key).unwrap();
        assert_eq!(signer.chain().len(), 2, "{dir}: intermediate, then the CA");
        let id = SpiffeId::workload("cluster.local", "demo", "echo").unwrap();
        let (leaf, _) = signer.issue_workload(&id, Duration::ZERO).unwrap();
        let bundle = TrustBundle::from_pem("cluster.local", &read(dir, "root-cert.pem")).unwrap();
        let algs = isthmus_ca::crypto_provider().signature_verification_algorithms;
        let verified = bundle
            .verify(
                &leaf.der,
                signer.chain(),
                rustls::pki_types::UnixTime::now(),
                webpki::KeyUsage::client_auth(),
                &algs,
            )
            .unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert_eq!(verified, id);
    }
}

/// A CA whose pathLen is 0 cannot sign cluster intermediates: refused at
/// import, with the reason.
#[test]
fn a_plug_in_ca_with_no_room_for_intermediates_is_refused() {
    let dir = "istio-pathlen0";
    let err = Authority::from_parts(
        &read(dir, "root-cert.pem"),
        &read(dir, "cert-chain.pem"),
        &read(dir, "ca-key.pem"),
        "cluster.local",
    )
    .err()
    .expect("refused");
    assert!(err.to_string().contains("pathLen"), "{err}");
}
