//! The discrete-event replay: one loop in virtual time drives N engine
//! models, the routing policy and the admission gate. No HTTP, no sleeping:
//! the clock jumps from one event to the next (an arrival, the end of an
//! engine step, a gauge scrape, an admission timeout).
//!
//! A request's stages: arrival → admission queue → tokenization → routing →
//! engine queue (and, under EDF, the replica's hold queue before it) →
//! prefill in chunks → decode → finish. Each engine step is computed when it
//! starts ([`Engine::step`] returns its duration) and its tokens are
//! due when it ends, exactly as the HTTP replica streams them; the engine
//! keeps each request's token times (its `token_events` are off) and hands
//! them over when the request finishes.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::sync::Arc;

use sluice_bench::loadgen::record::RequestRecord;
use sluice_bench::metrics::summarize;
use sluice_enginesim::{Engine, EngineRequest, FinishReason, FinishedRequest, StepResult};
use sluice_policies::admission::{
    AdmissionRequest, KvTicket, Offer, PoolAdmission, PoolSnapshot, Priority, Released,
};
use sluice_policies::prefix::{BlockHash, block_hashes};
use sluice_policies::routing::{
    self, EndpointLoad, EndpointView, EngineGauges, Reason, RouteRequest, Router,
};

use crate::error::Result;
use crate::outcome::{LifecycleRecord, Outcome, ReplicaStats, Sample};
use crate::prepare::{PreparedRequest, PreparedWorkload};
use crate::scenario::{Scenario, Scheduler};

/// Most gauge samples per replica kept for the timeline (memory stays bounded on long traces).
const MAX_SAMPLES: f64 = 1000.0;
/// Zero-duration steps in a row (preemption with nothing left to run) before a replica counts as stuck.
const MAX_EMPTY_STEPS: u32 = 4;

/// Replays `workload` on the deployment `scenario` describes.
pub fn replay(workload: &PreparedWorkload, scenario: &Scenario) -> Result<Outcome> {
    scenario.validate()?;
    let mut sim = Sim::new(workload, scenario)?;
    sim.run();
    Ok(sim.finish())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dispatch(u32),
    StepDone(u32),
    Wake(u32),
    Scrape,
    Sample,
    QueueTimeout(u32),
}

#[derive(Debug, Clone, Copy)]
struct Event {
    t: f64,
    seq: u64,
    kind: Kind,
}

impl PartialEq for Event {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Event {
    fn cmp(&self, o: &Self) -> Ordering {
        self.t.total_cmp(&o.t).then(self.seq.cmp(&o.seq))
    }
}

/// Where a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Pending,
    Queued,
    Tokenizing,
    Held,
    InEngine,
    Done,
}

#[derive(Debug)]
struct Track {
    arrival: f64,
    stage: Stage,
    admitted: Option<f64>,
    tokenized: Option<f64>,
    routed: Option<f64>,
    engine_queued: Option<f64>,
    replica: Option<u32>,
    reason: Option<Reason>,
    matched: u32,
    first_token: Option<f64>,
    chunks: Vec<f64>,
    finished: Option<FinishedRequest>,
    end: f64,
    status: u16,
    error: Option<String>,
    /// The admission gate's reservation, returned when the request ends.
    kv: Option<KvTicket>,
    /// KV blocks reserved under EDF.
    reserved_blocks: u64,
    /// Prompt plus output tokens it may use (kept here: the workload's
    /// request is cold by the time the track is released).
    need_tokens: u64,
}

#[derive(Debug)]
struct Replica {
    key: String,
    engine: Engine,
    pending: Option<StepResult>,
    /// The last delivered step's result, reused so steps do not allocate.
    spare: StepResult,
    /// A scheduled wake-up for work that becomes ready later.
    wake_at: Option<f64>,
    gauges: EngineGauges,
    scraped_at: f64,
    /// `in_flight` when `gauges` were scraped (the proxy's own share of them).
    in_flight_at_scrape: u32,
    in_flight: u32,
    in_flight_tokens: u64,
    /// EDF: requests routed here waiting for KV room, by (deadline key, idx).
    held: BTreeSet<(i32, u32)>,
    reserved_blocks: u64,
    stats: ReplicaStats,
}

impl Replica {
    /// The engine's `/metrics` gauges at `now` (requests still in its API server are not waiting yet).
    fn live_gauges(&self, now: f64) -> EngineGauges {
        EngineGauges {
            running: self.engine.num_running() as f64,
            waiting: (self.engine.num_waiting_at(now) + self.held.len()) as f64,
            kv_usage: self.engine.kv_usage(),
            num_gpu_blocks: Some(self.engine.config().num_gpu_blocks),
        }
    }
}

