//! Aperture performance harness
