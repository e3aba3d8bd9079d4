//! The gate on tokio's paused clock: grants on time, dropped tickets, refunds, timeouts.

use super::*;
use crate::limiter::RetreatSettings;

fn gate(rpm: f64) -> Arc<AdmissionGate> {
    AdmissionGate::new(LimiterSettings {
        base_rpm: rpm,
        base_tpm: None,
        capacity: 1,
        queue_max: 10,
        keys: Vec::new(),
        models: Vec::new(),
        client_caps: Vec::new(),
        auto: false,
        retreat: RetreatSettings {
            safety_margin: 0.0,
            ..RetreatSettings::default()
        },
    })
}

#[tokio::test(start_paused = true)]
async fn the_clock_grants_waiters_on_time() {
    let gate = gate(60.0);
    let deadline = now() + Duration::from_secs(30);
    let start = tokio::time::Instant::now();
    assert_eq!(
        gate.admit(Arc::from("a"), Priority::Normal, deadline)
            .immediate(),
        Some(Verdict::Granted(Grant::default()))
    );
    let mut second = gate.admit(Arc::from("a"), Priority::Normal, deadline);
    let mut third = gate.admit(Arc::from("b"), Priority::Normal, deadline);
    assert!(matches!(second.verdict().await, Verdict::Granted(_)));
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert!(matches!(third.verdict().await, Verdict::Granted(_)));
    assert_eq!(start.elapsed(), Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn a_dropped_ticket_gives_its_turn_to_the_next_waiter() {
    let gate = gate(60.0);
    let deadline = now() + Duration::from_secs(30);
    let start = tokio::time::Instant::now();
    let _first = gate.admit(Arc::from("a"), Priority::Normal, deadline);
    let gone = gate.admit(Arc::from("a"), Priority::Normal, deadline);
    let mut stays = gate.admit(Arc::from("b"), Priority::Normal, deadline);
    drop(gone);
    assert!(matches!(stays.verdict().await, Verdict::Granted(_)));
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(1),
        "the dropped waiter consumed nothing"
    );
}

#[tokio::test(start_paused = true)]
async fn a_grant_nobody_picks_up_is_refunded() {
    let gate = gate(60.0);
    let deadline = now() + Duration::from_secs(30);
    let _first = gate.admit(Arc::from("a"), Priority::Normal, deadline);
    let unclaimed = gate.admit(Arc::from("a"), Priority::Normal, deadline);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The grant was sent at 1 s but never received; dropping the ticket refunds it.
    drop(unclaimed);
    assert_eq!(
        gate.admit(Arc::from("b"), Priority::Normal, deadline)
            .immediate(),
        Some(Verdict::Granted(Grant::default()))
    );
}

#[tokio::test(start_paused = true)]
async fn waiters_time_out_with_a_retry_after() {
    let gate = gate(6.0);
    let _first = gate.admit(
        Arc::from("a"),
        Priority::Normal,
        now() + Duration::from_secs(30),
    );
    let mut late = gate.admit(
        Arc::from("a"),
        Priority::Low,
        now() + Duration::from_secs(2),
    );
    match late.verdict().await {
        Verdict::Rejected {
            why: Rejection::QueueTimeout,
            retry_after,
        } => {
            assert!(retry_after >= Duration::from_secs(7), "{retry_after:?}")
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}
