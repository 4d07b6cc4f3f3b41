//! The overhead budget control loop, as a state machine without I/O or clock.
//!
//! Every `budget.interval` the driver passes in the time and the cumulative
//! costs ([`CostTotals`]: the agent's CPU time and its BPF programs' run
//! time). The controller turns the deltas into a cost in percent of one core
//! and moves between *levels*: level 0 is the configuration as written;
//! each level above halves the sampling frequency and doubles the lock and
//! syscall thresholds (fewer samples, fewer individual events).
//!
//! - Over budget: one level up per interval, up to [`MAX_LEVEL`].
//! - Well under budget — below [`RESTORE_BELOW`] of it, low enough that
//!   doubling the cost by going one level down still fits — for
//!   [`RESTORE_AFTER`] intervals in a row: one level down.
//!
//! The gap between the two thresholds (hysteresis) and the run of quiet
//! intervals keep the loop from oscillating.
//!
//! Warm-up: the first [`BudgetSettings::warmup_intervals`] intervals are
//! measured and published but never acted on. They hold one-off start-up
//! work that does not recur at that rate — parsing the kernel's BTF and
//! loading the programs, and above all the first sighting of every process
//! already running (its mappings read, the symbol tables of every binary
//! and library it maps opened and indexed, kallsyms loaded). Judging the
//! steady-state budget on that would lower the sampling of every agent at
//! every start. The cost of waiting is bounded: a node that really is over
//! budget is corrected one interval later.

use std::fmt;

/// Highest level: the frequency divided by 64, thresholds multiplied by 64.
pub const MAX_LEVEL: u8 = 6;
/// A level is restored only when the cost is below this fraction of the budget.
pub const RESTORE_BELOW: f64 = 0.4;
/// ... for this many consecutive intervals.
pub const RESTORE_AFTER: u32 = 3;

/// What the controller starts from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetSettings {
    /// Whether the loop adjusts anything (when off it still measures).
    pub enabled: bool,
    /// Budget in percent of one core (1.0 = 1%).
    pub cpu_percent: f64,
    /// Configured sampling frequency, Hz.
    pub frequency_hz: u32,
    /// Configured lock threshold, ns.
    pub lock_threshold_ns: u64,
    /// Configured syscall threshold, ns.
    pub syscall_threshold_ns: u64,
    /// Intervals after the first observation that are measured but never
    /// adjust anything (start-up work; see the module docs).
    pub warmup_intervals: u32,
}

/// The settings in effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Effective {
    /// 0 = as configured; see the module docs.
    pub level: u8,
    /// Sampling frequency, Hz (at least 1).
    pub frequency_hz: u32,
    /// Lock waits shorter than this are only counted, ns.
    pub lock_threshold_ns: u64,
    /// Syscalls shorter than this are only counted, ns.
    pub syscall_threshold_ns: u64,
}

impl fmt::Display for Effective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "level {} ({} Hz, lock threshold {:?}, syscall threshold {:?})",
            self.level,
            self.frequency_hz,
            std::time::Duration::from_nanos(self.lock_threshold_ns),
            std::time::Duration::from_nanos(self.syscall_threshold_ns)
        )
    }
}

/// Cumulative costs since some fixed origin (they only grow).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CostTotals {
    /// CPU time of the agent (user + system), ns.
    pub agent_cpu_ns: u64,
    /// Run time of the agent's BPF programs, ns (0 when not measurable).
    pub kernel_ns: u64,
}

/// The cost measured over one interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measured {
    /// Length of the interval, ns.
    pub interval_ns: u64,
    /// Agent CPU in percent of one core.
    pub agent_percent: f64,
    /// BPF program time in percent of one core.
    pub kernel_percent: f64,
}

impl Measured {
    /// Total cost in percent of one core.
    pub fn total_percent(&self) -> f64 {
        self.agent_percent + self.kernel_percent
    }
}

/// A change of level, to apply to the probes and to log.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adjustment {
    /// Settings before.
    pub from: Effective,
    /// Settings now in effect.
    pub to: Effective,
    /// The measurement that caused it.
    pub cost: Measured,
    /// The budget, percent of one core.
    pub budget_percent: f64,
}

