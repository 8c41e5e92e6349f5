//! KV-aware admission for one pool, on the request path.
//!
//! The decisions (gate, queue order, shedding) are
//! `sluice_policies::admission::PoolAdmission`; this module gives them a
//! lock, a clock, the pool's scraped gauges and async waiters. A queued
//! request waits on a oneshot channel that a later release, scrape or timer
//! tick fills; if its client goes away first (or the request future is
//! dropped) the waiter's guard takes it out of the queue at once, and returns
//! the KV reservation if admission raced the disconnect. Every admitted
//! request holds an [`AdmissionSlot`] that returns its KV reservation when
//! dropped, on every path.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sluice_policies::admission::{
    AdmissionConfig, AdmissionRequest, KvTicket, Offer, PoolAdmission, PoolSnapshot, Released,
    Shed, Ticket,
};
use tokio::sync::oneshot;

use crate::pool::Pool;
use crate::usage::UsageMetrics;

/// How often a pool with a non-empty queue re-checks its gate (timeouts,
/// fresh scrapes, the prefill window passing) without waiting for a release.
/// Short: a TTFT budget is tens of milliseconds.
const TICK: Duration = Duration::from_millis(5);

enum Wake {
    Admitted(KvTicket),
    Shed(Shed),
}

struct Inner {
    adm: PoolAdmission,
    waiters: HashMap<Ticket, oneshot::Sender<Wake>>,
}

/// Admission state of one pool (kept across reloads while its settings stay).
pub struct PoolGate {
    name: String,
    cfg: AdmissionConfig,
    inner: Mutex<Inner>,
    pool: Mutex<Weak<Pool>>,
    epoch: Instant,
    metrics: UsageMetrics,
}

impl std::fmt::Debug for PoolGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolGate")
            .field("pool", &self.name)
            .finish_non_exhaustive()
    }
}

/// Why a request was not admitted.
#[derive(Debug)]
pub enum NotAdmitted {
    /// Shed: 429 or 503 with `Retry-After`.
    Shed(Shed),
    /// The client went away while waiting.
    ClientGone,
}

/// What the caller needs to know about an admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// Whether the request waited in the queue.
    pub queued: bool,
    /// How long it waited.
    pub waited: Duration,
}

