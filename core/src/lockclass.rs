//! What a futex wait is: the class of a user-space lock wait, told by the
//! frames nearest the wait.
//!
//! Every user-space wait that blocks ends in `futex(2)`, so the kernel only
//! sees [`LockKind::Futex`]; contention for a mutex, an idle pool thread on
//! a condition variable and `pthread_join` look alike there. The symbolized
//! user stack tells them apart: the first frame (leaf first, among the
//! [`NEAREST_FRAMES`] nearest the wait) that is the entry point of a known
//! kind of wait decides.
//!
//! Recognised, by the names the symbolizer gives them:
//! - glibc (2.34+, with or without its debug file): `pthread_mutex_lock`
//!   and its internal `___pthread_mutex_lock`, `__pthread_mutex_lock_full`,
//!   `__lll_lock_wait`...; `pthread_rwlock_{rd,wr}lock` and their timed and
//!   clock forms; `pthread_cond_{wait,timedwait,clockwait}`; `sem_wait` and
//!   `__new_sem_wait_slow`...; `pthread_join`, `__pthread_clockjoin_ex`...;
//!   C11's `mtx_lock`, `cnd_wait`, `thrd_join`. Leading underscores, `__GI_`,
//!   `@VERSION` and GCC's clone suffixes (`.constprop.0`) are ignored.
//! - Rust, demangled (legacy `a::B::c` and v0 `<a::B>::c` forms): std's
//!   futex `Mutex`, `RwLock`, `Condvar` and `Thread::join` /
//!   `JoinInner::join`, parking_lot's `RawMutex`, `RawRwLock`, `Condvar`,
//!   and lock_api's `Mutex` / `RwLock`.
//!
//! Anything else (barriers, `pthread_once`, `thread::park`, Go's runtime,
//! a stack cut before any of these) stays [`LockKind::Futex`], "other
//! futex". Without glibc's symbol table (Debian's `libc6-dbg`, found by
//! build id), only its exported names are known: mutex, rwlock and condition
//! variable waits are still recognised, but `sem_wait` and `pthread_join`
//! tail-call internal functions (`__new_sem_wait_slow64`,
//! `__pthread_clockjoin_ex`), so their waits stay "other futex" there.
//!
//! The same knowledge names the caller of a lock ([`wait_caller`]): the
//! first frame outside the lock implementation, which is what a lock table
//! shows rather than glibc's `__lll_lock_wait`.
//!
//! Pure logic over names: no I/O, tested without a kernel.

use crate::model::{LockKind, StackFrame};

/// How many user frames, from the one that made the futex call, are looked
/// at. glibc reaches the syscall within three frames of its entry point,
/// Rust's std within two; further out are the program's own frames.
pub const NEAREST_FRAMES: usize = 8;

/// The class of a futex wait whose stack is `frames` (leaf first, as
/// [`crate::model::Stack::frames`]); kernel frames are skipped.
pub fn futex_wait_class(frames: &[StackFrame]) -> LockKind {
    frames
        .iter()
        .filter(|f| !f.kernel)
        .take(NEAREST_FRAMES)
        .find_map(|f| symbol_class(&f.symbol))
        .unwrap_or(LockKind::Futex)
}

/// The class of a lock wait of kernel-reported `kind` with stack `frames`:
/// futex waits are classified, kernel lock waits keep their kind.
pub fn lock_class(kind: LockKind, frames: &[StackFrame]) -> LockKind {
    if kind == LockKind::Futex { futex_wait_class(frames) } else { kind }
}

/// Index in `frames` (leaf first) of the frame that called into the lock
/// implementation: the first user frame past the outermost wait entry point
/// among the [`NEAREST_FRAMES`] user frames nearest the wait (so a condition
/// variable re-taking its mutex names the caller of `pthread_cond_wait`, and
/// glibc's or std's internals leaf-ward of the entry point are skipped).
/// `None` when no entry point is recognised there, or the stack ends at it.
pub fn wait_caller(frames: &[StackFrame]) -> Option<usize> {
    let outermost = frames
        .iter()
        .enumerate()
        .filter(|(_, f)| !f.kernel)
        .take(NEAREST_FRAMES)
        .filter(|(_, f)| symbol_class(&f.symbol).is_some())
        .map(|(i, _)| i)
        .last()?;
    frames.iter().enumerate().skip(outermost + 1).find(|(_, f)| !f.kernel).map(|(i, _)| i)
}

