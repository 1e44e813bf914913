//! CA operations in sequence, generated from a seed, on a live
//! `multi-network` mesh: intermediate rotations, root rotations (paused,
//! resumed, rolled back), imports of a plug-in CA made as Istio's tooling
//! makes one (RSA 4096, with the import's fixes), federation and
//! unfederation, and SIGKILLs of the primary with a restart, in any order.
//!
//! A model predicts what each operation does: whether it is refused (and
//! with which words), which phase a root rotation stands in, how many roots
//! are trusted, and whether the mesh federates. After every step the test
//! checks that prediction against `ca status`, then that both clusters are
//! healthy, that a request crosses from east to west, that a fresh workload
//! certificate is accepted across networks, and that every certificate
//! from a revoked intermediate or a dropped root is refused.
//!
//! `ISTHMUS_CA_SEED` (default 15), `ISTHMUS_CA_SEQUENCES` (default 20) and
//! `ISTHMUS_CA_STEPS` (operations per sequence, default 6) set the run; the
//! seed and every step so far are printed on failure; `ISTHMUS_E2E_NODE`
//! may name a copy of the node binary for long runs by hand. The sequences run one
//! after another on one mesh; each ends with any paused rotation finished.
//!
//! Needs root for network namespaces (CI runs as root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use isthmus_api::rest::{CaView, ImportRoot, RotateRoot};
use isthmus_ca::{Authority, TrustBundle};
use isthmus_e2e::{Mesh, cluster_of, eventually, istio_ca};
use isthmus_proxy::identity::Svid;
use isthmus_topology::runner::NetMode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The node binary; `ISTHMUS_E2E_NODE` may name a copy, so that a long run
/// by hand is not disturbed by rebuilds of the workspace meanwhile.
fn node() -> String {
    std::env::var("ISTHMUS_E2E_NODE")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_isthmus-e2e-node").to_string())
}
const URL: &str = "http://echo.demo.svc.cluster.local:8080/";
const PATIENCE: Duration = Duration::from_secs(60);
const PEER: &str = "other.mesh";

#[derive(Debug, Clone, Copy)]
enum Op {
    RotateIntermediate(&'static str),
    RotateRoot { until: u8 },
    Rollback,
    ImportRoot { until: u8 },
    Federate,
    Unfederate,
    KillPrimary,
}

/// What the CA should be after each step.
#[derive(Debug, Default)]
struct Model {
    /// The phase a root rotation paused after (1 or 2), if one is paused.
    paused: Option<u8>,
    federated: bool,
}

/// What the model says an operation does.
enum Expect {
    /// Runs to its end (or to its pause).
    Done,
    /// Refused at once, with these words in the error.
    Refused(&'static str),
}

impl Model {
    fn expect(&self, op: Op) -> Expect {
        match (op, self.paused) {
            (Op::RotateIntermediate(_), Some(_)) => Expect::Refused("a root rotation is in phase"),
            (Op::ImportRoot { .. }, Some(_)) => Expect::Refused("finish or roll it back first"),
            (Op::Rollback, None) => Expect::Refused("no root rotation is in progress"),
            (Op::Unfederate, _) if !self.federated => Expect::Refused("does not federate"),
            _ => Expect::Done,
        }
    }

