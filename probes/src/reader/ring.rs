//! Framing of perf ring-buffer records, independent of where the bytes live.
//!
//! The readable part of a perf ring (from `data_tail` to `data_head`) is
//! contiguous in ring order but may wrap around the end of the mmap'd data
//! area, so it is handed over as two slices ([`SplitBytes`]). A record can
//! straddle the two; it is decoded from both without copying the record
//! (only the fixed-size headers are copied into locals).
//!
//! This module does no I/O and touches no kernel memory; the tests build
//! fake rings in plain byte arrays.

use std::ops::Range;

/// `PERF_RECORD_LOST`: the kernel dropped records because the ring was full.
pub(crate) const PERF_RECORD_LOST: u32 = 2;
/// `PERF_RECORD_SAMPLE`: for a BPF output event, a raw sample.
pub(crate) const PERF_RECORD_SAMPLE: u32 = 9;
/// Size of `struct perf_event_header`.
pub(crate) const HEADER_LEN: usize = 8;

/// A byte sequence stored as two consecutive slices (the second follows the
/// first in ring order).
#[derive(Clone, Copy, Debug)]
pub struct SplitBytes<'a> {
    first: &'a [u8],
    second: &'a [u8],
}

impl<'a> SplitBytes<'a> {
    /// Joins two slices; `second` logically follows `first`.
    pub fn new(first: &'a [u8], second: &'a [u8]) -> SplitBytes<'a> {
        SplitBytes { first, second }
    }

    /// Total length.
    pub fn len(&self) -> usize {
        self.first.len() + self.second.len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sub-range `[start, start + len)`, or `None` if out of bounds.
    pub fn slice(&self, start: usize, len: usize) -> Option<SplitBytes<'a>> {
        let end = start.checked_add(len)?;
        if end > self.len() {
            return None;
        }
        let n = self.first.len();
        Some(if end <= n {
            SplitBytes::new(&self.first[start..end], &[])
        } else if start >= n {
            SplitBytes::new(&self.second[start - n..end - n], &[])
        } else {
            SplitBytes::new(&self.first[start..], &self.second[..end - n])
        })
    }

    /// Copies `out.len()` bytes starting at `start` into `out`; false if out
    /// of bounds.
    pub fn copy_to(&self, start: usize, out: &mut [u8]) -> bool {
        let Some(range) = self.slice(start, out.len()) else {
            return false;
        };
        let (a, b) = out.split_at_mut(range.first.len());
        a.copy_from_slice(range.first);
        b.copy_from_slice(range.second);
        true
    }

    /// Reads a little-endian u32 at `start`.
    pub fn u32_at(&self, start: usize) -> Option<u32> {
        let mut b = [0u8; 4];
        self.copy_to(start, &mut b).then(|| u32::from_le_bytes(b))
    }

    /// Reads a little-endian u64 at `start`.
    pub fn u64_at(&self, start: usize) -> Option<u64> {
        let mut b = [0u8; 8];
        self.copy_to(start, &mut b).then(|| u64::from_le_bytes(b))
    }

    /// Appends the `count` little-endian u64 values starting at `start` to
    /// `out`; false (and nothing appended) if out of bounds.
    pub fn extend_u64(&self, start: usize, count: usize, out: &mut Vec<u64>) -> bool {
        let Some(range) = count.checked_mul(8).and_then(|len| self.slice(start, len)) else {
            return false;
        };
        if range.second.is_empty() {
            let words = range.first.chunks_exact(8);
            // chunks_exact(8) yields 8-byte slices, so the conversion cannot fail.
            out.extend(words.map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8]))));
        } else {
            out.extend((0..count).filter_map(|i| range.u64_at(i * 8)));
        }
        true
    }
}

/// One framed record.
#[derive(Debug)]
pub(crate) enum Record<'a> {
    /// The raw payload of a `PERF_RECORD_SAMPLE` (what the program passed to
    /// `bpf_perf_event_output`, possibly followed by alignment padding).
    Sample(SplitBytes<'a>),
    /// `PERF_RECORD_LOST` with the number of records the kernel dropped.
    Lost(u64),
    /// Any other record type; skipped.
    Other,
}