struct Sim<'w> {
    w: &'w PreparedWorkload,
    sc: &'w Scenario,
    router: Box<dyn Router>,
    replicas: Vec<Replica>,
    tracks: Vec<Track>,
    heap: BinaryHeap<Reverse<Event>>,
    seq: u64,
    next_arrival: usize,
    done: usize,
    admission: Option<PoolAdmission>,
    /// Admission-queue ticket → request.
    tickets: HashMap<u64, u32>,
    route_hashes: Option<Vec<Arc<[BlockHash]>>>,
    /// Prompt hashes in the engines' block size when it differs from the workload's.
    engine_hashes: Option<Vec<Arc<[BlockHash]>>>,
    engine_block_size: u32,
    capacity_blocks: u64,
    sample_every: f64,
    timeline: Vec<Sample>,
    events: u64,
    /// Scheduled events other than the periodic scrape and sample.
    work_events: u64,
    now: f64,
}

impl<'w> Sim<'w> {
    fn new(w: &'w PreparedWorkload, sc: &'w Scenario) -> Result<Self> {
        let mut cfg = sc.engine_config()?;
        // Records need token times, not token text.
        cfg.token_events = false;
        let engine_block_size = cfg.block_size;
        let capacity_blocks = cfg.num_gpu_blocks;
        let mut replicas = Vec::with_capacity(sc.replicas as usize);
        for i in 0..sc.replicas {
            let engine = Engine::new(cfg.clone())?;
            let key = format!("replica-{i}");
            replicas.push(Replica {
                stats: ReplicaStats {
                    key: key.clone(),
                    num_gpu_blocks: capacity_blocks,
                    ..ReplicaStats::default()
                },
                gauges: EngineGauges {
                    num_gpu_blocks: Some(capacity_blocks),
                    ..EngineGauges::default()
                },
                key,
                engine,
                pending: None,
                spare: StepResult::default(),
                wake_at: None,
                scraped_at: 0.0,
                in_flight_at_scrape: 0,
                in_flight: 0,
                in_flight_tokens: 0,
                held: BTreeSet::new(),
                reserved_blocks: 0,
            });
        }
        let rehash = |bs: u32| -> Option<Vec<Arc<[BlockHash]>>> {
            (bs != w.block_size).then(|| {
                w.requests
                    .iter()
                    .map(|r| block_hashes(&r.prompt, bs as usize, None).into())
                    .collect()
            })
        };
        let tracks = w
            .requests
            .iter()
            .map(|r| Track {
                arrival: r.arrival_s / sc.rate_scale,
                stage: Stage::Pending,
                admitted: None,
                tokenized: None,
                routed: None,
                engine_queued: None,
                replica: None,
                reason: None,
                matched: 0,
                first_token: None,
                chunks: Vec::new(),
                finished: None,
                end: 0.0,
                status: 0,
                error: None,
                kv: None,
                reserved_blocks: 0,
                need_tokens: u64::from(r.prompt_tokens()) + u64::from(r.max_tokens),
            })
            .collect();
        let span = w.span_s() / sc.rate_scale;
        Ok(Sim {
            w,
            sc,
            router: routing::build(&sc.routing, sc.seed),
            replicas,
            tracks,
            heap: BinaryHeap::new(),
            seq: 0,
            next_arrival: 0,
            done: 0,
            admission: sc.admission.map(PoolAdmission::new),
            tickets: HashMap::new(),
            route_hashes: rehash(sc.routing.block_size()),
            engine_hashes: (cfg.enable_prefix_caching || sc.scheduler == Scheduler::Spf)
                .then(|| rehash(engine_block_size))
                .flatten(),
            engine_block_size,
            capacity_blocks,
            sample_every: (span / MAX_SAMPLES).max(0.1),
            timeline: Vec::new(),
            events: 0,
            work_events: 0,
            now: 0.0,
        })
    }

    fn push(&mut self, t: f64, kind: Kind) {
        if !matches!(kind, Kind::Scrape | Kind::Sample) {
            self.work_events += 1;
        }
        self.seq += 1;
        self.heap.push(Reverse(Event {
            t,
            seq: self.seq,
            kind,
        }));
    }

    fn busy(&self) -> bool {
        self.done < self.tracks.len()
    }

