//! CAs made the way Istio's `tools/certs` makes them (see
//! [`isthmus_e2e::istio_ca`]), imported as the primary imports them:
//! Istio's defaults are refused with the fix; with that fix applied, an RSA
//! 4096 CA imports and signs, revokes and caps what it signs; an encrypted
//! key, a foreign cert-chain.pem and a short-lived CA are handled by name.
//! `ca_sequences.rs` imports such a CA into a running mesh and rotates on.
//!
//! Needs the `openssl` command (Debian's openssl package).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use isthmus_ca::plugin::ImportError;
use isthmus_ca::{Signer, SpiffeId, TrustBundle};
use isthmus_e2e::istio_ca::{FIXED, ISTIO, Recipe, cacerts, import, root};

fn leaf_chain(signer: &Signer) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    let who = SpiffeId::workload("cluster.local", "demo", "client").unwrap();
    let (leaf, _) = signer.issue_workload(&who, Duration::ZERO).unwrap();
    let mut chain = vec![leaf.der];
    chain.extend(signer.chain().iter().cloned());
    chain
}

fn verify(
    bundle: &TrustBundle,
    chain: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<SpiffeId, rustls::Error> {
    let algs = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
    bundle.verify(
        &chain[0],
        &chain[1..],
        rustls::pki_types::UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        &algs,
    )
}

#[test]
fn istio_made_cas_are_refused_with_the_fix_or_imported_and_used() {
    let tmp = tempfile::tempdir().unwrap();
    root(tmp.path());

    // Istio's defaults: pathlen:0 and no cRLSign, both named with the fix.
    let err = import(&cacerts(tmp.path(), "istio", &ISTIO))
        .err()
        .expect("Istio's default intermediate is refused")
        .to_string();
    for want in [
        "ca-cert.pem",
        "pathlen:0",
        "cRLSign",
        "pathlen:1",
        "keyUsage = critical, digitalSignature, keyCertSign, cRLSign",
    ] {
        assert!(err.contains(want), "{want:?} missing from: {err}");
    }

    // Each problem alone is named alone.
    let err = import(&cacerts(
        tmp.path(),
        "pathlen0",
        &Recipe {
            constraints: ISTIO.constraints,
            ..FIXED
        },
    ))
    .err()
    .expect("pathlen:0 alone is refused")
    .to_string();
    assert!(err.contains("pathlen:0") && !err.contains("lacks"), "{err}");
    let err = import(&cacerts(
        tmp.path(),
        "nocrlsign",
        &Recipe {
            usage: ISTIO.usage,
            ..FIXED
        },
    ))
    .err()
    .expect("a CA without cRLSign alone is refused")
    .to_string();
    assert!(
        err.contains("lacks cRLSign") && !err.contains("has pathlen:0"),
        "{err}"
    );

    // Fixed as the message says, with an RSA 4096 key (Istio's default
    // size): imported, signs a cluster intermediate that issues verifiable
    // leaves, and revokes it.
    let fixed = cacerts(
        tmp.path(),
        "fixed",
        &Recipe {
            key_bits: 4096,
            ..FIXED
        },
    );
    let ca = import(&fixed).expect("the fixed Istio CA imports");
    let bundle = TrustBundle::from_der("cluster.local", vec![ca.anchor().clone()]).unwrap();
    let (csr, key) = isthmus_ca::issue::generate_csr("east").unwrap();
    let inter = ca.sign_intermediate(&csr, "east").unwrap();
    let signer = Signer::from_pem(&format!("{}{}", inter.pem, ca.chain_pem()), &key).unwrap();
    assert_eq!(
        verify(&bundle, &leaf_chain(&signer)).unwrap().as_str(),
        "spiffe://cluster.local/ns/demo/sa/client"
    );
    let crl = ca
        .revocation_list(std::slice::from_ref(&inter.der), 1)
        .unwrap();
    let revoking = bundle.clone().with_crls_pem(&crl).unwrap();
    let err = verify(&revoking, &leaf_chain(&signer)).unwrap_err();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
        ),
        "{err:?}"
    );
}

