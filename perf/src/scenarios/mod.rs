//! The scenarios, by name.

mod codec;
mod probes;

use std::path::Path;

use anyhow::bail;

use crate::harness::{Scenario, ScenarioFile};

/// Every scenario, in the order `list` shows them.
pub const NAMES: &[&str] = &["codec", "probes"];

/// Builds the scenario a file describes.
pub fn build(file: &ScenarioFile, quick: bool, _root: &Path) -> anyhow::Result<Box<dyn Scenario>> {
    Ok(match file.name.as_str() {
        "codec" => Box::new(codec::Codec::new(file.params(quick)?)),
        "probes" => Box::new(probes::ProbesScenario::new(file.params(quick)?)),
        other => bail!("unknown scenario `{other}`; known: {}", NAMES.join(", ")),
    })
}
