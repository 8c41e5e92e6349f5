//! An approximate, bounded index of which endpoints were sent which prefix blocks.
//!
//! Prefix-aware routing needs to know which replica probably still holds a
//! prompt's leading blocks in its KV cache. The engines do not say, so the
//! router remembers what it sent where: block hash → set of endpoints. It is
//! approximate by design (the engine evicts on its own schedule); what matters
//! is that it is cheap on the hot path and bounded in memory whatever the
//! traffic.
//!
//! Design choices, each for the hot path (a 4k-token prompt is 256 blocks, and
//! a decision plus update must stay under 10 µs):
//!
//! - **Endpoint sets are bitmasks.** Each endpoint key gets one of
//!   [`MAX_ENDPOINTS`] slots, so an entry is a `u128` and a membership test is
//!   an AND. When more endpoints than slots have been seen (DNS churn), the
//!   slot seen least recently is recycled and its bit cleared everywhere.
//! - **LRU by generations.** Entries live in a young and an old map; a lookup
//!   or an update that finds an entry in the old map moves it to the young
//!   one; when the young map fills half the capacity, the old map (everything
//!   not used for a whole generation) is dropped and the young one becomes
//!   old. That is least-recently-used eviction at the granularity of half the
//!   capacity, with O(1) work per block and no eviction scans or latency spikes.
//! - **Sampled blocks.** Only the leading 32 blocks, then 16 evenly spaced
//!   blocks per doubling of the prompt length (and a prompt's last block) are
//!   indexed: a 4k-token prompt costs 81 entries instead of 256, and match
//!   lengths stay within 1/16 of the truth. Chained hashes make this sound: a
//!   sampled block matches only if every block before it does.
//! - **Longest match by binary search.** Block hashes are chained, so an
//!   endpoint that was sent block `i` was also sent blocks `0..i`: the match
//!   length is found in O(log n) lookups per distinct match depth instead of
//!   a walk over all blocks.
//! - **Scopes.** A non-zero scope (a tenant's hash) is mixed into every key,
//!   so scoped prefixes never match another scope's.
//!
//! Endpoints absent from the caller's current slice are simply not asked
//! about; their bits age out with the entries that carry them.

use std::collections::HashMap;

use foldhash::fast::FixedState;

use crate::prefix::{BlockHash, stable_hash};
use crate::routing::{EndpointView, RouteRequest};

/// Most distinct endpoints tracked at once (bits in an entry's mask).
pub const MAX_ENDPOINTS: usize = 128;

/// An endpoint's slot in the index, valid until the next [`PrefixIndex::resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointSlot(u8);

impl EndpointSlot {
    fn bit(self) -> u128 {
        1u128 << self.0
    }
}

/// Leading blocks that are all indexed.
const DENSE: usize = 32;
/// Indexed blocks per doubling of the prompt beyond [`DENSE`].
const PER_OCTAVE: usize = 16;

/// Position of the `k`-th block of the sampling grid.
fn grid_position(k: usize) -> usize {
    if k < DENSE {
        return k;
    }
    let j = k - DENSE;
    let octave = (j / PER_OCTAVE) as u32;
    let step = (DENSE / PER_OCTAVE) << octave;
    (DENSE << octave) + (j % PER_OCTAVE) * step
}

/// The indexed positions of an `n`-block prompt: the grid below `n`, then `n - 1`.
#[derive(Debug, Clone, Copy)]
struct Samples {
    grid: usize,
    len: usize,
    last: usize,
}

impl Samples {
    fn of(n: usize) -> Samples {
        if n == 0 {
            return Samples {
                grid: 0,
                len: 0,
                last: 0,
            };
        }
        let mut grid = n.min(DENSE);
        if n > DENSE {
            let mut k = DENSE;
            // At most one octave per bit of `n`: cheap.
            while grid_position(k + PER_OCTAVE - 1) < n {
                k += PER_OCTAVE;
            }
            while grid_position(k) < n {
                k += 1;
            }
            grid = k;
        }
        let last = n - 1;
        let on_grid = grid_position(grid - 1) == last;
        Samples {
            grid,
            len: grid + usize::from(!on_grid),
            last,
        }
    }

    fn position(&self, k: usize) -> usize {
        if k < self.grid {
            grid_position(k)
        } else {
            self.last
        }
    }
}

/// An endpoint set as two words: a `u128` would align hash-table buckets to
/// 16 bytes and grow them from 24 to 32; the index is memory-bound.
type Mask = [u64; 2];

