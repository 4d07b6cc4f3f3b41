//! Per-CPU perf-buffer reader.
//!
//! Each loaded BPF object writes events to its `ap_events` perf event array.
//! Instead of aya's reader (which asks the kernel for a wakeup per event),
//! the reader opens one `PERF_COUNT_SW_BPF_OUTPUT` ring per CPU itself with a
//! wakeup *watermark*, so one wakeup carries many records, and polls all of
//! them with mio from one thread. Rings that never reach the watermark are
//! still swept every [`ReaderConfig::flush_interval`].
//!
//! Records are decoded into [`RecordBatch`]es (no allocation per event) and
//! handed to a [`BatchSink`] supplied by the caller.

mod batch;
mod buffer;
mod ring;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

pub use batch::{DecodeError, EventRecord, RecordBatch};
pub(crate) use buffer::{PERF_ATTR_SIZE_VER0, PERF_TYPE_SOFTWARE, PerfBuffer, PerfEventAttr, perf_event_open_cpu};
pub use ring::SplitBytes;
use ring::{Record, frame_records};

/// Events a new batch has room for before it grows: most wakeups carry
/// far fewer than [`ReaderConfig::max_batch_events`], and a batch that is
/// recycled keeps what it grew to, so starting small keeps idle memory low
/// without growing on the hot path in a steady state.
pub const INITIAL_BATCH_EVENTS: usize = 256;

/// How the reader sizes its rings and batches.
#[derive(Clone, Debug)]
pub struct ReaderConfig {
    /// Data pages per CPU ring (power of two). 64 pages = 256 KiB with 4 KiB pages.
    pub pages_per_cpu: usize,
    /// Bytes that must be waiting in a ring before the kernel wakes the
    /// reader. Defaults to a quarter of the ring.
    pub watermark_bytes: Option<u32>,
    /// Longest time a record waits in a ring below the watermark.
    pub flush_interval: Duration,
    /// A batch is handed over once it holds at least this many events.
    pub max_batch_events: usize,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        ReaderConfig {
            pages_per_cpu: 64,
            watermark_bytes: None,
            flush_interval: Duration::from_millis(200),
            max_batch_events: 4096,
        }
    }
}

impl ReaderConfig {
    /// The watermark in effect for a ring of `ring_bytes`.
    pub fn watermark_for(&self, ring_bytes: usize) -> u32 {
        let default = (ring_bytes / 4).max(1);
        let w = self.watermark_bytes.map_or(default, |w| w as usize);
        w.clamp(1, ring_bytes.saturating_sub(1).max(1)) as u32
    }
}

/// Receives the reader's batches (on the reader thread).
pub trait BatchSink: Send + 'static {
    /// Takes a batch holding at least one event, loss or decode error.
    fn deliver(&mut self, batch: RecordBatch);

    /// An emptied batch to fill next, if the sink gets batches back from its
    /// consumer; `None` makes the reader allocate a fresh one.
    fn recycle(&mut self) -> Option<RecordBatch> {
        None
    }
}

impl<F: FnMut(RecordBatch) + Send + 'static> BatchSink for F {
    fn deliver(&mut self, batch: RecordBatch) {
        self(batch)
    }
}

/// Counters of the reader thread (monotonic; read them any time).
#[derive(Debug, Default)]
pub struct ReaderStats {
    /// Returns from poll (watermark wakeups and flush timeouts).
    pub wakeups: AtomicU64,
    /// Events decoded and delivered.
    pub events: AtomicU64,
    /// Records the kernel reported lost because a ring was full.
    pub lost: AtomicU64,
    /// Samples that could not be decoded, and rings that had to be skipped
    /// after a corrupt header.
    pub malformed: AtomicU64,
    /// Batches delivered.
    pub batches: AtomicU64,
    /// Bytes consumed from the rings.
    pub bytes: AtomicU64,
}

