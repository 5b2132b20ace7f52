//! Registered workers as the control plane sees them: their liveness (for `ping` and the
//! reaper) and the object layout of each registered (model, world size), which a lookup needs.
//!
//! The worker contexts themselves (KV tensors, shared memory, prepared operations) stay in
//! Python (`engine/contexts.py`), which registers and removes workers here; everything a
//! control operation reads is here, so `ping` and `lookup` never wait for Python.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use std::collections::HashMap;

use crate::clock::{secs_to_ns, Clock};

/// After its false ping, an unknown instance's pings answer true for this long (at least
/// once), so pings queued while the server was down cannot make it miss its edge.
pub const RETELL_SECS: f64 = 60.0;
/// Unknown instances remembered at once (the oldest is forgotten first).
pub const MAX_TOLD: usize = 4096;

/// One object group of a layout, as a lookup sees it (`engine/groups.py` builds them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSpec {
    /// Its object group id in keys.
    pub id: u32,
    /// The id of its tail objects (windows that are not a multiple of the chunk).
    pub tail_id: Option<u32>,
    /// Chunks its window spans (0: full attention).
    pub span: usize,
}

/// What a lookup needs of a registered (model, world size): its object groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub groups: Vec<GroupSpec>,
}

impl Layout {
    /// One full-attention group with id 0.
    pub fn plain() -> Self {
        Self { groups: vec![GroupSpec { id: 0, tail_id: None, span: 0 }] }
    }

    /// A single full-attention group (L2 prefetch serves only those).
    pub fn is_plain(&self) -> bool {
        matches!(self.groups.as_slice(), [g] if g.span == 0)
    }

