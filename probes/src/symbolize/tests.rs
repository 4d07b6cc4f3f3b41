//! Tests of the symbolizer against real files and processes.

use aperture_symbolize::elf::ElfFile;
use blazesym::inspect::source as inspect;

use super::maps::read_maps;
use super::*;

#[test]
fn own_bpf_programs_are_recognised() {
    assert!(is_own_bpf_frame("bpf_prog_6deef7357e7b4530_ap_lockend_btf"));
    assert!(!is_own_bpf_frame("bpf_prog_6deef7357e7b4530_other_prog"));
    assert!(!is_own_bpf_frame("bpf_trace_run2"));
    assert!(!is_own_bpf_frame("ap_something"));
}

#[inline(never)]
fn symbolize_me() -> u64 {
    std::hint::black_box(7)
}

#[inline(never)]
fn symbolize_me_too() -> u64 {
    std::hint::black_box(8)
}

#[inline(never)]
fn symbolize_a_range(n: u64) -> u64 {
    let mut x = 0u64;
    for i in 0..n {
        x = x.wrapping_mul(31).wrapping_add(std::hint::black_box(i));
    }
    x
}

#[test]
fn addresses_inside_a_resolved_function_are_named_from_its_range() {
    let mut s = Symbolizer::new();
    let pid = std::process::id();
    let start = symbolize_a_range as fn(u64) -> u64 as usize as u64;
    let first = s.stack(pid, &[], &[start]);
    assert!(first.frames[0].symbol.contains("symbolize_a_range"), "{:?}", first.frames[0]);
    let resolved = s.stats().resolved;
    // A return address inside it (a caller's frame: looked up at -1).
    let inside = s.stack(pid, &[], &[start, start + 9]);
    assert!(inside.frames[1].symbol.contains("symbolize_a_range"), "{:?}", inside.frames[1]);
    assert_eq!(inside.frames[1].module, first.frames[0].module);
    assert_eq!(inside.frames[1].module_offset, first.frames[0].module_offset + 9);
    assert_eq!(s.stats().resolved, resolved, "blazesym was asked again for an address of a known function");
    assert_eq!(s.stats().range_hits, 1);
    // Another function is not in that range.
    let other = symbolize_me as fn() -> u64 as usize as u64;
    let elsewhere = s.stack(pid, &[], &[other]);
    assert!(elsewhere.frames[0].symbol.contains("symbolize_me"), "{:?}", elsewhere.frames[0]);
    assert_eq!(s.stats().resolved, resolved + 1);
}

#[test]
fn own_function_resolves_and_unknown_addresses_are_kept() {
    let mut s = Symbolizer::new();
    let addr = symbolize_me as fn() -> u64 as usize as u64;
    let stack = s.stack(std::process::id(), &[], &[addr, 0x10]);
    assert_eq!(stack.frames.len(), 2);
    assert!(stack.frames[0].symbol.contains("symbolize_me"), "{:?}", stack.frames[0]);
    assert!(!stack.frames[0].module.is_empty());
    assert_eq!(stack.frames[1].address, 0x10);
    assert!(stack.frames[1].symbol.is_empty());
    // Second time from the cache.
    let again = s.stack(std::process::id(), &[], &[addr]);
    assert_eq!(again.frames[0].symbol, stack.frames[0].symbol);
    assert_eq!(again.frames[0].module_offset, stack.frames[0].module_offset);
    assert!(s.stats().cache_hits >= 1);
}

#[test]
fn caches_stay_within_their_limits_and_still_resolve() {
    let limits = SymbolizerLimits { user_frames: 4, kernel_frames: 4, processes: 2, open_files: 1, debug_info: false };
    let mut s = Symbolizer::with_limits(limits);
    let pid = std::process::id();
    let a = symbolize_me as fn() -> u64 as usize as u64;
    let b = symbolize_me_too as fn() -> u64 as usize as u64;
    // Many distinct offsets in this binary and in libc.
    let libc_fn = libc::getpid as unsafe extern "C" fn() -> i32 as usize as u64;
    for i in 0..64u64 {
        s.stack(pid, &[], &[a + i, b + i, libc_fn + i]);
        let (user, kernel) = s.cached_frames();
        assert!(user <= 4 && kernel <= 4, "cache over its bound: {user} user, {kernel} kernel");
        assert!(s.open_files() <= 1, "{} files open", s.open_files());
    }
    assert!(s.stats().evictions > 0);
    // After all that eviction, symbols still resolve (files reopened).
    let first = s.stack(pid, &[], &[a]);
    assert!(first.frames[0].symbol.contains("symbolize_me"), "{:?}", first.frames[0]);
    let second = s.stack(pid, &[], &[b]);
    assert!(second.frames[0].symbol.contains("symbolize_me_too"), "{:?}", second.frames[0]);
}

#[test]
fn replaced_files_resolve_through_map_files() {
    // The own binary is replaced on disk if the host path names another
    // inode; simulate by asking for a mapping whose host path is wrong.
    let addr = symbolize_me as fn() -> u64 as usize as u64;
    let pid = std::process::id();
    let mut m = read_maps(pid)
        .and_then(|maps| maps.into_iter().find(|m| m.start <= addr && addr < m.end))
        .expect("own code is mapped");
    m.path = "/nonexistent/replaced-binary".into();
    let mut s = Symbolizer::new();
    let is_root = unsafe_free_is_root();
    match s.openable_path(pid, &m) {
        Some(p) => assert!(p.starts_with(format!("/proc/{pid}/map_files")), "{}", p.display()),
        None => assert!(!is_root, "map_files is readable as root"),
    }
}

