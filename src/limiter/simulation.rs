//! The limiter against simulated upstreams with hidden quotas, on explicit instants: closed-
//! loop clients, answers at once, replays after a 429 as the proxy does them. Runs minutes of
//! traffic in milliseconds, so the controller's bounds are checked for many windows, quota
//! kinds, models and misconfigurations, exactly and without sleeping.
//!
//! The upstream counts per key (`kind`, `limit`, `window`) and, for each model that has one,
//! per model on the key (a sliding window); a request the model's quota refuses does not
//! count on the key's. A model may also be locked for a while (every request refused with
//! "try again in …"), as NVIDIA does for hours.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

mod quota;

use quota::Quota;

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

/// Clients asking for one model.
#[derive(Debug, Clone, Copy)]
pub struct SimModel {
    pub name: &'static str,
    pub clients: usize,
    /// The model's own quota on the key: at most this many in any window of that length.
    pub quota: Option<(usize, Duration)>,
    /// The model is locked from the first to the second instant of the run: every request is
    /// refused with a `Retry-After` of the time left.
    pub locked: Option<(Duration, Duration)>,
}

#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub kind: Kind,
    pub limit: usize,
    pub window: Duration,
    pub style: Style,
    pub rate_rpm: f64,
    /// Closed-loop clients without a model (when `models` is empty).
    pub clients: usize,
    /// Clients by model; each client has an id of its own.
    pub models: &'static [SimModel],
    pub run: Duration,
    /// The clients start this long after the limiter (it has seen nothing until then).
    pub idle: Duration,
    /// The quota's limit changes to this at this time into the run.
    pub limit_change: Option<(Duration, usize)>,
    /// `rate_rpm: auto`, and what the upstream states as `x-ratelimit-limit-requests` on
    /// every answer: `"truth"` for its real limit per minute, else the text as given.
    pub stated: Option<&'static str>,
}

impl Scenario {
    pub fn new(kind: Kind, limit: usize, window_s: u64, rate_rpm: f64, run_s: u64) -> Scenario {
        Scenario {
            kind,
            limit,
            window: Duration::from_secs(window_s),
            style: Style::Bare,
            rate_rpm,
            clients: 10,
            models: &[],
            run: Duration::from_secs(run_s),
            idle: Duration::ZERO,
            limit_change: None,
            stated: None,
        }
    }

    /// Requests per second the upstream grants when every client keeps asking: the key's
    /// rate, or less when every model has a quota of its own below it.
    pub fn grant_per_sec(&self) -> f64 {
        let limit = self.limit_change.map_or(self.limit, |(_, l)| l);
        let key = limit as f64 / self.window.as_secs_f64();
        if self.models.is_empty() {
            return key;
        }
        let models: f64 = self
            .models
            .iter()
            .map(|m| {
                m.quota
                    .map_or(f64::INFINITY, |(l, w)| l as f64 / w.as_secs_f64())
            })
            .sum();
        key.min(models)
    }
}

