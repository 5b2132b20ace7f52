//! The control operations on a real index, without sockets.

use std::sync::Arc;

use super::*;
use crate::clock::ManualClock;
use crate::index::{L1Config, Reserve};
use crate::wire::WireKey;

const CHUNK: usize = 16;
const OBJ: u64 = 4096;

struct Fx {
    cp: ControlPlane,
    clock: Arc<ManualClock>,
}

fn fx(l2: bool) -> Fx {
    let clock = ManualClock::new();
    let index = Arc::new(L1Index::with_clock(L1Config::new(64 * OBJ), clock.clone()).unwrap());
    let cfg = ControlConfig { chunk_size: CHUNK, l2_prefetch: l2, prefetch_queue: 2 };
    Fx { cp: ControlPlane::new(cfg, index, Arc::new(ChainMemo::new(1024)), clock.clone()), clock }
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n as u32).collect()
}

fn key<'a>(tokens: &'a [u32], rid: &'a str, world: i128, readers: i128) -> WireKey<'a> {
    WireKey {
        model_name: "m",
        world_size: world,
        worker_id: None,
        token_span: &[],
        token_ids: tokens.to_vec(),
        chain: None,
        start: 0,
        end: tokens.len() as i128,
        request_id: rid,
        cache_salt: "",
        request_configs: None,
        num_kv_readers: readers,
    }
}

impl Fx {
    fn hashes(&self, t: &[u32]) -> Vec<ChunkHash> {
        self.cp
            .memo
            .prefix_hashes(t, CHUNK, 0, None)
            .unwrap()
            .iter()
            .map(|h| ChunkHash::new(h).unwrap())
            .collect()
    }

    /// Stores the first `n` chunks of `t` for `rank` (world `world`).
    fn store(&self, t: &[u32], world: u32, rank: u32, n: usize) {
        let scope = self.cp.scope("m", world, rank, 0, "").unwrap();
        let hs = &self.hashes(t)[..n];
        let r = self.cp.index.reserve_write(&scope, hs, OBJ, 9, false).unwrap();
        assert!(r.iter().all(|r| matches!(r, Reserve::Reserved(_) | Reserve::AlreadyResident)));
        let staged: Vec<ChunkHash> =
            hs.iter().zip(&r).filter(|(_, r)| matches!(r, Reserve::Reserved(_))).map(|(h, _)| *h).collect();
        self.cp.index.finish_write(&scope, &staged, 9, 0, false, 0).unwrap();
    }

    fn layout(&self, world: u32) {
        self.cp.workers.set_layout("m", world, Layout::plain());
    }

    fn leases(&self) -> u64 {
        self.cp.index.stats().read_leases
    }
}

#[test]
fn lookup_hits_the_prefix_every_rank_holds_and_leases_it() {
    let f = fx(false);
    let t = tokens(4 * CHUNK + 3);
    f.layout(2);
    f.store(&t, 2, 0, 4);
    f.store(&t, 2, 1, 2);
    let k = key(&t, "r", 2, 2);
    let kv = KeyView::of(&k).unwrap();
    assert_eq!(f.cp.lookup(&kv), Ok(()));
    assert_eq!(f.cp.query("r"), Some(2));
    assert_eq!(f.cp.query("r"), Some(0), "a result is taken once");
    assert_eq!(f.leases(), 2, "one lease per rank");
    assert_eq!(f.cp.counters.get(&["lookup_hit_tokens", "m", ""]), 2 * CHUNK as u64);
    assert_eq!(f.cp.counters.get(&["lookup_misses", "m", "never_stored"]), 1);
    // Two readers: each rank's retrieve releases one share; the second ends the leases.
    assert_eq!(f.cp.release_share("r", 0, 0, 2), 2);
    assert_eq!(f.cp.release_share("r", 1, 0, 2), 2);
    assert_eq!(f.cp.release_share("r", 0, 0, 2), 2);
    assert_eq!(f.cp.release_share("r", 0, 0, 2), 0, "nothing left to give back");
    f.cp.end_session("r");
    assert_eq!(f.cp.sessions.len(), 0);
    f.cp.index.check_invariants();
}

