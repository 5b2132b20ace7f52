//! The control plane: every control operation of the engine protocol, answered on Rust
//! threads that never take the GIL (DESIGN §3–4).
//!
//! | module | what |
//! |---|---|
//! | [`sessions`] | request sessions: hash chain, lookup leases per rank, results |
//! | [`groups`] | the lookup fold over object groups (sliding-window layers) |
//! | [`workers`] | worker liveness (`ping`, the reaper) and registered layouts |
//! | [`stats`] | the one stats registry: labelled counters, request timings |
//! | [`codec`] | msgpack frames of the control operations (arguments, replies, errors) |
//! | [`server`] | the ZMQ ROUTER I/O thread, the op table, queues to Python data workers |
//!
//! [`ControlPlane`] holds the state the control operations share with the Python data path
//! (which reaches it through the bindings): the L1 index, the chain memo, sessions, workers
//! and stats. Its methods are the operations themselves, free of frames and sockets, so they
//! are tested here without ZMQ.

pub mod codec;
pub mod data;
pub mod groups;
pub mod server;
pub mod sessions;
pub mod stats;
pub mod workers;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::Mutex;

use crate::clock::Clock;
use crate::hash::{ChainMemo, MsgpackChain};
use crate::index::{L1Index, LeaseId, ReadGrant, Whereabouts, MAX_READERS};
use crate::key::{mp_kv_rank, ChunkHash, KeyScope};
use crate::wire::WireKey;
use groups::Row;
use sessions::{LookupLocks, Run, SessionRef, Sessions};
use stats::Counters;
use workers::{Layout, Workers};

/// Why a control operation failed: the code and message of its error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub code: &'static str,
    pub message: String,
}

impl OpError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

pub type OpResult<T> = Result<T, OpError>;

/// A lookup's L2 prefetch, for the Python L2 tier: load what L1 missed and call
/// [`ControlPlane::prefetch_done`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefetchJob {
    pub request_id: String,
    pub generation: u64,
    pub model_name: String,
    pub world_size: u32,
    pub cache_salt: String,
    /// The chunks L1 missed, in order (the first is chunk `hit`).
    pub hashes: Vec<ChunkHash>,
    pub hit: usize,
    pub readers: u32,
}

/// Settings of the control plane.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub chunk_size: usize,
    /// Lookups that fall short submit an L2 prefetch job.
    pub l2_prefetch: bool,
    /// Prefetch jobs waiting for the Python L2 tier at most; beyond, lookups answer their L1
    /// hit (`l2_prefetch_skipped{reason=busy}`).
    pub prefetch_queue: usize,
}

/// Something happened that a waiter may want (a prefetch completed).
pub type Notify = Arc<dyn Fn() + Send + Sync>;

/// The state control operations share with the data path.
pub struct ControlPlane {
    pub config: ControlConfig,
    pub index: Arc<L1Index>,
    pub memo: Arc<ChainMemo>,
    pub sessions: Sessions,
    pub workers: Workers,
    pub counters: Counters,
    prefetch_tx: Sender<PrefetchJob>,
    prefetch_rx: Receiver<PrefetchJob>,
    notify: Mutex<Option<Notify>>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane").field("config", &self.config).finish_non_exhaustive()
    }
}

fn bad_request(message: impl Into<String>) -> OpError {
    OpError::new("bad_request", message)
}

/// A request key's fields narrowed to the types the control plane uses.
#[derive(Debug, Clone, Copy)]
pub struct KeyView<'a> {
    pub model_name: &'a str,
    pub world_size: u32,
    pub worker_id: Option<u32>,
    pub tokens: &'a [u32],
    /// The ids' chunk hashes instead of `tokens` (a key decoded by `wire::decode_key_hashed`).
    pub hashed: Option<&'a MsgpackChain>,
    /// The msgpack bytes of the ids (for [`ChainMemo::record`]).
    pub token_span: &'a [u8],
    pub start: usize,
    pub end: usize,
    pub request_id: &'a str,
    pub cache_salt: &'a str,
    pub num_kv_readers: i128,
}