/// Why the reader could not start or failed while running.
#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    /// Opening or mapping the perf ring of one CPU failed.
    #[error(
        "opening the perf ring of CPU {cpu} failed: {source}; check perf_event_paranoid, RLIMIT_MEMLOCK and \
         that the agent has CAP_PERFMON"
    )]
    OpenRing {
        /// The CPU.
        cpu: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Putting a ring into the program's `ap_events` map failed.
    #[error("registering the perf ring of CPU {cpu} in {map} failed: {source}")]
    Register {
        /// The CPU.
        cpu: u32,
        /// Map name.
        map: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Setting up or running the poller failed.
    #[error("perf-buffer poller failed: {0}")]
    Poll(#[source] io::Error),
    /// Starting the reader thread failed.
    #[error("starting the reader thread failed: {0}")]
    Spawn(#[source] io::Error),
    /// The reader thread panicked.
    #[error("the reader thread panicked")]
    Panicked,
}

/// Something the collector can read records from: a live perf ring or, in
/// tests, a fake one.
pub(crate) trait RingSource {
    /// See [`PerfBuffer::consume`].
    fn consume(&mut self, read: &mut dyn FnMut(SplitBytes<'_>) -> usize) -> usize;
}

impl RingSource for PerfBuffer {
    fn consume(&mut self, read: &mut dyn FnMut(SplitBytes<'_>) -> usize) -> usize {
        PerfBuffer::consume(self, read)
    }
}

/// Decodes rings into batches and hands full batches to the sink. Pure
/// logic: no poller, no thread.
pub(crate) struct Collector<S: BatchSink> {
    sink: S,
    batch: RecordBatch,
    max_batch_events: usize,
    stats: Arc<ReaderStats>,
}

impl<S: BatchSink> Collector<S> {
    pub(crate) fn new(sink: S, max_batch_events: usize, stats: Arc<ReaderStats>) -> Collector<S> {
        let max = max_batch_events.max(1);
        Collector {
            sink,
            batch: RecordBatch::with_capacity(max.min(INITIAL_BATCH_EVENTS)),
            max_batch_events: max,
            stats,
        }
    }

    /// Reads everything waiting in `ring` into the current batch, handing
    /// the batch over when it is full.
    pub(crate) fn read(&mut self, ring: &mut dyn RingSource) {
        let batch = &mut self.batch;
        let mut corrupt = 0u64;
        let used = ring.consume(&mut |bytes| {
            let (used, err) = frame_records(bytes, |rec| match rec {
                Record::Sample(raw) => {
                    if batch.push_sample(raw).is_err() {
                        batch.malformed += 1;
                    }
                }
                Record::Lost(n) => batch.lost += n,
                Record::Other => {}
            });
            corrupt += u64::from(err.is_some());
            used
        });
        self.batch.malformed += corrupt;
        self.stats.bytes.fetch_add(used as u64, Ordering::Relaxed);
        if self.batch.len() >= self.max_batch_events {
            self.flush();
        }
    }

    /// Hands the current batch over if it carries anything.
    pub(crate) fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let next = self.sink.recycle().map_or_else(
            || RecordBatch::with_capacity(self.max_batch_events.min(INITIAL_BATCH_EVENTS)),
            |mut b| {
                b.clear();
                b
            },
        );
        let full = std::mem::replace(&mut self.batch, next);
        self.stats.events.fetch_add(full.events.len() as u64, Ordering::Relaxed);
        self.stats.lost.fetch_add(full.lost, Ordering::Relaxed);
        self.stats.malformed.fetch_add(full.malformed, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.sink.deliver(full);
    }
}

const WAKER: Token = Token(usize::MAX);

/// The running reader thread. Stops (and joins) on [`PerfReader::stop`] or drop.
#[derive(Debug)]
pub struct PerfReader {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<Result<(), ReaderError>>>,
    stats: Arc<ReaderStats>,
    rings: usize,
    tid: u32,
}

impl PerfReader {
    /// Starts the thread polling `buffers`.
    pub(crate) fn spawn<S: BatchSink>(
        mut buffers: Vec<PerfBuffer>,
        config: &ReaderConfig,
        sink: S,
    ) -> Result<PerfReader, ReaderError> {
        let poll = Poll::new().map_err(ReaderError::Poll)?;
        for (i, b) in buffers.iter_mut().enumerate() {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(b));
            poll.registry().register(&mut SourceFd(&fd), Token(i), Interest::READABLE).map_err(ReaderError::Poll)?;
        }
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(ReaderError::Poll)?);
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ReaderStats::default());
        let collector = Collector::new(sink, config.max_batch_events, Arc::clone(&stats));
        let flush_interval = config.flush_interval;
        let thread_stop = Arc::clone(&stop);
        let rings = buffers.len();
        let (tid_tx, tid_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("ap-perf-reader".into())
            .spawn(move || {
                crate::threads::started();
                // SAFETY: gettid has no preconditions.
                let _ = tid_tx.send(unsafe { libc::gettid() } as u32);
                read_loop(poll, buffers, collector, flush_interval, &thread_stop)
            })
            .map_err(ReaderError::Spawn)?;
        let tid = tid_rx.recv().unwrap_or(0);
        Ok(PerfReader { stop, waker, thread: Some(thread), stats, rings, tid })
    }

    /// Kernel thread id of the reader thread (for per-thread CPU accounting).
    pub fn thread_id(&self) -> u32 {
        self.tid
    }

    /// The reader's counters.
    pub fn stats(&self) -> &Arc<ReaderStats> {
        &self.stats
    }

    /// Number of rings polled (CPUs times loaded programs).
    pub fn ring_count(&self) -> usize {
        self.rings
    }

    /// Reads what is left in the rings, delivers it, and stops the thread.
    pub fn stop(mut self) -> Result<(), ReaderError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), ReaderError> {
        self.stop.store(true, Ordering::Release);
        // A failed wake only delays the stop until the next flush timeout.
        let _ = self.waker.wake();
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| ReaderError::Panicked)?,
            None => Ok(()),
        }
    }
}

impl Drop for PerfReader {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "perf reader stopped with an error");
        }
    }
}

