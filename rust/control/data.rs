//! The data operations' crossings into Rust: one call where a store or retrieve starts and
//! one where it ends, with the torch copies (Python) in between.
//!
//! A retrieve is [`ControlPlane::read_start`] (worker liveness, the key's chunk hashes, the
//! `retrieves_submitted` count and a read lease per item of the read plan, sliding-window
//! tails included) → copies → [`ControlPlane::read_finish`] (leases and the lookup's share
//! given back, the counters). A store is [`ControlPlane::store_start`] (liveness, hashes,
//! `stores_submitted`, a write reservation per batch of the store plan) → copies →
//! [`ControlPlane::store_finish`] (admission, counters) or [`ControlPlane::store_abort`].
//! The engine-driven prepare/commit operations use the same pairs, the commit ending what the
//! prepare started. Each start/finish pair owns its leases and reservations: finishing twice
//! gives nothing back twice.

use crate::index::{Finish, LeaseId, Reserve};
use crate::key::{ChunkHash, KeyScope};

use super::workers::GroupSpec;
use super::{bad_request, ControlPlane, KeyView, OpError, OpResult};

/// One read of a retrieve's plan: chunks `[first, first + count)` of object group `group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRead {
    pub group: u32,
    pub first: usize,
    pub count: usize,
    /// The window's first chunk of a group with tail objects: a whole object or, when none is
    /// resident, the tail object serves it.
    pub first_of_window: bool,
}

/// What a retrieve of chunks `[c0, c1)` (a prefix of `c1` chunks) reads from each group:
/// every chunk for full attention; for a window, only the chunks it covers, and of the first
/// of them only the tail (what the retrieve writes of each: `engine/groups.py` `first_rows`).
pub fn read_plan(groups: &[GroupSpec], c0: usize, c1: usize) -> Vec<PlannedRead> {
    let mut out = Vec::new();
    for g in groups {
        let read = |first: usize, count: usize, first_of_window: bool| PlannedRead {
            group: g.id,
            first,
            count,
            first_of_window,
        };
        if g.span == 0 {
            if c1 > c0 {
                out.push(read(c0, c1 - c0, false));
            }
            continue;
        }
        let first = c1 as i64 - g.span as i64;
        let mut lo = (c0 as i64).max(first).max(0);
        if lo == first && g.tail_id.is_some() {
            out.push(read(first as usize, 1, true));
            lo += 1;
        }
        if lo < c1 as i64 {
            out.push(read(lo as usize, c1 - lo as usize, false));
        }
    }
    out
}

/// One leased read of a retrieve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedRead {
    pub read: PlannedRead,
    /// Served by the group's tail objects (its whole object is not resident).
    pub tail: bool,
    pub lease: LeaseId,
    /// Chunks of the read resident and leased (a prefix); `< read.count` ends the plan.
    pub hit: usize,
    pub offsets: Vec<u64>,
    pub sizes: Vec<u64>,
}

/// The request fields the end of a data operation needs.
#[derive(Debug, Clone, Default)]
pub struct OpKey {
    pub request_id: String,
    pub model_name: String,
    pub cache_salt: String,
    pub worker_id: Option<u32>,
    /// The worker's device label of the `*_submitted`/`*_finished` counters.
    pub device: String,
}

impl OpKey {
    fn of(k: &KeyView<'_>, device: &str) -> Self {
        Self {
            request_id: k.request_id.to_owned(),
            model_name: k.model_name.to_owned(),
            cache_salt: k.cache_salt.to_owned(),
            worker_id: k.worker_id,
            device: device.to_owned(),
        }
    }

    /// The worker id as Python prints it (`str(key.worker_id)`), a counter label.
    fn worker_label(&self) -> String {
        self.worker_id.map_or_else(|| "None".to_owned(), |w| w.to_string())
    }
}

/// A retrieve between its start and its end.
#[derive(Debug, Clone, Default)]
pub struct ReadStart {
    pub key: OpKey,
    /// The range's first chunk and its chunks.
    pub c0: usize,
    pub n: usize,
    /// The plan's reads leased so far, in plan order; only the last may be short.
    pub reads: Vec<LeasedRead>,
    /// What is still held: the read leases, and this rank's share of the lookup's leases.
    pub leases_held: bool,
    pub share_held: bool,
}

impl ReadStart {
    /// The first read that fell short, if any.
    pub fn short(&self) -> Option<&LeasedRead> {
        self.reads.iter().find(|r| r.hit < r.read.count)
    }
}

