//! Intrusive doubly linked lists over a slab, addressed by `u32` slot ids.
//!
//! The index keeps every object in exactly one list (staging, read-locked, or an LRU list), so
//! moving an object between lists or to the recent end is O(1) and allocates nothing: the links
//! live inside the slab entry. `head` is the oldest element, `tail` the newest.

/// "No element".
pub const NIL: u32 = u32::MAX;

/// The prev/next pointers stored inside each slab entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Links {
    pub prev: u32,
    pub next: u32,
}

impl Default for Links {
    fn default() -> Self {
        Self { prev: NIL, next: NIL }
    }
}

/// Slab entries that carry [`Links`].
pub trait Linked {
    fn links(&self) -> &Links;
    fn links_mut(&mut self) -> &mut Links;
}

/// A list head. It does not own its elements; the caller guarantees that an element is in at
/// most one list and is unlinked from the list it is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct List {
    head: u32,
    tail: u32,
    len: u32,
}

impl Default for List {
    fn default() -> Self {
        Self { head: NIL, tail: NIL, len: 0 }
    }
}

impl List {
    pub fn len(&self) -> u32 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The oldest element.
    pub fn head(&self) -> Option<u32> {
        (self.head != NIL).then_some(self.head)
    }

    /// Appends `id` as the newest element.
    pub fn push_back<E: Linked>(&mut self, slab: &mut [E], id: u32) {
        *slab[id as usize].links_mut() = Links { prev: self.tail, next: NIL };
        if self.tail == NIL {
            self.head = id;
        } else {
            slab[self.tail as usize].links_mut().next = id;
        }
        self.tail = id;
        self.len += 1;
    }

    /// Removes `id`, which must be in this list.
    pub fn unlink<E: Linked>(&mut self, slab: &mut [E], id: u32) {
        let Links { prev, next } = *slab[id as usize].links();
        if prev == NIL {
            debug_assert_eq!(self.head, id, "unlinking an element that is not in this list");
            self.head = next;
        } else {
            slab[prev as usize].links_mut().next = next;
        }
        if next == NIL {
            debug_assert_eq!(self.tail, id, "unlinking an element that is not in this list");
            self.tail = prev;
        } else {
            slab[next as usize].links_mut().prev = prev;
        }
        *slab[id as usize].links_mut() = Links::default();
        self.len -= 1;
    }

    /// Moves `id` (in this list) to the newest end.
    pub fn move_to_back<E: Linked>(&mut self, slab: &mut [E], id: u32) {
        if self.tail != id {
            self.unlink(slab, id);
            self.push_back(slab, id);
        }
    }

    /// Iterates oldest to newest (for tests and snapshots).
    pub fn iter<'a, E: Linked>(&self, slab: &'a [E]) -> impl Iterator<Item = u32> + 'a {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            (cur != NIL).then(|| {
                let id = cur;
                cur = slab[id as usize].links().next;
                id
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default, Debug)]
    struct E(Links);
    impl Linked for E {
        fn links(&self) -> &Links {
            &self.0
        }
        fn links_mut(&mut self) -> &mut Links {
            &mut self.0
        }
    }

    #[test]
    fn push_unlink_move() {
        let mut slab: Vec<E> = (0..5).map(|_| E::default()).collect();
        let mut l = List::default();
        for i in 0..5 {
            l.push_back(&mut slab, i);
        }
        assert_eq!(l.iter(&slab).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
        l.unlink(&mut slab, 0);
        l.unlink(&mut slab, 4);
        l.unlink(&mut slab, 2);
        assert_eq!(l.iter(&slab).collect::<Vec<_>>(), [1, 3]);
        l.move_to_back(&mut slab, 1);
        assert_eq!(l.iter(&slab).collect::<Vec<_>>(), [3, 1]);
        assert_eq!((l.len(), l.head()), (2, Some(3)));
        l.unlink(&mut slab, 3);
        l.unlink(&mut slab, 1);
        assert!(l.is_empty());
        assert_eq!(l.head(), None);
    }
}
