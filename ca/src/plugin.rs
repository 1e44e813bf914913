//! Importing a CA in Istio's plug-in layout (`cacerts`: `root-cert.pem`,
//! `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`), checked the way Isthmus
//! will use it.
//!
//! Isthmus signs one intermediate per cluster under the imported signing CA
//! and revokes a replaced one with a CRL, so the signing CA must be allowed
//! to sign certificates *and* CRLs, must leave room (pathLen) for one more CA
//! below it, and must live long enough. Istio's own tooling makes CAs that
//! miss some of this (no cRLSign, pathlen:0), so each refusal says which file
//! is wrong, what is wrong with it, and how to fix it with that tooling.
//! Every check runs before anything is stored.

use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

use crate::issue::Authority;

/// The four files of Istio's plug-in CA layout, as text. `cert_chain` may
/// be empty.
#[derive(Debug, Clone, Copy)]
pub struct PluginFiles<'a> {
    pub root_cert: &'a str,
    pub ca_cert: &'a str,
    pub ca_key: &'a str,
    pub cert_chain: &'a str,
}

/// A refused import. Each message is one sentence: the file, the problem,
/// the fix.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{file}: {problem}; give a PEM file with the certificate in it")]
    Unreadable { file: &'static str, problem: String },
    #[error(
        "ca-key.pem is encrypted; Isthmus needs the key in clear (decrypt it with `openssl pkey -in ca-key.pem -out ca-key.pem`, keep the file at mode 0600) and import again"
    )]
    EncryptedKey,
    #[error(
        "ca-key.pem is not a key Isthmus can sign with ({problem}); give an unencrypted PKCS#8, SEC1 or PKCS#1 PEM key of ECDSA P-256/P-384 or RSA 2048/3072/4096"
    )]
    BadKey { problem: String },
    #[error(
        "{file} has a {what} key; Isthmus signs with ECDSA P-256/P-384 or RSA 2048/3072/4096, so re-make it with one of those"
    )]
    UnsupportedKey { file: &'static str, what: String },
    #[error(
        "{file} is not a CA certificate (basicConstraints lacks CA:true); re-make it as a CA (`basicConstraints = critical, CA:true, pathlen:1`)"
    )]
    NotCa { file: &'static str },
    #[error(
        "{file} cannot sign the cluster intermediates Isthmus puts under it: {problems}; re-make it with `basicConstraints = critical, CA:true, pathlen:1` and `keyUsage = critical, digitalSignature, keyCertSign, cRLSign` (in Istio's tools/certs, edit those two lines of the CA's .conf: intermediate.conf for ca-cert.pem, root-ca.conf for a root that signs)"
    )]
    Unfit {
        file: &'static str,
        problems: String,
    },
    #[error("{file} expired on {date}; make a new CA and import that")]
    Expired { file: &'static str, date: String },
    #[error("{file} is not valid until {date}; check this machine's clock, or wait")]
    NotYetValid { file: &'static str, date: String },
    #[error(
        "{file} expires on {date}, in less than a day, too soon to sign the 24-hour workload certificates under it; make a CA that lives longer"
    )]
    TooShortLived { file: &'static str, date: String },
    #[error(
        "cert-chain.pem certificate {index} (subject {subject}) is not the issuer of the certificate before it (issued by {wanted}); cert-chain.pem must list ca-cert.pem and its issuers in order up to root-cert.pem"
    )]
    ChainBroken {
        index: usize,
        subject: String,
        wanted: String,
    },
    #[error(
        "cert-chain.pem ends at {last}, which root-cert.pem ({root}) did not issue; cert-chain.pem must lead from ca-cert.pem to root-cert.pem"
    )]
    ChainNotToRoot { last: String, root: String },
    #[error(
        "ca-cert.pem (issued by {issuer}) does not chain to root-cert.pem ({root}); give the root that issued it, or the intermediates between them in cert-chain.pem"
    )]
    NotUnderRoot { issuer: String, root: String },
    #[error("ca-key.pem is not the key of ca-cert.pem; give the key that ca-cert.pem was made for")]
    KeyMismatch,
    #[error(
        "the CA does not work as imported ({0}); check that ca-cert.pem, ca-key.pem and root-cert.pem belong together"
    )]
    Unusable(String),
}

