//! Balanced upstreams: the instances of one service, found by discovery,
//! called through one cloneable [`Balanced`] service that tonic clients
//! wrap like a `Channel`.
//!
//! - **Discovery** ([`Source`], from the upstream address): a static list
//!   (`http://a:50052,http://b:50052`, the default), DNS re-resolved every
//!   `dns_refresh_ms` (`dns://recmesh-retrieval.ns.svc:50052`, a Kubernetes
//!   headless service), or Consul's passing instances, watched with blocking
//!   queries (`consul://recmesh-retrieval`).
//! - **Balancing**: power of two choices over in-flight calls, the load
//!   measure of tower's `p2c` with `PendingRequests`: two instances drawn at
//!   random, the one with fewer calls outstanding wins. It is written here,
//!   not taken from `tower::balance`, because ejection needs to know which
//!   instance each call went to and how it ended, which tower's balancer
//!   does not expose.
//! - **Ejection**: an instance whose last `eject_after` calls all failed in
//!   transport (refused, reset, `UNAVAILABLE`, shed with
//!   `RESOURCE_EXHAUSTED`, or abandoned unanswered at the deadline) is left
//!   out for `eject_ms`, doubling on each consecutive ejection up to
//!   `eject_max_ms`. When every instance is ejected all are used again
//!   (as Envoy's panic threshold does): a guess beats a certain failure.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tonic::body::Body;
use tonic::transport::Channel;
use tower::ServiceExt;

use crate::{AddressError, lazy_channel};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// How upstream instances are discovered and balanced (`[balance]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalanceConfig {
    /// Consecutive transport failures that eject an instance.
    pub eject_after: u32,
    /// First ejection, ms; doubles on each consecutive one.
    pub eject_ms: u64,
    /// Longest ejection, ms.
    pub eject_max_ms: u64,
    /// How often `dns://` upstreams are re-resolved, ms.
    pub dns_refresh_ms: u64,
    /// Consul agent that `consul://` upstreams are watched through.
    pub consul_agent: String,
    /// ACL token for the agent; empty: none.
    pub consul_token: String,
    /// Longest wait of one blocking query, seconds.
    pub consul_wait_s: u64,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            eject_after: 5,
            eject_ms: 2_000,
            eject_max_ms: 30_000,
            dns_refresh_ms: 5_000,
            consul_agent: "http://127.0.0.1:8500".into(),
            consul_token: String::new(),
            consul_wait_s: 30,
        }
    }
}

impl BalanceConfig {
    /// Checks the settings; `prefix` is the config section (`balance`).
    pub fn validate(&self, prefix: &str) -> Result<(), recmesh_server::ConfigError> {
        use recmesh_server::ConfigError;
        let at_least_1 = [
            ("eject_after", u64::from(self.eject_after)),
            ("eject_ms", self.eject_ms),
            ("dns_refresh_ms", self.dns_refresh_ms),
        ];
        for (key, value) in at_least_1 {
            if value == 0 {
                return Err(ConfigError::invalid(
                    format!("{prefix}.{key}"),
                    "must be at least 1",
                ));
            }
        }
        if self.eject_max_ms < self.eject_ms {
            return Err(ConfigError::invalid(
                format!("{prefix}.eject_max_ms"),
                format!("must be at least eject_ms ({})", self.eject_ms),
            ));
        }
        if !(1..=600).contains(&self.consul_wait_s) {
            return Err(ConfigError::invalid(
                format!("{prefix}.consul_wait_s"),
                "must be in 1..=600",
            ));
        }
        recmesh_server::consul::Consul::new(&self.consul_agent, &self.consul_token)
            .map_err(|e| ConfigError::invalid(format!("{prefix}.consul_agent"), e.to_string()))?;
        Ok(())
    }
}

/// Where the instances of an upstream come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A fixed list of `http://host:port`.
    Static(Vec<String>),
    /// Every address `host` resolves to, at `port`, re-resolved.
    Dns {
        /// Name to resolve.
        host: String,
        /// Port of every instance.
        port: u16,
    },
    /// The passing instances of a Consul service.
    Consul {
        /// Service name.
        service: String,
    },
}

