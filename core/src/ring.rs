//! Lock-free hand-off of batches between threads.
//!
//! A [`Ring`] is a bounded multi-producer queue (crossbeam's array channel)
//! carrying whole batches, never single events. The producer side never
//! blocks: when the ring is full the batch is dropped and counted under
//! [`RingDrop::Full`]; when the consumer is gone it is counted under
//! [`RingDrop::Disconnected`]. The consumer may block with a timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

/// Why a batch was dropped at a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingDrop {
    /// The consumer fell behind and the ring was full.
    Full,
    /// The consumer has shut down.
    Disconnected,
}

impl RingDrop {
    /// Every reason, in a fixed order (for metrics).
    pub const ALL: [RingDrop; 2] = [RingDrop::Full, RingDrop::Disconnected];

    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RingDrop::Full => "ring_full",
            RingDrop::Disconnected => "ring_disconnected",
        }
    }
}

/// Counters shared by both ends of a ring.
#[derive(Debug, Default)]
pub struct RingStats {
    pushed: AtomicU64,
    dropped_full: AtomicU64,
    dropped_disconnected: AtomicU64,
    dropped_items_full: AtomicU64,
    dropped_items_disconnected: AtomicU64,
}

impl RingStats {
    /// Batches accepted by the ring.
    pub fn pushed(&self) -> u64 {
        self.pushed.load(Ordering::Relaxed)
    }

    /// Batches dropped for `reason`.
    pub fn dropped(&self, reason: RingDrop) -> u64 {
        match reason {
            RingDrop::Full => self.dropped_full.load(Ordering::Relaxed),
            RingDrop::Disconnected => self.dropped_disconnected.load(Ordering::Relaxed),
        }
    }

    /// Items (events inside dropped batches, as reported by [`Weighted`]) lost.
    pub fn dropped_items(&self) -> u64 {
        self.dropped_items_for(RingDrop::Full) + self.dropped_items_for(RingDrop::Disconnected)
    }

    /// Items lost in batches dropped for `reason`.
    pub fn dropped_items_for(&self, reason: RingDrop) -> u64 {
        match reason {
            RingDrop::Full => self.dropped_items_full.load(Ordering::Relaxed),
            RingDrop::Disconnected => self.dropped_items_disconnected.load(Ordering::Relaxed),
        }
    }
}

/// How many events a batch carries, so drops can be counted in events too.
pub trait Weighted {
    /// Number of events in the batch.
    fn weight(&self) -> u64;
}

impl<T> Weighted for Vec<T> {
    fn weight(&self) -> u64 {
        self.len() as u64
    }
}

/// Creates a ring holding at most `capacity` batches.
pub fn ring<T: Weighted>(capacity: usize) -> (RingProducer<T>, RingConsumer<T>) {
    let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
    let stats = Arc::new(RingStats::default());
    (RingProducer { tx, stats: Arc::clone(&stats) }, RingConsumer { rx, stats })
}

/// The producing end; clone it for several producers.
#[derive(Debug)]
pub struct RingProducer<T> {
    tx: Sender<T>,
    stats: Arc<RingStats>,
}

impl<T> Clone for RingProducer<T> {
    fn clone(&self) -> Self {
        RingProducer { tx: self.tx.clone(), stats: Arc::clone(&self.stats) }
    }
}

