//! Probing after a 429 without `Retry-After` (see the module doc of `retreat`): no tokens,
//! one request at a time, each refused probe tripling the spacing.

use std::time::{Duration, Instant};

use super::{Admit, RetreatController, PROBE_ANSWER_TIMEOUT, PROBE_GROWTH, PROBE_SPACING_MAX};

/// The probing after a 429 without `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Probing {
    /// When the next probe may go.
    pub(super) next_at: Instant,
    /// The wait before the next probe after one more refused probe.
    pub(super) spacing: Duration,
    /// When the probe now out was sent.
    pub(super) in_flight: Option<Instant>,
}

impl RetreatController {
    /// What the bucket may do now.
    pub fn admit(&self, now: Instant) -> Admit {
        if self.is_paused(now) {
            return Admit::Closed;
        }
        match &self.probing {
            None => Admit::Open,
            Some(p) if p.in_flight.is_none() && p.next_at <= now => Admit::Probe,
            Some(_) => Admit::Closed,
        }
    }

    /// A probe was granted now.
    pub fn probe_sent(&mut self, now: Instant) {
        if let Some(p) = self.probing.as_mut() {
            p.in_flight = Some(now);
        }
    }

    /// A probe was granted but never sent (its client left): the next one may go.
    pub fn probe_returned(&mut self) {
        if let Some(p) = self.probing.as_mut() {
            p.in_flight = None;
        }
    }

    /// When probing next changes on its own: the next probe is due, or the one out times out.
    pub fn next_probe_event(&self) -> Option<Instant> {
        let p = self.probing.as_ref()?;
        Some(
            p.in_flight
                .map_or(p.next_at, |sent| sent + PROBE_ANSWER_TIMEOUT),
        )
    }

    pub(super) fn start_probing(&mut self, now: Instant) {
        // The first probe waits one interval of the cut rate, as a token would.
        let first =
            Duration::from_secs_f64(60.0 / self.effective_rpm.max(1e-6)).min(PROBE_SPACING_MAX);
        self.probing = Some(Probing {
            next_at: now + first,
            spacing: first,
            in_flight: None,
        });
    }

    pub(super) fn probe_refused(&mut self, now: Instant) {
        // A `Retry-After` on the refusal pauses as well; whichever ends later counts.
        if let Some(p) = self.probing.as_mut() {
            p.spacing = (p.spacing * PROBE_GROWTH).min(PROBE_SPACING_MAX);
            p.next_at = now + p.spacing;
            p.in_flight = None;
        }
    }
}