fn widen(m: Mask) -> u128 {
    (u128::from(m[1]) << 64) | u128::from(m[0])
}

fn narrow(m: u128) -> Mask {
    [m as u64, (m >> 64) as u64]
}

/// Bookkeeping for one slot.
#[derive(Debug, Clone, Copy)]
struct Slot {
    key_hash: u64,
    last_seen: u64,
}

/// Block hash → endpoints it was routed to, bounded to `capacity` blocks.
#[derive(Debug, Clone)]
pub struct PrefixIndex {
    young: HashMap<u64, Mask, FixedState>,
    old: HashMap<u64, Mask, FixedState>,
    generation: usize,
    slots: Vec<Slot>,
    slot_of: HashMap<u64, u8, FixedState>,
    clock: u64,
}

impl PrefixIndex {
    /// An empty index holding at most `capacity` blocks (at least 2); `seed`
    /// keys its hash tables.
    pub fn new(capacity: usize, seed: u64) -> Self {
        let generation = (capacity / 2).max(1);
        let state = FixedState::with_seed(seed);
        PrefixIndex {
            // Tables grow on demand: a lightly used pool should not pay for the bound.
            young: HashMap::with_hasher(state.clone()),
            old: HashMap::with_hasher(state.clone()),
            generation,
            slots: Vec::new(),
            slot_of: HashMap::with_hasher(state),
            clock: 0,
        }
    }

    /// Entries held, never more than the capacity (a block used in both
    /// generations counts twice until the old one is dropped).
    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Most blocks the index holds.
    pub fn capacity(&self) -> usize {
        self.generation * 2
    }

