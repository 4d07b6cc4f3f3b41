//! Symbolization per unique stack.
//!
//! A stack is identified before symbolizing by its raw addresses and, for
//! user frames, its process (addresses differ between processes). The
//! first sighting is symbolized (the symbolizer has its own per-frame
//! caches); later ones cost one hash of the addresses and one lookup.

use aperture_core::model::{Stack, StackHash};
use aperture_symbolize::Bounded;
use xxhash_rust::xxh3::Xxh3;

/// Raw stacks to symbolized [`Stack`]s; `aperture_probes::Symbolizer` in
/// production, a fake in tests.
pub trait Symbolize {
    /// Kernel frames then user frames, leaf first.
    fn stack(&mut self, pid: u32, kernel: &[u64], user: &[u64]) -> Stack;

    /// Periodic housekeeping (forget what belongs to exited processes,
    /// give back memory).
    fn housekeeping(&mut self) {}
}

impl Symbolize for aperture_probes::Symbolizer {
    fn stack(&mut self, pid: u32, kernel: &[u64], user: &[u64]) -> Stack {
        aperture_probes::Symbolizer::stack(self, pid, kernel, user)
    }

    fn housekeeping(&mut self) {
        self.forget_exited();
        self.release_file_pages();
    }
}

/// Raw identities remembered (16 bytes each plus the table's overhead).
const MAX_RAW: usize = 32_768;
/// Approximate bytes of symbolized stacks kept. A stack of 30 frames with
/// typical names is ~4 KiB, so this holds about a thousand distinct stacks;
/// the symbolizer's own frame caches make re-symbolizing an evicted one
/// cheap.
const MAX_STACK_BYTES: usize = 4 << 20;

/// Hits and misses of a [`StackCache`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackCacheStats {
    /// Stacks found in the cache.
    pub hits: u64,
    /// Stacks symbolized.
    pub misses: u64,
    /// Times the least recently used part of the cache was dropped at its bound.
    pub resets: u64,
}

/// Approximate heap and table bytes of a stack.
pub(crate) fn stack_bytes(stack: &Stack) -> usize {
    let strings: usize = stack.frames.iter().map(|f| f.symbol.len() + f.module.len() + f.file.len()).sum();
    64 + size_of::<Stack>() + stack.frames.len() * size_of::<aperture_core::model::StackFrame>() + strings
}

/// Symbolized stacks by raw identity, bounded in memory.
#[derive(Debug)]
pub struct StackCache {
    by_raw: Bounded<u64, StackHash>,
    stacks: Bounded<StackHash, Stack>,
    hits: u64,
    misses: u64,
}

impl Default for StackCache {
    fn default() -> Self {
        StackCache::with_limits(MAX_RAW, MAX_STACK_BYTES)
    }
}

impl StackCache {
    /// An empty cache.
    pub fn new() -> StackCache {
        StackCache::default()
    }

    /// An empty cache of at most `raw` raw identities and about
    /// `stack_bytes` bytes of symbolized stacks.
    pub fn with_limits(raw: usize, stack_bytes: usize) -> StackCache {
        StackCache {
            by_raw: Bounded::new(raw),
            stacks: Bounded::weighted(stack_bytes, self::stack_bytes),
            hits: 0,
            misses: 0,
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> StackCacheStats {
        StackCacheStats {
            hits: self.hits,
            misses: self.misses,
            resets: self.by_raw.rotations() + self.stacks.rotations(),
        }
    }

    /// (raw identities, symbolized stacks) held now.
    pub fn len(&self) -> (usize, usize) {
        (self.by_raw.len(), self.stacks.len())
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.by_raw.len() == 0
    }

    /// The symbolized stack of `(pid, kernel, user)`.
    pub fn stack(&mut self, symbolizer: &mut dyn Symbolize, pid: u32, kernel: &[u64], user: &[u64]) -> &Stack {
        let key = raw_key(pid, kernel, user);
        let known = self.by_raw.get(&key).copied();
        if let Some(h) = known
            && self.stacks.get(&h).is_some()
        {
            self.hits += 1;
            // Held: the symbolizer is not called.
            return self.stacks.get_or_insert_with(h, || symbolizer.stack(pid, kernel, user));
        }
        self.misses += 1;
        let stack = symbolizer.stack(pid, kernel, user);
        let h = stack.hash;
        if known.is_none() {
            self.by_raw.insert(key, h);
        }
        // Another raw identity may have symbolized to the same stack.
        self.stacks.get_or_insert_with(h, || stack)
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

    #[test]
    fn memory_stays_bounded_and_hot_stacks_stay_cached() {
        // Room for ~8 stacks of this size.
        let one = stack_bytes(&Fake::default().stack(1, &[0xffff], &[0x10, 0x20]));
        let mut cache = StackCache::with_limits(16, 8 * one);
        let mut sym = Fake::default();
        for i in 0..1000u64 {
            // One hot stack, used between every new one.
            cache.stack(&mut sym, 1, &[0xffff], &[0x10, 0x20]);
            cache.stack(&mut sym, 1, &[0xffff], &[0x1000 + i, 0x20]);
            let (raw, stacks) = cache.len();
            assert!(raw <= 16 && stacks <= 8, "{raw} raw identities, {stacks} stacks");
        }
        assert!(cache.stats().resets > 0);
        assert_eq!(sym.calls, 1001, "the hot stack was symbolized once, every other stack once");
        // An evicted stack is symbolized again, transparently.
        let again = cache.stack(&mut sym, 1, &[0xffff], &[0x1000, 0x20]).frames[1].symbol.clone();
        assert_eq!(again, "f1000");
        assert_eq!(sym.calls, 1002);
    }
}
