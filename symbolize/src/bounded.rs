//! [`Bounded`], the one bounded cache the symbolizer's frame and process
//! caches and the agent's stack cache are made of.

use std::collections::HashMap;
use std::hash::Hash;

/// A map bounded in weight (by default one per entry) that forgets what was
/// used least recently.
///
/// Entries live in two generations. A hit in the previous one moves the
/// entry to the current one; when an insertion would take the current one
/// past half the bound, it becomes the previous one and the old previous
/// one is dropped. So an entry used at least once per half a bound's worth
/// of insertions is never evicted, and the map never holds more than the
/// bound (plus the one entry that started a generation, when a single entry
/// is heavier than half of it). Lookups and insertions cost a hash lookup or
/// two; nothing is ordered or scanned.
#[derive(Debug)]
pub struct Bounded<K, V> {
    current: HashMap<K, V>,
    previous: HashMap<K, V>,
    /// Weight of the current generation.
    current_weight: usize,
    /// Weight at which the current generation becomes the previous one.
    half: usize,
    weigh: fn(&V) -> usize,
    evicted: u64,
    rotations: u64,
}

impl<K: Eq + Hash, V> Bounded<K, V> {
    /// A map of at most `capacity` entries.
    pub fn new(capacity: usize) -> Bounded<K, V> {
        Bounded::weighted(capacity, |_| 1)
    }

    /// A map of at most about `max_weight`, each entry weighing `weigh(value)`
    /// (bytes, say). `weigh` is called on insertion and when an entry moves
    /// to the current generation.
    pub fn weighted(max_weight: usize, weigh: fn(&V) -> usize) -> Bounded<K, V> {
        Bounded {
            current: HashMap::new(),
            previous: HashMap::new(),
            current_weight: 0,
            half: (max_weight / 2).max(1),
            weigh,
            evicted: 0,
            rotations: 0,
        }
    }

    /// The entry, moved to the current generation if it was in the previous one.
    pub fn get(&mut self, key: &K) -> Option<&mut V> {
        if !self.current.contains_key(key) {
            let (k, v) = self.previous.remove_entry(key)?;
            self.make_room((self.weigh)(&v));
            self.current.insert(k, v);
        }
        self.current.get_mut(key)
    }

    /// The entry, made by `make` if it is in neither generation (moved to
    /// the current one if it was in the previous one).
    pub fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        if !self.current.contains_key(&key) {
            let value = self.previous.remove(&key).unwrap_or_else(make);
            self.make_room((self.weigh)(&value));
            return self.current.entry(key).or_insert(value);
        }
        // Held in the current generation: `make` is not called.
        self.current.entry(key).or_insert_with(make)
    }

    /// Inserts or replaces the entry for `key`, in the current generation.
    pub fn insert(&mut self, key: K, value: V) {
        if let Some(old) = self.current.remove(&key) {
            self.current_weight = self.current_weight.saturating_sub((self.weigh)(&old));
        } else {
            self.previous.remove(&key);
        }
        self.make_room((self.weigh)(&value));
        self.current.insert(key, value);
    }

    /// Accounts for an entry of `weight` about to go into the current
    /// generation, first making that the previous one if it would pass half
    /// the bound.
    fn make_room(&mut self, weight: usize) {
        if self.current_weight + weight > self.half && !self.current.is_empty() {
            self.evicted += self.previous.len() as u64;
            self.rotations += 1;
            self.previous = std::mem::take(&mut self.current);
            self.current_weight = 0;
        }
        self.current_weight += weight;
    }

    /// Removes the entry for `key`.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        match self.current.remove(key) {
            Some(v) => {
                self.current_weight = self.current_weight.saturating_sub((self.weigh)(&v));
                Some(v)
            }
            None => self.previous.remove(key),
        }
    }

    /// Keeps only the entries for which `keep` returns true.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        let weigh = self.weigh;
        let mut dropped = 0;
        self.current.retain(|k, v| {
            let kept = keep(k, v);
            if !kept {
                dropped += weigh(v);
            }
            kept
        });
        self.current_weight = self.current_weight.saturating_sub(dropped);
        self.previous.retain(keep);
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries dropped at the bound so far.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Times the least recently used generation was dropped at the bound.
    pub fn rotations(&self) -> u64 {
        self.rotations
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
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

    #[test]
    fn weight_bounds_the_generations() {
        let mut b: Bounded<u32, Vec<u8>> = Bounded::weighted(100, Vec::len);
        for k in 0..50 {
            b.insert(k, vec![0; 10]);
            let held: usize = (0..=k).filter_map(|k| b.current.get(&k).or(b.previous.get(&k))).map(Vec::len).sum();
            assert!(held <= 100, "{held} bytes held after {k}");
        }
        // Five entries of 10 fill a generation of 50.
        assert_eq!(b.len(), 10);
        assert_eq!(b.rotations(), 9);
        // Replacing an entry does not count it twice.
        b.insert(49, vec![0; 10]);
        b.insert(49, vec![0; 10]);
        assert_eq!(b.len(), 10);
        assert_eq!(b.rotations(), 9);
    }

    #[test]
    fn insertion_replaces_an_entry_of_the_previous_generation() {
        let mut b: Bounded<u32, u32> = Bounded::new(4);
        b.insert(1, 1);
        b.insert(2, 2);
        b.insert(3, 3); // 1 and 2 become the previous generation
        b.insert(1, 10);
        assert_eq!(b.len(), 3, "1 is held once");
        assert_eq!(b.get(&1).copied(), Some(10));
        b.retain(|&k, _| k != 3);
        assert_eq!(b.len(), 2);
        assert_eq!(*b.get_or_insert_with(7, || 70), 70);
        assert_eq!(*b.get_or_insert_with(7, || 71), 70, "an entry held is not made again");
    }
}
