//! KV-aware admission control for one pool: admit now, wait in the pool's
//! queue, or shed with 429/503 and `Retry-After`.
//!
//! vLLM accepts everything and lets its waiting queue grow without bound; an
//! overfull engine preempts running requests and latency collapses for all.
//! A [`PoolAdmission`] sits in front: it estimates a request's KV demand
//! ([`demand_blocks`]), admits it while the pool's projected KV usage and
//! engine queues stay under the configured thresholds ([`KvGate`]), and
//! otherwise parks it in a bounded [`AdmissionQueue`] that releases requests
//! in the configured order as capacity frees up.
//!
//! The proxy drives it with four calls, all under one lock per pool:
//! [`PoolAdmission::offer`] on arrival, [`PoolAdmission::poll`] whenever
//! capacity may have changed (a request ended, a scrape landed, and on a
//! short timer so queue timeouts fire), [`PoolAdmission::cancel`] when a
//! queued client disconnects, and [`PoolAdmission::release`] exactly once per
//! admitted request when it ends.

mod config;
pub mod fair;
mod kv;
mod queue;

pub use config::{AdmissionConfig, Priority, QueueOrder};
pub use kv::{KvGate, KvTicket, PoolSnapshot, Saturation, demand_blocks};
pub use queue::{AdmissionQueue, QueuedRequest, Shed, ShedReason, ShedStatus, Ticket};

/// A request asking to be admitted.
#[derive(Debug, Clone, Copy)]
pub struct AdmissionRequest<'a> {
    /// Tenant name.
    pub tenant: &'a str,
    /// The tenant's priority band.
    pub priority: Priority,
    /// The tenant's fairness weight (> 0).
    pub weight: f64,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Prompt tokens expected to be served from prefix cache (0 when unknown).
    pub cached_tokens: u32,
    /// `max_tokens` after quota clamping.
    pub max_tokens: u32,
    /// The class's TTFT target, for `deadline` order (the pool default when `None`).
    pub ttft_slo_ms: Option<u64>,
}

/// The answer to [`PoolAdmission::offer`].
#[derive(Debug, PartialEq)]
pub enum Offer {
    /// Go ahead; release the ticket when the request ends.
    Admitted(KvTicket),
    /// Wait for this ticket to come out of [`PoolAdmission::poll`] (or be shed).
    Queued {
        /// The queue ticket.
        ticket: Ticket,
        /// What was saturated (`None`: queued behind earlier requests).
        saturated: Option<Saturation>,
    },
    /// Refused now.
    Shed(Shed),
}

/// Queued requests whose fate was decided by a call: wake their waiters.
#[derive(Debug, Default, PartialEq)]
pub struct Released {
    /// Admitted: the waiter proceeds and later releases the ticket.
    pub admitted: Vec<(Ticket, KvTicket)>,
    /// Shed (timeout, or displaced by higher priority): answer 429/503.
    pub shed: Vec<(Ticket, Shed)>,
}

/// Admission control for one pool.
#[derive(Debug, Clone)]
pub struct PoolAdmission {
    cfg: AdmissionConfig,
    gate: KvGate,
    queue: AdmissionQueue,
}

