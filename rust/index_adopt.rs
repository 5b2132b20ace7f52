//! Re-adopting objects whose bytes survived a restart (a warm L1, `storage/warm.py`).
//!
//! A restarted server finds the previous server's shared-memory pool and a journal saying which
//! object was sealed at which offset with which checksum. Python verifies each object's bytes
//! against its checksum; [`L1Index::adopt`] then makes the verified ones resident *at the
//! offsets they already occupy*: the arena allocates exactly those ranges
//! ([`Arena::allocate_at`](crate::arena::Arena::allocate_at)), the entries enter the LRU list in
//! the order given (the caller passes least recently used first, so they are evicted first),
//! and per-salt and per-model accounting counts them like any admitted object.
//!
//! Adoption never displaces anything: a range that is not free (another adopted object, a
//! staged write) or a key already resident refuses that one object and keeps the rest. It is
//! one call under the index lock, O(n log f) for n objects and f free blocks.
//!
//! Adopted objects are not counted as admissions (`counters.admitted_*` stay "since start");
//! the caller reports how many it adopted and dropped.

use super::*;

/// What [`L1Index::adopt`] did with one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adopted {
    /// Resident now, at its old offset.
    Adopted,
    /// The key is already resident (an earlier item of the call, or a store): not adopted.
    Duplicate,
    /// Its range is not free (it overlaps an adopted or staged object): not adopted.
    Overlap,
    /// Its range is unaligned, empty or outside the arena: not adopted.
    Invalid,
}

impl Adopted {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Adopted => "adopted",
            Self::Duplicate => "duplicate",
            Self::Overlap => "overlap",
            Self::Invalid => "invalid",
        }
    }
}

/// One object to adopt: its key and the range `[offset, offset + size)` its bytes occupy.
#[derive(Debug, Clone)]
pub struct AdoptItem {
    pub scope: KeyScope,
    pub hash: ChunkHash,
    pub offset: u64,
    pub size: u64,
}

impl L1Index {
    /// Makes each object resident at its given range, least recently used first; one outcome
    /// per item, in order. See the module documentation.
    pub fn adopt(&self, items: &[AdoptItem]) -> Vec<Adopted> {
        let mut g = self.locked();
        items.iter().map(|it| g.adopt_one(it)).collect()
    }
}

impl Inner {
    fn adopt_one(&mut self, it: &AdoptItem) -> Adopted {
        // The size must be exactly what an allocation of it occupies: a journal written with
        // another alignment describes ranges this arena would not hand out.
        if it.size == 0 || self.arena.rounded(it.size).ok() != Some(it.size) {
            return Adopted::Invalid;
        }
        let (model, salt) = self.intern_scope(&it.scope);
        let key = ikey(it.hash, &it.scope, model, salt);
        let outcome = if self.resident.contains_key(&key) {
            Adopted::Duplicate
        } else {
            match self.arena.allocate_at(it.offset, it.size) {
                Ok(alloc) => {
                    let id = self.new_entry(Entry {
                        key,
                        alloc,
                        state: State::Resident,
                        links: Links::default(),
                        deadline: 0,
                        writer: 0,
                        readers: 0,
                        temporary: false,
                    });
                    self.resident.insert(key, id);
                    let s = self.salts.at(salt);
                    s.objects += 1;
                    s.bytes += alloc.size;
                    self.models.at(model).refs += 1;
                    let dk = self.drop_key(id);
                    self.droplog.forget(&dk);
                    self.lru_push_back(id);
                    Adopted::Adopted
                }
                Err(CoreError::Inconsistent(_)) => Adopted::Overlap,
                Err(_) => Adopted::Invalid,
            }
        };
        // A refused item may have interned a salt or model nothing uses.
        self.gc_salt(salt);
        self.gc_model(model);
        outcome
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const OBJ: u64 = 4096;

    fn scope(salt: &str) -> KeyScope {
        KeyScope::new("model", 0x0100_0100, 0, salt).unwrap()
    }

    fn h(i: u32) -> ChunkHash {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&i.to_be_bytes());
        ChunkHash::from(b)
    }

    fn item(salt: &str, i: u32, slot: u64) -> AdoptItem {
        AdoptItem { scope: scope(salt), hash: h(i), offset: slot * OBJ, size: OBJ }
    }

    fn index(objects: u64, policy: EvictionPolicy) -> L1Index {
        let mut cfg = L1Config::new(objects * OBJ);
        cfg.policy = policy;
        L1Index::new(cfg).unwrap()
    }

    #[test]
    fn adopted_objects_are_resident_where_they_were() {
        let idx = index(8, EvictionPolicy::Lru);
        let out = idx.adopt(&[item("", 1, 5), item("a", 2, 0), item("", 3, 2)]);
        idx.check_invariants();
        assert_eq!(out, vec![Adopted::Adopted; 3]);
        let slots = idx.resolve(&scope(""), &[h(1), h(3)]);
        assert_eq!(slots[0].unwrap().alloc, Allocation { offset: 5 * OBJ, size: OBJ });
        assert_eq!(slots[1].unwrap().alloc, Allocation { offset: 2 * OBJ, size: OBJ });
        let st = idx.stats();
        assert_eq!((st.resident_objects, st.used_bytes), (3, 3 * OBJ));
        assert_eq!(idx.salt_usage("a"), OBJ);
        assert_eq!(st.counters.admitted_objects, 0, "adoption is not an admission");
        // They are read like any object.
        let g = idx.lease_read(&scope(""), &[h(1)], 1, 0).unwrap();
        assert_eq!((g.hit, g.slots[0].offset), (1, 5 * OBJ));
        idx.release_all(g.lease);
        idx.check_invariants();
    }

