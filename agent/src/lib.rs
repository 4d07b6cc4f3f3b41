//! Aperture agent: the node daemon
