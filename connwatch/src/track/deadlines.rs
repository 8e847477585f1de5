//! Each socket's next deadline, in a min-heap with lazy removal: setting, moving or
//! cancelling a deadline costs O(log n), and finding what is due costs nothing for the
//! sockets that are not. Nothing here walks every socket.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::FastMap;
use std::hash::Hash;

pub struct Deadlines<K> {
    heap: BinaryHeap<Reverse<(u64, K)>>,
    /// The live deadline of each key; a heap entry whose time is not its key's here is
    /// stale and skipped when it surfaces. (A key moved away and back leaves two equal
    /// entries: the first to surface is taken, and the other is stale then.)
    live: FastMap<K, u64>,
}

impl<K: Copy + Eq + Hash + Ord> Default for Deadlines<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Copy + Eq + Hash + Ord> Deadlines<K> {
    pub fn new() -> Self {
        Deadlines {
            heap: BinaryHeap::new(),
            live: FastMap::default(),
        }
    }

    /// Room for `n` more deadlines, so that loading many at once does not grow the
    /// tables step by step.
    pub fn reserve(&mut self, n: usize) {
        self.heap.reserve(n);
        self.live.reserve(n);
    }

    /// Sets (or moves) the deadline of `key` to `at`.
    pub fn set(&mut self, key: K, at: u64) {
        if self.live.insert(key, at) == Some(at) {
            return;
        }
        self.heap.push(Reverse((at, key)));
        self.compact_if_stale();
    }

    pub fn cancel(&mut self, key: K) {
        self.live.remove(&key);
        self.compact_if_stale();
    }

    pub fn get(&self, key: K) -> Option<u64> {
        self.live.get(&key).copied()
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// The earliest live deadline.
    pub fn next_at(&mut self) -> Option<u64> {
        self.drop_stale_top();
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Removes and returns the keys due at `now`, earliest first.
    pub fn pop_due(&mut self, now: u64) -> Vec<(K, u64)> {
        let mut due = Vec::new();
        loop {
            self.drop_stale_top();
            match self.heap.peek() {
                Some(Reverse((at, key))) if *at <= now => {
                    let (at, key) = (*at, *key);
                    self.heap.pop();
                    self.live.remove(&key);
                    due.push((key, at));
                }
                _ => return due,
            }
        }
    }

    fn drop_stale_top(&mut self) {
        while let Some(Reverse((at, key))) = self.heap.peek() {
            if self.live.get(key) == Some(at) {
                return;
            }
            self.heap.pop();
        }
    }

    /// Rebuilds the heap when stale entries outnumber live ones, so memory follows the
    /// number of deadlines, not the number of changes ever made.
    fn compact_if_stale(&mut self) {
        if self.heap.len() > 2 * self.live.len() + 1024 {
            self.heap = self.live.iter().map(|(k, at)| Reverse((*at, *k))).collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_in_order_and_only_when_due() {
        let mut d = Deadlines::new();
        d.set(1u64, 30);
        d.set(2, 10);
        d.set(3, 20);
        assert_eq!(d.next_at(), Some(10));
        assert_eq!(d.pop_due(5), vec![]);
        assert_eq!(d.pop_due(20), vec![(2, 10), (3, 20)]);
        assert_eq!(d.len(), 1);
        assert_eq!(d.pop_due(100), vec![(1, 30)]);
        assert!(d.is_empty() && d.next_at().is_none());
    }

    #[test]
    fn moving_and_cancelling_leave_no_ghosts() {
        let mut d = Deadlines::new();
        d.set(1u64, 10);
        d.set(1, 50);
        d.set(2, 20);
        d.cancel(2);
        assert_eq!(d.next_at(), Some(50));
        assert_eq!(d.pop_due(40), vec![]);
        assert_eq!(d.pop_due(50), vec![(1, 50)]);
        assert_eq!(d.pop_due(1000), vec![]);
    }

    #[test]
    fn a_deadline_moved_away_and_back_is_due_once() {
        let mut d = Deadlines::new();
        d.set(1u64, 10);
        d.set(1, 50);
        d.set(1, 10);
        d.set(2, 10);
        assert_eq!(d.pop_due(10), vec![(1, 10), (2, 10)]);
        assert_eq!(d.pop_due(100), vec![]);
        assert!(d.is_empty() && d.next_at().is_none());
    }

    #[test]
    fn heap_stays_bounded_under_churn() {
        let mut d = Deadlines::new();
        for round in 0..100u64 {
            for k in 0..100u64 {
                d.set(k, round * 1000 + k);
            }
        }
        assert_eq!(d.len(), 100);
        assert!(d.heap.len() <= 2 * 100 + 1024 + 1);
        let due = d.pop_due(u64::MAX);
        assert_eq!(due.len(), 100);
        assert_eq!(due[0], (0, 99_000));
    }
}