/// How a retrieve ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadEnd {
    /// Copied: leases and share given back, the read counted.
    Done,
    /// An engine-driven prepare: only the share is given back; the leases last until the
    /// commit (`Done`).
    Prepared,
    /// Failed before any copy (`corrupt` chunks failed checksum verification, else `missing`
    /// were no longer in L1) or raised while copying (both 0).
    Failed { corrupt: usize, missing: usize },
}

/// Why a store's chunks were not all stored, and what to journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedBatch {
    pub scope: KeyScope,
    pub object_group: u32,
    pub nbytes: u64,
    /// The batch's chunks (relative to the range's first) that got a reservation, and theirs.
    pub chunks: Vec<usize>,
    pub hashes: Vec<ChunkHash>,
    pub offsets: Vec<u64>,
    pub sizes: Vec<u64>,
}

/// One batch of a store plan: chunks (relative to the range's first chunk) stored as objects
/// of `nbytes` of `object_group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedWrite {
    pub object_group: u32,
    pub chunks: Vec<usize>,
    pub nbytes: u64,
}

/// Which data operation a store is: the counters differ (spec D.1 store, D.3 prepare_store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    /// `store`: `stores_submitted` before anything is checked; an empty range finishes.
    Lmcache,
    /// `prepare_store`: an empty range counts nothing; `stores_submitted` once there is work;
    /// L1 allocation failures are counted at the prepare.
    Engine,
}

/// A store between its start and its end.
#[derive(Debug, Clone)]
pub struct StoreStart {
    pub key: OpKey,
    pub mode: StoreMode,
    pub instance: u64,
    pub c0: usize,
    /// The chunk hashes of the range (its complete chunks).
    pub hashes: Vec<ChunkHash>,
    pub batches: Vec<StagedBatch>,
    /// Chunk objects the plan asked for (within the range), and how many found L1 full.
    pub want: usize,
    pub oom: usize,
    /// Reservations still staged (neither finished nor aborted).
    pub staged: bool,
}

impl StoreStart {
    pub fn n(&self) -> usize {
        self.hashes.len()
    }

    pub fn reserved(&self) -> usize {
        self.batches.iter().map(|b| b.chunks.len()).sum()
    }
}

/// What a store's end did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreDone {
    /// Per batch, the hashes admitted.
    pub admitted: Vec<Vec<ChunkHash>>,
    /// Reservations that expired before the end (`not_staged`), and dropped by a clear.
    pub expired: usize,
    pub dropped: usize,
}

impl StoreDone {
    pub fn admitted_count(&self) -> usize {
        self.admitted.iter().map(Vec::len).sum()
    }
}

impl ControlPlane {
    /// The start of `retrieve` and `prepare_retrieve`: refreshes the worker's liveness, hashes
    /// the key's range `[start, end)` (not_found when its tokens give fewer complete chunks,
    /// the share of the lookup's leases given back first), then, unless `refuse` (an error
    /// after those checks, the share given back) or `lease` is false, counts
    /// `retrieves_submitted` and leases the reads of `groups`' plan (one share per chunk),
    /// stopping at the first read that falls short. A registered worker's check is Python's:
    /// `instance` is the worker it found.
    pub fn read_start(
        &self,
        k: &KeyView<'_>,
        instance: u64,
        device: &str,
        groups: &[GroupSpec],
        refuse: Option<OpError>,
        lease: bool,
    ) -> OpResult<ReadStart> {
        self.workers.touch(instance, false);
        let c0 = self.first_chunk(k.start)?;
        let all = self.prefix_hashes(k, false)?;
        let hashes = all.get(c0..).unwrap_or_default();
        let want = k.end.saturating_sub(k.start) / self.chunk();
        let mut s = ReadStart {
            key: OpKey::of(k, device),
            c0,
            n: hashes.len(),
            reads: Vec::new(),
            leases_held: false,
            share_held: true,
        };
        if hashes.len() < want {
            self.give_share(&mut s);
            return Err(OpError::new(
                "not_found",
                format!(
                    "[{}, {}) holds {want} complete chunk(s); the request's tokens give {}",
                    k.start,
                    k.end,
                    hashes.len()
                ),
            ));
        }
        if let Some(e) = refuse {
            self.give_share(&mut s);
            return Err(e);
        }
        self.counters.add(&["retrieves_submitted", device], 1);
        if !lease || hashes.is_empty() {
            return Ok(s);
        }
        s.leases_held = true;
        let rank = k.worker_id.unwrap_or(0);
        for read in read_plan(groups, c0, c0 + s.n) {
            let hs = &hashes[read.first - c0..read.first - c0 + read.count];
            // The group's scope, or its tail objects' when the window's first chunk has no
            // whole object resident.
            let pick = || -> OpResult<(KeyScope, bool)> {
                let scoped = |g: u32| self.scope(k.model_name, k.world_size, rank, g, k.cache_salt);
                let whole = scoped(read.group)?;
                match tail_of(groups, read.group).filter(|_| read.first_of_window) {
                    Some(t) if self.index.peek(&whole, hs) == 0 => Ok((scoped(t)?, true)),
                    _ => Ok((whole, false)),
                }
            };
            let (scope, tail) = match pick() {
                Ok(picked) => picked,
                Err(e) => {
                    self.read_finish(&mut s, ReadEnd::Failed { corrupt: 0, missing: 0 });
                    return Err(e);
                }
            };
            let g = self.lease_prefix_of(&scope, hs, 1);
            let short = g.hit < read.count;
            s.reads.push(LeasedRead {
                read,
                tail,
                lease: g.lease,
                hit: g.hit,
                offsets: g.slots.iter().map(|a| a.offset).collect(),
                sizes: g.slots.iter().map(|a| a.size).collect(),
            });
            if short {
                break;
            }
        }
        Ok(s)
    }

