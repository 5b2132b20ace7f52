//! The L1 index (spec E.2–E.8): which object lives where in the arena, in which state, who
//! holds it locked, and which object goes next when memory is needed.
//!
//! # Model
//! Every object is one slab [`Entry`] in exactly one intrusive list:
//! * **staging** — reserved by one writer (a `u64` tag), invisible to readers, write-lock TTL.
//!   Several writers may stage the same key; the first `finish_write` wins, later ones drop their
//!   copy and still succeed. Ordered by deadline (TTL is constant and refreshes move to the back).
//!   A staged object *is* its writer's lease on the range it copies into.
//! * **locked** — resident and held by at least one read lease (`readers` = the shares of every
//!   live lease on it).
//! * **LRU** — resident and unlocked, the only evictable objects. One global list (`LRU`) or
//!   one list per `cache_salt` (`IsolatedLRU`). Objects of one call enter in *reverse* key order,
//!   so a request's last chunk is evicted first and prefixes stay intact (spec E.6). Unlock
//!   returns an object to the recent end (a read is a use; LMCache leaves recency untouched).
//!
//! Because locked and staging objects are not in an LRU list, an eviction walk never skips
//! anything: eviction costs O(objects evicted + salts), never O(objects held).
//!
//! # Leases
//! Every byte range a transfer can touch is held by a lease, and nothing but the end of its
//! leases returns a range to the arena:
//! * a **write lease** is a staged object (ends by `finish_write`, `abort_write`,
//!   `abort_writer` or its write TTL);
//! * a **read lease** ([`ReadGrant`]) holds shares on a run of resident objects: a lookup's
//!   `num_kv_readers` locks, one copy out (retrieve, a prepared retrieve, an L2 write-through
//!   read). It is released by range (`release`) and ends when no share is left or at its read
//!   TTL. Releases name the lease, never a key, so a release can only ever give back what that
//!   lease took, whatever was stored under the same key since.
//!
//! Clear, delete, eviction and expiry take objects out of the index at once, so no new reader
//! finds them. An object that a lease still holds is kept as **pending**: a locked object
//! becomes an *orphan* (reachable only through its leases), a staged one is *doomed* (its writer
//! is told at `finish_write`: [`Finish::Dropped`], never admitted). Its bytes go back to the
//! arena when its last lease ends. Eviction never picks a leased object at all.
//!
//! # Accounting
//! Per-salt bytes count every allocated byte of the salt (staging included) that is still in
//! the index; pending objects are counted apart, so
//! `sum(salt bytes) + pending bytes == arena used` after every call, and no arena range is both
//! free and held, or held by two objects ([`L1Index::check_invariants`]).
//!
//! # Concurrency
//! One `parking_lot::Mutex` around [`Inner`]; every public method takes it once. The Python
//! bindings call these methods with the GIL released and nothing here calls back into Python.

use std::collections::{BTreeSet, HashMap};
use std::str::FromStr;
use std::sync::Arc;

use foldhash::fast::RandomState;
use parking_lot::Mutex;

use crate::arena::{Allocation, Arena};
use crate::clock::{secs_to_ns, Clock, MonotonicClock};
use crate::droplog::{self, DropKey, DropLog, DropReason};
use crate::error::{CoreError, CoreResult};
use crate::key::{validate_salt, ChunkHash, KeyScope};
use crate::list::{Linked, Links, List};

/// Most readers one lookup may register per key (spec E.2 clamps `num_kv_readers` to 1..=128).
pub const MAX_READERS: u32 = 128;

/// Which objects go first when memory is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictionPolicy {
    /// One recency list for everything.
    Lru,
    /// One recency list per `cache_salt`; quotas (allowlist) decide whose objects go.
    IsolatedLru,
    /// Never evicts (objects leave only by delete, clear, or TTL of staging).
    Noop,
}

impl EvictionPolicy {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Lru => "LRU",
            Self::IsolatedLru => "IsolatedLRU",
            Self::Noop => "noop",
        }
    }
}

impl FromStr for EvictionPolicy {
    type Err = CoreError;
    fn from_str(s: &str) -> CoreResult<Self> {
        match s.to_ascii_lowercase().as_str() {
            "lru" => Ok(Self::Lru),
            "isolatedlru" | "isolated_lru" => Ok(Self::IsolatedLru),
            "noop" => Ok(Self::Noop),
            _ => Err(CoreError::InvalidArgument(format!(
                "unknown eviction policy {s:?} (expected LRU, IsolatedLRU or noop)"
            ))),
        }
    }
}

/// L1 settings (spec A.3 defaults).
#[derive(Debug, Clone)]
pub struct L1Config {
    pub capacity_bytes: u64,
    pub align_bytes: u64,
    pub policy: EvictionPolicy,
    /// used/capacity at which a cycle evicts (0 < w <= 1).
    pub trigger_watermark: f64,
    /// Fraction of the bytes in use (per salt under IsolatedLRU) a triggered cycle frees.
    pub eviction_ratio: f64,
    pub write_ttl_secs: f64,
    pub read_ttl_secs: f64,
    /// Evict on the allocation path when the arena is full (LMCache only evicts on its timer).
    pub demand_eviction: bool,
    /// Chunks whose drop the index remembers for `explain` (0: none).
    pub drop_log_entries: usize,
}

impl L1Config {
    pub fn new(capacity_bytes: u64) -> Self {
        Self {
            capacity_bytes,
            align_bytes: 4096,
            policy: EvictionPolicy::Lru,
            trigger_watermark: 0.8,
            eviction_ratio: 0.2,
            write_ttl_secs: 600.0,
            read_ttl_secs: 300.0,
            demand_eviction: true,
            drop_log_entries: 65_536,
        }
    }

    pub fn validate(&self) -> CoreResult<()> {
        let bad = |m: String| Err(CoreError::InvalidArgument(m));
        if !(self.trigger_watermark > 0.0 && self.trigger_watermark <= 1.0) {
            return bad(format!("trigger_watermark must be in (0, 1], got {}", self.trigger_watermark));
        }
        if !(0.0..=1.0).contains(&self.eviction_ratio) {
            return bad(format!("eviction_ratio must be in [0, 1], got {}", self.eviction_ratio));
        }
        for (name, v) in [("write_ttl_secs", self.write_ttl_secs), ("read_ttl_secs", self.read_ttl_secs)] {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!("{name} must be a positive number of seconds, got {v}"));
            }
        }
        Ok(())
    }
}

/// What `reserve_write` did for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// Staged for this writer: copy the bytes to this range, then `finish_write`.
    Reserved(Allocation),
    /// Already resident; nothing to write.
    AlreadyResident,
    /// This writer is already staging the key (its write lock is live).
    InFlight,
    /// No space, even after demand eviction.
    OutOfMemory,
}

/// What `finish_write` did for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The staged object is now resident.
    Admitted,
    /// Another writer finished first; the staged copy was dropped. Still a success.
    AlreadyResident,
    /// Nothing staged for this writer (never reserved, aborted, or expired and reclaimed).
    NotStaged,
    /// The staged object was dropped (a forced clear) while it was written: not admitted, its
    /// range is free again now.
    Dropped,
}

/// Names a read lease; 0 is "no lease".
pub type LeaseId = u64;

/// What a read lease took: the lease (0 when nothing was taken) and, in key order, the ranges of
/// the `hit` objects it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadGrant {
    pub lease: LeaseId,
    pub hit: usize,
    pub slots: Vec<Allocation>,
}

/// What `finish_write` did: one [`Finish`] per key, and the read lease that holds the admitted
/// (or already resident) objects when a lock was asked for (0 otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteDone {
    pub finished: Vec<Finish>,
    pub lease: LeaseId,
}

/// Where a resident object's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub alloc: Allocation,
    /// Live read locks (0 when unlocked or when the lock expired).
    pub read_locks: u32,
    pub temporary: bool,
}

