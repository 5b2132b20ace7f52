//! The lookup fold over a layout's object groups (hybrid models with sliding-window layers;
//! `engine/groups.py` has the model and the store and retrieve sides).
//!
//! A row is one (object group, kv rank). Full attention needs every chunk of a prefix; a
//! window spanning `span` chunks needs only the prefix's last `span` chunks, of which the first
//! may be served by its *tail object* (the still-live end of a chunk whose earlier blocks the
//! engine already freed). The lookup's hit is the longest prefix every row can serve, and it
//! read-leases exactly the chunks each row needs for it, nothing else.

/// What one row holds of a prefix: `whole[j]` / `tail[j]` say whether chunk j's whole / tail
/// object is resident (beyond their length: absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Chunks a window spans (0: full attention).
    pub span: usize,
    pub whole: Vec<bool>,
    pub tail: Vec<bool>,
    /// Prefix sums of `whole` (`sums[j]`: whole objects among chunks `[0, j)`).
    sums: Vec<usize>,
}

impl Row {
    pub fn new(span: usize, whole: Vec<bool>, tail: Vec<bool>) -> Self {
        let mut r = Self { span, whole, tail, sums: Vec::new() };
        r.resum();
        r
    }

    fn resum(&mut self) {
        self.sums.clear();
        self.sums.push(0);
        let mut n = 0;
        for &w in &self.whole {
            n += usize::from(w);
            self.sums.push(n);
        }
    }

    pub fn has_whole(&self, j: usize) -> bool {
        self.whole.get(j).copied().unwrap_or(false)
    }

    pub fn has_tail(&self, j: usize) -> bool {
        self.has_whole(j) || self.tail.get(j).copied().unwrap_or(false)
    }

    /// Whole objects resident among chunks `[lo, hi)`.
    fn wholes(&self, lo: usize, hi: usize) -> usize {
        let last = self.sums.len() - 1;
        self.sums[hi.min(last)] - self.sums[lo.min(last)]
    }

    /// Can this row serve a prefix of `k` chunks?
    pub fn serves(&self, k: usize) -> bool {
        if k == 0 {
            return true;
        }
        if self.span == 0 || k < self.span {
            // Full attention, or a window reaching back before the first token: every chunk.
            return self.wholes(0, k) == k;
        }
        let first = k - self.span;
        self.has_tail(first) && self.wholes(first + 1, k) == k - first - 1
    }

    /// Chunk j's object of that kind is gone (evicted before it could be leased).
    pub fn invalidate(&mut self, tail: bool, j: usize) {
        let seq = if tail { &mut self.tail } else { &mut self.whole };
        if let Some(v) = seq.get_mut(j) {
            *v = false;
        }
        self.resum();
    }
}

/// The longest prefix (in chunks, at most `n`) every row can serve (spec C.6).
pub fn fold(n: usize, rows: &[Row]) -> usize {
    let mut bound = n;
    for r in rows.iter().filter(|r| r.span == 0) {
        // Full attention bounds the search at its resident prefix.
        bound = (0..bound).find(|&p| !r.has_whole(p)).unwrap_or(bound);
    }
    (1..=bound).rev().find(|&k| rows.iter().all(|r| r.serves(k))).unwrap_or(0)
}

/// The chunk ranges `(tail objects?, lo, hi)` a row reads for a prefix of `k` chunks it serves.
pub fn needed(row: &Row, k: usize) -> Vec<(bool, usize, usize)> {
    if k == 0 {
        return vec![];
    }
    if row.span == 0 || k < row.span {
        return vec![(false, 0, k)];
    }
    let first = k - row.span;
    if row.has_whole(first) {
        return vec![(false, first, k)];
    }
    let mut out = vec![(true, first, first + 1)];
    if first + 1 < k {
        out.push((false, first + 1, k));
    }
    out
}

/// A lease on a row's chunks: (row, tail objects?, lo, hi).
pub type Lock = (usize, bool, usize, usize);

