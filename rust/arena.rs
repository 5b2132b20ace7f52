//! Address-space allocator for the one L1 buffer (spec E.1). It hands out offsets; torch owns
//! the bytes.
//!
//! Free space is kept twice: by address (for coalescing and double-free detection) and by
//! `(size, offset)` (for best fit). Allocate and free are O(log f), f = free blocks; there is no
//! per-allocation bookkeeping, the caller keeps `(offset, size)`. Best fit with lowest-address
//! tie break keeps large runs intact when objects have mixed sizes; with the usual one size per
//! model it degenerates to first fit. Invariants (checked by `check_invariants` in tests):
//! free blocks are aligned, disjoint, never adjacent (always coalesced), and
//! `used + sum(free) == capacity`.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{CoreError, CoreResult};

/// One allocated range (size already rounded up to the alignment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Allocation {
    pub offset: u64,
    pub size: u64,
}

/// Snapshot of arena occupancy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ArenaStats {
    pub capacity: u64,
    pub used: u64,
    pub free: u64,
    pub free_blocks: u64,
    pub largest_free: u64,
}

#[derive(Debug)]
pub struct Arena {
    capacity: u64,
    align: u64,
    used: u64,
    by_addr: BTreeMap<u64, u64>,
    by_size: BTreeSet<(u64, u64)>,
}

impl Arena {
    /// `capacity` is rounded down to `align`, which must be a power of two.
    pub fn new(capacity: u64, align: u64) -> CoreResult<Self> {
        if align == 0 || !align.is_power_of_two() {
            return Err(CoreError::InvalidArgument(format!("alignment must be a power of two, got {align}")));
        }
        let capacity = capacity & !(align - 1);
        if capacity == 0 {
            return Err(CoreError::InvalidArgument(format!(
                "capacity must hold at least one aligned block of {align} bytes"
            )));
        }
        let mut arena = Self { capacity, align, used: 0, by_addr: BTreeMap::new(), by_size: BTreeSet::new() };
        arena.insert_free(0, capacity);
        Ok(arena)
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }
    pub fn align(&self) -> u64 {
        self.align
    }
    pub fn used(&self) -> u64 {
        self.used
    }
    pub fn free_bytes(&self) -> u64 {
        self.capacity - self.used
    }

    /// `size` rounded up to the alignment; errors on zero or overflow.
    pub fn rounded(&self, size: u64) -> CoreResult<u64> {
        if size == 0 {
            return Err(CoreError::InvalidArgument("allocation size must be > 0".into()));
        }
        size.checked_add(self.align - 1)
            .map(|s| s & !(self.align - 1))
            .ok_or_else(|| CoreError::InvalidArgument(format!("allocation size {size} overflows")))
    }

    fn insert_free(&mut self, offset: u64, size: u64) {
        self.by_addr.insert(offset, size);
        self.by_size.insert((size, offset));
    }

    fn remove_free(&mut self, offset: u64, size: u64) {
        self.by_addr.remove(&offset);
        self.by_size.remove(&(size, offset));
    }

    /// Best-fit allocation of `size` bytes (rounded up to the alignment).
    pub fn allocate(&mut self, size: u64) -> CoreResult<Allocation> {
        let size = self.rounded(size)?;
        let Some(&(block_size, offset)) = self.by_size.range((size, 0)..).next() else {
            return Err(CoreError::OutOfMemory { requested: size, free: self.free_bytes() });
        };
        self.remove_free(offset, block_size);
        if block_size > size {
            self.insert_free(offset + size, block_size - size);
        }
        self.used += size;
        Ok(Allocation { offset, size })
    }

    /// Allocates exactly `[offset, offset + size)` (size rounded up to the alignment), which
    /// must lie inside one free block: for re-adopting objects whose place is already decided
    /// (a warm restart). O(log f). Refused untouched when unaligned, out of bounds or not free.
    pub fn allocate_at(&mut self, offset: u64, size: u64) -> CoreResult<Allocation> {
        let size = self.rounded(size)?;
        let end =
            offset.checked_add(size).filter(|&e| e <= self.capacity && offset.is_multiple_of(self.align));
        let Some(end) = end else {
            return Err(CoreError::InvalidArgument(format!(
                "range [{offset}, +{size}) is unaligned or outside the arena"
            )));
        };
        let block = self.by_addr.range(..=offset).next_back().map(|(&o, &s)| (o, s));
        let Some((o, s)) = block.filter(|&(o, s)| o + s >= end) else {
            return Err(CoreError::Inconsistent(format!("range [{offset}, {end}) is not free")));
        };
        self.remove_free(o, s);
        if o < offset {
            self.insert_free(o, offset - o);
        }
        if end < o + s {
            self.insert_free(end, o + s - end);
        }
        self.used += size;
        Ok(Allocation { offset, size })
    }

