//! Running many clients on one tokio runtime, as a load generator does: a
//! real agent runs one [`Client`](super::Client) on its own thread, but a
//! program simulating thousands of agents cannot afford a thread, a runtime
//! and a UDP socket for each. Every client keeps its own connection,
//! session, hello, credit and acknowledgements; only the runtime (and, when
//! asked, the QUIC endpoints: UDP sockets, each carrying many connections)
//! are shared.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// A tokio runtime, and optionally a pool of QUIC endpoints, that clients
/// started with [`Client::start_on`](super::Client::start_on) share.
#[derive(Clone, Debug)]
pub struct SharedRuntime {
    pub(super) handle: tokio::runtime::Handle,
    pub(super) endpoints: Option<Arc<EndpointPool>>,
}

impl SharedRuntime {
    /// Clients run as tasks on `handle`'s runtime; each binds its own QUIC
    /// endpoint, as an agent does.
    pub fn new(handle: tokio::runtime::Handle) -> SharedRuntime {
        SharedRuntime { handle, endpoints: None }
    }

    /// QUIC clients share `sockets` endpoints (at least one), assigned in
    /// turn: many connections over one UDP socket each. The endpoints stay
    /// open as long as a client or this value holds them; clients never
    /// close a shared endpoint, only their own connection.
    pub fn with_quic_endpoints(self, sockets: usize) -> SharedRuntime {
        let pool = EndpointPool {
            slots: (0..sockets.max(1)).map(|_| Mutex::new([None, None])).collect(),
            next: AtomicUsize::new(0),
        };
        SharedRuntime { endpoints: Some(Arc::new(pool)), ..self }
    }
}

/// Shared QUIC endpoints, bound on first use, one per address family and slot.
#[derive(Debug)]
pub(crate) struct EndpointPool {
    slots: Vec<Mutex<[Option<quinn::Endpoint>; 2]>>,
    next: AtomicUsize,
}

impl EndpointPool {
    /// The slot the next client uses.
    pub(crate) fn assign(&self) -> usize {
        self.next.fetch_add(1, Relaxed) % self.slots.len()
    }

    /// The endpoint of `slot` for `addr`'s family, bound now if it is not
    /// yet. Must run inside the runtime (quinn spawns the endpoint's driver).
    pub(crate) fn endpoint(&self, slot: usize, addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
        let family = usize::from(addr.is_ipv6());
        let mut s = self.slots[slot % self.slots.len()].lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ep) = &s[family] {
            return Ok(ep.clone());
        }
        let bind = if addr.is_ipv6() {
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
        } else {
            SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
        };
        let ep = crate::wire::quic::client_endpoint(bind)?;
        s[family] = Some(ep.clone());
        Ok(ep)
    }
}