/// Why framing stopped before the end of the readable bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// A header announced a size smaller than a header or beyond the
    /// readable bytes: the ring cannot be resynchronised and the rest is
    /// skipped.
    BadSize,
}

/// Calls `each` for every complete record in `bytes` and returns how many
/// bytes were consumed (what the caller adds to `data_tail`). On a framing
/// error every byte is consumed and the error returned with the count.
pub(crate) fn frame_records<'a>(
    bytes: SplitBytes<'a>,
    mut each: impl FnMut(Record<'a>),
) -> (usize, Option<FrameError>) {
    let mut pos = 0;
    while bytes.len() - pos >= HEADER_LEN {
        let mut hdr = [0u8; HEADER_LEN];
        bytes.copy_to(pos, &mut hdr);
        let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let size = usize::from(u16::from_le_bytes([hdr[6], hdr[7]]));
        if size < HEADER_LEN || pos + size > bytes.len() {
            return (bytes.len(), Some(FrameError::BadSize));
        }
        let body = bytes.slice(pos + HEADER_LEN, size - HEADER_LEN);
        match (ty, body) {
            (PERF_RECORD_SAMPLE, Some(body)) => match body.u32_at(0) {
                Some(raw_len) => {
                    let raw_len = (raw_len as usize).min(body.len().saturating_sub(4));
                    if let Some(raw) = body.slice(4, raw_len) {
                        each(Record::Sample(raw));
                    }
                }
                None => return (bytes.len(), Some(FrameError::BadSize)),
            },
            // struct { header; u64 id; u64 lost; }
            (PERF_RECORD_LOST, Some(body)) => each(Record::Lost(body.u64_at(8).unwrap_or(0))),
            _ => each(Record::Other),
        }
        pos += size;
    }
    (pos, None)
}

/// The byte ranges of the data area holding ring positions `[tail, head)`,
/// in ring order, for a data area of `size` bytes (a power of two).
/// Positions are free-running counters as in `perf_event_mmap_page`.
pub(crate) fn readable_ranges(size: usize, tail: u64, head: u64) -> (Range<usize>, Range<usize>) {
    if size == 0 {
        return (0..0, 0..0);
    }
    let avail = head.wrapping_sub(tail).min(size as u64) as usize;
    let start = (tail % size as u64) as usize;
    let first_len = avail.min(size - start);
    (start..start + first_len, 0..avail - first_len)
}

