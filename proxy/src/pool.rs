//! A DestinationRule's traffic policy on the request path: load balancing
//! among a priority's endpoints (round robin, least request, random) and
//! the connection pool's circuit breakers, as Envoy applies them to the
//! same clusters.
//!
//! - **Connections and requests.** Over HTTP/1.1 each request in flight
//!   holds a connection, so `maxConnections` and `http2MaxRequests` both
//!   bound the requests in flight to a cluster. A request beyond that
//!   waits, if fewer than `http1MaxPendingRequests` (default 1024, as in
//!   Envoy) are waiting; otherwise it fails at once with a 503 naming the
//!   limit, as Envoy's overflow does.
//! - **Retries.** `maxRetries` bounds the retries in flight to a cluster;
//!   a retry past it is not made.
//!
//! State is per cluster and is rebuilt when the cluster's limits change;
//! requests admitted under the old limits finish under them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use isthmus_xds::{LbPolicy, Limits, WeightedEndpoint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::health::round_robin;

/// Envoy's default for `max_pending_requests`.
const DEFAULT_MAX_PENDING: usize = 1024;

/// Load and limits of every cluster.
#[derive(Default)]
pub struct Pools {
    clusters: ArcSwap<HashMap<String, Arc<ClusterPool>>>,
}

impl Pools {
    /// The state of `cluster` under `limits`.
    pub fn of(&self, cluster: &str, limits: Limits) -> Arc<ClusterPool> {
        if let Some(p) = self.clusters.load().get(cluster)
            && p.limits == limits
        {
            return p.clone();
        }
        let fresh = Arc::new(ClusterPool::new(limits));
        self.clusters.rcu(|m| {
            let mut m = HashMap::clone(m);
            match m.get(cluster) {
                Some(p) if p.limits == limits => {}
                _ => {
                    m.insert(cluster.to_string(), fresh.clone());
                }
            }
            m
        });
        self.clusters.load().get(cluster).cloned().unwrap_or(fresh)
    }
}

pub struct ClusterPool {
    limits: Limits,
    /// Permits for requests in flight, when limited, and their number.
    active: Option<(Arc<Semaphore>, u32)>,
    waiting: AtomicUsize,
    retries: AtomicUsize,
    /// Requests in flight per endpoint, for least-request picks.
    in_flight: ArcSwap<HashMap<SocketAddr, Arc<AtomicUsize>>>,
}

/// Why a request was refused without being sent.
#[derive(Debug, thiserror::Error)]
#[error(
    "{waiting} requests already wait for one of the cluster's {active} connections (DestinationRule connectionPool)"
)]
pub struct Overflow {
    active: u32,
    waiting: usize,
}

/// A request's place in the pool: held until the request is done.
pub struct Admission {
    _permit: Option<OwnedSemaphorePermit>,
}

