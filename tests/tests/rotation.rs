//! CA rotation under load: with at least 200 requests/s crossing from east
//! to west through west's gateway for the whole test,
//! - a root rotation runs to the end of phase 1 and pauses; the primary is
//!   killed and restarted; the rotation resumes and completes all three
//!   phases; afterwards no workload certificate chains to the old root, and
//!   a client holding only an old-root certificate is refused;
//! - an intermediate rotation of east completes the same way: no workload
//!   holds a certificate from the old intermediate, and a certificate from it
//!   is refused (revoked by a CRL);
//! - a second root rotation follows at once, with that CRL in the bundle:
//!   it completes, both clusters stay healthy and every sidecar renews
//!   under the third root;
//! - not one request fails.
//!
//! Needs root for network namespaces (CI runs as root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use isthmus_api::rest::{CaView, RotateRoot};
use isthmus_e2e::{Load, Mesh, eventually};
use isthmus_topology::runner::NetMode;

const NODE: &str = env!("CARGO_BIN_EXE_isthmus-e2e-node");
const URL: &str = "http://echo.demo.svc.cluster.local:8080/";
const PATIENCE: Duration = Duration::from_secs(60);

/// The CA status, through a client rebuilt each time: the primary's serving
/// certificate moves to the new root during the rotation, and the roots
/// file the client trusts follows it.
async fn ca(mesh: &Mesh) -> Option<CaView> {
    mesh.state.client().ok()?.ca_status().await.ok()
}

