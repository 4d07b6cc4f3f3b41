//! A hook run at the start of every thread this crate starts (the perf
//! buffer reader, the unwind-table thread), so the program can set them up
//! as its own threads: the agent moves them to its allocator arena, whose
//! freed pages go back to the kernel within a second (memory the unwind
//! thread frees after building a large table would otherwise stay resident
//! in a default arena for ten).

use std::sync::OnceLock;

static HOOK: OnceLock<fn()> = OnceLock::new();

/// Runs `hook` at the start of every thread started from now on. The first
/// hook set stays; returns whether this one was taken.
pub fn set_thread_start(hook: fn()) -> bool {
    HOOK.set(hook).is_ok()
}

/// Called first thing by each thread the crate starts.
pub(crate) fn started() {
    if let Some(hook) = HOOK.get() {
        hook();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    static RUNS: AtomicU32 = AtomicU32::new(0);

    #[test]
    fn the_first_hook_runs_in_each_started_thread() {
        assert!(set_thread_start(|| {
            RUNS.fetch_add(1, Ordering::Relaxed);
        }));
        assert!(!set_thread_start(|| {}), "the first hook stays");
        std::thread::spawn(started).join().expect("thread");
        started();
        assert_eq!(RUNS.load(Ordering::Relaxed), 2);
    }
}