/// [`readable_ranges`] over an in-memory data area.
#[cfg(test)]
pub(crate) fn readable(data: &[u8], tail: u64, head: u64) -> SplitBytes<'_> {
    let (a, b) = readable_ranges(data.len(), tail, head);
    SplitBytes::new(&data[a], &data[b])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fake perf ring: a data area and free-running head/tail counters.
    pub(crate) struct FakeRing {
        pub data: Vec<u8>,
        pub head: u64,
        pub tail: u64,
    }

    impl FakeRing {
        pub fn new(size: usize) -> FakeRing {
            assert!(size.is_power_of_two());
            FakeRing { data: vec![0xAA; size], head: 0, tail: 0 }
        }

        /// Starts both counters at `pos`, so the next record lands there.
        pub fn at(mut self, pos: u64) -> FakeRing {
            self.head = pos;
            self.tail = pos;
            self
        }

        fn write(&mut self, bytes: &[u8]) {
            let size = self.data.len() as u64;
            for b in bytes {
                let i = (self.head % size) as usize;
                self.data[i] = *b;
                self.head += 1;
            }
        }

        /// Writes a PERF_RECORD_SAMPLE carrying `raw`, padded as the kernel does.
        pub fn push_sample(&mut self, raw: &[u8]) {
            let unpadded = HEADER_LEN + 4 + raw.len();
            let size = unpadded.div_ceil(8) * 8;
            let mut rec = Vec::with_capacity(size);
            rec.extend_from_slice(&PERF_RECORD_SAMPLE.to_le_bytes());
            rec.extend_from_slice(&0u16.to_le_bytes());
            rec.extend_from_slice(&(size as u16).to_le_bytes());
            rec.extend_from_slice(&(raw.len() as u32 + (size - unpadded) as u32).to_le_bytes());
            rec.extend_from_slice(raw);
            rec.resize(size, 0);
            self.write(&rec);
        }

        pub fn push_lost(&mut self, lost: u64) {
            let mut rec = Vec::new();
            rec.extend_from_slice(&PERF_RECORD_LOST.to_le_bytes());
            rec.extend_from_slice(&0u16.to_le_bytes());
            rec.extend_from_slice(&24u16.to_le_bytes());
            rec.extend_from_slice(&7u64.to_le_bytes());
            rec.extend_from_slice(&lost.to_le_bytes());
            self.write(&rec);
        }

        pub fn readable(&self) -> SplitBytes<'_> {
            readable(&self.data, self.tail, self.head)
        }
    }

    fn samples(ring: &FakeRing) -> (Vec<Vec<u8>>, Vec<u64>, usize) {
        let mut out = Vec::new();
        let mut lost = Vec::new();
        let (used, err) = frame_records(ring.readable(), |r| match r {
            Record::Sample(s) => {
                let mut v = vec![0; s.len()];
                assert!(s.copy_to(0, &mut v));
                out.push(v);
            }
            Record::Lost(n) => lost.push(n),
            Record::Other => panic!("unexpected record type"),
        });
        assert_eq!(err, None);
        (out, lost, used)
    }

    #[test]
    fn split_bytes_reads_across_the_boundary() {
        let s = SplitBytes::new(&[1, 2, 3], &[4, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(s.len(), 11);
        assert_eq!(s.u32_at(1), Some(u32::from_le_bytes([2, 3, 4, 5])));
        assert_eq!(s.u64_at(3), Some(u64::from_le_bytes([4, 5, 6, 7, 8, 9, 10, 11])));
        assert_eq!(s.u64_at(4), None);
        let mut v = Vec::new();
        assert!(s.extend_u64(2, 1, &mut v));
        assert_eq!(v, vec![u64::from_le_bytes([3, 4, 5, 6, 7, 8, 9, 10])]);
        assert!(!s.extend_u64(2, 2, &mut v));
        assert_eq!(v.len(), 1);
    }

    #[test]
    fn records_that_wrap_around_the_ring_decode_intact() {
        // Every start position of a record relative to the end of the ring
        // (8-byte aligned, as the kernel writes them).
        for start in (0..256u64).step_by(8) {
            let mut ring = FakeRing::new(256).at(start + 1024);
            let a: Vec<u8> = (0..44).collect();
            let b: Vec<u8> = (100..180).collect();
            ring.push_sample(&a);
            ring.push_sample(&b);
            let (got, lost, used) = samples(&ring);
            assert_eq!(used as u64, ring.head - ring.tail, "start {start}");
            assert!(lost.is_empty());
            assert_eq!(got.len(), 2);
            assert_eq!(&got[0][..a.len()], &a[..], "start {start}");
            assert_eq!(&got[1][..b.len()], &b[..], "start {start}");
        }
    }

    #[test]
    fn lost_records_are_reported_with_their_count() {
        let mut ring = FakeRing::new(128).at(112);
        ring.push_sample(&[1; 16]);
        ring.push_lost(42);
        ring.push_sample(&[2; 16]);
        let (got, lost, _) = samples(&ring);
        assert_eq!(got.len(), 2);
        assert_eq!(lost, vec![42]);
    }

    #[test]
    fn a_corrupt_size_consumes_the_rest_and_reports_it() {
        let mut ring = FakeRing::new(64);
        ring.push_sample(&[1; 8]);
        // A header announcing 4 bytes (less than a header).
        let bad = [9, 0, 0, 0, 0, 0, 4, 0];
        ring.data[24..32].copy_from_slice(&bad);
        ring.head += 8;
        let mut n = 0;
        let (used, err) = frame_records(ring.readable(), |_| n += 1);
        assert_eq!(n, 1);
        assert_eq!(used as u64, ring.head - ring.tail);
        assert_eq!(err, Some(FrameError::BadSize));
    }

    #[test]
    fn a_partial_header_is_left_for_later() {
        let mut ring = FakeRing::new(64);
        ring.push_sample(&[1; 8]);
        let complete = ring.head;
        ring.head += 4; // half a header
        let (used, err) = frame_records(ring.readable(), |_| {});
        assert_eq!(err, None);
        assert_eq!(used as u64, complete);
    }
}