/// Counts down on drop, so a cancelled request leaves no count behind.
pub struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One place in a counted set (a retry in flight, a waiting request),
/// given back on drop.
pub struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ClusterPool {
    fn new(limits: Limits) -> Self {
        let active = [limits.max_connections, limits.max_requests]
            .into_iter()
            .flatten()
            .min()
            .map(|n| (Arc::new(Semaphore::new(n as usize)), n));
        Self {
            limits,
            active,
            waiting: AtomicUsize::new(0),
            retries: AtomicUsize::new(0),
            in_flight: Default::default(),
        }
    }

    /// Admits a request: at once if a connection is free, after a wait if
    /// few enough wait already, else [`Overflow`].
    pub async fn admit(&self) -> Result<Admission, Overflow> {
        let Some((active, connections)) = &self.active else {
            return Ok(Admission { _permit: None });
        };
        if let Ok(permit) = active.clone().try_acquire_owned() {
            return Ok(Admission {
                _permit: Some(permit),
            });
        }
        let max_pending = self
            .limits
            .max_pending_requests
            .map_or(DEFAULT_MAX_PENDING, |n| n as usize);
        let waiting = self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Slot(&self.waiting);
        if waiting >= max_pending {
            return Err(Overflow {
                active: *connections,
                waiting,
            });
        }
        // The semaphore is never closed.
        let permit = active.clone().acquire_owned().await.ok();
        Ok(Admission { _permit: permit })
    }

    /// A retry, if `maxRetries` leaves room for one.
    pub fn retry(&self) -> Option<Slot<'_>> {
        let now = self.retries.fetch_add(1, Ordering::Relaxed);
        let token = Slot(&self.retries);
        match self.limits.max_retries {
            Some(max) if now >= max as usize => None,
            _ => Some(token),
        }
    }

    /// Marks a request in flight to `addr` until the guard drops.
    pub fn start(&self, addr: SocketAddr) -> Counted {
        let counter = self.counter(addr);
        counter.fetch_add(1, Ordering::Relaxed);
        Counted(counter)
    }

    fn counter(&self, addr: SocketAddr) -> Arc<AtomicUsize> {
        if let Some(c) = self.in_flight.load().get(&addr) {
            return c.clone();
        }
        self.in_flight.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.entry(addr).or_default();
            m
        });
        self.in_flight
            .load()
            .get(&addr)
            .cloned()
            .unwrap_or_default()
    }

    fn load_of(&self, addr: SocketAddr) -> usize {
        self.in_flight
            .load()
            .get(&addr)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// One of `usable` (a priority's endpoints), by `policy`; `n` numbers
    /// this pick for round robin.
    pub fn choose(&self, policy: LbPolicy, usable: &[WeightedEndpoint], n: usize) -> SocketAddr {
        match policy {
            LbPolicy::RoundRobin => round_robin(usable, n),
            LbPolicy::Random => round_robin(usable, rand::random_range(0..usize::MAX)),
            LbPolicy::LeastRequest => {
                // Two random choices, the less loaded wins (ties: the first).
                let a = usable[rand::random_range(0..usable.len())].addr;
                let b = usable[rand::random_range(0..usable.len())].addr;
                if self.load_of(b) < self.load_of(a) {
                    b
                } else {
                    a
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn limits(connections: u32, pending: u32) -> Limits {
        Limits {
            max_connections: Some(connections),
            max_pending_requests: Some(pending),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn requests_past_connections_and_pending_overflow() {
        let pool = Arc::new(ClusterPool::new(limits(1, 1)));
        let first = pool.admit().await.unwrap();
        // The second waits for the first's connection...
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.admit().await.map(|_| ()) }
        });
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while pool.waiting.load(Ordering::Relaxed) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the second never waited"
            );
            tokio::task::yield_now().await;
        }
        // ...and the third finds the queue full.
        let e = pool.admit().await.err().unwrap();
        assert_eq!(
            e.to_string(),
            "1 requests already wait for one of the cluster's 1 connections (DestinationRule connectionPool)"
        );
        drop(first);
        waiter.await.unwrap().unwrap();
        assert_eq!(
            pool.waiting.load(Ordering::Relaxed),
            0,
            "no count left behind"
        );
    }

    #[test]
    fn retries_past_the_budget_are_not_made() {
        let pool = ClusterPool::new(Limits {
            max_retries: Some(1),
            ..Default::default()
        });
        let one = pool.retry();
        assert!(one.is_some());
        assert!(pool.retry().is_none());
        drop(one);
        assert!(pool.retry().is_some(), "the budget frees as retries end");
    }

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let pool = ClusterPool::new(Limits::default());
        let ep = |port| WeightedEndpoint {
            addr: SocketAddr::from(([198, 51, 100, 1], port)),
            weight: 1,
        };
        let endpoints = [ep(1), ep(2)];
        let _busy: Vec<Counted> = (0..5).map(|_| pool.start(ep(1).addr)).collect();
        // A pick between two distinct endpoints always takes the idle one;
        // a pick of the same one twice takes it. So ep(2) wins at least
        // every time the two choices differ.
        let idle = (0..200)
            .filter(|_| pool.choose(LbPolicy::LeastRequest, &endpoints, 0) == ep(2).addr)
            .count();
        assert!(idle >= 100, "the idle endpoint won {idle} of 200 picks");
    }
}
