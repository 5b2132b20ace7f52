//! Behaviour of the L1 index. Every test checks the structural invariants (including exact
//! per-salt accounting) after each step through `Fixture::ok`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::clock::ManualClock;

const OBJ: u64 = 4096;

struct Fixture {
    idx: L1Index,
    clock: Arc<ManualClock>,
}

impl Fixture {
    fn new(objects: u64, policy: EvictionPolicy) -> Self {
        let mut cfg = L1Config::new(objects * OBJ);
        cfg.policy = policy;
        Self::with(cfg)
    }

    fn with(cfg: L1Config) -> Self {
        let clock = ManualClock::new();
        let idx = L1Index::with_clock(cfg, clock.clone()).unwrap();
        Self { idx, clock }
    }

    fn ok(&self) -> &L1Index {
        self.idx.check_invariants();
        &self.idx
    }

    /// Reserve + finish `hashes` for `writer`; returns how many were admitted or present.
    fn store(&self, s: &KeyScope, hashes: &[ChunkHash]) -> usize {
        let r = self.idx.reserve_write(s, hashes, OBJ, 1, false).unwrap();
        self.ok();
        let staged: Vec<ChunkHash> = hashes
            .iter()
            .zip(&r)
            .filter(|(_, r)| matches!(r, Reserve::Reserved(_)))
            .map(|(h, _)| *h)
            .collect();
        self.idx.finish_write(s, &staged, 1, 0, false, 0).unwrap();
        self.ok();
        r.iter().filter(|r| !matches!(r, Reserve::OutOfMemory)).count()
    }
}

fn scope(salt: &str) -> KeyScope {
    KeyScope::new("model", 0x0100_0100, 0, salt).unwrap()
}

fn h(i: u32) -> ChunkHash {
    let mut b = [0u8; 32];
    b[..4].copy_from_slice(&i.to_be_bytes());
    ChunkHash::from(b)
}

fn hs(r: std::ops::Range<u32>) -> Vec<ChunkHash> {
    r.map(h).collect()
}

#[test]
fn staging_is_invisible_until_finished() {
    let f = Fixture::new(8, EvictionPolicy::Lru);
    let s = scope("");
    let r = f.idx.reserve_write(&s, &hs(0..2), 100, 7, false).unwrap();
    assert!(matches!(r[0], Reserve::Reserved(Allocation { size: OBJ, .. })));
    assert_eq!(f.ok().peek(&s, &hs(0..2)), 0);
    assert_eq!(f.idx.lease_read(&s, &hs(0..2), 1, 0).unwrap(), ReadGrant { lease: 0, hit: 0, slots: vec![] });
    let st = f.idx.stats();
    assert_eq!((st.staging_objects, st.staging_bytes, st.used_bytes), (2, 2 * OBJ, 2 * OBJ));
    // A second reserve by the same writer is in flight; by another writer it is staged again.
    assert_eq!(f.idx.reserve_write(&s, &hs(0..1), 100, 7, false).unwrap(), [Reserve::InFlight]);
    assert!(matches!(f.idx.reserve_write(&s, &hs(0..1), 100, 8, false).unwrap()[0], Reserve::Reserved(_)));
    assert_eq!(f.ok().stats().staging_objects, 3);
    assert_eq!(f.idx.finish_write(&s, &hs(0..2), 7, 0, false, 0).unwrap().finished, [Finish::Admitted; 2]);
    // The late writer's copy is dropped and still reported as success.
    assert_eq!(
        f.idx.finish_write(&s, &hs(0..1), 8, 0, false, 0).unwrap().finished,
        [Finish::AlreadyResident]
    );
    assert_eq!(f.idx.finish_write(&s, &hs(0..1), 9, 0, false, 0).unwrap().finished, [Finish::NotStaged]);
    let st = f.ok().stats();
    assert_eq!((st.resident_objects, st.staging_objects, st.used_bytes), (2, 0, 2 * OBJ));
    assert_eq!(st.counters.duplicate_writes, 1);
    assert_eq!(f.idx.peek(&s, &hs(0..3)), 2);
    assert_eq!(f.idx.reserve_write(&s, &hs(0..1), 100, 7, false).unwrap(), [Reserve::AlreadyResident]);
}

#[test]
fn abort_writer_drops_only_that_writers_staging() {
    let f = Fixture::new(8, EvictionPolicy::Lru);
    let s = scope("");
    f.idx.reserve_write(&s, &hs(0..3), OBJ, 1, false).unwrap();
    f.idx.reserve_write(&s, &hs(0..2), OBJ, 2, false).unwrap();
    assert_eq!(f.idx.abort_writer(1), 3);
    assert_eq!(f.ok().stats().staging_objects, 2);
    assert_eq!(f.idx.finish_write(&s, &hs(0..2), 2, 0, false, 0).unwrap().finished, [Finish::Admitted; 2]);
    assert_eq!(f.idx.abort_writer(1), 0);
    assert_eq!(f.ok().stats().counters.aborted_writes, 3);
}

