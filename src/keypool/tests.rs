use super::*;

#[cfg(target_os = "linux")]
#[tokio::test]
async fn key_generation_runs_at_a_lower_priority_than_the_reactor() {
    let pool = KeyPool::new(2, 0, KeyKind::Rsa { bits: 2048 }, Counter::default());
    let reactor = current_niceness();
    let worker = pool.run(current_niceness, Priority::Bulk, "", 1).await.unwrap();
    assert_eq!(worker, (reactor + BULK_NICENESS).min(19));
    let worker = pool.run(current_niceness, Priority::Urgent, "", 1).await.unwrap();
    assert_eq!(worker, (reactor + URGENT_NICENESS).min(19));
    const { assert!(URGENT_NICENESS > 0, "urgent work too yields to the reactor") };
}

#[tokio::test]
async fn no_more_keys_than_the_concurrency_are_made_at_once_across_both_priorities() {
    let pool = KeyPool::new(2, 0, KeyKind::Rsa { bits: 2048 }, Counter::default());
    let (now, most) =
        (Arc::new(std::sync::atomic::AtomicUsize::new(0)), Arc::new(std::sync::atomic::AtomicUsize::new(0)));
    let jobs = (0..12).map(|i| {
        let (now, most, pool) = (now.clone(), most.clone(), pool.clone());
        let priority = if i % 2 == 0 { Priority::Urgent } else { Priority::Bulk };
        async move {
            let job = move || {
                let running = now.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                most.fetch_max(running, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(20));
                now.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            };
            pool.run(job, priority, "", 1).await.unwrap();
        }
    });
    futures::future::join_all(jobs).await;
    assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 2);
}

fn fixed(n: usize) -> Buffer {
    Buffer { base: n, idle: n }
}

#[test]
fn ready_keys_are_kept_only_for_kinds_in_use() {
    let rsa = KeyKind::Rsa { bits: 2048 };
    let mut ready = Ready::default();
    assert_eq!(ready.next_to_fill(rsa, fixed(2)), Some(rsa), "the default kind is always in use");
    ready.keys.entry(rsa).or_default().push(PrivateKey::generate(KeyKind::EcdsaP256).unwrap());
    ready.keys.entry(rsa).or_default().push(PrivateKey::generate(KeyKind::EcdsaP256).unwrap());
    assert_eq!(ready.next_to_fill(rsa, fixed(2)), None, "full; no other kind was asked for");
    ready.asked.insert(KeyKind::EcdsaP384, std::time::Instant::now());
    assert_eq!(ready.next_to_fill(rsa, fixed(2)), Some(KeyKind::EcdsaP384));
    ready.keys.entry(KeyKind::EcdsaP384).or_default().push(PrivateKey::generate(KeyKind::EcdsaP384).unwrap());
    let long_ago = std::time::Instant::now().checked_sub(IN_USE_FOR + std::time::Duration::from_secs(1));
    ready.asked.insert(KeyKind::EcdsaP384, long_ago.unwrap());
    assert_eq!(ready.next_to_fill(rsa, fixed(2)), None);
    assert!(!ready.keys.contains_key(&KeyKind::EcdsaP384), "keys of a kind nobody asks for are dropped");
    assert_eq!(ready.keys[&rsa].len(), 2);
    let mut ec_default = Ready::default();
    assert_eq!(ec_default.next_to_fill(KeyKind::EcdsaP256, fixed(1)), Some(KeyKind::EcdsaP256), "no RSA for nobody");
}

#[tokio::test]
async fn a_parked_key_is_used_only_for_its_kind() {
    let pool = KeyPool::new(1, 0, KeyKind::Rsa { bits: 2048 }, Counter::default());
    let first = pool.serving_key("uid", "ns", KeyKind::EcdsaP256, Priority::Bulk).await.unwrap();
    let again = pool.serving_key("uid", "ns", KeyKind::EcdsaP256, Priority::Bulk).await.unwrap();
    assert!(Arc::ptr_eq(&first, &again), "a retry signs over the parked key");
    let other = pool.serving_key("uid", "ns", KeyKind::EcdsaP384, Priority::Bulk).await.unwrap();
    assert_eq!(other.kind(), KeyKind::EcdsaP384);
    let back = pool.serving_key("uid", "ns", KeyKind::EcdsaP384, Priority::Bulk).await.unwrap();
    assert!(Arc::ptr_eq(&other, &back));
}