impl Adjustment {
    /// Whether the change reduces sampling.
    pub fn is_lowering(&self) -> bool {
        self.to.level > self.from.level
    }
}

impl fmt::Display for Adjustment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.is_lowering() { "over" } else { "well under" };
        write!(
            f,
            "cost {:.2}% of a core (agent {:.2}%, BPF programs {:.2}%) is {verb} the budget of {:.2}%: {} -> {}",
            self.cost.total_percent(),
            self.cost.agent_percent,
            self.cost.kernel_percent,
            self.budget_percent,
            self.from,
            self.to
        )
    }
}

/// The control loop's state.
#[derive(Clone, Debug)]
pub struct BudgetController {
    settings: BudgetSettings,
    level: u8,
    last: Option<(u64, CostTotals)>,
    quiet_intervals: u32,
    measured: Option<Measured>,
    saturated: bool,
    adjustments: u64,
    /// Warm-up intervals still to pass.
    warmup_left: u32,
}

impl BudgetController {
    /// A controller at level 0.
    pub fn new(settings: BudgetSettings) -> BudgetController {
        BudgetController {
            settings,
            level: 0,
            last: None,
            quiet_intervals: 0,
            measured: None,
            saturated: false,
            adjustments: 0,
            warmup_left: settings.warmup_intervals,
        }
    }

    /// Whether the controller is still in its warm-up (measuring only).
    pub fn warming_up(&self) -> bool {
        self.warmup_left > 0
    }

    /// The settings of `level`.
    pub fn at_level(&self, level: u8) -> Effective {
        let s = &self.settings;
        Effective {
            level,
            frequency_hz: (s.frequency_hz >> level).max(1),
            lock_threshold_ns: s.lock_threshold_ns.saturating_mul(1 << level),
            syscall_threshold_ns: s.syscall_threshold_ns.saturating_mul(1 << level),
        }
    }

    /// The settings in effect.
    pub fn effective(&self) -> Effective {
        self.at_level(self.level)
    }

    /// The last interval's measurement.
    pub fn measured(&self) -> Option<Measured> {
        self.measured
    }

    /// Whether the cost was over budget at the highest level last time.
    pub fn saturated(&self) -> bool {
        self.saturated
    }

    /// Number of adjustments made so far.
    pub fn adjustments(&self) -> u64 {
        self.adjustments
    }