    /// Every object group id its keys live in (0, whole and tail objects), sorted.
    pub fn object_groups(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = std::iter::once(0)
            .chain(self.groups.iter().flat_map(|g| std::iter::once(g.id).chain(g.tail_id)))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

#[derive(Debug)]
struct Worker {
    last_seen: u64,
    pinged: bool,
}

#[derive(Debug)]
struct Told {
    at: u64,
    answered_true: bool,
}

#[derive(Debug, Default)]
struct Inner {
    workers: HashMap<u64, Worker>,
    layouts: HashMap<(String, u32), Arc<Layout>>,
    told: HashMap<u64, Told>,
    /// (instance, when told), oldest first.
    told_order: VecDeque<(u64, u64)>,
}

/// Liveness and layouts, behind one short lock.
#[derive(Debug)]
pub struct Workers {
    clock: Arc<dyn Clock>,
    inner: Mutex<Inner>,
}

impl Workers {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self { clock, inner: Mutex::default() }
    }

    /// A worker registered (or re-registered: its liveness is refreshed).
    pub fn add(&self, instance: u64) {
        let now = self.clock.now_ns();
        let mut g = self.inner.lock();
        g.told.remove(&instance);
        g.workers.entry(instance).or_insert(Worker { last_seen: now, pinged: false }).last_seen = now;
    }

    /// A worker unregistered or was reaped.
    pub fn remove(&self, instance: u64) -> bool {
        self.inner.lock().workers.remove(&instance).is_some()
    }

    /// The worker was heard from (any request of its own); false when it is not registered.
    pub fn touch(&self, instance: u64, pinged: bool) -> bool {
        let now = self.clock.now_ns();
        let mut g = self.inner.lock();
        match g.workers.get_mut(&instance) {
            Some(w) => {
                w.last_seen = now;
                w.pinged |= pinged;
                true
            }
            None => false,
        }
    }

    /// A worker's heartbeat (spec J.7). A registered instance answers true and its liveness is
    /// refreshed. One that is not registered (never seen, unregistered or reaped) answers
    /// false, then true: LMCache's worker re-runs its whole registration on that unhealthy ->
    /// healthy edge. Pings keep answering true for [`RETELL_SECS`] (a worker whose
    /// re-registration failed retries it at each), then false again if it is still unknown.
    pub fn ping(&self, instance: u64) -> bool {
        let now = self.clock.now_ns();
        let mut g = self.inner.lock();
        if let Some(w) = g.workers.get_mut(&instance) {
            w.last_seen = now;
            w.pinged = true;
            return true;
        }
        if let Some(t) = g.told.get_mut(&instance) {
            if !t.answered_true || now.saturating_sub(t.at) < secs_to_ns(RETELL_SECS) {
                t.answered_true = true;
                return true;
            }
        }
        g.told.insert(instance, Told { at: now, answered_true: false });
        g.told_order.push_back((instance, now));
        // Forget the oldest told instances beyond MAX_TOLD. The queue may hold stale slots of
        // instances told again since (their `at` differs): skipped, and compacted when the
        // queue outgrows the map.
        while g.told.len() > MAX_TOLD {
            let Some((old, at)) = g.told_order.pop_front() else { break };
            if g.told.get(&old).is_some_and(|t| t.at == at) {
                g.told.remove(&old);
            }
        }
        if g.told_order.len() > 2 * MAX_TOLD {
            let mut order: Vec<(u64, u64)> = g.told.iter().map(|(&id, t)| (id, t.at)).collect();
            order.sort_unstable_by_key(|&(_, at)| at);
            g.told_order = order.into();
        }
        false
    }

    /// Registered instances silent past their budget: `reap_secs` once they pinged, else
    /// `grace_secs` (a worker that never pings is reaped only after the grace).
    pub fn silent(&self, reap_secs: f64, grace_secs: f64) -> Vec<u64> {
        let now = self.clock.now_ns();
        let (reap, grace) = (secs_to_ns(reap_secs), secs_to_ns(grace_secs));
        let g = self.inner.lock();
        let mut out: Vec<u64> = g
            .workers
            .iter()
            .filter(|(_, w)| now.saturating_sub(w.last_seen) > if w.pinged { reap } else { grace })
            .map(|(&id, _)| id)
            .collect();
        out.sort_unstable();
        out
    }

    /// Seconds since the worker was last heard from (None: not registered).
    pub fn last_seen_ago(&self, instance: u64) -> Option<f64> {
        let now = self.clock.now_ns();
        self.inner.lock().workers.get(&instance).map(|w| now.saturating_sub(w.last_seen) as f64 / 1e9)
    }

    pub fn set_layout(&self, model: &str, world_size: u32, layout: Layout) {
        self.inner.lock().layouts.insert((model.to_owned(), world_size), Arc::new(layout));
    }

    pub fn drop_layout(&self, model: &str, world_size: u32) {
        self.inner.lock().layouts.remove(&(model.to_owned(), world_size));
    }

    pub fn layout(&self, model: &str, world_size: u32) -> Option<Arc<Layout>> {
        // A lookup asks on every request: probe without building a String key, share the
        // layout instead of copying it.
        let g = self.inner.lock();
        g.layouts.iter().find(|((m, w), _)| *w == world_size && m == model).map(|(_, l)| l.clone())
    }

    pub fn len(&self) -> usize {
        self.inner.lock().workers.len()
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
    fn ping_false_then_true_then_false_after_retell() {
        let clock = ManualClock::new();
        let w = Workers::new(clock.clone());
        assert!(!w.ping(7));
        assert!(w.ping(7));
        clock.advance_secs(RETELL_SECS - 1.0);
        assert!(w.ping(7));
        clock.advance_secs(2.0);
        assert!(!w.ping(7), "still unknown after the retell window: false again");
        assert!(w.ping(7));
        w.add(7);
        assert!(w.ping(7));
        assert!(w.remove(7));
        assert!(!w.ping(7), "unregistered: told again");
    }

    #[test]
    fn silent_uses_grace_until_pinged() {
        let clock = ManualClock::new();
        let w = Workers::new(clock.clone());
        w.add(1);
        w.add(2);
        assert!(w.ping(2));
        clock.advance_secs(20.0);
        assert_eq!(w.silent(10.0, 30.0), vec![2]);
        clock.advance_secs(20.0);
        assert_eq!(w.silent(10.0, 30.0), vec![1, 2]);
        w.touch(1, false);
        assert_eq!(w.silent(10.0, 30.0), vec![2]);
    }

    #[test]
    fn told_is_bounded() {
        let clock = ManualClock::new();
        let w = Workers::new(clock);
        for i in 0..(MAX_TOLD as u64 + 100) {
            assert!(!w.ping(i));
        }
        assert!(w.inner.lock().told.len() <= MAX_TOLD);
    }

    #[test]
    fn layouts() {
        let w = Workers::new(ManualClock::new());
        assert_eq!(w.layout("m", 2), None);
        let l = Layout::plain();
        w.set_layout("m", 2, l.clone());
        assert_eq!(w.layout("m", 2).as_deref(), Some(&l));
        assert_eq!(w.layout("m", 1), None);
        w.drop_layout("m", 2);
        assert_eq!(w.layout("m", 2), None);
    }
}