    fn run(&mut self) {
        if self.sc.scrape_interval_s > 0.0 {
            self.push(0.0, Kind::Scrape);
        }
        self.push(0.0, Kind::Sample);
        loop {
            let next_arrival = self.tracks.get(self.next_arrival).map(|t| t.arrival);
            let heap_t = self.heap.peek().map(|e| e.0.t);
            let take_heap = match (heap_t, next_arrival) {
                (Some(h), Some(a)) => h <= a,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            self.events += 1;
            if take_heap {
                let Some(Reverse(ev)) = self.heap.pop() else {
                    break;
                };
                self.now = ev.t;
                if matches!(ev.kind, Kind::Scrape | Kind::Sample) {
                    if self.stalled() {
                        self.fail_stalled();
                        break;
                    }
                } else {
                    self.work_events -= 1;
                }
                match ev.kind {
                    Kind::Dispatch(i) => self.dispatch(i),
                    Kind::StepDone(r) => self.step_done(r),
                    Kind::Wake(r) => self.on_wake(r),
                    Kind::Scrape => self.scrape(),
                    Kind::Sample => self.sample(),
                    Kind::QueueTimeout(_) => self.poll_admission(),
                }
            } else {
                let i = self.next_arrival as u32;
                self.next_arrival += 1;
                self.now = self.tracks[i as usize].arrival;
                self.arrive(i);
            }
            if !self.busy() {
                break;
            }
        }
    }

    /// Requests remain but nothing can move them: no arrival, step, dispatch or timeout is due.
    fn stalled(&self) -> bool {
        self.busy()
            && self.work_events == 0
            && self.next_arrival >= self.tracks.len()
            && self.tickets.is_empty()
    }

    /// Fails what a stall left behind rather than spinning on periodic events forever.
    fn fail_stalled(&mut self) {
        for i in 0..self.tracks.len() as u32 {
            if self.tracks[i as usize].stage == Stage::Done {
                continue;
            }
            if let Some(ri) = self.tracks[i as usize].replica {
                if let Some(f) = self.replicas[ri as usize]
                    .engine
                    .abort(u64::from(i), self.now)
                {
                    self.tracks[i as usize].finished = Some(f);
                }
                self.release(ri, i);
            }
            self.reject(i, 500, "the simulated pool stalled");
        }
    }

    fn req(&self, i: u32) -> &'w PreparedRequest {
        &self.w.requests[i as usize]
    }

    fn need_tokens(&self, i: u32) -> u64 {
        self.tracks[i as usize].need_tokens
    }

    // --- arrival and admission -------------------------------------------

    fn now_ms(&self) -> u64 {
        (self.now * 1000.0) as u64
    }

    fn arrive(&mut self, i: u32) {
        if self.admission.is_none() {
            self.admit(i);
            return;
        }
        let r = self.req(i);
        let req = AdmissionRequest {
            tenant: &r.tenant,
            priority: Priority::Standard,
            weight: 1.0,
            prompt_tokens: r.prompt_tokens(),
            cached_tokens: 0,
            max_tokens: r.max_tokens,
            ttft_slo_ms: self.sc.slo.ttft_ms.map(|ms| ms as u64),
        };
        let snapshot = self.snapshot();
        let now_ms = self.now_ms();
        let Some(adm) = self.admission.as_mut() else {
            return;
        };
        let (offer, released) = adm.offer(&req, snapshot.as_ref(), now_ms);
        let wait_s = adm.config().max_queue_wait_ms as f64 / 1000.0;
        match offer {
            Offer::Admitted(kv) => {
                self.tracks[i as usize].kv = Some(kv);
                self.admit(i);
            }
            Offer::Queued { ticket, .. } => {
                self.tickets.insert(ticket.id(), i);
                self.tracks[i as usize].stage = Stage::Queued;
                // The gate sheds on its next poll after the bound; poll just past it.
                self.push(self.now + wait_s + 0.001, Kind::QueueTimeout(i));
            }
            Offer::Shed(shed) => self.reject(i, shed.status.http_status(), &shed.message),
        }
        self.apply(released);
    }

    /// The pool's gauges as the proxy's gate sees them.
    fn snapshot(&self) -> Option<PoolSnapshot> {
        let live = self.sc.scrape_interval_s <= 0.0;
        let now_ms = self.now_ms();
        PoolSnapshot::from_gauges(self.replicas.iter().map(|r| {
            let at = if live {
                now_ms
            } else {
                (r.scraped_at * 1000.0) as u64
            };
            (self.gauges(r), at)
        }))
    }

    /// Admits and sheds what the gate decided.
    fn apply(&mut self, released: Released) {
        for (ticket, kv) in released.admitted {
            if let Some(i) = self.tickets.remove(&ticket.id()) {
                self.tracks[i as usize].kv = Some(kv);
                self.admit(i);
            } else if let Some(adm) = self.admission.as_mut() {
                adm.release(kv);
            }
        }
        for (ticket, shed) in released.shed {
            if let Some(i) = self.tickets.remove(&ticket.id()) {
                self.reject(i, shed.status.http_status(), &shed.message);
            }
        }
    }

    /// The gauges the proxy would see for `r`: the last scrape, or live when scraping is off.
    fn gauges(&self, r: &Replica) -> EngineGauges {
        if self.sc.scrape_interval_s > 0.0 {
            r.gauges
        } else {
            r.live_gauges(self.now)
        }
    }

