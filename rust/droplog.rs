//! Why a chunk is not in L1: a bounded record of the chunks that left it, and why.
//!
//! Operators ask "why did this request miss?"; the index alone can only say "absent". Every
//! object the index drops (eviction by watermark, quota or demand, delete, clear, a temporary
//! object's release, a write whose lock expired before it was admitted) is recorded here under
//! its chunk hash and a fingerprint of its scope's *names* (model, kv rank, object group,
//! salt), never under the index's recycled ids. A chunk found neither in L1 nor here was never
//! stored, or left so long ago that the record forgot it.
//!
//! Bounded: at most `capacity` chunks, the oldest forgotten first (FIFO; a chunk recorded again
//! moves to the back). A chunk admitted again is forgotten at once. O(1) per operation; about
//! 100 bytes per chunk. Answers are within one scope (salt included), so they reveal nothing
//! about other tenants. A 64-bit fingerprint collision could only mislabel a diagnostic.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;

use foldhash::fast::{FixedState, RandomState};

use crate::key::{ChunkHash, KeyScope};

/// Why an object left L1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    Watermark,
    Quota,
    Demand,
    Deleted,
    Cleared,
    /// A temporary object (an L2 prefetch not kept in L1) whose last read lease ended.
    Temporary,
    /// A write whose lock expired before it was admitted: the store never completed.
    WriteExpired,
}

impl DropReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Watermark => "evicted_watermark",
            Self::Quota => "evicted_quota",
            Self::Demand => "evicted_demand",
            Self::Deleted => "deleted",
            Self::Cleared => "cleared",
            Self::Temporary => "released_temporary",
            Self::WriteExpired => "write_expired",
        }
    }
}

/// A chunk in one scope, by names (see the module doc).
pub type DropKey = (ChunkHash, u64);

/// The scope fingerprint of [`DropKey`], from the scope's names.
pub fn scope_fingerprint(model: &str, kv_rank: u32, object_group: u32, cache_salt: &str) -> u64 {
    FixedState::with_seed(0x6c6d_6361_6368_6572).hash_one((model, kv_rank, object_group, cache_salt))
}

pub fn key_of(scope: &KeyScope, hash: ChunkHash) -> DropKey {
    (hash, scope_fingerprint(scope.model_name(), scope.kv_rank(), scope.object_group(), scope.cache_salt()))
}

#[derive(Debug)]
pub struct DropLog {
    capacity: usize,
    /// key -> (reason, when (clock ns), sequence number of its entry in `order`)
    map: HashMap<DropKey, (DropReason, u64, u64), RandomState>,
    /// (key, sequence): oldest first; entries whose sequence no longer matches are stale.
    order: VecDeque<(DropKey, u64)>,
    next: u64,
}

impl DropLog {
    pub fn new(capacity: usize) -> Self {
        Self { capacity, map: HashMap::default(), order: VecDeque::new(), next: 0 }
    }

    pub fn record(&mut self, key: DropKey, reason: DropReason, now: u64) {
        if self.capacity == 0 {
            return;
        }
        let seq = self.next;
        self.next += 1;
        self.map.insert(key, (reason, now, seq));
        self.order.push_back((key, seq));
        // Stale entries (forgotten or recorded again) count toward the queue until popped, so
        // the queue stays within twice the capacity.
        while self.map.len() > self.capacity || self.order.len() > 2 * self.capacity {
            let Some((old, s)) = self.order.pop_front() else { break };
            if self.map.get(&old).is_some_and(|e| e.2 == s) {
                self.map.remove(&old);
            }
        }
    }

    /// The chunk is in L1 again: it has no drop to explain.
    pub fn forget(&mut self, key: &DropKey) {
        if !self.map.is_empty() {
            self.map.remove(key);
        }
    }

    /// Why and when (clock ns) the chunk left L1, if recorded.
    pub fn get(&self, key: &DropKey) -> Option<(DropReason, u64)> {
        self.map.get(key).map(|&(r, at, _)| (r, at))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u8) -> DropKey {
        (ChunkHash::from([i; 32]), 7)
    }

    #[test]
    fn bounded_fifo_with_forget_and_rerecord() {
        let mut log = DropLog::new(3);
        for i in 0..3 {
            log.record(k(i), DropReason::Demand, u64::from(i));
        }
        log.record(k(0), DropReason::Cleared, 10); // moves to the back
        log.record(k(3), DropReason::Quota, 11); // forgets the oldest: 1
        assert_eq!(log.get(&k(1)), None);
        assert_eq!(log.get(&k(0)), Some((DropReason::Cleared, 10)));
        assert_eq!(log.get(&k(2)), Some((DropReason::Demand, 2)));
        log.forget(&k(2));
        assert_eq!(log.get(&k(2)), None);
        for i in 10..100 {
            log.record(k(i), DropReason::Watermark, 0);
            assert!(log.len() <= 3 && log.order.len() <= 6);
        }
        assert_eq!(log.get(&k(99)), Some((DropReason::Watermark, 0)));
        let mut off = DropLog::new(0);
        off.record(k(1), DropReason::Deleted, 0);
        assert!(off.is_empty());
    }

    #[test]
    fn scopes_are_told_apart_by_names() {
        let a = scope_fingerprint("m", 1, 0, "alice");
        assert_ne!(a, scope_fingerprint("m", 1, 0, "bob"));
        assert_ne!(a, scope_fingerprint("m", 1, 1, "alice"));
        assert_ne!(a, scope_fingerprint("m2", 1, 0, "alice"));
        assert_eq!(a, scope_fingerprint("m", 1, 0, "alice"));
    }
}
