//! The data operations' start and end on a real index, without sockets.

use std::sync::Arc;

use super::*;
use crate::clock::ManualClock;
use crate::hash::ChainMemo;
use crate::index::{L1Config, L1Index};
use crate::wire::WireKey;

use super::super::ControlConfig;

const CHUNK: usize = 16;
const OBJ: u64 = 4096;
const W: u64 = 7; // the worker

fn cp() -> ControlPlane {
    let clock = ManualClock::new();
    let index = Arc::new(L1Index::with_clock(L1Config::new(64 * OBJ), clock.clone()).unwrap());
    let cfg = ControlConfig { chunk_size: CHUNK, l2_prefetch: false, prefetch_queue: 2 };
    let cp = ControlPlane::new(cfg, index, Arc::new(ChainMemo::new(1024)), clock);
    cp.workers.add(W);
    cp
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n as u32).collect()
}

fn key<'a>(t: &'a [u32], start: usize, end: usize) -> WireKey<'a> {
    WireKey {
        model_name: "m",
        world_size: 1,
        worker_id: Some(0),
        token_span: &[],
        token_ids: t.to_vec(),
        chain: None,
        start: start as i128,
        end: end as i128,
        request_id: "r",
        cache_salt: "",
        request_configs: None,
        num_kv_readers: 1,
    }
}

fn full() -> Vec<GroupSpec> {
    vec![GroupSpec { id: 0, tail_id: None, span: 0 }]
}

fn plan(group: u32, chunks: std::ops::Range<usize>) -> Vec<PlannedWrite> {
    vec![PlannedWrite { object_group: group, chunks: chunks.collect(), nbytes: OBJ }]
}

/// Stores chunks `chunks` of `t` in object group `group` through store_start/store_finish.
fn store(cp: &ControlPlane, t: &[u32], group: u32, chunks: std::ops::Range<usize>) -> StoreDone {
    let k = key(t, 0, t.len());
    let kv = KeyView::of(&k).unwrap();
    let mut s = cp.store_start(&kv, W, "cpu", StoreMode::Lmcache, Some(&plan(group, chunks)), None).unwrap();
    cp.store_finish(&mut s)
}

#[test]
fn read_plan_reads_every_chunk_for_full_attention_and_the_window_for_a_sliding_one() {
    let g = |id, tail_id, span| GroupSpec { id, tail_id, span };
    let r = |group, first, count, first_of_window| PlannedRead { group, first, count, first_of_window };
    assert_eq!(read_plan(&full(), 0, 4), vec![r(0, 0, 4, false)]);
    assert_eq!(read_plan(&full(), 2, 2), vec![]);
    // A window of 2 chunks with tail objects: of a 5-chunk prefix, the tail of chunk 3, chunk 4.
    let w = [g(1, Some(1 | 1 << 16), 2)];
    assert_eq!(read_plan(&w, 0, 5), vec![r(1, 3, 1, true), r(1, 4, 1, false)]);
    // Retrieving only [4, 5): the window's first chunk is before the range.
    assert_eq!(read_plan(&w, 4, 5), vec![r(1, 4, 1, false)]);
    // Without tail objects the window's chunks are read whole.
    assert_eq!(read_plan(&[g(1, None, 2)], 0, 5), vec![r(1, 3, 2, false)]);
    // A prefix shorter than the window.
    assert_eq!(read_plan(&w, 0, 1), vec![r(1, 0, 1, false)]);
    // The layouts tests/engine/test_groups.py builds for windows of 512, 384, 128 and 1000
    // tokens at 256 a chunk (spans 2, 2 with tails, 1, 4 with tails), prefix of 8 chunks.
    assert_eq!(read_plan(&full(), 2, 5), vec![r(0, 2, 3, false)]);
    let (w512, w384, w128, w1000) = ([g(1, None, 2)], w, [g(1, None, 1)], [g(1, Some(1 | 1 << 16), 4)]);
    assert_eq!(read_plan(&w512, 0, 8), vec![r(1, 6, 2, false)]);
    assert_eq!(read_plan(&w512, 7, 8), vec![r(1, 7, 1, false)]); // the engine holds chunk 6
    assert_eq!(read_plan(&w512, 0, 1), vec![r(1, 0, 1, false)]);
    assert_eq!(read_plan(&w384, 0, 8), vec![r(1, 6, 1, true), r(1, 7, 1, false)]);
    assert_eq!(read_plan(&w128, 0, 8), vec![r(1, 7, 1, false)]);
    assert_eq!(read_plan(&w1000, 0, 3), vec![r(1, 0, 3, false)]);
}