impl Source {
    /// Parses an upstream address: `http://host:port[,http://host:port…]`,
    /// `dns://host:port` or `consul://service`. `key` names the config key
    /// in errors.
    pub fn parse(key: &str, addr: &str) -> Result<Source, AddressError> {
        let err = |reason: &str| AddressError {
            key: key.to_owned(),
            addr: addr.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(rest) = addr.strip_prefix("dns://") {
            let (host, port) = rest
                .trim_end_matches('/')
                .rsplit_once(':')
                .ok_or_else(|| err("needs a port: dns://host:port"))?;
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| err("port must be 1..=65535"))?;
            if host.is_empty() {
                return Err(err("needs a host: dns://host:port"));
            }
            return Ok(Source::Dns {
                host: host.to_owned(),
                port,
            });
        }
        if let Some(service) = addr.strip_prefix("consul://") {
            let service = service.trim_end_matches('/');
            if service.is_empty() || service.contains(['/', ' ', '?']) {
                return Err(err("needs a service name: consul://recmesh-retrieval"));
            }
            return Ok(Source::Consul {
                service: service.to_owned(),
            });
        }
        let list: Vec<String> = addr.split(',').map(|a| a.trim().to_owned()).collect();
        for a in &list {
            crate::check_address(key, a)?;
        }
        Ok(Source::Static(list))
    }
}

/// One instance of an upstream.
#[derive(Debug)]
struct Instance {
    addr: String,
    channel: Channel,
    in_flight: AtomicUsize,
    failures: AtomicU32,
    ejections: AtomicU32,
    /// Ms since the pool's epoch until which the instance is ejected.
    ejected_until: AtomicU64,
}

#[derive(Debug)]
struct Pool {
    key: String,
    config: BalanceConfig,
    epoch: Instant,
    instances: RwLock<Arc<Vec<Arc<Instance>>>>,
    draws: AtomicU64,
}

/// The instances of one upstream behind one tower service (see the module docs).
#[derive(Debug, Clone)]
pub struct Balanced {
    pool: Arc<Pool>,
}

impl Balanced {
    /// Balances over the instances `addr` names ([`Source::parse`]); a
    /// dynamic source is watched in a task on the current Tokio runtime
    /// until the last clone is dropped.
    pub fn new(key: &str, addr: &str, config: &BalanceConfig) -> Result<Self, AddressError> {
        let source = Source::parse(key, addr)?;
        let balanced = Balanced {
            pool: Arc::new(Pool {
                key: key.to_owned(),
                config: config.clone(),
                epoch: Instant::now(),
                instances: RwLock::new(Arc::new(Vec::new())),
                draws: AtomicU64::new(recmesh_server::layers::seed()),
            }),
        };
        match source {
            Source::Static(list) => balanced.set(list)?,
            Source::Dns { host, port } => {
                tokio::spawn(watch_dns(Arc::downgrade(&balanced.pool), host, port));
            }
            Source::Consul { service } => {
                let consul =
                    recmesh_server::consul::Consul::new(&config.consul_agent, &config.consul_token)
                        .map_err(|e| AddressError {
                            key: "balance.consul_agent".into(),
                            addr: config.consul_agent.clone(),
                            reason: e.to_string(),
                        })?;
                tokio::spawn(watch_consul(
                    Arc::downgrade(&balanced.pool),
                    consul,
                    service,
                ));
            }
        }
        Ok(balanced)
    }

    /// Replaces the instance set with `addrs` (`http://host:port`), keeping
    /// the state (connection, load, ejection) of instances that stay.
    pub fn set(&self, addrs: Vec<String>) -> Result<(), AddressError> {
        self.pool.set(addrs)
    }

    /// Addresses of the current instances.
    pub fn addrs(&self) -> Vec<String> {
        self.pool
            .snapshot()
            .iter()
            .map(|i| i.addr.clone())
            .collect()
    }

    /// Addresses of the instances currently ejected.
    pub fn ejected(&self) -> Vec<String> {
        let now = self.pool.now_ms();
        self.pool
            .snapshot()
            .iter()
            .filter(|i| i.ejected_until.load(Ordering::Relaxed) > now)
            .map(|i| i.addr.clone())
            .collect()
    }
}

