//! Request sessions (spec C.5): a request's hash chain, its lookup's read leases per rank, and
//! the lookup result `query_prefetch_status` reports.
//!
//! Unlike LMCache, the chain is replaced as soon as the request sends other tokens (LMCache
//! keeps stale hashes), and the idle TTL counts from the last use, not from creation (spec L.5).
//!
//! Concurrency: the map has one lock, held only to find, create or remove a session; each
//! session has its own lock, held for the length of one operation on it (a lookup's index
//! calls included), never while waiting for anything else. Index calls never call back here.

use std::sync::Arc;

use parking_lot::Mutex;
use std::collections::HashMap;

use crate::clock::{secs_to_ns, Clock};
use crate::error::CoreResult;
use crate::hash::{ChainMemo, MsgpackChain};
use crate::index::{L1Index, LeaseId};
use crate::key::{ChunkHash, KeyScope};

/// A run of one lease: its items are chunks `first .. first + count` in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub lease: LeaseId,
    pub first: usize,
    pub count: usize,
}

/// The read leases a lookup holds for a request. A row is one key scope: one kv rank of one
/// object group (a hybrid model has several; a windowed group's row holds only the chunks its
/// window needs). Each row's runs are in chunk order: the L1 hit, then what an L2 prefetch
/// loaded.
///
/// A retrieve releases one share of its own rank's chunks, `free_lookup_locks` what is left in
/// a range, end_session or expiry everything. The core counts the shares each lease still
/// owes, so every release is idempotent and gives back only what these leases took, whatever
/// happened to the keys meanwhile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LookupLocks {
    rows: Vec<(u32, Vec<Run>)>,
}

impl LookupLocks {
    /// Locks from `(rank, run)` rows (lease 0 or no chunks: nothing held).
    pub fn of(rows: impl IntoIterator<Item = (u32, Run)>) -> Self {
        Self {
            rows: rows
                .into_iter()
                .map(|(rank, run)| (rank, if run.lease != 0 && run.count > 0 { vec![run] } else { vec![] }))
                .collect(),
        }
    }

    /// Adds one row per rank (lease i: rank i) covering chunks `[first, first + count)`.
    pub fn extend(&mut self, leases: &[LeaseId], first: usize, count: usize) {
        for (rank, &lease) in leases.iter().enumerate() {
            if lease != 0 && count > 0 {
                self.rows.push((rank as u32, vec![Run { lease, first, count }]));
            }
        }
    }

    pub fn leases(&self) -> impl Iterator<Item = LeaseId> + '_ {
        self.rows.iter().flat_map(|(_, runs)| runs.iter().map(|r| r.lease))
    }

    /// Releases up to `n` (None: all) shares of chunks `[start, end)` of `rank` (None: every
    /// rank); returns the shares given back.
    pub fn release(
        &self,
        index: &L1Index,
        rank: Option<u32>,
        start: usize,
        end: usize,
        n: Option<u32>,
    ) -> u64 {
        let mut released = 0;
        for (r, runs) in &self.rows {
            if rank.is_some_and(|want| want != *r) {
                continue;
            }
            for run in runs {
                let lo = start.saturating_sub(run.first);
                let hi = end.saturating_sub(run.first).min(run.count);
                if lo < hi {
                    released += index.release(run.lease, lo, hi, n);
                }
            }
        }
        released
    }
}

/// One request's state.
#[derive(Debug, Default)]
pub struct Session {
    /// The token ids `hashes` belong to.
    tokens: Option<Vec<u32>>,
    /// Hashes of every complete chunk of `tokens`.
    pub hashes: Vec<ChunkHash>,
    pub n_tokens: usize,
    last_used: u64,
    /// The last lookup's hit (chunks), until a query takes it.
    result: Option<u64>,
    /// A result is ready for `wait_prefetch_status` (set with it, cleared when taken).
    ready: bool,
    /// The lookup's L2 prefetch (or Python fold) still runs: queries answer nil.
    pub pending: bool,
    /// Bumped by every lookup; work of an earlier lookup that finds it changed (or the session
    /// closed) releases what it took instead of installing it.
    pub generation: u64,
    pub closed: bool,
    pub locks: Option<LookupLocks>,
    /// Scopes (every rank and object group) of the keys this request touched, for
    /// end_session's LRU touch.
    pub scopes: Vec<KeyScope>,
}

impl Session {
    /// Hashes of every complete chunk of `tokens`, cached while the request sends the same
    /// tokens and replaced as soon as they differ.
    pub fn chain(&mut self, tokens: &[u32], chunk_size: usize, memo: &ChainMemo) -> CoreResult<&[ChunkHash]> {
        if self.tokens.as_deref() != Some(tokens) {
            let hashes = memo.prefix_hashes(tokens, chunk_size, 0, None)?;
            self.hashes = hashes.iter().map(|h| ChunkHash::new(h)).collect::<CoreResult<_>>()?;
            self.n_tokens = tokens.len();
            self.tokens = Some(tokens.to_vec());
        }
        Ok(&self.hashes)
    }