    fn give_share(&self, s: &mut ReadStart) {
        if std::mem::take(&mut s.share_held) {
            if let Some(rank) = s.key.worker_id {
                self.release_share(&s.key.request_id, rank, s.c0, s.c0 + s.n);
            }
        }
    }

    /// The end of a retrieve (see [`ReadEnd`]); `retrieves_finished` is counted by every end
    /// but `Prepared`. What was given back already is not given back again.
    pub fn read_finish(&self, s: &mut ReadStart, end: ReadEnd) {
        if end != ReadEnd::Prepared && std::mem::take(&mut s.leases_held) {
            for r in &s.reads {
                self.index.release_all(r.lease);
            }
        }
        self.give_share(s);
        let k = &s.key;
        match end {
            ReadEnd::Prepared => return,
            ReadEnd::Done => {
                let n = s.n as u64;
                self.counters.add(&["l1_read_chunks", &k.cache_salt], n);
                let w = k.worker_label();
                self.counters.add(&["num_chunks_loaded", &w, &k.model_name, &k.cache_salt], n);
            }
            ReadEnd::Failed { corrupt, missing } => {
                if corrupt > 0 {
                    self.counters.add(&["l1_checksum_mismatch_chunks", &k.model_name], corrupt as u64);
                } else if missing > 0 {
                    let labels = ["l1_read_failure_chunks", "retrieve", "not_found", &k.model_name];
                    self.counters.add(&labels, missing as u64);
                }
            }
        }
        self.counters.add(&["retrieves_finished", &k.device], 1);
    }

    /// The start of `store` and `prepare_store`: refreshes the worker's liveness, hashes the
    /// key's range (recording the request's scopes for end_session's LRU touch), counts as
    /// `mode` says, and reserves the chunks of `plan` (planned for the whole range; chunks
    /// beyond its complete ones are left out) for `instance`. `refuse` fails the store after
    /// the range is known to be non-empty; with no `plan` nothing is reserved (the caller
    /// plans with [`ControlPlane::store_reserve`]).
    pub fn store_start(
        &self,
        k: &KeyView<'_>,
        instance: u64,
        device: &str,
        mode: StoreMode,
        plan: Option<&[PlannedWrite]>,
        refuse: Option<OpError>,
    ) -> OpResult<StoreStart> {
        self.workers.touch(instance, false);
        if mode == StoreMode::Lmcache {
            self.counters.add(&["stores_submitted", device], 1);
        }
        let c0 = self.first_chunk(k.start)?;
        let all = self.prefix_hashes(k, true)?;
        let mut s = StoreStart {
            key: OpKey::of(k, device),
            mode,
            instance,
            c0,
            hashes: all.get(c0..).unwrap_or_default().to_vec(),
            batches: Vec::new(),
            want: 0,
            oom: 0,
            staged: false,
        };
        if s.hashes.is_empty() {
            if mode == StoreMode::Lmcache {
                self.counters.add(&["stores_finished", device], 1);
            }
            return Ok(s);
        }
        if let Some(e) = refuse {
            return Err(e);
        }
        if mode == StoreMode::Engine {
            self.counters.add(&["stores_submitted", device], 1);
        }
        if let Some(plan) = plan {
            self.store_reserve(k, &mut s, plan)?;
        }
        Ok(s)
    }