impl Pool {
    fn snapshot(&self) -> Arc<Vec<Arc<Instance>>> {
        self.instances
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn set(&self, mut addrs: Vec<String>) -> Result<(), AddressError> {
        addrs.sort();
        addrs.dedup();
        let old = self.snapshot();
        let mut next = Vec::with_capacity(addrs.len());
        for addr in addrs {
            if let Some(kept) = old.iter().find(|i| i.addr == addr) {
                next.push(kept.clone());
                continue;
            }
            next.push(Arc::new(Instance {
                channel: lazy_channel(&self.key, &addr)?,
                addr,
                in_flight: AtomicUsize::new(0),
                failures: AtomicU32::new(0),
                ejections: AtomicU32::new(0),
                ejected_until: AtomicU64::new(0),
            }));
        }
        let changed =
            next.len() != old.len() || next.iter().zip(old.iter()).any(|(a, b)| a.addr != b.addr);
        if changed {
            tracing::info!(upstream = %self.key, instances = ?next.iter().map(|i| i.addr.as_str()).collect::<Vec<_>>(),
                "upstream instances changed");
        }
        metrics::gauge!("recmesh_upstream_instances", "upstream" => self.key.clone())
            .set(next.len() as f64);
        *self.instances.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        Ok(())
    }

    fn draw(&self, n: usize) -> usize {
        let x = recmesh_server::layers::splitmix64(self.draws.fetch_add(1, Ordering::Relaxed));
        (x % n as u64) as usize
    }

    /// Power of two choices among the instances not ejected (all of them
    /// when every one is).
    fn pick(&self) -> Option<Arc<Instance>> {
        let all = self.snapshot();
        let now = self.now_ms();
        let healthy = all
            .iter()
            .filter(|i| i.ejected_until.load(Ordering::Relaxed) <= now)
            .count();
        let eligible =
            |i: &&Arc<Instance>| healthy == 0 || i.ejected_until.load(Ordering::Relaxed) <= now;
        let n = if healthy == 0 { all.len() } else { healthy };
        match n {
            0 => None,
            1 => all.iter().find(eligible).cloned(),
            _ => {
                let a = self.draw(n);
                let b = (a + 1 + self.draw(n - 1)) % n;
                let (mut x, mut y) = (None, None);
                for (n, i) in all.iter().filter(eligible).enumerate() {
                    if n == a {
                        x = Some(i);
                    } else if n == b {
                        y = Some(i);
                    }
                }
                let (x, y) = (x?, y?);
                // Ties go to the first draw, so idle instances share evenly.
                let load = |i: &Instance| i.in_flight.load(Ordering::Relaxed);
                Some(if load(y) < load(x) { y } else { x }.clone())
            }
        }
    }

    fn record(&self, instance: &Instance, failed: bool) {
        if !failed {
            instance.failures.store(0, Ordering::Relaxed);
            instance.ejections.store(0, Ordering::Relaxed);
            return;
        }
        let now = self.now_ms();
        if instance.ejected_until.load(Ordering::Relaxed) > now {
            // Calls that fail while the instance is out belong to the
            // incident that ejected it (calls in flight then, or every
            // instance out and this one still used): counting them would
            // eject it again, and log it, every few calls of an overload.
            return;
        }
        let failures = instance.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < self.config.eject_after {
            return;
        }
        instance.failures.store(0, Ordering::Relaxed);
        let n = instance.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let ms = self
            .config
            .eject_ms
            .saturating_mul(1 << n)
            .min(self.config.eject_max_ms);
        instance.ejected_until.store(now + ms, Ordering::Relaxed);
        metrics::counter!("recmesh_upstream_ejections_total", "upstream" => self.key.clone())
            .increment(1);
        let others = self
            .snapshot()
            .iter()
            .filter(|i| i.ejected_until.load(Ordering::Relaxed) <= now)
            .count();
        if others > 0 {
            tracing::warn!(upstream = %self.key, instance = %instance.addr, failures, eject_ms = ms,
                others, "instance ejected after consecutive failures; traffic goes to the others meanwhile");
        } else {
            tracing::warn!(upstream = %self.key, instance = %instance.addr, failures, eject_ms = ms,
                "instance ejected after consecutive failures, but no other instance is in; \
                 it keeps taking traffic (check the upstream's health and load)");
        }
    }
}

/// Whether an answer's headers say the instance could not serve: a
/// trailers-only `UNAVAILABLE` or `RESOURCE_EXHAUSTED`.
fn refused(response: &http::Response<Body>) -> bool {
    matches!(
        response.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(b"14" | b"8")
    )
}

/// Counts a call against its instance: in flight while alive; a failure
/// when dropped before it is marked answered.
struct CallGuard {
    pool: Arc<Pool>,
    instance: Arc<Instance>,
    answered: Option<bool>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.instance.in_flight.fetch_sub(1, Ordering::Relaxed);
        let failed = !self.answered.unwrap_or(false);
        self.pool.record(&self.instance, failed);
    }
}

