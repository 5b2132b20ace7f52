//! The one stats registry: labelled counters and per-operation request timings, updated with
//! atomics where the work happens (the Rust I/O thread, Python data workers through the
//! bindings) and read as one snapshot by `/metrics` and `/status`.
//!
//! A counter is named by its label tuple (`["lookups", model, salt]`): the first element is the
//! counter, the rest its label values, as the Python metrics collector reads them. A known
//! counter costs a read lock and one `fetch_add`; the first use of a label tuple takes the
//! write lock once. Label cardinality is bounded by what the server admits (models, salts,
//! reasons), not by requests.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use hashbrown::{Equivalent, HashMap};
use parking_lot::RwLock;

/// A label tuple as the registry keeps it.
type Labels = Box<[Box<str>]>;

/// A borrowed label tuple: hashes exactly as the owned [`Labels`] does (a slice of `str`).
struct LabelsRef<'a>(&'a [&'a str]);

impl Hash for LabelsRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // `[&str]` and `[Box<str>]` hash alike: the length, then each `str`.
        self.0.hash(state);
    }
}

impl Equivalent<Labels> for LabelsRef<'_> {
    fn equivalent(&self, key: &Labels) -> bool {
        key.len() == self.0.len() && key.iter().zip(self.0).all(|(a, b)| &**a == *b)
    }
}

/// Labelled counters.
#[derive(Debug, Default)]
pub struct Counters {
    map: RwLock<HashMap<Labels, AtomicU64, foldhash::fast::RandomState>>,
}

impl Counters {
    pub fn add(&self, labels: &[&str], n: u64) {
        if n == 0 {
            return;
        }
        if let Some(c) = self.map.read().get(&LabelsRef(labels)) {
            c.fetch_add(n, Relaxed);
            return;
        }
        let owned: Labels = labels.iter().map(|s| Box::<str>::from(*s)).collect();
        self.map.write().entry(owned).or_insert_with(|| AtomicU64::new(0)).fetch_add(n, Relaxed);
    }

    pub fn get(&self, labels: &[&str]) -> u64 {
        self.map.read().get(&LabelsRef(labels)).map_or(0, |c| c.load(Relaxed))
    }

    /// Every counter and its value.
    pub fn snapshot(&self) -> Vec<(Vec<String>, u64)> {
        let m = self.map.read();
        m.iter().map(|(k, v)| (k.iter().map(|s| s.to_string()).collect(), v.load(Relaxed))).collect()
    }

    pub fn reset(&self) {
        self.map.write().clear();
    }
}

/// Upper bounds (ns) of the request latency buckets; one unbounded bucket follows. The same
/// bounds as `observability/timing.py` (25 µs .. 10 s), which the dashboard and Grafana read.
pub const BUCKETS_NS: [u64; 18] = [
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// One operation's totals: requests, ns in the handler, ns queued for a worker, requests per
/// latency bucket (queue + handler).
#[derive(Debug, Default)]
pub struct OpTimer {
    count: AtomicU64,
    handler_ns: AtomicU64,
    queue_ns: AtomicU64,
    buckets: [AtomicU64; BUCKETS_NS.len() + 1],
}

/// A copy of an [`OpTimer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpTiming {
    pub count: u64,
    pub handler_ns: u64,
    pub queue_ns: u64,
    pub buckets: Vec<u64>,
}

impl OpTimer {
    pub fn record(&self, handler_ns: u64, queue_ns: u64) {
        let total = handler_ns + queue_ns;
        let i = BUCKETS_NS.partition_point(|&b| b < total);
        self.count.fetch_add(1, Relaxed);
        self.handler_ns.fetch_add(handler_ns, Relaxed);
        self.queue_ns.fetch_add(queue_ns, Relaxed);
        self.buckets[i].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> OpTiming {
        OpTiming {
            count: self.count.load(Relaxed),
            handler_ns: self.handler_ns.load(Relaxed),
            queue_ns: self.queue_ns.load(Relaxed),
            buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_and_snapshot() {
        let c = Counters::default();
        c.add(&["lookups", "m", ""], 1);
        c.add(&["lookups", "m", ""], 2);
        c.add(&["lookups", "m", "s"], 5);
        c.add(&["x"], 0);
        assert_eq!(c.get(&["lookups", "m", ""]), 3);
        assert_eq!(c.get(&["lookups", "m", "s"]), 5);
        assert_eq!(c.get(&["x"]), 0);
        let mut snap = c.snapshot();
        snap.sort();
        assert_eq!(snap.len(), 2);
        c.reset();
        assert!(c.snapshot().is_empty());
    }

    #[test]
    fn timer_buckets() {
        let t = OpTimer::default();
        t.record(10_000, 0); // 10 µs: first bucket
        t.record(20_000, 5_000); // 25 µs: first bucket (bounds are inclusive)
        t.record(20_000_000_000, 0); // 20 s: the unbounded bucket
        let s = t.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], 2);
        assert_eq!(s.buckets[BUCKETS_NS.len()], 1);
        assert_eq!(s.queue_ns, 5_000);
    }
}