    /// Slots for `keys`, in order, into `out` (`None` for a key beyond
    /// [`MAX_ENDPOINTS`] in one call, which then never matches).
    pub fn resolve<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a str>,
        out: &mut Vec<Option<EndpointSlot>>,
    ) {
        self.clock += 1;
        out.clear();
        for key in keys {
            let slot = self.slot_for(stable_hash(key));
            out.push(slot);
        }
    }

    fn slot_for(&mut self, key_hash: u64) -> Option<EndpointSlot> {
        if let Some(&s) = self.slot_of.get(&key_hash) {
            self.slots[usize::from(s)].last_seen = self.clock;
            return Some(EndpointSlot(s));
        }
        if self.slots.len() < MAX_ENDPOINTS {
            let s = self.slots.len() as u8;
            self.slots.push(Slot {
                key_hash,
                last_seen: self.clock,
            });
            self.slot_of.insert(key_hash, s);
            return Some(EndpointSlot(s));
        }
        // Recycle the slot seen least recently, unless every slot is in this very call.
        let (s, oldest) = self
            .slots
            .iter()
            .enumerate()
            .min_by_key(|(_, slot)| slot.last_seen)
            .map(|(i, slot)| (i as u8, *slot))?;
        if oldest.last_seen == self.clock {
            return None;
        }
        self.slot_of.remove(&oldest.key_hash);
        let clear = !EndpointSlot(s).bit();
        for map in [&mut self.young, &mut self.old] {
            map.retain(|_, mask| {
                *mask = narrow(widen(*mask) & clear);
                *mask != [0, 0]
            });
        }
        self.slots[usize::from(s)] = Slot {
            key_hash,
            last_seen: self.clock,
        };
        self.slot_of.insert(key_hash, s);
        Some(EndpointSlot(s))
    }

    /// Endpoints remembered for one block.
    fn mask(&self, key: u64) -> u128 {
        match self.young.get(&key) {
            Some(&m) => widen(m),
            None => self.old.get(&key).map_or(0, |&m| widen(m)),
        }
    }

    /// For each of `slots`, the number of leading `blocks` believed cached
    /// there, into `out`. `scope` is 0 or a tenant's scope (see [`scope_of`]).
    pub fn match_lengths(
        &self,
        blocks: &[BlockHash],
        scope: u64,
        slots: &[Option<EndpointSlot>],
        out: &mut Vec<u32>,
    ) {
        out.clear();
        out.resize(slots.len(), 0);
        let mut remaining = slots.iter().flatten().fold(0u128, |m, s| m | s.bit());
        let samples = Samples::of(blocks.len());
        let mut hi = samples.len;
        // Each round finds the deepest sample any remaining endpoint holds;
        // those endpoints match up to it, the rest match less deep.
        while remaining != 0 && hi > 0 {
            let holds = |k: usize| self.mask(blocks[samples.position(k)] ^ scope) & remaining;
            if holds(0) == 0 {
                break;
            }
            let (mut lo, mut h) = (0, hi);
            while h - lo > 1 {
                let mid = lo + (h - lo) / 2;
                if holds(mid) != 0 {
                    lo = mid;
                } else {
                    h = mid;
                }
            }
            let found = holds(lo);
            for (i, s) in slots.iter().enumerate() {
                if let Some(s) = s
                    && found & s.bit() != 0
                {
                    out[i] = (samples.position(lo) + 1) as u32;
                }
            }
            remaining &= !found;
            hi = lo;
        }
    }

    /// Records that `blocks` were routed to `slot`.
    pub fn record(&mut self, blocks: &[BlockHash], scope: u64, slot: EndpointSlot) {
        let bit = narrow(slot.bit());
        let samples = Samples::of(blocks.len());
        let fresh = self.fresh_prefix(blocks, scope, &samples, bit);
        // If the generation turned over, the fresh prefix is now in the old
        // map: refresh it too, exactly as a full pass would have.
        if self.record_range(blocks, scope, bit, &samples, fresh..samples.len) && fresh > 0 {
            self.record_range(blocks, scope, bit, &samples, 0..fresh);
        }
    }

    /// Records samples `range` of `blocks` with `bit`, deepest first; returns
    /// whether the generation turned over meanwhile.
    fn record_range(
        &mut self,
        blocks: &[BlockHash],
        scope: u64,
        bit: Mask,
        samples: &Samples,
        range: std::ops::Range<usize>,
    ) -> bool {
        let mut rotated = false;
        // Deepest block first: if a generation turns over mid-prompt, the
        // leading blocks (which every longer match needs) land in the young map.
        for k in range.rev() {
            let key = blocks[samples.position(k)] ^ scope;
            if let Some(m) = self.young.get_mut(&key) {
                m[0] |= bit[0];
                m[1] |= bit[1];
                continue;
            }
            if self.young.len() >= self.generation {
                // The old generation has not been touched for a whole generation: drop it.
                std::mem::swap(&mut self.young, &mut self.old);
                self.young.clear();
                rotated = true;
            }
            // Copied, not moved: removing would leave tombstones that make every
            // later miss in the old map probe long chains. The stale copy goes
            // when the old generation is dropped.
            let carried = self.old.get(&key).copied().unwrap_or([0, 0]);
            self.young
                .insert(key, [carried[0] | bit[0], carried[1] | bit[1]]);
        }
        rotated
    }

    /// Number of leading samples already in the young map with `bit`, which
    /// need no update: their LRU position is already the newest generation.
    ///
    /// They form a prefix, so binary search finds it: a call that sets a bit
    /// on a sample in the young map sets it on every shallower sample too
    /// (deepest first, so a generation turning over mid-call leaves the
    /// deeper ones, not the shallower, in the old map), and promotion from
    /// the old map carries bits along. A repeated prompt thus costs a few
    /// lookups instead of one per sample, and a grown conversation pays only
    /// for its new tail.
    fn fresh_prefix(
        &self,
        blocks: &[BlockHash],
        scope: u64,
        samples: &Samples,
        bit: Mask,
    ) -> usize {
        let young_has = |k: usize| {
            self.young
                .get(&(blocks[samples.position(k)] ^ scope))
                .is_some_and(|m| (m[0] & bit[0]) | (m[1] & bit[1]) != 0)
        };
        if samples.len == 0 || !young_has(0) {
            return 0;
        }
        let (mut lo, mut hi) = (0, samples.len);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if young_has(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo + 1
    }

    /// Forgets everything (endpoint slots included).
    pub fn clear(&mut self) {
        self.young.clear();
        self.old.clear();
        self.slots.clear();
        self.slot_of.clear();
    }
}

/// The per-pick prefix matching of the policies that track prefixes
/// (`cache_aware`, `scored`): resolve the candidates to index slots, measure
/// each one's match, then record the prompt against the chosen endpoint. It
/// owns its scratch buffers, so a pick allocates nothing.
#[derive(Debug)]
pub struct PrefixMatcher {
    index: PrefixIndex,
    tenant_scoped: bool,
    slots: Vec<Option<EndpointSlot>>,
    matches: Vec<u32>,
    scope: u64,
}

impl PrefixMatcher {
    /// An empty index of `capacity` entries, hash-keyed by `seed`; with
    /// `tenant_scoped`, one tenant's prompts never match another's.
    pub fn new(capacity: usize, seed: u64, tenant_scoped: bool) -> Self {
        PrefixMatcher {
            index: PrefixIndex::new(capacity, seed),
            tenant_scoped,
            slots: Vec::new(),
            matches: Vec::new(),
            scope: 0,
        }
    }