impl tower::Service<http::Request<Body>> for Balanced {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is per instance, awaited in `call` once one is picked.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let Some(instance) = self.pool.pick() else {
            let status = tonic::Status::unavailable(format!(
                "no instance of {} is known yet (discovery has found none)",
                self.pool.key
            ));
            return Box::pin(std::future::ready(Err(Box::new(status) as BoxError)));
        };
        instance.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut guard = CallGuard {
            pool: self.pool.clone(),
            instance,
            answered: None,
        };
        let channel = guard.instance.channel.clone();
        // A unary message goes out with END_STREAM on its own DATA frame.
        let request = request.map(crate::body::at_once);
        Box::pin(async move {
            let result = channel.oneshot(request).await;
            guard.answered = Some(matches!(&result, Ok(r) if !refused(r)));
            drop(guard);
            result.map_err(Into::into)
        })
    }
}

async fn watch_dns(pool: Weak<Pool>, host: String, port: u16) {
    loop {
        let Some(p) = pool.upgrade() else { return };
        match tokio::net::lookup_host((host.as_str(), port)).await {
            Ok(addrs) => {
                let list = addrs.map(|a| format!("http://{a}")).collect::<Vec<_>>();
                if list.is_empty() {
                    tracing::warn!(upstream = %p.key, %host, "dns: no address; keeping the last set");
                } else if let Err(e) = p.set(list) {
                    tracing::warn!(upstream = %p.key, error = %e, "dns: unusable address");
                }
            }
            Err(e) => {
                metrics::counter!("recmesh_upstream_discovery_errors_total", "upstream" => p.key.clone())
                    .increment(1);
                tracing::warn!(upstream = %p.key, %host, error = %e, "dns: resolution failed; keeping the last set");
            }
        }
        let every = Duration::from_millis(p.config.dns_refresh_ms);
        drop(p);
        tokio::time::sleep(every).await;
    }
}