    /// The hashes of complete chunks up to token `end`.
    pub fn prefix(
        &mut self,
        tokens: &[u32],
        end: usize,
        chunk_size: usize,
        memo: &ChainMemo,
    ) -> CoreResult<Vec<ChunkHash>> {
        let n = end.min(tokens.len()) / chunk_size;
        let all = self.chain(tokens, chunk_size, memo)?;
        Ok(all[..n.min(all.len())].to_vec())
    }

    /// [`Session::prefix`] for ids that came as their chain ([`ChainMemo::msgpack_chain`]).
    pub fn prefix_hashed(
        &mut self,
        chain: &MsgpackChain,
        end: usize,
        chunk_size: usize,
    ) -> CoreResult<Vec<ChunkHash>> {
        self.hashes = chain.hashes.iter().map(|h| ChunkHash::new(h)).collect::<CoreResult<_>>()?;
        self.n_tokens = chain.count;
        self.tokens = None; // not parsed: a later call with ids hashes them again
        let n = end.min(chain.count) / chunk_size;
        Ok(self.hashes[..n.min(self.hashes.len())].to_vec())
    }

    /// Releases every lease the last lookup still holds.
    pub fn drop_locks(&mut self, index: &L1Index) {
        if let Some(locks) = self.locks.take() {
            for lease in locks.leases() {
                index.release_all(lease);
            }
        }
    }

    pub fn set_result(&mut self, hit_chunks: u64) {
        self.result = Some(hit_chunks);
        self.pending = false;
        self.ready = true;
    }

    /// Whether a query would answer now (a result is set and no prefetch runs).
    pub fn is_ready(&self) -> bool {
        self.ready && !self.pending
    }

    /// The lookup's hit in chunks, once (later calls and unknown lookups give 0); None while
    /// its L2 prefetch still runs (spec B.4: nil while running).
    pub fn take_result(&mut self) -> Option<u64> {
        if self.pending {
            return None;
        }
        self.ready = false;
        Some(self.result.take().unwrap_or(0))
    }
}

pub type SessionRef = Arc<Mutex<Session>>;

/// Sessions by request id.
#[derive(Debug)]
pub struct Sessions {
    clock: Arc<dyn Clock>,
    map: Mutex<HashMap<String, SessionRef>>,
}

impl Sessions {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self { clock, map: Mutex::default() }
    }

    /// The session (created when `create`), its idle time restarted.
    pub fn get(&self, request_id: &str, create: bool) -> Option<SessionRef> {
        let now = self.clock.now_ns();
        let s = {
            let mut m = self.map.lock();
            match m.get(request_id) {
                Some(s) => s.clone(),
                None if create => {
                    let s = SessionRef::default();
                    m.insert(request_id.to_owned(), s.clone());
                    s
                }
                None => return None,
            }
        };
        s.lock().last_used = now;
        Some(s)
    }

    /// The session, if any, without counting this as a use.
    pub fn peek(&self, request_id: &str) -> Option<SessionRef> {
        self.map.lock().get(request_id).cloned()
    }

    pub fn pop(&self, request_id: &str) -> Option<SessionRef> {
        self.map.lock().remove(request_id)
    }

    /// Removes and returns the sessions idle for more than `ttl_secs`.
    pub fn expired(&self, ttl_secs: f64) -> Vec<SessionRef> {
        let now = self.clock.now_ns();
        let ttl = secs_to_ns(ttl_secs);
        let mut m = self.map.lock();
        let mut old = Vec::new();
        m.retain(|_, s| {
            // A session locked right now is in use: not idle.
            let idle = s.try_lock().is_some_and(|g| now.saturating_sub(g.last_used) > ttl);
            if idle {
                old.push(s.clone());
            }
            !idle
        });
        old
    }

    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn chain_is_replaced_when_tokens_change() {
        let memo = ChainMemo::new(64);
        let mut s = Session::default();
        let a: Vec<u32> = (0..40).collect();
        let b: Vec<u32> = (1..41).collect();
        let ha = s.chain(&a, 16, &memo).unwrap().to_vec();
        assert_eq!(ha.len(), 2);
        assert_eq!(s.prefix(&a, 20, 16, &memo).unwrap(), ha[..1].to_vec());
        let hb = s.chain(&b, 16, &memo).unwrap().to_vec();
        assert_ne!(ha, hb);
    }

    #[test]
    fn result_is_taken_once() {
        let mut s = Session::default();
        assert!(!s.is_ready());
        s.set_result(3);
        assert!(s.is_ready());
        assert_eq!(s.take_result(), Some(3));
        assert_eq!(s.take_result(), Some(0));
        s.pending = true;
        assert_eq!(s.take_result(), None);
    }

    #[test]
    fn idle_sessions_expire() {
        let clock = ManualClock::new();
        let ss = Sessions::new(clock.clone());
        ss.get("a", true);
        clock.advance_secs(5.0);
        ss.get("b", true);
        clock.advance_secs(6.0);
        assert_eq!(ss.expired(10.0).len(), 1);
        assert!(ss.peek("a").is_none());
        assert!(ss.get("b", false).is_some());
        assert_eq!(ss.len(), 1);
    }
}