    /// Allocates every size or none: on failure nothing stays allocated.
    pub fn allocate_batch(&mut self, sizes: &[u64]) -> CoreResult<Vec<Allocation>> {
        let mut out = Vec::with_capacity(sizes.len());
        for &size in sizes {
            match self.allocate(size) {
                Ok(a) => out.push(a),
                Err(err) => {
                    let requested = sizes.iter().map(|&s| self.rounded(s).unwrap_or(s)).sum();
                    for a in out {
                        self.free(a).expect("rolling back a fresh allocation");
                    }
                    return Err(match err {
                        CoreError::OutOfMemory { .. } => {
                            CoreError::OutOfMemory { requested, free: self.free_bytes() }
                        }
                        other => other,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Returns a range to the free space, coalescing with its neighbours. A range that is not
    /// aligned, out of bounds or overlaps free space (a double free) is refused untouched.
    pub fn free(&mut self, a: Allocation) -> CoreResult<()> {
        let Allocation { offset, size } = a;
        let end = offset.checked_add(size).filter(|&e| e <= self.capacity);
        let Some(end) = end.filter(|_| size > 0 && offset % self.align == 0 && size % self.align == 0) else {
            return Err(CoreError::Inconsistent(format!(
                "free of [{offset}, +{size}) is unaligned or outside the arena"
            )));
        };
        let prev = self.by_addr.range(..=offset).next_back().map(|(&o, &s)| (o, s));
        let next = self.by_addr.range(offset..).next().map(|(&o, &s)| (o, s));
        if prev.is_some_and(|(o, s)| o + s > offset) || next.is_some_and(|(o, _)| o < end) {
            return Err(CoreError::Inconsistent(format!(
                "free of [{offset}, {end}) overlaps free space (double free?)"
            )));
        }
        let (mut start, mut stop) = (offset, end);
        if let Some((o, s)) = prev.filter(|&(o, s)| o + s == offset) {
            self.remove_free(o, s);
            start = o;
        }
        if let Some((o, s)) = next.filter(|&(o, _)| o == end) {
            self.remove_free(o, s);
            stop = o + s;
        }
        self.insert_free(start, stop - start);
        self.used -= size;
        Ok(())
    }

    /// Whether every byte of `a` is allocated (no free block overlaps it). O(log f).
    pub fn is_allocated(&self, a: Allocation) -> bool {
        let end = a.offset.saturating_add(a.size);
        if end > self.capacity {
            return false;
        }
        let before = self.by_addr.range(..=a.offset).next_back();
        let inside = self.by_addr.range(a.offset..end).next();
        before.is_none_or(|(&o, &s)| o + s <= a.offset) && inside.is_none()
    }

    pub fn stats(&self) -> ArenaStats {
        ArenaStats {
            capacity: self.capacity,
            used: self.used,
            free: self.free_bytes(),
            free_blocks: self.by_addr.len() as u64,
            largest_free: self.by_size.last().map_or(0, |&(s, _)| s),
        }
    }

    /// Verifies the invariants in the module doc; panics with a description otherwise.
    pub fn check_invariants(&self) {
        assert_eq!(self.by_addr.len(), self.by_size.len(), "free indexes disagree");
        let mut free = 0;
        let mut last_end: Option<u64> = None;
        for (&o, &s) in &self.by_addr {
            assert!(s > 0 && o % self.align == 0 && s % self.align == 0, "unaligned free block");
            assert!(self.by_size.contains(&(s, o)), "block missing from size index");
            if let Some(e) = last_end {
                assert!(o > e, "free blocks overlap or touch without coalescing at {o}");
            }
            last_end = Some(o + s);
            free += s;
        }
        assert!(last_end.is_none_or(|e| e <= self.capacity), "free block past capacity");
        assert_eq!(self.used + free, self.capacity, "used + free != capacity");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rounds_and_coalesces() {
        let mut a = Arena::new(10 * 4096 + 100, 4096).unwrap();
        assert_eq!(a.capacity(), 10 * 4096);
        let x = a.allocate(1).unwrap();
        let y = a.allocate(4097).unwrap();
        let z = a.allocate(4096).unwrap();
        assert_eq!((x.size, y.size, z.size), (4096, 8192, 4096));
        assert_eq!(a.used(), 16384);
        a.free(y).unwrap();
        a.free(x).unwrap();
        a.check_invariants();
        assert_eq!(a.stats().free_blocks, 2);
        a.free(z).unwrap();
        a.check_invariants();
        assert_eq!(
            a.stats(),
            ArenaStats { capacity: 40960, used: 0, free: 40960, free_blocks: 1, largest_free: 40960 }
        );
    }

    #[test]
    fn best_fit_prefers_the_smallest_hole() {
        let mut a = Arena::new(16 * 4096, 4096).unwrap();
        let blocks: Vec<_> = [2u64, 1, 3, 1, 9].iter().map(|&n| a.allocate(n * 4096).unwrap()).collect();
        a.free(blocks[0]).unwrap(); // hole of 2 at 0
        a.free(blocks[2]).unwrap(); // hole of 3 at 3
        let got = a.allocate(3 * 4096).unwrap();
        assert_eq!(got.offset, blocks[2].offset);
        let got = a.allocate(4096).unwrap();
        assert_eq!(got.offset, 0);
        a.check_invariants();
    }

    #[test]
    fn batch_is_all_or_nothing() {
        let mut a = Arena::new(4 * 4096, 4096).unwrap();
        let err = a.allocate_batch(&[4096, 4096, 4096, 4096, 4096]).unwrap_err();
        assert_eq!(err, CoreError::OutOfMemory { requested: 5 * 4096, free: 4 * 4096 });
        assert_eq!(a.used(), 0);
        a.check_invariants();
        assert_eq!(a.allocate_batch(&[4096; 4]).unwrap().len(), 4);
        assert!(a.allocate(1).is_err());
    }

    #[test]
    fn double_free_and_bad_ranges_are_refused() {
        let mut a = Arena::new(4 * 4096, 4096).unwrap();
        let x = a.allocate(4096).unwrap();
        a.free(x).unwrap();
        assert!(matches!(a.free(x), Err(CoreError::Inconsistent(_))));
        assert!(a.free(Allocation { offset: 1, size: 4096 }).is_err());
        assert!(a.free(Allocation { offset: 4 * 4096, size: 4096 }).is_err());
        assert!(a.allocate(0).is_err());
        assert!(Arena::new(4096, 3).is_err());
        assert!(Arena::new(100, 4096).is_err());
        a.check_invariants();
    }

    #[test]
    fn allocate_at_takes_exactly_the_range() {
        let mut a = Arena::new(8 * 4096, 4096).unwrap();
        let x = a.allocate_at(2 * 4096, 4096 + 1).unwrap();
        assert_eq!(x, Allocation { offset: 2 * 4096, size: 2 * 4096 });
        a.check_invariants();
        assert_eq!(a.stats().free_blocks, 2);
        assert!(matches!(a.allocate_at(3 * 4096, 4096), Err(CoreError::Inconsistent(_))));
        assert!(matches!(a.allocate_at(4096, 2 * 4096), Err(CoreError::Inconsistent(_))));
        assert!(a.allocate_at(100, 4096).is_err());
        assert!(a.allocate_at(7 * 4096, 2 * 4096).is_err());
        let y = a.allocate_at(0, 2 * 4096).unwrap();
        let z = a.allocate_at(7 * 4096, 4096).unwrap();
        a.check_invariants();
        assert_eq!(a.used(), 5 * 4096);
        for r in [x, y, z] {
            a.free(r).unwrap();
        }
        a.check_invariants();
        assert_eq!(a.stats().free_blocks, 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Random allocate/free sequences keep the invariants, never hand out overlapping
        /// ranges, and free everything back into one block.
        #[test]
        fn random_sequences_keep_invariants(ops in prop::collection::vec((any::<bool>(), 1u64..20_000, any::<prop::sample::Index>()), 1..300)) {
            let mut a = Arena::new(64 * 4096, 4096).unwrap();
            let mut live: Vec<Allocation> = Vec::new();
            for (alloc, size, pick) in ops {
                if alloc || live.is_empty() {
                    if let Ok(x) = a.allocate(size) {
                        for y in &live {
                            prop_assert!(x.offset + x.size <= y.offset || y.offset + y.size <= x.offset);
                        }
                        live.push(x);
                    } else {
                        // OOM only when no free block is large enough.
                        prop_assert!(a.stats().largest_free < a.rounded(size).unwrap());
                    }
                } else {
                    let x = live.swap_remove(pick.index(live.len()));
                    a.free(x).unwrap();
                }
                a.check_invariants();
                prop_assert_eq!(a.used(), live.iter().map(|x| x.size).sum::<u64>());
            }
            for x in live.drain(..) {
                a.free(x).unwrap();
            }
            a.check_invariants();
            prop_assert_eq!(a.stats().free_blocks, 1);
        }
    }
}
