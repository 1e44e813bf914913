//! Discovery from Kubernetes, through the `kube` crate: reflectors on
//! Services, EndpointSlices and Pods, turned into the same service
//! snapshots the file registry produces.
//!
//! A Service's endpoints come from its EndpointSlices (label
//! `kubernetes.io/service-name`); each address is a pod whose sidecar listens
//! on 15006, and the pod's service account names its identity. An endpoint
//! whose `conditions.ready` is false is reported as not ready.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use isthmus_api::pb::sync::{Endpoint, Port, Service};
use k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, reflector, watcher};

use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Follows the cluster and publishes a snapshot after every change. Returns
/// only when the receiver side is gone.
pub async fn run(client: Client, tx: watch::Sender<Arc<Vec<Service>>>) {
    let (services, svc_writer) = reflector::store::<KubeService>();
    let (slices, slice_writer) = reflector::store::<EndpointSlice>();
    let (pods, pod_writer) = reflector::store::<Pod>();
    let config = watcher::Config::default();
    // Each stream says whether an event was the end of its initial list.
    let svc = reflector(
        svc_writer,
        watcher(Api::<KubeService>::all(client.clone()), config.clone()),
    )
    .default_backoff()
    .map(|r| r.map(|e| (0, matches!(e, watcher::Event::InitDone))))
    .boxed();
    let eps = reflector(
        slice_writer,
        watcher(Api::<EndpointSlice>::all(client.clone()), config.clone()),
    )
    .default_backoff()
    .map(|r| r.map(|e| (1, matches!(e, watcher::Event::InitDone))))
    .boxed();
    let pod = reflector(pod_writer, watcher(Api::<Pod>::all(client), config))
        .default_backoff()
        .map(|r| r.map(|e| (2, matches!(e, watcher::Event::InitDone))))
        .boxed();
    let mut events = futures::stream::select_all([svc, eps, pod]);
    // Nothing is published until all three have listed once: a partial view
    // would withdraw endpoints the primary still has from before a restart.
    let mut synced = [false; 3];
    while let Some(event) = events.next().await {
        match event {
            Ok((source, init_done)) => synced[source] |= init_done,
            Err(e) => {
                tracing::warn!(error = %e, "Kubernetes watch error; retrying with backoff");
                continue;
            }
        }
        if !synced.iter().all(|s| *s) {
            continue;
        }
        let next = snapshot(&services.state(), &slices.state(), &pods.state());
        tx.send_if_modified(|cur| {
            if **cur == next {
                return false;
            }
            *cur = Arc::new(next);
            true
        });
        if tx.is_closed() {
            return;
        }
    }
}

/// The services of the cluster, as the primary wants them.
pub fn snapshot(
    services: &[Arc<KubeService>],
    slices: &[Arc<EndpointSlice>],
    pods: &[Arc<Pod>],
) -> Vec<Service> {
    let accounts: BTreeMap<(String, String), String> = pods
        .iter()
        .map(|p| {
            let sa = p
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into());
            ((p.namespace().unwrap_or_default(), p.name_any()), sa)
        })
        .collect();
    let pod_labels: BTreeMap<(String, String), BTreeMap<String, String>> = pods
        .iter()
        .map(|p| {
            (
                (p.namespace().unwrap_or_default(), p.name_any()),
                p.labels().clone(),
            )
        })
        .collect();
    let mut out: Vec<Service> = services
        .iter()
        .map(|s| {
            let namespace = s.namespace().unwrap_or_default();
            let name = s.name_any();
            let ports = s
                .spec
                .iter()
                .flat_map(|spec| spec.ports.iter().flatten())
                .filter_map(|p| {
                    Some(Port {
                        name: p.name.clone().unwrap_or_default(),
                        port: u32::try_from(p.port).ok()?,
                        protocol: p
                            .app_protocol
                            .clone()
                            .unwrap_or_else(|| p.protocol.clone().unwrap_or_else(|| "TCP".into()))
                            .to_ascii_lowercase(),
                    })
                })
                .collect();
            let mut endpoints = Vec::new();
            for slice in slices.iter().filter(|sl| {
                sl.namespace().as_deref() == Some(namespace.as_str())
                    && sl.labels().get(SERVICE_NAME_LABEL) == Some(&name)
            }) {
                for ep in slice.endpoints.iter().flatten() {
                    let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                    let target = ep.target_ref.as_ref();
                    let workload = target.and_then(|t| t.name.clone());
                    let account = workload
                        .as_ref()
                        .and_then(|w| accounts.get(&(namespace.clone(), w.clone())).cloned())
                        .unwrap_or_else(|| "default".into());
                    for address in &ep.addresses {
                        endpoints.push(Endpoint {
                            workload: workload.clone().unwrap_or_else(|| address.clone()),
                            address: address.clone(),
                            inbound_port: u32::from(isthmus_api::ports::INBOUND),
                            service_account: account.clone(),
                            ready,
                            labels: workload
                                .as_ref()
                                .and_then(|w| pod_labels.get(&(namespace.clone(), w.clone())))
                                .map(|l| l.clone().into_iter().collect())
                                .unwrap_or_default(),
                        });
                    }
                }
            }
            endpoints.sort_by(|a, b| a.address.cmp(&b.address));
            Service {
                namespace,
                name,
                ports,
                endpoints,
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}