    /// Lets the gate admit queued requests (and shed timed-out ones) now.
    fn poll_admission(&mut self) {
        if self.admission.is_none() || self.tickets.is_empty() {
            return;
        }
        let snapshot = self.snapshot();
        let now_ms = self.now_ms();
        if let Some(adm) = self.admission.as_mut() {
            let released = adm.poll(snapshot.as_ref(), now_ms);
            self.apply(released);
        }
    }

    fn admit(&mut self, i: u32) {
        let now = self.now;
        let delay = f64::from(self.req(i).prompt_tokens()) * self.sc.tokenize_s_per_token;
        let t = &mut self.tracks[i as usize];
        t.admitted = Some(now);
        t.stage = Stage::Tokenizing;
        if delay > 0.0 {
            self.push(now + delay, Kind::Dispatch(i));
        } else {
            self.dispatch(i);
        }
    }

    // --- routing and the engine queue -----------------------------------

    fn dispatch(&mut self, i: u32) {
        let now = self.now;
        self.tracks[i as usize].tokenized = Some(now);
        let r = self.req(i);
        let hashes: &[BlockHash] = match &self.route_hashes {
            Some(h) => &h[i as usize],
            None => &r.hashes,
        };
        let views: Vec<EndpointView<'_>> = self
            .replicas
            .iter()
            .map(|rep| EndpointView {
                key: &rep.key,
                load: EndpointLoad {
                    in_flight: rep.in_flight,
                    in_flight_tokens: rep.in_flight_tokens,
                    engine: Some(self.gauges(rep)),
                    in_flight_at_scrape: if self.sc.scrape_interval_s > 0.0 {
                        rep.in_flight_at_scrape
                    } else {
                        rep.in_flight
                    },
                },
            })
            .collect();
        let route = RouteRequest {
            block_hashes: hashes,
            prompt_tokens: r.prompt_tokens(),
            max_tokens: r.max_tokens,
            tenant: &r.tenant,
            class: r.class.as_deref().unwrap_or("default"),
            now_ms: (now * 1000.0) as u64,
        };
        let decision = self.router.pick(&route, &views);
        drop(views);
        let Some(d) = decision.filter(|d| d.index < self.replicas.len()) else {
            self.reject(i, 503, "no replica to route to");
            return;
        };
        let ri = d.index as u32;
        let need = self.need_tokens(i);
        let rep = &mut self.replicas[d.index];
        rep.in_flight += 1;
        rep.in_flight_tokens += need;
        rep.stats.routed += 1;
        let t = &mut self.tracks[i as usize];
        t.routed = Some(now);
        t.replica = Some(ri);
        t.reason = Some(d.reason);
        t.matched = d.matched_blocks;
        match self.sc.scheduler {
            Scheduler::Fcfs => self.enter_engine(ri, i, 0),
            Scheduler::Spf => {
                let p = self.uncached_prompt(ri, i);
                self.enter_engine(ri, i, p);
            }
            Scheduler::Edf => {
                let key = self.deadline_key(i);
                self.replicas[d.index].held.insert((key, i));
                self.tracks[i as usize].stage = Stage::Held;
                self.release_held(ri);
            }
        }
    }

    /// Prompt tokens replica `ri`'s prefix cache does not hold now (SPF's key).
    fn uncached_prompt(&self, ri: u32, i: u32) -> i32 {
        let r = self.req(i);
        let hashes: &[BlockHash] = match &self.engine_hashes {
            Some(h) => &h[i as usize],
            None => &r.hashes,
        };
        let bs = self.engine_block_size as usize;
        let max_blocks = (r.prompt.len().saturating_sub(1)) / bs;
        let pool = self.replicas[ri as usize].engine.block_pool();
        let hit = hashes
            .iter()
            .take(max_blocks)
            .take_while(|h| pool.lookup(**h).is_some())
            .count();
        i32::try_from(r.prompt.len() - hit * bs).unwrap_or(i32::MAX)
    }

    /// EDF's key: the TTFT deadline in milliseconds from the start of the run.
    fn deadline_key(&self, i: u32) -> i32 {
        let ms = (self.tracks[i as usize].arrival + self.sc.deadline_s()) * 1000.0;
        ms.clamp(0.0, f64::from(i32::MAX)) as i32
    }

    /// EDF: moves held requests into the engine, earliest deadline first,
    /// while the blocks of every admitted request's prompt and full output fit.
    fn release_held(&mut self, ri: u32) {
        let bs = u64::from(self.engine_block_size);
        loop {
            let rep = &self.replicas[ri as usize];
            let Some(&(key, i)) = rep.held.first() else {
                return;
            };
            let blocks = self.need_tokens(i).div_ceil(bs);
            let idle = rep.reserved_blocks == 0;
            if !idle && rep.reserved_blocks + blocks > self.capacity_blocks {
                return;
            }
            let rep = &mut self.replicas[ri as usize];
            rep.held.pop_first();
            rep.reserved_blocks += blocks;
            self.tracks[i as usize].reserved_blocks = blocks;
            self.enter_engine(ri, i, key);
        }
    }

