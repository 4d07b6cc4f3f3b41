//! Who is sending: a persistent agent id and a per-run boot id.
//!
//! The agent id is created on first start and kept in
//! `<data_dir>/agent-id` (32 hex digits), so the aggregator recognizes an
//! agent across restarts; the boot id is new for every run, and with the
//! sequence number (from 1) makes every frame's identity unique.

use std::io;
use std::path::{Path, PathBuf};

use aperture_core::ids::{AgentId, BootId};

/// File name of the agent id inside `data_dir`.
pub const AGENT_ID_FILE: &str = "agent-id";

/// Why the agent id could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The data directory could not be created.
    #[error("cannot create the data directory {path}: {source}; set data_dir to a writable directory")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The id file could not be read or written.
    #[error("cannot {action} the agent id file {path}: {source}")]
    File {
        /// `read` or `write`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The id file does not hold 32 hex digits.
    #[error("the agent id file {path} holds `{content}`, not 32 hex digits; delete it to get a new id")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What it holds (truncated).
        content: String,
    },
}

/// The identities stamped in every frame of this run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Stable across restarts.
    pub agent_id: AgentId,
    /// New for this run.
    pub boot_id: BootId,
}

impl Identity {
    /// Loads (or creates) the agent id in `data_dir` and draws a boot id.
    pub fn load_or_create(data_dir: &Path) -> Result<Identity, IdentityError> {
        Ok(Identity { agent_id: agent_id(data_dir)?, boot_id: BootId(*uuid::Uuid::new_v4().as_bytes()) })
    }
}

fn agent_id(data_dir: &Path) -> Result<AgentId, IdentityError> {
    let path = data_dir.join(AGENT_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<AgentId>().map_err(|_| IdentityError::Malformed {
            path: path.clone(),
            content: text.trim().chars().take(64).collect(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir)
                .map_err(|source| IdentityError::CreateDir { path: data_dir.to_owned(), source })?;
            let id = AgentId(*uuid::Uuid::new_v4().as_bytes());
            // Write then rename, so a crash never leaves a half-written id.
            let tmp = data_dir.join(format!("{AGENT_ID_FILE}.tmp"));
            let write = |p: &Path| std::fs::write(p, format!("{id}\n"));
            write(&tmp).and_then(|()| std::fs::rename(&tmp, &path)).map_err(|source| IdentityError::File {
                action: "write",
                path: path.clone(),
                source,
            })?;
            tracing::info!("created agent id {id} in {}", path.display());
            Ok(id)
        }
        Err(source) => Err(IdentityError::File { action: "read", path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reused_with_new_boot_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("nested/data");
        let a = Identity::load_or_create(&data).expect("created");
        let b = Identity::load_or_create(&data).expect("loaded");
        assert_eq!(a.agent_id, b.agent_id);
        assert_ne!(a.boot_id, b.boot_id);
        let text = std::fs::read_to_string(data.join(AGENT_ID_FILE)).expect("file");
        assert_eq!(text.trim(), a.agent_id.to_hex());
    }

    #[test]
    fn malformed_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(AGENT_ID_FILE), "xyz\n").expect("write");
        let err = Identity::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.ends_with("holds `xyz`, not 32 hex digits; delete it to get a new id"), "{err}");
    }
}
