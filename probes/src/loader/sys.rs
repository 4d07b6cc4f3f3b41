//! The one raw `bpf(2)` call aya 0.14 has no typed API for: storing a perf
//! event fd in a `PERF_EVENT_ARRAY` map.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;

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
