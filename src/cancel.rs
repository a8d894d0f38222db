//! Cooperative cancellation: SIGINT sets a flag that long-running stages poll so they can save a
//! checkpoint before exiting.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A cheap, clonable flag raised when the user asks mmrun to stop (Ctrl-C).
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Raise the flag.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether the flag is raised.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Register this token with SIGINT/SIGTERM so that the first signal raises the flag.
    pub fn install_signal_handlers(&self) -> std::io::Result<()> {
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(sig, self.0.clone())?;
        }
        Ok(())
    }
}

/// Returned by a stage that stopped early because its [`CancelToken`] was raised, after it
/// saved a checkpoint.
#[derive(Debug, thiserror::Error)]
#[error("interrupted: a checkpoint was saved; run the same recipe again (or `mmrun resume`) to continue")]
pub struct Interrupted;
