//! The cost of one admission decision and of one grant, with criterion:
//! `cargo bench --bench admission`.

#![allow(clippy::disallowed_methods)] // tests and benchmarks time real runs (see clippy.toml)

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use nvidia_sidecar::limiter::{Admission, Limiter, LimiterSettings, Priority, RetreatSettings};

fn settings(capacity: u32, queue_max: usize) -> LimiterSettings {
    LimiterSettings {
        base_rpm: 40.0,
        base_tpm: None,
        capacity,
        queue_max,
        keys: Vec::new(),
        models: Vec::new(),
        client_caps: Vec::new(),
        auto: false,
        retreat: RetreatSettings {
            safety_margin: 0.0,
            ..RetreatSettings::default()
        },
    }
}

fn admission(c: &mut Criterion) {
    let client: Arc<str> = Arc::from("agent-1");
    let t0 = Instant::now();

    // A token is free: the decision is "granted" (the bucket is refunded so it never runs dry).
    c.bench_function("admit: token free", |b| {
        let mut limiter = Limiter::new(settings(1_000_000, 100), t0);
        let far = t0 + Duration::from_secs(3600);
        b.iter(|| {
            let now = t0 + Duration::from_millis(1);
            let decision = limiter.request(black_box(client.clone()), Priority::Normal, far, now);
            let grant = limiter.last_grant();
            limiter.refund(grant, now);
            black_box(decision)
        })
    });

    // No token: the request joins a queue of 10,000 others (and is cancelled again).
    c.bench_function("admit: queue behind 10,000", |b| {
        let mut limiter = Limiter::new(settings(1, 20_000), t0);
        let far = t0 + Duration::from_secs(3600);
        limiter.request(client.clone(), Priority::Normal, far, t0);
        for i in 0..10_000 {
            limiter.request(
                Arc::from(format!("c{}", i % 100)),
                Priority::Normal,
                far,
                t0,
            );
        }
        b.iter(|| {
            let decision = limiter.request(black_box(client.clone()), Priority::Normal, far, t0);
            if let Admission::Queued(id) = decision {
                limiter.cancel(id, t0);
            }
            black_box(decision)
        })
    });

    // A grant: one token becomes due and the next of 10,000 waiters gets it.
    c.bench_function("grant: next of 10,000 waiters", |b| {
        b.iter_custom(|iterations| {
            let mut limiter = Limiter::new(settings(1, 2_000_000), t0);
            let far = t0 + Duration::from_secs(1_000_000);
            limiter.request(client.clone(), Priority::Normal, far, t0);
            let waiters = iterations as usize + 10_000;
            for i in 0..waiters {
                limiter.request(
                    Arc::from(format!("c{}", i % 100)),
                    Priority::Normal,
                    far,
                    t0,
                );
            }
            let mut now = t0;
            let step = Duration::from_millis(1500);
            let started = Instant::now();
            for _ in 0..iterations {
                now += step;
                black_box(limiter.poll(now));
            }
            started.elapsed()
        })
    });
}

criterion_group!(benches, admission);
criterion_main!(benches);