#[tokio::test]
async fn keys_parked_for_owners_that_went_are_dropped() {
    let pool = KeyPool::new(1, 0, KeyKind::Rsa { bits: 2048 }, Counter::default());
    let gone = pool.serving_key("gone", "ns", KeyKind::EcdsaP256, Priority::Bulk).await.unwrap();
    let long_ago = std::time::Instant::now().checked_sub(PARKED_FOR + std::time::Duration::from_secs(1)).unwrap();
    pool.inner.parked.lock().unwrap().insert("gone".into(), (gone, long_ago));
    pool.serving_key("new", "ns", KeyKind::EcdsaP256, Priority::Bulk).await.unwrap();
    let parked = pool.inner.parked.lock().unwrap();
    assert_eq!(parked.keys().collect::<Vec<_>>(), ["new"], "the key of an owner that went is dropped");
}

#[tokio::test]
async fn a_panicking_job_is_an_error_and_the_worker_carries_on() {
    let pool = KeyPool::new(1, 0, KeyKind::Rsa { bits: 2048 }, Counter::default());
    let failed = pool.run(|| panic!("boom"), Priority::Bulk, "", 1).await;
    assert!(matches!(failed, Err(PkiError::KeyGeneration(_))));
    assert_eq!(pool.run(|| 7, Priority::Urgent, "", 1).await.unwrap(), 7);
}

/// Pushes a job that records `label` when it runs.
fn push(lane: &mut Lane, arrivals: &mut u64, log: &Arc<std::sync::Mutex<Vec<String>>>, ns: &str, kind: KeyKind) {
    let (log, label) = (log.clone(), format!("{ns}:{kind}"));
    let job: Job = Box::new(move || log.lock().unwrap().push(label));
    *arrivals += 1;
    lane.push(ns, Waiting { job, cost: cost(kind), arrival: *arrivals });
}

/// Runs the next `n` jobs and returns what they recorded.
fn run_next(lane: &mut Lane, log: &Arc<std::sync::Mutex<Vec<String>>>, n: usize) -> Vec<String> {
    for _ in 0..n {
        (lane.pop().unwrap())();
    }
    std::mem::take(&mut *log.lock().unwrap())
}

#[test]
fn a_namespace_with_a_backlog_does_not_delay_another() {
    let (rsa4096, rsa2048) = (KeyKind::Rsa { bits: 4096 }, KeyKind::Rsa { bits: 2048 });
    let (mut lane, mut arrivals, log) = (Lane::default(), 0, Arc::default());
    for _ in 0..300 {
        push(&mut lane, &mut arrivals, &log, "a", rsa4096);
    }
    assert_eq!(run_next(&mut lane, &log, 2), ["a:RSA-4096", "a:RSA-4096"], "alone, a is served in order");
    push(&mut lane, &mut arrivals, &log, "b", rsa2048);
    assert_eq!(run_next(&mut lane, &log, 1), ["b:RSA-2048"], "a newcomer goes next, not after 298 keys");
    // Weighted by cost: b may start 12 RSA-2048 keys (10 units each) for each
    // RSA-4096 key (120 units) of a.
    for _ in 0..30 {
        push(&mut lane, &mut arrivals, &log, "b", rsa2048);
    }
    let order = run_next(&mut lane, &log, 28);
    let a_served = order.iter().filter(|l| l.starts_with("a:")).count();
    assert_eq!(a_served, 2, "{order:?}");
    // A namespace that was idle joins at the current virtual time: it neither
    // waits behind the others' backlog nor banks credit for the time it was idle.
    let clock = lane.clock;
    push(&mut lane, &mut arrivals, &log, "c", rsa2048);
    assert_eq!(lane.waiting["c"].tag, clock);
}

#[test]
fn namespaces_take_turns_in_arrival_order_and_jobs_of_one_namespace_stay_in_order() {
    let ec = KeyKind::EcdsaP256;
    let (mut lane, mut arrivals, log) = (Lane::default(), 0, Arc::default());
    for ns in ["a", "a", "a", "b", "c", "b"] {
        push(&mut lane, &mut arrivals, &log, ns, ec);
    }
    assert_eq!(
        run_next(&mut lane, &log, 6),
        ["a:ECDSA P-256", "b:ECDSA P-256", "c:ECDSA P-256", "a:ECDSA P-256", "b:ECDSA P-256", "a:ECDSA P-256"]
    );
    assert!(lane.pop().is_none());
    assert!(lane.waiting.is_empty());
    // Nothing waits: nobody is owed anything (the map does not grow).
    assert!(lane.idle.is_empty(), "{:?}", lane.idle.keys().collect::<Vec<_>>());
}

