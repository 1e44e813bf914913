//! The primary's side of the CA: the mesh roots, created once (or imported)
//! and shared by every replica through the store, their keys sealed under
//! the KEK; the CA that signs cluster intermediates; and the trust bundle
//! every proxy gets.
//!
//! All of it is one record, [`CaRecord`] under [`keys::CA`], so a rotation
//! step changes roots, signer, CRLs and progress in one transaction. Every
//! replica follows the record through the model ([`follow`]): when it
//! changes, the replica unseals the current signing key, swaps its
//! [`CaState`], re-issues its own serving certificate, and rewrites
//! `DATA_DIR/root-cert.pem`.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use isthmus_ca::{Authority, TrustBundle};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::kek::{Kek, Sealed};
use crate::model::Model;
use crate::records::now_unix;
use crate::store::{Compare, Op, Store, keys};

/// One trusted root and the CA under it that signs intermediates.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RootEntry {
    /// SHA-256 of the root certificate.
    pub fingerprint: String,
    pub root_pem: String,
    /// The signing certificate and its parents short of the root; empty
    /// when the root signs itself.
    pub chain_pem: String,
    /// The signing key, sealed under the KEK.
    pub key: Sealed,
    pub not_after_unix: i64,
    pub added_unix: u64,
    pub imported: bool,
}

/// A root rotation in progress, or the last one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RootRotation {
    /// Fingerprint of the root being replaced.
    pub from: String,
    /// Fingerprint of the root replacing it.
    pub to: String,
    /// 1: every bundle trusts both roots; 2: intermediates and workloads
    /// re-issued under `to`; 3: `from` dropped. 4 means finished.
    pub phase: u8,
    /// The rotation stops after this phase until asked to go on.
    pub until: u8,
    /// Set by a rollback: `from` and `to` were swapped.
    pub rolled_back: bool,
    pub started_unix: u64,
    pub phase_started_unix: u64,
}

/// A revoked intermediate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Revoked {
    pub root: String,
    pub cluster: String,
    pub pem: String,
}

/// The whole CA state, as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CaRecord {
    pub trust_domain: String,
    /// Every root the mesh trusts: one, or two during a rotation.
    pub roots: Vec<RootEntry>,
    /// Fingerprint of the root whose CA signs intermediates now.
    pub signing: String,
    /// CRLs (PEM) revoking replaced cluster intermediates, one per root
    /// that has revoked any; built from `revoked`.
    #[serde(default)]
    pub crls: Vec<String>,
    /// Intermediates revoked, with the root whose CA issued them.
    #[serde(default)]
    pub revoked: Vec<Revoked>,
    /// Grows with every change proxies must see (roots, CRLs).
    pub sequence: u64,
    #[serde(default)]
    pub rotation: Option<RootRotation>,
    /// Other trust domains this mesh federates with: name -> their roots
    /// (PEM). Kept apart from `roots`, never merged.
    #[serde(default)]
    pub federated: std::collections::BTreeMap<String, String>,
}

impl CaRecord {
    pub fn signing_entry(&self) -> Option<&RootEntry> {
        self.roots.iter().find(|r| r.fingerprint == self.signing)
    }

