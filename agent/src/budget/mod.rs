//! The overhead budget: measure what the agent costs, sample less when it
//! costs too much. [`BudgetController`] holds the rules (no I/O, no clock);
//! [`ProcessCost`] measures this process.

mod controller;
mod cost;

pub use controller::{
    Adjustment, BudgetController, BudgetSettings, CostTotals, Effective, MAX_LEVEL, Measured, RESTORE_AFTER,
    RESTORE_BELOW,
};
pub use cost::{CostSource, ProcessCost, own_cpu_ns, own_rss_bytes};