#[test]
fn write_lock_ttl_expires() {
    let f = Fixture::new(8, EvictionPolicy::Lru);
    let s = scope("");
    f.idx.reserve_write(&s, &hs(0..1), OBJ, 1, false).unwrap();
    f.clock.advance_secs(599.0);
    assert_eq!(f.idx.evict_cycle().expired_staging, 0);
    assert_eq!(f.idx.reserve_write(&s, &hs(0..1), OBJ, 1, false).unwrap(), [Reserve::InFlight]);
    f.clock.advance_secs(2.0);
    // Expired: the lock ends (its space is free) and the same writer stages the key afresh.
    assert!(matches!(f.idx.reserve_write(&s, &hs(0..1), OBJ, 1, false).unwrap()[0], Reserve::Reserved(_)));
    assert_eq!(f.ok().stats().counters.expired_staging, 1);
    f.clock.advance_secs(601.0);
    let r = f.ok().evict_cycle();
    assert_eq!(r.expired_staging, 1);
    assert_eq!(f.ok().stats().used_bytes, 0);
    assert_eq!(f.idx.finish_write(&s, &hs(0..1), 1, 0, false, 0).unwrap().finished, [Finish::NotStaged]);
}

#[test]
fn read_locks_count_readers_and_expire() {
    let f = Fixture::new(4, EvictionPolicy::Lru);
    let s = scope("");
    f.store(&s, &hs(0..3));
    let g = f.idx.lease_read(&s, &[h(0), h(1), h(9), h(2)], 2, 0).unwrap();
    assert_eq!((g.hit, g.slots.len()), (2, 2));
    assert_ne!(g.lease, 0);
    let st = f.ok().stats();
    assert_eq!((st.read_locked_objects, st.read_leases), (2, 1));
    assert_eq!(f.idx.resolve(&s, &hs(0..1))[0].unwrap().read_locks, 2);
    // Locked objects are never evicted: clear (not forced) and delete leave them.
    assert_eq!(f.idx.clear(false).objects, 1);
    assert_eq!(f.idx.delete(&s, &hs(0..2), false), 0);
    assert_eq!(f.ok().peek(&s, &hs(0..2)), 2);
    assert_eq!(f.idx.release(g.lease, 0, 2, Some(1)), 2);
    assert_eq!(f.ok().stats().read_locked_objects, 2);
    assert_eq!(f.idx.release(g.lease, 0, 2, Some(1)), 2);
    assert_eq!(f.ok().stats().read_locked_objects, 0);
    assert_eq!(f.ok().stats().read_leases, 0);
    assert_eq!(f.idx.release(g.lease, 0, 2, Some(1)), 0, "an ended lease gives back nothing");

    // Two leases on one object count apart; one expiring leaves the other's share.
    let old = f.idx.lease_read(&s, &hs(0..1), 5, 0).unwrap().lease;
    f.clock.advance_secs(200.0);
    let new = f.idx.lease_read(&s, &hs(0..1), 1, 0).unwrap().lease;
    assert_eq!(f.idx.resolve(&s, &hs(0..1))[0].unwrap().read_locks, 6);
    f.clock.advance_secs(101.0);
    assert_eq!(f.ok().evict_cycle().expired_read_locks, 1);
    assert_eq!(f.idx.resolve(&s, &hs(0..1))[0].unwrap().read_locks, 1);
    // A late release of the expired lease cannot take the live lease's share.
    assert_eq!(f.idx.release_all(old), 0);
    assert_eq!(f.ok().resolve(&s, &hs(0..1))[0].unwrap().read_locks, 1);
    f.clock.advance_secs(300.0);
    assert_eq!(f.ok().evict_cycle().expired_read_locks, 1);
    assert_eq!(f.idx.release_all(new), 0);
    assert_eq!(f.idx.delete(&s, &hs(0..2), false), 2);
    assert_eq!(f.ok().stats().used_bytes, 0);
    assert!(f.idx.lease_read(&s, &hs(0..1), 0, 0).is_err());
    assert!(f.idx.lease_read(&s, &hs(0..1), 1, old).is_err(), "extending an ended lease");
}

#[test]
fn lru_evicts_last_chunk_of_oldest_request_first() {
    let f = Fixture::new(5, EvictionPolicy::Lru);
    let s = scope("");
    f.store(&s, &hs(0..3)); // request A: a0 a1 a2
    f.store(&s, &hs(10..12)); // request B: b0 b1
                              // Full. Each new object evicts one: a2, then a1, then a0, then b1.
    let order = [2, 1, 0, 11];
    for (i, victim) in order.iter().enumerate() {
        assert_eq!(f.store(&s, &[h(100 + i as u32)]), 1);
        assert_eq!(f.idx.peek(&s, &[h(*victim)]), 0, "expected {victim} evicted");
    }
    assert_eq!(f.idx.peek(&s, &[h(10)]), 1);
    assert_eq!(f.ok().stats().counters.evicted_demand_objects, 4);
}

#[test]
fn touch_and_unlock_refresh_recency() {
    let f = Fixture::new(3, EvictionPolicy::Lru);
    let s = scope("");
    f.store(&s, &[h(0)]);
    f.store(&s, &[h(1)]);
    f.store(&s, &[h(2)]);
    assert_eq!(f.idx.touch(&s, &[h(0)]), 1); // order now 1, 2, 0
    f.store(&s, &[h(3)]);
    assert_eq!(f.idx.peek(&s, &[h(1)]), 0);
    let g = f.idx.lease_read(&s, &[h(2)], 1, 0).unwrap();
    f.idx.release_all(g.lease); // order now 0, 3, 2
    f.store(&s, &[h(4)]);
    assert_eq!(f.idx.peek(&s, &[h(0)]), 0);
    assert_eq!(f.ok().peek(&s, &[h(2)]), 1);
}