#[test]
fn a_new_lookup_and_end_session_release_the_old_leases() {
    let f = fx(false);
    let t = tokens(3 * CHUNK);
    f.layout(1);
    f.store(&t, 1, 0, 3);
    let k = key(&t, "r", 1, 1);
    let kv = KeyView::of(&k).unwrap();
    f.cp.lookup(&kv).unwrap();
    f.cp.lookup(&kv).unwrap();
    assert_eq!(f.cp.index.stats().read_locked_objects, 3, "the first lookup's leases ended");
    let mut k2 = k.clone();
    k2.end = CHUNK as i128;
    f.cp.free_lookup_locks(&KeyView::of(&k2).unwrap()).unwrap();
    assert_eq!(f.cp.index.stats().read_locked_objects, 2);
    f.cp.end_session("r");
    assert_eq!(f.cp.index.stats().read_locked_objects, 0);
    f.cp.index.check_invariants();
}

#[test]
fn lookups_without_a_layout_answer_zero() {
    let f = fx(false);
    let t = tokens(2 * CHUNK);
    let k = key(&t, "r", 1, 1);
    let kv = KeyView::of(&k).unwrap();
    assert_eq!(f.cp.lookup(&kv), Ok(()));
    assert_eq!(f.cp.query("r"), Some(0));
    assert_eq!(f.cp.counters.get(&["lookup_early_exit", "m", "", "no_gpu_context"]), 1);
}

#[test]
fn bad_keys_are_refused() {
    let f = fx(false);
    let t = tokens(CHUNK);
    let mut k = key(&t, "r", 1, 0);
    assert_eq!(f.cp.lookup(&KeyView::of(&k).unwrap()).unwrap_err().code, "bad_request");
    k.world_size = 0;
    assert_eq!(KeyView::of(&k).unwrap_err().code, "bad_request");
    k.world_size = 1;
    k.worker_id = Some(1);
    assert_eq!(KeyView::of(&k).unwrap_err().code, "bad_request");
    let mut k = key(&t, "r", 1, 1);
    k.start = 3;
    assert_eq!(f.cp.free_lookup_locks(&KeyView::of(&k).unwrap()), Ok(()), "no session: nothing to free");
    f.cp.sessions.get("r", true);
    assert_eq!(f.cp.free_lookup_locks(&KeyView::of(&k).unwrap()).unwrap_err().code, "bad_request");
    let long = "s".repeat(500);
    let k = WireKey { cache_salt: &long, ..key(&t, "q", 1, 1) };
    f.layout(1);
    assert_eq!(f.cp.lookup(&KeyView::of(&k).unwrap()).unwrap_err().code, "invalid_key");
    assert_eq!(f.cp.query("q"), Some(0), "a failed lookup answers 0, never nil");
}

