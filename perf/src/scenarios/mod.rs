//! The scenarios, by name.

mod agent;
mod codec;
mod fleet;
mod freshness;
mod ingest;
mod ingest_formats;
mod probes;
mod query;
mod storage;
mod writer;

use std::path::Path;

use anyhow::bail;

use crate::harness::{Scenario, ScenarioFile};

/// Every scenario, in the order `list` shows them.
pub const NAMES: &[&str] =
    &["codec", "probes", "ingest", "writer", "storage", "query", "freshness", "agent", "ingest_formats", "fleet"];

/// Builds the scenario a file describes.
pub fn build(file: &ScenarioFile, quick: bool, root: &Path) -> anyhow::Result<Box<dyn Scenario>> {
    Ok(match file.name.as_str() {
        "codec" => Box::new(codec::Codec::new(file.params(quick)?)),
        "probes" => Box::new(probes::ProbesScenario::new(file.params(quick)?)),
        "ingest" => Box::new(ingest::Ingest::new(file.params(quick)?)),
        "writer" => Box::new(writer::Writer::new(file.params(quick)?)),
        "storage" => Box::new(storage::Storage::new(file.params(quick)?)),
        "query" => Box::new(query::Query::new(file.params(quick)?)),
        "freshness" => Box::new(freshness::Freshness::new(file.params(quick)?, root.to_owned())),
        "agent" => Box::new(agent::AgentScenario::new(file.params(quick)?, root.to_owned())),
        "ingest_formats" => Box::new(ingest_formats::IngestFormats::new(file.params(quick)?)),
        "fleet" => Box::new(fleet::FleetScenario::new(file.params(quick)?, root.to_owned())),
        other => bail!("unknown scenario `{other}`; known: {}", NAMES.join(", ")),
    })
}