#[tokio::test]
async fn urgent_jobs_still_go_before_bulk_ones_of_any_namespace() {
    let queue = Queue::new(1);
    let log: Arc<std::sync::Mutex<Vec<&str>>> = Arc::default();
    for (label, priority, ns) in
        [("bulk-a", Priority::Bulk, "a"), ("urgent-b", Priority::Urgent, "b"), ("urgent-a", Priority::Urgent, "a")]
    {
        let log = log.clone();
        queue.push(Box::new(move || log.lock().unwrap().push(label)), priority, ns, 1).unwrap();
    }
    assert!(queue.try_next(Priority::Bulk).is_none(), "bulk threads wait while urgent jobs do");
    let first = queue.try_next(Priority::Urgent).unwrap();
    assert!(queue.try_next(Priority::Urgent).is_none(), "one slot, taken");
    assert!(queue.urgent_pending());
    first();
    queue.done(Priority::Urgent);
    (queue.try_next(Priority::Urgent).unwrap())();
    assert!(queue.urgent_pending(), "one urgent job still running");
    queue.done(Priority::Urgent);
    assert!(!queue.urgent_pending(), "no urgent job queued or running");
    assert!(queue.try_next(Priority::Urgent).is_none(), "urgent threads take no bulk job");
    (queue.next(Priority::Bulk).unwrap())();
    queue.done(Priority::Bulk);
    assert_eq!(*log.lock().unwrap(), ["urgent-b", "urgent-a", "bulk-a"]);
}

#[test]
fn the_default_kind_grows_to_the_idle_buffer_once_nothing_was_asked_for_a_while() {
    let (rsa, ec) = (KeyKind::Rsa { bits: 2048 }, KeyKind::EcdsaP256);
    let buffer = Buffer { base: 1, idle: 3 };
    let now = std::time::Instant::now();
    let idle_since = now.checked_sub(IDLE_AFTER + std::time::Duration::from_secs(1)).unwrap();
    let mut ready = Ready::default();
    ready.asked.insert(rsa, now);
    ready.asked.insert(ec, now);
    ready.keys.insert(rsa, vec![PrivateKey::generate(ec).unwrap()]);
    ready.keys.insert(ec, vec![PrivateKey::generate(ec).unwrap()]);
    assert_eq!(ready.next_to_fill(rsa, buffer), None, "busy: the base buffer only");

    ready.asked.insert(rsa, idle_since);
    assert_eq!(ready.next_to_fill(rsa, buffer), None, "another kind was asked for lately: not idle");
    ready.asked.insert(ec, idle_since);
    assert_eq!(ready.next_to_fill(rsa, buffer), Some(rsa), "idle: the default kind grows");
    ready.keys.entry(rsa).or_default().extend([PrivateKey::generate(ec).unwrap(), PrivateKey::generate(ec).unwrap()]);
    assert_eq!(ready.next_to_fill(rsa, buffer), None, "up to the idle buffer; other kinds keep the base");
    assert_eq!(ready.keys[&ec].len(), 1);

    // A request ends the idle time: nothing more is made, and the keys already ready stay.
    ready.asked.insert(rsa, now);
    ready.keys.get_mut(&rsa).unwrap().truncate(2);
    assert_eq!(ready.next_to_fill(rsa, buffer), None);
    assert_eq!(ready.next_to_fill(rsa, Buffer { base: 0, idle: 3 }), None, "idle 3 with base 0 when busy");
}

/// What one ready RSA-2048 key holds in memory (PKCS#8 DER, the PKCS#1 PEM written to
/// Secrets, the public key): measured, printed, and bounded (`--key-buffer-idle` is
/// documented at ~4.7 KiB per key).
#[test]
fn a_ready_rsa_2048_key_takes_about_5_kib() {
    let key = PrivateKey::generate(KeyKind::Rsa { bits: 2048 }).unwrap();
    let bytes = key.heap_bytes();
    println!("a ready RSA-2048 key: {bytes} bytes on the heap, {} in all", bytes + std::mem::size_of::<PrivateKey>());
    assert!((4_000..6_000).contains(&bytes), "{bytes}");
}