/// What happened.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Seconds into the run (after the idle time) of each upstream 429, and the quota that
    /// refused it: the key's (`None`) or a model's.
    pub violations: Vec<(f64, Option<&'static str>)>,
    /// Seconds into the run of each accepted request, and its model.
    pub accepted: Vec<(f64, Option<&'static str>)>,
    /// 429s that reached a client (replays used up).
    pub client_429s: usize,
    /// Requests the sidecar answered 429 itself (its deadline could not be met).
    pub rejected: usize,
    /// The first key's effective rate at the end.
    pub final_rpm: f64,
    /// The highest effective rate of the first key after its first cut.
    pub max_rpm_after_cut: f64,
}

impl Outcome {
    /// Accepted requests in `[from, to)` seconds per quota allowed in that span.
    pub fn goodput(&self, from: f64, to: f64, per_sec: f64) -> f64 {
        let n = self
            .accepted
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .count();
        n as f64 / ((to - from) * per_sec)
    }

    /// Accepted requests of `model` in `[from, to)`.
    pub fn accepted_of(&self, model: &str, from: f64, to: f64) -> usize {
        self.accepted
            .iter()
            .filter(|(t, m)| *t >= from && *t < to && *m == Some(model))
            .count()
    }

    /// Violations grouped into incidents, each quota's apart (the key's, each model's): a 429
    /// more than `gap` seconds after that quota's previous one starts a new incident.
    pub fn incidents(&self, gap: f64) -> Vec<usize> {
        let mut incidents = Vec::new();
        let mut quotas: Vec<Option<&str>> = self.violations.iter().map(|(_, q)| *q).collect();
        quotas.sort();
        quotas.dedup();
        for quota in quotas {
            let mut last = f64::NEG_INFINITY;
            for (t, _) in self.violations.iter().filter(|(_, q)| *q == quota) {
                if *t - last > gap {
                    incidents.push(0);
                }
                *incidents.last_mut().expect("pushed above") += 1;
                last = *t;
            }
        }
        incidents
    }
}

/// A request on its way, as the proxy holds it.
#[derive(Debug, Clone, Copy)]
struct Request {
    client: usize,
    replays: u32,
}

struct Sim {
    limiter: Limiter,
    key: Quota,
    models: HashMap<&'static str, Quota>,
    scenario: Scenario,
    t0: Instant,
    /// When the clients started.
    start: Instant,
    /// Client index -> (id, model).
    clients: Vec<(Arc<str>, Option<&'static str>)>,
    waiting: HashMap<WaiterId, Request>,
    sending: Vec<(Request, Grant)>,
    /// Clients told to come back later, and when they do.
    later: Vec<(Instant, Request)>,
    deadline: Duration,
    max_replays: u32,
    out: Outcome,
}

impl Sim {
    fn ask(&mut self, request: Request, now: Instant) {
        let (client, model) = self.clients[request.client].clone();
        let ask = Ask {
            model_id: model.map(Arc::from),
            ..Ask::new(client, Priority::Normal, now + self.deadline)
        };
        let admission = if request.replays == 0 {
            self.limiter.request_with(ask, now)
        } else {
            self.limiter.request_again_with(ask, now)
        };
        match admission {
            Admission::Granted => self.sending.push((request, self.limiter.last_grant())),
            Admission::Queued(id) => {
                self.waiting.insert(id, request);
            }
            Admission::Rejected { retry_after, .. } => {
                // The sidecar told the client at once that it cannot be served in time; the
                // client comes back when it was told to.
                self.out.rejected += 1;
                self.later
                    .push((now + retry_after.max(Duration::from_secs(1)), request));
            }
        }
    }

    /// The upstream's answer to a request of `model` at `now`: `Ok`, or the wait it says and
    /// the quota that refused (`None`: the key's).
    fn upstream(
        &mut self,
        model: Option<&'static str>,
        now: Instant,
    ) -> Result<(), (Duration, Option<&'static str>)> {
        let into = now.duration_since(self.start);
        let spec = model.and_then(|m| self.scenario.models.iter().find(|s| s.name == m));
        if let Some((from, until)) = spec.and_then(|s| s.locked) {
            if into >= from && into < until {
                return Err((until - into, model));
            }
        }
        let model_quota = model.and_then(|m| self.models.get_mut(m));
        if let Some(q) = model_quota {
            q.check(now).map_err(|wait| (wait, model))?;
        }
        self.key.check(now).map_err(|wait| (wait, None))?;
        self.key.take(now);
        if let Some(q) = model.and_then(|m| self.models.get_mut(m)) {
            q.take(now);
        }
        Ok(())
    }

    /// What the upstream states on an answer, read as the proxy reads it.
    fn state_limit(&mut self, grant: Grant, now: Instant) {
        let Some(text) = self.scenario.stated else {
            return;
        };
        let truth = format!(
            "{}",
            self.key.limit as f64 * 60.0 / self.scenario.window.as_secs_f64()
        );
        let value = if text == "truth" {
            truth.as_str()
        } else {
            text
        };
        let header = |name: &str| (name == "x-ratelimit-limit-requests").then_some(value);
        if let Some(stated) = StatedLimit::read(header) {
            self.limiter.observe_stated(grant, stated, now);
        }
    }

    fn answer(&mut self, now: Instant) {
        while let Some((request, grant)) = self.sending.pop() {
            let secs = now.duration_since(self.start).as_secs_f64();
            self.state_limit(grant, now);
            let model = self.clients[request.client].1;
            match self.upstream(model, now) {
                Ok(()) => {
                    self.out.accepted.push((secs, model));
                    self.limiter.observe_answer(
                        &UpstreamSignal::Accepted { pause: None },
                        grant,
                        now,
                    );
                    self.limiter.release(grant);
                    self.ask(
                        Request {
                            replays: 0,
                            ..request
                        },
                        now,
                    );
                }
                Err((wait, quota)) => {
                    self.out.violations.push((secs, quota));
                    let locked = model
                        .and_then(|m| self.scenario.models.iter().find(|s| s.name == m))
                        .and_then(|s| s.locked)
                        .is_some_and(|(from, until)| {
                            let into = now.duration_since(self.start);
                            into >= from && into < until
                        });
                    let retry_after = match self.scenario.style {
                        _ if locked => Some(Duration::from_secs(wait.as_secs_f64().ceil() as u64)),
                        Style::Bare => None,
                        Style::RetryAfter => {
                            Some(Duration::from_secs(wait.as_secs_f64().ceil() as u64))
                        }
                        Style::RetryAfterFixed(secs) => Some(Duration::from_secs(secs)),
                    };
                    if trace() {
                        let c = self.limiter.controller_of(grant.lane);
                        eprintln!(
                            "{secs:8.2} 429 {model:?} probe={} test={} key={:?} {:.1} rpm {:?}",
                            grant.probe,
                            grant.test,
                            c.state(),
                            c.effective_rpm(),
                            c.learned()
                        );
                    }
                    self.limiter.observe_answer(
                        &UpstreamSignal::RateLimited { retry_after },
                        grant,
                        now,
                    );
                    self.limiter.release(grant);
                    if request.replays < self.max_replays {
                        self.ask(
                            Request {
                                replays: request.replays + 1,
                                ..request
                            },
                            now,
                        );
                    } else {
                        self.out.client_429s += 1;
                        self.ask(
                            Request {
                                replays: 0,
                                ..request
                            },
                            now,
                        );
                    }
                }
            }
        }
    }
}

fn trace() -> bool {
    std::env::var("SIM_TRACE").is_ok()
}

/// Runs `scenario` against the limiter with `retreat` settings and `max_replays`.
pub fn run(scenario: Scenario, retreat: RetreatSettings, max_replays: u32) -> Outcome {
    let t0 = Instant::now();
    let limiter = Limiter::new(
        LimiterSettings {
            base_rpm: scenario.rate_rpm,
            base_tpm: None,
            capacity: 1,
            queue_max: 10_000,
            keys: Vec::new(),
            models: Vec::new(),
            client_caps: Vec::new(),
            auto: scenario.stated.is_some(),
            retreat,
        },
        t0,
    );
    let start = t0 + scenario.idle;
    let clients: Vec<(Arc<str>, Option<&'static str>)> = if scenario.models.is_empty() {
        (0..scenario.clients)
            .map(|_| (Arc::from("c"), None))
            .collect()
    } else {
        scenario
            .models
            .iter()
            .flat_map(|m| (0..m.clients).map(move |i| (m.name, i)))
            .map(|(name, i)| (Arc::from(format!("{name}-{i}")), Some(name)))
            .collect()
    };
    let mut sim = Sim {
        limiter,
        key: Quota::new(scenario.kind, scenario.limit, scenario.window, start),
        models: scenario
            .models
            .iter()
            .filter_map(|m| {
                let (limit, window) = m.quota?;
                Some((m.name, Quota::new(Kind::Sliding, limit, window, start)))
            })
            .collect(),
        scenario,
        t0,
        start,
        clients,
        waiting: HashMap::new(),
        sending: Vec::new(),
        later: Vec::new(),
        deadline: Duration::from_secs(300),
        max_replays,
        out: Outcome::default(),
    };
    // The idle stretch: the limiter's clock runs, nobody asks.
    let mut now = sim.t0;
    while now < start {
        sim.limiter.poll(now);
        now = (now + Duration::from_secs(1)).min(start);
    }
    for client in 0..sim.clients.len() {
        sim.ask(Request { client, replays: 0 }, now);
    }
    let mut cut_seen = false;
    while now < start + scenario.run {
        if let Some((at, limit)) = scenario.limit_change {
            if now >= start + at {
                sim.key.limit = limit;
            }
        }
        sim.answer(now);
        let c = sim.limiter.controller();
        if trace() && now.duration_since(start).as_millis() % 5000 < 100 {
            eprintln!(
                "{:8.2} key {:?} {:.1} rpm {:?}",
                now.duration_since(start).as_secs_f64(),
                c.phase(),
                c.effective_rpm(),
                c.learned()
            );
        }
        if c.state() != RetreatState::Normal {
            cut_seen = true;
        }
        if cut_seen {
            sim.out.max_rpm_after_cut = sim.out.max_rpm_after_cut.max(c.effective_rpm());
        }
        // Wake at least every 100 ms so that controller steps are seen on time.
        let next = sim
            .limiter
            .next_wakeup(now)
            .map_or(now + Duration::from_millis(100), |t| {
                t.min(now + Duration::from_millis(100))
            })
            .min(
                sim.later
                    .iter()
                    .map(|(at, _)| *at)
                    .min()
                    .unwrap_or(now + Duration::from_secs(1)),
            )
            .max(now + Duration::from_micros(1));
        now = next;
        for resolution in sim.limiter.poll(now) {
            match resolution {
                Resolution::Granted(id, grant) => {
                    let request = sim.waiting.remove(&id).expect("granted a waiter");
                    sim.sending.push((request, grant));
                }
                Resolution::Expired {
                    id, retry_after, ..
                } => {
                    let request = sim.waiting.remove(&id).expect("expired a waiter");
                    sim.out.rejected += 1;
                    let back = now + retry_after.max(Duration::from_secs(1));
                    sim.later.push((
                        back,
                        Request {
                            replays: 0,
                            ..request
                        },
                    ));
                }
            }
        }
        let due: Vec<Request> = sim
            .later
            .iter()
            .filter(|(at, _)| *at <= now)
            .map(|(_, r)| *r)
            .collect();
        sim.later.retain(|(at, _)| *at > now);
        for request in due {
            sim.ask(request, now);
        }
    }
    sim.out.final_rpm = sim.limiter.controller().effective_rpm();
    sim.out
}
