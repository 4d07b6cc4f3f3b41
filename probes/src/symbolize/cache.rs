//! The bounded maps the symbolizer's caches are made of.

use std::collections::HashMap;
use std::hash::Hash;

/// A map bounded to `capacity` entries that forgets what was used least
/// recently: entries live in a current and a previous generation; a hit in
/// the previous one moves the entry to the current one, and when the
/// current one is full it becomes the previous one (the old previous one
/// is dropped). An entry used at least once per `capacity / 2` insertions
/// is never evicted.
#[derive(Debug)]
pub(crate) struct Bounded<K, V> {
    current: HashMap<K, V>,
    previous: HashMap<K, V>,
    half: usize,
    evicted: u64,
}

impl<K: Eq + Hash, V> Bounded<K, V> {
    pub(crate) fn new(capacity: usize) -> Bounded<K, V> {
        Bounded { current: HashMap::new(), previous: HashMap::new(), half: (capacity / 2).max(1), evicted: 0 }
    }

    pub(crate) fn get(&mut self, key: &K) -> Option<&mut V> {
        if !self.current.contains_key(key) {
            let (k, v) = self.previous.remove_entry(key)?;
            self.insert(k, v);
        }
        self.current.get_mut(key)
    }

    pub(crate) fn insert(&mut self, key: K, value: V) {
        if self.current.len() >= self.half && !self.current.contains_key(&key) {
            self.evicted += self.previous.len() as u64;
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key, value);
    }

    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        self.current.remove(key).or_else(|| self.previous.remove(key))
    }

    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        self.current.retain(&mut keep);
        self.previous.retain(&mut keep);
    }

    pub(crate) fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    /// Entries dropped at the bound so far.
    pub(crate) fn evicted(&self) -> u64 {
        self.evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_map_evicts_least_recently_used() {
        let mut b: Bounded<u32, u32> = Bounded::new(8);
        for k in 0..4 {
            b.insert(k, k);
        }
        // Keep 0 in use while 100 more keys pass through.
        for k in 10..110 {
            assert_eq!(b.get(&0).copied(), Some(0));
            b.insert(k, k);
            assert!(b.len() <= 8, "{} entries", b.len());
        }
        assert_eq!(b.get(&0).copied(), Some(0), "an entry in use survives");
        assert!(b.get(&1).is_none() && b.get(&50).is_none(), "unused ones were evicted");
        assert!(b.get(&109).is_some(), "the newest is there");
        assert!(b.evicted() >= 90);
        assert_eq!(b.remove(&0), Some(0));
        assert!(b.get(&0).is_none());
    }
}