    fn enter_engine(&mut self, ri: u32, i: u32, priority: i32) {
        let now = self.now;
        let r = self.req(i);
        // The engine shares the prepared prompt and its hashes instead of copying and rehashing.
        let hashes = match &self.engine_hashes {
            Some(h) => h[i as usize].clone(),
            None => r.hashes.clone(),
        };
        let req = EngineRequest {
            id: u64::from(i),
            prompt_token_ids: r.prompt.clone(),
            prompt_block_hashes: Some(hashes),
            prompt_hash: Some(r.prompt_hash),
            max_tokens: Some(r.max_tokens),
            ignore_eos: r.ignore_eos,
            priority,
            ..EngineRequest::default()
        };
        if let Err(e) = self.replicas[ri as usize].engine.add_request(req, now) {
            self.release(ri, i);
            self.reject(i, 400, &e.to_string());
            return;
        }
        let t = &mut self.tracks[i as usize];
        t.engine_queued = Some(now);
        t.stage = Stage::InEngine;
        self.kick(ri);
    }

    // --- engine steps ---------------------------------------------------

    /// Starts the replica's next step now, if it has work that is ready;
    /// otherwise wakes it when the engine says work will be ready.
    fn kick(&mut self, ri: u32) {
        let now = self.now;
        let mut empty = 0;
        loop {
            let rep = &mut self.replicas[ri as usize];
            // One step at a time: a step in flight delivers its tokens first.
            if rep.pending.is_some() {
                return;
            }
            let Some(at) = rep.engine.next_step_time() else {
                return;
            };
            if at > now {
                self.wake(ri, at);
                return;
            }
            let mut res = std::mem::take(&mut rep.spare);
            rep.engine.step_into(now, &mut res);
            rep.stats.preemptions += res.preempted.len() as u64;
            rep.stats.peak_kv_usage = rep.stats.peak_kv_usage.max(rep.engine.kv_usage());
            rep.stats.peak_waiting = rep.stats.peak_waiting.max(rep.engine.num_waiting() as u64);
            if res.duration > 0.0 || !res.tokens.is_empty() || !res.finished.is_empty() {
                rep.stats.steps += 1;
                rep.stats.busy_s += res.duration;
                rep.stats.batched_tokens += u64::from(res.num_batched_tokens);
                let end = res.end();
                rep.pending = Some(res);
                self.push(end, Kind::StepDone(ri));
                return;
            }
            rep.spare = res;
            empty += 1;
            if rep.engine.num_running() == 0 && empty == 1 {
                // The queue's head may still be in the engine's API server
                // (its frontend latency); every queued request is ready by then.
                let ready = now + rep.engine.config().frontend_latency_s;
                if ready > now {
                    self.wake(ri, ready);
                    return;
                }
            }
            if empty >= MAX_EMPTY_STEPS {
                self.unstick(ri);
                return;
            }
        }
    }

    /// Schedules a wake-up of replica `ri` at `at` unless an earlier one is pending.
    fn wake(&mut self, ri: u32, at: f64) {
        let rep = &mut self.replicas[ri as usize];
        if rep.wake_at.is_some_and(|w| w <= at) {
            return;
        }
        rep.wake_at = Some(at);
        self.push(at, Kind::Wake(ri));
    }

    fn on_wake(&mut self, ri: u32) {
        let rep = &mut self.replicas[ri as usize];
        if rep.wake_at != Some(self.now) {
            return; // superseded by an earlier wake-up
        }
        rep.wake_at = None;
        self.kick(ri);
    }

    /// A replica whose waiting requests cannot be scheduled with nothing
    /// running would wait forever: fail them, as a real engine would error.
    fn unstick(&mut self, ri: u32) {
        let now = self.now;
        let stuck: Vec<u32> = (0..self.tracks.len() as u32)
            .filter(|&i| {
                let t = &self.tracks[i as usize];
                t.replica == Some(ri)
                    && t.stage == Stage::InEngine
                    && self.replicas[ri as usize].engine.contains(u64::from(i))
            })
            .collect();
        for i in stuck {
            if let Some(f) = self.replicas[ri as usize].engine.abort(u64::from(i), now) {
                self.tracks[i as usize].finished = Some(f);
            }
            self.release(ri, i);
            self.reject(i, 500, "engine could not schedule the request");
        }
    }

