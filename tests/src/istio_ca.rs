//! CAs made the way Istio's `tools/certs` Makefiles make them: openssl with
//! the same config lines (`root-ca.conf`, `intermediate.conf`), in Istio's
//! plug-in layout (`root-cert.pem`, `ca-cert.pem`, `ca-key.pem`,
//! `cert-chain.pem`). A [`Recipe`] changes what an operator would change.
//! Needs the `openssl` command (Debian's openssl package).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use isthmus_ca::plugin::{self, ImportError, PluginFiles};

/// How the intermediate (Istio's `ca-cert.pem`) is made.
pub struct Recipe {
    pub key_bits: u32,
    pub days: u32,
    /// `basicConstraints` of the intermediate.
    pub constraints: &'static str,
    /// `keyUsage` of the intermediate.
    pub usage: &'static str,
    pub encrypt_key: bool,
}

/// Istio's defaults, as `tools/certs/common.mk` writes its conf files.
pub const ISTIO: Recipe = Recipe {
    key_bits: 2048,
    days: 730,
    constraints: "critical, CA:true, pathlen:0",
    usage: "critical, digitalSignature, nonRepudiation, keyEncipherment, keyCertSign",
    encrypt_key: false,
};

/// Istio's tooling with the fix the import error names.
pub const FIXED: Recipe = Recipe {
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
pub fn root(dir: &Path) {
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
pub fn cacerts(dir: &Path, name: &str, r: &Recipe) -> PathBuf {
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

/// Imports the `cacerts` folder `d` as the primary would.
pub fn import(d: &Path) -> Result<isthmus_ca::Authority, ImportError> {
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

/// The `cacerts` folder `d` as the import API takes it.
pub fn import_request(d: &Path, until: u8) -> isthmus_api::rest::ImportRoot {
    isthmus_api::rest::ImportRoot {
        root_cert: read(d, "root-cert.pem"),
        ca_cert: read(d, "ca-cert.pem"),
        ca_key: read(d, "ca-key.pem"),
        cert_chain: read(d, "cert-chain.pem"),
        until,
    }
}