/// Where one chunk of a scope is, for [`L1Index::explain`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Whereabouts {
    /// In L1 (held by read leases when `locked`).
    Resident { locked: bool },
    /// Left L1 `ago_secs` ago for `reason`.
    Dropped { reason: DropReason, ago_secs: f64 },
    /// Never stored in this scope, or dropped so long ago that the drop log forgot it.
    Unknown,
}

/// Result of one eviction cycle.
#[cfg_attr(feature = "python", derive(pyo3::IntoPyObject))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CycleReport {
    pub expired_read_locks: u64,
    pub expired_staging: u64,
    pub quota_evicted_objects: u64,
    pub quota_evicted_bytes: u64,
    pub watermark_evicted_objects: u64,
    pub watermark_evicted_bytes: u64,
    /// usage was at or above the watermark when the cycle looked.
    pub triggered: bool,
    pub used_bytes: u64,
}

/// What a clear did: `objects`/`bytes` left the index now; of those, `pending_*` are still held
/// by leases of transfers in flight and return to the arena when those leases end.
#[cfg_attr(feature = "python", derive(pyo3::IntoPyObject))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClearReport {
    pub objects: u64,
    pub bytes: u64,
    pub pending_objects: u64,
    pub pending_bytes: u64,
}

/// A registered quota ([`L1Index::list_quotas`]): its limit and the bytes the salt holds in L1
/// now (staging included, as [`L1Index::salt_usage`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct QuotaInfo {
    pub cache_salt: String,
    pub limit_bytes: u64,
    pub usage_bytes: u64,
}

/// Per-salt view in a [`L1Stats`] snapshot. Counters restart when a salt holds nothing and has
/// no quota (its entry is dropped to keep memory bounded).
#[cfg_attr(feature = "python", derive(pyo3::IntoPyObject))]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaltStats {
    pub cache_salt: String,
    pub objects: u64,
    pub bytes: u64,
    pub staging_bytes: u64,
    pub quota_bytes: Option<u64>,
    pub admitted_objects: u64,
    pub admitted_bytes: u64,
    pub evicted_objects: u64,
    pub evicted_bytes: u64,
}

/// Monotonic counters since creation.
#[cfg_attr(feature = "python", derive(pyo3::IntoPyObject))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    pub reserved_objects: u64,
    pub admitted_objects: u64,
    pub admitted_bytes: u64,
    pub duplicate_writes: u64,
    pub aborted_writes: u64,
    pub allocation_failures: u64,
    pub lookups: u64,
    pub lookup_keys: u64,
    pub lookup_hit_keys: u64,
    pub read_unlocks: u64,
    pub evicted_watermark_objects: u64,
    pub evicted_watermark_bytes: u64,
    pub evicted_quota_objects: u64,
    pub evicted_quota_bytes: u64,
    pub evicted_demand_objects: u64,
    pub evicted_demand_bytes: u64,
    pub deleted_objects: u64,
    pub cleared_objects: u64,
    pub temporary_dropped: u64,
    pub expired_read_locks: u64,
    pub expired_staging: u64,
    pub eviction_cycles: u64,
    pub eviction_triggered: u64,
    /// Read leases taken (each lookup rank, copy out, locked admission).
    pub read_leases: u64,
    /// Staged writes refused at `finish_write` because a clear dropped them meanwhile.
    pub dropped_writes: u64,
    /// Pending objects whose last lease ended, returning their bytes to the arena.
    pub pending_released_objects: u64,
}

/// One consistent snapshot of the index (taken under its lock).
#[cfg_attr(feature = "python", derive(pyo3::IntoPyObject))]
#[derive(Debug, Clone, PartialEq)]
pub struct L1Stats {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub free_blocks: u64,
    pub largest_free_block: u64,
    pub usage_ratio: f64,
    pub total_objects: u64,
    pub resident_objects: u64,
    pub read_locked_objects: u64,
    pub staging_objects: u64,
    pub staging_bytes: u64,
    pub temporary_objects: u64,
    /// Live read leases.
    pub read_leases: u64,
    /// Objects out of the index whose bytes wait for their last lease to end.
    pub pending_release_objects: u64,
    pub pending_release_bytes: u64,
    pub counters: Counters,
    pub salts: Vec<SaltStats>,
}

/// One resident object of a listing ([`L1Index::list`]); `size`: its allocated bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub hash: ChunkHash,
    pub model_name: String,
    pub kv_rank: u32,
    pub object_group: u32,
    pub cache_salt: String,
    pub size: u64,
    pub locked: bool,
}

/// Where a listing resumes: the previous page's last key (hash bytes, model, kv rank, object
/// group, salt).
pub type ListCursor = (Vec<u8>, String, u32, u32, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct IKey {
    hash: ChunkHash,
    model: u32,
    kv_rank: u32,
    group: u32,
    salt: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Staging,
    Resident,
    Locked,
    /// Staged, then dropped from the index while its writer copies: still in the staging map
    /// and list (so the writer's finish/abort and the write TTL find it), never admitted.
    Doomed,
    /// Was locked, dropped from the index: reachable only through the read leases on it.
    Orphan,
}

impl State {
    fn pending(self) -> bool {
        matches!(self, Self::Doomed | Self::Orphan)
    }
}

#[derive(Debug, Clone)]
struct Entry {
    key: IKey,
    alloc: Allocation,
    state: State,
    links: Links,
    /// Write-lock deadline (staging), clock ns.
    deadline: u64,
    writer: u64,
    /// Shares of every live read lease on this object (> 0 exactly when Locked or Orphan).
    readers: u32,
    temporary: bool,
}

/// A read lease: shares still owed on each object it took, in the order it took them.
#[derive(Debug)]
struct Lease {
    deadline: u64,
    /// (entry id, shares left); an entry is never freed while a share on it is left.
    items: Vec<(u32, u32)>,
    /// Items with shares left; the lease ends at 0.
    live: usize,
}

impl Linked for Entry {
    fn links(&self) -> &Links {
        &self.links
    }
    fn links_mut(&mut self) -> &mut Links {
        &mut self.links
    }
}

#[derive(Debug, Default)]
struct SaltState {
    name: Box<str>,
    objects: u64,
    bytes: u64,
    staging_bytes: u64,
    quota: Option<u64>,
    /// Calls in progress that hold this salt's id across evictions (keeps it from being dropped).
    pins: u32,
    lru: List,
    admitted_objects: u64,
    admitted_bytes: u64,
    evicted_objects: u64,
    evicted_bytes: u64,
}

/// Name -> small id, with recycled ids; entries are dropped by their owner when unused.
#[derive(Debug)]
struct Table<T> {
    ids: HashMap<Box<str>, u32, RandomState>,
    slots: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Self { ids: HashMap::default(), slots: Vec::new(), free: Vec::new() }
    }
}

impl<T> Table<T> {
    fn find(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }
    fn get_or_insert_with(&mut self, name: &str, make: impl FnOnce() -> T) -> u32 {
        if let Some(id) = self.find(name) {
            return id;
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some(make());
                id
            }
            None => {
                self.slots.push(Some(make()));
                (self.slots.len() - 1) as u32
            }
        };
        self.ids.insert(name.into(), id);
        id
    }
    fn get(&self, id: u32) -> Option<&T> {
        self.slots.get(id as usize).and_then(Option::as_ref)
    }
    fn at(&mut self, id: u32) -> &mut T {
        self.slots[id as usize].as_mut().expect("live table id")
    }
    fn remove(&mut self, name: &str) {
        if let Some(id) = self.ids.remove(name) {
            self.slots[id as usize] = None;
            self.free.push(id);
        }
    }
    fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| s.as_ref().map(|t| (i as u32, t)))
    }
}

#[derive(Debug, Default)]
struct ModelState {
    name: Box<str>,
    refs: u64,
}