    fn step_done(&mut self, ri: u32) {
        let now = self.now;
        let Some(mut res) = self.replicas[ri as usize].pending.take() else {
            return;
        };
        for mut f in res.finished.drain(..) {
            let i = f.id as u32;
            self.release(ri, i);
            let t = &mut self.tracks[i as usize];
            // The engine kept the due time of every token with text (its
            // `token_events` are off): the first is the first token, the
            // rest are the stream's chunks, in seconds since the arrival.
            let mut times = std::mem::take(&mut f.token_times);
            if let Some(&first) = times.first() {
                t.first_token = Some(first);
                times.remove(0);
                times.iter_mut().for_each(|x| *x -= t.arrival);
                t.chunks = times;
            }
            t.end = now;
            t.stage = Stage::Done;
            if f.reason == FinishReason::Abort {
                t.status = 500;
                t.error = Some("aborted by the engine".into());
            } else {
                t.status = 200;
            }
            t.finished = Some(f);
            self.done += 1;
        }
        self.replicas[ri as usize].spare = res;
        if self.sc.scheduler == Scheduler::Edf {
            self.release_held(ri);
        }
        self.kick(ri);
        self.poll_admission();
    }

    /// Gives back what request `i` held on replica `ri` (in-flight counts, EDF reservation).
    fn release(&mut self, ri: u32, i: u32) {
        let need = self.need_tokens(i);
        let rep = &mut self.replicas[ri as usize];
        rep.in_flight = rep.in_flight.saturating_sub(1);
        rep.in_flight_tokens = rep.in_flight_tokens.saturating_sub(need);
        let t = &mut self.tracks[i as usize];
        rep.reserved_blocks = rep.reserved_blocks.saturating_sub(t.reserved_blocks);
        t.reserved_blocks = 0;
        if let (Some(kv), Some(adm)) = (t.kv.take(), self.admission.as_mut()) {
            adm.release(kv);
        }
    }

    fn reject(&mut self, i: u32, status: u16, why: &str) {
        let t = &mut self.tracks[i as usize];
        if t.stage == Stage::Done {
            return;
        }
        t.stage = Stage::Done;
        t.status = status;
        t.error = Some(why.to_string());
        t.end = self.now;
        self.done += 1;
    }

    // --- periodic events --------------------------------------------------

    fn scrape(&mut self) {
        let now = self.now;
        for rep in &mut self.replicas {
            rep.gauges = rep.live_gauges(now);
            rep.scraped_at = now;
            rep.in_flight_at_scrape = rep.in_flight;
        }
        self.poll_admission();
        if self.busy() {
            self.push(self.now + self.sc.scrape_interval_s, Kind::Scrape);
        }
    }

    fn sample(&mut self) {
        let q = self.admission.as_ref().map_or(0, |a| a.queue_len() as u32);
        for (i, rep) in self.replicas.iter().enumerate() {
            self.timeline.push(Sample {
                t: self.now,
                replica: i as u32,
                kv_usage: rep.engine.kv_usage(),
                running: rep.engine.num_running() as u32,
                waiting: (rep.engine.num_waiting() + rep.held.len()) as u32,
                admission_queue: q,
            });
        }
        if self.busy() {
            self.push(self.now + self.sample_every, Kind::Sample);
        }
    }

    // --- results ----------------------------------------------------------

    fn finish(mut self) -> Outcome {
        self.sample();
        let start = self
            .tracks
            .iter()
            .map(|t| t.arrival)
            .fold(f64::INFINITY, f64::min);
        let end = self.tracks.iter().map(|t| t.end).fold(0.0, f64::max);
        let duration = if start.is_finite() {
            (end - start).max(0.0)
        } else {
            0.0
        };
        let mut replicas: Vec<ReplicaStats> = Vec::with_capacity(self.replicas.len());
        for rep in &self.replicas {
            let mut s = rep.stats.clone();
            let es = rep.engine.stats();
            s.prefix_cache_queries = es.prefix_cache_queries;
            s.prefix_cache_hits = es.prefix_cache_hits;
            s.preemptions = es.preemptions;
            s.utilization = if duration > 0.0 {
                s.busy_s / duration
            } else {
                0.0
            };
            replicas.push(s);
        }
        let frontend_latency_ms = self
            .replicas
            .first()
            .map_or(0.0, |r| r.engine.config().frontend_latency_s * 1000.0);
        // The engines are done with: free their block pools before the
        // records and the summary allocate, so that memory is reused
        // rather than fresh pages faulted in.
        let keys: Vec<String> = self.replicas.iter().map(|r| r.key.clone()).collect();
        drop(std::mem::take(&mut self.replicas));
        let policy = self.sc.routing.policy.as_str();
        let mut records = Vec::with_capacity(self.tracks.len());
        let mut lifecycle = Vec::with_capacity(self.tracks.len());
        for (idx, (t, r)) in self.tracks.drain(..).zip(&self.w.requests).enumerate() {
            let (rec, life) = to_records(idx, t, r, policy, &keys);
            records.push(rec);
            lifecycle.push(life);
        }
        let summary = summarize(&records, duration, &self.sc.slo);
        Outcome {
            label: self.sc.label(),
            records,
            lifecycle,
            replicas,
            timeline: self.timeline,
            summary,
            slo: self.sc.slo,
            duration_s: duration,
            events: self.events,
            frontend_latency_ms,
        }
    }
}