/// Folds `rows` into the longest prefix (at most `bound` chunks) they all serve and leases
/// exactly the chunks each needs: `lock((row, tail, lo, hi))` leases the resident prefix of
/// those chunks and says how long it is. A chunk found gone (evicted since its presence was
/// read) is marked absent, what was leased is released (`unlock`), and the fold runs again:
/// at most once per chunk a row lost, so it ends. Returns the prefix and the leases held.
pub fn lock_fold(
    bound: usize,
    rows: &mut [Row],
    mut lock: impl FnMut(Lock) -> usize,
    mut unlock: impl FnMut(Lock),
) -> (usize, Vec<Lock>) {
    loop {
        let hit = fold(bound, rows);
        let mut taken: Vec<Lock> = Vec::new();
        let mut short = None;
        'rows: for (i, row) in rows.iter().enumerate() {
            for (tail, lo, hi) in needed(row, hit) {
                let got = lock((i, tail, lo, hi));
                taken.push((i, tail, lo, lo + got));
                if got < hi - lo {
                    short = Some((i, tail, lo + got));
                    break 'rows;
                }
            }
        }
        let Some((i, tail, j)) = short else { return (hit, taken) };
        for t in taken {
            unlock(t);
        }
        rows[i].invalidate(tail, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Brute force: a row serves k when every chunk its window needs is there.
    fn serves_brute(r: &Row, k: usize) -> bool {
        if k == 0 {
            return true;
        }
        let lo = if r.span == 0 { 0 } else { k.saturating_sub(r.span) };
        (lo..k).all(|j| if j == lo && r.span > 0 && k >= r.span { r.has_tail(j) } else { r.has_whole(j) })
    }

    fn rows() -> impl Strategy<Value = Vec<Row>> {
        prop::collection::vec(
            (
                0usize..4,
                prop::collection::vec(any::<bool>(), 0..10),
                prop::collection::vec(any::<bool>(), 0..10),
            )
                .prop_map(|(span, w, t)| Row::new(span, w, t)),
            1..5,
        )
    }

    fn row(span: usize, whole: &str, tail: &str) -> Row {
        Row::new(span, whole.chars().map(|c| c == 'x').collect(), tail.chars().map(|c| c == 'x').collect())
    }

    #[test]
    fn fold_matches_the_measured_example() {
        // Spec C.6 (window 512, chunks of 256): A (8 chunks) stored with its early sliding
        // blocks null, B (4 chunks) fully stored.
        assert_eq!(fold(8, &[row(0, "xxxxxxxx", ""), row(2, "......xx", "")]), 8);
        assert_eq!(fold(9, &[row(0, "xxxxxxxx.", ""), row(2, "......xx.", "")]), 8); // A + one chunk
        assert_eq!(fold(4, &[row(0, "xxxx", ""), row(2, "....", "")]), 0); // A's first half
        assert_eq!(fold(3, &[row(0, "xxx", ""), row(2, "xxx", "")]), 3); // B's first 3 chunks
        assert_eq!(fold(8, &[row(0, "xxxxxxxx", ""), row(2, "", "")]), 0); // another salt
    }

    #[test]
    fn fold_windows_shorter_and_with_tails() {
        assert_eq!(fold(8, &[row(0, "xxxxxxxx", ""), row(1, ".......x", "")]), 8);
        assert_eq!(fold(8, &[row(0, "xxxxxxxx", ""), row(1, "....x...", "")]), 5);
        // Span 2 with tail objects: the window's first chunk may be a tail, the others not.
        assert_eq!(fold(8, &[row(0, "xxxxxxxx", ""), row(2, ".......x", "......x.")]), 8);
        assert_eq!(fold(8, &[row(0, "xxxxxxxx", ""), row(2, "......x.", ".....x..")]), 7);
        assert_eq!(fold(8, &[row(0, "xxxxxxxx", ""), row(2, ".......x", ".....x..")]), 0);
        // Shorter prefixes than the window need every chunk whole.
        assert_eq!(fold(1, &[row(3, ".", "x")]), 0);
        assert_eq!(fold(2, &[row(3, "xx", "")]), 2);
        // Full attention bounds everything; rows of several ranks must all serve.
        assert_eq!(fold(8, &[row(0, "xxxxx...", ""), row(2, "xxxxxxxx", "")]), 5);
        assert_eq!(fold(8, &[row(0, "xxxxxxxx", ""), row(2, "......xx", ""), row(2, ".....xx.", "")]), 0);
    }

    proptest! {
        #[test]
        fn fold_is_the_longest_prefix_every_row_serves(rs in rows(), n in 0usize..12) {
            let hit = fold(n, &rs);
            prop_assert!(hit <= n);
            prop_assert!(rs.iter().all(|r| serves_brute(r, hit)));
            let best = (0..=n).rev().find(|&k| rs.iter().all(|r| serves_brute(r, k) && (r.span != 0 || (0..k).all(|j| r.has_whole(j))))).unwrap_or(0);
            prop_assert_eq!(hit, best);
            // What a row leases for the hit is resident, of the right kind, and covers exactly
            // its window of the prefix.
            for r in &rs {
                let mut covered: Vec<usize> = needed(r, hit).iter().flat_map(|&(_, lo, hi)| lo..hi).collect();
                covered.sort_unstable();
                let first = if r.span == 0 || hit < r.span { 0 } else { hit - r.span };
                prop_assert_eq!(covered, (first..hit).collect::<Vec<_>>());
                for (tail, lo, hi) in needed(r, hit) {
                    for j in lo..hi {
                        let ok = if tail { r.has_tail(j) } else { r.has_whole(j) };
                        prop_assert!(ok, "leases an absent chunk");
                    }
                }
            }
        }

        #[test]
        fn lock_fold_retries_past_evicted_chunks(rs in rows(), n in 0usize..12, gone in prop::collection::vec((0usize..5, any::<bool>(), 0usize..10), 0..4)) {
            // The index lost some chunks since the rows were read: lock finds them absent.
            let mut truth = rs.clone();
            for &(i, tail, j) in &gone {
                if i < truth.len() {
                    truth[i].invalidate(tail, j);
                }
            }
            let mut rows = rs.clone();
            let held = std::cell::Cell::new(0i64);
            let (hit, taken) = lock_fold(n, &mut rows, |(i, tail, lo, hi)| {
                let got = (lo..hi).take_while(|&j| if tail { truth[i].tail.get(j).copied().unwrap_or(false) } else { truth[i].has_whole(j) }).count();
                held.set(held.get() + 1);
                got
            }, |_| held.set(held.get() - 1));
            // Every chunk it needed was leased, so the truth serves the hit; and the rows only
            // ever believe more than the truth, so no longer prefix exists.
            prop_assert_eq!(hit, fold(n, &truth));
            prop_assert_eq!(held.get() as usize, taken.len());
            prop_assert!(truth.iter().all(|r| serves_brute(r, hit)));
        }
    }
}
