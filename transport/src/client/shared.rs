//! The state the [`Client`](super::Client) handle and the connection loop
//! share: the session machine and the loop's counters.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};

use crate::Carrier;
use crate::session::ClientSession;

pub(crate) struct Inner {
    pub(super) session: Mutex<ClientSession>,
    pub(super) wake: tokio::sync::Notify,
    pub(super) stopping: AtomicBool,
    pub(super) stop_now: tokio::sync::watch::Sender<bool>,
    /// 0 none, 1 QUIC, 2 gRPC.
    pub(super) carrier: AtomicU8,
    pub(super) established: AtomicBool,
    pub(super) sessions: AtomicU64,
    pub(super) connect_failures_quic: AtomicU64,
    pub(super) connect_failures_grpc: AtomicU64,
    pub(super) fallbacks: AtomicU64,
    pub(super) rejections: AtomicU64,
    pub(super) last_connect_error: Mutex<Option<String>>,
}

impl Inner {
    pub(crate) fn session(&self) -> MutexGuard<'_, ClientSession> {
        // Every session method leaves it consistent before returning, so a
        // panic elsewhere while holding the lock does not corrupt it.
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn set_carrier(&self, c: Option<Carrier>) {
        let v = match c {
            None => 0,
            Some(Carrier::Quic) => 1,
            Some(Carrier::Grpc) => 2,
        };
        self.carrier.store(v, Relaxed);
    }
}