#[test]
fn demand_eviction_never_evicts_locked_objects_or_the_callers_prefix() {
    let f = Fixture::new(4, EvictionPolicy::Lru);
    let s = scope("");
    f.store(&s, &hs(0..4));
    let g = f.idx.lease_read(&s, &hs(0..4), 1, 0).unwrap();
    let r = f.idx.reserve_write(&s, &hs(10..11), OBJ, 1, false).unwrap();
    assert_eq!(r, [Reserve::OutOfMemory]);
    assert_eq!(f.ok().stats().counters.allocation_failures, 1);
    f.idx.release_all(g.lease);
    // Storing a longer version of the same prompt: its resident prefix is not a victim, so
    // only what fits beside it... nothing here: the prefix fills L1.
    let r = f.idx.reserve_write(&s, &hs(0..6), OBJ, 1, false).unwrap();
    assert_eq!(&r[..4], &[Reserve::AlreadyResident; 4]);
    assert_eq!(&r[4..], &[Reserve::OutOfMemory; 2]);
    assert_eq!(f.ok().peek(&s, &hs(0..4)), 4);
}

#[test]
fn prefix_mode_stages_what_fits_and_all_or_nothing_stages_nothing() {
    let mut cfg = L1Config::new(4 * OBJ);
    cfg.demand_eviction = false;
    let f = Fixture::with(cfg);
    let s = scope("");
    f.store(&s, &hs(0..1));
    let r = f.idx.reserve_write(&s, &hs(10..15), OBJ, 1, true).unwrap();
    assert_eq!(r, [Reserve::OutOfMemory; 5]);
    assert_eq!(f.ok().stats().used_bytes, OBJ);
    let r = f.idx.reserve_write(&s, &hs(10..15), OBJ, 1, false).unwrap();
    assert!(r[..3].iter().all(|r| matches!(r, Reserve::Reserved(_))));
    assert_eq!(&r[3..], &[Reserve::OutOfMemory; 2]);
    assert_eq!(f.ok().stats().counters.allocation_failures, 7);
    // Larger than L1: refused without evicting anything.
    let f2 = Fixture::new(4, EvictionPolicy::Lru);
    f2.store(&s, &hs(0..2));
    assert_eq!(f2.idx.reserve_write(&s, &hs(5..6), 5 * OBJ, 1, false).unwrap(), [Reserve::OutOfMemory]);
    assert_eq!(f2.ok().peek(&s, &hs(0..2)), 2);
}

#[test]
fn duplicate_hashes_in_one_batch_are_staged_once() {
    let f = Fixture::new(4, EvictionPolicy::Lru);
    let s = scope("");
    for all in [false, true] {
        let hashes = [h(u32::from(all)), h(u32::from(all))];
        let r = f.idx.reserve_write(&s, &hashes, OBJ, 1, all).unwrap();
        assert!(matches!(r[0], Reserve::Reserved(_)));
        assert_eq!(r[1], Reserve::InFlight);
        assert_eq!(f.ok().stats().staging_objects, 1 + u64::from(all));
    }
}

#[test]
fn isolated_lru_writes_never_evict_a_salt_within_quota() {
    let f = Fixture::new(6, EvictionPolicy::IsolatedLru);
    let (a, b) = (scope("alice"), scope("bob"));
    f.idx.set_quota("alice", 3 * OBJ).unwrap();
    f.idx.set_quota("bob", 3 * OBJ).unwrap();
    f.store(&b, &hs(0..3));
    f.store(&a, &hs(10..13));
    // L1 full. Alice keeps writing: only her own objects make room.
    for i in 0..5 {
        assert_eq!(f.store(&a, &[h(20 + i)]), 1);
        assert_eq!(f.ok().peek(&b, &hs(0..3)), 3, "bob lost data");
    }
    assert_eq!(f.idx.salt_usage("bob"), 3 * OBJ);
    assert_eq!(f.idx.salt_usage("alice"), 3 * OBJ);
    // A salt over its quota (carol has none: limit 0) is a victim for anyone's write.
    f.idx.remove_quota("alice");
    f.store(&b, &hs(30..31));
    assert_eq!(f.idx.salt_usage("alice"), 2 * OBJ);
    assert_eq!(f.ok().salt_usage("bob"), 4 * OBJ);
}

#[test]
fn isolated_lru_cycle_trims_salts_to_quota_and_wipes_unregistered() {
    let f = Fixture::new(100, EvictionPolicy::IsolatedLru);
    f.idx.set_quota("alice", 2 * OBJ + 1).unwrap();
    f.idx.set_quota("", 10 * OBJ).unwrap();
    f.store(&scope("alice"), &hs(0..5));
    f.store(&scope("carol"), &hs(0..4));
    f.store(&scope(""), &hs(0..4));
    let r = f.ok().evict_cycle();
    assert_eq!(r.quota_evicted_objects, 3 + 4);
    assert!(!r.triggered);
    assert_eq!(f.idx.salt_usage("alice"), 2 * OBJ);
    // The last chunks went; the prefix stays.
    assert_eq!(f.idx.peek(&scope("alice"), &hs(0..5)), 2);
    assert_eq!(f.idx.salt_usage("carol"), 0);
    assert_eq!(f.idx.salt_usage(""), 4 * OBJ);
    let st = f.ok().stats();
    assert_eq!(st.counters.evicted_quota_objects, 7);
    assert!(st.salts.iter().all(|s| s.cache_salt != "carol"), "empty salt without quota is dropped");
    let quota = |salt: &str, limit_bytes, usage_bytes| QuotaInfo {
        cache_salt: salt.into(),
        limit_bytes,
        usage_bytes,
    };
    assert_eq!(f.idx.list_quotas(), [quota("", 10 * OBJ, 4 * OBJ), quota("alice", 2 * OBJ + 1, 2 * OBJ)]);
    // Quotas are ignored under plain LRU.
    let g = Fixture::new(100, EvictionPolicy::Lru);
    g.store(&scope("carol"), &hs(0..4));
    assert_eq!(g.idx.evict_cycle().quota_evicted_objects, 0);
}

