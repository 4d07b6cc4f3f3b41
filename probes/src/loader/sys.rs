//! The raw `bpf(2)` calls aya 0.14 has no typed API for: storing a perf
//! event fd in a `PERF_EVENT_ARRAY` map, writing many array entries in one
//! call, filling a memory-mappable array through a mapping of it (unwind
//! tables), deleting an entry of a map of maps.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// `union bpf_attr` as used by `BPF_MAP_UPDATE_ELEM`.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `map[index] = fd` for a `BPF_MAP_TYPE_PERF_EVENT_ARRAY`.
pub(crate) fn map_update_fd(map: BorrowedFd<'_>, index: u32, fd: BorrowedFd<'_>) -> io::Result<()> {
    let value: u32 = fd.as_raw_fd() as u32;
    let attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        pad: 0,
        key: (&raw const index) as u64,
        value: (&raw const value) as u64,
        flags: 0,
    };
    // SAFETY: attr is a valid BPF_MAP_UPDATE_ELEM attribute whose key and
    // value point to live u32s for the duration of the call.
    let ret = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_UPDATE_ELEM, &raw const attr, size_of::<MapElemAttr>() as libc::c_uint)
    };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// `union bpf_attr` as used by the `BPF_MAP_*_BATCH` commands.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `map[keys[i]] = values[i]` for an array of u64 values, in one call per
/// chunk (`BPF_MAP_UPDATE_BATCH`, 5.6+).
pub(crate) fn array_update_batch(map: BorrowedFd<'_>, keys: &[u32], values: &[u64]) -> io::Result<()> {
    if keys.len() != values.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "keys and values differ in length"));
    }
    for (k, v) in keys.chunks(65536).zip(values.chunks(65536)) {
        let attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: k.as_ptr() as u64,
            values: v.as_ptr() as u64,
            count: k.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: attr is a valid BPF_MAP_UPDATE_BATCH attribute; keys and
        // values point to `count` live elements for the duration of the call.
        let ret = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_UPDATE_BATCH, &raw const attr, size_of::<BatchAttr>() as libc::c_uint)
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Deletes `map[index]` (a map of maps or any map with u32 keys).
pub(crate) fn map_delete_u32(map: BorrowedFd<'_>, index: u32) -> io::Result<()> {
    let attr =
        MapElemAttr { map_fd: map.as_raw_fd() as u32, pad: 0, key: (&raw const index) as u64, value: 0, flags: 0 };
    // SAFETY: attr is a valid BPF_MAP_DELETE_ELEM attribute whose key points
    // to a live u32 for the duration of the call.
    let ret = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_DELETE_ELEM, &raw const attr, size_of::<MapElemAttr>() as libc::c_uint)
    };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_TYPE_ARRAY: u32 = 2;

/// `union bpf_attr` as used by `BPF_MAP_CREATE` (up to `map_name`).
#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// Creates a `BPF_MAP_TYPE_ARRAY` of `max_entries` u64 values named `name`
/// (at most 15 bytes kept).
pub(crate) fn array_u64_create(name: &str, max_entries: u32, flags: u32) -> io::Result<std::os::fd::OwnedFd> {
    map_create(name, BPF_MAP_TYPE_ARRAY, 4, 8, max_entries, flags)
}

/// Creates a map (`BPF_MAP_CREATE`) named `name` (at most 15 bytes kept).
pub(crate) fn map_create(
    name: &str,
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
) -> io::Result<std::os::fd::OwnedFd> {
    let mut map_name = [0u8; 16];
    for (d, s) in map_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: flags,
        inner_map_fd: 0,
        numa_node: 0,
        map_name,
    };
    // SAFETY: attr is a valid BPF_MAP_CREATE attribute; the kernel reads
    // size_of::<MapCreateAttr>() bytes of it and zero-extends the rest.
    let ret = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, &raw const attr, size_of::<MapCreateAttr>() as libc::c_uint)
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a successful BPF_MAP_CREATE returns a new fd we now own.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(ret as i32) })
}

/// Bytes of a map mapped at once while it is filled. The pages of a shared
/// mapping count to this process's resident memory while they are mapped,
/// so a table is copied a window at a time: the agent's resident memory
/// grows by at most this much while it fills a table of any size.
const FILL_WINDOW: usize = 1 << 20;

/// Writes `values` at the start of a `BPF_F_MMAPABLE` array of u64 through
/// shared mappings of it, [`FILL_WINDOW`] bytes at a time: one copy, no
/// per-entry system call work. `values` must not be longer than the array.
pub(crate) fn mmapped_array_fill(
    map: BorrowedFd<'_>,
    mut values: impl ExactSizeIterator<Item = u64>,
) -> io::Result<()> {
    let total = values.len() * 8;
    let mut offset = 0usize;
    while offset < total {
        let len = FILL_WINDOW.min(total - offset);
        // SAFETY: a new shared read-write mapping of `len` bytes of the
        // map's values from `offset` (a multiple of the page size; the
        // kernel refuses a range past the array); nothing else in this
        // process refers to it.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `at` is page-aligned (so aligned for u64) and `len` bytes
        // long, mapped read-write above and unmapped only below.
        let slots = unsafe { std::slice::from_raw_parts_mut(at.cast::<u64>(), len / 8) };
        for (slot, v) in slots.iter_mut().zip(values.by_ref()) {
            *slot = v;
        }
        // SAFETY: unmaps exactly the mapping made above; `slots` is not used after.
        if unsafe { libc::munmap(at, len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        offset += len;
    }
    Ok(())
}
