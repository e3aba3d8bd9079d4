//! Probing after a 429 without `Retry-After` (see the module doc of `retreat`): no tokens,
//! one request at a time, each refused probe tripling the spacing, never waiting past the
//! moment our window frees.

use std::time::{Duration, Instant};

use super::{
    Admit, Learned, Phase, RetreatController, PROBE_ANSWER_TIMEOUT, PROBE_GROWTH, PROBE_SPACING_MAX,
};

/// The probing after a 429 without `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Probing {
    /// When the next probe may go.
    pub next_at: Instant,
    /// The wait before the next probe after one more refused probe.
    pub spacing: Duration,
    /// When the probe now out was sent.
    pub in_flight: Option<Instant>,
    /// When the oldest request accepted in our window before the cut leaves it. Set when the
    /// 429 came before a whole busy window was seen (the window had filled from empty): if
    /// the upstream's window is no longer than ours, it has room again by then. Dropped once
    /// a probe at or after it is refused (the guess was wrong).
    pub frees_at: Option<Instant>,
}

impl RetreatController {
    fn probing(&self) -> Option<&Probing> {
        match &self.phase {
            Phase::Retreat { probing, .. } => probing.as_ref(),
            _ => None,
        }
    }

    fn probing_mut(&mut self) -> Option<&mut Probing> {
        match &mut self.phase {
            Phase::Retreat { probing, .. } => probing.as_mut(),
            _ => None,
        }
    }

    pub fn is_probing(&self) -> bool {
        self.probing().is_some()
    }

    /// What the bucket may do now.
    pub fn admit(&self, now: Instant) -> Admit {
        if self.is_paused(now) {
            return Admit::Closed;
        }
        match self.probing() {
            None => Admit::Open,
            Some(p) if p.in_flight.is_none() && p.next_at <= now => Admit::Probe,
            Some(_) => Admit::Closed,
        }
    }

    /// A probe was granted now.
    pub fn probe_sent(&mut self, now: Instant) {
        if let Some(p) = self.probing_mut() {
            p.in_flight = Some(now);
        }
    }

    /// A probe was granted but never sent (its client left), or it learned nothing: the next
    /// one may go.
    pub fn probe_returned(&mut self) {
        if let Some(p) = self.probing_mut() {
            p.in_flight = None;
        }
    }

    /// When the next probe would be due if the one out now were refused.
    pub fn next_probe_if_refused(&self, now: Instant) -> Option<Instant> {
        let p = self.probing()?;
        let next = now + (p.spacing * PROBE_GROWTH).min(PROBE_SPACING_MAX);
        Some(match p.frees_at {
            Some(frees) if frees > now => next.min(frees),
            _ => next,
        })
    }

    /// When the next probe is due, while none is out.
    pub fn probe_due_at(&self) -> Option<Instant> {
        self.probing()
            .filter(|p| p.in_flight.is_none())
            .map(|p| p.next_at)
    }

    /// When probing next changes on its own: the next probe is due, or the one out times out.
    pub fn next_probe_event(&self) -> Option<Instant> {
        let p = self.probing()?;
        Some(
            p.in_flight
                .map_or(p.next_at, |sent| sent + PROBE_ANSWER_TIMEOUT),
        )
    }

    pub(super) fn start_probing(&mut self, now: Instant) {
        // The first probe waits one interval of the cut rate, as a token would.
        let first =
            Duration::from_secs_f64(60.0 / self.effective_rpm.max(1e-6)).min(PROBE_SPACING_MAX);
        let frees_at = match self.learned {
            Learned::Pending { .. } => self.history.window_frees_at(now),
            _ => None,
        };
        if let Phase::Retreat { probing, .. } = &mut self.phase {
            *probing = Some(Probing {
                next_at: now + first,
                spacing: first,
                in_flight: None,
                frees_at,
            });
        }
    }

    pub(super) fn end_probing(&mut self) {
        if let Phase::Retreat { probing, .. } = &mut self.phase {
            *probing = None;
        }
    }

    /// A probe was refused (or a request that counts as one): the next waits longer.
    pub fn probe_refused(&mut self, now: Instant) {
        // A `Retry-After` on the refusal pauses as well; whichever ends later counts.
        if let Some(p) = self.probing_mut() {
            p.spacing = (p.spacing * PROBE_GROWTH).min(PROBE_SPACING_MAX);
            p.next_at = now + p.spacing;
            match p.frees_at {
                Some(frees) if frees > now => p.next_at = p.next_at.min(frees),
                Some(_) => p.frees_at = None,
                None => {}
            }
            p.in_flight = None;
        }
    }

    /// A probe with no answer in time was accepted: the upstream is working on it.
    pub(super) fn probe_timeout(&mut self, now: Instant) {
        if self
            .probing()
            .and_then(|p| p.in_flight)
            .is_some_and(|sent| now >= sent + PROBE_ANSWER_TIMEOUT)
        {
            self.end_probing();
        }
    }
}