#[test]
fn watermark_cycle_evicts_ratio_of_used_bytes() {
    let f = Fixture::new(10, EvictionPolicy::Lru);
    let s = scope("");
    f.store(&s, &hs(0..7));
    assert!(!f.idx.evict_cycle().triggered);
    f.store(&s, &hs(10..12)); // 9/10 >= 0.8
    let r = f.ok().evict_cycle();
    assert!(r.triggered);
    // 20% of 9 objects' bytes: two objects, the oldest request's last chunks.
    assert_eq!(r.watermark_evicted_objects, 2);
    assert_eq!(f.idx.peek(&s, &hs(0..7)), 5);
    assert_eq!(f.ok().stats().counters.eviction_triggered, 1);

    let g = Fixture::new(10, EvictionPolicy::IsolatedLru);
    g.idx.set_quota("a", 100 * OBJ).unwrap();
    g.idx.set_quota("b", 100 * OBJ).unwrap();
    g.store(&scope("a"), &hs(0..5));
    g.store(&scope("b"), &hs(0..5));
    let r = g.ok().evict_cycle();
    assert_eq!(r.watermark_evicted_objects, 2);
    assert_eq!((g.idx.salt_usage("a"), g.idx.salt_usage("b")), (4 * OBJ, 4 * OBJ));
}

#[test]
fn noop_policy_never_evicts() {
    let f = Fixture::new(2, EvictionPolicy::Noop);
    let s = scope("");
    assert_eq!(f.store(&s, &hs(0..3)), 2);
    assert!(!f.idx.evict_cycle().triggered);
    assert_eq!(f.ok().peek(&s, &hs(0..2)), 2);
}

#[test]
fn temporary_objects_go_with_their_last_lock() {
    let f = Fixture::new(4, EvictionPolicy::Lru);
    let s = scope("");
    f.idx.reserve_write(&s, &hs(0..2), OBJ, 99, false).unwrap();
    assert!(f.idx.finish_write(&s, &hs(0..2), 99, 0, true, 0).is_err());
    let done = f.idx.finish_write(&s, &hs(0..2), 99, 2, true, 0).unwrap();
    assert_eq!(done.finished, [Finish::Admitted; 2]);
    let st = f.ok().stats();
    assert_eq!((st.temporary_objects, st.read_locked_objects, st.read_leases), (2, 2, 1));
    f.idx.release(done.lease, 0, 2, Some(1));
    assert_eq!(f.ok().peek(&s, &hs(0..2)), 2);
    f.idx.release(done.lease, 0, 2, Some(1));
    let st = f.ok().stats();
    assert_eq!((st.temporary_objects, st.used_bytes, st.counters.temporary_dropped), (0, 0, 2));
    // Expired locks drop temporaries too.
    f.idx.reserve_write(&s, &hs(0..1), OBJ, 99, false).unwrap();
    f.idx.finish_write(&s, &hs(0..1), 99, 1, true, 0).unwrap();
    f.clock.advance_secs(400.0);
    f.idx.evict_cycle();
    assert_eq!(f.ok().stats().used_bytes, 0);
}

#[test]
fn clear_respects_locks_unless_forced() {
    let f = Fixture::new(8, EvictionPolicy::IsolatedLru);
    f.idx.set_quota("q", OBJ).unwrap();
    let s = scope("q");
    f.store(&s, &hs(0..4));
    let g = f.idx.lease_read(&s, &hs(0..1), 1, 0).unwrap();
    f.idx.reserve_write(&s, &hs(10..11), OBJ, 5, false).unwrap();
    let r = f.idx.clear(false);
    assert_eq!(r, ClearReport { objects: 3, bytes: 3 * OBJ, pending_objects: 0, pending_bytes: 0 });
    assert_eq!(f.ok().stats().total_objects, 2);
    // Forced: both leave the index at once, their bytes stay until their leases end.
    let r = f.idx.clear(true);
    assert_eq!(r, ClearReport { objects: 2, bytes: 2 * OBJ, pending_objects: 2, pending_bytes: 2 * OBJ });
    let st = f.ok().stats();
    assert_eq!((st.total_objects, st.used_bytes), (0, 2 * OBJ));
    assert_eq!((st.pending_release_objects, st.pending_release_bytes), (2, 2 * OBJ));
    assert_eq!(f.idx.salt_usage("q"), 0, "pending bytes are no salt's");
    assert_eq!(f.idx.peek(&s, &hs(0..1)), 0);
    assert_eq!(f.idx.get_quota("q"), Some(OBJ), "quotas survive a clear");
    assert_eq!(f.idx.finish_write(&s, &hs(10..11), 5, 0, false, 0).unwrap().finished, [Finish::Dropped]);
    assert_eq!(f.ok().stats().pending_release_objects, 1);
    assert_eq!(f.idx.release_all(g.lease), 1);
    let st = f.ok().stats();
    assert_eq!((st.used_bytes, st.pending_release_objects, st.counters.pending_released_objects), (0, 0, 2));
    assert_eq!(st.counters.dropped_writes, 1);
}

