//! A pool's admission queue: priority bands, an order within each band,
//! starvation protection, and bounds on length and wait.
//!
//! Every operation is O(log n) or O(tenants) on ordered sets, so a queue of
//! thousands stays well inside the per-request budget. Removal is eager (a
//! cancelled or expired request leaves every index at once), so the queue's
//! memory is bounded by `max_len` entries whatever clients do.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use foldhash::fast::FixedState;

use super::config::{Priority, QueueOrder};
use super::fair::{VirtualCounters, weight_or_one};

/// Identifies a queued request until it is admitted, shed or cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(u64);

impl Ticket {
    /// The ticket's number (unique per queue, increasing with arrival).
    pub fn id(self) -> u64 {
        self.0
    }
}

/// What the queue needs to know about a waiting request.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedRequest {
    /// Tenant name.
    pub tenant: String,
    /// The tenant's priority band.
    pub priority: Priority,
    /// The tenant's fairness weight.
    pub weight: f64,
    /// Prompt tokens (`shortest_first` key, `fair` cost).
    pub prompt_tokens: u32,
    /// Output tokens expected (`fair` cost).
    pub expected_output_tokens: u32,
    /// KV blocks it will need (checked by the gate when it reaches the head).
    pub demand_blocks: u64,
    /// Absolute deadline for its first token (`deadline` key).
    pub deadline_ms: u64,
    /// When it arrived.
    pub arrival_ms: u64,
    /// Longest it may wait in the queue to still meet its TTFT SLO (`None`:
    /// only the queue's own bound applies). It is shed on arrival when the
    /// projected wait is longer, and once it has waited this long.
    pub wait_budget_ms: Option<u64>,
}

/// The HTTP answer to a shed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShedStatus {
    /// 429: the tenant holds more than its share of the queue.
    TooManyRequests,
    /// 503: the pool is overloaded.
    Unavailable,
}

impl ShedStatus {
    /// The status code.
    pub fn http_status(self) -> u16 {
        match self {
            ShedStatus::TooManyRequests => 429,
            ShedStatus::Unavailable => 503,
        }
    }
}

/// Why a request was shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShedReason {
    /// The queue was full and nothing of lower priority could make room.
    QueueFull,
    /// Pushed out of a full queue by a higher-priority arrival.
    Displaced,
    /// Waited `max_queue_wait_ms` without capacity.
    QueueTimeout,
    /// Its TTFT SLO could not be met: the projected wait was longer than its
    /// budget on arrival, or it waited its whole budget.
    TtftSlo,
}

impl ShedReason {
    /// snake_case label.
    pub fn as_str(self) -> &'static str {
        match self {
            ShedReason::QueueFull => "queue_full",
            ShedReason::Displaced => "displaced",
            ShedReason::QueueTimeout => "queue_timeout",
            ShedReason::TtftSlo => "ttft_slo",
        }
    }
}

/// A shed decision: status, reason, and when to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shed {
    /// 429 or 503.
    pub status: ShedStatus,
    /// Why.
    pub reason: ShedReason,
    /// For `Retry-After`.
    pub retry_after_ms: u64,
    /// The shed request's tenant.
    pub tenant: String,
    /// Human-readable explanation.
    pub message: String,
}

#[derive(Debug, Clone)]
struct Entry {
    req: QueuedRequest,
    key: u64,
}

/// Per-tenant queue occupancy.
#[derive(Debug, Clone, Copy)]
struct Occupancy {
    count: u32,
    weight: f64,
}

/// A bounded, ordered admission queue for one pool.
#[derive(Debug, Clone)]
pub struct AdmissionQueue {
    order: QueueOrder,
    max_len: usize,
    max_wait_ms: u64,
    starvation_ms: u64,
    entries: HashMap<u64, Entry, FixedState>,
    /// Per band, (order key, seq): the order for all but `fair`.
    ordered: [BTreeSet<(u64, u64)>; Priority::COUNT],
    /// Per band, tenant → seqs (arrival order): `fair` picks and shedding choose from it.
    by_tenant: [BTreeMap<String, BTreeSet<u64>>; Priority::COUNT],
    /// (arrival, seq) over all bands: starvation.
    age: BTreeSet<(u64, u64)>,
    /// (shed at, seq) over all bands: the queue bound or the request's SLO budget.
    expiry: BTreeSet<(u64, u64)>,
    occupancy: HashMap<String, Occupancy, FixedState>,
    weight_sum: f64,
    vtc: VirtualCounters,
    next_seq: u64,
    last_take_ms: Option<u64>,
    service_interval_ms: Option<f64>,
}