    /// The state after `op` ran as expected.
    fn apply(&mut self, op: Op) {
        match op {
            Op::RotateRoot { until } | Op::ImportRoot { until } => {
                let phase = self.paused.unwrap_or(0).max(until);
                self.paused = (phase < 3).then_some(phase);
            }
            Op::Rollback => self.paused = None,
            Op::Federate => self.federated = true,
            Op::Unfederate => self.federated = false,
            Op::RotateIntermediate(_) | Op::KillPrimary => {}
        }
    }
}

fn generate(rng: &mut StdRng, steps: usize) -> Vec<Op> {
    let mut ops: Vec<Op> = (0..steps)
        .map(|_| match rng.random_range(0..12) {
            0 | 1 => Op::RotateIntermediate("east"),
            2 => Op::RotateIntermediate("west"),
            3 => Op::RotateRoot { until: 3 },
            4 => Op::RotateRoot {
                until: rng.random_range(1..=2),
            },
            5 => Op::Rollback,
            6 => Op::ImportRoot {
                until: rng.random_range(1..=3),
            },
            7 => Op::Federate,
            8 => Op::Unfederate,
            _ => Op::KillPrimary,
        })
        .collect();
    // Every sequence has a crash of the primary somewhere.
    if !ops.iter().any(|o| matches!(o, Op::KillPrimary)) {
        let at = rng.random_range(0..ops.len());
        ops[at] = Op::KillPrimary;
    }
    ops
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn ca(mesh: &Mesh) -> Option<CaView> {
    mesh.state.client().ok()?.ca_status().await.ok()
}

/// A fresh CA in Istio's plug-in layout, made with openssl as Istio's
/// tooling makes it (RSA 4096), with the two changes the import asks for
/// (`pathlen:1`, `cRLSign`).
fn plug_in_ca(until: u8) -> ImportRoot {
    let dir = tempfile::tempdir().unwrap();
    istio_ca::root(dir.path());
    let d = istio_ca::cacerts(
        dir.path(),
        "mesh",
        &istio_ca::Recipe {
            key_bits: 4096,
            ..istio_ca::FIXED
        },
    );
    istio_ca::import_request(&d, until)
}

struct Run {
    mesh: Mesh,
    model: Model,
    /// Certificates from revoked intermediates and dropped roots.
    retired: Vec<Svid>,
    /// A certificate under the signing root when the rotation in progress
    /// started: retired once that rotation completes.
    under_old_root: Option<Svid>,
    peer_bundle: serde_json::Value,
    history: Vec<String>,
}

impl Run {
    /// Waits until `ca status` satisfies `done`; on timeout, fails with the
    /// last status seen and every step so far.
    async fn wait_ca(&self, what: &str, done: impl Fn(&CaView) -> bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut last = None;
        loop {
            if let Some(v) = ca(&self.mesh).await {
                if done(&v) {
                    return;
                }
                last = Some(v);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {PATIENCE:?} waiting for {what}; last ca status: {last:#?}\nsteps: {:#?}",
                self.history
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn east_svid(&self) -> Svid {
        self.mesh
            .workload_svid("east", "client-east")
            .await
            .unwrap()
    }

    /// Runs `op`; returns the error text if it was refused.
    async fn run(&mut self, op: Op) -> Result<(), String> {
        let client = || self.mesh.state.client().unwrap();
        let err = |e: anyhow::Error| format!("{e:#}");
        match op {
            Op::RotateIntermediate(cluster) => {
                let before = ca(&self.mesh).await.unwrap();
                let old = before
                    .clusters
                    .iter()
                    .find(|c| c.cluster == cluster)
                    .and_then(|c| c.fingerprint.clone());
                let held = (cluster == "east").then_some(self.east_svid().await);
                client().rotate_intermediate(cluster).await.map_err(err)?;
                self.wait_ca("the intermediate rotation to finish", |v| {
                    v.clusters.iter().any(|c| {
                        c.cluster == cluster
                            && c.rotation.as_deref() == Some("done")
                            && c.fingerprint != old
                    })
                })
                .await;
                self.retired.extend(held);
            }
            Op::RotateRoot { until } | Op::ImportRoot { until } => {
                if self.model.paused.is_none() {
                    self.under_old_root = Some(self.east_svid().await);
                }
                match op {
                    Op::ImportRoot { .. } => {
                        client()
                            .import_root(&plug_in_ca(until))
                            .await
                            .map_err(err)?;
                    }
                    _ => {
                        client()
                            .rotate_root(&RotateRoot {
                                until,
                                rollback: false,
                            })
                            .await
                            .map_err(err)?;
                    }
                }
                let target = self.model.paused.unwrap_or(0).max(until);
                self.wait_ca("the root rotation to finish or pause", |v| {
                    v.rotation.as_ref().is_some_and(|r| {
                        let paused = r.waiting_for.iter().any(|w| w.starts_with("paused"));
                        r.phase == 4 && target >= 3 || r.phase == target && paused
                    })
                })
                .await;
                if target >= 3 {
                    self.retired.extend(self.under_old_root.take());
                }
            }
            Op::Rollback => {
                client()
                    .rotate_root(&RotateRoot {
                        until: 3,
                        rollback: true,
                    })
                    .await
                    .map_err(err)?;
                self.wait_ca("the rollback to finish", |v| {
                    v.rotation
                        .as_ref()
                        .is_some_and(|r| r.phase == 4 && r.rolled_back)
                })
                .await;
                self.under_old_root = None;
            }
            Op::Federate => {
                client()
                    .federate(PEER, &self.peer_bundle)
                    .await
                    .map_err(err)?;
            }
            Op::Unfederate => {
                client().unfederate(PEER).await.map_err(err)?;
            }
            Op::KillPrimary => {
                if let Err(e) = self.mesh.kill_and_restart_primary(&node()).await {
                    panic!("{e:#}\nsteps: {:#?}", self.history);
                }
            }
        }
        Ok(())
    }

    /// Checks the mesh against the model after a step.
    async fn check(&self) {
        let m = &self.model;
        let roots = if m.paused.is_some() { 2 } else { 1 };
        eventually("ca status to match the model", PATIENCE, || async {
            let v = ca(&self.mesh).await?;
            let rotation_ok = match (m.paused, &v.rotation) {
                (Some(p), Some(r)) => {
                    r.phase == p && r.waiting_for.iter().any(|w| w.starts_with("paused"))
                }
                (None, r) => r.as_ref().is_none_or(|r| r.phase == 4),
                (Some(_), None) => false,
            };
            let federated = v.federated.iter().any(|f| f.trust_domain == PEER);
            (rotation_ok && v.roots.len() == roots && federated == m.federated).then_some(())
        })
        .await;
        eventually("both clusters to be healthy", PATIENCE, || async {
            let clusters = self.mesh.state.client().ok()?.list_clusters().await.ok()?;
            (clusters.len() == 2 && clusters.iter().all(|c| c.health == "healthy")).then_some(())
        })
        .await;
        eventually("a request to cross from east to west", PATIENCE, || async {
            let (s, body) = self
                .mesh
                .get("proxy-client-east", "outbound", URL)
                .await
                .ok()?;
            (s == 200 && cluster_of(&body) == "west").then_some(())
        })
        .await;
        eventually(
            "a fresh workload certificate to be accepted across networks",
            PATIENCE,
            || async {
                let svid = self.mesh.workload_svid("east", "client-east").await.ok()?;
                self.mesh.accepted_at_west(&svid).await.then_some(())
            },
        )
        .await;
        for (i, old) in self.retired.iter().enumerate() {
            eventually(
                &format!("retired certificate {i} to be refused"),
                PATIENCE,
                || async { (!self.mesh.accepted_at_west(old).await).then_some(()) },
            )
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_ca_operation_sequences_leave_a_working_ca() {
    if !isthmus_e2e::can_run("generated_ca_operation_sequences_leave_a_working_ca", false) {
        return;
    }
    let seed = env_or("ISTHMUS_CA_SEED", 15);
    let sequences = env_or("ISTHMUS_CA_SEQUENCES", 20);
    let steps = env_or("ISTHMUS_CA_STEPS", 6).max(1) as usize;
    eprintln!("CA sequences: ISTHMUS_CA_SEED={seed}, {sequences} sequences of {steps} operations");
    let mut rng = StdRng::seed_from_u64(seed);

    let mesh = Mesh::up(NetMode::Netns, &node())
        .await
        .expect("mesh starts");
    // Requests must cross networks: east's own echo is relabelled away.
    mesh.relabel("east", "echo-east", "app", "off").unwrap();
    let peer = Authority::generate(PEER).unwrap();
    let peer_bundle = TrustBundle::from_der(PEER, vec![peer.cert().clone()])
        .unwrap()
        .to_jwks(1, 60);
    let mut run = Run {
        mesh,
        model: Model::default(),
        retired: Vec::new(),
        under_old_root: None,
        peer_bundle,
        history: Vec::new(),
    };
    // A panic anywhere below names the seed and the steps so far.
    let seed_note = format!("ISTHMUS_CA_SEED={seed}");
    std::panic::set_hook({
        let default = std::panic::take_hook();
        Box::new(move |info| {
            eprintln!("CA sequence failed; rerun with {seed_note}");
            default(info)
        })
    });
    run.check().await;
    for n in 0..sequences {
        let mut ops = generate(&mut rng, steps);
        // End each sequence with no rotation paused.
        ops.push(Op::RotateRoot { until: 3 });
        for op in ops {
            let expect = run.model.expect(op);
            run.history.push(format!("sequence {n}: {op:?}"));
            eprintln!("step {}: sequence {n}: {op:?}", run.history.len());
            let outcome = run.run(op).await;
            match (expect, outcome) {
                (Expect::Done, Ok(())) => run.model.apply(op),
                (Expect::Refused(words), Err(e)) => {
                    assert!(
                        e.contains(words),
                        "{op:?} was refused without {words:?}: {e}\nsteps: {:#?}",
                        run.history
                    );
                }
                (Expect::Done, Err(e)) => {
                    panic!("{op:?} was refused: {e}\nsteps: {:#?}", run.history)
                }
                (Expect::Refused(words), Ok(())) => panic!(
                    "{op:?} ran, but the model expected a refusal ({words:?})\nsteps: {:#?}",
                    run.history
                ),
            }
            run.check().await;
        }
    }
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for step in &run.history {
        let op = step.split(": ").nth(1).unwrap_or_default();
        let kind = op.split([' ', '(']).next().unwrap_or_default();
        *kinds.entry(kind.to_string()).or_default() += 1;
    }
    eprintln!(
        "CA sequences: {} steps passed ({kinds:?}), {} retired certificates refused",
        run.history.len(),
        run.retired.len()
    );
}
