//! What a futex wait is: the class of a user-space lock wait, told by the
//! frames nearest the wait. The names of the wait entry points (glibc,
//! Rust std, parking_lot) live in [`aperture_core::lockclass`], where the
//! aggregator uses them too (to name the caller of a lock in its lock table).

pub use aperture_core::lockclass::*;