/// The class a frame named `symbol` is the entry point of, if any.
pub fn symbol_class(symbol: &str) -> Option<LockKind> {
    if symbol.contains("::") { rust_class(symbol) } else { c_class(symbol) }
}

/// A C function name: glibc's and C11's entry points and internals.
fn c_class(symbol: &str) -> Option<LockKind> {
    // `@@GLIBC_2.34` versions, GCC's `.constprop.0`, `.isra.0`, `.cold` clones.
    let name = symbol.split(['@', '.']).next().unwrap_or(symbol);
    let name = name.strip_prefix("__GI_").unwrap_or(name).trim_start_matches('_');
    let locks = |n: &str| n.contains("lock") && !n.contains("unlock") && !n.contains("trylock");
    if let Some(rest) = name.strip_prefix("pthread_mutex_") {
        return locks(rest).then_some(LockKind::Mutex);
    }
    if let Some(rest) = name.strip_prefix("pthread_rwlock_") {
        return (rest.contains("rdlock") || rest.contains("wrlock")).then_some(LockKind::RwLock);
    }
    if let Some(rest) = name.strip_prefix("pthread_cond_") {
        return rest.contains("wait").then_some(LockKind::CondVar);
    }
    let class = match name {
        "lll_lock_wait"
        | "lll_lock_wait_private"
        | "lll_clocklock_wait"
        | "lll_timedlock_wait"
        | "mtx_lock"
        | "mtx_timedlock" => LockKind::Mutex,
        "cnd_wait" | "cnd_timedwait" => LockKind::CondVar,
        "sem_wait"
        | "sem_timedwait"
        | "sem_clockwait"
        | "new_sem_wait"
        | "new_sem_wait_slow"
        | "new_sem_wait_slow64"
        | "old_sem_wait" => LockKind::Semaphore,
        "pthread_join"
        | "pthread_timedjoin_np"
        | "pthread_clockjoin_np"
        | "pthread_clockjoin_ex"
        | "pthread_timedjoin_ex"
        | "thrd_join" => LockKind::Join,
        // glibc's condition variable internals (group switch, reference drain).
        n if n.starts_with("condvar_") => LockKind::CondVar,
        _ => return None,
    };
    Some(class)
}

/// A demangled Rust name: the type a method belongs to says what it waits on.
fn rust_class(symbol: &str) -> Option<LockKind> {
    let (type_path, method) = type_and_method(symbol)?;
    let ty = type_path.rsplit("::").next().unwrap_or(&type_path);
    let method = method.as_str();
    let class = match ty {
        "Mutex" | "RawMutex" | "RawFairMutex" | "ReentrantMutex" | "RawReentrantMutex" | "ReentrantLock" => {
            LockKind::Mutex
        }
        "RwLock" | "RawRwLock" => LockKind::RwLock,
        "Condvar" => LockKind::CondVar,
        "JoinInner" | "JoinHandle" | "ScopedJoinHandle" if method == "join" => LockKind::Join,
        "Thread" if method == "join" && type_path.contains("thread") => LockKind::Join,
        _ => return None,
    };
    Some(class)
}

/// `(type path without generics, method)` of `a::b::Type<T>::method` or
/// `<a::b::Type<T> as Trait>::method`; `None` for a name with no `::`.
fn type_and_method(symbol: &str) -> Option<(String, String)> {
    let (type_path, method) = if symbol.starts_with('<') {
        let end = matching_close(symbol)?;
        let inner = &symbol[1..end];
        let concrete = top_level_split(inner, " as ").map_or(inner, |(a, _)| a);
        (strip_generics(concrete), strip_generics(symbol[end + 1..].strip_prefix("::")?))
    } else {
        // `method(args)` (C++): the parameters may hold paths too.
        let plain = strip_generics(symbol);
        let plain = plain.split('(').next().unwrap_or(&plain);
        let (path, method) = plain.rsplit_once("::")?;
        (path.to_owned(), method.to_owned())
    };
    // `method::{{closure}}`, `method(args)`: the method's name only.
    let method = method.split(['(', ':', '.']).next().unwrap_or(&method).to_owned();
    Some((type_path, method))
}

