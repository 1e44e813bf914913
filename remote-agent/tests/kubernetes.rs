//! Kubernetes discovery through the real `kube` client, driven by
//! tower-test's mock service (kube's own testing approach) answering with
//! the JSON an API server sends: list responses, then a watch event.

// Test code: a panic is how an assertion fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use isthmus_api::pb::sync::Service;
use kube::client::Body;
use tokio::sync::{mpsc, watch};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Plays the API server: lists from fixtures; holds each watch open until
/// the test sends an event for that path.
async fn api_server(mut handle: Handle, mut events: mpsc::Receiver<(&'static str, &'static str)>) {
    let mut watches: Vec<(String, tower_test::mock::SendResponse<Response<Body>>)> = Vec::new();
    loop {
        tokio::select! {
            next = handle.next_request() => {
                let Some((req, send)) = next else { return };
                let path = req.uri().path().to_string();
                let query = req.uri().query().unwrap_or_default().to_string();
                if query.contains("watch=true") {
                    watches.push((path, send));
                    continue;
                }
                let body = match path.as_str() {
                    "/api/v1/services" => include_str!("fixtures/services.json"),
                    "/apis/discovery.k8s.io/v1/endpointslices" => include_str!("fixtures/endpointslices.json"),
                    "/api/v1/pods" => include_str!("fixtures/pods.json"),
                    other => panic!("unexpected API request {other}?{query}"),
                };
                send.send_response(Response::builder().status(200).body(Body::from(body.as_bytes().to_vec())).unwrap());
            }
            Some((path, event)) = events.recv() => {
                let i = watches.iter().position(|(p, _)| p == path).expect("the watch for that path is open");
                let (_, send) = watches.swap_remove(i);
                send.send_response(Response::builder().status(200).body(Body::from(format!("{event}\n").into_bytes())).unwrap());
            }
        }
    }
}

async fn wait_for(
    rx: &mut watch::Receiver<Arc<Vec<Service>>>,
    what: &str,
    ok: impl Fn(&[Service]) -> bool,
) -> Vec<Service> {
    let result = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| ok(s)))
        .await
        .map(|r| r.map(|s| s.to_vec()));
    match result {
        Ok(snapshot) => snapshot.expect("discovery running"),
        Err(_) => panic!("timed out waiting for {what}; last: {:?}", rx.borrow()),
    }
}

#[tokio::test]
async fn services_endpoint_slices_and_pods_become_mesh_services() {
    let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(mock, "default");
    let (events_tx, events_rx) = mpsc::channel(4);
    tokio::spawn(api_server(handle, events_rx));
    let (tx, mut rx) = watch::channel(Arc::new(Vec::new()));
    tokio::spawn(isthmus_agent::kubernetes::run(client, tx));

    let snap = wait_for(&mut rx, "the first snapshot", |s| !s.is_empty()).await;
    let names: Vec<String> = snap
        .iter()
        .map(|s| format!("{}/{}", s.namespace, s.name))
        .collect();
    assert_eq!(names, ["default/kubernetes", "demo/echo"]);
    let echo = &snap[1];
    assert_eq!(
        (echo.ports[0].port, echo.ports[0].protocol.as_str()),
        (8080, "http")
    );
    assert_eq!(echo.endpoints.len(), 2);
    for (ep, addr, pod) in [
        (&echo.endpoints[0], "198.51.100.21", "echo-5d9c7b8f4-abcde"),
        (&echo.endpoints[1], "198.51.100.22", "echo-5d9c7b8f4-fghij"),
    ] {
        assert_eq!(ep.address, addr);
        assert_eq!(ep.workload, pod);
        assert_eq!(
            ep.service_account, "echo",
            "the identity comes from the pod's service account"
        );
        assert_eq!(ep.inbound_port, 15006);
        assert!(ep.ready);
    }
    assert!(
        snap[0].endpoints.is_empty(),
        "a service without slices has no endpoints"
    );

    // A watch event: one pod stops being ready.
    events_tx
        .send((
            "/apis/discovery.k8s.io/v1/endpointslices",
            include_str!("fixtures/endpointslice-modified.json").trim(),
        ))
        .await
        .unwrap();
    let snap = wait_for(&mut rx, "the endpoint to turn not-ready", |s| {
        s.iter()
            .any(|svc| svc.name == "echo" && svc.endpoints.iter().any(|e| !e.ready))
    })
    .await;
    let echo = snap.iter().find(|s| s.name == "echo").unwrap();
    let states: Vec<(&str, bool)> = echo
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.ready))
        .collect();
    assert_eq!(states, [("198.51.100.21", true), ("198.51.100.22", false)]);
}
