//! Cooperative cancellation: SIGINT sets a flag that long-running stages poll so they can save a
//! checkpoint before exiting. A second SIGINT exits at once (for a stage that never polls).

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

    /// Register this token with SIGINT/SIGTERM: the first signal raises the flag; a second one,
    /// arriving while the flag is already up, terminates the process with status 130 (the cache
    /// stays consistent either way — see `exec`).
    pub fn install_signal_handlers(&self) -> std::io::Result<()> {
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            // Order matters: the conditional shutdown must see the flag before this signal sets it.
            signal_hook::flag::register_conditional_shutdown(sig, 130, self.0.clone())?;
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