#[test]
fn file_pages_are_released_and_symbols_still_resolve() {
    let mut s = Symbolizer::new();
    let addr = symbolize_me as fn() -> u64 as usize as u64;
    let pid = std::process::id();
    assert!(s.stack(pid, &[], &[addr]).frames[0].symbol.contains("symbolize_me"));
    assert!(!s.opened_since_release, "released right after the file was opened");
    assert!(s.release_file_pages() >= 1, "the test binary is mapped by blazesym");
    // Cached and fresh lookups work after the release.
    let again = s.stack(pid, &[], &[addr]);
    assert!(again.frames[0].symbol.contains("symbolize_me"));
    let other = symbolize_me_too as fn() -> u64 as usize as u64;
    assert!(s.stack(pid, &[], &[other]).frames[0].symbol.contains("symbolize_me_too"));
}

#[test]
fn libc_internal_functions_resolve_from_the_maps_file() {
    // Before Linux 6.11 (no PROCMAP_QUERY) the mappings come from
    // /proc/<pid>/maps, which has no build ids: the separate debug file
    // must be found from the build id in the mapped file itself.
    let pid = std::process::id();
    let is_libc = |m: &Mapping| m.path.rsplit('/').next().is_some_and(|n| n.starts_with("libc.so"));
    let Some(libc) = read_maps(pid).and_then(|maps| maps.into_iter().find(is_libc)) else {
        eprintln!("no glibc mapped; nothing to check");
        return;
    };
    let elf = ElfFile::open(Path::new(&libc.path)).expect("libc is an ELF file");
    let build_id = elf.build_id().expect("glibc is linked with a build id");
    let Some(debug) = debug::debug_file_path(&build_id).filter(|p| p.is_file()) else {
        eprintln!("no separate debug file for {} (libc6-dbg); nothing to check", libc.path);
        return;
    };
    // start_thread is local to libc: only the debug file's .symtab has it.
    let inspector = blazesym::inspect::Inspector::new();
    let found = inspector
        .lookup(&inspect::Source::Elf(inspect::Elf::new(&debug)), &["start_thread"])
        .expect("the debug file reads");
    let vaddr = found.first().and_then(|syms| syms.first()).expect("start_thread in the debug file").addr;
    let bias = elf.load_bias(libc.start, libc.offset).expect("a segment covers libc's text");
    let addr = vaddr + bias + 4;

    let mut s = Symbolizer::new();
    s.processes = Processes::new(4).without_procmap_query();
    let frame = s.stack(pid, &[], &[addr]).frames.remove(0);
    assert_eq!(frame.symbol, "start_thread", "{frame:?}");
    assert!(frame.module.starts_with("libc.so"), "{frame:?}");
}

#[test]
fn frames_in_the_vdso_are_named() {
    let pid = std::process::id();
    let vdso = read_maps(pid).and_then(|maps| maps.into_iter().find(|m| m.path == VDSO_PATH));
    let (Some(vdso), Some(own)) = (vdso, VdsoSymbols::own()) else {
        panic!("this process maps a vDSO and reads it");
    };
    let strong = own.symbols().iter().filter(|s| !s.weak && s.size > 4);
    let count = strong.clone().count() as u64;
    assert!(count >= 2, "the vDSO exports functions");
    for with_query in [true, false] {
        let mut s = Symbolizer::new();
        if !with_query {
            s.processes = Processes::new(4).without_procmap_query();
        }
        for sym in strong.clone() {
            // Linked at 0 and mapped from offset 0 (as the kernel does).
            assert_eq!(own.vaddr(sym.addr - vdso.offset), Some(sym.addr));
            let addr = vdso.start + sym.addr - vdso.offset + 4;
            let frame = s.stack(pid, &[], &[addr]).frames.remove(0);
            assert_eq!(frame.symbol, &*sym.name, "{frame:?}");
            assert_eq!((frame.module.as_str(), frame.module_offset), (VDSO_PATH, sym.addr + 4));
        }
        assert_eq!(s.stats().resolved, count);
    }
}

#[test]
fn another_vdso_image_is_not_named_from_the_own() {
    let own = VdsoSymbols::own().expect("this process reads its vDSO");
    let sym = own.symbols().iter().find(|s| s.size > 4).expect("the vDSO exports functions");
    // A mapping called [vdso] of the same length, but other bytes (as
    // a 32-bit process's vDSO would be).
    let other = vec![0u8; own.image_len() as usize];
    let start = other.as_ptr() as u64;
    let m = Mapping {
        start,
        end: start + own.image_len(),
        offset: 0,
        dev: 0,
        inode: 0,
        path: VDSO_PATH.to_owned(),
        build_id: Box::default(),
    };
    let mut s = Symbolizer::new();
    assert_eq!(s.vdso_symbol(std::process::id(), &m, sym.addr + 4), None);
    // Of another length: not even read.
    let shorter = Mapping { end: start + 0x1000, ..m };
    assert_eq!(Symbolizer::new().vdso_symbol(std::process::id(), &shorter, sym.addr + 4), None);
}

fn unsafe_free_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}