impl PoolAdmission {
    /// Admission for a pool with `cfg` (validated by [`AdmissionConfig::validate`]).
    pub fn new(cfg: AdmissionConfig) -> Self {
        PoolAdmission {
            gate: {
                let gate = KvGate::new(
                    cfg.max_kv_usage,
                    cfg.max_engine_waiting,
                    cfg.endpoint_kv_blocks,
                );
                match cfg.max_prefilling {
                    Some(n) => gate.with_prefill_limit(n, cfg.engine_ttft_ms),
                    None => gate,
                }
            },
            queue: AdmissionQueue::new(
                cfg.order,
                cfg.max_queue_len,
                cfg.max_queue_wait_ms,
                cfg.starvation_ms,
                cfg.output_token_cost,
            ),
            cfg,
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &AdmissionConfig {
        &self.cfg
    }

    fn expected_output(&self, max_tokens: u32) -> u32 {
        max_tokens.min(self.cfg.expected_output_tokens)
    }

    /// KV blocks `req` is expected to need.
    pub fn demand(&self, req: &AdmissionRequest<'_>) -> u64 {
        demand_blocks(
            req.prompt_tokens,
            req.cached_tokens,
            self.expected_output(req.max_tokens),
            self.cfg.block_size,
        )
    }

    /// Decides a new request. `snapshot` is the pool's fresh gauges (`None`
    /// when none are fresh). Other queued requests may be admitted or shed by
    /// the same call; they are in the returned [`Released`].
    pub fn offer(
        &mut self,
        req: &AdmissionRequest<'_>,
        snapshot: Option<&PoolSnapshot>,
        now_ms: u64,
    ) -> (Offer, Released) {
        let demand = self.demand(req);
        if !self.cfg.enabled {
            return (
                Offer::Admitted(self.gate.reserve(demand, now_ms)),
                Released::default(),
            );
        }
        let mut released = self.poll(snapshot, now_ms);
        let saturated = self.gate.check(demand, snapshot, now_ms).err();
        if self.queue.is_empty() && saturated.is_none() {
            return (Offer::Admitted(self.gate.reserve(demand, now_ms)), released);
        }
        let slo_ms = req.ttft_slo_ms.unwrap_or(self.cfg.default_deadline_ms);
        let queued = QueuedRequest {
            tenant: req.tenant.to_string(),
            priority: req.priority,
            weight: req.weight,
            prompt_tokens: req.prompt_tokens,
            expected_output_tokens: self.expected_output(req.max_tokens),
            demand_blocks: demand,
            deadline_ms: now_ms.saturating_add(slo_ms),
            arrival_ms: now_ms,
            wait_budget_ms: self
                .cfg
                .shed_on_ttft_slo
                .then(|| slo_ms.saturating_sub(self.cfg.engine_ttft_ms)),
        };
        let (pushed, displaced) = self.queue.push(queued);
        released.shed.extend(displaced);
        let ticket = match pushed {
            Ok(t) => t,
            Err(shed) => return (Offer::Shed(shed), released),
        };
        // It may go at once if it outranks what was blocked (a higher band),
        // or be shed at once (no time left to wait).
        let more = self.poll(snapshot, now_ms);
        let mut own_shed = None;
        for (t, shed) in more.shed {
            if t == ticket {
                own_shed = Some(shed);
            } else {
                released.shed.push((t, shed));
            }
        }
        let mut own = None;
        for (t, kv) in more.admitted {
            if t == ticket {
                own = Some(kv);
            } else {
                released.admitted.push((t, kv));
            }
        }
        if let Some(shed) = own_shed {
            return (Offer::Shed(shed), released);
        }
        match own {
            Some(kv) => (Offer::Admitted(kv), released),
            None => (Offer::Queued { ticket, saturated }, released),
        }
    }

    /// Sheds what has waited too long (its TTFT budget is spent: it is not
    /// started late), then admits from the head of the queue while the gate allows.
    pub fn poll(&mut self, snapshot: Option<&PoolSnapshot>, now_ms: u64) -> Released {
        let mut out = Released {
            admitted: Vec::new(),
            shed: self.queue.expire(now_ms),
        };
        while let Some(ticket) = self.queue.peek(now_ms) {
            let Some(demand) = self.queue.get(ticket).map(|r| r.demand_blocks) else {
                break;
            };
            if self.gate.check(demand, snapshot, now_ms).is_err() {
                break;
            }
            if self.queue.take(ticket, now_ms).is_none() {
                break;
            }
            out.admitted
                .push((ticket, self.gate.reserve(demand, now_ms)));
        }
        out
    }

    /// Sets how many endpoints serve the pool now; with `endpoint_kv_blocks`
    /// it sizes the pool's capacity until a scrape reports one.
    pub fn set_endpoints(&mut self, endpoints: u32) {
        self.gate.set_endpoints(endpoints);
    }

    /// Removes a queued request whose client went away; false if it was not queued.
    pub fn cancel(&mut self, ticket: Ticket) -> bool {
        self.queue.cancel(ticket).is_some()
    }

    /// Returns an admitted request's KV reservation when it ends (any way it ends).
    pub fn release(&mut self, ticket: KvTicket) {
        self.gate.release(ticket);
    }

    /// Corrects `fair`'s charge for a finished request once its real output is known.
    pub fn settle_fair(&mut self, tenant: &str, max_tokens: u32, actual_output: u32, weight: f64) {
        let expected = self.expected_output(max_tokens);
        self.queue
            .counters()
            .settle(tenant, expected, actual_output, weight);
    }

    /// Requests waiting (a metric).
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// Requests of `tenant` waiting.
    pub fn tenant_queue_len(&self, tenant: &str) -> u32 {
        self.queue.tenant_len(tenant)
    }

    /// KV blocks admitted and not yet released (a metric; 0 when idle).
    pub fn in_flight_blocks(&self) -> u64 {
        self.gate.in_flight_blocks()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::EngineGauges;

    fn snapshot(kv: f64, now: u64) -> PoolSnapshot {
        PoolSnapshot::from_gauges([(
            EngineGauges {
                running: 4.0,
                waiting: 0.0,
                kv_usage: kv,
                num_gpu_blocks: Some(1000),
            },
            now,
        )])
        .unwrap()
    }

    fn request(tenant: &str, priority: Priority, prompt: u32) -> AdmissionRequest<'_> {
        AdmissionRequest {
            tenant,
            priority,
            weight: 1.0,
            prompt_tokens: prompt,
            cached_tokens: 0,
            max_tokens: 64,
            ttft_slo_ms: None,
        }
    }

    #[test]
    fn holds_while_saturated_and_releases_in_order_as_it_drains() {
        let mut adm = PoolAdmission::new(AdmissionConfig {
            order: QueueOrder::ShortestFirst,
            ..Default::default()
        });
        // 1000 blocks, 90% allowed: 900. A 1600-token prompt + 64 out = 104 blocks.
        let s = snapshot(0.0, 0);
        let mut held = Vec::new();
        for _ in 0..8 {
            match adm
                .offer(&request("t", Priority::Standard, 1600), Some(&s), 1)
                .0
            {
                Offer::Admitted(kv) => held.push(kv),
                other => panic!("{other:?}"),
            }
        }
        // 832 blocks admitted since the scrape; the next 104 do not fit.
        let mut queued = Vec::new();
        // 68 blocks left: none of these fit (204, 104 and 79 blocks).
        for prompt in [3200, 1600, 1200] {
            match adm
                .offer(&request("t", Priority::Standard, prompt), Some(&s), 2)
                .0
            {
                Offer::Queued { ticket, saturated } => {
                    assert_eq!(saturated, Some(Saturation::Kv));
                    queued.push(ticket);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(adm.queue_len(), 3);
        // A scrape shows the admitted work running: 85% used. Only 50 blocks free.
        let busy = snapshot(0.85, 10);
        assert!(adm.poll(Some(&busy), 11).admitted.is_empty());
        // Half the work finishes: 40% used. Shortest first: 1200, then 1600, then 3200.
        for kv in held.drain(..4) {
            adm.release(kv);
        }
        let r = adm.poll(Some(&snapshot(0.4, 20)), 21);
        let order: Vec<Ticket> = r.admitted.iter().map(|(t, _)| *t).collect();
        assert_eq!(order, vec![queued[2], queued[1], queued[0]]);
        assert_eq!(adm.queue_len(), 0);
        for (_, kv) in r.admitted {
            adm.release(kv);
        }
        for kv in held {
            adm.release(kv);
        }
        assert_eq!(adm.in_flight_blocks(), 0);
    }

    #[test]
    fn interactive_overtakes_and_timeouts_shed() {
        let mut adm = PoolAdmission::new(AdmissionConfig {
            max_queue_wait_ms: 1000,
            ..Default::default()
        });
        let full = snapshot(0.95, 0);
        let (o, _) = adm.offer(&request("batch", Priority::Batch, 100), Some(&full), 0);
        let Offer::Queued {
            ticket: batch,
            saturated,
        } = o
        else {
            panic!("{o:?}")
        };
        assert_eq!(saturated, Some(Saturation::Kv));
        let (o, _) = adm.offer(
            &request("chat", Priority::Interactive, 100),
            Some(&full),
            500,
        );
        let Offer::Queued { ticket: chat, .. } = o else {
            panic!("{o:?}")
        };
        // Room for one: the interactive request goes first.
        let r = adm.poll(Some(&snapshot(0.88, 600)), 600);
        assert_eq!(r.admitted.len(), 1);
        assert_eq!(r.admitted[0].0, chat);
        // The batch request times out.
        let r = adm.poll(Some(&full), 1000);
        assert_eq!(r.shed.len(), 1);
        assert_eq!(r.shed[0].0, batch);
        assert_eq!(r.shed[0].1.status.http_status(), 503);
        assert!(r.shed[0].1.retry_after_ms >= 1000);
    }

    #[test]
    fn cancel_leaves_nothing_behind() {
        let mut adm = PoolAdmission::new(AdmissionConfig::default());
        let full = snapshot(0.99, 0);
        let (o, _) = adm.offer(&request("t", Priority::Standard, 100), Some(&full), 0);
        let Offer::Queued { ticket, .. } = o else {
            panic!("{o:?}")
        };
        assert!(adm.cancel(ticket));
        assert!(!adm.cancel(ticket));
        assert_eq!(adm.queue_len(), 0);
        assert_eq!(adm.tenant_queue_len("t"), 0);
        assert_eq!(adm.in_flight_blocks(), 0);
        // Without gauges and no history, admission lets requests through.
        let (o, _) = adm.offer(&request("t", Priority::Standard, 100), None, 1);
        let Offer::Admitted(kv) = o else {
            panic!("{o:?}")
        };
        adm.release(kv);
        assert_eq!(adm.in_flight_blocks(), 0);
    }

    use proptest::prelude::*;

    proptest! {
        /// Random arrivals, cancels, completions and scrapes: once everything
        /// admitted is released and everything queued cancelled, nothing is
        /// left — no queue entry, no reserved block.
        #[test]
        fn nothing_leaks(
            ops in proptest::collection::vec((0u8..5, 0usize..3, 0u32..5000, 0u8..100), 1..200),
            order in 0usize..4,
            shed_on_ttft_slo in any::<bool>(),
            endpoint_kv_blocks in proptest::option::of(1u64..2000),
            max_prefilling in proptest::option::of(1u32..4),
        ) {
            let order = [QueueOrder::Fifo, QueueOrder::ShortestFirst, QueueOrder::Deadline, QueueOrder::Fair][order];
            let mut adm = PoolAdmission::new(AdmissionConfig {
                order,
                max_queue_len: 8,
                max_queue_wait_ms: 400,
                shed_on_ttft_slo,
                endpoint_kv_blocks,
                max_prefilling,
                engine_ttft_ms: 30,
                ..Default::default()
            });
            let tenants = ["a", "b", "c"];
            let prios = [Priority::Interactive, Priority::Standard, Priority::Batch];
            let mut queued: Vec<Ticket> = Vec::new();
            let mut running: Vec<KvTicket> = Vec::new();
            let mut kv = 0.5;
            for (step, (op, t, prompt, x)) in ops.into_iter().enumerate() {
                let now = step as u64 * 13;
                let snap = snapshot(kv, now);
                let released = match op {
                    0 | 1 => {
                        let req = AdmissionRequest {
                            ttft_slo_ms: (x % 3 > 0).then_some(u64::from(x) * 4),
                            ..request(tenants[t], prios[t], prompt)
                        };
                        // Some arrivals come between scrapes (no fresh gauges).
                        let fresh = (x % 4 > 0).then_some(&snap);
                        let (offer, released) = adm.offer(&req, fresh, now);
                        match offer {
                            Offer::Admitted(k) => running.push(k),
                            Offer::Queued { ticket, .. } => queued.push(ticket),
                            Offer::Shed(s) => prop_assert!(matches!(s.status.http_status(), 429 | 503)),
                        }
                        released
                    }
                    2 => {
                        if !running.is_empty() {
                            adm.release(running.remove(usize::from(x) % running.len()));
                        }
                        adm.poll(Some(&snap), now)
                    }
                    3 => {
                        if !queued.is_empty() {
                            let tk = queued.remove(usize::from(x) % queued.len());
                            prop_assert!(adm.cancel(tk));
                        }
                        Released::default()
                    }
                    _ => {
                        kv = f64::from(x) / 100.0;
                        adm.poll(Some(&snapshot(kv, now)), now)
                    }
                };
                for (tk, k) in released.admitted {
                    prop_assert!(queued.contains(&tk));
                    queued.retain(|q| *q != tk);
                    running.push(k);
                }
                for (tk, _) in released.shed {
                    prop_assert!(queued.contains(&tk));
                    queued.retain(|q| *q != tk);
                }
                prop_assert_eq!(adm.queue_len(), queued.len());
                prop_assert!(adm.queue_len() <= 8);
            }
            for tk in queued {
                prop_assert!(adm.cancel(tk));
            }
            for k in running {
                adm.release(k);
            }
            prop_assert_eq!(adm.queue_len(), 0);
            prop_assert_eq!(adm.in_flight_blocks(), 0);
        }
    }

    #[test]
    fn deadline_order_follows_each_class_slo() {
        let mut adm = PoolAdmission::new(AdmissionConfig {
            order: QueueOrder::Deadline,
            ..Default::default()
        });
        let full = snapshot(0.95, 0);
        let with_slo = |slo: Option<u64>| AdmissionRequest {
            ttft_slo_ms: slo,
            ..request("t", Priority::Standard, 100)
        };
        let mut tickets = Vec::new();
        // Arrival + SLO: 0 + 5000, 10 + 2000 (the pool default), 20 + 200.
        for (now, slo) in [(0, Some(5000)), (10, None), (20, Some(200))] {
            match adm.offer(&with_slo(slo), Some(&full), now).0 {
                Offer::Queued { ticket, .. } => tickets.push(ticket),
                other => panic!("{other:?}"),
            }
        }
        let r = adm.poll(Some(&snapshot(0.0, 30)), 30);
        let order: Vec<Ticket> = r.admitted.iter().map(|(t, _)| *t).collect();
        assert_eq!(order, vec![tickets[2], tickets[1], tickets[0]]);
        for (_, kv) in r.admitted {
            adm.release(kv);
        }
        assert_eq!((adm.queue_len(), adm.in_flight_blocks()), (0, 0));
    }

    #[test]
    fn sheds_what_cannot_start_within_its_slo() {
        let mut adm = PoolAdmission::new(AdmissionConfig {
            shed_on_ttft_slo: true,
            engine_ttft_ms: 20,
            ..Default::default()
        });
        let full = snapshot(0.95, 0);
        // SLO 120 ms, 20 of them the engine's: 100 ms in the queue at most.
        let req = AdmissionRequest {
            ttft_slo_ms: Some(120),
            ..request("t", Priority::Standard, 100)
        };
        let queued = |o: Offer| match o {
            Offer::Queued { ticket, .. } => ticket,
            other => panic!("{other:?}"),
        };
        // No service rate known yet: both wait.
        let _a = queued(adm.offer(&req, Some(&full), 0).0);
        let b = queued(adm.offer(&req, Some(&full), 0).0);
        // Room for one (880 + 11 of 900 blocks) 40 ms later: one admission per 40 ms.
        let r = adm.poll(Some(&snapshot(0.88, 40)), 40);
        assert_eq!(r.admitted.len(), 1);
        let running = r.admitted.into_iter().map(|(_, kv)| kv);
        // Behind b: 2 × 40 = 80 ms projected, within 100.
        let c = queued(adm.offer(&req, Some(&full), 50).0);
        // Behind b and c: 120 ms projected; shed at once.
        let Offer::Shed(shed) = adm.offer(&req, Some(&full), 50).0 else {
            panic!("expected a shed")
        };
        assert_eq!(
            (shed.reason, shed.status.http_status()),
            (ShedReason::TtftSlo, 503)
        );
        assert!(shed.retry_after_ms >= 1000);
        // b has waited its 100 ms: shed; c still has time.
        let r = adm.poll(Some(&full), 100);
        assert_eq!(r.shed.len(), 1);
        assert_eq!((r.shed[0].0, r.shed[0].1.reason), (b, ShedReason::TtftSlo));
        assert_eq!(adm.queue_len(), 1);
        let r = adm.poll(Some(&full), 150);
        assert_eq!(r.shed.iter().map(|s| s.0).collect::<Vec<_>>(), vec![c]);
        // No time to wait at all: shed by the same call, never queued.
        let no_time = AdmissionRequest {
            ttft_slo_ms: Some(20),
            ..req
        };
        let (o, _) = adm.offer(&no_time, Some(&full), 200);
        assert!(
            matches!(
                o,
                Offer::Shed(Shed {
                    reason: ShedReason::TtftSlo,
                    ..
                })
            ),
            "{o:?}"
        );
        assert_eq!(adm.queue_len(), 0);
        for kv in running {
            adm.release(kv);
        }
        assert_eq!((adm.queue_len(), adm.in_flight_blocks()), (0, 0));
    }

    #[test]
    fn configured_capacity_gates_before_any_scrape() {
        let mut adm = PoolAdmission::new(AdmissionConfig {
            endpoint_kv_blocks: Some(100),
            max_kv_usage: 0.8,
            ..Default::default()
        });
        adm.set_endpoints(1);
        // 100 prompt + 64 output tokens: 11 blocks; 80 allowed: 7 fit.
        let mut running = Vec::new();
        for _ in 0..7 {
            match adm.offer(&request("t", Priority::Standard, 100), None, 0).0 {
                Offer::Admitted(kv) => running.push(kv),
                other => panic!("{other:?}"),
            }
        }
        let o = adm.offer(&request("t", Priority::Standard, 100), None, 1).0;
        let Offer::Queued { ticket, saturated } = o else {
            panic!("{o:?}")
        };
        assert_eq!(saturated, Some(Saturation::Kv));
        // One ends: the queued one goes.
        adm.release(running.pop().unwrap());
        let r = adm.poll(None, 2);
        assert_eq!(r.admitted.len(), 1);
        assert_eq!(r.admitted[0].0, ticket);
        running.extend(r.admitted.into_iter().map(|(_, kv)| kv));
        for kv in running {
            adm.release(kv);
        }
        assert_eq!(adm.in_flight_blocks(), 0);
    }

    #[test]
    fn disabled_admits_everything_but_still_counts() {
        let mut adm = PoolAdmission::new(AdmissionConfig {
            enabled: false,
            ..Default::default()
        });
        let (o, _) = adm.offer(
            &request("t", Priority::Batch, 100_000),
            Some(&snapshot(1.0, 0)),
            0,
        );
        let Offer::Admitted(kv) = o else {
            panic!("{o:?}")
        };
        assert!(adm.in_flight_blocks() > 0);
        adm.release(kv);
        assert_eq!(adm.in_flight_blocks(), 0);
    }
}
