//! Symbolization per unique stack.
//!
//! A stack is identified before symbolizing by its raw addresses and, for
//! user frames, its process (addresses differ between processes). The
//! first sighting is symbolized (the symbolizer has its own per-frame
//! caches); later ones cost one hash of the addresses and one lookup.

use std::collections::HashMap;

use aperture_core::model::{Stack, StackHash};
use xxhash_rust::xxh3::Xxh3;

/// Raw stacks to symbolized [`Stack`]s; `aperture_probes::Symbolizer` in
/// production, a fake in tests.
pub trait Symbolize {
    /// Kernel frames then user frames, leaf first.
    fn stack(&mut self, pid: u32, kernel: &[u64], user: &[u64]) -> Stack;
}

impl Symbolize for aperture_probes::Symbolizer {
    fn stack(&mut self, pid: u32, kernel: &[u64], user: &[u64]) -> Stack {
        aperture_probes::Symbolizer::stack(self, pid, kernel, user)
    }
}

/// Entries beyond which the cache is emptied (bounds memory; processes
/// come and go, so old stacks are not worth an LRU).
const MAX_ENTRIES: usize = 65_536;

/// Hits and misses of a [`StackCache`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackCacheStats {
    /// Stacks found in the cache.
    pub hits: u64,
    /// Stacks symbolized.
    pub misses: u64,
    /// Times the cache was emptied at its bound.
    pub resets: u64,
}

/// Symbolized stacks by raw identity.
#[derive(Debug, Default)]
pub struct StackCache {
    by_raw: HashMap<u64, StackHash>,
    stacks: HashMap<StackHash, Stack>,
    stats: StackCacheStats,
}

impl StackCache {
    /// An empty cache.
    pub fn new() -> StackCache {
        StackCache::default()
    }

    /// Counters so far.
    pub fn stats(&self) -> StackCacheStats {
        self.stats
    }

    /// The symbolized stack of `(pid, kernel, user)`.
    pub fn stack(&mut self, symbolizer: &mut dyn Symbolize, pid: u32, kernel: &[u64], user: &[u64]) -> &Stack {
        let key = raw_key(pid, kernel, user);
        let hash = match self.by_raw.get(&key) {
            Some(&h) if self.stacks.contains_key(&h) => {
                self.stats.hits += 1;
                h
            }
            _ => {
                self.stats.misses += 1;
                if self.by_raw.len() >= MAX_ENTRIES {
                    self.by_raw.clear();
                    self.stacks.clear();
                    self.stats.resets += 1;
                }
                let stack = symbolizer.stack(pid, kernel, user);
                let h = stack.hash;
                self.by_raw.insert(key, h);
                self.stacks.entry(h).or_insert(stack);
                h
            }
        };
        // Both branches leave `hash` in `stacks`; the fallback keeps this total.
        self.stacks.entry(hash).or_default()
    }
}

fn raw_key(pid: u32, kernel: &[u64], user: &[u64]) -> u64 {
    let mut h = Xxh3::new();
    // Kernel-only stacks are the same in every process.
    let pid = if user.is_empty() { 0 } else { pid };
    h.update(&pid.to_le_bytes());
    h.update(&(kernel.len() as u32).to_le_bytes());
    for a in kernel.iter().chain(user) {
        h.update(&a.to_le_bytes());
    }
    h.digest()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aperture_core::model::StackFrame;

    #[derive(Default)]
    struct Fake {
        calls: usize,
    }

    impl Symbolize for Fake {
        fn stack(&mut self, _pid: u32, kernel: &[u64], user: &[u64]) -> Stack {
            self.calls += 1;
            Stack::new(
                kernel
                    .iter()
                    .chain(user)
                    .map(|a| StackFrame { symbol: format!("f{a:x}"), ..StackFrame::default() })
                    .collect(),
            )
        }
    }

    #[test]
    fn symbolizes_each_unique_stack_once() {
        let mut cache = StackCache::new();
        let mut sym = Fake::default();
        let a = cache.stack(&mut sym, 1, &[0xffff], &[0x10, 0x20]).hash;
        let b = cache.stack(&mut sym, 1, &[0xffff], &[0x10, 0x20]).hash;
        assert_eq!(a, b);
        assert_eq!(sym.calls, 1);
        // Same user addresses in another process: symbolized again (ASLR).
        cache.stack(&mut sym, 2, &[0xffff], &[0x10, 0x20]);
        assert_eq!(sym.calls, 2);
        // Kernel-only stacks are shared across processes.
        cache.stack(&mut sym, 1, &[0xffff], &[]);
        cache.stack(&mut sym, 2, &[0xffff], &[]);
        assert_eq!(sym.calls, 3);
        // The split between kernel and user frames is part of the identity.
        cache.stack(&mut sym, 1, &[0xffff, 0x10], &[0x20]);
        assert_eq!(sym.calls, 4);
        assert_eq!(cache.stats(), StackCacheStats { hits: 2, misses: 4, resets: 0 });
    }
}