#[test]
fn a_store_then_a_retrieve_cross_twice_each_and_give_everything_back() {
    let cp = cp();
    let t = tokens(3 * CHUNK + 5);
    let done = store(&cp, &t, 0, 0..3);
    assert_eq!(done.admitted_count(), 3);
    assert_eq!(cp.counters.get(&["stores_submitted", "cpu"]), 1);
    assert_eq!(cp.counters.get(&["stores_finished", "cpu"]), 1);
    assert_eq!(cp.counters.get(&["l1_write_chunks", ""]), 3);
    let k = key(&t, CHUNK, 3 * CHUNK);
    let kv = KeyView::of(&k).unwrap();
    let mut s = cp.read_start(&kv, W, "cpu", &full(), None, true).unwrap();
    assert_eq!((s.c0, s.n), (1, 2));
    assert_eq!(s.reads.len(), 1);
    assert_eq!(s.reads[0].hit, 2);
    assert!(s.short().is_none());
    assert_eq!(cp.index.stats().read_locked_objects, 2, "held for the copy");
    cp.read_finish(&mut s, ReadEnd::Done);
    cp.read_finish(&mut s, ReadEnd::Done); // nothing is given back twice
    assert_eq!(cp.index.stats().read_locked_objects, 0);
    assert_eq!(cp.counters.get(&["retrieves_submitted", "cpu"]), 1);
    assert_eq!(cp.counters.get(&["retrieves_finished", "cpu"]), 2);
    assert_eq!(cp.counters.get(&["l1_read_chunks", ""]), 4);
    assert_eq!(cp.counters.get(&["num_chunks_loaded", "0", "m", ""]), 4);
    cp.index.check_invariants();
}

#[test]
fn a_retrieve_whose_tokens_fall_short_is_not_found_and_leases_nothing() {
    let cp = cp();
    let t = tokens(2 * CHUNK);
    store(&cp, &t, 0, 0..2);
    let k = key(&t, 0, 4 * CHUNK);
    let e = cp.read_start(&KeyView::of(&k).unwrap(), W, "cpu", &full(), None, true).unwrap_err();
    assert_eq!(e.code, "not_found");
    assert_eq!(cp.index.stats().read_leases, 0);
    assert_eq!(cp.counters.get(&["retrieves_submitted", "cpu"]), 0);
    let k = key(&t, 3, 2 * CHUNK);
    let e = cp.read_start(&KeyView::of(&k).unwrap(), W, "cpu", &full(), None, true).unwrap_err();
    assert_eq!(e.code, "bad_request", "start is not a multiple of the chunk");
}

#[test]
fn a_missing_chunk_ends_the_plan_and_the_failed_end_counts_it() {
    let cp = cp();
    let t = tokens(4 * CHUNK);
    store(&cp, &t, 0, 0..2);
    let k = key(&t, 0, 4 * CHUNK);
    let mut s = cp.read_start(&KeyView::of(&k).unwrap(), W, "cpu", &full(), None, true).unwrap();
    let short = s.short().expect("short").clone();
    assert_eq!((short.hit, short.read.count), (2, 4));
    cp.read_finish(&mut s, ReadEnd::Failed { corrupt: 0, missing: 2 });
    assert_eq!(cp.index.stats().read_leases, 0);
    assert_eq!(cp.counters.get(&["l1_read_failure_chunks", "retrieve", "not_found", "m"]), 2);
    assert_eq!(cp.counters.get(&["retrieves_finished", "cpu"]), 1);
    assert_eq!(cp.counters.get(&["l1_read_chunks", ""]), 0);
}

#[test]
fn a_window_reads_its_tail_object_when_the_whole_one_is_gone() {
    let cp = cp();
    let t = tokens(4 * CHUNK);
    let tail = 1 | (1 << 16);
    store(&cp, &t, 0, 0..4); // full attention
    store(&cp, &t, 1, 3..4); // the window's last chunk, whole
    store(&cp, &t, tail, 2..3); // and its first chunk as a tail object only
    let groups =
        vec![GroupSpec { id: 0, tail_id: None, span: 0 }, GroupSpec { id: 1, tail_id: Some(tail), span: 2 }];
    let k = key(&t, 0, 4 * CHUNK);
    let mut s = cp.read_start(&KeyView::of(&k).unwrap(), W, "cpu", &groups, None, true).unwrap();
    let got: Vec<(u32, usize, usize, bool, usize)> =
        s.reads.iter().map(|r| (r.read.group, r.read.first, r.read.count, r.tail, r.hit)).collect();
    assert_eq!(got, vec![(0, 0, 4, false, 4), (1, 2, 1, true, 1), (1, 3, 1, false, 1)]);
    cp.read_finish(&mut s, ReadEnd::Done);
    assert_eq!(cp.index.stats().read_leases, 0);
    cp.index.check_invariants();
}