fn ms(s: f64) -> f64 {
    (s * 1e6).round() / 1e3
}

/// The load generator's record and the lifecycle record of one finished track.
fn to_records(
    idx: usize,
    t: Track,
    r: &PreparedRequest,
    policy: &'static str,
    replica_keys: &[String],
) -> (RequestRecord, LifecycleRecord) {
    let request_id = format!("sim-{idx}");
    let success = t.status == 200;
    let latency = (t.end - t.arrival).max(0.0);
    let f = t.finished.as_ref();
    let output_tokens = f.map_or(0, |f| f.completion_tokens);
    let (ttft, chunks) = if !success {
        (None, Vec::new())
    } else if r.stream {
        (
            Some(t.first_token.map_or(latency, |ft| ft - t.arrival)),
            t.chunks,
        )
    } else {
        (Some(latency), Vec::new())
    };
    let record = RequestRecord {
        id: r.id.clone(),
        tenant: r.tenant.clone(),
        class: r.class.clone(),
        prefix_group: r.prefix_group.clone(),
        stream: r.stream,
        scheduled_s: t.arrival,
        start_s: t.arrival,
        ttft_s: ttft,
        chunk_times_s: chunks,
        latency_s: latency,
        prompt_tokens: r.prompt_tokens(),
        output_tokens,
        cached_tokens: f.filter(|_| success).map(|f| f.cached_tokens),
        status: t.status,
        success,
        error: t.error.clone(),
        request_id: Some(request_id.clone()),
        arm: None,
    };
    let life = LifecycleRecord {
        request_id,
        id: r.id.clone(),
        tenant: r.tenant.clone(),
        class: r.class.clone(),
        endpoint: t
            .replica
            .and_then(|i| replica_keys.get(i as usize))
            .cloned(),
        policy,
        reason: t.reason.map(Reason::as_str),
        matched_blocks: t.reason.map(|_| t.matched),
        prompt_tokens: r.prompt_tokens(),
        cached_tokens: f.map(|f| f.cached_tokens),
        output_tokens,
        max_tokens: r.max_tokens,
        arrival_ms: ms(t.arrival),
        admitted_ms: t.admitted.map(ms),
        tokenized_ms: t.tokenized.map(ms),
        routed_ms: t.routed.map(ms),
        engine_queued_ms: t.engine_queued.map(ms),
        engine_scheduled_ms: f.and_then(|f| f.first_scheduled).map(ms),
        first_token_ms: t.first_token.map(ms),
        end_ms: ms(t.end),
        status: t.status,
        finish_reason: f.map(|f| f.reason.as_str()),
        preemptions: f.map_or(0, |f| f.num_preemptions),
        error: t.error,
    };
    (record, life)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_bench::metrics::Slo;
    use sluice_bench::workload::{Content, Segment, WorkloadRequest};
    use sluice_policies::routing::PolicyKind;

    /// `n` completion requests, one every `gap_ms`, each `prompt` tokens
    /// (the first `shared` of them common to all) and `out` output tokens.
    pub(crate) fn workload(
        n: usize,
        gap_ms: f64,
        prompt: u32,
        shared: u32,
        out: u32,
    ) -> PreparedWorkload {
        let reqs = (0..n)
            .map(|i| {
                let mut segs = Vec::new();
                if shared > 0 {
                    segs.push(Segment {
                        seed: 7,
                        tokens: shared,
                    });
                }
                segs.push(Segment {
                    seed: 1000 + i as u64,
                    tokens: prompt - shared,
                });
                WorkloadRequest {
                    id: format!("r{i}"),
                    arrival_ms: i as f64 * gap_ms,
                    tenant: "t".into(),
                    class: Some("chat".into()),
                    prefix_group: None,
                    messages: None,
                    prompt: Some(Content::Segments(segs)),
                    max_tokens: out,
                    stream: true,
                    ignore_eos: true,
                }
            })
            .collect();
        PreparedWorkload::new(reqs, 16).unwrap()
    }

    fn scenario(replicas: u32) -> Scenario {
        Scenario::resolve(replicas, "llama-3.1-8b", "h100").unwrap()
    }

    #[test]
    fn every_request_finishes_with_its_tokens() {
        let w = workload(50, 20.0, 300, 0, 20);
        let o = replay(&w, &scenario(2)).unwrap();
        assert_eq!(o.summary.completed, 50);
        assert!(
            o.records
                .iter()
                .all(|r| r.output_tokens == 20 && r.chunk_times_s.len() == 19)
        );
        assert!(
            o.records
                .iter()
                .all(|r| r.ttft_s.unwrap() > 0.0 && r.latency_s > r.ttft_s.unwrap())
        );
        assert_eq!(o.replicas.iter().map(|r| r.routed).sum::<u64>(), 50);
        // Stage timestamps are in order.
        for l in &o.lifecycle {
            let s = [
                Some(l.arrival_ms),
                l.admitted_ms,
                l.tokenized_ms,
                l.routed_ms,
                l.engine_queued_ms,
                l.engine_scheduled_ms,
                l.first_token_ms,
                Some(l.end_ms),
            ];
            let s: Vec<f64> = s.into_iter().map(Option::unwrap).collect();
            assert!(s.windows(2).all(|p| p[0] <= p[1]), "{s:?}");
        }
    }

    #[test]
    fn shared_prefixes_hit_the_cache_under_cache_aware_routing() {
        let w = workload(40, 50.0, 1200, 1024, 4);
        let rr = replay(&w, &scenario(4).with_policy(PolicyKind::RoundRobin)).unwrap();
        let ca = replay(&w, &scenario(4).with_policy(PolicyKind::CacheAware)).unwrap();
        let (a, b) = (rr.derived().prefix_hit_rate, ca.derived().prefix_hit_rate);
        assert!(b > a, "cache_aware {b} vs round_robin {a}");
        assert!(b > 0.7, "{b}");
    }

    #[test]
    fn admission_sheds_when_the_queue_times_out() {
        // A burst far beyond one small replica: with a 50 ms queue bound most are shed.
        let w = workload(200, 0.0, 500, 0, 50);
        let mut s = scenario(1);
        s.engine.num_gpu_blocks = Some(200);
        s.admission = Some(
            crate::admission::parse_admission(
                "max_kv_usage=0.5,max_engine_waiting=0,max_queue_wait_ms=50",
                16,
            )
            .unwrap(),
        );
        s.slo = Slo {
            ttft_ms: Some(1000.0),
            ..Slo::default()
        };
        let o = replay(&w, &s).unwrap();
        let d = o.derived();
        assert!(d.shed > 100, "{d:?}");
        assert_eq!(d.shed + o.summary.completed, 200);
        assert!(
            o.records
                .iter()
                .filter(|r| !r.success)
                .all(|r| r.status == 503)
        );
        // Admitted requests never saw a waiting engine queue beyond the bound at admission.
        assert!(o.replicas[0].peak_kv_usage <= 1.0);
    }

    #[test]
    fn edf_never_preempts_and_fcfs_does_on_a_tight_pool() {
        let w = workload(60, 5.0, 200, 0, 300);
        let mut s = scenario(1);
        s.engine.num_gpu_blocks = Some(300);
        let fcfs = replay(&w, &s).unwrap();
        s.scheduler = Scheduler::Edf;
        let edf = replay(&w, &s).unwrap();
        assert!(fcfs.derived().preemptions > 0);
        assert_eq!(edf.derived().preemptions, 0);
        assert_eq!(edf.summary.completed, 60);
        assert_eq!(fcfs.summary.completed, 60);
    }

    #[test]
    fn spf_runs_short_prompts_first_under_a_backlog() {
        // One long prompt per ten short ones, all at once: SPF serves the short ones sooner.
        let mut reqs = workload(40, 0.0, 100, 0, 10).source.as_ref().clone();
        for (i, r) in reqs.iter_mut().enumerate() {
            if i % 10 == 0 {
                r.prompt = Some(Content::Segments(vec![Segment {
                    seed: 99 + i as u64,
                    tokens: 6000,
                }]));
            }
        }
        let w = PreparedWorkload::new(reqs, 16).unwrap();
        let mut s = scenario(1);
        s.engine.max_num_batched_tokens = Some(2048);
        s.engine.max_num_seqs = Some(4);
        let short_ttft = |o: &Outcome| {
            let v: Vec<f64> = o
                .records
                .iter()
                .filter(|r| r.prompt_tokens < 1000)
                .map(|r| r.ttft_s.unwrap())
                .collect();
            v.iter().sum::<f64>() / v.len() as f64
        };
        let fcfs = replay(&w, &s).unwrap();
        s.scheduler = Scheduler::Spf;
        let spf = replay(&w, &s).unwrap();
        assert!(
            short_ttft(&spf) < short_ttft(&fcfs),
            "{} vs {}",
            short_ttft(&spf),
            short_ttft(&fcfs)
        );
    }

    #[test]
    fn a_prompt_longer_than_the_context_is_a_400_not_a_hang() {
        let w = workload(3, 1.0, 300, 0, 10);
        let mut s = scenario(1);
        s.engine.num_gpu_blocks = Some(10);
        let o = replay(&w, &s).unwrap();
        assert!(o.records.iter().all(|r| r.status == 400 && !r.success));
        assert!(
            o.records[0]
                .error
                .as_deref()
                .unwrap()
                .contains("maximum context length")
        );
    }
}