    #[test]
    fn overlaps_duplicates_and_bad_ranges_are_refused_one_by_one() {
        let idx = index(8, EvictionPolicy::Lru);
        let bad_size = AdoptItem { size: OBJ + 1, ..item("", 9, 6) };
        let out = idx.adopt(&[
            item("", 1, 0),
            item("", 2, 0),                            // same range
            item("", 1, 3),                            // same key elsewhere
            item("x", 4, 8),                           // past the end
            AdoptItem { offset: 7, ..item("", 5, 1) }, // unaligned
            bad_size,
            AdoptItem { size: 2 * OBJ, ..item("", 6, 6) },
        ]);
        idx.check_invariants();
        use Adopted::{Duplicate, Invalid, Overlap};
        assert_eq!(
            out,
            vec![Adopted::Adopted, Overlap, Duplicate, Invalid, Invalid, Invalid, Adopted::Adopted]
        );
        assert_eq!(idx.stats().used_bytes, 3 * OBJ);
        // The refused item of salt "x" left no salt behind (check_invariants would say).
        assert!(idx.stats().salts.iter().all(|s| s.cache_salt != "x"));
    }

    #[test]
    fn adoption_respects_staged_writes_and_lru_order() {
        let idx = index(4, EvictionPolicy::Lru);
        let r = idx.reserve_write(&scope(""), &[h(100)], OBJ, 7, false).unwrap();
        let Reserve::Reserved(staged) = r[0] else { panic!("{r:?}") };
        let other = (0..4).map(|s| s * OBJ).find(|&o| o != staged.offset).unwrap();
        let out = idx.adopt(&[
            AdoptItem { offset: staged.offset, ..item("", 1, 0) },
            AdoptItem { offset: other, ..item("", 2, 0) },
        ]);
        assert_eq!(out, vec![Adopted::Overlap, Adopted::Adopted]);
        idx.finish_write(&scope(""), &[h(100)], 7, 0, false, 0).unwrap();
        idx.check_invariants();
        // Fill the rest; then demand eviction takes the adopted object (least recent) first.
        let free: Vec<u64> = (0..4).map(|s| s * OBJ).filter(|&o| o != staged.offset && o != other).collect();
        let out = idx.adopt(
            &free
                .iter()
                .enumerate()
                .map(|(i, &o)| AdoptItem { offset: o, ..item("", 10 + i as u32, 0) })
                .collect::<Vec<_>>(),
        );
        assert_eq!(out, vec![Adopted::Adopted; 2]);
        let r = idx.reserve_write(&scope(""), &[h(200)], OBJ, 7, false).unwrap();
        assert!(matches!(r[0], Reserve::Reserved(a) if a.offset == other), "{r:?}");
        idx.check_invariants();
    }

    #[test]
    fn isolated_lru_accounts_adopted_objects_per_salt() {
        let idx = index(8, EvictionPolicy::IsolatedLru);
        idx.set_quota("a", OBJ).unwrap();
        let out = idx.adopt(&[item("a", 1, 0), item("a", 2, 1), item("b", 3, 2)]);
        assert_eq!(out, vec![Adopted::Adopted; 3]);
        idx.check_invariants();
        assert_eq!((idx.salt_usage("a"), idx.salt_usage("b")), (2 * OBJ, OBJ));
        // Over quota ("a") and unregistered ("b": limit 0) salts are trimmed by the cycle.
        let report = idx.evict_cycle();
        idx.check_invariants();
        assert_eq!(report.quota_evicted_objects, 2);
        assert_eq!((idx.salt_usage("a"), idx.salt_usage("b")), (OBJ, 0));
        assert_eq!(idx.peek(&scope("a"), &[h(2)]), 1, "the later (more recent) object stays");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Any list of ranges: what is adopted never overlaps, the invariants hold, and every
        /// adopted object is found at its range.
        #[test]
        fn random_adoptions_keep_invariants(items in prop::collection::vec((0u32..40, 0u64..20, 1u64..4, 0u8..3), 1..60)) {
            let idx = index(16, EvictionPolicy::Lru);
            let salts = ["", "a", "b"];
            let list: Vec<AdoptItem> = items
                .iter()
                .map(|&(k, slot, n, s)| AdoptItem { size: n * OBJ, ..item(salts[s as usize], k, slot) })
                .collect();
            let out = idx.adopt(&list);
            idx.check_invariants();
            let mut taken: Vec<(u64, u64)> = Vec::new();
            for (it, o) in list.iter().zip(&out) {
                if *o == Adopted::Adopted {
                    let slot = idx.resolve(&it.scope, &[it.hash])[0].unwrap();
                    prop_assert_eq!(slot.alloc, Allocation { offset: it.offset, size: it.size });
                    for &(a, z) in &taken {
                        prop_assert!(it.offset + it.size <= a || a + z <= it.offset);
                    }
                    taken.push((it.offset, it.size));
                }
            }
            prop_assert_eq!(idx.stats().used_bytes, taken.iter().map(|t| t.1).sum::<u64>());
        }
    }
}