    /// Reserves the chunks of `plan` for a started store (every scope checked first: a bad
    /// one reserves nothing).
    pub fn store_reserve(&self, k: &KeyView<'_>, s: &mut StoreStart, plan: &[PlannedWrite]) -> OpResult<()> {
        let rank = k.worker_id.unwrap_or(0);
        let n = s.n();
        let scopes = plan
            .iter()
            .map(|b| self.scope(k.model_name, k.world_size, rank, b.object_group, k.cache_salt))
            .collect::<OpResult<Vec<_>>>()?;
        s.staged = true;
        for (b, scope) in plan.iter().zip(scopes) {
            let chunks: Vec<usize> = b.chunks.iter().copied().filter(|&i| i < n).collect();
            let hs: Vec<ChunkHash> = chunks.iter().map(|&i| s.hashes[i]).collect();
            s.want += chunks.len();
            let res = match self.index.reserve_write(&scope, &hs, b.nbytes, s.instance, false) {
                Ok(r) => r,
                Err(e) => {
                    self.store_abort(s);
                    return Err(bad_request(e.to_string()));
                }
            };
            let mut staged = StagedBatch {
                scope,
                object_group: b.object_group,
                nbytes: b.nbytes,
                chunks: Vec::new(),
                hashes: Vec::new(),
                offsets: Vec::new(),
                sizes: Vec::new(),
            };
            for ((&i, h), r) in chunks.iter().zip(hs).zip(res) {
                match r {
                    Reserve::Reserved(a) => {
                        staged.chunks.push(i);
                        staged.hashes.push(h);
                        staged.offsets.push(a.offset);
                        staged.sizes.push(a.size);
                    }
                    Reserve::OutOfMemory => s.oom += 1,
                    Reserve::AlreadyResident | Reserve::InFlight => {}
                }
            }
            s.batches.push(staged);
        }
        if s.mode == StoreMode::Engine {
            let model = s.key.model_name.as_str();
            self.counters.add(&["l1_allocation_failure_chunks", "l1_store", model], s.oom as u64);
            if s.reserved() == 0 {
                self.counters.add(&["stores_finished", &s.key.device], 1);
            }
        }
        Ok(())
    }

    /// Drops a store's reservations (its copy failed, or its worker abandoned the prepare).
    pub fn store_abort(&self, s: &mut StoreStart) {
        if std::mem::take(&mut s.staged) {
            for b in &s.batches {
                self.index.abort_write(&b.scope, &b.hashes, s.instance);
            }
        }
    }

    /// The end of a store whose bytes are written: admits every staged object and counts
    /// `l1_write_chunks`, `stores_finished` and (`store`) the chunks not stored.
    pub fn store_finish(&self, s: &mut StoreStart) -> StoreDone {
        let mut done = StoreDone::default();
        if !std::mem::take(&mut s.staged) {
            return done;
        }
        for b in &s.batches {
            let finished = self
                .index
                .finish_write(&b.scope, &b.hashes, s.instance, 0, false, 0)
                .map(|w| w.finished)
                .unwrap_or_else(|_| vec![Finish::NotStaged; b.hashes.len()]);
            let mut ok = Vec::new();
            for (h, f) in b.hashes.iter().zip(finished) {
                match f {
                    Finish::Admitted => ok.push(*h),
                    Finish::NotStaged => done.expired += 1,
                    Finish::Dropped => done.dropped += 1,
                    Finish::AlreadyResident => {}
                }
            }
            done.admitted.push(ok);
        }
        let k = &s.key;
        self.counters.add(&["l1_write_chunks", &k.cache_salt], done.admitted_count() as u64);
        self.counters.add(&["stores_finished", &k.device], 1);
        if s.mode == StoreMode::Lmcache {
            let lost = (s.oom + done.expired + done.dropped) as u64;
            self.counters.add(&["l1_allocation_failure_chunks", "l1_store", &k.model_name], lost);
        }
        done
    }
}

fn tail_of(groups: &[GroupSpec], id: u32) -> Option<u32> {
    groups.iter().find(|g| g.id == id).and_then(|g| g.tail_id)
}

#[cfg(test)]
mod tests;