/// Checks the files as Isthmus will use them and loads the signing CA.
pub fn import(files: &PluginFiles<'_>, trust_domain: &str) -> Result<Authority, ImportError> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let root_ders = ders(files.root_cert, "root-cert.pem")?;
    let ca_ders = ders(files.ca_cert, "ca-cert.pem")?;
    let chain_ders = if files.cert_chain.trim().is_empty() {
        Vec::new()
    } else {
        ders(files.cert_chain, "cert-chain.pem")?
    };
    let root = cert(&root_ders[0], "root-cert.pem")?;
    let ca = cert(&ca_ders[0], "ca-cert.pem")?;
    let signing_is_root = ca_ders[0] == root_ders[0];
    check_ca(&root, "root-cert.pem", now, !signing_is_root)?;
    check_ca(&ca, "ca-cert.pem", now, false)?;
    check_signing(&ca, "ca-cert.pem")?;

    if files.ca_key.contains("ENCRYPTED") {
        return Err(ImportError::EncryptedKey);
    }
    let key = rcgen::KeyPair::from_pem(files.ca_key).map_err(|e| ImportError::BadKey {
        problem: e.to_string(),
    })?;
    if rcgen::PublicKeyData::der_bytes(&key) != ca.public_key().subject_public_key.data.as_ref() {
        return Err(ImportError::KeyMismatch);
    }

    // The chain: ca-cert.pem, then each issuer in turn, up to the root. The
    // chain file may or may not repeat ca-cert.pem and the root.
    let mut path: Vec<&[u8]> = vec![&ca_ders[0]];
    for der in chain_ders.iter().map(|d| d.as_slice()) {
        if der != ca_ders[0].as_slice() && der != root_ders[0].as_slice() && !path.contains(&der) {
            path.push(der);
        }
    }
    let mut below = ca.clone();
    for (index, der) in path.iter().enumerate().skip(1) {
        let next = cert(der, "cert-chain.pem")?;
        if !issued(&next, &below) {
            return Err(ImportError::ChainBroken {
                index: index + 1,
                subject: next.subject().to_string(),
                wanted: below.issuer().to_string(),
            });
        }
        check_ca(&next, "cert-chain.pem", now, true)?;
        below = next;
    }
    if !signing_is_root && !issued(&root, &below) {
        return Err(if path.len() > 1 {
            ImportError::ChainNotToRoot {
                last: below.subject().to_string(),
                root: root.subject().to_string(),
            }
        } else {
            ImportError::NotUnderRoot {
                issuer: ca.issuer().to_string(),
                root: root.subject().to_string(),
            }
        });
    }

    let chain_pem: String = path
        .iter()
        .map(|d| crate::pem::encode("CERTIFICATE", d))
        .collect();
    let root_pem = crate::pem::encode("CERTIFICATE", &root_ders[0]);
    Authority::from_parts(&root_pem, &chain_pem, files.ca_key, trust_domain)
        .map_err(|e| ImportError::Unusable(e.to_string()))
}

