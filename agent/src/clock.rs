//! Clocks: monotonic time for the agent's own schedule, and the conversion
//! of the kernel's boot-clock timestamps to Unix time for the wire.

/// Reads a clock, ns.
fn clock_ns(clock: libc::clockid_t) -> u64 {
    // SAFETY: `timespec` is plain old data; zeroed is valid.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid, writable timespec; the clock ids used here exist on every supported kernel.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec.max(0) as u64) * 1_000_000_000 + ts.tv_nsec.max(0) as u64
}

/// Monotonic time, ns (the agent's schedule: batch ages, intervals).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Unix time, ns.
pub fn unix_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

/// Converts `CLOCK_BOOTTIME` timestamps (what `bpf_ktime_get_boot_ns`
/// returns) to Unix time. The offset moves when the wall clock is stepped,
/// so it is re-read every [`BootClock::refresh`].
#[derive(Clone, Copy, Debug)]
pub struct BootClock {
    offset_ns: i128,
}

impl Default for BootClock {
    fn default() -> Self {
        let mut c = BootClock { offset_ns: 0 };
        c.refresh();
        c
    }
}

impl BootClock {
    /// Re-reads the offset between the boot clock and the wall clock.
    pub fn refresh(&mut self) {
        let boot = clock_ns(libc::CLOCK_BOOTTIME);
        let unix = unix_ns();
        self.offset_ns = i128::from(unix) - i128::from(boot);
    }

    /// The Unix time of a boot-clock timestamp, ns.
    pub fn to_unix_ns(&self, boot_ns: u64) -> u64 {
        u64::try_from(i128::from(boot_ns) + self.offset_ns).unwrap_or(0)
    }

    /// Boot-clock time now, ns.
    pub fn boot_now_ns() -> u64 {
        clock_ns(libc::CLOCK_BOOTTIME)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_timestamps_map_to_now() {
        let c = BootClock::default();
        let converted = c.to_unix_ns(BootClock::boot_now_ns());
        let now = unix_ns();
        assert!(converted.abs_diff(now) < 5_000_000_000, "{converted} vs {now}");
        assert!(monotonic_ns() > 0);
    }
}
