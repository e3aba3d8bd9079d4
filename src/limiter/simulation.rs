//! The limiter against simulated upstreams with hidden quotas, on explicit instants: closed-
//! loop clients, answers at once, replays after a 429 as the proxy does them. Runs minutes of
//! traffic in milliseconds, so the controller's bounds are checked for many windows, quota
//! kinds and misconfigurations, exactly and without sleeping.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

/// How the hidden quota counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// At most `limit` in any interval of `window`.
    Sliding,
    /// At most `limit` per consecutive window.
    Fixed,
    /// `limit` tokens refilled at `limit` per `window`, starting full.
    Bucket,
}

/// What the upstream says with a 429.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Style {
    /// NVIDIA's: nothing.
    Bare,
    /// `Retry-After` with the time until a request would be accepted, rounded up to seconds.
    RetryAfter,
    /// `Retry-After` with the same number of seconds whatever the quota's state (an upstream
    /// that says "2" when its window frees in 8).
    RetryAfterFixed(u64),
}

#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub kind: Kind,
    pub limit: usize,
    pub window: Duration,
    pub style: Style,
    pub rate_rpm: f64,
    pub clients: usize,
    pub run: Duration,
    /// The quota's limit changes to this at this time into the run.
    pub limit_change: Option<(Duration, usize)>,
}

/// What happened.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Seconds into the run of each upstream 429.
    pub violations: Vec<f64>,
    /// Seconds into the run of each accepted request.
    pub accepted: Vec<f64>,
    /// 429s that reached a client (replays used up).
    pub client_429s: usize,
    /// The effective rate at the end.
    pub final_rpm: f64,
    /// The highest effective rate after the first cut.
    pub max_rpm_after_cut: f64,
}

impl Outcome {
    /// Accepted requests in `[from, to)` seconds per quota allowed in that span.
    pub fn goodput(&self, from: f64, to: f64, per_sec: f64) -> f64 {
        let n = self
            .accepted
            .iter()
            .filter(|t| **t >= from && **t < to)
            .count();
        n as f64 / ((to - from) * per_sec)
    }

    /// Violations grouped into incidents: a 429 more than `gap` seconds after the previous one
    /// starts a new incident.
    pub fn incidents(&self, gap: f64) -> Vec<usize> {
        let mut incidents = Vec::new();
        let mut last = f64::NEG_INFINITY;
        for t in &self.violations {
            if *t - last > gap {
                incidents.push(0);
            }
            *incidents.last_mut().expect("pushed above") += 1;
            last = *t;
        }
        incidents
    }
}

struct Upstream {
    kind: Kind,
    limit: usize,
    window: Duration,
    started: Instant,
    accepted: VecDeque<Instant>,
    tokens: f64,
    refilled: Instant,
}

impl Upstream {
    fn rate(&self) -> f64 {
        self.limit as f64 / self.window.as_secs_f64()
    }

    /// Takes a quota slot at `at`; `Err(wait)` with the time until one frees.
    fn admit(&mut self, at: Instant) -> Result<(), Duration> {
        let ok = match self.kind {
            Kind::Sliding => {
                while self
                    .accepted
                    .front()
                    .is_some_and(|t| at.duration_since(*t) >= self.window)
                {
                    self.accepted.pop_front();
                }
                if self.accepted.len() < self.limit {
                    Ok(())
                } else {
                    let oldest = self.accepted[self.accepted.len() - self.limit];
                    Err(self.window - at.duration_since(oldest))
                }
            }
            Kind::Fixed => {
                let w = self.window.as_nanos();
                let index = |t: Instant| t.duration_since(self.started).as_nanos() / w;
                let now = index(at);
                let used = self.accepted.iter().filter(|t| index(**t) == now).count();
                if used < self.limit {
                    Ok(())
                } else {
                    let into = at.duration_since(self.started).as_nanos() % w;
                    Err(Duration::from_nanos((w - into) as u64))
                }
            }
            Kind::Bucket => {
                let earned = at.duration_since(self.refilled).as_secs_f64() * self.rate();
                self.tokens = (self.tokens + earned).min(self.limit as f64);
                self.refilled = at;
                if self.tokens >= 1.0 {
                    self.tokens -= 1.0;
                    Ok(())
                } else {
                    Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate()))
                }
            }
        };
        if ok.is_ok() {
            self.accepted.push_back(at);
            if self.accepted.len() > 10_000 {
                self.accepted.pop_front();
            }
        }
        ok
    }
}

