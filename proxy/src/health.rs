//! Passive health: endpoints that keep failing are ejected for a while, and
//! picking skips them, falling through to the next priority. Tracked per
//! cluster and endpoint, as Envoy does (one gateway address serves many
//! services).
//!
//! Reads on the request path are lock-free (`ArcSwap` of the ejected set);
//! the failure counters take a lock, but only while some endpoint has
//! failures on record.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use isthmus_xds::{EndpointSet, OutlierPolicy, WeightedEndpoint};

type Key = (String, SocketAddr);

#[derive(Default)]
pub struct Outliers {
    ejected: ArcSwap<HashMap<Key, Instant>>,
    failures: Mutex<HashMap<Key, u32>>,
    any_failures: AtomicBool,
}

impl Outliers {
    /// An endpoint of the best priority that has one neither ejected nor
    /// already tried for this request, chosen among those by `choose` (the
    /// cluster's load balancing); if there is none, any untried one.
    pub fn pick(
        &self,
        cluster: &str,
        set: &EndpointSet,
        tried: &[SocketAddr],
        choose: impl Fn(&[WeightedEndpoint]) -> SocketAddr,
    ) -> Option<SocketAddr> {
        let now = Instant::now();
        let ejected = self.ejected.load();
        let usable = |e: &&WeightedEndpoint| {
            !tried.contains(&e.addr)
                && ejected
                    .get(&(cluster.to_string(), e.addr))
                    .is_none_or(|until| *until <= now)
        };
        for level in &set.priorities {
            let ok: Vec<WeightedEndpoint> = level.iter().filter(usable).copied().collect();
            if !ok.is_empty() {
                return Some(choose(&ok));
            }
        }
        set.priorities
            .iter()
            .flatten()
            .find(|e| !tried.contains(&e.addr))
            .map(|e| e.addr)
    }

    pub fn failure(
        &self,
        cluster: &str,
        addr: SocketAddr,
        policy: Option<&OutlierPolicy>,
        set: &EndpointSet,
    ) {
        let Some(policy) = policy else { return };
        let key = (cluster.to_string(), addr);
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let count = failures.entry(key.clone()).or_insert(0);
        *count += 1;
        self.any_failures.store(true, Ordering::Relaxed);
        if *count < policy.consecutive_errors {
            return;
        }
        failures.remove(&key);
        let now = Instant::now();
        let total = set.priorities.iter().map(Vec::len).sum::<usize>().max(1);
        let ejected_now = self
            .ejected
            .load()
            .iter()
            .filter(|((c, _), until)| c == cluster && **until > now)
            .count();
        if (ejected_now + 1) * 100 > total * policy.max_ejection_percent as usize {
            return; // would eject more of the cluster than allowed
        }
        let until = now + policy.ejection;
        self.ejected.rcu(|m| {
            let mut m: HashMap<Key, Instant> = m
                .iter()
                .filter(|(_, u)| **u > now)
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            m.insert(key.clone(), until);
            m
        });
        tracing::warn!(cluster, endpoint = %addr, ejection = ?policy.ejection, "ejected a failing endpoint");
    }

    pub fn success(&self, cluster: &str, addr: SocketAddr) {
        if !self.any_failures.load(Ordering::Relaxed) {
            return;
        }
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.remove(&(cluster.to_string(), addr));
        if failures.is_empty() {
            self.any_failures.store(false, Ordering::Relaxed);
        }
    }
}

/// Weighted round robin over one priority's endpoints: the `n`th pick.
pub fn round_robin(endpoints: &[WeightedEndpoint], n: usize) -> SocketAddr {
    let total: usize = endpoints
        .iter()
        .map(|e| e.weight as usize)
        .sum::<usize>()
        .max(1);
    let mut slot = n % total;
    for e in endpoints {
        if slot < e.weight as usize {
            return e.addr;
        }
        slot -= e.weight as usize;
    }
    endpoints[0].addr
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ep(port: u16) -> WeightedEndpoint {
        WeightedEndpoint {
            addr: SocketAddr::from(([198, 51, 100, 1], port)),
            weight: 1,
        }
    }

    fn rr(ok: &[WeightedEndpoint]) -> SocketAddr {
        round_robin(ok, 0)
    }

    #[test]
    fn failing_endpoints_are_ejected_and_traffic_moves_to_the_next_priority() {
        let set = EndpointSet {
            priorities: vec![vec![ep(1)], vec![ep(2)]],
        };
        let policy = OutlierPolicy {
            consecutive_errors: 3,
            ejection: Duration::from_secs(60),
            max_ejection_percent: 100,
        };
        let o = Outliers::default();
        assert_eq!(o.pick("c", &set, &[], rr), Some(ep(1).addr));
        o.failure("c", ep(1).addr, Some(&policy), &set);
        o.failure("c", ep(1).addr, Some(&policy), &set);
        assert_eq!(
            o.pick("c", &set, &[], rr),
            Some(ep(1).addr),
            "two failures do not eject"
        );
        o.failure("c", ep(1).addr, Some(&policy), &set);
        assert_eq!(o.pick("c", &set, &[], rr), Some(ep(2).addr), "three do");
        assert_eq!(
            o.pick("other", &set, &[], rr),
            Some(ep(1).addr),
            "per cluster"
        );
        // A request that already tried ep(2) still finds something.
        assert_eq!(o.pick("c", &set, &[ep(2).addr], rr), Some(ep(1).addr));
        // Success resets the count.
        o.failure("c", ep(2).addr, Some(&policy), &set);
        o.success("c", ep(2).addr);
        o.failure("c", ep(2).addr, Some(&policy), &set);
        o.failure("c", ep(2).addr, Some(&policy), &set);
        assert_eq!(o.pick("c", &set, &[], rr), Some(ep(2).addr));
    }
}
