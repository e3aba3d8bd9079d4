//! The load generator of the benchmarks: closed-loop clients, each with an id, a priority and a
//! number of parallel loops, for a fixed duration, optionally retrying 429s with exponential
//! backoff the way clients without a sidecar do. It reports goodput, status codes, latency and
//! queue-wait percentiles (the sidecar's `x-sidecar-queue-wait-ms`), and Jain's fairness index
//! over the requests each client got served.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One client: `parallel` loops sending as `id` with `priority`.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub id: String,
    pub parallel: usize,
    pub priority: &'static str,
    /// A client key, sent as `Authorization: Bearer …` (sidecars with `clients:`).
    pub bearer: Option<String>,
    /// The model its requests ask for (`mock` unless set).
    pub model: Option<String>,
    /// A prompt of about this many bytes instead of "hi" (a coding agent's long context).
    pub body_bytes: Option<usize>,
}

impl ClientSpec {
    pub fn new(id: impl Into<String>) -> Self {
        ClientSpec {
            id: id.into(),
            parallel: 1,
            priority: "normal",
            bearer: None,
            model: None,
            body_bytes: None,
        }
    }

    /// The same client asking for `model`.
    pub fn model(self, model: &str) -> Self {
        ClientSpec {
            model: Some(model.to_string()),
            ..self
        }
    }
}

/// How the clients behave.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub url: String,
    pub clients: Vec<ClientSpec>,
    pub duration: Duration,
    pub think: Duration,
    /// Retry a 429 after a backoff (1 s, doubling, at most 16 s, ±20% jitter) until the request
    /// has taken `give_up_after`; `false` means a 429 is final.
    pub retry_429: bool,
    pub give_up_after: Duration,
}

/// One request as the client saw it.
#[derive(Debug, Clone)]
pub struct Sample {
    pub client: usize,
    pub status: u16,
    pub latency: Duration,
    /// Finished before the run's end (requests still queued at the end finish later).
    pub in_run: bool,
    pub queue_wait: Option<Duration>,
    pub attempts: u32,
}

#[derive(Debug, Default)]
pub struct Report {
    pub samples: Vec<Sample>,
    pub clients: usize,
}

fn percentile(mut xs: Vec<f64>, p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    xs[((xs.len() as f64 - 1.0) * p).round() as usize]
}

/// Jain's fairness index: 1 when every client got the same, 1/n when one got everything.
pub fn jain(xs: &[f64]) -> f64 {
    let sum: f64 = xs.iter().sum();
    let squares: f64 = xs.iter().map(|x| x * x).sum();
    if squares == 0.0 {
        1.0
    } else {
        sum * sum / (xs.len() as f64 * squares)
    }
}

impl Report {
    pub fn ok(&self) -> usize {
        self.samples.iter().filter(|s| s.status == 200).count()
    }

    pub fn errors(&self) -> usize {
        self.samples.len() - self.ok()
    }

    /// Attempts per request, on average (retries of 429s included).
    pub fn mean_attempts(&self) -> f64 {
        let total: u32 = self.samples.iter().map(|s| s.attempts).sum();
        total as f64 / self.samples.len().max(1) as f64
    }

    /// Requests each client got answered 200 within the run.
    pub fn served_per_client(&self) -> Vec<f64> {
        let mut served = vec![0.0; self.clients];
        for s in self.samples.iter().filter(|s| s.status == 200 && s.in_run) {
            served[s.client] += 1.0;
        }
        served
    }

    pub fn jain(&self) -> f64 {
        jain(&self.served_per_client())
    }

    /// Latency percentile in ms, over the samples `keep` selects.
    pub fn latency_ms(&self, p: f64, keep: impl Fn(&Sample) -> bool) -> f64 {
        percentile(
            self.samples
                .iter()
                .filter(|s| keep(s))
                .map(|s| s.latency.as_secs_f64() * 1e3)
                .collect(),
            p,
        )
    }

    pub fn queue_wait_ms(&self, p: f64, keep: impl Fn(&Sample) -> bool) -> f64 {
        percentile(
            self.samples
                .iter()
                .filter(|s| keep(s))
                .filter_map(|s| s.queue_wait.map(|w| w.as_secs_f64() * 1e3))
                .collect(),
            p,
        )
    }
}

/// Runs the load and returns what the clients saw.
pub async fn run(spec: LoadSpec) -> Report {
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1024)
        .timeout(spec.give_up_after + Duration::from_secs(5))
        .build()
        .expect("an HTTP client");
    let samples = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let stop = start + spec.duration;
    let mut tasks = Vec::new();
    for (index, client) in spec.clients.iter().enumerate() {
        let model = client.model.as_deref().unwrap_or("mock");
        let content: String = match client.body_bytes {
            Some(n) => "lorem ipsum dolor sit amet "
                .chars()
                .cycle()
                .take(n)
                .collect(),
            None => "hi".to_string(),
        };
        let body =
            serde_json::json!({"model": model, "messages": [{"role": "user", "content": content}]})
                .to_string();
        for _ in 0..client.parallel {
            let (http, samples, spec, client, body) = (
                http.clone(),
                samples.clone(),
                spec.clone(),
                client.clone(),
                body.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut seed = (index as u64 + 1) * 0x9e37_79b9_7f4a_7c15;
                while Instant::now() < stop {
                    let begun = Instant::now();
                    let mut attempts = 0;
                    let mut backoff = Duration::from_secs(1);
                    let (status, wait) = loop {
                        attempts += 1;
                        let mut request = http
                            .post(&spec.url)
                            .header("content-type", "application/json")
                            .header("x-client-id", &client.id)
                            .header("x-priority", client.priority)
                            .body(body.clone());
                        if let Some(key) = &client.bearer {
                            request = request.bearer_auth(key);
                        }
                        let answer = request.send().await;
                        let (status, wait) = match answer {
                            Ok(r) => {
                                let wait = r
                                    .headers()
                                    .get("x-sidecar-queue-wait-ms")
                                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                                    .map(Duration::from_millis);
                                let status = r.status().as_u16();
                                let _ = r.bytes().await;
                                (status, wait)
                            }
                            Err(_) => (0, None),
                        };
                        if status == 429
                            && spec.retry_429
                            && begun.elapsed() + backoff < spec.give_up_after
                        {
                            // Jitter of ±20% from a small xorshift generator.
                            seed ^= seed << 13;
                            seed ^= seed >> 7;
                            seed ^= seed << 17;
                            let jitter = 0.8 + 0.4 * (seed % 1000) as f64 / 1000.0;
                            tokio::time::sleep(backoff.mul_f64(jitter)).await;
                            backoff = (backoff * 2).min(Duration::from_secs(16));
                            continue;
                        }
                        break (status, wait);
                    };
                    samples.lock().unwrap().push(Sample {
                        client: index,
                        status,
                        latency: begun.elapsed(),
                        in_run: Instant::now() <= stop,
                        queue_wait: wait,
                        attempts,
                    });
                    if !spec.think.is_zero() {
                        tokio::time::sleep(spec.think).await;
                    }
                }
            }));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    Report {
        samples,
        clients: spec.clients.len(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn jain_bounds() {
        assert!((super::jain(&[5.0, 5.0, 5.0]) - 1.0).abs() < 1e-9);
        assert!((super::jain(&[9.0, 0.0, 0.0]) - 1.0 / 3.0).abs() < 1e-9);
    }
}