#[test]
fn l2_prefetch_completes_the_result_and_stale_jobs_release() {
    let f = fx(true);
    let t = tokens(4 * CHUNK);
    f.layout(1);
    f.store(&t, 1, 0, 1);
    let k = key(&t, "r", 1, 1);
    f.cp.lookup(&KeyView::of(&k).unwrap()).unwrap();
    assert_eq!(f.cp.query("r"), None, "nil while the prefetch runs");
    let job = f.cp.prefetch_jobs().try_recv().unwrap();
    assert_eq!((job.hit, job.hashes.len(), job.readers), (1, 3, 1));
    // The Python tier would load chunks 1..3 and lease them; here: stored and leased directly.
    f.store(&t, 1, 0, 3);
    let scope = f.cp.scope("m", 1, 0, 0, "").unwrap();
    let g = f.cp.index.lease_read(&scope, &job.hashes[..2], 1, 0).unwrap();
    assert!(f.cp.prefetch_done(&job, 2, &[g.lease]));
    assert_eq!(f.cp.query("r"), Some(3));
    assert_eq!(f.cp.counters.get(&["lookup_hit_l2_tokens", "m", ""]), 2 * CHUNK as u64);
    // A job of an older lookup releases what it loaded.
    f.cp.lookup(&KeyView::of(&k).unwrap()).unwrap();
    let job2 = f.cp.prefetch_jobs().try_recv().unwrap();
    f.cp.lookup(&KeyView::of(&k).unwrap()).unwrap();
    let before = f.leases();
    let g = f.cp.index.lease_read(&scope, &job2.hashes[..1], 1, 0).unwrap();
    assert!(!f.cp.prefetch_done(&job2, 1, &[g.lease]));
    assert_eq!(f.leases(), before, "the stale job's lease was released");
    f.cp.end_session("r");
    f.cp.index.check_invariants();
}

#[test]
fn a_full_prefetch_queue_answers_the_l1_hit() {
    let f = fx(true);
    let t = tokens(2 * CHUNK);
    f.layout(1);
    for rid in ["a", "b", "c"] {
        let k = key(&t, rid, 1, 1);
        f.cp.lookup(&KeyView::of(&k).unwrap()).unwrap();
    }
    assert_eq!(f.cp.query("c"), Some(0), "queue of 2 full: answered at once");
    assert_eq!(f.cp.counters.get(&["l2_prefetch_skipped", "m", "busy"]), 1);
    assert_eq!(f.cp.query("a"), None);
}

#[test]
fn idle_sessions_expire_and_release() {
    let f = fx(false);
    let t = tokens(2 * CHUNK);
    f.layout(1);
    f.store(&t, 1, 0, 2);
    f.cp.lookup(&KeyView::of(&key(&t, "r", 1, 1)).unwrap()).unwrap();
    assert_eq!(f.cp.index.stats().read_locked_objects, 2);
    f.clock.advance_secs(5.0);
    assert_eq!(f.cp.expire_sessions(10.0), 0);
    f.clock.advance_secs(6.0);
    assert_eq!(f.cp.expire_sessions(10.0), 1);
    assert_eq!(f.cp.index.stats().read_locked_objects, 0);
}

#[test]
fn hybrid_lookups_fold_the_windows_and_lease_only_what_they_need() {
    use workers::GroupSpec;
    let f = fx(false);
    let t = tokens(6 * CHUNK);
    // Full attention (group 0) and a window of 2 chunks (group 1) with tail objects (1|0x10000).
    let layout = Layout {
        groups: vec![
            GroupSpec { id: 0, tail_id: None, span: 0 },
            GroupSpec { id: 1, tail_id: Some(1 | 0x1_0000), span: 2 },
        ],
    };
    f.cp.workers.set_layout("m", 1, layout);
    let hs = f.hashes(&t);
    let put = |group: u32, chunks: &[usize]| {
        let scope = f.cp.scope("m", 1, 0, group, "").unwrap();
        for &c in chunks {
            f.cp.index.reserve_write(&scope, &hs[c..=c], OBJ, 9, false).unwrap();
            f.cp.index.finish_write(&scope, &hs[c..=c], 9, 0, false, 0).unwrap();
        }
    };
    put(0, &[0, 1, 2, 3, 4, 5]);
    // The window holds chunk 4 whole and only the tail of chunk 3: a prefix of 5 needs tail 3 +
    // whole 4; a prefix of 6 would need 4 (tail or whole) and 5 whole, and 5 is missing.
    put(1, &[4]);
    put(1 | 0x1_0000, &[3]);
    let k = key(&t, "r", 1, 1);
    f.cp.lookup(&KeyView::of(&k).unwrap()).unwrap();
    assert_eq!(f.cp.query("r"), Some(5));
    // Leased: 5 chunks of group 0, the tail of 3 and the whole 4 of group 1; nothing else.
    assert_eq!(f.cp.index.stats().read_locked_objects, 7);
    assert_eq!(f.cp.counters.get(&["lookup_misses", "m", "sliding_window"]), 1);
    f.cp.end_session("r");
    assert_eq!(f.cp.index.stats().read_locked_objects, 0);
    f.cp.index.check_invariants();
}