async fn watch_consul(pool: Weak<Pool>, consul: recmesh_server::consul::Consul, service: String) {
    let mut index = 0;
    loop {
        let Some(p) = pool.upgrade() else { return };
        let wait = Duration::from_secs(p.config.consul_wait_s);
        let key = p.key.clone();
        drop(p);
        let answer = consul.passing(&service, index, wait).await;
        let Some(p) = pool.upgrade() else { return };
        match answer {
            Ok(found) => {
                // Per Consul's blocking-query rules, an index that goes
                // backwards resets the watch.
                index = if found.index < index { 0 } else { found.index };
                let list = found.addrs.iter().map(|a| format!("http://{a}")).collect();
                if let Err(e) = p.set(list) {
                    tracing::warn!(upstream = %key, error = %e, "consul: unusable instance address");
                }
            }
            Err(e) => {
                metrics::counter!("recmesh_upstream_discovery_errors_total", "upstream" => key.clone())
                    .increment(1);
                tracing::warn!(upstream = %key, %service, error = %e,
                    "consul: query failed; keeping the last set, retrying in 1 s");
                drop(p);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_addresses_name_their_source() {
        assert_eq!(
            Source::parse("k", "http://a:1, http://b:2").expect("static"),
            Source::Static(vec!["http://a:1".into(), "http://b:2".into()])
        );
        assert_eq!(
            Source::parse("k", "dns://retrieval.ns.svc:50052").expect("dns"),
            Source::Dns {
                host: "retrieval.ns.svc".into(),
                port: 50052
            }
        );
        assert_eq!(
            Source::parse("k", "consul://recmesh-retrieval").expect("consul"),
            Source::Consul {
                service: "recmesh-retrieval".into()
            }
        );
        for bad in [
            "dns://host",
            "dns://:5",
            "dns://h:0",
            "consul://",
            "a:1",
            "http://a:1,b:2",
        ] {
            let e = Source::parse("upstreams.retrieval", bad).expect_err(bad);
            assert!(e.to_string().contains("upstreams.retrieval"), "{e}");
        }
    }

    fn pool(n: usize, config: BalanceConfig) -> Balanced {
        let b = Balanced {
            pool: Arc::new(Pool {
                key: "test".into(),
                config,
                epoch: Instant::now(),
                instances: RwLock::new(Arc::new(Vec::new())),
                draws: AtomicU64::new(1),
            }),
        };
        b.set(
            (0..n)
                .map(|i| format!("http://127.0.0.1:{}", 1000 + i))
                .collect(),
        )
        .expect("addresses");
        b
    }

    #[tokio::test]
    async fn two_choices_prefer_the_less_loaded_instance() {
        let b = pool(2, BalanceConfig::default());
        let all = b.pool.snapshot();
        all[0].in_flight.store(10, Ordering::Relaxed);
        for _ in 0..50 {
            let picked = b.pool.pick().expect("an instance");
            assert_eq!(
                picked.addr, all[1].addr,
                "two of two drawn: the idle one wins"
            );
        }
        // Over many draws from four idle instances, every one is picked.
        let b = pool(4, BalanceConfig::default());
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.insert(b.pool.pick().expect("an instance").addr.clone());
        }
        assert_eq!(seen.len(), 4);
    }

    #[tokio::test]
    async fn consecutive_failures_eject_and_a_success_resets() {
        let config = BalanceConfig {
            eject_after: 3,
            eject_ms: 60_000,
            eject_max_ms: 60_000,
            ..BalanceConfig::default()
        };
        let b = pool(2, config);
        let all = b.pool.snapshot();
        let (bad, good) = (&all[0], &all[1]);
        b.pool.record(bad, true);
        b.pool.record(bad, true);
        b.pool.record(bad, false); // a success in between resets the count
        b.pool.record(bad, true);
        b.pool.record(bad, true);
        assert!(b.ejected().is_empty());
        b.pool.record(bad, true);
        assert_eq!(b.ejected(), vec![bad.addr.clone()]);
        for _ in 0..50 {
            assert_eq!(b.pool.pick().expect("one left").addr, good.addr);
        }
        // Failures while ejected neither extend the ejection nor count
        // towards the next one.
        let until = bad.ejected_until.load(Ordering::Relaxed);
        for _ in 0..10 {
            b.pool.record(bad, true);
        }
        assert_eq!(bad.ejected_until.load(Ordering::Relaxed), until);
        assert_eq!(bad.ejections.load(Ordering::Relaxed), 1);
        assert_eq!(bad.failures.load(Ordering::Relaxed), 0);
        // Every instance ejected: all are used again rather than none.
        for _ in 0..3 {
            b.pool.record(good, true);
        }
        assert_eq!(b.ejected().len(), 2);
        assert!(b.pool.pick().is_some());
    }

    #[tokio::test]
    async fn a_new_instance_set_keeps_the_state_of_those_that_stay() {
        let b = pool(2, BalanceConfig::default());
        let kept = b.pool.snapshot()[1].clone();
        kept.in_flight.store(3, Ordering::Relaxed);
        b.set(vec![kept.addr.clone(), "http://127.0.0.1:2000".into()])
            .expect("set");
        let now = b.pool.snapshot();
        assert_eq!(now.len(), 2);
        let same = now.iter().find(|i| i.addr == kept.addr).expect("kept");
        assert!(Arc::ptr_eq(same, &kept));
        assert!(b.set(vec!["nonsense".into()]).is_err());
        b.set(Vec::new()).expect("empty");
        assert!(b.pool.pick().is_none());
    }

    #[test]
    fn config_is_checked_naming_the_key() {
        assert!(BalanceConfig::default().validate("balance").is_ok());
        let bad = BalanceConfig {
            eject_max_ms: 1,
            ..BalanceConfig::default()
        };
        let e = bad.validate("balance").expect_err("max below base");
        assert!(e.to_string().contains("balance.eject_max_ms"), "{e}");
        let bad = BalanceConfig {
            consul_agent: "consul:8500".into(),
            ..BalanceConfig::default()
        };
        let e = bad.validate("balance").expect_err("no scheme");
        assert!(e.to_string().contains("balance.consul_agent"), "{e}");
    }
}