#[derive(Debug)]
struct Inner {
    policy: EvictionPolicy,
    watermark: f64,
    ratio: f64,
    write_ttl: u64,
    read_ttl: u64,
    demand_eviction: bool,
    arena: Arena,
    entries: Vec<Entry>,
    free_ids: Vec<u32>,
    resident: HashMap<IKey, u32, RandomState>,
    staging: HashMap<(IKey, u64), u32, RandomState>,
    staging_list: List,
    locked_list: List,
    global_lru: List,
    models: Table<ModelState>,
    salts: Table<SaltState>,
    temporary_objects: u64,
    leases: HashMap<LeaseId, Lease, RandomState>,
    /// (deadline, lease) of every live lease: expiry finds them from the front.
    lease_deadlines: BTreeSet<(u64, LeaseId)>,
    next_lease: LeaseId,
    doomed_objects: u64,
    orphan_objects: u64,
    pending_bytes: u64,
    droplog: DropLog,
    /// The clock when the current call took the lock (for the drop log's timestamps).
    now: u64,
    counters: Counters,
}

/// The thread-safe L1 index. See the module documentation for the model.
#[derive(Debug)]
pub struct L1Index {
    inner: Mutex<Inner>,
    clock: Arc<dyn Clock>,
    config: L1Config,
}

impl L1Index {
    pub fn new(config: L1Config) -> CoreResult<Self> {
        Self::with_clock(config, Arc::new(MonotonicClock::new()))
    }

    pub fn with_clock(config: L1Config, clock: Arc<dyn Clock>) -> CoreResult<Self> {
        config.validate()?;
        let arena = Arena::new(config.capacity_bytes, config.align_bytes)?;
        let inner = Inner {
            policy: config.policy,
            watermark: config.trigger_watermark,
            ratio: config.eviction_ratio,
            write_ttl: secs_to_ns(config.write_ttl_secs),
            read_ttl: secs_to_ns(config.read_ttl_secs),
            demand_eviction: config.demand_eviction,
            arena,
            entries: Vec::new(),
            free_ids: Vec::new(),
            resident: HashMap::default(),
            staging: HashMap::default(),
            staging_list: List::default(),
            locked_list: List::default(),
            global_lru: List::default(),
            models: Table::default(),
            salts: Table::default(),
            temporary_objects: 0,
            leases: HashMap::default(),
            lease_deadlines: BTreeSet::new(),
            next_lease: 1,
            doomed_objects: 0,
            orphan_objects: 0,
            pending_bytes: 0,
            droplog: DropLog::new(config.drop_log_entries),
            now: 0,
            counters: Counters::default(),
        };
        Ok(Self { inner: Mutex::new(inner), clock, config })
    }