fn ders(text: &str, file: &'static str) -> Result<Vec<Vec<u8>>, ImportError> {
    let parsed = ::pem::parse_many(text).map_err(|e| ImportError::Unreadable {
        file,
        problem: format!("not PEM ({e})"),
    })?;
    let certs: Vec<Vec<u8>> = parsed
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
        .collect();
    if certs.is_empty() {
        return Err(ImportError::Unreadable {
            file,
            problem: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

fn cert<'a>(der: &'a [u8], file: &'static str) -> Result<X509Certificate<'a>, ImportError> {
    match X509Certificate::from_der(der) {
        Ok(([], c)) => Ok(c),
        Ok(_) => Err(ImportError::Unreadable {
            file,
            problem: "trailing bytes after a certificate".into(),
        }),
        Err(e) => Err(ImportError::Unreadable {
            file,
            problem: format!("a certificate is not valid X.509 ({e})"),
        }),
    }
}

fn date(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("unix time {unix}"))
}

/// A CA certificate, valid now and for at least a day, with a key Isthmus
/// signs with. `below_signer` is set for certificates above the signing
/// CA, which need room (pathLen) for it and a cluster intermediate.
fn check_ca(
    c: &X509Certificate<'_>,
    file: &'static str,
    now: i64,
    below_signer: bool,
) -> Result<(), ImportError> {
    let (nb, na) = (
        c.validity().not_before.timestamp(),
        c.validity().not_after.timestamp(),
    );
    if na <= now {
        return Err(ImportError::Expired {
            file,
            date: date(na),
        });
    }
    if nb > now + 300 {
        return Err(ImportError::NotYetValid {
            file,
            date: date(nb),
        });
    }
    if na - now < 86_400 {
        return Err(ImportError::TooShortLived {
            file,
            date: date(na),
        });
    }
    let constraints = c.basic_constraints().ok().flatten().map(|b| b.value);
    match constraints {
        Some(b) if b.ca => {
            if below_signer && b.path_len_constraint.is_some_and(|n| n < 2) {
                return Err(ImportError::Unfit {
                    file,
                    problems: format!(
                        "its pathlen:{} leaves no room for ca-cert.pem and a cluster intermediate below it (it needs pathlen:2 or none)",
                        b.path_len_constraint.unwrap_or_default()
                    ),
                });
            }
        }
        _ => return Err(ImportError::NotCa { file }),
    }
    use x509_parser::public_key::PublicKey;
    let ok = match c.public_key().parsed() {
        Ok(PublicKey::RSA(rsa)) => matches!(rsa.key_size(), 2048 | 3072 | 4096),
        Ok(PublicKey::EC(point)) => matches!(point.key_size(), 256 | 384),
        _ => false,
    };
    if !ok {
        let what = match c.public_key().parsed() {
            Ok(PublicKey::RSA(rsa)) => format!("{}-bit RSA", rsa.key_size()),
            Ok(PublicKey::EC(point)) => format!("{}-bit elliptic-curve", point.key_size()),
            _ => format!("{} (algorithm OID)", c.public_key().algorithm.algorithm),
        };
        return Err(ImportError::UnsupportedKey { file, what });
    }
    Ok(())
}

/// The signing CA must leave room for a cluster intermediate (pathLen 1 or
/// none) and sign certificates and CRLs. A certificate without a keyUsage
/// extension may do anything (RFC 5280). Every problem is named at once.
fn check_signing(c: &X509Certificate<'_>, file: &'static str) -> Result<(), ImportError> {
    let mut problems = Vec::new();
    if let Ok(Some(b)) = c.basic_constraints()
        && b.value.path_len_constraint == Some(0)
    {
        problems.push("it has pathlen:0".to_string());
    }
    if let Ok(Some(ku)) = c.key_usage() {
        let mut missing = Vec::new();
        if !ku.value.key_cert_sign() {
            missing.push("keyCertSign");
        }
        if !ku.value.crl_sign() {
            missing.push("cRLSign (to revoke replaced intermediates)");
        }
        if !missing.is_empty() {
            problems.push(format!("its keyUsage lacks {}", missing.join(" and ")));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ImportError::Unfit {
            file,
            problems: problems.join(" and "),
        })
    }
}

/// Whether `issuer` names itself as `child`'s issuer: by name, and by key
/// identifier where both carry one.
fn issued(issuer: &X509Certificate<'_>, child: &X509Certificate<'_>) -> bool {
    let ski = issuer
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0),
            _ => None,
        });
    let aki = child
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => a.key_identifier.as_ref().map(|k| k.0),
            _ => None,
        });
    issuer.subject().as_raw() == child.issuer().as_raw()
        && match (ski, aki) {
            (Some(s), Some(a)) => s == a,
            _ => true,
        }
}