/// Runs `scenario` against the limiter with `retreat` settings and `max_replays`.
pub fn run(scenario: Scenario, retreat: RetreatSettings, max_replays: u32) -> Outcome {
    let t0 = Instant::now();
    let mut limiter = Limiter::new(
        LimiterSettings {
            base_rpm: scenario.rate_rpm,
            capacity: 1,
            queue_max: 10_000,
            keys: Vec::new(),
            models: Vec::new(),
            client_caps: Vec::new(),
            retreat,
        },
        t0,
    );
    let mut upstream = Upstream {
        kind: scenario.kind,
        limit: scenario.limit,
        window: scenario.window,
        started: t0,
        accepted: VecDeque::new(),
        tokens: scenario.limit as f64,
        refilled: t0,
    };
    let mut out = Outcome::default();
    let deadline = t0 + Duration::from_secs(100_000);
    let client: Arc<str> = Arc::from("c");
    // Waiter id -> replays so far.
    let mut waiting: HashMap<WaiterId, u32> = HashMap::new();
    // Requests holding a token, to be answered now: (replays so far, stamp).
    let mut sending: Vec<(u32, Grant)> = Vec::new();
    let mut now = t0;
    let mut cut_seen = false;

    let ask = |limiter: &mut Limiter,
               replays: u32,
               now: Instant,
               waiting: &mut HashMap<WaiterId, u32>,
               sending: &mut Vec<(u32, Grant)>| {
        let admission = if replays == 0 {
            limiter.request(client.clone(), Priority::Normal, deadline, now)
        } else {
            limiter.request_again_with(Ask::new(client.clone(), Priority::Normal, deadline), now)
        };
        match admission {
            Admission::Granted => sending.push((replays, limiter.last_grant())),
            Admission::Queued(id) => {
                waiting.insert(id, replays);
            }
            Admission::Rejected { .. } => panic!("the simulation never fills the queue"),
        }
    };
    for _ in 0..scenario.clients {
        ask(&mut limiter, 0, now, &mut waiting, &mut sending);
    }
    while now < t0 + scenario.run {
        if let Some((at, limit)) = scenario.limit_change {
            if now >= t0 + at {
                upstream.limit = limit;
            }
        }
        while let Some((replays, grant)) = sending.pop() {
            let secs = now.duration_since(t0).as_secs_f64();
            match upstream.admit(now) {
                Ok(()) => {
                    out.accepted.push(secs);
                    limiter.observe_answer(&UpstreamSignal::Accepted { pause: None }, grant, now);
                    ask(&mut limiter, 0, now, &mut waiting, &mut sending);
                }
                Err(wait) => {
                    out.violations.push(secs);
                    if std::env::var("SIM_TRACE").is_ok() {
                        let c = limiter.controller();
                        eprintln!(
                            "{secs:8.2} 429 probe={} state={:?} rpm={:.1} learned={:?}",
                            grant.probe,
                            c.state(),
                            c.effective_rpm(),
                            c.learned()
                        );
                    }
                    let retry_after = match scenario.style {
                        Style::Bare => None,
                        Style::RetryAfter => {
                            Some(Duration::from_secs(wait.as_secs_f64().ceil() as u64))
                        }
                        Style::RetryAfterFixed(secs) => Some(Duration::from_secs(secs)),
                    };
                    limiter.observe_answer(
                        &UpstreamSignal::RateLimited { retry_after },
                        grant,
                        now,
                    );
                    if replays < max_replays {
                        ask(&mut limiter, replays + 1, now, &mut waiting, &mut sending);
                    } else {
                        out.client_429s += 1;
                        ask(&mut limiter, 0, now, &mut waiting, &mut sending);
                    }
                }
            }
        }
        let rpm = limiter.controller().effective_rpm();
        if limiter.controller().state() != RetreatState::Normal {
            cut_seen = true;
        }
        if cut_seen {
            out.max_rpm_after_cut = out.max_rpm_after_cut.max(rpm);
        }
        // Wake at least every 100 ms so that controller steps are seen on time.
        let next = limiter
            .next_wakeup(now)
            .map_or(now + Duration::from_millis(100), |t| {
                t.min(now + Duration::from_millis(100))
            })
            .max(now + Duration::from_micros(1));
        now = next;
        for resolution in limiter.poll(now) {
            if let Resolution::Granted(id, _) = resolution {
                let replays = waiting.remove(&id).expect("granted a waiter");
                sending.push((replays, limiter.last_grant()));
            }
        }
    }
    out.final_rpm = limiter.controller().effective_rpm();
    out
}
