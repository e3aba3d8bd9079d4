//! Waiting while the client may leave: one wait for either door.
//!
//! A request waits for its verdict (and before a replay, for its backoff) holding a place and
//! maybe a token; a client that hangs up meanwhile must give both up at once. Both doors watch
//! their client through `ClientWatch`: Pingora's session (`request_filter`, `upstream_peer`)
//! and the connection's own stream (`front::park`). `until` is the one wait over it.

use std::future::Future;

use pingora_core::ErrorType;
use pingora_proxy::Session;

use crate::admission::{Ticket, Verdict};

/// What a waiting client did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stir {
    /// It hung up (or its connection broke).
    Left,
    /// It sent bytes: the start of a pipelined request, kept by the watcher. Watching stops
    /// there; the wait goes on.
    Spoke,
}

/// A client connection that can be watched while its request waits. Only a request whose
/// whole body is in hand is watched: any byte read is then the next request's, never its own.
pub trait ClientWatch {
    /// Resolves when the client leaves or sends something.
    async fn stirs(&mut self) -> Stir;
}

impl ClientWatch for Session {
    async fn stirs(&mut self) -> Stir {
        match self.downstream_session.read_body_or_idle(true).await {
            Err(e)
                if matches!(
                    e.etype(),
                    ErrorType::ConnectionClosed | ErrorType::ReadError
                ) =>
            {
                Stir::Left
            }
            // Anything else (pipelined bytes, which Pingora keeps): the client is there.
            _ => Stir::Spoke,
        }
    }
}

/// Waits for `done` while watching the client, when there is one to watch: `None` when it
/// left first.
pub async fn until<W: ClientWatch, F: Future>(watch: Option<&mut W>, done: F) -> Option<F::Output> {
    let Some(watch) = watch else {
        return Some(done.await);
    };
    let mut done = std::pin::pin!(done);
    tokio::select! {
        out = &mut done => Some(out),
        stir = watch.stirs() => match stir {
            Stir::Left => None,
            Stir::Spoke => Some(done.await),
        },
    }
}

/// Waits for `ticket`'s verdict while watching the client (see `until`); `None` means it
/// left, and dropping the ticket then gives up its place (and its token, if one came).
pub async fn verdict<W: ClientWatch>(
    ticket: &mut Ticket,
    watch: Option<&mut W>,
) -> Option<Verdict> {
    if let Some(verdict) = ticket.immediate() {
        return Some(verdict);
    }
    until(watch, ticket.verdict()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A client that does `stir` after `after`, or nothing.
    struct Scripted(Option<(Duration, Stir)>);

    impl ClientWatch for Scripted {
        async fn stirs(&mut self) -> Stir {
            match self.0 {
                Some((after, stir)) => {
                    tokio::time::sleep(after).await;
                    stir
                }
                None => std::future::pending().await,
            }
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_leaves_ends_the_wait_and_one_that_speaks_does_not() {
        let done = |after| async move {
            tokio::time::sleep(after).await;
            "done"
        };
        let mut left = Scripted(Some((ms(10), Stir::Left)));
        assert_eq!(until(Some(&mut left), done(ms(50))).await, None);
        let mut spoke = Scripted(Some((ms(10), Stir::Spoke)));
        assert_eq!(until(Some(&mut spoke), done(ms(50))).await, Some("done"));
        let mut late = Scripted(Some((ms(90), Stir::Left)));
        assert_eq!(until(Some(&mut late), done(ms(50))).await, Some("done"));
        assert_eq!(
            until(None::<&mut Scripted>, done(ms(50))).await,
            Some("done")
        );
        let mut silent = Scripted(None);
        assert_eq!(until(Some(&mut silent), done(ms(50))).await, Some("done"));
    }
}
