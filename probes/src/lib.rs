//! Aperture probes: BPF programs, loader and per-CPU perf-buffer reader