    /// Matched leading blocks of `req`'s prompt on each of `endpoints`, in order.
    pub fn match_all(&mut self, req: &RouteRequest<'_>, endpoints: &[EndpointView<'_>]) -> &[u32] {
        self.scope = if self.tenant_scoped {
            scope_of(req.tenant)
        } else {
            0
        };
        self.index
            .resolve(endpoints.iter().map(|ep| ep.key), &mut self.slots);
        self.index
            .match_lengths(req.block_hashes, self.scope, &self.slots, &mut self.matches);
        &self.matches
    }

    /// Records `blocks` (the prompt last passed to [`Self::match_all`]) as
    /// cached on endpoint `i` of that call, and returns its match length there.
    pub fn record(&mut self, blocks: &[BlockHash], i: usize) -> u32 {
        if let Some(slot) = self.slots.get(i).copied().flatten() {
            self.index.record(blocks, self.scope, slot);
        }
        self.matches.get(i).copied().unwrap_or(0)
    }

    /// Entries in the index.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The scope value for `tenant` (mixed into keys so tenants never share entries).
pub fn scope_of(tenant: &str) -> u64 {
    // Never 0, which means "unscoped".
    super::load::mix64(stable_hash(tenant)) | 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chain(seed: u64, n: usize) -> Vec<u64> {
        (0..n as u64)
            .map(|i| super::super::load::mix64(seed * 1_000_003 + i))
            .collect()
    }

    fn slots(idx: &mut PrefixIndex, keys: &[&str]) -> Vec<Option<EndpointSlot>> {
        let mut out = Vec::new();
        idx.resolve(keys.iter().copied(), &mut out);
        out
    }

    #[test]
    fn longest_match_per_endpoint() {
        let mut idx = PrefixIndex::new(4096, 1);
        let s = slots(&mut idx, &["a", "b", "c"]);
        let p = chain(1, 64);
        idx.record(&p[..39], 0, s[0].unwrap());
        idx.record(&p[..10], 0, s[1].unwrap());
        let mut out = Vec::new();
        idx.match_lengths(&p, 0, &s, &mut out);
        assert_eq!(out, vec![39, 10, 0]);
        // Off the sampling grid the match is rounded down to a sampled block.
        idx.record(&p[..40], 0, s[2].unwrap());
        idx.match_lengths(&p, 0, &s, &mut out);
        assert_eq!(out, vec![39, 10, 39]);
        idx.match_lengths(&p[..40], 0, &s, &mut out);
        assert_eq!(out, vec![39, 10, 40]);
        idx.match_lengths(&p[..5], 0, &s, &mut out);
        assert_eq!(out, vec![5, 5, 5]);
        idx.match_lengths(&chain(2, 64), 0, &s, &mut out);
        assert_eq!(out, vec![0, 0, 0]);
        // A different scope sees nothing.
        idx.match_lengths(&p, scope_of("other"), &s, &mut out);
        assert_eq!(out, vec![0, 0, 0]);
    }

    #[test]
    fn old_generation_is_evicted_and_used_entries_survive() {
        let mut idx = PrefixIndex::new(100, 1);
        let s = slots(&mut idx, &["a"]);
        let hot = chain(0, 10);
        idx.record(&hot, 0, s[0].unwrap());
        for round in 1..50 {
            idx.record(&chain(round, 10), 0, s[0].unwrap());
            // The hot prefix is routed again now and then.
            if round % 3 == 0 {
                idx.record(&hot, 0, s[0].unwrap());
            }
            assert!(idx.len() <= idx.capacity());
        }
        let mut out = Vec::new();
        idx.match_lengths(&hot, 0, &s, &mut out);
        assert_eq!(out, vec![10]);
        idx.match_lengths(&chain(1, 10), 0, &s, &mut out);
        assert_eq!(out, vec![0], "a cold prefix was never evicted");
    }

    #[test]
    fn recycled_slots_forget_their_blocks() {
        let mut idx = PrefixIndex::new(1 << 16, 1);
        let names: Vec<String> = (0..MAX_ENDPOINTS + 1).map(|i| format!("ep{i}")).collect();
        let p = chain(9, 8);
        let first = slots(&mut idx, &[names[0].as_str()]);
        idx.record(&p, 0, first[0].unwrap());
        for n in &names[1..] {
            let s = slots(&mut idx, &[n.as_str()]);
            assert!(s[0].is_some());
        }
        // ep0's slot went to the newest endpoint, which must not inherit ep0's blocks.
        let newest = slots(&mut idx, &[names[MAX_ENDPOINTS].as_str()]);
        assert_eq!(newest[0], first[0]);
        let mut out = Vec::new();
        idx.match_lengths(&p, 0, &newest, &mut out);
        assert_eq!(out, vec![0]);
        // More endpoints in one call than slots: the extras get none.
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let all = slots(&mut idx, &refs);
        assert_eq!(all.iter().filter(|s| s.is_none()).count(), 1);
    }

    proptest! {
        // Each case compares whole maps after every step: fewer, richer cases.
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Skipping the fresh prefix is an optimisation only: the index ends
        /// up exactly as if every sample had been recorded.
        #[test]
        fn skipping_fresh_samples_changes_nothing(
            ops in proptest::collection::vec((0u64..6, 0usize..120, 0usize..4, 0u64..3), 1..120),
            cap in 64usize..600,
        ) {
            let mut fast = PrefixIndex::new(cap, 1);
            let mut full = PrefixIndex::new(cap, 1);
            let keys = ["a", "b", "c", "d"];
            let s = slots(&mut fast, &keys);
            slots(&mut full, &keys);
            for (family, len, ep, scope) in ops {
                // Prompts of a family share prefixes of every length.
                let p = chain(family, len);
                fast.record(&p, scope, s[ep].unwrap());
                let samples = Samples::of(p.len());
                full.record_range(&p, scope, narrow(s[ep].unwrap().bit()), &samples, 0..samples.len);
                prop_assert_eq!(&fast.young, &full.young);
                prop_assert_eq!(&fast.old, &full.old);
            }
        }
    }

    #[test]
    fn sampling_grid() {
        let firsts: Vec<usize> = (30..36).map(grid_position).collect();
        assert_eq!(firsts, vec![30, 31, 32, 34, 36, 38]);
        assert_eq!(grid_position(DENSE + PER_OCTAVE), 64);
        assert_eq!(grid_position(DENSE + 2 * PER_OCTAVE), 128);
        // 256 blocks: 32 dense + 3 octaves of 16 + the last block.
        assert_eq!(Samples::of(256).len, 81);
        assert_eq!(Samples::of(0).len, 0);
        assert_eq!(Samples::of(1).len, 1);
        assert_eq!(Samples::of(33).len, 33);
        assert_eq!(Samples::of(34).len, 34);
        assert_eq!(Samples::of(35).len, 34);
    }

    proptest! {
        #[test]
        fn samples_are_increasing_and_end_at_the_last_block(n in 1usize..5000) {
            let s = Samples::of(n);
            let pos: Vec<usize> = (0..s.len).map(|k| s.position(k)).collect();
            prop_assert!(pos.windows(2).all(|w| w[0] < w[1]));
            prop_assert_eq!(pos[0], 0);
            prop_assert_eq!(*pos.last().unwrap(), n - 1);
            // Gaps never exceed 1/16 of the position.
            prop_assert!(pos.windows(2).all(|w| w[1] - w[0] <= (w[0] / PER_OCTAVE).max(1)));
        }

        #[test]
        fn size_stays_bounded(
            cap in 2usize..300,
            prompts in proptest::collection::vec((0u64..50, 0usize..40, 0usize..6), 1..200),
        ) {
            let mut idx = PrefixIndex::new(cap, 3);
            let keys = ["a", "b", "c", "d", "e", "f"];
            let s = slots(&mut idx, &keys);
            for (seed, len, ep) in prompts {
                idx.record(&chain(seed, len), 0, s[ep].unwrap());
                prop_assert!(idx.len() <= idx.capacity());
                prop_assert!(idx.capacity() <= cap.max(2));
            }
        }

        #[test]
        fn a_recorded_prompt_matches_in_full(
            seeds in proptest::collection::vec(0u64..1000, 1..20),
            len in 1usize..300,
        ) {
            let mut idx = PrefixIndex::new(1 << 16, 5);
            let s = slots(&mut idx, &["a", "b"]);
            for seed in &seeds {
                idx.record(&chain(*seed, len), 0, s[0].unwrap());
            }
            let last = chain(*seeds.last().unwrap(), len);
            let mut out = Vec::new();
            idx.match_lengths(&last, 0, &s, &mut out);
            prop_assert_eq!(out, vec![len as u32, 0]);
        }
    }
}
