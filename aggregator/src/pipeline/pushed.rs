//! Pushed profiles (Pyroscope SDKs) in the write path: each accepted
//! request becomes a frame of this aggregator's own push run (a random
//! agent and boot id per process, sequences from 1), so it meets the same
//! ledger, shards, writer and acknowledgements as agent frames. Instead of
//! an acknowledgement to an agent, the committed frame resolves the waiter
//! of the HTTP request that carried it, which only then answers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use aperture_core::frame::FrameId;
use aperture_core::ids::{AgentId, BootId};
use tokio::sync::oneshot;

/// Outcome sent to a waiting request: committed, or why the batch was refused.
pub(crate) type Outcome = Result<(), String>;

/// The push run's identity and the requests waiting for their commit.
#[derive(Debug)]
pub(crate) struct Pushed {
    agent_id: AgentId,
    boot_id: BootId,
    next: AtomicU64,
    waiting: Mutex<HashMap<FrameId, oneshot::Sender<Outcome>>>,
}

impl Pushed {
    pub fn new() -> Pushed {
        Pushed {
            agent_id: AgentId(rand::random()),
            boot_id: BootId(rand::random()),
            next: AtomicU64::new(1),
            waiting: Mutex::new(HashMap::new()),
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<FrameId, oneshot::Sender<Outcome>>> {
        // Plain data, consistent between statements: a poisoned lock is usable.
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next frame id of the push run.
    pub fn next_id(&self) -> FrameId {
        FrameId { agent_id: self.agent_id, boot_id: self.boot_id, sequence: self.next.fetch_add(1, Ordering::Relaxed) }
    }

    /// Whether `id` belongs to the push run.
    pub fn owns(&self, id: &FrameId) -> bool {
        id.agent_id == self.agent_id && id.boot_id == self.boot_id
    }

    /// Registers a request waiting for `id`.
    pub fn wait(&self, id: FrameId) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.waiting().insert(id, tx);
        rx
    }

    /// The request for `id` stopped waiting (timed out, or never queued).
    pub fn forget(&self, id: &FrameId) {
        self.waiting().remove(id);
    }

    /// The rows of these frames are committed: their requests may answer.
    pub fn committed(&self, frames: &[FrameId]) {
        if !frames.iter().any(|f| self.owns(f)) {
            return;
        }
        let mut waiting = self.waiting();
        for id in frames {
            if let Some(tx) = waiting.remove(id) {
                // The request may have given up already.
                let _ = tx.send(Ok(()));
            }
        }
    }

    /// The batch of `id` cannot be stored: its request fails with `why`.
    pub fn reject(&self, id: FrameId, why: &str) {
        if let Some(tx) = self.waiting().remove(&id) {
            let _ = tx.send(Err(why.to_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_resolves_only_its_own_requests() {
        let p = Pushed::new();
        let (a, b) = (p.next_id(), p.next_id());
        assert_ne!(a, b);
        let (mut ra, mut rb) = (p.wait(a), p.wait(b));
        let other = FrameId { agent_id: AgentId([9; 16]), boot_id: BootId([9; 16]), sequence: a.sequence };
        p.committed(&[other]);
        assert!(ra.try_recv().is_err(), "another run's frame does not answer a push");
        p.committed(&[a]);
        assert_eq!(ra.try_recv(), Ok(Ok(())));
        p.reject(b, "bad");
        assert_eq!(rb.try_recv(), Ok(Err("bad".to_owned())));
    }
}