async fn accepted(mesh: &Mesh, svid: &isthmus_proxy::identity::Svid) -> bool {
    mesh.accepted_at_west(svid).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_and_intermediate_rotation_under_load_fail_no_request() {
    if !isthmus_e2e::can_run(
        "root_and_intermediate_rotation_under_load_fail_no_request",
        false,
    ) {
        return;
    }
    let mut mesh = Mesh::up(NetMode::Netns, NODE).await.expect("mesh starts");
    // Every request crosses networks: east's own echo is relabelled away.
    mesh.relabel("east", "echo-east", "app", "off").unwrap();
    eventually("east's client to route echo to west", PATIENCE, || async {
        let (s, body) = mesh.get("proxy-client-east", "outbound", URL).await.ok()?;
        (s == 200 && body.contains("\"cluster\": \"west\"")).then_some(())
    })
    .await;

    let before = ca(&mesh).await.expect("CA status");
    assert_eq!(before.roots.len(), 1);
    let old_root = before.roots[0].fingerprint.clone();
    assert_eq!(
        before.roots[0].workloads, 3,
        "three sidecars hold certificates under the root: {before:?}"
    );
    // A certificate under the old root, kept for later; it works now.
    let old_root_svid = mesh.workload_svid("east", "client-east").await.unwrap();
    assert!(
        accepted(&mesh, &old_root_svid).await,
        "control request refused"
    );

    let load = Load::start(
        mesh.netns("proxy-client-east").map(str::to_string),
        mesh.listener("proxy-client-east", "outbound"),
        URL,
        4,
        60,
    );

    // Phase 1 only, then pause.
    let client = mesh.state.client().unwrap();
    client
        .rotate_root(&RotateRoot {
            until: 1,
            rollback: false,
        })
        .await
        .unwrap();
    let paused = eventually("phase 1 to complete and pause", PATIENCE, || async {
        let v = ca(&mesh).await?;
        let r = v.rotation.clone()?;
        (r.phase == 1 && r.waiting_for.iter().any(|w| w.starts_with("paused"))).then_some(v)
    })
    .await;
    let new_root = paused.rotation.as_ref().unwrap().to.clone();
    assert_eq!(paused.roots.len(), 2, "both roots trusted in phase 1");
    assert_eq!(paused.signing_root, old_root, "the old root still signs");

    // The primary crashes and comes back; the rotation is where it was.
    mesh.kill_and_restart_primary(NODE).await.unwrap();
    let resumed = ca(&mesh).await.expect("the restarted primary answers");
    let r = resumed.rotation.as_ref().unwrap();
    assert_eq!((r.phase, r.to.as_str()), (1, new_root.as_str()));

    // Resume: phases 2 and 3.
    mesh.state
        .client()
        .unwrap()
        .rotate_root(&RotateRoot {
            until: 3,
            rollback: false,
        })
        .await
        .unwrap();
    let done = eventually("the root rotation to finish", PATIENCE, || async {
        let v = ca(&mesh).await?;
        (v.rotation.as_ref()?.phase == 4).then_some(v)
    })
    .await;
    assert_eq!(done.signing_root, new_root);
    assert_eq!(done.roots.len(), 1, "the old root is gone: {done:?}");
    assert_eq!(done.roots[0].fingerprint, new_root);
    assert_eq!(
        done.roots[0].workloads, 3,
        "every sidecar holds a certificate under the new root: {done:?}"
    );
    assert_eq!(done.workloads_unknown, 0);
    for c in &done.clusters {
        assert_eq!(c.root.as_deref(), Some(new_root.as_str()), "{c:?}");
    }
    // A client that holds only an old-root certificate is refused.
    eventually(
        "west's sidecar to refuse an old-root certificate",
        PATIENCE,
        || async { (!accepted(&mesh, &old_root_svid).await).then_some(()) },
    )
    .await;
    let fresh = mesh.workload_svid("east", "client-east").await.unwrap();
    assert!(
        accepted(&mesh, &fresh).await,
        "a new-root certificate works"
    );

    // Intermediate rotation of east, same load.
    let before = ca(&mesh).await.unwrap();
    let old_intermediate = before
        .clusters
        .iter()
        .find(|c| c.cluster == "east")
        .and_then(|c| c.fingerprint.clone())
        .unwrap();
    let old_intermediate_svid = mesh.workload_svid("east", "client-east").await.unwrap();
    assert!(accepted(&mesh, &old_intermediate_svid).await);
    mesh.state
        .client()
        .unwrap()
        .rotate_intermediate("east")
        .await
        .unwrap();
    let done = eventually(
        "east's intermediate rotation to finish",
        PATIENCE,
        || async {
            let v = ca(&mesh).await?;
            let east = v.clusters.iter().find(|c| c.cluster == "east")?;
            (east.rotation.as_deref() == Some("done")).then_some(v)
        },
    )
    .await;
    let east = done.clusters.iter().find(|c| c.cluster == "east").unwrap();
    assert_ne!(east.fingerprint.as_deref(), Some(old_intermediate.as_str()));
    assert_eq!(east.workloads, 2, "{east:?}");
    assert_eq!(east.workloads_on_replaced, 0, "{east:?}");
    eventually(
        "west's sidecar to refuse a certificate from the revoked intermediate",
        PATIENCE,
        || async { (!accepted(&mesh, &old_intermediate_svid).await).then_some(()) },
    )
    .await;
    let fresh = mesh.workload_svid("east", "client-east").await.unwrap();
    assert!(
        accepted(&mesh, &fresh).await,
        "a certificate from the new intermediate works"
    );

    // A root rotation right after the intermediate rotation, whose CRL (of
    // the old root) is in the bundle: this sequence used to wedge phase 2,
    // with the primary refusing every agent (BadSignature).
    let revoked_root = ca(&mesh).await.unwrap().signing_root;
    mesh.state
        .client()
        .unwrap()
        .rotate_root(&RotateRoot {
            until: 3,
            rollback: false,
        })
        .await
        .unwrap();
    let done = eventually(
        "the root rotation after the intermediate rotation to finish",
        PATIENCE,
        || async {
            let v = ca(&mesh).await?;
            let r = v.rotation.as_ref()?;
            (r.from == revoked_root && r.phase == 4).then_some(v)
        },
    )
    .await;
    let third_root = done.signing_root.clone();
    assert_ne!(third_root, revoked_root);
    assert_eq!(done.roots.len(), 1, "{done:?}");
    assert_eq!(
        done.roots[0].workloads, 3,
        "every sidecar renewed under the new root: {done:?}"
    );
    for c in &done.clusters {
        assert_eq!(c.root.as_deref(), Some(third_root.as_str()), "{c:?}");
    }
    let clusters = mesh.state.client().unwrap().list_clusters().await.unwrap();
    for c in &clusters {
        assert_eq!(c.health, "healthy", "{c:?}");
    }
    let fresh = mesh.workload_svid("east", "client-east").await.unwrap();
    assert!(
        accepted(&mesh, &fresh).await,
        "a certificate under the third root works"
    );
    eventually(
        "west's sidecar to refuse a certificate under the dropped root",
        PATIENCE,
        || async { (!accepted(&mesh, &old_intermediate_svid).await).then_some(()) },
    )
    .await;

    let report = load.stop().await;
    eprintln!(
        "{} requests in {:?} ({:.0}/s), {} failed",
        report.sent,
        report.elapsed,
        report.rate(),
        report.failures.len()
    );
    assert!(
        report.failures.is_empty(),
        "{} of {} requests failed; first: {:?}",
        report.failures.len(),
        report.sent,
        report.failures.first()
    );
    assert!(
        report.rate() >= 200.0,
        "the load ran at {:.0}/s, below 200/s",
        report.rate()
    );
    assert_eq!(
        report.clusters,
        ["west".to_string()].into(),
        "every request crossed to west"
    );
}
