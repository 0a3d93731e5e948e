//! A stop asked for by SIGTERM or SIGINT, as long operations see it.
//!
//! A task listens for the signals from the agent's first moment on and
//! raises the flag; a start or a reload checks it between its steps (and
//! between batches of the ten thousand address updates a large
//! configuration means), so it gives up within a fraction of a second
//! with its bookkeeping exact: what it added is known, and removed on the
//! way out. Pure work (reading and validating a file) is simply dropped.

use tokio::sync::watch;

/// A stop was asked for while an operation was under way.
#[derive(Debug, thiserror::Error)]
#[error("stopped by a signal before it finished")]
pub struct Interrupted;

/// Whether anything is interrupted by this error (whatever context was
/// added on the way up).
pub fn is_interrupted(err: &anyhow::Error) -> bool {
    err.downcast_ref::<Interrupted>().is_some()
}

/// The receiving side of the stop flag; cheap to clone.
#[derive(Debug, Clone)]
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    /// A flag and its sender.
    pub fn channel() -> (watch::Sender<bool>, Self) {
        let (tx, rx) = watch::channel(false);
        (tx, Self(rx))
    }

    /// A flag nobody raises (`cleanup`, tests).
    pub fn never() -> Self {
        Self::channel().1
    }

    pub fn requested(&self) -> bool {
        *self.0.borrow()
    }

    /// `Err(Interrupted)` once a stop was asked for.
    pub fn check(&self) -> Result<(), Interrupted> {
        if self.requested() {
            Err(Interrupted)
        } else {
            Ok(())
        }
    }

    /// Returns once a stop is asked for; never if nobody can ask.
    pub async fn requested_now(&mut self) {
        if self.0.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_flag_is_seen_by_every_clone() {
        let (tx, stop) = Stop::channel();
        let mut waiting = stop.clone();
        assert!(stop.check().is_ok());
        tx.send(true).unwrap();
        waiting.requested_now().await;
        assert!(stop.requested());
        let err = anyhow::Error::from(stop.check().unwrap_err()).context("adding addresses");
        assert!(is_interrupted(&err));
        assert!(!is_interrupted(&anyhow::anyhow!("something else")));
    }

    #[tokio::test]
    async fn a_flag_nobody_can_raise_never_fires() {
        let mut stop = Stop::never();
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(20), stop.requested_now()).await;
        assert!(waited.is_err());
        assert!(!stop.requested());
    }
}
