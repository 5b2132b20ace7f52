//! Criterion benches of the Rust core (no Python). Run: `cargo bench --bench core`.
//!
//! Targets (issue #2, 2-core machine): lookup+lock of a 128-chunk prefix < 20 µs, hashing a
//! 32k-token prompt < 200 µs, an eviction cycle O(objects evicted) not O(objects held)
//! (compare `evict_cycle/evict_1000_of/*` across sizes and `evict_cycle/idle/*`).

use std::hint::black_box;
use std::sync::atomic::{AtomicU32, Ordering};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use lmcache_rs_core::{
    msgpack_tokens, msgpack_tokens_prefix_serial, none_hash, prefix_hashes, ChainMemo, ChunkHash,
    EvictionPolicy, KeyScope, L1Config, L1Index, Reserve,
};

const OBJ: u64 = 4096;

fn scope() -> KeyScope {
    KeyScope::new("meta-llama/Llama-3.1-8B", 0x0100_0100, 0, "").unwrap()
}

fn hashes(base: u32, n: u32) -> Vec<ChunkHash> {
    (base..base + n)
        .map(|i| {
            let mut b = *blake3::hash(&i.to_le_bytes()).as_bytes();
            b[0] ^= 1;
            ChunkHash::from(b)
        })
        .collect()
}

fn store(idx: &L1Index, s: &KeyScope, hs: &[ChunkHash]) {
    let r = idx.reserve_write(s, hs, OBJ, 1, false).unwrap();
    assert!(r.iter().all(|r| matches!(r, Reserve::Reserved(_))));
    idx.finish_write(s, hs, 1, 0, false, 0).unwrap();
}

/// An index holding `objects` objects in requests of 128 chunks.
fn filled(objects: u32, capacity_objects: u64, cfg: impl FnOnce(&mut L1Config)) -> L1Index {
    let mut c = L1Config::new(capacity_objects * OBJ);
    cfg(&mut c);
    let idx = L1Index::new(c).unwrap();
    let s = scope();
    for base in (0..objects).step_by(128) {
        store(&idx, &s, &hashes(base, 128.min(objects - base)));
    }
    idx
}

