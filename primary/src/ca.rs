//! The primary's side of the CA: the mesh root, created once and shared by
//! every replica through the store (its key sealed under the KEK), and
//! intermediates for joining clusters.

use std::sync::Arc;

use isthmus_ca::{Authority, TrustBundle};

use crate::kek::Kek;
use crate::records::RootRecord;
use crate::store::{Compare, Op, Store, keys};

/// What a sealed root key is bound to: its certificate.
fn binding(cert_pem: &str) -> String {
    let der = isthmus_ca::pem::pem_der(cert_pem).unwrap_or_default();
    format!(
        "isthmus root key for {}",
        isthmus_ca::pem::fingerprint(&der)
    )
}

pub struct CaState {
    pub authority: Authority,
    pub bundle: TrustBundle,
}

impl CaState {
    /// Loads the root from the store, creating it if this is the first
    /// primary. A create race between replicas is settled by a compare on the
    /// key's absence: the loser loads the winner's root.
    pub async fn load_or_create(
        store: &Arc<dyn Store>,
        trust_domain: &str,
        kek: &Kek,
    ) -> anyhow::Result<Self> {
        for _ in 0..3 {
            if let Some(kv) = store.get(keys::CA_ROOT).await? {
                let rec: RootRecord = serde_json::from_slice(&kv.value).map_err(|e| {
                    anyhow::anyhow!("stored root at {} is corrupt: {e}", keys::CA_ROOT)
                })?;
                let key_pem = kek
                    .open(&rec.key, &binding(&rec.cert_pem))
                    .map_err(|e| anyhow::anyhow!("opening the mesh root's key: {e}"))?;
                let authority = Authority::from_pem(&rec.cert_pem, &key_pem, &rec.trust_domain)?;
                let bundle =
                    TrustBundle::from_der(&rec.trust_domain, vec![authority.cert().clone()])?;
                return Ok(Self { authority, bundle });
            }
            let authority = Authority::generate(trust_domain)?;
            let rec = RootRecord {
                trust_domain: trust_domain.to_string(),
                cert_pem: authority.cert_pem().to_string(),
                key: kek.seal(authority.key_pem(), &binding(authority.cert_pem())),
            };
            let (created, _) = store
                .txn(
                    vec![Compare {
                        key: keys::CA_ROOT.into(),
                        mod_revision: 0,
                    }],
                    vec![Op::Put {
                        key: keys::CA_ROOT.into(),
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

    pub fn bundle_pem(&self) -> String {
        self.bundle.to_pem()
    }

    /// SHA-256 of the root: what join tokens carry so agents can pin it.
    pub fn root_fingerprint(&self) -> String {
        isthmus_ca::pem::fingerprint(self.authority.cert())
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

        let raw = store.get(keys::CA_ROOT).await.unwrap().unwrap().value;
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
}