/// Every kind of drop (forced clear, forced delete, demand/watermark eviction, lease and
/// write-lock expiry) with every kind of lease live: no range held by a lease is handed to
/// another object until that lease ends, and a dropped writer is never admitted.
#[test]
fn leased_ranges_are_never_reused_while_held() {
    let f = Fixture::new(4, EvictionPolicy::Lru);
    let s = scope("");
    f.store(&s, &hs(0..2));
    let read = f.idx.lease_read(&s, &hs(0..2), 1, 0).unwrap();
    let w = f.idx.reserve_write(&s, &hs(10..12), OBJ, 7, false).unwrap();
    let staged: Vec<Allocation> =
        w.iter().map(|r| if let Reserve::Reserved(a) = r { *a } else { panic!("{r:?}") }).collect();
    let held: Vec<Allocation> = read.slots.iter().chain(&staged).copied().collect();
    // L1 is full of leased ranges: nothing else fits, and demand eviction finds no victim.
    assert_eq!(f.idx.reserve_write(&s, &hs(20..21), OBJ, 8, false).unwrap(), [Reserve::OutOfMemory]);
    assert_eq!(f.idx.delete(&s, &hs(0..1), true), 1);
    assert_eq!(f.idx.clear(true).pending_objects, 3);
    for _ in 0..3 {
        assert!(!f.idx.evict_cycle().triggered || f.idx.stats().used_bytes == 4 * OBJ);
        assert_eq!(f.ok().reserve_write(&s, &hs(20..21), OBJ, 8, false).unwrap(), [Reserve::OutOfMemory]);
    }
    // One copy out ends: exactly its two ranges come back.
    f.idx.release_all(read.lease);
    let r = f.ok().reserve_write(&s, &hs(20..23), OBJ, 8, false).unwrap();
    let got: Vec<Allocation> =
        r.iter().filter_map(|r| if let Reserve::Reserved(a) = *r { Some(a) } else { None }).collect();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|a| !staged.contains(a)), "a doomed writer's range was handed out");
    // The dropped writer learns at commit; a write-lock TTL also ends a doomed write.
    assert_eq!(f.idx.finish_write(&s, &hs(10..11), 7, 0, false, 0).unwrap().finished, [Finish::Dropped]);
    f.clock.advance_secs(601.0);
    f.ok().evict_cycle();
    assert_eq!(f.ok().stats().pending_release_objects, 0);
    assert_eq!(f.idx.finish_write(&s, &hs(11..12), 7, 0, false, 0).unwrap().finished, [Finish::NotStaged]);
    assert_eq!(held.len(), 4);
}

/// A lease names what it took: a release after a forced clear and a new store of the same key
/// can never unlock the new object (key-based releases could).
#[test]
fn release_after_clear_never_touches_a_new_object_under_the_same_key() {
    let f = Fixture::new(4, EvictionPolicy::Lru);
    let s = scope("");
    f.store(&s, &hs(0..1));
    let old = f.idx.lease_read(&s, &hs(0..1), 2, 0).unwrap();
    f.idx.clear(true);
    f.store(&s, &hs(0..1));
    let new = f.idx.lease_read(&s, &hs(0..1), 1, 0).unwrap();
    assert_ne!(new.slots, old.slots);
    assert_eq!(f.idx.release_all(old.lease), 2);
    assert_eq!(f.ok().resolve(&s, &hs(0..1))[0].unwrap().read_locks, 1);
    assert_eq!(f.idx.delete(&s, &hs(0..1), false), 0, "still leased by the new reader");
    f.idx.release_all(new.lease);
    assert_eq!(f.ok().stats().pending_release_objects, 0);
}

/// A dropped object whose reader never comes back: the lease's TTL ends it, and only then
/// are its bytes free; a temporary object dropped while leased goes the same way.
#[test]
fn an_orphan_is_freed_by_its_lease_ttl() {
    let f = Fixture::new(4, EvictionPolicy::Lru);
    let s = scope("");
    f.store(&s, &hs(0..2));
    let g = f.idx.lease_read(&s, &hs(0..2), 1, 0).unwrap();
    f.idx.reserve_write(&s, &hs(5..6), OBJ, 9, false).unwrap();
    let temp = f.idx.finish_write(&s, &hs(5..6), 9, 1, true, 0).unwrap();
    assert_eq!(f.idx.clear(true).pending_objects, 3);
    f.clock.advance_secs(299.0);
    f.ok().evict_cycle();
    assert_eq!(f.ok().stats().pending_release_bytes, 3 * OBJ);
    f.clock.advance_secs(2.0);
    assert_eq!(f.ok().evict_cycle().expired_read_locks, 2);
    let st = f.ok().stats();
    assert_eq!((st.used_bytes, st.pending_release_objects, st.temporary_objects), (0, 0, 0));
    assert_eq!((f.idx.release_all(g.lease), f.idx.release_all(temp.lease)), (0, 0));
}

