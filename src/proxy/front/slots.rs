//! Room for connections on the proxy port: at most `server.max_connections` open, and at the
//! cap the connection that has been idle longest is closed to make room for a new one, so that
//! a flood of idle connections cannot keep a real request out.
//!
//! A connection is idle while it waits for the first byte of its next request (a new one
//! included): nothing of a request is lost when it is closed then, and a kept-alive client
//! opens another. A connection whose request is being read, waits in the queue or is being
//! answered is busy and is never closed for room.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// How long a new connection waits for the room an idle one gives up.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// The proxy port's connections.
pub struct Slots {
    max: usize,
    permits: Arc<Semaphore>,
    /// The idle connections, oldest first, each with the signal that closes it.
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    next: u64,
    waiting: BTreeMap<u64, Arc<Notify>>,
}

/// Why a new connection got no room.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

impl Slots {
    pub fn new(max: usize) -> Slots {
        Slots {
            max,
            permits: Arc::new(Semaphore::new(max)),
            idle: Mutex::new(Idle::default()),
        }
    }

    /// The cap, `server.max_connections`.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// Connections idle now.
    pub fn idle(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Whether a new connection would be served: there is room, or an idle connection to
    /// close for it.
    pub fn can_accept(&self) -> bool {
        self.permits.available_permits() > 0 || self.idle() > 0
    }

    /// Room for a new connection, held until the permit drops; at the cap, the longest idle
    /// connection is told to close and its room is taken. `Full` when every connection is busy.
    pub async fn admit(&self) -> Result<OwnedSemaphorePermit, Full> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let oldest = self.lock().waiting.pop_first();
        let Some((_, close)) = oldest else {
            return Err(Full);
        };
        // `notify_one` keeps the signal for a connection that is not polling yet.
        close.notify_one();
        match tokio::time::timeout(EVICTION_WAIT, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(Full),
        }
    }

    /// Marks a connection idle until the returned mark drops; the mark's `closed` fires when
    /// the connection is to close for room.
    pub fn idle_mark(&self) -> IdleMark<'_> {
        let close = Arc::new(Notify::new());
        let mut idle = self.lock();
        let id = idle.next;
        idle.next += 1;
        idle.waiting.insert(id, close.clone());
        IdleMark {
            slots: self,
            id,
            close,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An idle connection's place among the idle ones.
pub struct IdleMark<'a> {
    slots: &'a Slots,
    id: u64,
    close: Arc<Notify>,
}

impl IdleMark<'_> {
    /// Fires when the connection is to close to make room for a new one.
    pub async fn closed(&self) {
        self.close.notified().await
    }
}

impl Drop for IdleMark<'_> {
    fn drop(&mut self) {
        self.slots.lock().waiting.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn at_the_cap_the_longest_idle_connection_makes_room() {
        let slots = Arc::new(Slots::new(2));
        let first = slots.admit().await.unwrap();
        let second = slots.admit().await.unwrap();
        assert!(!slots.can_accept(), "both busy");
        assert_eq!(slots.admit().await.unwrap_err(), Full);

        // Both go idle, the first one first: it is the one told to close.
        let (older, newer) = (slots.idle_mark(), slots.idle_mark());
        assert!(slots.can_accept());
        let slots2 = slots.clone();
        let newcomer = tokio::spawn(async move { slots2.admit().await.map(drop) });
        tokio::time::timeout(Duration::from_secs(1), older.closed())
            .await
            .expect("the older idle connection is told to close");
        drop(older);
        drop(first);
        assert_eq!(newcomer.await.unwrap(), Ok(()));
        assert_eq!(slots.idle(), 1);
        // The newer one was not told.
        let told = tokio::time::timeout(Duration::from_millis(50), newer.closed()).await;
        assert!(told.is_err());
        drop((newer, second));
        assert_eq!(slots.open(), 0);
    }

    #[tokio::test]
    async fn room_that_is_not_given_back_in_time_leaves_the_newcomer_out() {
        let slots = Slots::new(1);
        let _busy = slots.admit().await.unwrap();
        let _idle = slots.idle_mark();
        // Told to close, the connection never does.
        tokio::time::pause();
        assert_eq!(slots.admit().await.unwrap_err(), Full);
        assert_eq!(slots.idle(), 0, "told once, not again");
    }
}