/// A key frame as LMCache's client encodes it (a map; `token_ids` before the other fields).
fn frame(t: &[u32], rid: &str, end: usize) -> Vec<u8> {
    use rmp::encode::{write_array_len, write_map_len, write_nil, write_str, write_uint};
    let mut out = Vec::new();
    write_map_len(&mut out, 8).unwrap();
    write_str(&mut out, "model_name").unwrap();
    write_str(&mut out, "m").unwrap();
    write_str(&mut out, "world_size").unwrap();
    write_uint(&mut out, 1).unwrap();
    write_str(&mut out, "worker_id").unwrap();
    write_nil(&mut out).unwrap();
    write_str(&mut out, "token_ids").unwrap();
    write_array_len(&mut out, t.len() as u32).unwrap();
    for &v in t {
        write_uint(&mut out, u64::from(v)).unwrap();
    }
    write_str(&mut out, "start").unwrap();
    write_uint(&mut out, 0).unwrap();
    write_str(&mut out, "end").unwrap();
    write_uint(&mut out, end as u64).unwrap();
    write_str(&mut out, "request_id").unwrap();
    write_str(&mut out, rid).unwrap();
    write_str(&mut out, "num_kv_readers").unwrap();
    write_uint(&mut out, 1).unwrap();
    out
}

#[test]
fn hashed_keys_look_up_exactly_as_parsed_ones() {
    // The native lookup decodes keys through the byte-keyed memo: a prompt seen before, one
    // that extends it, one that differs inside a chunk, and an `end` inside the array must
    // hit exactly what the parsed key hits.
    let f = fx(false);
    f.layout(1);
    let t: Vec<u32> = (0..6 * CHUNK as u32).map(|i| i * 977 % 70_000).collect();
    f.store(&t, 1, 0, 4);
    let mut longer = t.clone();
    longer.extend(0..40);
    let mut other = t.clone();
    other[2 * CHUNK + 5] += 1;
    let cases: [(&[u32], usize, u64); 5] = [
        (&t, t.len(), 4),
        (&t, t.len(), 4),
        (&longer, longer.len(), 4),
        (&other, other.len(), 2),
        (&t, 3 * CHUNK + 1, 3),
    ];
    for (i, (toks, end, want)) in cases.into_iter().enumerate() {
        let raw = frame(toks, "h", end);
        let hashed = crate::wire::decode_key_hashed(&raw, &f.cp.memo, CHUNK, false).unwrap();
        let parsed = crate::wire::decode_key(&raw).unwrap();
        assert_eq!(hashed.token_span, parsed.token_span);
        let full = f.hashes(toks);
        let chain = hashed.chain.as_ref().unwrap();
        assert_eq!(
            chain.hashes.iter().map(|h| ChunkHash::new(h).unwrap()).collect::<Vec<_>>(),
            full,
            "case {i}"
        );
        f.cp.lookup(&KeyView::of(&hashed).unwrap()).unwrap();
        assert_eq!(f.cp.query("h"), Some(want), "case {i}");
        f.cp.end_session("h");
        if i == 0 {
            // The lookup recorded by their bytes only the chunks L1 holds.
            let again = crate::wire::decode_key_hashed(&raw, &f.cp.memo, CHUNK, false).unwrap();
            assert_eq!(again.chain.unwrap().reused, 4);
        }
    }
    assert!(f.cp.memo.stats().hits > 0);
    assert_eq!(f.leases(), 0);
    f.cp.index.check_invariants();
}
