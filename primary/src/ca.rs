//! The primary's side of the CA: the mesh root, created once and shared by
//! every replica through the store, and intermediates for joining clusters.

use std::sync::Arc;

use isthmus_ca::{Authority, TrustBundle};

use crate::records::RootRecord;
use crate::store::{Compare, Op, Store, keys};

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
    ) -> anyhow::Result<Self> {
        for _ in 0..3 {
            if let Some(kv) = store.get(keys::CA_ROOT).await? {
                let rec: RootRecord = serde_json::from_slice(&kv.value).map_err(|e| {
                    anyhow::anyhow!("stored root at {} is corrupt: {e}", keys::CA_ROOT)
                })?;
                let authority =
                    Authority::from_pem(&rec.cert_pem, &rec.key_pem, &rec.trust_domain)?;
                let bundle =
                    TrustBundle::from_der(&rec.trust_domain, vec![authority.cert().clone()])?;
                return Ok(Self { authority, bundle });
            }
            let authority = Authority::generate(trust_domain)?;
            let rec = RootRecord {
                trust_domain: trust_domain.to_string(),
                cert_pem: authority.cert_pem().to_string(),
                key_pem: authority.key_pem().to_string(),
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