    /// Takes the index lock, noting the time for what this call records.
    fn locked(&self) -> parking_lot::MutexGuard<'_, Inner> {
        let now = self.clock.now_ns();
        let mut g = self.inner.lock();
        g.now = now;
        g
    }

    pub fn config(&self) -> &L1Config {
        &self.config
    }
    /// Capacity after rounding down to the alignment.
    pub fn capacity(&self) -> u64 {
        self.locked().arena.capacity()
    }
    /// `size` rounded up to the arena alignment (what one object of that size occupies).
    pub fn object_footprint(&self, size: u64) -> CoreResult<u64> {
        self.locked().arena.rounded(size)
    }

    /// Stages `hashes` (in chunk order) for `writer`, each `size` bytes. Keys already resident
    /// or in flight for this writer are skipped. When the arena is full, demand eviction frees
    /// space by policy; what still does not fit is `OutOfMemory`: with `all_or_nothing` every
    /// key needing space fails together, otherwise the longest prefix that fits is staged and
    /// the rest fail (a later chunk without its predecessors is useless to a prefix lookup).
    pub fn reserve_write(
        &self,
        scope: &KeyScope,
        hashes: &[ChunkHash],
        size: u64,
        writer: u64,
        all_or_nothing: bool,
    ) -> CoreResult<Vec<Reserve>> {
        let now = self.clock.now_ns();
        self.locked().reserve_write(scope, hashes, size, writer, all_or_nothing, now)
    }

    /// Makes this writer's staged keys resident. With `lock_readers > 0` each admitted (or
    /// already resident) key is taken by a read lease with that many shares, in key order
    /// (never evictable in between): a new lease, or `extend` when it is not 0. `temporary`
    /// objects (L2 prefetch) are deleted when their last share goes and need `lock_readers > 0`.
    pub fn finish_write(
        &self,
        scope: &KeyScope,
        hashes: &[ChunkHash],
        writer: u64,
        lock_readers: u32,
        temporary: bool,
        extend: LeaseId,
    ) -> CoreResult<WriteDone> {
        if temporary && lock_readers == 0 {
            return Err(CoreError::InvalidArgument(
                "a temporary object must be admitted with at least one read lock".into(),
            ));
        }
        let now = self.clock.now_ns();
        self.locked().finish_write(
            scope,
            hashes,
            writer,
            lock_readers.min(MAX_READERS),
            temporary,
            extend,
            now,
        )
    }

    /// Drops this writer's staged copies of `hashes`; returns how many were dropped.
    pub fn abort_write(&self, scope: &KeyScope, hashes: &[ChunkHash], writer: u64) -> usize {
        self.locked().abort_write(scope, hashes, writer)
    }

    /// Drops every staged copy of `writer` (a dead or unregistered worker). O(staging objects).
    pub fn abort_writer(&self, writer: u64) -> usize {
        let mut g = self.locked();
        let ids: Vec<u32> =
            g.staging_list.iter(&g.entries).filter(|&id| g.entries[id as usize].writer == writer).collect();
        for &id in &ids {
            g.remove(id);
        }
        g.counters.aborted_writes += ids.len() as u64;
        ids.len()
    }

    /// Takes a read lease with `shares` shares (clamped to 128: `num_kv_readers`) on each key
    /// of the longest resident prefix of `hashes`: a new lease, or `extend` (its TTL restarts).
    /// A miss on the first key takes nothing and returns lease 0 (or `extend` unchanged).
    pub fn lease_read(
        &self,
        scope: &KeyScope,
        hashes: &[ChunkHash],
        shares: u32,
        extend: LeaseId,
    ) -> CoreResult<ReadGrant> {
        if shares == 0 {
            return Err(CoreError::InvalidArgument("num_kv_readers must be at least 1".into()));
        }
        let now = self.clock.now_ns();
        self.locked().lease_read(scope, hashes, shares.min(MAX_READERS), extend, now)
    }

    /// Length of the resident prefix, without locking or touching anything.
    pub fn peek(&self, scope: &KeyScope, hashes: &[ChunkHash]) -> usize {
        let g = self.locked();
        let Some((model, salt)) = g.find_scope(scope) else { return 0 };
        hashes.iter().take_while(|&&hash| g.resident.contains_key(&ikey(hash, scope, model, salt))).count()
    }

    /// Gives back up to `n` shares (None: all) of the lease's items `[start, end)` (positions
    /// in the order the lease took them); the lease ends when none is left. Returns the shares
    /// given back: 0 for a lease that ended already (released, expired), so releasing twice is
    /// harmless.
    pub fn release(&self, lease: LeaseId, start: usize, end: usize, n: Option<u32>) -> u64 {
        self.locked().release(lease, start, end, n)
    }

    /// Ends the lease, giving back every share it holds.
    pub fn release_all(&self, lease: LeaseId) -> u64 {
        self.release(lease, 0, usize::MAX, None)
    }

    /// Where each key's bytes are (None when not resident). Changes nothing.
    pub fn resolve(&self, scope: &KeyScope, hashes: &[ChunkHash]) -> Vec<Option<Slot>> {
        let g = self.locked();
        let Some((model, salt)) = g.find_scope(scope) else { return vec![None; hashes.len()] };
        hashes
            .iter()
            .map(|&hash| {
                g.resident.get(&ikey(hash, scope, model, salt)).map(|&id| {
                    let e = &g.entries[id as usize];
                    Slot { alloc: e.alloc, read_locks: e.readers, temporary: e.temporary }
                })
            })
            .collect()
    }

    /// Where each chunk of `hashes` is in this scope, and why it left when it did (the drop
    /// log). Changes nothing; says nothing about other scopes.
    pub fn explain(&self, scope: &KeyScope, hashes: &[ChunkHash]) -> Vec<Whereabouts> {
        let g = self.locked();
        let ids = g.find_scope(scope);
        hashes
            .iter()
            .map(|&hash| {
                let resident = ids.and_then(|(model, salt)| g.resident.get(&ikey(hash, scope, model, salt)));
                if let Some(&id) = resident {
                    return Whereabouts::Resident { locked: g.entries[id as usize].state == State::Locked };
                }
                match g.droplog.get(&droplog::key_of(scope, hash)) {
                    Some((reason, at)) => {
                        Whereabouts::Dropped { reason, ago_secs: g.now.saturating_sub(at) as f64 / 1e9 }
                    }
                    None => Whereabouts::Unknown,
                }
            })
            .collect()
    }

    /// Up to `limit` resident objects (read-locked ones included) whose key sorts after
    /// `after`, in key order (hash bytes, model, kv rank, object group, salt); with `model`,
    /// only that model's. For operator listings: O(resident objects) under the lock per call.
    pub fn list(&self, after: Option<&ListCursor>, limit: usize, model: Option<&str>) -> Vec<Listed> {
        if limit == 0 {
            return Vec::new();
        }
        let g = self.locked();
        let after = after.map(|a| (a.0.as_slice(), a.1.as_str(), a.2, a.3, a.4.as_str()));
        // (hash, model, kv rank, group, salt, entry id): sorts in key order.
        type Row<'a> = (&'a [u8], &'a str, u32, u32, &'a str, u32);
        let mut rows: Vec<Row<'_>> = g
            .resident
            .iter()
            .filter_map(|(k, &id)| {
                let m = &*g.models.get(k.model)?.name;
                if model.is_some_and(|want| want != m) {
                    return None;
                }
                let row = (k.hash.as_bytes(), m, k.kv_rank, k.group, &*g.salts.get(k.salt)?.name, id);
                after.is_none_or(|a| (row.0, row.1, row.2, row.3, row.4) > a).then_some(row)
            })
            .collect();
        if rows.len() > limit {
            rows.select_nth_unstable(limit);
            rows.truncate(limit);
        }
        rows.sort_unstable();
        rows.into_iter()
            .map(|(_, m, kv_rank, object_group, salt, id)| {
                let e = &g.entries[id as usize];
                Listed {
                    hash: e.key.hash,
                    model_name: m.to_owned(),
                    kv_rank,
                    object_group,
                    cache_salt: salt.to_owned(),
                    size: e.alloc.size,
                    locked: e.state == State::Locked,
                }
            })
            .collect()
    }

    /// Marks unlocked resident keys as recently used (first key most recent); returns count.
    pub fn touch(&self, scope: &KeyScope, hashes: &[ChunkHash]) -> usize {
        self.locked().touch(scope, hashes)
    }

    /// Deletes resident keys; read-locked ones only with `force` (their bytes stay until their
    /// leases end). Returns how many went.
    pub fn delete(&self, scope: &KeyScope, hashes: &[ChunkHash], force: bool) -> usize {
        self.locked().delete(scope, hashes, force)
    }

    /// Spec E.8. Not forced: unlocked resident objects and expired leases/staging go; live
    /// staging and read-locked objects stay. Forced: every object leaves the index; what a
    /// lease holds (a copy in or out in flight) stays pending until that lease ends, and a
    /// writer dropped this way is refused at `finish_write`.
    pub fn clear(&self, force: bool) -> ClearReport {
        let now = self.clock.now_ns();
        self.locked().clear(force, now)
    }

    /// One eviction cycle (the periodic L1 thread calls this every second): reap expired read
    /// locks and staging, trim salts over quota (IsolatedLRU), then apply watermark and ratio.
    pub fn evict_cycle(&self) -> CycleReport {
        let now = self.clock.now_ns();
        self.locked().evict_cycle(now)
    }

    /// Sets a salt's byte limit (IsolatedLRU); takes effect on the next cycle.
    pub fn set_quota(&self, cache_salt: &str, limit_bytes: u64) -> CoreResult<()> {
        validate_salt(cache_salt)?;
        let mut g = self.locked();
        let id = g.salts.get_or_insert_with(cache_salt, || new_salt(cache_salt));
        g.salts.at(id).quota = Some(limit_bytes);
        Ok(())
    }

    /// Removes a salt's quota (its limit becomes 0: allowlist). Returns whether one existed.
    pub fn remove_quota(&self, cache_salt: &str) -> bool {
        let mut g = self.locked();
        let Some(id) = g.salts.find(cache_salt) else { return false };
        let had = g.salts.at(id).quota.take().is_some();
        g.gc_salt(id);
        had
    }

    pub fn get_quota(&self, cache_salt: &str) -> Option<u64> {
        let g = self.locked();
        g.salts.find(cache_salt).and_then(|id| g.salts.get(id)).and_then(|s| s.quota)
    }

    /// Every registered quota with its salt's usage (one snapshot), sorted by salt.
    pub fn list_quotas(&self) -> Vec<QuotaInfo> {
        let g = self.locked();
        let mut out: Vec<_> = g
            .salts
            .iter()
            .filter_map(|(_, s)| {
                s.quota.map(|q| QuotaInfo {
                    cache_salt: s.name.to_string(),
                    limit_bytes: q,
                    usage_bytes: s.bytes,
                })
            })
            .collect();
        out.sort();
        out
    }

    /// Bytes a salt holds in L1 (staging included).
    pub fn salt_usage(&self, cache_salt: &str) -> u64 {
        let g = self.locked();
        g.salts.find(cache_salt).and_then(|id| g.salts.get(id)).map_or(0, |s| s.bytes)
    }

    pub fn stats(&self) -> L1Stats {
        self.locked().stats()
    }

    /// Verifies every structural invariant; panics with a description on violation.
    pub fn check_invariants(&self) {
        self.locked().check_invariants();
    }
}

fn ikey(hash: ChunkHash, scope: &KeyScope, model: u32, salt: u32) -> IKey {
    IKey { hash, model, kv_rank: scope.kv_rank(), group: scope.object_group(), salt }
}

fn new_salt(name: &str) -> SaltState {
    SaltState { name: name.into(), ..SaltState::default() }
}

impl Inner {
    fn find_scope(&self, scope: &KeyScope) -> Option<(u32, u32)> {
        Some((self.models.find(scope.model_name())?, self.salts.find(scope.cache_salt())?))
    }

    fn intern_scope(&mut self, scope: &KeyScope) -> (u32, u32) {
        let model = scope.model_name();
        let m = self.models.get_or_insert_with(model, || ModelState { name: model.into(), refs: 0 });
        let salt = scope.cache_salt();
        let s = self.salts.get_or_insert_with(salt, || new_salt(salt));
        (m, s)
    }

    fn gc_model(&mut self, id: u32) {
        if let Some(m) = self.models.get(id).filter(|m| m.refs == 0) {
            let name = m.name.clone();
            self.models.remove(&name);
        }
    }

    fn gc_salt(&mut self, id: u32) {
        if let Some(s) = self.salts.get(id).filter(|s| s.objects == 0 && s.quota.is_none() && s.pins == 0) {
            debug_assert!(s.lru.is_empty() && s.bytes == 0);
            let name = s.name.clone();
            self.salts.remove(&name);
        }
    }

    // ---- LRU lists: global or per salt, by policy ----

    fn lru_push_back(&mut self, id: u32) {
        if self.policy == EvictionPolicy::IsolatedLru {
            let salt = self.entries[id as usize].key.salt;
            let s = self.salts.slots[salt as usize].as_mut().expect("live salt");
            s.lru.push_back(&mut self.entries, id);
        } else {
            self.global_lru.push_back(&mut self.entries, id);
        }
    }

