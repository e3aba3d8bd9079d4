//! The queue's order and memory, at exact instants.
use super::*;
use std::time::Duration;

fn waiter(client: &str, priority: Priority, t0: Instant, timeout_s: u64) -> Waiter {
    Waiter {
        client: Arc::from(client),
        priority,
        deadline: t0 + Duration::from_secs(timeout_s),
        enqueued: t0,
        weight: 1,
        model: None,
        learned: None,
        priced: None,
    }
}

#[test]
fn strict_priority_then_fifo() {
    let t0 = Instant::now();
    let mut q = AdmissionQueue::new();
    q.push_back(1, waiter("a", Priority::Low, t0, 10));
    q.push_back(2, waiter("a", Priority::Normal, t0, 10));
    q.push_back(3, waiter("a", Priority::High, t0, 10));
    q.push_back(4, waiter("a", Priority::Normal, t0, 10));
    let order: Vec<_> = std::iter::from_fn(|| q.pop_next().map(|(id, _)| id)).collect();
    assert_eq!(order, vec![3, 2, 4, 1]);
}

#[test]
fn a_single_request_is_served_within_two_grants_beside_a_greedy_client() {
    let t0 = Instant::now();
    let mut q = AdmissionQueue::new();
    for id in 0..50 {
        q.push_back(id, waiter("greedy", Priority::Normal, t0, 10));
    }
    q.push_back(100, waiter("polite", Priority::Normal, t0, 10));
    let first_two: Vec<_> = (0..2).map(|_| q.pop_next().unwrap().0).collect();
    assert!(first_two.contains(&100), "served: {first_two:?}");
    assert_eq!(q.len(), 49);
}

#[test]
fn clients_take_turns() {
    let t0 = Instant::now();
    let mut q = AdmissionQueue::new();
    for id in 0..3 {
        q.push_back(id, waiter("a", Priority::Normal, t0, 10));
        q.push_back(10 + id, waiter("b", Priority::Normal, t0, 10));
    }
    let order: Vec<_> = std::iter::from_fn(|| q.pop_next().map(|(id, _)| id)).collect();
    assert_eq!(order, vec![0, 10, 1, 11, 2, 12]);
}

#[test]
fn removed_and_expired_waiters_are_skipped() {
    let t0 = Instant::now();
    let mut q = AdmissionQueue::new();
    q.push_back(1, waiter("a", Priority::Normal, t0, 5));
    q.push_back(2, waiter("a", Priority::Normal, t0, 1));
    q.push_back(3, waiter("a", Priority::Normal, t0, 5));
    assert!(q.remove(1).is_some());
    assert!(q.remove(1).is_none());
    assert_eq!(q.next_deadline(), Some(t0 + Duration::from_secs(1)));
    let expired = q.expire(t0 + Duration::from_secs(1));
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].0, 2);
    assert_eq!(q.depth(Priority::Normal), 1);
    assert_eq!(q.pop_next().unwrap().0, 3);
    assert!(q.pop_next().is_none());
    assert!(q.is_empty());
}

#[test]
fn push_front_goes_ahead_of_its_class_only() {
    let t0 = Instant::now();
    let mut q = AdmissionQueue::new();
    q.push_back(1, waiter("a", Priority::High, t0, 5));
    q.push_back(2, waiter("b", Priority::Normal, t0, 5));
    q.push_front(3, waiter("c", Priority::Normal, t0, 5));
    let order: Vec<_> = std::iter::from_fn(|| q.pop_next().map(|(id, _)| id)).collect();
    assert_eq!(order, vec![1, 3, 2]);
    assert_eq!(q.waiting_at_or_above(Priority::Low), 0);
}

#[test]
fn clients_that_come_once_leave_no_lasting_trace() {
    let t0 = Instant::now();
    let mut q = AdmissionQueue::new();
    for id in 0..50_000 {
        q.push_back(id, waiter(&format!("once-{id}"), Priority::Normal, t0, 10));
        assert_eq!(q.pop_next().map(|(i, _)| i), Some(id));
    }
    let remembered = q.classes[Priority::Normal as usize].left_at.len();
    assert!(
        remembered <= LEFT_AT_MAX + 64,
        "{remembered} departed clients remembered"
    );
}

#[test]
fn priorities_parse_leniently() {
    assert_eq!("HIGH".parse(), Ok(Priority::High));
    assert_eq!(" low ".parse(), Ok(Priority::Low));
    assert!("urgent".parse::<Priority>().is_err());
}