/// Extending a lease across admissions (an L2 load) and releasing it by position.
#[test]
fn leases_extend_and_release_by_position() {
    let f = Fixture::new(8, EvictionPolicy::Lru);
    let s = scope("");
    f.store(&s, &hs(0..2));
    let g = f.idx.lease_read(&s, &hs(0..2), 3, 0).unwrap();
    f.idx.reserve_write(&s, &hs(2..3), OBJ, 4, false).unwrap();
    let done = f.idx.finish_write(&s, &hs(2..3), 4, 3, false, g.lease).unwrap();
    assert_eq!((done.finished[0], done.lease), (Finish::Admitted, g.lease));
    let more = f.idx.lease_read(&s, &hs(2..4), 3, g.lease).unwrap();
    assert_eq!((more.lease, more.hit), (g.lease, 1));
    assert_eq!(f.idx.release(g.lease, 1, 3, Some(1)), 2);
    assert_eq!(f.idx.release(g.lease, 3, 9, None), 3);
    let locks: Vec<u32> = f.idx.resolve(&s, &hs(0..3)).iter().map(|x| x.unwrap().read_locks).collect();
    assert_eq!(locks, [3, 2, 2]);
    assert_eq!(f.idx.release_all(g.lease), 7);
    assert_eq!(f.ok().stats().read_locked_objects, 0);
}

#[test]
fn scopes_isolate_keys() {
    let f = Fixture::new(8, EvictionPolicy::Lru);
    f.store(&scope("a"), &hs(0..2));
    assert_eq!(f.idx.peek(&scope("b"), &hs(0..2)), 0);
    assert_eq!(f.idx.peek(&KeyScope::new("other", 0x0100_0100, 0, "a").unwrap(), &hs(0..2)), 0);
    assert_eq!(f.idx.peek(&KeyScope::new("model", 0x0200_0201, 0, "a").unwrap(), &hs(0..2)), 0);
    assert_eq!(f.idx.peek(&KeyScope::new("model", 0x0100_0100, 1, "a").unwrap(), &hs(0..2)), 0);
    assert_eq!(f.ok().peek(&scope("a"), &hs(0..2)), 2);
    assert!(f.idx.set_quota("bad/salt", 1).is_err());
}

#[test]
fn config_is_validated() {
    let mut cfg = L1Config::new(1 << 20);
    cfg.trigger_watermark = 0.0;
    assert!(L1Index::new(cfg.clone()).is_err());
    cfg.trigger_watermark = 0.8;
    cfg.eviction_ratio = 1.5;
    assert!(L1Index::new(cfg.clone()).is_err());
    cfg.eviction_ratio = 0.2;
    cfg.read_ttl_secs = f64::NAN;
    assert!(L1Index::new(cfg.clone()).is_err());
    cfg.read_ttl_secs = 1.0;
    cfg.align_bytes = 1000;
    assert!(L1Index::new(cfg).is_err());
    assert_eq!("IsolatedLRU".parse::<EvictionPolicy>().unwrap(), EvictionPolicy::IsolatedLru);
    assert!("ARC".parse::<EvictionPolicy>().is_err());
}

fn tag(h: &ChunkHash) -> u64 {
    u64::from(u32::from_be_bytes(h.as_bytes()[..4].try_into().unwrap())) + 1
}

fn stamp(tags: &[std::sync::atomic::AtomicU64], a: Allocation, h: &ChunkHash) {
    tags[(a.offset / OBJ) as usize].store(tag(h), Relaxed);
}

/// Four writers/readers, one thread evicting and clearing (forced or not) all the time. Each
/// arena block carries a tag standing for its bytes: writers stamp what they copy in, readers
/// check every leased block holds its chunk for as long as they hold the lease.
#[test]
fn threads_hammering_while_one_evicts_keep_exact_accounting() {
    use std::sync::atomic::AtomicU64;
    let mut cfg = L1Config::new(64 * OBJ);
    cfg.policy = EvictionPolicy::IsolatedLru;
    let idx = Arc::new(L1Index::new(cfg).unwrap());
    let tags: Arc<Vec<AtomicU64>> = Arc::new((0..64).map(|_| AtomicU64::new(0)).collect());
    for salt in ["t0", "t1", "t2"] {
        idx.set_quota(salt, 20 * OBJ).unwrap();
    }
    let workers: Vec<_> = (0..4u32)
        .map(|t| {
            let idx = idx.clone();
            let tags = tags.clone();
            std::thread::spawn(move || {
                let s = scope(&format!("t{}", t % 4));
                for round in 0..2000u32 {
                    let base = (round * 7 + t) % 50;
                    let hashes = hs(base..base + 4);
                    let r = idx.reserve_write(&s, &hashes, OBJ, u64::from(t), false).unwrap();
                    let staged: Vec<_> = hashes
                        .iter()
                        .zip(&r)
                        .filter(|(_, r)| matches!(r, Reserve::Reserved(_)))
                        .map(|(h, _)| *h)
                        .collect();
                    // The "copy in": stamp each staged range with its chunk, twice around a yield.
                    for (hash, res) in hashes.iter().zip(&r) {
                        if let Reserve::Reserved(a) = res {
                            stamp(&tags, *a, hash);
                        }
                    }
                    std::thread::yield_now();
                    for (hash, res) in hashes.iter().zip(&r) {
                        if let Reserve::Reserved(a) = res {
                            stamp(&tags, *a, hash);
                        }
                    }
                    if round % 5 == 0 {
                        idx.abort_write(&s, &staged, u64::from(t));
                    } else {
                        idx.finish_write(&s, &staged, u64::from(t), 0, false, 0).unwrap();
                    }
                    // The "copy out": every leased range holds its chunk until the lease ends,
                    // whatever clears and evictions happen meanwhile.
                    let g = idx.lease_read(&s, &hashes, 2, 0).unwrap();
                    for _ in 0..2 {
                        for (hash, a) in hashes.iter().zip(&g.slots) {
                            assert_eq!(
                                tags[(a.offset / OBJ) as usize].load(Relaxed),
                                tag(hash),
                                "wrong bytes"
                            );
                        }
                        std::thread::yield_now();
                    }
                    idx.release(g.lease, 0, g.hit, Some(1));
                    idx.release_all(g.lease);
                }
            })
        })
        .collect();
    let evictor = {
        let idx = idx.clone();
        std::thread::spawn(move || {
            for i in 0..500 {
                idx.evict_cycle();
                if i % 3 == 0 {
                    idx.clear(i % 2 == 0);
                }
                idx.check_invariants();
            }
        })
    };
    for w in workers {
        w.join().unwrap();
    }
    evictor.join().unwrap();
    idx.check_invariants();
    assert_eq!(idx.stats().pending_release_objects, 0);
    let st = idx.stats();
    assert_eq!(st.read_locked_objects, 0);
    assert_eq!(st.staging_objects, 0);
    assert_eq!(st.salts.iter().map(|s| s.bytes).sum::<u64>(), st.used_bytes);
    // t3 has no quota: the next cycle wipes it.
    idx.evict_cycle();
    assert_eq!(idx.salt_usage("t3"), 0);
    idx.check_invariants();
}