    fn lru_unlink(&mut self, id: u32) {
        if self.policy == EvictionPolicy::IsolatedLru {
            let salt = self.entries[id as usize].key.salt;
            let s = self.salts.slots[salt as usize].as_mut().expect("live salt");
            s.lru.unlink(&mut self.entries, id);
        } else {
            self.global_lru.unlink(&mut self.entries, id);
        }
    }

    fn lru_move_to_back(&mut self, id: u32) {
        self.lru_unlink(id);
        self.lru_push_back(id);
    }

    // ---- entry lifecycle ----

    fn new_entry(&mut self, e: Entry) -> u32 {
        match self.free_ids.pop() {
            Some(id) => {
                self.entries[id as usize] = e;
                id
            }
            None => {
                self.entries.push(e);
                (self.entries.len() - 1) as u32
            }
        }
    }

    /// Takes `id` (not held by a read lease) out of its list and map and returns its space.
    /// Returns the bytes freed.
    fn remove(&mut self, id: u32) -> u64 {
        let e = self.entries[id as usize].clone();
        debug_assert_eq!(e.readers, 0, "removing a leased object");
        match e.state {
            State::Staging => {
                self.staging_list.unlink(&mut self.entries, id);
                self.staging.remove(&(e.key, e.writer));
            }
            State::Resident => {
                self.lru_unlink(id);
                self.resident.remove(&e.key);
            }
            State::Locked => {
                self.locked_list.unlink(&mut self.entries, id);
                self.resident.remove(&e.key);
            }
            State::Doomed | State::Orphan => {
                self.free_pending(id);
                return e.alloc.size;
            }
            State::Free => unreachable!("removing a free slot"),
        }
        self.arena.free(e.alloc).expect("index allocation is live");
        let salt = self.salts.at(e.key.salt);
        salt.objects -= 1;
        salt.bytes -= e.alloc.size;
        if e.state == State::Staging {
            salt.staging_bytes -= e.alloc.size;
        }
        self.models.at(e.key.model).refs -= 1;
        if e.temporary && e.state != State::Staging {
            self.temporary_objects -= 1;
        }
        self.entries[id as usize].state = State::Free;
        self.free_ids.push(id);
        self.gc_salt(e.key.salt);
        self.gc_model(e.key.model);
        e.alloc.size
    }

    /// Takes `id` out of the index for `reason`. Its bytes are freed now (returned) unless a
    /// lease holds them: a locked object becomes an orphan, a staged one doomed (0 returned).
    fn drop_object(&mut self, id: u32, reason: DropReason) -> u64 {
        let salt = self.entries[id as usize].key.salt;
        let size = self.entries[id as usize].alloc.size;
        let s = self.salts.at(salt);
        s.evicted_objects += 1;
        s.evicted_bytes += size;
        let c = &mut self.counters;
        match reason {
            DropReason::Watermark => {
                c.evicted_watermark_objects += 1;
                c.evicted_watermark_bytes += size;
            }
            DropReason::Quota => {
                c.evicted_quota_objects += 1;
                c.evicted_quota_bytes += size;
            }
            DropReason::Demand => {
                c.evicted_demand_objects += 1;
                c.evicted_demand_bytes += size;
            }
            DropReason::Deleted => c.deleted_objects += 1,
            DropReason::Cleared => c.cleared_objects += 1,
            DropReason::Temporary | DropReason::WriteExpired => {}
        }
        self.record_drop(id, reason);
        match self.entries[id as usize].state {
            State::Locked => {
                self.locked_list.unlink(&mut self.entries, id);
                let key = self.entries[id as usize].key;
                self.resident.remove(&key);
                if self.entries[id as usize].temporary {
                    self.temporary_objects -= 1;
                }
                self.make_pending(id, State::Orphan);
                0
            }
            State::Staging => {
                self.make_pending(id, State::Doomed);
                0
            }
            _ => self.remove(id),
        }
    }

    /// The object's key by names, as the drop log knows it.
    fn drop_key(&self, id: u32) -> DropKey {
        let k = self.entries[id as usize].key;
        let model = self.models.get(k.model).map_or("", |m| &m.name);
        let salt = self.salts.get(k.salt).map_or("", |s| &s.name);
        (k.hash, droplog::scope_fingerprint(model, k.kv_rank, k.group, salt))
    }

    fn record_drop(&mut self, id: u32, reason: DropReason) {
        if self.droplog.capacity() > 0 {
            let key = self.drop_key(id);
            let now = self.now;
            self.droplog.record(key, reason, now);
        }
    }

    /// Moves a dropped object's bytes from its salt's account to the pending account. The salt
    /// stays pinned (and the model referenced) until the bytes are freed, so their ids are not
    /// recycled under a doomed object that is still in the staging map.
    fn make_pending(&mut self, id: u32, state: State) {
        let e = &mut self.entries[id as usize];
        let (size, was) = (e.alloc.size, e.state);
        e.state = state;
        let s = self.salts.at(e.key.salt);
        s.objects -= 1;
        s.bytes -= size;
        if was == State::Staging {
            s.staging_bytes -= size;
        }
        s.pins += 1;
        match state {
            State::Doomed => self.doomed_objects += 1,
            _ => self.orphan_objects += 1,
        }
        self.pending_bytes += size;
    }

    /// Frees a pending object whose last lease ended (an orphan's last share, a doomed
    /// object's finish, abort or write TTL).
    fn free_pending(&mut self, id: u32) {
        let e = self.entries[id as usize].clone();
        match e.state {
            State::Doomed => {
                self.staging_list.unlink(&mut self.entries, id);
                self.staging.remove(&(e.key, e.writer));
                self.doomed_objects -= 1;
            }
            State::Orphan => {
                debug_assert_eq!(e.readers, 0);
                self.orphan_objects -= 1;
            }
            other => unreachable!("freeing a {other:?} object as pending"),
        }
        self.arena.free(e.alloc).expect("pending allocation is live");
        self.pending_bytes -= e.alloc.size;
        self.counters.pending_released_objects += 1;
        self.salts.at(e.key.salt).pins -= 1;
        self.models.at(e.key.model).refs -= 1;
        self.entries[id as usize].state = State::Free;
        self.entries[id as usize].readers = 0;
        self.free_ids.push(id);
        self.gc_salt(e.key.salt);
        self.gc_model(e.key.model);
    }

    /// Adds `shares` read shares to a resident object (the caller records them in a lease).
    fn lock_entry(&mut self, id: u32, shares: u32) {
        match self.entries[id as usize].state {
            State::Resident => {
                self.lru_unlink(id);
                self.locked_list.push_back(&mut self.entries, id);
                let e = &mut self.entries[id as usize];
                e.state = State::Locked;
                e.readers = shares;
            }
            State::Locked => self.entries[id as usize].readers += shares,
            other => unreachable!("locking an object that is not resident ({other:?})"),
        }
    }

    /// Takes a locked entry whose last share went back to unlocked. A temporary object is
    /// deleted instead; otherwise returns true and the caller links it into the LRU list (in
    /// batch order).
    fn unlock_entry(&mut self, id: u32) -> bool {
        self.counters.read_unlocks += 1;
        if self.entries[id as usize].temporary {
            self.counters.temporary_dropped += 1;
            self.record_drop(id, DropReason::Temporary);
            self.remove(id);
            return false;
        }
        self.locked_list.unlink(&mut self.entries, id);
        let e = &mut self.entries[id as usize];
        e.readers = 0;
        e.state = State::Resident;
        true
    }