impl AdmissionQueue {
    /// An empty queue.
    pub fn new(
        order: QueueOrder,
        max_len: usize,
        max_wait_ms: u64,
        starvation_ms: u64,
        output_token_cost: f64,
    ) -> Self {
        AdmissionQueue {
            order,
            max_len: max_len.max(1),
            max_wait_ms: max_wait_ms.max(1),
            starvation_ms: starvation_ms.max(1),
            entries: HashMap::with_hasher(FixedState::with_seed(0)),
            ordered: Default::default(),
            by_tenant: Default::default(),
            age: BTreeSet::new(),
            expiry: BTreeSet::new(),
            occupancy: HashMap::with_hasher(FixedState::with_seed(0)),
            weight_sum: 0.0,
            vtc: VirtualCounters::new(output_token_cost),
            next_seq: 0,
            last_take_ms: None,
            service_interval_ms: None,
        }
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Requests of `tenant` waiting.
    pub fn tenant_len(&self, tenant: &str) -> u32 {
        self.occupancy.get(tenant).map_or(0, |o| o.count)
    }

    /// The queued request behind `ticket`.
    pub fn get(&self, ticket: Ticket) -> Option<&QueuedRequest> {
        self.entries.get(&ticket.0).map(|e| &e.req)
    }

    /// `fair`'s virtual counters (for settling and inspection).
    pub fn counters(&mut self) -> &mut VirtualCounters {
        &mut self.vtc
    }

    /// How long a client should wait before retrying, from the recent service rate.
    pub fn retry_after_ms(&self) -> u64 {
        match self.service_interval_ms {
            Some(interval) => ((self.len() as f64 + 1.0) * interval)
                .clamp(1000.0, self.max_wait_ms.max(1000) as f64)
                as u64,
            None => 1000,
        }
    }

    /// Whether `tenant` already queues requests and (with `extra` more) exceeds
    /// its weighted share of the queue. A tenant with nothing queued is never
    /// over its share: it is refused because the pool is overloaded.
    fn over_share(&self, tenant: &str, weight: f64, extra: u32) -> bool {
        let Some(o) = self.occupancy.get(tenant) else {
            return false;
        };
        let (count, sum) = (o.count + extra, self.weight_sum);
        let share = self.max_len as f64 * weight_or_one(weight) / sum.max(f64::MIN_POSITIVE);
        f64::from(count) > share
    }

    fn shed(&self, tenant: &str, weight: f64, extra: u32, reason: ShedReason) -> Shed {
        let over = self.over_share(tenant, weight, extra);
        let status = if over {
            ShedStatus::TooManyRequests
        } else {
            ShedStatus::Unavailable
        };
        let message = match (reason, over) {
            (_, true) => format!(
                "tenant `{tenant}` has more than its share of the pool's admission queue; slow down"
            ),
            (ShedReason::QueueTimeout, false) => format!(
                "no capacity in the pool within {} ms; the pool is overloaded",
                self.max_wait_ms
            ),
            (ShedReason::TtftSlo, false) => {
                "the pool is overloaded: the request could not start within its time-to-first-token objective".to_string()
            }
            (_, false) => format!(
                "the pool's admission queue is full ({} waiting); the pool is overloaded",
                self.len()
            ),
        };
        Shed {
            status,
            reason,
            retry_after_ms: self.retry_after_ms(),
            tenant: tenant.to_string(),
            message,
        }
    }

    /// Queues `req`. When full, a lower-priority request is displaced to make
    /// room (returned second), or else `req` itself is shed.
    pub fn push(&mut self, req: QueuedRequest) -> (Result<Ticket, Shed>, Option<(Ticket, Shed)>) {
        let seq = self.next_seq;
        let key = match self.order {
            QueueOrder::Fifo | QueueOrder::Fair => seq,
            QueueOrder::ShortestFirst => u64::from(req.prompt_tokens),
            QueueOrder::Deadline => req.deadline_ms,
        };
        let band = req.priority.band();
        if let (Some(budget), Some(wait)) = (
            req.wait_budget_ms,
            self.projected_wait_ms(band, key, seq, &req.tenant),
        ) && wait > budget as f64
        {
            let shed = self.shed(&req.tenant, req.weight, 1, ShedReason::TtftSlo);
            return (Err(shed), None);
        }
        let mut displaced = None;
        if self.entries.len() >= self.max_len {
            match self.displacement_victim() {
                Some((victim_band, seq)) if victim_band > band => {
                    let tenant = self.entries[&seq].req.tenant.clone();
                    let weight = self.entries[&seq].req.weight;
                    let shed = self.shed(&tenant, weight, 0, ShedReason::Displaced);
                    self.remove_seq(seq);
                    displaced = Some((Ticket(seq), shed));
                }
                _ => {
                    let shed = self.shed(&req.tenant, req.weight, 1, ShedReason::QueueFull);
                    return (Err(shed), None);
                }
            }
        }
        self.next_seq += 1;
        let weight = weight_or_one(req.weight);
        if self.tenant_len(&req.tenant) == 0 {
            let min_backlogged = self
                .occupancy
                .keys()
                .map(|t| self.vtc.get(t))
                .min_by(f64::total_cmp);
            let occupancy = &self.occupancy;
            self.vtc
                .on_backlogged(&req.tenant, min_backlogged, |t| occupancy.contains_key(t));
        }
        let occ = self
            .occupancy
            .entry(req.tenant.clone())
            .or_insert(Occupancy {
                count: 0,
                weight: 0.0,
            });
        self.weight_sum += weight - occ.weight;
        occ.weight = weight;
        occ.count += 1;
        if self.order != QueueOrder::Fair {
            self.ordered[band].insert((key, seq));
        }
        self.by_tenant[band]
            .entry(req.tenant.clone())
            .or_default()
            .insert(seq);
        self.age.insert((req.arrival_ms, seq));
        self.expiry.insert((self.expires_ms(&req), seq));
        if self.entries.is_empty() {
            // The service interval is measured while requests wait; an idle
            // stretch before this arrival is not service time.
            self.last_take_ms = Some(req.arrival_ms);
        }
        self.entries.insert(seq, Entry { req, key });
        (Ok(Ticket(seq)), displaced)
    }

    /// When `req` is shed if still queued.
    fn expires_ms(&self, req: &QueuedRequest) -> u64 {
        let wait = req
            .wait_budget_ms
            .map_or(self.max_wait_ms, |b| b.min(self.max_wait_ms));
        req.arrival_ms.saturating_add(wait)
    }

    /// How long a request entering `band` with order `key` (and sequence
    /// `seq`) is expected to wait: the requests served before it times the
    /// recent interval between admissions. `None` until an interval is known.
    fn projected_wait_ms(&self, band: usize, key: u64, seq: u64, tenant: &str) -> Option<f64> {
        let interval = self.service_interval_ms?;
        let higher: usize = self.by_tenant[..band]
            .iter()
            .flat_map(|m| m.values())
            .map(BTreeSet::len)
            .sum();
        let same = if self.order == QueueOrder::Fair {
            // `fair` interleaves tenants; the tenant's own backlog is a lower bound.
            self.by_tenant[band].get(tenant).map_or(0, BTreeSet::len)
        } else {
            self.ordered[band].range(..(key, seq)).count()
        };
        Some((higher + same + 1) as f64 * interval)
    }

    /// In the least important non-empty band, the newest request of the
    /// tenant holding the most queue per unit of weight.
    fn displacement_victim(&self) -> Option<(usize, u64)> {
        let band = (0..Priority::COUNT)
            .rev()
            .find(|&b| !self.by_tenant[b].is_empty())?;
        let (_, seqs) = self.by_tenant[band].iter().max_by(|a, b| {
            let load = |t: &str| {
                let o = self.occupancy.get(t).copied();
                o.map_or(0.0, |o| f64::from(o.count) / o.weight)
            };
            load(a.0).total_cmp(&load(b.0))
        })?;
        seqs.last().map(|&seq| (band, seq))
    }

    /// The request that should be admitted next, if any.
    pub fn peek(&self, now_ms: u64) -> Option<Ticket> {
        if let Some(&(arrival, seq)) = self.age.first()
            && now_ms.saturating_sub(arrival) >= self.starvation_ms
        {
            return Some(Ticket(seq));
        }
        for band in 0..Priority::COUNT {
            let next = if self.order == QueueOrder::Fair {
                self.by_tenant[band]
                    .iter()
                    .min_by(|a, b| self.vtc.get(a.0).total_cmp(&self.vtc.get(b.0)))
                    .and_then(|(_, seqs)| seqs.first().copied())
            } else {
                self.ordered[band].first().map(|&(_, seq)| seq)
            };
            if let Some(seq) = next {
                return Some(Ticket(seq));
            }
        }
        None
    }

    /// Removes `ticket` for admission, charging `fair`'s counters.
    pub fn take(&mut self, ticket: Ticket, now_ms: u64) -> Option<QueuedRequest> {
        let req = self.remove_seq(ticket.0)?;
        if self.order == QueueOrder::Fair {
            self.vtc.charge(
                &req.tenant,
                req.prompt_tokens,
                req.expected_output_tokens,
                req.weight,
            );
        }
        if let Some(last) = self.last_take_ms {
            let dt = now_ms.saturating_sub(last) as f64;
            self.service_interval_ms = Some(match self.service_interval_ms {
                Some(ewma) => 0.8 * ewma + 0.2 * dt,
                None => dt,
            });
        }
        self.last_take_ms = Some(now_ms);
        Some(req)
    }

    /// Removes a cancelled request (client gone); `None` if it was not queued.
    pub fn cancel(&mut self, ticket: Ticket) -> Option<QueuedRequest> {
        self.remove_seq(ticket.0)
    }

    /// Sheds every request that has waited `max_wait_ms`, or its own wait budget.
    pub fn expire(&mut self, now_ms: u64) -> Vec<(Ticket, Shed)> {
        let mut out = Vec::new();
        while let Some(&(expires, seq)) = self.expiry.first() {
            if now_ms < expires {
                break;
            }
            let Some(e) = self.entries.get(&seq) else {
                self.expiry.pop_first();
                continue;
            };
            let (tenant, weight) = (e.req.tenant.clone(), e.req.weight);
            let reason = if now_ms.saturating_sub(e.req.arrival_ms) >= self.max_wait_ms {
                ShedReason::QueueTimeout
            } else {
                ShedReason::TtftSlo
            };
            let shed = self.shed(&tenant, weight, 0, reason);
            self.remove_seq(seq);
            out.push((Ticket(seq), shed));
        }
        out
    }

    fn remove_seq(&mut self, seq: u64) -> Option<QueuedRequest> {
        let Entry { req, key } = self.entries.remove(&seq)?;
        let band = req.priority.band();
        self.ordered[band].remove(&(key, seq));
        if let Some(seqs) = self.by_tenant[band].get_mut(&req.tenant) {
            seqs.remove(&seq);
            if seqs.is_empty() {
                self.by_tenant[band].remove(&req.tenant);
            }
        }
        self.age.remove(&(req.arrival_ms, seq));
        self.expiry.remove(&(self.expires_ms(&req), seq));
        if let Some(o) = self.occupancy.get_mut(&req.tenant) {
            o.count -= 1;
            if o.count == 0 {
                self.weight_sum -= o.weight;
                self.occupancy.remove(&req.tenant);
            }
        }
        if self.occupancy.is_empty() {
            // Keep the sum exact when idle, whatever floating error accumulated.
            self.weight_sum = 0.0;
        }
        Some(req)
    }

    /// Checks that every index agrees with the entries (tests and debug assertions).
    #[cfg(test)]
    pub(crate) fn consistent(&self) -> bool {
        let n = self.entries.len();
        let ordered: usize = self.ordered.iter().map(BTreeSet::len).sum();
        let by_tenant: usize = self
            .by_tenant
            .iter()
            .flat_map(|m| m.values())
            .map(BTreeSet::len)
            .sum();
        let occ: u32 = self.occupancy.values().map(|o| o.count).sum();
        (self.order == QueueOrder::Fair || ordered == n)
            && by_tenant == n
            && self.age.len() == n
            && self.expiry.len() == n
            && occ as usize == n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(tenant: &str, priority: Priority, prompt: u32, arrival: u64) -> QueuedRequest {
        QueuedRequest {
            tenant: tenant.into(),
            priority,
            weight: 1.0,
            prompt_tokens: prompt,
            expected_output_tokens: 100,
            demand_blocks: 1,
            deadline_ms: arrival + 1000,
            arrival_ms: arrival,
            wait_budget_ms: None,
        }
    }

    fn drain(q: &mut AdmissionQueue, now: u64) -> Vec<QueuedRequest> {
        let mut out = Vec::new();
        while let Some(t) = q.peek(now) {
            out.push(q.take(t, now).unwrap());
        }
        out
    }

    fn queue(order: QueueOrder, len: usize) -> AdmissionQueue {
        AdmissionQueue::new(order, len, 30_000, 10_000, 2.0)
    }

    #[test]
    fn orders() {
        let prompts = [(300, 0, 5000), (100, 1, 9000), (200, 2, 1000)];
        let cases = [
            (QueueOrder::Fifo, [300, 100, 200]),
            (QueueOrder::ShortestFirst, [100, 200, 300]),
            (QueueOrder::Deadline, [200, 300, 100]),
        ];
        for (order, expect) in cases {
            let mut q = queue(order, 10);
            for (p, arrival, deadline) in prompts {
                let mut r = req("t", Priority::Standard, p, arrival);
                r.deadline_ms = deadline;
                q.push(r).0.unwrap();
            }
            let got: Vec<u32> = drain(&mut q, 5).iter().map(|r| r.prompt_tokens).collect();
            assert_eq!(got, expect, "{order}");
        }
    }

    #[test]
    fn bands_first_then_starvation_protection() {
        let mut q = queue(QueueOrder::Fifo, 10);
        q.push(req("b", Priority::Batch, 1, 0)).0.unwrap();
        q.push(req("s", Priority::Standard, 2, 1)).0.unwrap();
        q.push(req("i", Priority::Interactive, 3, 2)).0.unwrap();
        let got: Vec<u32> = drain(&mut q, 5).iter().map(|r| r.prompt_tokens).collect();
        assert_eq!(got, [3, 2, 1]);
        // The batch request has waited 10 s: it goes before fresh interactive work.
        q.push(req("b", Priority::Batch, 1, 0)).0.unwrap();
        q.push(req("i", Priority::Interactive, 3, 9_999)).0.unwrap();
        assert_eq!(
            q.take(q.peek(10_000).unwrap(), 10_000)
                .unwrap()
                .prompt_tokens,
            1
        );
    }

    #[test]
    fn full_queue_sheds_lowest_priority_first() {
        let mut q = queue(QueueOrder::Fifo, 2);
        q.push(req("a", Priority::Batch, 1, 0)).0.unwrap();
        q.push(req("b", Priority::Standard, 2, 0)).0.unwrap();
        // Another batch request: nothing less important to displace.
        let (r, d) = q.push(req("c", Priority::Batch, 3, 1));
        let shed = r.unwrap_err();
        assert_eq!(shed.reason, ShedReason::QueueFull);
        assert_eq!(shed.status.http_status(), 503);
        assert!(d.is_none());
        // An interactive one displaces the batch request.
        let (r, d) = q.push(req("d", Priority::Interactive, 4, 1));
        r.unwrap();
        let (_, shed) = d.unwrap();
        assert_eq!(
            (shed.reason, shed.tenant.as_str()),
            (ShedReason::Displaced, "a")
        );
        assert_eq!(q.len(), 2);
        assert!(q.consistent());
    }

    #[test]
    fn over_share_gets_429() {
        let mut q = queue(QueueOrder::Fifo, 4);
        for i in 0..3 {
            q.push(req("hog", Priority::Standard, 1, i)).0.unwrap();
        }
        q.push(req("small", Priority::Standard, 1, 3)).0.unwrap();
        let hog = q.push(req("hog", Priority::Standard, 1, 4)).0.unwrap_err();
        assert_eq!(hog.status, ShedStatus::TooManyRequests);
        let small = q
            .push(req("small", Priority::Standard, 1, 4))
            .0
            .unwrap_err();
        assert_eq!(small.status, ShedStatus::Unavailable);
    }

    #[test]
    fn expiry_and_cancel_leave_no_trace() {
        let mut q = queue(QueueOrder::Fair, 10);
        let a = q.push(req("a", Priority::Standard, 1, 0)).0.unwrap();
        q.push(req("b", Priority::Batch, 1, 10)).0.unwrap();
        q.push(req("c", Priority::Standard, 1, 20_000)).0.unwrap();
        assert!(q.cancel(a).is_some());
        assert!(q.cancel(a).is_none());
        let shed = q.expire(30_010);
        assert_eq!(shed.len(), 1);
        assert_eq!(shed[0].1.reason, ShedReason::QueueTimeout);
        assert_eq!(shed[0].1.status.http_status(), 503);
        assert_eq!(q.len(), 1);
        assert!(q.consistent());
        drain(&mut q, 30_010);
        assert!(q.is_empty() && q.consistent());
        assert_eq!(q.weight_sum, 0.0);
    }

    /// Two tenants keep the queue full; service is counted in VTC cost units.
    fn fair_service(wa: f64, wb: f64, prompt_b: u32) -> (f64, f64) {
        let mut q = queue(QueueOrder::Fair, 64);
        let mut served = HashMap::from([("a", 0.0), ("b", 0.0)]);
        for now in 0..2000u64 {
            for (t, w, p) in [("a", wa, 100u32), ("b", wb, prompt_b)] {
                while q.tenant_len(t) < 8 {
                    let mut r = req(t, Priority::Standard, p, now);
                    r.weight = w;
                    q.push(r).0.unwrap();
                }
            }
            let r = q.take(q.peek(now).unwrap(), now).unwrap();
            *served.get_mut(r.tenant.as_str()).unwrap() +=
                f64::from(r.prompt_tokens) + 2.0 * f64::from(r.expected_output_tokens);
        }
        (served["a"], served["b"])
    }

    #[test]
    fn fair_gives_weighted_service() {
        let (a, b) = fair_service(2.0, 1.0, 100);
        let ratio = a / b;
        assert!((1.9..=2.1).contains(&ratio), "2:1 weights gave {ratio:.3}");
        // Equal weights, b's requests twice as expensive: equal tokens, half the requests.
        let (a, b) = fair_service(1.0, 1.0, 400);
        assert!((0.95..=1.05).contains(&(a / b)), "{}", a / b);
    }

    proptest! {
        #[test]
        fn bounded_and_consistent_under_any_operations(
            ops in proptest::collection::vec((0u8..4, 0usize..4, 0u8..3, 0u32..1000), 1..300),
            order in 0usize..4,
        ) {
            let order = [QueueOrder::Fifo, QueueOrder::ShortestFirst, QueueOrder::Deadline, QueueOrder::Fair][order];
            let mut q = AdmissionQueue::new(order, 16, 500, 200, 2.0);
            let tenants = ["a", "b", "c", "d"];
            let prios = [Priority::Interactive, Priority::Standard, Priority::Batch];
            let mut live: Vec<Ticket> = Vec::new();
            for (now, (op, t, p, n)) in ops.into_iter().enumerate() {
                let now = now as u64 * 7;
                match op {
                    0 | 1 => {
                        let mut r = req(tenants[t], prios[p as usize], n, now);
                        r.wait_budget_ms = (n % 3 == 0).then_some(u64::from(n));
                        let (r, d) = q.push(r);
                        if let Ok(tk) = r { live.push(tk); }
                        if let Some((tk, _)) = d { live.retain(|x| *x != tk); }
                    }
                    2 => {
                        if let Some(tk) = q.peek(now) {
                            prop_assert!(q.take(tk, now).is_some());
                            live.retain(|x| *x != tk);
                        }
                    }
                    _ => {
                        if !live.is_empty() {
                            let tk = live.remove(n as usize % live.len());
                            prop_assert!(q.cancel(tk).is_some());
                        }
                    }
                }
                for (tk, _) in q.expire(now) {
                    live.retain(|x| *x != tk);
                }
                prop_assert!(q.len() <= 16);
                prop_assert_eq!(q.len(), live.len());
                prop_assert!(q.consistent());
            }
            for tk in live {
                prop_assert!(q.cancel(tk).is_some());
            }
            prop_assert!(q.is_empty() && q.consistent());
        }
    }
}
