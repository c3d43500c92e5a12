//! Owned tasks for the long-running parts of a node (ingress, workers,
//! subscribers, servers): each is named, runs in its own span, and is
//! watched. A task that ends on its own — it returned early or panicked —
//! before the node's shutdown began is a dead part: it is recorded, and
//! the node's shutdown token is cancelled, so readiness goes down, the node
//! drains what it can, and its process exits non-zero (see
//! [`Supervisor::failure`]). Never a silent zombie.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use futures::FutureExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

#[derive(Debug, Clone)]
pub struct Supervisor {
    /// The node's shutdown: cancelled by a signal, or by a dead part.
    shutdown: CancellationToken,
    failure: Arc<Mutex<Option<String>>>,
}

impl Supervisor {
    pub fn new(shutdown: CancellationToken) -> Self {
        Supervisor {
            shutdown,
            failure: Arc::new(Mutex::new(None)),
        }
    }

    /// Spawns `task` as `name`. It is expected to run until it is told to
    /// stop (by a token the caller cancels during the drain); ending before
    /// the node's shutdown began marks the node failed and starts it.
    pub fn spawn<F>(&self, name: impl Into<String>, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let name = name.into();
        let span = tracing::info_span!("task", name = %name);
        let shutdown = self.shutdown.clone();
        let failure = self.failure.clone();
        tokio::spawn(
            async move {
                let ended = std::panic::AssertUnwindSafe(task).catch_unwind().await;
                let why = match ended {
                    Err(panic) => Some(format!("task {name} panicked: {}", panic_text(&panic))),
                    Ok(()) if !shutdown.is_cancelled() => {
                        Some(format!("task {name} ended before shutdown"))
                    }
                    Ok(()) => None,
                };
                if let Some(why) = why {
                    tracing::error!(%why, "a part of this node died; shutting down");
                    failure
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get_or_insert(why);
                    shutdown.cancel();
                }
            }
            .instrument(span),
        )
    }

    /// Why the node failed, if a part died.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_dies_early_fails_the_node_and_starts_its_shutdown() {
        let shutdown = CancellationToken::new();
        let s = Supervisor::new(shutdown.clone());
        s.spawn("quiet", async {}).await.unwrap();
        assert!(shutdown.is_cancelled());
        assert_eq!(
            s.failure().as_deref(),
            Some("task quiet ended before shutdown")
        );
    }

    #[tokio::test]
    async fn a_panic_is_caught_and_named() {
        let shutdown = CancellationToken::new();
        let s = Supervisor::new(shutdown.clone());
        s.spawn("worker-0", async { panic!("boom") }).await.unwrap();
        assert!(shutdown.is_cancelled());
        assert_eq!(s.failure().as_deref(), Some("task worker-0 panicked: boom"));
    }

    #[tokio::test]
    async fn a_task_ending_after_shutdown_is_no_failure() {
        let shutdown = CancellationToken::new();
        let s = Supervisor::new(shutdown.clone());
        let stop = shutdown.clone();
        let task = s.spawn("ingress", async move { stop.cancelled().await });
        shutdown.cancel();
        task.await.unwrap();
        assert_eq!(s.failure(), None);
    }
}
