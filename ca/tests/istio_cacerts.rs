//! CAs made the way Istio's `tools/certs` makes them (openssl, with the same
//! config lines), imported through [`isthmus_ca::plugin::import`]: Istio's
//! defaults are refused with the fix; with that fix applied, an RSA 4096 CA
//! imports and signs, revokes and caps what it signs; an encrypted key, a
//! foreign cert-chain.pem and a CA about to lapse are refused by name.
//!
//! Needs the `openssl` command (Debian's openssl package).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use isthmus_ca::plugin::{self, ImportError, PluginFiles};
use isthmus_ca::{Signer, SpiffeId, TrustBundle};

/// How the intermediate (Istio's `ca-cert.pem`) is made.
struct Recipe {
    key_bits: u32,
    days: u32,
    /// `basicConstraints` of the intermediate.
    constraints: &'static str,
    /// `keyUsage` of the intermediate.
    usage: &'static str,
    encrypt_key: bool,
}

/// Istio's defaults, as `tools/certs/common.mk` writes its conf files.
const ISTIO: Recipe = Recipe {
    key_bits: 2048,
    days: 730,
    constraints: "critical, CA:true, pathlen:0",
    usage: "critical, digitalSignature, nonRepudiation, keyEncipherment, keyCertSign",
    encrypt_key: false,
};

/// Istio's tooling with the fix the import error names.
const FIXED: Recipe = Recipe {
    constraints: "critical, CA:true, pathlen:1",
    usage: "critical, digitalSignature, keyCertSign, cRLSign",
    ..ISTIO
};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command (Debian's openssl package)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A root made as `make -f Makefile.selfsigned.mk root-ca` makes it.
fn root(dir: &Path) {
    std::fs::write(
        dir.join("root-ca.conf"),
        "[ req ]\nencrypt_key = no\nprompt = no\nutf8 = yes\ndefault_md = sha256\n\
         req_extensions = req_ext\nx509_extensions = req_ext\ndistinguished_name = req_dn\n\
         [ req_ext ]\nsubjectKeyIdentifier = hash\nbasicConstraints = critical, CA:true\n\
         keyUsage = critical, digitalSignature, nonRepudiation, keyEncipherment, keyCertSign\n\
         [ req_dn ]\nO = Istio\nCN = Root CA\n",
    )
    .unwrap();
    openssl(dir, &["genrsa", "-out", "root-key.pem", "2048"]);
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            "root-key.pem",
            "-config",
            "root-ca.conf",
            "-out",
            "root-cert.csr",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-days",
            "3650",
            "-signkey",
            "root-key.pem",
            "-extensions",
            "req_ext",
            "-extfile",
            "root-ca.conf",
            "-in",
            "root-cert.csr",
            "-out",
            "root-cert.pem",
        ],
    );
}

/// A cluster's `cacerts` as `make -f Makefile.selfsigned.mk NAME-cacerts`
/// makes it, with the recipe's changes; returns its folder.
fn cacerts(dir: &Path, name: &str, r: &Recipe) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("intermediate.conf"),
        format!(
            "[ req ]\nencrypt_key = no\nprompt = no\nutf8 = yes\ndefault_md = sha256\n\
             req_extensions = req_ext\nx509_extensions = req_ext\ndistinguished_name = req_dn\n\
             [ req_ext ]\nsubjectKeyIdentifier = hash\nbasicConstraints = {}\nkeyUsage = {}\n\
             subjectAltName=@san\n[ san ]\nDNS.1 = istiod.istio-system.svc\n\
             [ req_dn ]\nO = Istio\nCN = Intermediate CA\nL = {name}\n",
            r.constraints, r.usage
        ),
    )
    .unwrap();
    let bits = r.key_bits.to_string();
    if r.encrypt_key {
        openssl(
            &d,
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                &format!("rsa_keygen_bits:{bits}"),
                "-aes256",
                "-pass",
                "pass:secret",
                "-out",
                "ca-key.pem",
            ],
        );
    } else {
        openssl(&d, &["genrsa", "-out", "ca-key.pem", &bits]);
    }
    openssl(
        &d,
        &[
            "req",
            "-new",
            "-config",
            "intermediate.conf",
            "-key",
            "ca-key.pem",
            "-passin",
            "pass:secret",
            "-out",
            "cluster-ca.csr",
        ],
    );
    let root_cert = dir.join("root-cert.pem");
    let root_key = dir.join("root-key.pem");
    openssl(
        &d,
        &[
            "x509",
            "-req",
            "-days",
            &r.days.to_string(),
            "-CA",
            root_cert.to_str().unwrap(),
            "-CAkey",
            root_key.to_str().unwrap(),
            "-CAcreateserial",
            "-extensions",
            "req_ext",
            "-extfile",
            "intermediate.conf",
            "-in",
            "cluster-ca.csr",
            "-out",
            "ca-cert.pem",
        ],
    );
    let chain = format!(
        "{}{}",
        std::fs::read_to_string(d.join("ca-cert.pem")).unwrap(),
        std::fs::read_to_string(&root_cert).unwrap()
    );
    std::fs::write(d.join("cert-chain.pem"), chain).unwrap();
    std::fs::copy(&root_cert, d.join("root-cert.pem")).unwrap();
    d
}

fn read(d: &Path, f: &str) -> String {
    std::fs::read_to_string(d.join(f)).unwrap()
}

fn import(d: &Path) -> Result<isthmus_ca::Authority, ImportError> {
    let (root_cert, ca_cert, ca_key, cert_chain) = (
        read(d, "root-cert.pem"),
        read(d, "ca-cert.pem"),
        read(d, "ca-key.pem"),
        read(d, "cert-chain.pem"),
    );
    plugin::import(
        &PluginFiles {
            root_cert: &root_cert,
            ca_cert: &ca_cert,
            ca_key: &ca_key,
            cert_chain: &cert_chain,
        },
        "cluster.local",
    )
}

fn leaf_chain(signer: &Signer) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    let who = SpiffeId::workload("cluster.local", "demo", "client").unwrap();
    let (leaf, _) = signer.issue_workload(&who, Duration::ZERO).unwrap();
    let mut chain = vec![leaf.der];
    chain.extend(signer.chain().iter().cloned());
    chain
}

fn verify(
    bundle: &TrustBundle,
    chain: &[rustls_pki_types::CertificateDer<'static>],
) -> Result<SpiffeId, rustls::Error> {
    let algs = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
    bundle.verify(
        &chain[0],
        &chain[1..],
        rustls_pki_types::UnixTime::now(),
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
    let crl = ca.revocation_list(&[inter.der.clone()], 1).unwrap();
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
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
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