/// Index of the `>` closing the `<` at index 0 of `s`.
fn matching_close(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '<' => depth += 1,
            '>' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// `s` split at the first `sep` outside angle brackets.
fn top_level_split<'a>(s: &'a str, sep: &str) -> Option<(&'a str, &'a str)> {
    let mut depth = 0i32;
    for (i, c) in s.char_indices() {
        match c {
            '<' => depth += 1,
            '>' => depth -= 1,
            _ if depth == 0 && s[i..].starts_with(sep) => return Some((&s[..i], &s[i + sep.len()..])),
            _ => {}
        }
    }
    None
}

/// `s` without its `<...>` groups.
fn strip_generics(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut depth = 0usize;
    for c in s.chars() {
        match c {
            '<' => depth += 1,
            '>' => depth = depth.saturating_sub(1),
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(symbols: &[&str]) -> Vec<StackFrame> {
        symbols.iter().map(|s| StackFrame { symbol: (*s).into(), ..StackFrame::default() }).collect()
    }

    /// Stacks as the symbolizer names them on Debian 12 (glibc 2.36 with
    /// libc6-dbg's symbol table; the first of each kind as the kernel test
    /// on `lock_classes.c` printed them), leaf first, and other spellings
    /// of the same entry points (only `.dynsym`, older glibc, C11).
    #[test]
    fn glibc_waits_are_classified_by_their_entry_point() {
        let cases: &[(&[&str], LockKind)] = &[
            (
                &["__lll_lock_wait", "pthread_mutex_lock", "mutex_site", "run", "start_thread", "__clone3"],
                LockKind::Mutex,
            ),
            (&["__futex_abstimed_wait_common", "pthread_rwlock_rdlock", "rwlock_site", "run"], LockKind::RwLock),
            (&["__futex_abstimed_wait_common", "pthread_cond_wait", "cond_site", "run"], LockKind::CondVar),
            (
                &["__futex_abstimed_wait_common", "__new_sem_wait_slow64.constprop.0", "sem_site", "run"],
                LockKind::Semaphore,
            ),
            (&["__futex_abstimed_wait_common", "__pthread_clockjoin_ex", "join_site", "main"], LockKind::Join),
            (
                &["__futex_abstimed_wait_common", "__pthread_clockjoin_ex", "main", "__libc_start_call_main"],
                LockKind::Join,
            ),
            (&["__lll_lock_wait", "___pthread_mutex_lock", "app"], LockKind::Mutex),
            (&["__lll_lock_wait_private", "pthread_mutex_lock", "mutex_site"], LockKind::Mutex),
            (&["__lll_lock_wait", "__pthread_mutex_lock_full", "app"], LockKind::Mutex),
            (&["__lll_clocklock_wait", "__pthread_mutex_clocklock_common", "app"], LockKind::Mutex),
            (&["__GI___pthread_mutex_lock", "app"], LockKind::Mutex),
            (&["pthread_mutex_timedlock@@GLIBC_2.34", "app"], LockKind::Mutex),
            (
                &["__futex_abstimed_wait_common", "__GI___futex_abstimed_wait64", "__pthread_rwlock_rdlock_full64"],
                LockKind::RwLock,
            ),
            (&["__futex_abstimed_wait_common", "___pthread_rwlock_wrlock", "app"], LockKind::RwLock),
            (&["pthread_rwlock_clockrdlock", "app"], LockKind::RwLock),
            (
                &[
                    "__futex_abstimed_wait_common",
                    "__GI___futex_abstimed_wait_cancelable64",
                    "___pthread_cond_wait",
                    "cond_site",
                ],
                LockKind::CondVar,
            ),
            (&["__futex_abstimed_wait_common", "__pthread_cond_wait_common", "app"], LockKind::CondVar),
            (&["__futex_abstimed_wait_cancelable64", "pthread_cond_timedwait@@GLIBC_2.3.2"], LockKind::CondVar),
            (&["__condvar_quiesce_and_switch_g1", "pthread_cond_signal"], LockKind::CondVar),
            (
                &[
                    "__futex_abstimed_wait_common",
                    "__GI___futex_abstimed_wait_cancelable64",
                    "__new_sem_wait_slow64",
                    "sem_site",
                ],
                LockKind::Semaphore,
            ),
            (&["__futex_abstimed_wait_cancelable64", "sem_timedwait", "app"], LockKind::Semaphore),
            (
                &[
                    "__futex_abstimed_wait_common",
                    "__GI___futex_abstimed_wait_cancelable64",
                    "__pthread_clockjoin_ex",
                    "join_site",
                ],
                LockKind::Join,
            ),
            (&["libc.so.6+0x8a1f0", "pthread_join", "main"], LockKind::Join),
            // Only libc's .dynsym (no debug file): internal functions have no
            // name, the exported entry points still decide...
            (&["", "pthread_mutex_lock", "mutex_site"], LockKind::Mutex),
            (&["", "pthread_rwlock_rdlock", "rwlock_site"], LockKind::RwLock),
            (&["", "pthread_cond_wait", "cond_site"], LockKind::CondVar),
            // ...but sem_wait and pthread_join tail-call their internal slow
            // paths, so their waits cannot be told apart then.
            (&["", "", "sem_site"], LockKind::Futex),
            (&["", "", "join_site"], LockKind::Futex),
            (&["mtx_lock"], LockKind::Mutex),
            (&["cnd_wait"], LockKind::CondVar),
            (&["thrd_join"], LockKind::Join),
        ];
        for (stack, want) in cases {
            assert_eq!(futex_wait_class(&frames(stack)), *want, "{stack:?}");
        }
    }

    /// Rust std 1.95 (v0-mangled, demangled by the symbolizer), the legacy
    /// form older toolchains and crates use, and parking_lot.
    #[test]
    fn rust_waits_are_classified_by_the_type_that_waits() {
        let cases: &[(&[&str], LockKind)] = &[
            (&["<std::sys::sync::mutex::futex::Mutex>::lock_contended", "app::work"], LockKind::Mutex),
            (&["std::sys::sync::mutex::futex::Mutex::lock_contended", "app::work"], LockKind::Mutex),
            (&["std::sys::unix::locks::futex_mutex::Mutex::lock_contended"], LockKind::Mutex),
            (&["<std::sync::poison::mutex::Mutex<alloc::vec::Vec<u8>>>::lock", "app::work"], LockKind::Mutex),
            (&["<std::sys::sync::rwlock::futex::RwLock>::read_contended"], LockKind::RwLock),
            (&["<std::sys::sync::rwlock::futex::RwLock>::write_contended"], LockKind::RwLock),
            (&["<std::sys::sync::condvar::futex::Condvar>::wait", "app::pool::worker"], LockKind::CondVar),
            (&["std::sys::pal::unix::futex::futex_wait", "std::sync::condvar::Condvar::wait_while"], LockKind::CondVar),
            (&["<std::sys::thread::unix::Thread>::join", "main"], LockKind::Join),
            (&["std::thread::JoinInner<T>::join", "main"], LockKind::Join),
            (&["parking_lot::raw_mutex::RawMutex::lock_slow", "app::work"], LockKind::Mutex),
            (&["<parking_lot::raw_rwlock::RawRwLock>::lock_shared_slow"], LockKind::RwLock),
            (&["parking_lot::condvar::Condvar::wait_until_internal"], LockKind::CondVar),
            (
                &[
                    "parking_lot_core::parking_lot::park",
                    "<parking_lot::raw_mutex::RawMutex as lock_api::mutex::RawMutex>::lock",
                ],
                LockKind::Mutex,
            ),
            (&["<lock_api::rwlock::RwLock<R,T>>::write"], LockKind::RwLock),
        ];
        for (stack, want) in cases {
            assert_eq!(futex_wait_class(&frames(stack)), *want, "{stack:?}");
        }
    }

    #[test]
    fn nearest_entry_point_wins_and_the_rest_is_other_futex() {
        // A condition variable re-taking its mutex is waiting for the mutex.
        let retake = frames(&["__lll_lock_wait", "__pthread_mutex_cond_lock", "___pthread_cond_wait", "app"]);
        assert_eq!(futex_wait_class(&retake), LockKind::Mutex);
        let others: &[&[&str]] = &[
            &["__futex_abstimed_wait_common", "___pthread_barrier_wait", "app"],
            &["__pthread_once_slow", "app"],
            &["<std::sys::sync::thread_parking::futex::Parker>::park", "std::thread::park", "app"],
            &["runtime.futex", "runtime.futexsleep", "runtime.notesleep"],
            &["syscall", "[unknown]"],
            // Not entry points of a wait, though the names are close.
            &["pthread_mutex_unlock", "pthread_mutex_trylock", "pthread_rwlock_unlock", "pthread_cond_signal"],
            &["<std::sync::poison::mutex::MutexGuard<T> as core::ops::drop::Drop>::drop", "my_sem_wait"],
            &[],
        ];
        for stack in others {
            assert_eq!(futex_wait_class(&frames(stack)), LockKind::Futex, "{stack:?}");
        }
        // Too far from the wait to say what it is.
        let mut far = vec!["app::f"; NEAREST_FRAMES];
        far.push("pthread_mutex_lock");
        assert_eq!(futex_wait_class(&frames(&far)), LockKind::Futex);
        // Kernel frames are not counted among the nearest.
        let mut with_kernel = frames(&["futex_wait", "do_futex"]);
        with_kernel.iter_mut().for_each(|f| f.kernel = true);
        with_kernel.extend(frames(&["pthread_join"]));
        assert_eq!(futex_wait_class(&with_kernel), LockKind::Join);
    }

    #[test]
    fn the_caller_is_the_first_frame_past_the_lock_implementation() {
        fn caller<'a>(stack: &[&'a str]) -> Option<&'a str> {
            wait_caller(&frames(stack)).map(|i| stack[i])
        }
        assert_eq!(caller(&["__lll_lock_wait", "pthread_mutex_lock", "mutex_site", "run"]), Some("mutex_site"));
        assert_eq!(
            caller(&[
                "__futex_abstimed_wait_common",
                "__GI___futex_abstimed_wait64",
                "__pthread_rwlock_rdlock_full64",
                "___pthread_rwlock_rdlock",
                "rwlock_site"
            ]),
            Some("rwlock_site")
        );
        // A condition variable re-taking its mutex: the caller of the wait.
        assert_eq!(
            caller(&["__lll_lock_wait", "__pthread_mutex_cond_lock", "___pthread_cond_wait", "cond_site", "run"]),
            Some("cond_site")
        );
        assert_eq!(
            caller(&[
                "<std::sys::sync::mutex::futex::Mutex>::lock_contended",
                "<std::sync::poison::mutex::Mutex<u8>>::lock",
                "app::work",
                "main"
            ]),
            Some("app::work")
        );
        assert_eq!(
            caller(&[
                "parking_lot_core::parking_lot::park",
                "parking_lot::raw_mutex::RawMutex::lock_slow",
                "<parking_lot::raw_mutex::RawMutex as lock_api::mutex::RawMutex>::lock",
                "app::work"
            ]),
            Some("app::work")
        );
        // Kernel frames leaf-ward are skipped; nothing recognised or nothing past it: none.
        let mut with_kernel = frames(&["futex_wait", "pthread_join", "main"]);
        with_kernel[0].kernel = true;
        assert_eq!(wait_caller(&with_kernel), Some(2));
        assert_eq!(caller(&["futex_wait", "lock_acquire", "main"]), None);
        assert_eq!(caller(&["", "", "sem_site"]), None);
        assert_eq!(caller(&["__lll_lock_wait", "pthread_mutex_lock"]), None);
        let mut far = vec!["app::f"; NEAREST_FRAMES];
        far.extend(["pthread_mutex_lock", "app::g"]);
        assert_eq!(caller(&far), None, "too far from the wait to be its entry point");
    }

    #[test]
    fn kernel_lock_kinds_are_kept() {
        let mutex = frames(&["pthread_mutex_lock"]);
        assert_eq!(lock_class(LockKind::KernelMutex, &mutex), LockKind::KernelMutex);
        assert_eq!(lock_class(LockKind::Futex, &mutex), LockKind::Mutex);
    }

    #[test]
    fn names_split_into_type_and_method() {
        let t = type_and_method;
        assert_eq!(t("a::B<T>::c"), Some(("a::B".into(), "c".into())));
        assert_eq!(t("<a::B<u8> as x::Y<z::W>>::c"), Some(("a::B".into(), "c".into())));
        assert_eq!(t("std::condition_variable::wait(std::unique_lock<std::mutex>&)").map(|x| x.1), Some("wait".into()));
        assert_eq!(t("a::B::c::{{closure}}"), Some(("a::B::c".into(), "{{closure}}".into())));
        assert_eq!(t("<unbalanced"), None);
        assert_eq!(t("plain"), None);
    }
}