fn bench_hashing(c: &mut Criterion) {
    let mut g = c.benchmark_group("hash");
    let tokens_u32: Vec<u32> = (0..32_768u32).map(|i| i.wrapping_mul(2_654_435_761) % 128_000).collect();
    let tokens_i64: Vec<i64> = tokens_u32.iter().map(|&t| i64::from(t)).collect();
    g.throughput(Throughput::Elements(tokens_u32.len() as u64));
    g.bench_function("prefix_32k_tokens_u32", |b| {
        b.iter(|| prefix_hashes(black_box(&tokens_u32), 256, 0, None))
    });
    g.bench_function("prefix_32k_tokens_i64", |b| {
        b.iter(|| prefix_hashes(black_box(&tokens_i64), 256, 0, None))
    });
    // Through the chain memo: every chunk found (a prompt seen before, as every KV hit is),
    // and none found (a new prompt: blake3 plus one insert per chunk).
    let memo = ChainMemo::new(1 << 14);
    memo.prefix_hashes(&tokens_u32, 256, 0, None).unwrap();
    g.bench_function("prefix_32k_tokens_memo_hit", |b| {
        b.iter(|| memo.prefix_hashes(black_box(&tokens_u32), 256, 0, None))
    });
    // Steady state of misses: a full memo, every prompt new (its first token differs), so
    // every chunk is hashed, inserted, and generations rotate.
    let mut variant = tokens_u32.clone();
    g.bench_function("prefix_32k_tokens_memo_miss", |b| {
        b.iter(|| {
            variant[0] = variant[0].wrapping_add(1);
            memo.prefix_hashes(black_box(&variant), 256, 0, None)
        })
    });
    // The wire form (a msgpack array of 3- and 5-byte ints): parse, and parse + hash, as a
    // lookup does. Each element's width decides where the next starts, so one parse is a
    // serial chain; `msgpack_tokens` runs four over parts of the array, interleaved (see
    // `hash::fast_tokens`), and `serial` is the one-chain parser it falls back to.
    let mut raw = vec![0xdd];
    raw.extend_from_slice(&(tokens_u32.len() as u32).to_be_bytes());
    for &t in &tokens_u32 {
        if t <= 0xffff {
            raw.push(0xcd);
            raw.extend_from_slice(&(t as u16).to_be_bytes());
        } else {
            raw.push(0xce);
            raw.extend_from_slice(&t.to_be_bytes());
        }
    }
    g.bench_function("msgpack_32k_tokens_parse_and_hash", |b| {
        b.iter(|| prefix_hashes(&msgpack_tokens(black_box(&raw)).unwrap(), 256, 0, None))
    });
    g.bench_function("msgpack_32k_tokens_parse_and_memo_hit", |b| {
        b.iter(|| memo.prefix_hashes(&msgpack_tokens(black_box(&raw)).unwrap(), 256, 0, None))
    });
    // The lookup's path: chunks found by their msgpack bytes, no id parsed (a prompt seen
    // before, `ChainMemo::msgpack_chain`). Encoded as msgspec does (smallest widths: only
    // those arrays are recorded by their bytes).
    let mut canonical = Vec::new();
    rmp::encode::write_array_len(&mut canonical, tokens_u32.len() as u32).unwrap();
    for &t in &tokens_u32 {
        rmp::encode::write_uint(&mut canonical, u64::from(t)).unwrap();
    }
    memo.msgpack_chain(&canonical, 256).unwrap();
    assert_eq!(memo.msgpack_chain(&canonical, 256).unwrap().reused, 128);
    g.bench_function("msgpack_32k_tokens_memo_bytes_hit", |b| {
        b.iter(|| memo.msgpack_chain(black_box(&canonical), 256).unwrap())
    });
    // A new prompt through the same path: parsed, hashed, recorded in both tables.
    // Its first three ids are fixints, varied each time (header: 3 bytes).
    let mut fresh = Vec::new();
    rmp::encode::write_array_len(&mut fresh, tokens_u32.len() as u32).unwrap();
    for (i, &t) in tokens_u32.iter().enumerate() {
        rmp::encode::write_uint(&mut fresh, if i < 3 { 0 } else { u64::from(t) }).unwrap();
    }
    let mut n = 0u32;
    g.bench_function("msgpack_32k_tokens_memo_bytes_miss", |b| {
        b.iter(|| {
            n += 1;
            fresh[3..6].copy_from_slice(&[(n % 128) as u8, (n / 128 % 128) as u8, (n / 16384 % 128) as u8]);
            memo.msgpack_chain(black_box(&fresh), 256).unwrap()
        })
    });
    g.bench_function("msgpack_32k_tokens_parse_only", |b| {
        b.iter(|| msgpack_tokens(black_box(&raw)).unwrap())
    });
    g.bench_function("msgpack_32k_tokens_parse_only_serial", |b| {
        b.iter(|| msgpack_tokens_prefix_serial(black_box(&raw)).unwrap())
    });
    // The floor: blake3 alone over the same 128 inputs of 32 + 1024 bytes, chained.
    g.bench_function("blake3_floor_128x1056B", |b| {
        let mut buf = vec![7u8; 32 + 1024];
        b.iter(|| {
            for _ in 0..128 {
                let h = *blake3::hash(black_box(&buf)).as_bytes();
                buf[..32].copy_from_slice(&h);
            }
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("none_hash", |b| b.iter(none_hash));
    g.finish();
}

fn bench_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup");
    let idx = filled(100_000, 1 << 20, |_| {});
    let s = scope();
    let prefix = hashes(0, 128);
    g.throughput(Throughput::Elements(128));
    g.bench_function("lookup_lock_128_of_100k", |b| {
        b.iter(|| {
            let g = idx.lease_read(&s, black_box(&prefix), 1, 0).unwrap();
            idx.release_all(g.lease);
            g.hit
        })
    });
    g.bench_function("peek_128_of_100k", |b| b.iter(|| idx.peek(&s, black_box(&prefix))));
    let miss = hashes(10_000_000, 128);
    g.bench_function("lookup_miss_128", |b| {
        b.iter(|| idx.lease_read(&s, black_box(&miss), 1, 0).unwrap().hit)
    });
    g.finish();
}

fn bench_write(c: &mut Criterion) {
    let mut g = c.benchmark_group("write");
    // Room for 100k objects and full: every write demand-evicts (steady state of a busy L1).
    let idx = filled(100_000, 100_000, |_| {});
    let s = scope();
    let next = AtomicU32::new(1_000_000);
    g.throughput(Throughput::Elements(128));
    g.bench_function("reserve_finish_128_with_demand_eviction", |b| {
        b.iter_batched(
            || hashes(next.fetch_add(128, Ordering::Relaxed), 128),
            |hs| store(&idx, &s, &hs),
            BatchSize::SmallInput,
        )
    });
    let roomy = filled(0, 1 << 24, |_| {});
    g.bench_function("reserve_finish_delete_128", |b| {
        b.iter_batched(
            || hashes(next.fetch_add(128, Ordering::Relaxed), 128),
            |hs| {
                store(&roomy, &s, &hs);
                roomy.delete(&s, &hs, false)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn bench_evict(c: &mut Criterion) {
    let mut g = c.benchmark_group("evict_cycle");
    g.sample_size(20);
    for held in [10_000u32, 1_000_000] {
        // Watermark 0 < w: always triggered; ratio picks ~1000 objects whatever `held` is.
        let ratio = 1000.0 / f64::from(held);
        let idx = filled(held, u64::from(held), |c| {
            c.trigger_watermark = 0.5;
            c.eviction_ratio = ratio;
        });
        let s = scope();
        let next = AtomicU32::new(100_000_000);
        g.bench_function(format!("evict_1000_of/{held}"), |b| {
            b.iter_batched(
                || {
                    // Refill what the previous cycle evicted (not timed).
                    let free = (idx.stats().free_bytes / OBJ) as u32;
                    for chunk in (0..free).step_by(128) {
                        store(
                            &idx,
                            &s,
                            &hashes(next.fetch_add(128, Ordering::Relaxed), 128.min(free - chunk)),
                        );
                    }
                },
                |()| {
                    let r = idx.evict_cycle();
                    assert!(r.watermark_evicted_objects >= 999, "{r:?}");
                    r
                },
                BatchSize::PerIteration,
            )
        });
        let idle = filled(held, u64::from(held) * 2, |c| c.trigger_watermark = 0.9);
        g.bench_function(format!("idle/{held}"), |b| b.iter(|| idle.evict_cycle()));
    }
    // IsolatedLRU quota trimming: 1M objects over 8 salts within quota, one salt over by 1000.
    let mut c8 = L1Config::new(2_000_000 * OBJ);
    c8.policy = EvictionPolicy::IsolatedLru;
    c8.trigger_watermark = 1.0;
    let idx = L1Index::new(c8).unwrap();
    let salts: Vec<KeyScope> =
        (0..8).map(|i| KeyScope::new("m", 0x0100_0100, 0, &format!("tenant{i}")).unwrap()).collect();
    for (i, s) in salts.iter().enumerate() {
        idx.set_quota(s.cache_salt(), 125_000 * OBJ).unwrap();
        for base in (0..125_000u32).step_by(125) {
            store(&idx, s, &hashes(i as u32 * 10_000_000 + base, 125));
        }
    }
    let next = AtomicU32::new(200_000_000);
    g.bench_function("quota_trim_1000_of/1000000", |b| {
        b.iter_batched(
            || store(&idx, &salts[0], &hashes(next.fetch_add(1000, Ordering::Relaxed), 1000)),
            |()| {
                let r = idx.evict_cycle();
                assert_eq!(r.quota_evicted_objects, 1000);
                r
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// A whole native lookup as the I/O thread runs it, minus the socket: decode the key frame
/// (ids through the byte-keyed memo), hash, lease the prefix on every rank, answer the query,
/// end the session. 32k tokens, every chunk resident (issue #15's "hit, seen before").
fn bench_control(c: &mut Criterion) {
    use lmcache_rs_core::control::{workers::Layout, ControlConfig, ControlPlane, KeyView};
    use lmcache_rs_core::MonotonicClock;
    use std::sync::Arc;
    let mut g = c.benchmark_group("control");
    let tokens: Vec<u32> = (0..32_768u32).map(|i| i.wrapping_mul(2_654_435_761) % 128_000).collect();
    let model = "meta-llama/Llama-3.1-8B";
    for world in [1u32, 8] {
        let index = Arc::new(L1Index::new(L1Config::new(4096 * OBJ)).unwrap());
        let memo = Arc::new(ChainMemo::new(1 << 14));
        let cfg = ControlConfig { chunk_size: 256, l2_prefetch: false, prefetch_queue: 64 };
        let cp = ControlPlane::new(cfg, index.clone(), memo.clone(), Arc::new(MonotonicClock::new()));
        cp.workers.set_layout(model, world, Layout::plain());
        let hs: Vec<ChunkHash> = memo
            .prefix_hashes(&tokens, 256, 0, None)
            .unwrap()
            .iter()
            .map(|h| ChunkHash::new(h).unwrap())
            .collect();
        for r in 0..world {
            store(&index, &cp.scope(model, world, r, 0, "").unwrap(), &hs);
        }
        let frame = key_frame(model, world, &tokens);
        let once = || {
            let k = lmcache_rs_core::decode_key_hashed(black_box(&frame), &memo, 256, false).unwrap();
            cp.lookup(&KeyView::of(&k).unwrap()).unwrap();
            assert_eq!(cp.query("bench"), Some(128));
            cp.end_session("bench");
        };
        once();
        g.bench_function(format!("lookup_32k_hit_seen_before/world_{world}"), |b| b.iter(once));
        if world == 1 {
            // A new prompt each time (its first id differs): every chunk parsed, hashed,
            // recorded in both memo tables, missed in L1.
            let mut n = 0u32;
            g.bench_function("lookup_32k_miss_new_prompt/world_1", |b| {
                b.iter_batched(
                    || {
                        n += 1;
                        let mut t = tokens.clone();
                        t[0] = 100_000 + n % 20_000;
                        key_frame(model, world, &t)
                    },
                    |frame| {
                        let k = lmcache_rs_core::decode_key_hashed(&frame, &memo, 256, false).unwrap();
                        cp.lookup(&KeyView::of(&k).unwrap()).unwrap();
                        assert_eq!(cp.query("bench"), Some(0));
                        cp.end_session("bench");
                    },
                    BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

/// An `IPCCacheServerKey` frame as LMCache's client sends it (msgspec: smallest int encodings).
fn key_frame(model: &str, world: u32, tokens: &[u32]) -> Vec<u8> {
    use rmp::encode::{write_array_len, write_map_len, write_nil, write_str, write_uint};
    let mut out = Vec::new();
    write_map_len(&mut out, 9).unwrap();
    write_str(&mut out, "model_name").unwrap();
    write_str(&mut out, model).unwrap();
    write_str(&mut out, "world_size").unwrap();
    write_uint(&mut out, u64::from(world)).unwrap();
    write_str(&mut out, "worker_id").unwrap();
    write_nil(&mut out).unwrap();
    write_str(&mut out, "token_ids").unwrap();
    write_array_len(&mut out, tokens.len() as u32).unwrap();
    for &t in tokens {
        write_uint(&mut out, u64::from(t)).unwrap();
    }
    for (name, v) in [("start", 0u64), ("end", tokens.len() as u64)] {
        write_str(&mut out, name).unwrap();
        write_uint(&mut out, v).unwrap();
    }
    for (name, v) in [("request_id", "bench"), ("cache_salt", "")] {
        write_str(&mut out, name).unwrap();
        write_str(&mut out, v).unwrap();
    }
    write_str(&mut out, "num_kv_readers").unwrap();
    write_uint(&mut out, 1).unwrap();
    out
}

criterion_group!(benches, bench_hashing, bench_lookup, bench_write, bench_evict, bench_control);
criterion_main!(benches);