impl<T: Weighted> RingProducer<T> {
    /// Hands a batch over without ever blocking. On failure the batch is
    /// dropped, counted, and the reason returned.
    pub fn push(&self, batch: T) -> Result<(), RingDrop> {
        match self.tx.try_send(batch) {
            Ok(()) => {
                self.stats.pushed.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(TrySendError::Full(b)) => {
                self.stats.dropped_full.fetch_add(1, Ordering::Relaxed);
                self.stats.dropped_items_full.fetch_add(b.weight(), Ordering::Relaxed);
                Err(RingDrop::Full)
            }
            Err(TrySendError::Disconnected(b)) => {
                self.stats.dropped_disconnected.fetch_add(1, Ordering::Relaxed);
                self.stats.dropped_items_disconnected.fetch_add(b.weight(), Ordering::Relaxed);
                Err(RingDrop::Disconnected)
            }
        }
    }

    /// The ring's counters.
    pub fn stats(&self) -> &Arc<RingStats> {
        &self.stats
    }
}

/// The consuming end.
#[derive(Debug)]
pub struct RingConsumer<T> {
    rx: Receiver<T>,
    stats: Arc<RingStats>,
}

/// What [`RingConsumer::pop_timeout`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Pop<T> {
    /// A batch.
    Batch(T),
    /// Nothing arrived in time.
    Empty,
    /// Every producer is gone and the ring is drained.
    Closed,
}

impl<T> RingConsumer<T> {
    /// Takes a batch if one is ready.
    pub fn try_pop(&self) -> Option<T> {
        self.rx.try_recv().ok()
    }

    /// Waits up to `timeout` for a batch.
    pub fn pop_timeout(&self, timeout: Duration) -> Pop<T> {
        match self.rx.recv_timeout(timeout) {
            Ok(b) => Pop::Batch(b),
            Err(RecvTimeoutError::Timeout) => Pop::Empty,
            Err(RecvTimeoutError::Disconnected) => Pop::Closed,
        }
    }

    /// Batches waiting.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    /// Whether no batch is waiting.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// The ring's counters.
    pub fn stats(&self) -> &Arc<RingStats> {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_ring_drops_and_counts_without_blocking() {
        let (tx, rx) = ring::<Vec<u32>>(2);
        assert_eq!(tx.push(vec![1]), Ok(()));
        assert_eq!(tx.push(vec![2, 3]), Ok(()));
        // Would block forever if push waited for room.
        assert_eq!(tx.push(vec![4, 5, 6]), Err(RingDrop::Full));
        assert_eq!(tx.stats().pushed(), 2);
        assert_eq!(tx.stats().dropped(RingDrop::Full), 1);
        assert_eq!(tx.stats().dropped_items(), 3);
        assert_eq!(tx.stats().dropped_items_for(RingDrop::Full), 3);
        assert_eq!(rx.try_pop(), Some(vec![1]));
        assert_eq!(tx.push(vec![7]), Ok(()));
        assert_eq!(rx.len(), 2);
    }

    #[test]
    fn consumer_gone_counts_disconnected() {
        let (tx, rx) = ring::<Vec<u8>>(4);
        drop(rx);
        assert_eq!(tx.push(vec![0; 5]), Err(RingDrop::Disconnected));
        assert_eq!(tx.stats().dropped(RingDrop::Disconnected), 1);
        assert_eq!(tx.stats().dropped_items(), 5);
        assert_eq!(tx.stats().dropped_items_for(RingDrop::Disconnected), 5);
    }

    #[test]
    fn consumer_sees_close_after_drain() {
        let (tx, rx) = ring::<Vec<u8>>(4);
        tx.push(vec![1]).expect("room");
        drop(tx);
        assert_eq!(rx.pop_timeout(Duration::from_millis(1)), Pop::Batch(vec![1]));
        assert_eq!(rx.pop_timeout(Duration::from_millis(1)), Pop::Closed);
    }

    #[test]
    fn producers_on_many_threads_lose_nothing_when_there_is_room() {
        let (tx, rx) = ring::<Vec<u64>>(4096);
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for i in 0..500u64 {
                        tx.push(vec![t * 1000 + i]).expect("room");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("producer thread");
        }
        let mut got = Vec::new();
        while let Some(b) = rx.try_pop() {
            got.extend(b);
        }
        got.sort_unstable();
        let want: Vec<u64> = (0..4u64).flat_map(|t| (0..500).map(move |i| t * 1000 + i)).collect();
        assert_eq!(got, want);
    }
}