impl PoolGate {
    /// A gate for pool `name`; starts its timer task (call inside the runtime).
    pub fn new(name: &str, cfg: AdmissionConfig, metrics: UsageMetrics) -> Arc<Self> {
        let gate = Arc::new(Self {
            name: name.to_string(),
            cfg,
            inner: Mutex::new(Inner {
                adm: PoolAdmission::new(cfg),
                waiters: HashMap::new(),
            }),
            pool: Mutex::new(Weak::new()),
            epoch: Instant::now(),
            metrics,
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&gate);
            rt.spawn(async move {
                let mut tick = tokio::time::interval(TICK);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(g) = weak.upgrade() else { return };
                    g.pump();
                }
            });
        }
        gate
    }

    /// The settings this gate was built with.
    pub fn config(&self) -> &AdmissionConfig {
        &self.cfg
    }

    /// Points the gate at the pool generation whose gauges it reads.
    pub fn set_pool(&self, pool: &Arc<Pool>) {
        let mut p = lock(&self.pool);
        if !std::ptr::eq(p.as_ptr(), Arc::as_ptr(pool)) {
            *p = Arc::downgrade(pool);
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The pool's fresh gauges, with scrape times on this gate's clock, and
    /// how many endpoints are routable (sizes `endpoint_kv_blocks`; 0 when unknown).
    fn snapshot(&self) -> (Option<PoolSnapshot>, u32) {
        let Some(pool) = lock(&self.pool).upgrade() else {
            return (None, 0);
        };
        let now = Instant::now();
        let now_ms = self.now_ms();
        let stale = pool.stale_after();
        let eps = pool.endpoints();
        // One pass: `is_routable` takes the endpoint's outlier lock.
        let mut routable = 0u32;
        let snapshot = PoolSnapshot::from_gauges(
            eps.iter()
                .filter(|e| e.is_routable(now))
                .inspect(|_| routable = routable.saturating_add(1))
                .filter_map(|e| {
                    let gauges = e.load(now, stale).engine?;
                    let age = u64::try_from(e.scrape_age(now)?.as_millis()).unwrap_or(u64::MAX);
                    Some((gauges, now_ms.saturating_sub(age)))
                }),
        );
        (snapshot, routable)
    }

    /// Polls the queue with fresh gauges (call with the lock held).
    fn poll(&self, inner: &mut Inner) -> Released {
        let (snapshot, endpoints) = self.snapshot();
        if endpoints > 0 {
            inner.adm.set_endpoints(endpoints);
        }
        inner.adm.poll(snapshot.as_ref(), self.now_ms())
    }

    /// Admits `req` now, or queues it until admitted, shed, or `client_gone`
    /// resolves (then it leaves the queue at once).
    pub async fn admit<F>(
        self: &Arc<Self>,
        req: &AdmissionRequest<'_>,
        client_gone: F,
    ) -> Result<(AdmissionSlot, Admitted), NotAdmitted>
    where
        F: Future<Output = ()>,
    {
        let (snapshot, endpoints) = self.snapshot();
        let start = Instant::now();
        let queued = {
            let mut inner = lock(&self.inner);
            if endpoints > 0 {
                inner.adm.set_endpoints(endpoints);
            }
            let (offer, released) = inner.adm.offer(req, snapshot.as_ref(), self.now_ms());
            let out = match offer {
                Offer::Admitted(kv) => {
                    self.count("admitted");
                    Ok(Err(kv))
                }
                Offer::Shed(shed) => {
                    self.count(shed_label(&shed));
                    Err(NotAdmitted::Shed(shed))
                }
                Offer::Queued { ticket, .. } => {
                    self.count("queued");
                    let (tx, rx) = oneshot::channel();
                    inner.waiters.insert(ticket, tx);
                    Ok(Ok((ticket, rx)))
                }
            };
            self.dispatch(&mut inner, released);
            self.gauges(&inner);
            out?
        };
        match queued {
            Err(kv) => Ok((
                self.slot(kv, req),
                Admitted {
                    queued: false,
                    waited: Duration::ZERO,
                },
            )),
            Ok((ticket, rx)) => self.wait(ticket, rx, req, start, client_gone).await,
        }
    }

    async fn wait<F>(
        self: &Arc<Self>,
        ticket: Ticket,
        rx: oneshot::Receiver<Wake>,
        req: &AdmissionRequest<'_>,
        start: Instant,
        client_gone: F,
    ) -> Result<(AdmissionSlot, Admitted), NotAdmitted>
    where
        F: Future<Output = ()>,
    {
        let mut waiting = Waiting {
            gate: Arc::clone(self),
            ticket,
            rx: Some(rx),
        };
        let wake = {
            let Some(rx) = waiting.rx.as_mut() else {
                return Err(NotAdmitted::ClientGone);
            };
            tokio::select! {
                w = rx => w.ok(),
                () = client_gone => None,
            }
        };
        match wake {
            Some(Wake::Admitted(kv)) => {
                waiting.rx = None;
                let waited = start.elapsed();
                self.metrics
                    .queue_wait
                    .with_label_values(&[&self.name])
                    .observe(waited.as_secs_f64());
                Ok((
                    self.slot(kv, req),
                    Admitted {
                        queued: true,
                        waited,
                    },
                ))
            }
            Some(Wake::Shed(shed)) => {
                waiting.rx = None;
                Err(NotAdmitted::Shed(shed))
            }
            // Client gone (or the sender vanished): `waiting` drops and cleans up.
            None => Err(NotAdmitted::ClientGone),
        }
    }

    fn slot(self: &Arc<Self>, kv: KvTicket, req: &AdmissionRequest<'_>) -> AdmissionSlot {
        AdmissionSlot {
            gate: Arc::clone(self),
            kv: Some(kv),
            tenant: req.tenant.to_string(),
            weight: req.weight,
            max_tokens: req.max_tokens,
            output_tokens: None,
        }
    }

    /// Re-checks the queue (timer, scrapes): admits what now fits, sheds what timed out.
    pub fn pump(&self) {
        let mut inner = lock(&self.inner);
        if inner.adm.queue_len() == 0 {
            self.gauges(&inner);
            return;
        }
        let released = self.poll(&mut inner);
        self.dispatch(&mut inner, released);
        self.gauges(&inner);
    }

    /// Wakes the waiters a call decided; a waiter that is gone gives its
    /// admission straight back (and that may admit the next one).
    fn dispatch(&self, inner: &mut Inner, mut released: Released) {
        loop {
            let mut returned = false;
            for (t, kv) in released.admitted.drain(..) {
                self.count("dequeued");
                match inner.waiters.remove(&t) {
                    Some(tx) => {
                        if let Err(Wake::Admitted(kv)) = tx.send(Wake::Admitted(kv)) {
                            inner.adm.release(kv);
                            returned = true;
                        }
                    }
                    None => {
                        inner.adm.release(kv);
                        returned = true;
                    }
                }
            }
            for (t, shed) in released.shed.drain(..) {
                self.count(shed_label(&shed));
                if let Some(tx) = inner.waiters.remove(&t) {
                    let _ = tx.send(Wake::Shed(shed));
                }
            }
            if !returned || inner.adm.queue_len() == 0 {
                return;
            }
            released = self.poll(inner);
        }
    }

    fn gauges(&self, inner: &Inner) {
        self.metrics
            .queue_len
            .with_label_values(&[&self.name])
            .set(i64::try_from(inner.adm.queue_len()).unwrap_or(i64::MAX));
        self.metrics
            .kv_blocks
            .with_label_values(&[&self.name])
            .set(i64::try_from(inner.adm.in_flight_blocks()).unwrap_or(i64::MAX));
    }

    fn count(&self, outcome: &str) {
        self.metrics
            .decisions
            .with_label_values(&[&self.name, outcome])
            .inc();
    }

    /// Requests waiting now.
    pub fn queue_len(&self) -> usize {
        lock(&self.inner).adm.queue_len()
    }

    /// KV blocks admitted and not released.
    pub fn in_flight_blocks(&self) -> u64 {
        lock(&self.inner).adm.in_flight_blocks()
    }
}

fn shed_label(s: &Shed) -> &'static str {
    match (s.reason, s.status.http_status()) {
        (sluice_policies::admission::ShedReason::QueueTimeout, _) => "timeout",
        (sluice_policies::admission::ShedReason::TtftSlo, _) => "ttft_slo",
        (_, 429) => "shed_429",
        _ => "shed_503",
    }
}

