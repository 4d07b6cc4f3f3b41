//! Stopping the agent: the [`Shutdown`] flag its threads poll, and
//! [`stop_signals`], the one place the process listens for SIGTERM and
//! SIGINT (the `aperture` binary uses it for every daemon).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Asks a running agent to stop. Cheap to clone; trigger it from a signal
/// handler, another thread or a task.
#[derive(Clone, Debug, Default)]
pub struct Shutdown(Arc<AtomicBool>);

impl Shutdown {
    /// A flag not yet triggered.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Asks the agent to stop.
    pub fn trigger(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether a stop was asked for.
    pub fn is_triggered(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Triggers the flag on SIGTERM or SIGINT, from a task on the current
    /// tokio runtime (see [`stop_signals`]).
    pub fn trigger_on_signals(&self) -> std::io::Result<()> {
        let stop = stop_signals()?;
        let flag = self.clone();
        tokio::spawn(async move {
            stop.await;
            flag.trigger();
        });
        Ok(())
    }
}

/// Starts listening for SIGTERM and SIGINT (Ctrl-C); the future completes on
/// the first one. Needs a tokio runtime context. Fails when the handlers
/// cannot be installed, so a daemon that could not be stopped cleanly does
/// not start.
pub fn stop_signals() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received: stopping"),
            _ = int.recv() => tracing::info!("SIGINT received: stopping"),
        }
    })
}
