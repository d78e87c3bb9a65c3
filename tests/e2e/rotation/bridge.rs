//! Rotation with a trust bridge (docs/spec.md §3.3), automatic and forced: zero failed
//! handshakes, the oldest CA dropping out when its bridge expires, two forced rotations
//! in a row (the bulk re-issue's progress: `progress.rs`).

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use kube::ResourceExt;
use service_ca_operator::pki;

use super::{FollowingServer, Tally, all_stacks, handshake_loop, signing_key};
use crate::support::tls::{self, TlsServer};
use crate::support::{Env, T, certs, data, eventually};

/// Polls `signing-key` every 100 ms until its CA is no longer `previous`; then records
/// the new CA in `newest` and when it was seen in `rotated_at`.
async fn watch_for_rotation(
    env: &Env,
    previous: &[u8],
    newest: &Mutex<Option<Vec<u8>>>,
    rotated_at: &Mutex<Option<Instant>>,
) {
    loop {
        let ski = certs::ca_ski(&signing_key(env).await);
        if ski != previous {
            *newest.lock().unwrap() = Some(ski);
            *rotated_at.lock().unwrap() = Some(Instant::now());
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Handshakes (see [`handshake_loop`]) from a client that keeps `held` and one with the
/// latest bundle while the CA changes from `previous`, until 3 `lag`s past the change;
/// the tally, and when the change was seen. `newest` is the newest CA seen so far (kept
/// from one rotation to the next).
async fn handshakes_through_a_rotation(
    env: &Env,
    servers: &[(&FollowingServer, String)],
    held: &str,
    previous: &[u8],
    newest: &Mutex<Option<Vec<u8>>>,
    lag: Duration,
) -> (Tally, Instant) {
    let rotated_at = Mutex::new(None::<Instant>);
    let done = || rotated_at.lock().unwrap().is_some_and(|at| at.elapsed() > lag * 3);
    let newest_ca = || newest.lock().unwrap().clone();
    let watch_task = watch_for_rotation(env, previous, newest, &rotated_at);
    let (tally, _) = tokio::join!(handshake_loop(env, servers, held.to_string(), newest_ca, done), watch_task);
    let at = rotated_at.lock().unwrap().unwrap();
    (tally, at)
}

/// All three stacks verify every server for its name with the bundle `old` and `new`.
fn all_stacks_trust_with(servers: &[(&FollowingServer, String)], old: &str, new: &str) {
    for (server, name) in servers {
        all_stacks(server.server.port, old, name);
        all_stacks(server.server.port, new, name);
    }
}

#[tokio::test]
async fn zero_failed_handshakes_through_an_automatic_and_a_forced_rotation() {
    let env = Env::new("ca-zero-downtime").await;
    // 90 s CAs rotated when 55 s are left: each CA the operator makes is rotated 35 s
    // after it was made, after the rest of the test (under 20 s). The first CA was made
    // 18 s before the operator starts: its automatic rotation comes 17 s in (the setup
    // before it takes a few seconds).
    super::aged_ca(&env, Duration::from_secs(90), Duration::from_secs(18)).await;
    let _op = env.start_operator(&["--ca-lifetime", "90s", "--ca-rotate-before", "55s"]);
    let b0 = env.ca_bundle().await;
    let created = Instant::now();
    let ski0 = certs::ca_ski(&signing_key(&env).await);
    env.annotated_service("web", "web-tls", false).await;
    env.annotated_service("db", "db-tls", true).await;
    // Servers reload 2 s after their Secret changes: a window in which clients with the
    // new bundle meet old leaves (each phase runs 3 lags past its rotation).
    let lag = Duration::from_secs(2);
    let web = FollowingServer::start(&env, "web-tls", lag).await;
    let db = FollowingServer::start(&env, "db-tls", lag).await;
    let ns = env.ns.clone();
    let servers = [(&web, format!("web.{ns}.svc")), (&db, format!("web-0.db.{ns}.svc")), (&db, format!("db.{ns}.svc"))];

    // Phase 1: the automatic rotation.
    let newest = Mutex::new(None::<Vec<u8>>);
    let (tally, auto_at) = handshakes_through_a_rotation(&env, &servers, &b0, &ski0, &newest, lag).await;
    println!(
        "automatic rotation {:?} after the operator started; {} handshakes, {} failed, combinations {:?}",
        auto_at - created,
        tally.handshakes,
        tally.failures.len(),
        tally.combos
    );
    assert!(tally.failures.is_empty(), "failed handshakes: {:?}", tally.failures);
    assert_eq!(tally.combos.len(), 4, "all four {{old, new leaf}} x {{old, new bundle}}: {:?}", tally.combos);
    let b1 = env.ca_bundle().await;
    assert_eq!(certs::ders(&b1).len(), 2, "[new CA, X1]");
    all_stacks_trust_with(&servers, &b0, &b1);
    let rotated = env.events(&env.op_ns, None, Some("ServiceCARotated")).await;
    let note = rotated[0].note.clone().unwrap();
    assert!(note.contains("automatic") && note.contains("previous CA stays trusted until"), "{note}");

    // Phase 2: a forced rotation, with the post-rotation-1 bundle as the "old" one.
    let ski1 = certs::ca_ski(&signing_key(&env).await);
    env.force_rotation("test-forced").await;
    let (tally, _) = handshakes_through_a_rotation(&env, &servers, &b1, &ski1, &newest, lag).await;
    println!(
        "forced rotation: {} handshakes, {} failed, combinations {:?}",
        tally.handshakes,
        tally.failures.len(),
        tally.combos
    );
    assert!(tally.failures.is_empty(), "failed handshakes: {:?}", tally.failures);
    assert_eq!(tally.combos.len(), 4, "{:?}", tally.combos);
    let key = signing_key(&env).await;
    assert_eq!(
        key.annotations().get("service-ca.operators.openshift.io/forced-rotation-reason").map(String::as_str),
        Some("test-forced")
    );
    let b2 = env.ca_bundle().await;
    all_stacks_trust_with(&servers, &b1, &b2);
    // The same reason again does nothing.
    let cn_ski = certs::ca_ski(&key);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(certs::ca_ski(&signing_key(&env).await), cn_ski, "one rotation per distinct reason");
}

#[tokio::test]
async fn the_oldest_ca_drops_out_when_its_bridge_expires() {
    let env = Env::new("ca-bridge-expiry").await;
    // 60 s CAs, rotated with 10 s left. The first was made 35 s before the operator
    // starts: rotated 15 s in, X1 (the old CA re-signed) valid until 25 s in.
    super::aged_ca(&env, Duration::from_secs(60), Duration::from_secs(35)).await;
    let _op = env.start_operator(&["--ca-lifetime", "60s", "--ca-rotate-before", "10s"]);
    env.ca_bundle().await;
    env.annotated_service("old", "old-tls", false).await;
    let leaf0 = env.serving_secret("old-tls", T).await;
    let chain0 = data(&leaf0, "tls.crt");
    let name = format!("old.{}.svc", env.ns);
    let key0 = signing_key(&env).await;
    let ca0 = certs::of_secret(&key0);
    assert_eq!(certs::leaf_aki(&leaf0), certs::ca_ski(&key0), "the first leaf is CA0's (not yet rotated)");

    let b1 = eventually(Duration::from_secs(60), "the automatic rotation", || async {
        let b = env.ca_bundle().await;
        (certs::ders(&b).len() == 2).then_some(b)
    })
    .await;
    tls::rustls_verify_at(&chain0, &b1, &name, SystemTime::now()).expect("CA0's leaf trusted through X1");
    let x1 = pki::CertInfo::parse("x1", certs::ders(&b1)[1].clone()).unwrap();
    assert_eq!(x1.not_after, ca0.not_after, "X1 lasts as long as CA0");

    // When X1 expires the operator drops it from the bundle by itself (scheduled).
    let dropped = eventually(Duration::from_secs(40), "X1 left out of the bundle", || async {
        let b = env.ca_bundle().await;
        (certs::ders(&b).len() == 1).then_some(b)
    })
    .await;
    let now = time::OffsetDateTime::now_utc();
    assert!(now >= x1.not_after, "dropped only once expired");
    assert!(tls::rustls_verify_at(&chain0, &dropped, &name, SystemTime::now()).is_err());

    // A second (forced) rotation bridges to CA1 only: CA0 stays out.
    env.force_rotation("second").await;
    let b2 = eventually(T, "the second rotation", || async {
        let b = env.ca_bundle().await;
        (certs::ders(&b).len() == 2 && b != b1).then_some(b)
    })
    .await;
    assert!(tls::rustls_verify_at(&chain0, &b2, &name, SystemTime::now()).is_err(), "two rotations back: not trusted");
}

#[tokio::test]
async fn two_forced_rotations_a_second_apart_keep_the_first_bundle_working() {
    let env = Env::new("twice").await;
    let _op = env.start_operator(&[]);
    let bundle0 = env.ca_bundle().await;
    env.annotated_service("web", "web-tls", false).await;
    let leaf0 = env.serving_secret("web-tls", T).await;
    let name = format!("web.{}.svc", env.ns);
    let force = |reason: &'static str| {
        let env = &env;
        async move {
            env.force_rotation(reason).await;
            env.rotated(reason).await
        }
    };
    force("first").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let newest = certs::ca_ski(&force("second").await);
    let leaf2 = eventually(T, "the leaf from the newest CA", || async {
        let s = env.secrets().get("web-tls").await.ok()?;
        (certs::leaf_aki(&s) == newest).then_some(s)
    })
    .await;
    let bundle2 = eventually(T, "the newest bundle", || async {
        let b = env.ca_bundle().await;
        (certs::ders(&b).len() == 3).then_some(b)
    })
    .await;
    // A client still holding the bundle from before the first rotation, and one with the
    // newest bundle talking to a server not yet restarted: every stack verifies.
    for (case, leaf, bundle) in
        [("new leaf × first bundle", &leaf2, &bundle0), ("old leaf × newest bundle", &leaf0, &bundle2)]
    {
        let server = TlsServer::start(&data(leaf, "tls.crt"), &data(leaf, "tls.key"));
        for (stack, result) in tls::connect_all(server.port, bundle, &name) {
            result.unwrap_or_else(|e| panic!("{case}, {stack}: {e}"));
        }
    }
}