fn read_loop<S: BatchSink>(
    mut poll: Poll,
    mut buffers: Vec<PerfBuffer>,
    mut collector: Collector<S>,
    flush_interval: Duration,
    stop: &AtomicBool,
) -> Result<(), ReaderError> {
    let mut events = Events::with_capacity(buffers.len() + 1);
    let mut last_sweep = Instant::now();
    loop {
        let timeout = flush_interval.saturating_sub(last_sweep.elapsed());
        if let Err(e) = poll.poll(&mut events, Some(timeout))
            && e.kind() != io::ErrorKind::Interrupted
        {
            return Err(ReaderError::Poll(e));
        }
        collector.stats.wakeups.fetch_add(1, Ordering::Relaxed);
        let stopping = stop.load(Ordering::Acquire);
        if stopping || last_sweep.elapsed() >= flush_interval {
            for b in &mut buffers {
                collector.read(b);
            }
            last_sweep = Instant::now();
        } else {
            for ev in &events {
                if let Some(b) = buffers.get_mut(ev.token().0) {
                    collector.read(b);
                }
            }
        }
        collector.flush();
        if stopping {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::abi::EventKind;
    use crate::reader::batch::tests::{encode, event};
    use crate::reader::ring::tests::FakeRing;

    impl RingSource for FakeRing {
        fn consume(&mut self, read: &mut dyn FnMut(SplitBytes<'_>) -> usize) -> usize {
            let used = read(self.readable());
            self.tail += used as u64;
            used
        }
    }

    type Delivered = Arc<Mutex<Vec<RecordBatch>>>;

    fn collector(max: usize) -> (Collector<impl BatchSink>, Delivered, Arc<ReaderStats>) {
        let got: Delivered = Arc::default();
        let sink_got = Arc::clone(&got);
        let stats = Arc::new(ReaderStats::default());
        let sink = move |b: RecordBatch| sink_got.lock().expect("not poisoned").push(b);
        (Collector::new(sink, max, Arc::clone(&stats)), got, stats)
    }

    fn fill(ring: &mut FakeRing, pid: u32, n: usize) {
        for i in 0..n {
            ring.push_sample(&encode(&event(pid, EventKind::Cpu), &[0xffff_0000 + i as u64], &[0x1000, 0x2000]));
        }
    }

    #[test]
    fn one_wakeup_over_several_rings_gives_one_batch() {
        let mut rings: Vec<FakeRing> = (0..3).map(|i| FakeRing::new(4096).at(4000 + i * 8)).collect();
        for (i, r) in rings.iter_mut().enumerate() {
            fill(r, i as u32 + 1, 5);
        }
        let (mut c, got, stats) = collector(1000);
        for r in &mut rings {
            c.read(r);
        }
        c.flush();
        let got = got.lock().expect("not poisoned");
        assert_eq!(got.len(), 1);
        let b = &got[0];
        assert_eq!(b.len(), 15);
        for e in &b.events {
            assert_eq!(b.user_stack(e), &[0x1000, 0x2000]);
            assert_eq!(b.kernel_stack(e).len(), 1);
        }
        assert_eq!(stats.events.load(Ordering::Relaxed), 15);
        assert!(rings.iter().all(|r| r.tail == r.head), "every ring fully consumed");
    }

    #[test]
    fn batches_are_cut_at_the_size_limit() {
        let mut rings: Vec<FakeRing> = (0..4).map(|_| FakeRing::new(8192)).collect();
        for r in &mut rings {
            fill(r, 9, 10);
        }
        let (mut c, got, stats) = collector(20);
        for r in &mut rings {
            c.read(r);
        }
        c.flush();
        let sizes: Vec<usize> = got.lock().expect("not poisoned").iter().map(RecordBatch::len).collect();
        assert_eq!(sizes, vec![20, 20]);
        assert_eq!(stats.batches.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn kernel_losses_and_bad_samples_are_counted() {
        let mut ring = FakeRing::new(1024).at(1000);
        fill(&mut ring, 1, 1);
        ring.push_lost(17);
        ring.push_sample(&[0u8; 12]); // shorter than an ap_event
        fill(&mut ring, 1, 1);
        let (mut c, got, stats) = collector(100);
        c.read(&mut ring);
        c.flush();
        assert_eq!(got.lock().expect("not poisoned")[0].len(), 2);
        assert_eq!(stats.lost.load(Ordering::Relaxed), 17);
        assert_eq!(stats.malformed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn nothing_is_delivered_for_idle_rings() {
        let mut ring = FakeRing::new(1024);
        let (mut c, got, _) = collector(10);
        c.read(&mut ring);
        c.flush();
        assert!(got.lock().expect("not poisoned").is_empty());
    }

    #[test]
    fn watermark_defaults_to_a_quarter_of_the_ring_and_stays_inside_it() {
        let cfg = ReaderConfig::default();
        assert_eq!(cfg.watermark_for(262_144), 65_536);
        let cfg = ReaderConfig { watermark_bytes: Some(1 << 30), ..ReaderConfig::default() };
        assert_eq!(cfg.watermark_for(4096), 4095);
        let cfg = ReaderConfig { watermark_bytes: Some(0), ..ReaderConfig::default() };
        assert_eq!(cfg.watermark_for(4096), 1);
    }
}