    /// Picks a demand-eviction victim for a write of `salt`, never one of `protect` (the
    /// call's own resident keys, moved to the recent end so they are reached last).
    fn demand_victim(&self, salt: u32, protect: &[u32]) -> Option<u32> {
        let ok = |id: &u32| !protect.contains(id);
        match self.policy {
            EvictionPolicy::Noop => None,
            EvictionPolicy::Lru => self.global_lru.head().filter(ok),
            EvictionPolicy::IsolatedLru => {
                // Salts over their quota first (unregistered salts have limit 0), then the
                // writer's own salt. A salt within its quota is never touched by others' writes.
                self.salts
                    .iter()
                    .filter(|(_, s)| s.bytes > s.quota.unwrap_or(0))
                    .find_map(|(_, s)| s.lru.head().filter(ok))
                    .or_else(|| self.salts.get(salt).and_then(|s| s.lru.head()).filter(ok))
            }
        }
    }

    fn evict_for_demand(&mut self, salt: u32, protect: &[u32]) -> bool {
        if !self.demand_eviction {
            return false;
        }
        match self.demand_victim(salt, protect) {
            Some(victim) => {
                self.drop_object(victim, DropReason::Demand);
                true
            }
            None => false,
        }
    }

    fn stage(&mut self, key: IKey, alloc: Allocation, writer: u64, now: u64) -> u32 {
        let id = self.new_entry(Entry {
            key,
            alloc,
            state: State::Staging,
            links: Links::default(),
            deadline: now.saturating_add(self.write_ttl),
            writer,
            readers: 0,
            temporary: false,
        });
        self.staging.insert((key, writer), id);
        self.staging_list.push_back(&mut self.entries, id);
        let s = self.salts.at(key.salt);
        s.objects += 1;
        s.bytes += alloc.size;
        s.staging_bytes += alloc.size;
        self.models.at(key.model).refs += 1;
        self.counters.reserved_objects += 1;
        id
    }

    fn reserve_write(
        &mut self,
        scope: &KeyScope,
        hashes: &[ChunkHash],
        size: u64,
        writer: u64,
        all_or_nothing: bool,
        now: u64,
    ) -> CoreResult<Vec<Reserve>> {
        let rounded = self.arena.rounded(size)?;
        // Expired leases and write locks end before anything is decided (they hold nothing).
        self.reap_expired(now);
        let (model, salt) = self.intern_scope(scope);
        // Demand eviction may drop the salt's or model's last object; pin both for the call.
        self.salts.at(salt).pins += 1;
        self.models.at(model).refs += 1;
        let mut out = vec![Reserve::OutOfMemory; hashes.len()];
        let mut need = Vec::with_capacity(hashes.len());
        let mut protect = Vec::new();
        for (i, &hash) in hashes.iter().enumerate() {
            let key = ikey(hash, scope, model, salt);
            if let Some(&id) = self.resident.get(&key) {
                out[i] = Reserve::AlreadyResident;
                if self.entries[id as usize].state == State::Resident {
                    protect.push(id);
                }
            } else if self.staging.contains_key(&(key, writer)) {
                // This writer's earlier copy is in flight (or was dropped and is still being
                // written: it will learn so at its finish_write).
                out[i] = Reserve::InFlight;
            } else {
                need.push((i, key));
            }
        }
        // Storing a prefix again is a use of it; it also keeps demand eviction off it.
        for &id in protect.iter().rev() {
            self.lru_move_to_back(id);
        }
        let fits_at_all = rounded <= self.arena.capacity();
        if all_or_nothing && !need.is_empty() {
            let total = rounded * need.len() as u64;
            let allocs = loop {
                if !fits_at_all || total > self.arena.capacity() {
                    break None;
                }
                if self.arena.free_bytes() >= total {
                    if let Ok(a) = self.arena.allocate_batch(&vec![rounded; need.len()]) {
                        break Some(a);
                    }
                }
                if !self.evict_for_demand(salt, &protect) {
                    break None;
                }
            };
            match allocs {
                Some(allocs) => {
                    for ((i, key), alloc) in need.iter().zip(allocs) {
                        out[*i] = self.place(*key, alloc, writer, now);
                    }
                }
                None => self.counters.allocation_failures += need.len() as u64,
            }
        } else {
            for (j, &(i, key)) in need.iter().enumerate() {
                let alloc = loop {
                    if !fits_at_all {
                        break None;
                    }
                    if let Ok(a) = self.arena.allocate(rounded) {
                        break Some(a);
                    }
                    if !self.evict_for_demand(salt, &protect) {
                        break None;
                    }
                };
                match alloc {
                    Some(alloc) => out[i] = self.place(key, alloc, writer, now),
                    None => {
                        self.counters.allocation_failures += (need.len() - j) as u64;
                        break;
                    }
                }
            }
        }
        self.salts.at(salt).pins -= 1;
        self.models.at(model).refs -= 1;
        self.gc_salt(salt);
        self.gc_model(model);
        Ok(out)
    }

