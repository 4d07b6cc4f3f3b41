//! One per-CPU perf ring: a `PERF_COUNT_SW_BPF_OUTPUT` event opened with a
//! wakeup watermark, and its mmap'd ring.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::reader::ring::{SplitBytes, readable_ranges};

pub(crate) const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_SW_BPF_OUTPUT: u64 = 10;
const PERF_SAMPLE_RAW: u64 = 1 << 10;
/// `perf_event_attr.watermark`: wake up on `wakeup_watermark` bytes.
const ATTR_FLAG_WATERMARK: u64 = 1 << 14;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
/// `PERF_ATTR_SIZE_VER0`: the fields up to `config1`, all this reader needs.
pub(crate) const PERF_ATTR_SIZE_VER0: u32 = 64;
/// Offsets in `struct perf_event_mmap_page`.
const DATA_HEAD_OFFSET: usize = 1024;
const DATA_TAIL_OFFSET: usize = 1032;

/// The first 64 bytes of `struct perf_event_attr` (PERF_ATTR_SIZE_VER0).
#[repr(C)]
#[derive(Default)]
pub(crate) struct PerfEventAttr {
    pub(crate) ty: u32,
    pub(crate) size: u32,
    pub(crate) config: u64,
    /// `sample_period`, or `sample_freq` when the `freq` flag is set.
    pub(crate) sample_period: u64,
    pub(crate) sample_type: u64,
    pub(crate) read_format: u64,
    pub(crate) flags: u64,
    pub(crate) wakeup_watermark: u32,
    pub(crate) bp_type: u32,
    pub(crate) config1: u64,
}
const _: () = assert!(size_of::<PerfEventAttr>() == PERF_ATTR_SIZE_VER0 as usize);

/// `perf_event_open(attr, pid -1, cpu, group -1, CLOEXEC)`: an event
/// counting every task on `cpu`.
pub(crate) fn perf_event_open_cpu(attr: &PerfEventAttr, cpu: u32) -> io::Result<OwnedFd> {
    // SAFETY: perf_event_open reads `attr.size` bytes from a valid,
    // initialised attr; pid -1 + a cpu selects all tasks on that CPU.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr as *const PerfEventAttr,
            -1 as libc::pid_t,
            cpu as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a non-negative return of perf_event_open is a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as libc::c_int) })
}

/// A per-CPU BPF output ring.
#[derive(Debug)]
pub(crate) struct PerfBuffer {
    cpu: u32,
    fd: OwnedFd,
    /// Start of the mapping: one metadata page then `data_len` bytes.
    base: NonNull<u8>,
    map_len: usize,
    page_size: usize,
    data_len: usize,
}

// SAFETY: the mapping is owned by this value alone; the kernel is the only
// other party and synchronisation with it goes through the atomic head/tail.
unsafe impl Send for PerfBuffer {}

impl PerfBuffer {
    /// Opens the BPF output event of `cpu` with a ring of `data_pages`
    /// pages (a power of two) that wakes the reader once `watermark` bytes
    /// are waiting.
    pub(crate) fn open(cpu: u32, data_pages: usize, watermark: u32) -> io::Result<PerfBuffer> {
        if !data_pages.is_power_of_two() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "ring pages must be a power of two"));
        }
        let attr = PerfEventAttr {
            ty: PERF_TYPE_SOFTWARE,
            size: PERF_ATTR_SIZE_VER0,
            config: PERF_COUNT_SW_BPF_OUTPUT,
            sample_period: 1,
            sample_type: PERF_SAMPLE_RAW,
            flags: ATTR_FLAG_WATERMARK,
            wakeup_watermark: watermark.max(1),
            ..Default::default()
        };
        let fd = perf_event_open_cpu(&attr, cpu)?;
        // SAFETY: sysconf has no memory-safety preconditions.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let data_len = data_pages * page_size;
        let map_len = data_len + page_size;
        // SAFETY: mapping a perf event fd with 1 + 2^n pages is the
        // documented protocol; the result is checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(base.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(PerfBuffer { cpu, fd, base, map_len, page_size, data_len })
    }

    /// The CPU this ring belongs to.
    pub(crate) fn cpu(&self) -> u32 {
        self.cpu
    }

    fn counter(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: the metadata page is mapped for the life of self, the
        // offsets are the 8-byte aligned data_head/data_tail fields of
        // perf_event_mmap_page, and the kernel accesses them atomically.
        unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    /// Hands the readable records to `read`, which returns how many bytes it
    /// consumed; those are released to the kernel. Returns that count.
    pub(crate) fn consume(&mut self, read: impl FnOnce(SplitBytes<'_>) -> usize) -> usize {
        let head = self.counter(DATA_HEAD_OFFSET).load(Ordering::Acquire);
        let tail = self.counter(DATA_TAIL_OFFSET).load(Ordering::Relaxed);
        if head == tail {
            return 0;
        }
        let (a, b) = readable_ranges(self.data_len, tail, head);
        // SAFETY: the data area follows the metadata page and is mapped for
        // the life of self; `a` and `b` lie inside it. The kernel does not
        // write the bytes between data_tail and data_head (the Acquire load
        // above orders our reads after its writes) until data_tail moves
        // past them, and these two slices cover exactly that range and are
        // dropped before data_tail is stored below.
        let used = unsafe {
            let data = self.base.as_ptr().add(self.page_size);
            let first = std::slice::from_raw_parts(data.add(a.start), a.len());
            let second = std::slice::from_raw_parts(data.add(b.start), b.len());
            let bytes = SplitBytes::new(first, second);
            read(bytes).min(bytes.len())
        };
        self.counter(DATA_TAIL_OFFSET).store(tail + used as u64, Ordering::Release);
        used
    }
}

impl AsFd for PerfBuffer {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for PerfBuffer {
    fn drop(&mut self) {
        // SAFETY: base/map_len are the mapping created in open, unmapped once.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.map_len);
        }
    }
}