#[derive(Debug, Clone)]
enum Op {
    Store(u8, u8, u8, bool),
    Finish(u8, u8, u8),
    Abort(u8, u8, u8),
    Lookup(u8, u8, u8),
    Release(u8, u8, u8),
    Touch(u8, u8),
    Delete(u8, u8, bool),
    Cycle(u16),
    Quota(u8, Option<u8>),
    Clear(bool),
}

fn op() -> impl Strategy<Value = Op> {
    let salt = 0u8..3;
    let start = 0u8..12;
    prop_oneof![
        4 => (salt.clone(), start.clone(), 1u8..6, any::<bool>()).prop_map(|(a, b, c, d)| Op::Store(a, b, c, d)),
        3 => (salt.clone(), start.clone(), 0u8..3).prop_map(|(a, b, c)| Op::Finish(a, b, c)),
        1 => (salt.clone(), start.clone(), 0u8..3).prop_map(|(a, b, c)| Op::Abort(a, b, c)),
        3 => (salt.clone(), start.clone(), 1u8..4).prop_map(|(a, b, c)| Op::Lookup(a, b, c)),
        2 => (salt.clone(), start.clone(), 1u8..4).prop_map(|(a, b, c)| Op::Release(a, b, c)),
        1 => (salt.clone(), start.clone()).prop_map(|(a, b)| Op::Touch(a, b)),
        1 => (salt.clone(), start.clone(), any::<bool>()).prop_map(|(a, b, c)| Op::Delete(a, b, c)),
        2 => (0u16..400).prop_map(Op::Cycle),
        1 => (salt, prop::option::of(0u8..8)).prop_map(|(a, b)| Op::Quota(a, b)),
        1 => any::<bool>().prop_map(Op::Clear),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    /// Any interleaving of operations keeps the structure and the per-salt accounting exact.
    #[test]
    fn random_operations_keep_invariants(
        isolated in any::<bool>(),
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let policy = if isolated { EvictionPolicy::IsolatedLru } else { EvictionPolicy::Lru };
        let f = Fixture::new(16, policy);
        let salts = ["", "a", "b"];
        let mut leases: Vec<LeaseId> = Vec::new();
        for op in ops {
            match op {
                Op::Store(s, b, n, all) => {
                    let hashes = hs(u32::from(b)..u32::from(b) + u32::from(n));
                    let r = f.idx.reserve_write(&scope(salts[s as usize]), &hashes, OBJ, 1, all).unwrap();
                    if all {
                        let oom = r.iter().filter(|r| **r == Reserve::OutOfMemory).count();
                        prop_assert!(oom == 0 || r.iter().all(|r| !matches!(r, Reserve::Reserved(_))));
                    }
                }
                Op::Finish(s, b, n) => {
                    // Some finishes admit read-locked (an L2 load), into a new or a live lease.
                    let (lock, extend) = match n {
                        2 => (1, leases.last().copied().unwrap_or(0)),
                        1 => (2, 0),
                        _ => (0, 0),
                    };
                    let done = f.idx.finish_write(&scope(salts[s as usize]), &hs(u32::from(b)..u32::from(b + n + 1)), 1, lock, false, extend);
                    if let Ok(done) = done {
                        if done.lease != 0 && done.lease != extend {
                            leases.push(done.lease);
                        }
                    }
                }
                Op::Abort(s, b, n) => {
                    f.idx.abort_write(&scope(salts[s as usize]), &hs(u32::from(b)..u32::from(b + n + 1)), 1);
                }
                Op::Lookup(s, b, r) => {
                    let g = f.idx.lease_read(&scope(salts[s as usize]), &hs(u32::from(b)..u32::from(b) + 4), u32::from(r), 0).unwrap();
                    if g.lease != 0 {
                        leases.push(g.lease);
                    }
                }
                Op::Release(s, b, r) => {
                    if !leases.is_empty() {
                        let lease = leases[b as usize % leases.len()];
                        f.idx.release(lease, usize::from(s), usize::from(s) + 2, Some(u32::from(r)));
                    }
                }
                Op::Touch(s, b) => {
                    f.idx.touch(&scope(salts[s as usize]), &hs(u32::from(b)..u32::from(b) + 3));
                }
                Op::Delete(s, b, force) => {
                    f.idx.delete(&scope(salts[s as usize]), &hs(u32::from(b)..u32::from(b) + 2), force);
                }
                Op::Cycle(secs) => {
                    f.clock.advance_secs(f64::from(secs));
                    let r = f.idx.evict_cycle();
                    if isolated {
                        // After a cycle no salt keeps evictable bytes above its quota.
                        for st in f.idx.stats().salts {
                            let evictable = st.bytes - st.staging_bytes;
                            prop_assert!(evictable == 0 || st.bytes <= st.quota_bytes.unwrap_or(0)
                                || f.idx.stats().read_locked_objects > 0,
                                "salt {:?} over quota after cycle: {:?} {:?}", st.cache_salt, st, r);
                        }
                    }
                }
                Op::Quota(s, q) => match q {
                    Some(q) => f.idx.set_quota(salts[s as usize], u64::from(q) * OBJ).unwrap(),
                    None => { f.idx.remove_quota(salts[s as usize]); }
                },
                Op::Clear(force) => { f.idx.clear(force); }
            }
            f.idx.check_invariants();
        }
    }
}

/// `explain` says where each chunk is and why it left, per scope, and forgets a drop once the
/// chunk is back.
#[test]
fn explain_names_why_a_chunk_left() {
    let f = Fixture::new(2, EvictionPolicy::Lru);
    let s = scope("a");
    f.store(&s, &hs(0..2));
    let g = f.idx.lease_read(&s, &hs(0..1), 1, 0).unwrap();
    f.clock.advance_secs(1.0);
    f.store(&s, &hs(5..6)); // evicts h(1) on demand (h(0) is leased)
    let w = f.ok().explain(&s, &[h(0), h(1), h(5), h(9)]);
    assert_eq!(w[0], Whereabouts::Resident { locked: true });
    assert!(matches!(w[1], Whereabouts::Dropped { reason: DropReason::Demand, .. }));
    assert_eq!((w[2], w[3]), (Whereabouts::Resident { locked: false }, Whereabouts::Unknown));
    assert_eq!(f.idx.explain(&scope("b"), &[h(1)]), [Whereabouts::Unknown], "other salts see nothing");
    f.idx.delete(&s, &[h(5)], false);
    f.idx.clear(true);
    f.clock.advance_secs(2.0);
    let w = f.idx.explain(&s, &[h(0), h(5)]);
    assert_eq!(w[0], Whereabouts::Dropped { reason: DropReason::Cleared, ago_secs: 2.0 });
    assert!(matches!(w[1], Whereabouts::Dropped { reason: DropReason::Deleted, .. }));
    f.idx.release_all(g.lease);
    f.store(&s, &hs(0..1));
    assert_eq!(f.ok().explain(&s, &[h(0)]), [Whereabouts::Resident { locked: false }]);
    f.idx.delete(&s, &[h(0)], false);
    assert!(matches!(
        f.idx.explain(&s, &[h(0)])[0],
        Whereabouts::Dropped { reason: DropReason::Deleted, .. }
    ));
    // A write whose lock expires before its commit is recorded as such.
    f.idx.reserve_write(&s, &hs(7..8), OBJ, 3, false).unwrap();
    f.clock.advance_secs(601.0);
    f.idx.evict_cycle();
    assert!(matches!(
        f.idx.explain(&s, &[h(7)])[0],
        Whereabouts::Dropped { reason: DropReason::WriteExpired, .. }
    ));
}

/// `list` pages through resident objects in key order, locked ones included, never staged
/// ones, and filters by model.
#[test]
fn list_pages_resident_objects_in_key_order() {
    let f = Fixture::new(16, EvictionPolicy::Lru);
    f.store(&scope("b"), &hs(0..3));
    f.store(&scope("a"), &hs(0..3));
    let other = KeyScope::new("other", 1, 0, "a").unwrap();
    f.store(&other, &hs(1..2));
    let g = f.idx.lease_read(&scope("a"), &hs(0..1), 1, 0).unwrap();
    f.idx.reserve_write(&scope("a"), &hs(9..10), OBJ, 2, false).unwrap(); // staged: not listed
    let mut seen = Vec::new();
    let mut after: Option<ListCursor> = None;
    loop {
        let page = f.ok().list(after.as_ref(), 3, None);
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3);
        let l = page.last().unwrap();
        after = Some((
            l.hash.as_bytes().to_vec(),
            l.model_name.clone(),
            l.kv_rank,
            l.object_group,
            l.cache_salt.clone(),
        ));
        seen.extend(page);
    }
    let keys: Vec<(ChunkHash, &str, &str)> =
        seen.iter().map(|l| (l.hash, l.model_name.as_str(), l.cache_salt.as_str())).collect();
    assert_eq!(
        keys,
        [
            (h(0), "model", "a"),
            (h(0), "model", "b"),
            (h(1), "model", "a"),
            (h(1), "model", "b"),
            (h(1), "other", "a"),
            (h(2), "model", "a"),
            (h(2), "model", "b"),
        ]
    );
    assert!(seen[0].locked && !seen[1].locked);
    assert!(seen.iter().all(|l| l.size == OBJ));
    let only: Vec<_> =
        f.idx.list(None, 100, Some("other")).into_iter().map(|l| (l.hash, l.kv_rank)).collect();
    assert_eq!(only, [(h(1), 1)]);
    assert!(f.idx.list(None, 0, None).is_empty());
    f.idx.release_all(g.lease);
}