    /// Feeds the cumulative costs at `now_ns` (any monotonic clock); returns
    /// the change of level to apply, if any. The first call only sets the
    /// baseline, as does a call where time or a counter went backwards.
    pub fn observe(&mut self, now_ns: u64, totals: CostTotals) -> Option<Adjustment> {
        let previous = self.last.replace((now_ns, totals));
        let (then, before) = previous?;
        let interval_ns = now_ns.checked_sub(then).filter(|d| *d > 0)?;
        let agent = totals.agent_cpu_ns.checked_sub(before.agent_cpu_ns)?;
        let kernel = totals.kernel_ns.checked_sub(before.kernel_ns)?;
        let percent = |ns: u64| ns as f64 * 100.0 / interval_ns as f64;
        let cost = Measured { interval_ns, agent_percent: percent(agent), kernel_percent: percent(kernel) };
        self.measured = Some(cost);
        if self.warmup_left > 0 {
            self.warmup_left -= 1;
            return None;
        }
        if !self.settings.enabled {
            return None;
        }
        let budget = self.settings.cpu_percent;
        let total = cost.total_percent();
        let target = if total > budget {
            self.quiet_intervals = 0;
            self.saturated = self.level == MAX_LEVEL || self.effective().frequency_hz == 1;
            if self.saturated {
                return None;
            }
            self.level + 1
        } else if total < budget * RESTORE_BELOW && self.level > 0 {
            self.saturated = false;
            self.quiet_intervals += 1;
            if self.quiet_intervals < RESTORE_AFTER {
                return None;
            }
            self.quiet_intervals = 0;
            self.level - 1
        } else {
            self.saturated = false;
            self.quiet_intervals = 0;
            return None;
        };
        let from = self.effective();
        self.level = target;
        self.adjustments += 1;
        Some(Adjustment { from, to: self.effective(), cost, budget_percent: budget })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn settings() -> BudgetSettings {
        BudgetSettings {
            enabled: true,
            cpu_percent: 1.0,
            frequency_hz: 99,
            lock_threshold_ns: 1_000_000,
            syscall_threshold_ns: 10_000_000,
            warmup_intervals: 0,
        }
    }

    /// A simulated agent whose cost is proportional to its sampling frequency
    /// plus a fixed part, driven in virtual time with 10 s intervals.
    struct Sim {
        controller: BudgetController,
        now: u64,
        totals: CostTotals,
        /// Agent CPU per second per Hz of sampling, ns.
        ns_per_hz: u64,
        /// Fixed agent CPU per second, ns.
        fixed_ns: u64,
        /// BPF program time per second per Hz, ns.
        kernel_ns_per_hz: u64,
        log: Vec<Adjustment>,
    }

    impl Sim {
        fn new(ns_per_hz: u64) -> Sim {
            let mut controller = BudgetController::new(settings());
            assert_eq!(controller.observe(0, CostTotals::default()), None, "first call is the baseline");
            Sim {
                controller,
                now: 0,
                totals: CostTotals::default(),
                ns_per_hz,
                fixed_ns: 500_000,
                kernel_ns_per_hz: 0,
                log: Vec::new(),
            }
        }

        /// Runs `n` intervals; returns the frequency after each.
        fn run(&mut self, n: usize) -> Vec<u32> {
            (0..n)
                .map(|_| {
                    let hz = u64::from(self.controller.effective().frequency_hz);
                    self.now += 10 * SEC;
                    self.totals.agent_cpu_ns += 10 * (self.fixed_ns + self.ns_per_hz * hz);
                    self.totals.kernel_ns += 10 * self.kernel_ns_per_hz * hz;
                    if let Some(a) = self.controller.observe(self.now, self.totals) {
                        self.log.push(a);
                    }
                    self.controller.effective().frequency_hz
                })
                .collect()
        }
    }

    #[test]
    fn within_budget_nothing_changes() {
        // 0.05% fixed + 99 Hz * 20 us/s = ~0.25% of a core.
        let mut sim = Sim::new(20_000);
        assert_eq!(sim.run(20), vec![99; 20]);
        assert!(sim.log.is_empty());
        let m = sim.controller.measured().expect("measured");
        assert!((m.total_percent() - 0.248).abs() < 0.001, "{m:?}");
    }

    #[test]
    fn over_budget_lowers_step_by_step_until_it_fits() {
        // 99 Hz * 400 us/s = 3.96% + 0.05%: needs level 3 (12 Hz: 0.53%).
        let mut sim = Sim::new(400_000);
        assert_eq!(sim.run(6), vec![49, 24, 12, 12, 12, 12]);
        assert_eq!(sim.log.len(), 3);
        assert!(sim.log.iter().all(Adjustment::is_lowering));
        let e = sim.controller.effective();
        assert_eq!(
            e,
            Effective { level: 3, frequency_hz: 12, lock_threshold_ns: 8_000_000, syscall_threshold_ns: 80_000_000 }
        );
        assert_eq!(
            sim.log[0].to_string(),
            "cost 4.01% of a core (agent 4.01%, BPF programs 0.00%) is over the budget of 1.00%: \
             level 0 (99 Hz, lock threshold 1ms, syscall threshold 10ms) -> level 1 (49 Hz, lock threshold 2ms, syscall threshold 20ms)"
        );
    }

    #[test]
    fn kernel_cost_counts_against_the_budget() {
        let mut sim = Sim::new(0);
        sim.kernel_ns_per_hz = 200_000; // 99 Hz: 1.98% in BPF programs.
        assert_eq!(sim.run(3), vec![49, 24, 24]);
        assert!(sim.log[0].cost.kernel_percent > 1.9);
    }

    #[test]
    fn restores_when_well_under_with_hysteresis() {
        let mut sim = Sim::new(400_000);
        sim.run(4);
        assert_eq!(sim.controller.effective().level, 3);
        // The load goes away: cost per Hz drops 20x.
        sim.ns_per_hz = 20_000;
        // One level back every RESTORE_AFTER quiet intervals, never more.
        let freqs = sim.run(12);
        assert_eq!(freqs, vec![12, 12, 24, 24, 24, 49, 49, 49, 99, 99, 99, 99]);
        assert_eq!(sim.controller.effective().level, 0);
        assert!(sim.log[3..].iter().all(|a| !a.is_lowering()));
    }

    #[test]
    fn does_not_oscillate_near_the_budget() {
        // At level 1 (49 Hz) the cost is 0.79%: under budget but not well
        // under, so it stays there instead of bouncing back to 99 Hz (1.53%).
        let mut sim = Sim::new(150_000);
        let freqs = sim.run(20);
        assert_eq!(freqs[0], 49);
        assert!(freqs[1..].iter().all(|&f| f == 49), "{freqs:?}");
        assert_eq!(sim.controller.adjustments(), 1);
    }

    #[test]
    fn saturates_at_the_highest_level() {
        let mut sim = Sim::new(0);
        sim.fixed_ns = 50_000_000; // 5% regardless of sampling.
        let freqs = sim.run(10);
        assert_eq!(freqs.last(), Some(&1));
        assert_eq!(sim.controller.effective().level, MAX_LEVEL);
        assert!(sim.controller.saturated());
        assert_eq!(sim.controller.adjustments(), u64::from(MAX_LEVEL));
    }

    #[test]
    fn disabled_measures_but_never_adjusts() {
        let mut c = BudgetController::new(BudgetSettings { enabled: false, ..settings() });
        c.observe(0, CostTotals::default());
        let a = c.observe(10 * SEC, CostTotals { agent_cpu_ns: 10 * SEC, kernel_ns: 0 });
        assert_eq!(a, None);
        assert_eq!(c.measured().map(|m| m.total_percent()), Some(100.0));
        assert_eq!(c.effective().frequency_hz, 99);
    }

    #[test]
    fn warm_up_intervals_are_measured_but_not_acted_on() {
        let mut c = BudgetController::new(BudgetSettings { warmup_intervals: 1, ..settings() });
        assert!(c.warming_up());
        c.observe(0, CostTotals::default());
        // Start-up: 20% of a core in the first interval (symbol tables of
        // every running process): measured, published, not acted on.
        assert_eq!(c.observe(10 * SEC, CostTotals { agent_cpu_ns: 2 * SEC, kernel_ns: 0 }), None);
        assert_eq!(c.measured().map(|m| m.total_percent()), Some(20.0));
        assert!(!c.warming_up());
        assert_eq!(c.effective().level, 0);
        // Steady state under budget: nothing happens.
        assert_eq!(c.observe(20 * SEC, CostTotals { agent_cpu_ns: 2 * SEC + 50_000_000, kernel_ns: 0 }), None);
        // Steady state over budget: the next interval acts.
        let a = c.observe(30 * SEC, CostTotals { agent_cpu_ns: 2 * SEC + 350_000_000, kernel_ns: 0 });
        assert!(a.is_some_and(|a| a.is_lowering()), "3% over the budget lowers after the warm-up");
    }

    #[test]
    fn counters_going_backwards_reset_the_baseline() {
        let mut c = BudgetController::new(settings());
        c.observe(10 * SEC, CostTotals { agent_cpu_ns: 5 * SEC, kernel_ns: 100 });
        // Programs reloaded: their run time restarted from 0.
        assert_eq!(c.observe(20 * SEC, CostTotals { agent_cpu_ns: 6 * SEC, kernel_ns: 0 }), None);
        assert_eq!(c.measured(), None);
        // Time going backwards: likewise.
        assert_eq!(c.observe(15 * SEC, CostTotals { agent_cpu_ns: 7 * SEC, kernel_ns: 0 }), None);
        let a = c.observe(25 * SEC, CostTotals { agent_cpu_ns: 8 * SEC, kernel_ns: 0 });
        assert!(a.is_some_and(|a| a.is_lowering()), "10% over 10 s lowers");
    }
}