#[test]
fn a_prepared_read_keeps_its_lease_until_the_commit() {
    let cp = cp();
    let t = tokens(2 * CHUNK);
    store(&cp, &t, 0, 0..2);
    let k = key(&t, 0, 2 * CHUNK);
    let mut s = cp.read_start(&KeyView::of(&k).unwrap(), W, "cpu", &full(), None, true).unwrap();
    cp.read_finish(&mut s, ReadEnd::Prepared);
    assert_eq!(cp.index.stats().read_locked_objects, 2);
    assert_eq!(cp.counters.get(&["retrieves_finished", "cpu"]), 0);
    cp.read_finish(&mut s, ReadEnd::Done);
    assert_eq!(cp.index.stats().read_locked_objects, 0);
    assert_eq!(cp.counters.get(&["retrieves_finished", "cpu"]), 1);
}

#[test]
fn refusals_come_after_the_range_checks_and_give_the_share_back() {
    let cp = cp();
    let t = tokens(2 * CHUNK);
    let k = key(&t, 0, 2 * CHUNK);
    let kv = KeyView::of(&k).unwrap();
    let e = cp.read_start(&kv, W, "cpu", &full(), Some(OpError::new("overloaded", "busy")), true);
    assert_eq!(e.unwrap_err().code, "overloaded");
    assert_eq!(cp.counters.get(&["retrieves_submitted", "cpu"]), 0);
    let e = cp.store_start(&kv, W, "cpu", StoreMode::Engine, None, Some(OpError::new("overloaded", "busy")));
    assert_eq!(e.unwrap_err().code, "overloaded");
    // An empty range is no work: not refused, and an engine-driven prepare counts nothing.
    let k0 = key(&t, 0, 0);
    let kv0 = KeyView::of(&k0).unwrap();
    let s = cp.store_start(&kv0, W, "cpu", StoreMode::Engine, None, Some(OpError::new("overloaded", "busy")));
    assert_eq!(s.unwrap().n(), 0);
    assert_eq!(cp.counters.get(&["stores_submitted", "cpu"]), 0);
    let s = cp.store_start(&kv0, W, "cpu", StoreMode::Lmcache, None, None).unwrap();
    assert_eq!(s.n(), 0);
    assert_eq!(cp.counters.get(&["stores_finished", "cpu"]), 1);
}

#[test]
fn a_store_plan_is_cut_to_the_complete_chunks_and_an_abort_frees_its_reservations() {
    let cp = cp();
    let t = tokens(2 * CHUNK + 3);
    let k = key(&t, 0, 4 * CHUNK); // planned for 4 chunks, the tokens give 2
    let kv = KeyView::of(&k).unwrap();
    let mut s = cp.store_start(&kv, W, "cpu", StoreMode::Lmcache, Some(&plan(0, 0..4)), None).unwrap();
    assert_eq!((s.n(), s.want, s.reserved()), (2, 2, 2));
    assert_eq!(s.batches[0].chunks, vec![0, 1]);
    cp.store_abort(&mut s);
    assert_eq!(cp.store_finish(&mut s), StoreDone::default(), "aborted: nothing to admit");
    assert_eq!(cp.index.stats().staging_objects, 0);
    // Stored already: nothing reserved the second time, still a success.
    store(&cp, &t, 0, 0..2);
    let mut s = cp.store_start(&kv, W, "cpu", StoreMode::Lmcache, Some(&plan(0, 0..2)), None).unwrap();
    assert_eq!(s.reserved(), 0);
    assert_eq!(cp.store_finish(&mut s).admitted_count(), 0);
    cp.index.check_invariants();
}

#[test]
fn an_engine_driven_prepare_counts_l1_full_at_the_prepare() {
    let clock = ManualClock::new();
    let index = Arc::new(L1Index::with_clock(L1Config::new(2 * OBJ), clock.clone()).unwrap());
    let cfg = ControlConfig { chunk_size: CHUNK, l2_prefetch: false, prefetch_queue: 2 };
    let cp = ControlPlane::new(cfg, index, Arc::new(ChainMemo::new(1024)), clock);
    let t = tokens(4 * CHUNK);
    let k = key(&t, 0, 4 * CHUNK);
    let kv = KeyView::of(&k).unwrap();
    let mut s = cp.store_start(&kv, W, "cpu", StoreMode::Engine, Some(&plan(0, 0..4)), None).unwrap();
    assert!(s.oom > 0 && s.reserved() + s.oom == 4, "{} reserved, {} oom", s.reserved(), s.oom);
    assert_eq!(cp.counters.get(&["l1_allocation_failure_chunks", "l1_store", "m"]), s.oom as u64);
    let done = cp.store_finish(&mut s);
    assert_eq!(done.admitted_count(), s.reserved());
    assert_eq!(
        cp.counters.get(&["l1_allocation_failure_chunks", "l1_store", "m"]),
        s.oom as u64,
        "not again"
    );
    assert_eq!(cp.counters.get(&["stores_finished", "cpu"]), 1);
}