    /// Stages `key` in `alloc`, unless an earlier key of the same call already did (duplicate
    /// hashes in one batch), in which case the space goes back.
    fn place(&mut self, key: IKey, alloc: Allocation, writer: u64, now: u64) -> Reserve {
        if self.staging.contains_key(&(key, writer)) {
            self.arena.free(alloc).expect("fresh allocation");
            return Reserve::InFlight;
        }
        self.stage(key, alloc, writer, now);
        Reserve::Reserved(alloc)
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_write(
        &mut self,
        scope: &KeyScope,
        hashes: &[ChunkHash],
        writer: u64,
        lock_readers: u32,
        temporary: bool,
        extend: LeaseId,
        now: u64,
    ) -> CoreResult<WriteDone> {
        self.check_lease(extend)?;
        let Some((model, salt)) = self.find_scope(scope) else {
            return Ok(WriteDone { finished: vec![Finish::NotStaged; hashes.len()], lease: extend });
        };
        let mut out = Vec::with_capacity(hashes.len());
        let mut admitted = Vec::with_capacity(hashes.len());
        let mut locked = Vec::new();
        for &hash in hashes {
            let key = ikey(hash, scope, model, salt);
            let Some(&id) = self.staging.get(&(key, writer)) else {
                out.push(Finish::NotStaged);
                continue;
            };
            if self.entries[id as usize].state == State::Doomed {
                self.free_pending(id);
                self.counters.dropped_writes += 1;
                out.push(Finish::Dropped);
                continue;
            }
            if let Some(&rid) = self.resident.get(&key) {
                self.remove(id);
                self.counters.duplicate_writes += 1;
                if lock_readers > 0 {
                    self.lock_entry(rid, lock_readers);
                    locked.push(rid);
                }
                out.push(Finish::AlreadyResident);
                continue;
            }
            self.staging.remove(&(key, writer));
            self.staging_list.unlink(&mut self.entries, id);
            let size = self.entries[id as usize].alloc.size;
            let s = self.salts.at(salt);
            s.staging_bytes -= size;
            s.admitted_objects += 1;
            s.admitted_bytes += size;
            self.counters.admitted_objects += 1;
            self.counters.admitted_bytes += size;
            self.resident.insert(key, id);
            let dk = self.drop_key(id);
            self.droplog.forget(&dk);
            let e = &mut self.entries[id as usize];
            e.state = State::Resident;
            e.temporary = temporary;
            self.temporary_objects += u64::from(temporary);
            if lock_readers > 0 {
                e.state = State::Locked;
                e.readers = lock_readers;
                self.locked_list.push_back(&mut self.entries, id);
                locked.push(id);
            } else {
                admitted.push(id);
            }
            out.push(Finish::Admitted);
        }
        for &id in admitted.iter().rev() {
            self.lru_push_back(id);
        }
        let lease = self.grant(extend, &locked, lock_readers, now);
        Ok(WriteDone { finished: out, lease })
    }

    fn abort_write(&mut self, scope: &KeyScope, hashes: &[ChunkHash], writer: u64) -> usize {
        let Some((model, salt)) = self.find_scope(scope) else { return 0 };
        let mut n = 0;
        for &hash in hashes {
            if let Some(&id) = self.staging.get(&(ikey(hash, scope, model, salt), writer)) {
                self.remove(id);
                n += 1;
            }
        }
        self.counters.aborted_writes += n as u64;
        n
    }

    fn lease_read(
        &mut self,
        scope: &KeyScope,
        hashes: &[ChunkHash],
        shares: u32,
        extend: LeaseId,
        now: u64,
    ) -> CoreResult<ReadGrant> {
        self.check_lease(extend)?;
        self.counters.lookups += 1;
        self.counters.lookup_keys += hashes.len() as u64;
        let mut ids = Vec::new();
        if let Some((model, salt)) = self.find_scope(scope) {
            for &hash in hashes {
                let Some(&id) = self.resident.get(&ikey(hash, scope, model, salt)) else { break };
                self.lock_entry(id, shares);
                ids.push(id);
            }
        }
        self.counters.lookup_hit_keys += ids.len() as u64;
        let slots = ids.iter().map(|&id| self.entries[id as usize].alloc).collect();
        let lease = self.grant(extend, &ids, shares, now);
        Ok(ReadGrant { lease, hit: ids.len(), slots })
    }

    /// Fails when `extend` names a lease that has ended (0 is "a new lease").
    fn check_lease(&self, extend: LeaseId) -> CoreResult<()> {
        if extend != 0 && !self.leases.contains_key(&extend) {
            return Err(CoreError::Inconsistent(format!(
                "read lease {extend} has ended (released or expired)"
            )));
        }
        Ok(())
    }

    /// Records `shares` on each of `ids` (already counted in their `readers`) in lease
    /// `extend`, or in a new lease when it is 0 and `ids` is not empty; returns the lease.
    fn grant(&mut self, extend: LeaseId, ids: &[u32], shares: u32, now: u64) -> LeaseId {
        if ids.is_empty() {
            return extend;
        }
        let deadline = now.saturating_add(self.read_ttl);
        let lease = if extend == 0 {
            let id = self.next_lease;
            self.next_lease += 1;
            self.counters.read_leases += 1;
            self.leases.insert(id, Lease { deadline, items: Vec::with_capacity(ids.len()), live: 0 });
            id
        } else {
            extend
        };
        let l = self.leases.get_mut(&lease).expect("checked lease");
        if extend != 0 {
            self.lease_deadlines.remove(&(l.deadline, lease));
        }
        l.deadline = deadline;
        l.items.extend(ids.iter().map(|&id| (id, shares)));
        l.live += ids.len();
        self.lease_deadlines.insert((deadline, lease));
        lease
    }

    fn release(&mut self, lease: LeaseId, start: usize, end: usize, n: Option<u32>) -> u64 {
        let Some(l) = self.leases.get_mut(&lease) else { return 0 };
        let end = end.min(l.items.len());
        let mut released = 0;
        let mut freed = Vec::new();
        for item in l.items.get_mut(start..end).unwrap_or_default() {
            let take = n.map_or(item.1, |n| n.min(item.1));
            if take == 0 {
                continue;
            }
            item.1 -= take;
            if item.1 == 0 {
                l.live -= 1;
            }
            released += u64::from(take);
            let e = &mut self.entries[item.0 as usize];
            e.readers -= take;
            if e.readers == 0 {
                freed.push(item.0);
            }
        }
        if l.live == 0 {
            let deadline = l.deadline;
            self.leases.remove(&lease);
            self.lease_deadlines.remove(&(deadline, lease));
        }
        let mut unlocked = Vec::new();
        for id in freed {
            match self.entries[id as usize].state {
                State::Orphan => self.free_pending(id),
                State::Locked => {
                    if self.unlock_entry(id) {
                        unlocked.push(id);
                    }
                }
                other => unreachable!("a leased object in state {other:?}"),
            }
        }
        for &id in unlocked.iter().rev() {
            self.lru_push_back(id);
        }
        released
    }

    fn touch(&mut self, scope: &KeyScope, hashes: &[ChunkHash]) -> usize {
        let Some((model, salt)) = self.find_scope(scope) else { return 0 };
        let ids: Vec<u32> = hashes
            .iter()
            .filter_map(|&h| self.resident.get(&ikey(h, scope, model, salt)).copied())
            .filter(|&id| self.entries[id as usize].state == State::Resident)
            .collect();
        for &id in ids.iter().rev() {
            self.lru_move_to_back(id);
        }
        ids.len()
    }

    fn delete(&mut self, scope: &KeyScope, hashes: &[ChunkHash], force: bool) -> usize {
        let Some((model, salt)) = self.find_scope(scope) else { return 0 };
        let mut n = 0;
        for &hash in hashes {
            let Some(&id) = self.resident.get(&ikey(hash, scope, model, salt)) else { continue };
            if force || self.entries[id as usize].state == State::Resident {
                self.drop_object(id, DropReason::Deleted);
                n += 1;
            }
        }
        n
    }

    /// Ends the read leases and write locks whose TTL has passed; returns how many of each.
    fn reap_expired(&mut self, now: u64) -> (u64, u64) {
        let (mut locks, mut staging) = (0, 0);
        while let Some(&(deadline, lease)) = self.lease_deadlines.first() {
            if deadline > now {
                break;
            }
            locks += 1;
            self.release(lease, 0, usize::MAX, None);
        }
        while let Some(id) = self.staging_list.head() {
            if self.entries[id as usize].deadline > now {
                break;
            }
            staging += 1;
            if self.entries[id as usize].state == State::Staging {
                self.record_drop(id, DropReason::WriteExpired);
            }
            self.remove(id);
        }
        self.counters.expired_read_locks += locks;
        self.counters.expired_staging += staging;
        (locks, staging)
    }

    fn clear(&mut self, force: bool, now: u64) -> ClearReport {
        let mut report = ClearReport::default();
        self.reap_expired(now);
        if force {
            let ids: Vec<u32> = (0..self.entries.len() as u32)
                .filter(|&id| {
                    matches!(
                        self.entries[id as usize].state,
                        State::Staging | State::Resident | State::Locked
                    )
                })
                .collect();
            for id in ids {
                let size = self.entries[id as usize].alloc.size;
                report.objects += 1;
                report.bytes += size;
                if self.drop_object(id, DropReason::Cleared) == 0 {
                    report.pending_objects += 1;
                    report.pending_bytes += size;
                }
            }
            return report;
        }
        let mut heads: Vec<u32> = Vec::new();
        loop {
            heads.clear();
            if let Some(h) = self.global_lru.head() {
                heads.push(h);
            }
            heads.extend(self.salts.iter().filter_map(|(_, s)| s.lru.head()));
            if heads.is_empty() {
                break;
            }
            for &id in &heads {
                report.objects += 1;
                report.bytes += self.drop_object(id, DropReason::Cleared);
            }
        }
        report
    }

    fn evict_cycle(&mut self, now: u64) -> CycleReport {
        let mut r = CycleReport::default();
        self.counters.eviction_cycles += 1;
        (r.expired_read_locks, r.expired_staging) = self.reap_expired(now);
        if self.policy == EvictionPolicy::IsolatedLru {
            let ids: Vec<u32> = self.salts.iter().map(|(id, _)| id).collect();
            for id in ids {
                while let Some(s) = self.salts.get(id) {
                    if s.bytes <= s.quota.unwrap_or(0) {
                        break;
                    }
                    let Some(victim) = s.lru.head() else { break };
                    r.quota_evicted_objects += 1;
                    r.quota_evicted_bytes += self.drop_object(victim, DropReason::Quota);
                }
            }
        }
        let used = self.arena.used();
        if self.policy != EvictionPolicy::Noop && used as f64 >= self.watermark * self.arena.capacity() as f64
        {
            r.triggered = true;
            self.counters.eviction_triggered += 1;
            let keep = 1.0 - self.ratio;
            match self.policy {
                EvictionPolicy::Lru => {
                    let target = (used as f64 * keep) as u64;
                    while self.arena.used() > target {
                        let Some(victim) = self.global_lru.head() else { break };
                        r.watermark_evicted_objects += 1;
                        r.watermark_evicted_bytes += self.drop_object(victim, DropReason::Watermark);
                    }
                }
                EvictionPolicy::IsolatedLru => {
                    let targets: Vec<(u32, u64)> =
                        self.salts.iter().map(|(id, s)| (id, (s.bytes as f64 * keep) as u64)).collect();
                    for (id, target) in targets {
                        while let Some(s) = self.salts.get(id) {
                            if s.bytes <= target {
                                break;
                            }
                            let Some(victim) = s.lru.head() else { break };
                            r.watermark_evicted_objects += 1;
                            r.watermark_evicted_bytes += self.drop_object(victim, DropReason::Watermark);
                        }
                    }
                }
                EvictionPolicy::Noop => {}
            }
        }
        r.used_bytes = self.arena.used();
        r
    }

    fn stats(&self) -> L1Stats {
        let a = self.arena.stats();
        let mut salts: Vec<SaltStats> = self
            .salts
            .iter()
            .map(|(_, s)| SaltStats {
                cache_salt: s.name.to_string(),
                objects: s.objects,
                bytes: s.bytes,
                staging_bytes: s.staging_bytes,
                quota_bytes: s.quota,
                admitted_objects: s.admitted_objects,
                admitted_bytes: s.admitted_bytes,
                evicted_objects: s.evicted_objects,
                evicted_bytes: s.evicted_bytes,
            })
            .collect();
        salts.sort_by(|x, y| x.cache_salt.cmp(&y.cache_salt));
        L1Stats {
            capacity_bytes: a.capacity,
            used_bytes: a.used,
            free_bytes: a.free,
            free_blocks: a.free_blocks,
            largest_free_block: a.largest_free,
            usage_ratio: a.used as f64 / a.capacity as f64,
            total_objects: (self.resident.len() + self.staging.len()) as u64 - self.doomed_objects,
            resident_objects: self.resident.len() as u64,
            read_locked_objects: self.locked_list.len() as u64,
            staging_objects: self.staging.len() as u64 - self.doomed_objects,
            staging_bytes: salts.iter().map(|s| s.staging_bytes).sum(),
            temporary_objects: self.temporary_objects,
            read_leases: self.leases.len() as u64,
            pending_release_objects: self.doomed_objects + self.orphan_objects,
            pending_release_bytes: self.pending_bytes,
            counters: self.counters,
            salts,
        }
    }

    fn check_invariants(&self) {
        self.arena.check_invariants();
        let live = self.entries.iter().filter(|e| e.state != State::Free).count();
        assert_eq!(live + self.free_ids.len(), self.entries.len(), "slab leak");
        let orphans = self.entries.iter().filter(|e| e.state == State::Orphan).count();
        assert_eq!(live, self.resident.len() + self.staging.len() + orphans, "map sizes vs live entries");
        assert_eq!(self.staging_list.len() as usize, self.staging.len(), "staging list vs map");
        let mut doomed = 0;
        for id in self.staging_list.iter(&self.entries) {
            let e = &self.entries[id as usize];
            assert!(matches!(e.state, State::Staging | State::Doomed), "staging list holds {:?}", e.state);
            doomed += u64::from(e.state == State::Doomed);
            assert_eq!(self.staging.get(&(e.key, e.writer)), Some(&id));
        }
        assert_eq!((doomed, orphans as u64), (self.doomed_objects, self.orphan_objects), "pending counts");
        for id in self.locked_list.iter(&self.entries) {
            assert_eq!(self.entries[id as usize].state, State::Locked);
        }
        let mut lru_len = self.global_lru.len() as usize;
        let mut lists = vec![self.global_lru];
        for (_, s) in self.salts.iter() {
            lru_len += s.lru.len() as usize;
            lists.push(s.lru);
        }
        for list in lists {
            for id in list.iter(&self.entries) {
                assert_eq!(self.entries[id as usize].state, State::Resident, "LRU holds a non-resident");
            }
        }
        if self.policy != EvictionPolicy::IsolatedLru {
            assert!(self.salts.iter().all(|(_, s)| s.lru.is_empty()));
        } else {
            assert!(self.global_lru.is_empty());
        }
        assert_eq!(
            lru_len + self.locked_list.len() as usize,
            self.resident.len(),
            "resident objects vs LRU + locked lists"
        );
        for (k, &id) in &self.resident {
            assert_eq!(self.entries[id as usize].key, *k);
        }
        // Leases: every share recorded in exactly one lease, only on locked or orphan objects,
        // and every lease findable by its deadline.
        let mut shares: HashMap<u32, u64> = HashMap::new();
        assert_eq!(self.leases.len(), self.lease_deadlines.len(), "leases vs deadlines");
        for (&lid, l) in &self.leases {
            assert!(self.lease_deadlines.contains(&(l.deadline, lid)), "lease {lid} has no deadline entry");
            assert_eq!(l.live, l.items.iter().filter(|i| i.1 > 0).count(), "lease {lid} live count");
            assert!(l.live > 0, "lease {lid} holds nothing and was not ended");
            for &(id, n) in l.items.iter().filter(|i| i.1 > 0) {
                *shares.entry(id).or_default() += u64::from(n);
            }
        }
        for (id, e) in self.entries.iter().enumerate() {
            let held = shares.get(&(id as u32)).copied().unwrap_or(0);
            assert_eq!(u64::from(e.readers), held, "entry {id} ({:?}) readers vs lease shares", e.state);
            match e.state {
                State::Locked | State::Orphan => {
                    assert!(e.readers > 0, "{:?} entry {id} without a lease", e.state)
                }
                _ => assert_eq!(e.readers, 0, "{:?} entry {id} with lease shares", e.state),
            }
        }
        // No range is both free and held, or held by two objects.
        let mut ranges: Vec<Allocation> =
            self.entries.iter().filter(|e| e.state != State::Free).map(|e| e.alloc).collect();
        ranges.sort_by_key(|a| a.offset);
        for w in ranges.windows(2) {
            assert!(w[0].offset + w[0].size <= w[1].offset, "objects overlap at {}", w[1].offset);
        }
        for a in &ranges {
            assert!(self.arena.is_allocated(*a), "range [{}, +{}) is held and free", a.offset, a.size);
        }
        // Per-salt and per-model accounting recomputed from the entries.
        let mut by_salt: HashMap<u32, (u64, u64, u64, u32)> = HashMap::new();
        let mut by_model: HashMap<u32, u64> = HashMap::new();
        let mut pending_bytes = 0;
        for e in self.entries.iter().filter(|e| e.state != State::Free) {
            let t = by_salt.entry(e.key.salt).or_default();
            if e.state.pending() {
                t.3 += 1;
                pending_bytes += e.alloc.size;
            } else {
                t.0 += 1;
                t.1 += e.alloc.size;
            }
            if e.state == State::Staging {
                t.2 += e.alloc.size;
            }
            *by_model.entry(e.key.model).or_default() += 1;
        }
        assert_eq!(pending_bytes, self.pending_bytes, "pending bytes");
        let mut total = 0;
        for (id, s) in self.salts.iter() {
            let (objects, bytes, staging, pins) = by_salt.get(&id).copied().unwrap_or_default();
            assert_eq!(
                (s.objects, s.bytes, s.staging_bytes, s.pins),
                (objects, bytes, staging, pins),
                "salt {:?}",
                s.name
            );
            assert!(
                s.objects > 0 || s.quota.is_some() || s.pins > 0,
                "salt {:?} should have been dropped",
                s.name
            );
            total += s.bytes;
        }
        assert_eq!(total + self.pending_bytes, self.arena.used(), "salt bytes + pending != arena used");
        for (id, m) in self.models.iter() {
            assert_eq!(m.refs, by_model.get(&id).copied().unwrap_or(0), "model {:?}", m.name);
            assert!(m.refs > 0, "model {:?} should have been dropped", m.name);
        }
    }
}

#[path = "index_adopt.rs"]
mod adopt;
pub use adopt::{AdoptItem, Adopted};

#[cfg(test)]
#[path = "index_tests.rs"]
mod tests;