impl<'a> KeyView<'a> {
    /// Checks the ranges a key's integers must be in.
    pub fn of(k: &'a WireKey<'a>) -> OpResult<Self> {
        let world_size = u32::try_from(k.world_size)
            .ok()
            .filter(|&w| w >= 1)
            .ok_or_else(|| bad_request(format!("world_size must be >= 1, got {}", k.world_size)))?;
        let worker_id = match k.worker_id {
            None => None,
            Some(w) => Some(
                u32::try_from(w)
                    .ok()
                    .filter(|&w| w < world_size)
                    .ok_or_else(|| bad_request(format!("worker_id {w} not in [0, {world_size})")))?,
            ),
        };
        if k.start < 0 || k.end < k.start {
            return Err(bad_request(format!("bad token range [{}, {})", k.start, k.end)));
        }
        let clamp = |v: i128| usize::try_from(v).unwrap_or(usize::MAX);
        Ok(Self {
            model_name: k.model_name,
            world_size,
            worker_id,
            tokens: &k.token_ids,
            hashed: k.chain.as_ref(),
            token_span: k.token_span,
            start: clamp(k.start),
            end: clamp(k.end),
            request_id: k.request_id,
            cache_salt: k.cache_salt,
            num_kv_readers: k.num_kv_readers,
        })
    }
}

impl ControlPlane {
    pub fn new(
        config: ControlConfig,
        index: Arc<L1Index>,
        memo: Arc<ChainMemo>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let (prefetch_tx, prefetch_rx) = crossbeam_channel::bounded(config.prefetch_queue.max(1));
        Self {
            config,
            index,
            memo,
            sessions: Sessions::new(clock.clone()),
            workers: Workers::new(clock),
            counters: Counters::default(),
            prefetch_tx,
            prefetch_rx,
            notify: Mutex::new(None),
        }
    }

    /// Called after a prefetch completes (the server wakes its I/O thread to answer waits).
    pub fn set_notify(&self, notify: Notify) {
        *self.notify.lock() = Some(notify);
    }

    fn notify(&self) {
        let n = self.notify.lock().clone();
        if let Some(n) = n {
            n();
        }
    }

    pub fn prefetch_jobs(&self) -> &Receiver<PrefetchJob> {
        &self.prefetch_rx
    }

    fn chunk(&self) -> usize {
        self.config.chunk_size
    }

    pub fn scope(
        &self,
        model: &str,
        world_size: u32,
        rank: u32,
        group: u32,
        salt: &str,
    ) -> OpResult<KeyScope> {
        mp_kv_rank(world_size, rank)
            .and_then(|r| KeyScope::new(model, r, group, salt))
            .map_err(|e| OpError::new("invalid_key", e.to_string()))
    }

    fn first_chunk(&self, start: usize) -> OpResult<usize> {
        if !start.is_multiple_of(self.chunk()) {
            return Err(bad_request(format!(
                "start {start} is not a multiple of the chunk size {}",
                self.chunk()
            )));
        }
        Ok(start / self.chunk())
    }

    /// Every scope a request's keys live in (each rank, each object group of its layout).
    fn request_scopes(&self, k: &KeyView<'_>, layout: Option<&Layout>) -> OpResult<Vec<KeyScope>> {
        let groups = layout.map_or_else(|| vec![0], Layout::object_groups);
        let mut out = Vec::with_capacity(groups.len() * k.world_size as usize);
        for g in groups {
            for r in 0..k.world_size {
                out.push(self.scope(k.model_name, k.world_size, r, g, k.cache_salt)?);
            }
        }
        Ok(out)
    }

    fn prefix(&self, s: &mut sessions::Session, k: &KeyView<'_>) -> OpResult<Vec<ChunkHash>> {
        match k.hashed {
            Some(chain) => s.prefix_hashed(chain, k.end, self.chunk()),
            None => s.prefix(k.tokens, k.end, self.chunk(), &self.memo),
        }
        .map_err(|e| bad_request(e.to_string()))
    }

    fn readers(k: &KeyView<'_>) -> OpResult<u32> {
        if k.num_kv_readers < 1 {
            return Err(bad_request(
                "num_kv_readers must be >= 1 (clients older than LMCache 0.5 are not supported)",
            ));
        }
        Ok(k.num_kv_readers.min(i128::from(MAX_READERS)) as u32)
    }