/// A queued request's claim; dropping it (client gone, future dropped)
/// takes the request out of the queue.
struct Waiting {
    gate: Arc<PoolGate>,
    ticket: Ticket,
    rx: Option<oneshot::Receiver<Wake>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        let mut inner = lock(&self.gate.inner);
        inner.waiters.remove(&self.ticket);
        if inner.adm.cancel(self.ticket) {
            self.gate.count("cancelled");
        } else if let Ok(Wake::Admitted(kv)) = rx.try_recv() {
            // Admitted in the same instant the client left: give it back.
            inner.adm.release(kv);
            let released = self.gate.poll(&mut inner);
            self.gate.dispatch(&mut inner, released);
        }
        self.gate.gauges(&inner);
    }
}

/// An admitted request's KV reservation, released when dropped.
pub struct AdmissionSlot {
    gate: Arc<PoolGate>,
    kv: Option<KvTicket>,
    tenant: String,
    weight: f64,
    max_tokens: u32,
    output_tokens: Option<u32>,
}

impl std::fmt::Debug for AdmissionSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmissionSlot")
            .field("pool", &self.gate.name)
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

impl AdmissionSlot {
    /// Records the real output length so `fair` charges what was used.
    pub fn record_output(&mut self, tokens: u32) {
        self.output_tokens = Some(tokens);
    }
}

impl Drop for AdmissionSlot {
    fn drop(&mut self) {
        let Some(kv) = self.kv.take() else { return };
        let mut inner = lock(&self.gate.inner);
        inner.adm.release(kv);
        if let Some(out) = self.output_tokens {
            inner
                .adm
                .settle_fair(&self.tenant, self.max_tokens, out, self.weight);
        }
        if inner.adm.queue_len() > 0 {
            let released = self.gate.poll(&mut inner);
            self.gate.dispatch(&mut inner, released);
        }
        self.gate.gauges(&inner);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Registry;
    use sluice_policies::admission::{Priority, QueueOrder};

    fn gate(max_queue_wait_ms: u64) -> Arc<PoolGate> {
        // No pool → no gauges: the gate admits against its own reservations
        // and the capacity it last saw (none), so fill it with own admissions.
        let cfg = AdmissionConfig {
            order: QueueOrder::Fifo,
            max_queue_wait_ms,
            ..AdmissionConfig::default()
        };
        PoolGate::new("p", cfg, UsageMetrics::new(&Registry::new()))
    }

    fn req(tenant: &str) -> AdmissionRequest<'_> {
        AdmissionRequest {
            tenant,
            priority: Priority::Standard,
            weight: 1.0,
            prompt_tokens: 100,
            cached_tokens: 0,
            max_tokens: 10,
            ttft_slo_ms: None,
        }
    }

    #[tokio::test]
    async fn idle_pool_admits_and_releases() {
        let g = gate(1000);
        let (slot, a) = g.admit(&req("a"), std::future::pending()).await.unwrap();
        assert!(!a.queued);
        assert!(g.in_flight_blocks() > 0);
        drop(slot);
        assert_eq!(g.in_flight_blocks(), 0);
        assert_eq!(g.queue_len(), 0);
    }

    #[tokio::test]
    async fn a_gone_client_leaves_no_trace() {
        let g = gate(1000);
        // Disconnected before the call: if it were queued it leaves at once;
        // admitted at once it holds a slot that drops with the result.
        let r = g.admit(&req("a"), async {}).await;
        drop(r);
        assert_eq!((g.queue_len(), g.in_flight_blocks()), (0, 0));
    }
}
