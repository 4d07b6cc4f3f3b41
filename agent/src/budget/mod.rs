//! The overhead budget: measure what the agent costs, sample less when it
//! costs too much. [`BudgetController`] holds the rules (no I/O, no clock);
//! [`ThreadCost`] measures the agent's own threads (and [`ProcessCost`]
//! the BPF programs the process holds).

mod controller;
mod cost;
mod threads;

pub use controller::{
    Adjustment, BudgetController, BudgetSettings, CostTotals, Effective, MAX_LEVEL, Measured, RESTORE_AFTER,
    RESTORE_BELOW,
};
pub use cost::{CostSource, ProcessCost, own_cpu_ns, own_rss_bytes};
pub use threads::{
    AgentThreads, ThreadCost, current_thread_cpu_ns, current_tid, parse_schedstat, parse_stat_ticks, threads_named,
};