    // ---- lookup ------------------------------------------------------------------------------

    /// `lookup` (spec C.6, E.3): the longest prefix every rank (and every object group of a
    /// hybrid layout) can serve from L1, read-leased with `num_kv_readers` shares per chunk for
    /// the retrieves that follow; an L2 prefetch job for the rest when L2 is configured (one
    /// full-attention group only). The result goes into the session for
    /// `query_prefetch_status`.
    pub fn lookup(&self, k: &KeyView<'_>) -> OpResult<()> {
        let readers = Self::readers(k)?;
        let layout = self.workers.layout(k.model_name, k.world_size);
        let session = self.sessions.get(k.request_id, true).expect("created");
        self.counters.add(&["lookups", k.model_name, k.cache_salt], 1);
        let mut s = session.lock();
        let s = &mut *s;
        s.drop_locks(&self.index);
        s.generation += 1;
        s.set_result(0); // what a lookup that fails from here answers (never nil)
        s.scopes = self.request_scopes(k, layout.as_deref())?;
        let hashes = self.prefix(s, k)?;
        self.counters.add(
            &["lookup_requested_tokens", k.model_name, k.cache_salt],
            (hashes.len() * self.chunk()) as u64,
        );
        let Some(layout) = layout.filter(|_| !hashes.is_empty()) else {
            let reason = if hashes.is_empty() { "empty_chunk_hashes" } else { "no_gpu_context" };
            self.counters.add(&["lookup_early_exit", k.model_name, k.cache_salt, reason], 1);
            return Ok(());
        };
        let (hit, locks, short) = self.lease_prefix(k, &layout, &s.scopes, &hashes, readers);
        s.locks = Some(locks);
        if let Some(chain) = k.hashed {
            // What L1 holds, a later lookup finds by its bytes; a new prompt is recorded by
            // its store.
            self.memo.record(k.token_span, chain, self.chunk(), hit);
        }
        self.count_hit(k.model_name, k.cache_salt, hit, "l1");
        if hit < hashes.len() {
            let reason = match &short {
                Some(scope) => match self.index.explain(scope, &hashes[hit..=hit])[0] {
                    Whereabouts::Dropped { reason, .. } => reason.as_str(),
                    _ => "never_stored",
                },
                None => "sliding_window",
            };
            self.counters.add(&["lookup_misses", k.model_name, reason], 1);
            if self.config.l2_prefetch && layout.is_plain() {
                let job = PrefetchJob {
                    request_id: k.request_id.to_owned(),
                    generation: s.generation,
                    model_name: k.model_name.to_owned(),
                    world_size: k.world_size,
                    cache_salt: k.cache_salt.to_owned(),
                    hashes: hashes[hit..].to_vec(),
                    hit,
                    readers,
                };
                s.pending = true;
                match self.prefetch_tx.try_send(job) {
                    Ok(()) => return Ok(()),
                    Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                        self.counters.add(&["l2_prefetch_skipped", k.model_name, "busy"], 1);
                    }
                }
            }
        }
        s.set_result(hit as u64);
        Ok(())
    }

    /// The longest prefix every (object group, rank) row can serve, with exactly the chunks it
    /// needs held by read leases of `readers` shares: every chunk of the prefix for full
    /// attention, the chunks of the prefix's last window for a sliding window
    /// ([`groups::lock_fold`]). Returns the prefix, its leases, and a full-attention scope
    /// whose resident prefix ends there (None when only a window falls short), for the miss's
    /// reason.
    /// `scopes`: the request's ([`Self::request_scopes`] of `layout`).
    fn lease_prefix(
        &self,
        k: &KeyView<'_>,
        layout: &Layout,
        scopes: &[KeyScope],
        hashes: &[ChunkHash],
        readers: u32,
    ) -> (usize, LookupLocks, Option<KeyScope>) {
        let world = k.world_size;
        // Group-major, ranks in order within each group (`request_scopes`).
        let groups = layout.object_groups();
        let scope = |group: u32, rank: u32| -> &KeyScope {
            let g = groups.binary_search(&group).expect("a group of the layout");
            &scopes[g * world as usize + rank as usize]
        };
        let lease = |scope: &KeyScope, hs: &[ChunkHash]| self.lease_prefix_of(scope, hs, readers);
        let mut full: Vec<(u32, &KeyScope, ReadGrant)> = Vec::new();
        // (rank, whole scope, tail scope) of each windowed row, and its row.
        let mut windowed: Vec<(u32, &KeyScope, Option<&KeyScope>)> = Vec::new();
        for g in &layout.groups {
            for r in 0..world {
                let whole = scope(g.id, r);
                if g.span == 0 {
                    // Lease its resident prefix at once: it bounds the fold.
                    let grant = lease(whole, hashes);
                    full.push((r, whole, grant));
                } else {
                    windowed.push((r, whole, g.tail_id.map(|t| scope(t, r))));
                }
            }
        }
        let bound = full.iter().map(|(_, _, g)| g.hit).min().unwrap_or(hashes.len());
        let present = |scope: &KeyScope| -> Vec<bool> {
            self.index.resolve(scope, &hashes[..bound]).iter().map(Option::is_some).collect()
        };
        let mut rows: Vec<Row> = layout
            .groups
            .iter()
            .filter(|g| g.span > 0)
            .flat_map(|g| std::iter::repeat_n(g.span, k.world_size as usize))
            .zip(&windowed)
            .map(|(span, (_, whole, tail))| {
                Row::new(span, present(whole), tail.map(present).unwrap_or_default())
            })
            .collect();
        let leases: RefCell<HashMap<(usize, bool, usize), LeaseId>> = RefCell::default();
        let (hit, taken) = if rows.is_empty() {
            (bound, Vec::new())
        } else {
            groups::lock_fold(
                bound,
                &mut rows,
                |(i, tail, lo, hi)| {
                    let (_, whole, tail_scope) = &windowed[i];
                    let scope = if tail { tail_scope.expect("tail rows have a tail scope") } else { *whole };
                    let g = lease(scope, &hashes[lo..hi]);
                    leases.borrow_mut().insert((i, tail, lo), g.lease);
                    g.hit
                },
                |(i, tail, lo, _)| {
                    if let Some(l) = leases.borrow_mut().remove(&(i, tail, lo)) {
                        self.index.release_all(l);
                    }
                },
            )
        };
        let leases = leases.into_inner();
        let mut held: Vec<(u32, Run)> = taken
            .iter()
            .map(|&(i, tail, lo, hi)| {
                (windowed[i].0, Run { lease: leases[&(i, tail, lo)], first: lo, count: hi - lo })
            })
            .collect();
        let mut short = None;
        for (r, scope, g) in full {
            if g.hit > hit {
                self.index.release(g.lease, hit, g.hit, None);
            } else if short.is_none() {
                short = Some(scope.clone());
            }
            held.push((r, Run { lease: g.lease, first: 0, count: hit }));
        }
        (hit, LookupLocks::of(held), short)
    }

    /// A read lease of `shares` (>= 1) on the resident prefix of `hashes` (none resident: lease
    /// 0, hit 0).
    fn lease_prefix_of(&self, scope: &KeyScope, hashes: &[ChunkHash], shares: u32) -> ReadGrant {
        // lease_read fails only for 0 shares.
        self.index.lease_read(scope, hashes, shares, 0).unwrap_or(ReadGrant {
            lease: 0,
            hit: 0,
            slots: vec![],
        })
    }

    fn count_hit(&self, model: &str, salt: &str, chunks: usize, tier: &str) {
        let tokens = (chunks * self.chunk()) as u64;
        self.counters.add(&["lookup_hit_tokens", model, salt], tokens);
        let name = if tier == "l1" { "lookup_hit_l1_tokens" } else { "lookup_hit_l2_tokens" };
        self.counters.add(&[name, model, salt], tokens);
    }

    /// A prefetch job's end: `loaded` chunks after the L1 hit, held by `leases` (one per
    /// rank). Installed in the session when it still waits for this generation; released
    /// otherwise. The session's result is set whatever happened: a query must never answer nil
    /// forever (spec J.7).
    pub fn prefetch_done(&self, job: &PrefetchJob, loaded: usize, leases: &[LeaseId]) -> bool {
        let loaded = loaded.min(job.hashes.len()); // never a hit beyond the lookup's range
        let release = || {
            for &l in leases {
                self.index.release_all(l);
            }
        };
        let Some(session) = self.sessions.peek(&job.request_id) else {
            release();
            return false;
        };
        let mut s = session.lock();
        let current = s.generation == job.generation;
        let installed = current && !s.closed && s.locks.is_some();
        if installed {
            s.locks.as_mut().expect("checked").extend(leases, job.hit, loaded);
            s.set_result((job.hit + loaded) as u64);
        } else {
            release();
            if current && s.pending {
                s.set_result(job.hit as u64);
            }
        }
        drop(s);
        if installed {
            self.count_hit(&job.model_name, &job.cache_salt, loaded, "l2");
        }
        self.notify();
        installed
    }

    // ---- sessions ----------------------------------------------------------------------------

    /// `query_prefetch_status`: the hit once, 0 for an unknown request, None while pending.
    pub fn query(&self, request_id: &str) -> Option<u64> {
        match self.sessions.get(request_id, false) {
            None => Some(0),
            Some(s) => s.lock().take_result(),
        }
    }

    /// For `wait_prefetch_status`: the result when it is ready now (taken), else None.
    pub fn take_if_ready(&self, request_id: &str) -> Option<Option<u64>> {
        let s = self.sessions.get(request_id, true).expect("created");
        let mut g = s.lock();
        g.is_ready().then(|| g.take_result())
    }

    /// `free_lookup_locks`: releases what the lookup still holds of `[start, end)`, every rank.
    pub fn free_lookup_locks(&self, k: &KeyView<'_>) -> OpResult<()> {
        let Some(session) = self.sessions.get(k.request_id, false) else { return Ok(()) };
        let (c0, c1) = (self.first_chunk(k.start)?, k.end / self.chunk());
        let s = session.lock();
        if let Some(locks) = &s.locks {
            locks.release(&self.index, None, c0, c1, None);
        }
        Ok(())
    }

    /// A retrieve's share of its own rank's lookup leases on chunks `[c0, c1)`.
    pub fn release_share(&self, request_id: &str, rank: u32, c0: usize, c1: usize) -> u64 {
        let Some(session) = self.sessions.peek(request_id) else { return 0 };
        let s = session.lock();
        s.locks.as_ref().map_or(0, |l| l.release(&self.index, Some(rank), c0, c1, Some(1)))
    }

    /// The hashes of the key's complete chunks up to `end` (the request's cached chain);
    /// with `record_scopes`, the request's scopes are remembered for end_session's LRU touch.
    pub fn prefix_hashes(&self, k: &KeyView<'_>, record_scopes: bool) -> OpResult<Vec<ChunkHash>> {
        let layout = if record_scopes { self.workers.layout(k.model_name, k.world_size) } else { None };
        let session = self.sessions.get(k.request_id, true).expect("created");
        let mut s = session.lock();
        let hashes = self.prefix(&mut s, k)?;
        if record_scopes {
            s.scopes = self.request_scopes(k, layout.as_deref())?;
        }
        Ok(hashes)
    }

    /// `end_session`: releases its leases and marks its chunks recently used.
    pub fn end_session(&self, request_id: &str) {
        if let Some(s) = self.sessions.pop(request_id) {
            self.close(&s, true);
        }
    }

    fn close(&self, session: &SessionRef, touch: bool) {
        let mut s = session.lock();
        s.closed = true;
        s.drop_locks(&self.index);
        if touch && !s.hashes.is_empty() {
            for scope in &s.scopes {
                self.index.touch(scope, &s.hashes);
            }
        }
    }

    /// Closes sessions idle for more than `ttl_secs`; returns how many.
    pub fn expire_sessions(&self, ttl_secs: f64) -> usize {
        let old = self.sessions.expired(ttl_secs);
        for s in &old {
            self.close(s, false);
        }
        old.len()
    }

    /// `ping`: true for the scheduler (None) and registered workers (see [`Workers::ping`]).
    pub fn ping(&self, instance: Option<i128>) -> bool {
        match instance {
            None => true,
            Some(i) => u64::try_from(i).is_ok_and(|i| self.workers.ping(i)),
        }
    }
}

#[cfg(test)]
mod tests;