    /// The trust bundle: every root, the CRLs, and the federated domains'
    /// bundles beside it.
    pub fn bundle(&self) -> anyhow::Result<TrustBundle> {
        let pem: String = self.roots.iter().map(|r| r.root_pem.as_str()).collect();
        let federated = self
            .federated
            .iter()
            .map(|(td, pem)| TrustBundle::from_pem(td, pem))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustBundle::from_pem(&self.trust_domain, &pem)?
            .with_crls_pem(&self.crls.concat())?
            .with_federated(federated))
    }

    /// Version string of what proxies must trust.
    pub fn bundle_version(&self) -> String {
        format!("ca-{}", self.sequence)
    }

    /// Whether a stored CRL names its issuer by a key identifier that no
    /// signing CA here has. CRLs written before their AKI was the issuer's
    /// own SKI (an imported CA's is often a SHA-1, where those CRLs carried
    /// a SHA-256) are no longer tied to their CA by the verifiers, so they
    /// would revoke nothing; the leader rebuilds them.
    pub fn crls_outdated(&self) -> bool {
        let signers: Vec<Vec<u8>> = self
            .roots
            .iter()
            .filter_map(|e| {
                let chain = if e.chain_pem.is_empty() {
                    &e.root_pem
                } else {
                    &e.chain_pem
                };
                let first = isthmus_ca::pem::certs(chain, "signing CA")
                    .ok()?
                    .into_iter()
                    .next()?;
                isthmus_ca::svid::subject_key_id(&first)
            })
            .collect();
        self.crls.iter().any(|crl| {
            isthmus_ca::svid::crl_authority_key_id(crl).is_some_and(|aki| !signers.contains(&aki))
        })
    }

    /// Rebuilds `crls` from `revoked`: one CRL per root, signed by its CA.
    pub fn rebuild_crls(&mut self, kek: &Kek) -> anyhow::Result<()> {
        let mut crls = Vec::new();
        for entry in &self.roots {
            let certs: Vec<_> = self
                .revoked
                .iter()
                .filter(|r| r.root == entry.fingerprint)
                .filter_map(|r| isthmus_ca::pem::certs(&r.pem, "revoked intermediate").ok())
                .flatten()
                .collect();
            if certs.is_empty() {
                continue;
            }
            let authority = self.authority(entry, kek)?;
            crls.push(authority.revocation_list(&certs, self.sequence)?);
        }
        self.crls = crls;
        Ok(())
    }

    /// Loads a root entry's signing CA.
    pub fn authority(&self, entry: &RootEntry, kek: &Kek) -> anyhow::Result<Authority> {
        let key_pem = kek
            .open(&entry.key, &binding(&entry.fingerprint))
            .map_err(|e| anyhow::anyhow!("opening the key of root {}: {e}", entry.fingerprint))?;
        let chain = if entry.chain_pem.is_empty() {
            &entry.root_pem
        } else {
            &entry.chain_pem
        };
        Ok(Authority::from_parts(
            &entry.root_pem,
            chain,
            &key_pem,
            &self.trust_domain,
        )?)
    }
}

/// What a sealed signing key is bound to: the root it works under.
fn binding(root_fingerprint: &str) -> String {
    format!("isthmus signing key under root {root_fingerprint}")
}

/// Seals a CA into a root entry.
pub fn entry(authority: &Authority, kek: &Kek, imported: bool) -> anyhow::Result<RootEntry> {
    let fingerprint = isthmus_ca::pem::fingerprint(authority.anchor());
    let info = isthmus_ca::svid::inspect(authority.anchor())?;
    Ok(RootEntry {
        root_pem: isthmus_ca::pem::encode("CERTIFICATE", authority.anchor()),
        chain_pem: authority.chain_pem(),
        key: kek.seal(authority.key_pem(), &binding(&fingerprint))?,
        not_after_unix: info.not_after_unix,
        added_unix: now_unix(),
        imported,
        fingerprint,
    })
}