#[test]
fn an_encrypted_key_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    root(tmp.path());
    let d = cacerts(
        tmp.path(),
        "sealed",
        &Recipe {
            encrypt_key: true,
            ..FIXED
        },
    );
    let err = import(&d).err().expect("refused");
    assert!(matches!(err, ImportError::EncryptedKey), "{err}");
    assert!(err.to_string().contains("openssl pkey"), "{err}");
}

#[test]
fn a_short_lived_ca_caps_what_it_signs() {
    let tmp = tempfile::tempdir().unwrap();
    root(tmp.path());
    let d = cacerts(tmp.path(), "brief", &Recipe { days: 20, ..FIXED });
    let ca = import(&d).expect("a 20-day CA imports");
    let now = isthmus_e2e::now_unix() as i64;
    assert!(
        (ca.not_after_unix() - now - 20 * 86_400).abs() < 600,
        "{}",
        ca.not_after_unix()
    );
    let (csr, _) = isthmus_ca::issue::generate_csr("east").unwrap();
    let inter = ca.sign_intermediate(&csr, "east").unwrap();
    assert!(
        inter.not_after_unix <= ca.not_after_unix(),
        "the cluster intermediate ({}) outlives its CA ({})",
        inter.not_after_unix,
        ca.not_after_unix()
    );
}

#[test]
fn a_foreign_cert_chain_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    root(tmp.path());
    let ours = cacerts(tmp.path(), "ours", &FIXED);
    // Another CA altogether, whose chain file is given with our CA.
    let other = tempfile::tempdir().unwrap();
    root(other.path());
    let theirs = cacerts(other.path(), "theirs", &FIXED);
    std::fs::copy(theirs.join("cert-chain.pem"), ours.join("cert-chain.pem")).unwrap();
    let err = import(&ours).err().expect("refused").to_string();
    assert!(err.starts_with("cert-chain.pem"), "{err}");
    assert!(err.contains("in order up to root-cert.pem"), "{err}");

    // And a root that did not issue ca-cert.pem.
    std::fs::copy(ours.join("ca-cert.pem"), ours.join("cert-chain.pem")).unwrap();
    std::fs::copy(theirs.join("root-cert.pem"), ours.join("root-cert.pem")).unwrap();
    let err = import(&ours).err().expect("refused").to_string();
    assert!(err.contains("does not chain to root-cert.pem"), "{err}");
}

/// Two CAs made by the same tooling share every name (`O=Istio, CN=Root CA`
/// over `CN=Intermediate CA`). During a rotation from one to the other both
/// are trusted, and the first one's CRL (from an intermediate rotation)
/// must neither fail the second one's chains nor spare its own revoked one.
#[test]
fn two_cas_with_the_same_names_keep_their_crls_apart() {
    let make = || {
        let tmp = tempfile::tempdir().unwrap();
        root(tmp.path());
        let ca = import(&cacerts(tmp.path(), "mesh", &FIXED)).unwrap();
        (tmp, ca)
    };
    let ((_a, first), (_b, second)) = (make(), make());
    let signer = |ca: &isthmus_ca::Authority| {
        let (csr, key) = isthmus_ca::issue::generate_csr("east").unwrap();
        let inter = ca.sign_intermediate(&csr, "east").unwrap();
        let signer = Signer::from_pem(&format!("{}{}", inter.pem, ca.chain_pem()), &key).unwrap();
        (signer, inter)
    };
    let (revoked, revoked_cert) = signer(&first);
    let (kept, _) = signer(&first);
    let (under_second, _) = signer(&second);
    let crl = first.revocation_list(&[revoked_cert.der], 1).unwrap();
    let bundle = TrustBundle::from_der(
        "cluster.local",
        vec![first.anchor().clone(), second.anchor().clone()],
    )
    .unwrap()
    .with_crls_pem(&crl)
    .unwrap();
    assert_eq!(
        verify(&bundle, &leaf_chain(&under_second))
            .unwrap()
            .as_str(),
        "spiffe://cluster.local/ns/demo/sa/client"
    );
    assert!(verify(&bundle, &leaf_chain(&kept)).is_ok());
    let err = verify(&bundle, &leaf_chain(&revoked)).unwrap_err();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
        ),
        "{err:?}"
    );
}