/// The CA as one replica holds it now.
pub struct CaState {
    pub record: CaRecord,
    /// The CA that signs intermediates.
    pub authority: Authority,
    pub bundle: TrustBundle,
    /// Certificates of every signing CA's chain short of its root: the only
    /// intermediates, besides a cluster's own, that a peer's chain may use.
    pub ca_chain: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl CaState {
    pub fn from_record(record: CaRecord, kek: &Kek) -> anyhow::Result<Self> {
        let entry = record.signing_entry().ok_or_else(|| {
            anyhow::anyhow!(
                "the CA record names signing root {} but holds no such root",
                record.signing
            )
        })?;
        let authority = record.authority(entry, kek)?;
        let left = authority.not_after_unix() - now_unix() as i64;
        if left < 30 * 86_400 {
            tracing::warn!(
                days_left = left / 86_400,
                "the signing CA expires within 30 days and cluster intermediates end with it: rotate to a new root (`isthmusctl ca rotate-root` or `ca import-root`) before then"
            );
        }
        let bundle = record.bundle()?;
        let mut ca_chain = Vec::new();
        for r in &record.roots {
            if !r.chain_pem.is_empty() {
                ca_chain.extend(isthmus_ca::pem::certs(&r.chain_pem, "CA chain")?);
            }
        }
        Ok(Self {
            record,
            authority,
            bundle,
            ca_chain,
        })
    }

    /// Loads the CA from the store, creating a root if this is the first
    /// primary. A create race between replicas is settled by a compare on
    /// the key's absence: the loser loads the winner's root.
    pub async fn load_or_create(
        store: &Arc<dyn Store>,
        trust_domain: &str,
        kek: &Kek,
    ) -> anyhow::Result<Self> {
        for _ in 0..3 {
            if let Some(kv) = store.get(keys::CA).await? {
                let rec: CaRecord = serde_json::from_slice(&kv.value).map_err(|e| {
                    anyhow::anyhow!("stored CA record at {} is corrupt: {e}", keys::CA)
                })?;
                return Self::from_record(rec, kek);
            }
            let authority = Authority::generate(trust_domain)?;
            let root = entry(&authority, kek, false)?;
            let rec = CaRecord {
                trust_domain: trust_domain.to_string(),
                signing: root.fingerprint.clone(),
                roots: vec![root],
                crls: vec![],
                revoked: vec![],
                sequence: 1,
                rotation: None,
                federated: Default::default(),
            };
            let (created, _) = store
                .txn(
                    vec![Compare {
                        key: keys::CA.into(),
                        mod_revision: 0,
                    }],
                    vec![Op::Put {
                        key: keys::CA.into(),
                        value: serde_json::to_vec(&rec)?,
                    }],
                )
                .await?;
            if created {
                tracing::info!(trust_domain, "created a new mesh root CA");
            }
        }
        anyhow::bail!("could not load or create the mesh root")
    }

    pub fn trust_domain(&self) -> &str {
        self.authority.trust_domain()
    }

    /// Every trusted root, PEM.
    pub fn bundle_pem(&self) -> String {
        self.bundle.to_pem()
    }

    /// SHA-256 of the root that signs now: what new join tokens carry so
    /// agents can pin it.
    pub fn root_fingerprint(&self) -> String {
        self.record.signing.clone()
    }

    /// The PEM chain to append after a cluster intermediate.
    pub fn intermediate_chain_suffix(&self) -> String {
        self.authority.chain_pem()
    }
}

/// Files a replica keeps in step with the CA.
pub struct Files {
    /// `DATA_DIR/root-cert.pem`: every trusted root.
    pub roots: PathBuf,
    /// The admin token file; its root pin follows the signing root.
    pub admin_token: PathBuf,
}

/// Follows the CA record in the model. On every change: swaps the shared
/// state, rewrites the files, and calls `on_change` (which re-issues the
/// serving certificates). Runs until the model is gone.
pub async fn follow(
    current: Arc<ArcSwap<CaState>>,
    mut model: watch::Receiver<Arc<Model>>,
    kek: Arc<Kek>,
    files: Files,
    on_change: impl Fn(&CaState),
) {
    loop {
        let next = model.borrow_and_update().ca.clone();
        if let Some(rec) = next
            && rec != current.load().record
        {
            match CaState::from_record(rec, &kek) {
                Ok(state) => {
                    let signing_changed = state.record.signing != current.load().record.signing;
                    write_files(&files, &state, signing_changed);
                    on_change(&state);
                    tracing::info!(
                        sequence = state.record.sequence,
                        signing = %state.record.signing,
                        roots = state.record.roots.len(),
                        "CA state changed"
                    );
                    current.store(Arc::new(state));
                }
                Err(e) => tracing::error!(error = %e, "cannot load the changed CA record"),
            }
        }
        if model.changed().await.is_err() {
            return;
        }
    }
}

pub fn write_files(files: &Files, state: &CaState, signing_changed: bool) {
    if let Err(e) = std::fs::write(&files.roots, state.bundle_pem()) {
        tracing::warn!(path = %files.roots.display(), error = %e, "cannot write the trust roots");
    }
    if !signing_changed {
        return;
    }
    // Tokens minted here pin the signing root; keep the secret, move the pin.
    if let Ok(text) = std::fs::read_to_string(&files.admin_token)
        && let Some((secret, fp)) = isthmus_api::join_token::parse(text.trim())
        && fp != state.record.signing
    {
        let token = isthmus_api::join_token::format(secret, &state.record.signing);
        if let Err(e) = isthmus_transport::write_private(&files.admin_token, &token) {
            tracing::warn!(error = %e, "cannot update the admin token's root pin");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    #[tokio::test]
    async fn the_stored_root_key_is_sealed_and_needs_the_kek() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("db")).unwrap());
        let kek = Kek::from_base64(&Kek::generate()).unwrap();
        let first = CaState::load_or_create(&store, "cluster.local", &kek)
            .await
            .unwrap();

        let raw = store.get(keys::CA).await.unwrap().unwrap().value;
        let raw = String::from_utf8(raw).unwrap();
        assert!(
            !raw.contains("PRIVATE KEY"),
            "the store holds a plaintext key: {raw}"
        );
        assert!(!raw.contains(first.authority.key_pem().lines().nth(1).unwrap()));

        let again = CaState::load_or_create(&store, "cluster.local", &kek)
            .await
            .unwrap();
        assert_eq!(again.root_fingerprint(), first.root_fingerprint());

        let wrong = Kek::from_base64(&Kek::generate()).unwrap();
        let err = CaState::load_or_create(&store, "cluster.local", &wrong)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("KEK"), "{err}");
    }

    /// A CRL whose AKI is not its CA's SKI (as primaries before this one
    /// wrote them for imported CAs) is found, and rebuilding fixes it.
    #[test]
    fn crls_naming_their_issuer_by_an_old_key_id_are_found_and_rebuilt() {
        let kek = Kek::from_base64(&Kek::generate()).unwrap();
        let authority = Authority::generate("cluster.local").unwrap();
        let root = entry(&authority, &kek, false).unwrap();
        let (csr, key) = isthmus_ca::issue::generate_csr("east").unwrap();
        let revoked = authority.sign_intermediate(&csr, "east").unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_der(
            authority.cert(),
            rcgen::KeyPair::from_pem(authority.key_pem()).unwrap(),
        )
        .unwrap();
        let now = time::OffsetDateTime::now_utc();
        let old_style = rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(1),
            crl_number: rcgen::SerialNumber::from_slice(&[1]),
            issuing_distribution_point: None,
            revoked_certs: vec![],
            key_identifier_method: rcgen::KeyIdMethod::PreSpecified(vec![9; 20]),
        }
        .signed_by(&issuer)
        .unwrap()
        .pem()
        .unwrap();
        let mut rec = CaRecord {
            trust_domain: "cluster.local".into(),
            signing: root.fingerprint.clone(),
            revoked: vec![Revoked {
                root: root.fingerprint.clone(),
                cluster: "east".into(),
                pem: revoked.pem.clone(),
            }],
            roots: vec![root],
            crls: vec![old_style],
            sequence: 3,
            rotation: None,
            federated: Default::default(),
        };
        assert!(rec.crls_outdated());
        rec.rebuild_crls(&kek).unwrap();
        assert!(!rec.crls_outdated());
        // The rebuilt CRL revokes the intermediate in a verifier.
        let signer = isthmus_ca::Signer::from_pem(&revoked.pem, &key).unwrap();
        let id = isthmus_ca::SpiffeId::workload("cluster.local", "demo", "echo").unwrap();
        let (leaf, _) = signer
            .issue_workload(&id, std::time::Duration::ZERO)
            .unwrap();
        let err = rec
            .bundle()
            .unwrap()
            .verify(
                &leaf.der,
                signer.chain(),
                rustls::pki_types::UnixTime::now(),
                webpki::KeyUsage::client_auth(),
                &isthmus_ca::crypto_provider().signature_verification_algorithms,
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
            ),
            "{err:?}"
        );
    }
}
