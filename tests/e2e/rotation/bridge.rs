//! The signing CA (docs/spec.md §3): rotation with a trust bridge (automatic and forced) with
//! zero failed handshakes, expiry of the bridge, hard reset, restart in the middle of
//! a rotation, and a signing-key that cannot be used.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use service_ca_operator::pki;

use crate::support::tls::{self, TlsServer};
use crate::support::{Env, certs, data, eventually};

const T: Duration = Duration::from_secs(30);

async fn signing_key(env: &Env) -> Secret {
    env.op_secrets().get("signing-key").await.unwrap()
}

/// A TLS server that follows its Secret like a pod does: it reloads a little while
/// after the Secret changes (kubelet and the application take time to catch up).
struct FollowingServer {
    server: Arc<TlsServer>,
    serving: Arc<Mutex<String>>,
}

impl FollowingServer {
    async fn start(env: &Env, secret: &str, lag: Duration) -> FollowingServer {
        let s = env.serving_secret(secret, T).await;
        let server = Arc::new(TlsServer::start(&data(&s, "tls.crt"), &data(&s, "tls.key")));
        let serving = Arc::new(Mutex::new(data(&s, "tls.crt")));
        let (api, name, srv, cur) = (env.secrets(), secret.to_string(), server.clone(), serving.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Ok(s) = api.get(&name).await else { continue };
                let crt = data(&s, "tls.crt");
                if crt != *cur.lock().unwrap() {
                    tokio::time::sleep(lag).await;
                    let s = api.get(&name).await.unwrap_or(s);
                    srv.reload(&data(&s, "tls.crt"), &data(&s, "tls.key"));
                    *cur.lock().unwrap() = data(&s, "tls.crt");
                }
            }
        });
        FollowingServer { server, serving }
    }
}

#[derive(Default)]
struct Tally {
    handshakes: usize,
    failures: Vec<String>,
    /// (leaf signed by the newest CA?, client has the newest bundle?)
    combos: BTreeSet<(bool, bool)>,
}

/// Handshakes in a loop from a client that keeps `held` and a client that always has
/// the latest published bundle, until `until` says stop; records which leaf was served.
async fn handshake_loop(
    env: &Env,
    servers: &[(&FollowingServer, String)],
    held: String,
    newest_ca: impl Fn() -> Option<Vec<u8>>,
    stop: impl Fn() -> bool,
) -> Tally {
    let mut tally = Tally::default();
    while !stop() {
        let latest = env.ca_bundle().await;
        for (server, name) in servers {
            for (fresh, bundle) in [(false, &held), (true, &latest)] {
                let serving = server.serving.lock().unwrap().clone();
                let result = tls::rustls_connect(server.server.port, bundle, name);
                tally.handshakes += 1;
                match result {
                    Ok(()) => {
                        let new_leaf = newest_ca().is_some_and(|ski| certs::signer_of(&serving) == ski);
                        let new_bundle = fresh && latest != held;
                        tally.combos.insert((new_leaf, new_bundle));
                    }
                    Err(e) => tally.failures.push(format!("{name} fresh={fresh}: {e}")),
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tally
}

/// All three stacks agree for one (server, bundle, name).
fn all_stacks(port: u16, bundle: &str, name: &str) {
    for (stack, result) in tls::connect_all(port, bundle, name) {
        result.unwrap_or_else(|e| panic!("{stack} failed for {name}: {e}"));
    }
}

#[tokio::test]
async fn zero_failed_handshakes_through_an_automatic_and_a_forced_rotation() {
    let env = Env::new("ca-zero-downtime").await;
    // A 120 s CA rotated when 60 s are left: the automatic rotation comes 60 s in.
    let _op = env.start_operator(&["--ca-lifetime", "120s", "--ca-rotate-before", "60s"]);
    let b0 = env.ca_bundle().await;
    let created = Instant::now();
    let ski0 = certs::ca_ski(&signing_key(&env).await);
    env.annotated_service("web", "web-tls", false).await;
    env.annotated_service("db", "db-tls", true).await;
    let lag = Duration::from_secs(3);
    let web = FollowingServer::start(&env, "web-tls", lag).await;
    let db = FollowingServer::start(&env, "db-tls", lag).await;
    let ns = env.ns.clone();
    let servers = [(&web, format!("web.{ns}.svc")), (&db, format!("web-0.db.{ns}.svc")), (&db, format!("db.{ns}.svc"))];

    // Phase 1: the automatic rotation.
    let newest = Arc::new(Mutex::new(None::<Vec<u8>>));
    let (env_ref, newest_ref) = (&env, newest.clone());
    let watcher = async move {
        loop {
            let ski = certs::ca_ski(&signing_key(env_ref).await);
            if ski != ski0 {
                *newest_ref.lock().unwrap() = Some(ski);
                return Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let rotated_at = Arc::new(Mutex::new(None::<Instant>));
    let flag = rotated_at.clone();
    let watch_task = async move {
        let at = watcher.await;
        *flag.lock().unwrap() = Some(at);
    };
    let done = || rotated_at.lock().unwrap().is_some_and(|at| at.elapsed() > lag * 3);
    let newest_ca = || newest.lock().unwrap().clone();
    let (tally, _) = tokio::join!(handshake_loop(&env, &servers, b0.clone(), newest_ca, done), watch_task);
    let auto_at = rotated_at.lock().unwrap().unwrap();
    println!(
        "automatic rotation {:?} after CA creation; {} handshakes, {} failed, combinations {:?}",
        auto_at - created,
        tally.handshakes,
        tally.failures.len(),
        tally.combos
    );
    assert!(tally.failures.is_empty(), "failed handshakes: {:?}", tally.failures);
    assert_eq!(tally.combos.len(), 4, "all four {{old, new leaf}} x {{old, new bundle}}: {:?}", tally.combos);
    let b1 = env.ca_bundle().await;
    assert_eq!(certs::ders(&b1).len(), 2, "[new CA, X1]");
    for (server, name) in &servers {
        all_stacks(server.server.port, &b0, name);
        all_stacks(server.server.port, &b1, name);
    }
    let rotated = env.events(&env.op_ns, None, Some("ServiceCARotated")).await;
    let note = rotated[0].note.clone().unwrap();
    assert!(note.contains("automatic") && note.contains("previous CA stays trusted until"), "{note}");

    // Phase 2: a forced rotation, with the post-rotation-1 bundle as the "old" one.
    let ski1 = certs::ca_ski(&signing_key(&env).await);
    let patch =
        json!({ "metadata": { "annotations": { "service-ca.operators.openshift.io/force-rotation": "test-forced" } } });
    env.op_secrets().patch("signing-key", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    *rotated_at.lock().unwrap() = None;
    let (env_ref, newest_ref, flag) = (&env, newest.clone(), rotated_at.clone());
    let watch_task = async move {
        loop {
            let ski = certs::ca_ski(&signing_key(env_ref).await);
            if ski != ski1 {
                *newest_ref.lock().unwrap() = Some(ski);
                *flag.lock().unwrap() = Some(Instant::now());
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let done = || rotated_at.lock().unwrap().is_some_and(|at| at.elapsed() > lag * 3);
    let newest_ca = || newest.lock().unwrap().clone();
    let (tally, _) = tokio::join!(handshake_loop(&env, &servers, b1.clone(), newest_ca, done), watch_task);
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
    for (server, name) in &servers {
        all_stacks(server.server.port, &b1, name);
        all_stacks(server.server.port, &b2, name);
    }
    // The same reason again does nothing.
    let cn_ski = certs::ca_ski(&key);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(certs::ca_ski(&signing_key(&env).await), cn_ski, "one rotation per distinct reason");
}

#[tokio::test]
async fn the_oldest_ca_drops_out_when_its_bridge_expires() {
    let env = Env::new("ca-bridge-expiry").await;
    // 60 s CA, rotated with 20 s left: rotation at 40 s, X1 (the old CA) valid until 60 s.
    let _op = env.start_operator(&["--ca-lifetime", "60s", "--ca-rotate-before", "20s"]);
    env.ca_bundle().await;
    env.annotated_service("old", "old-tls", false).await;
    let leaf0 = env.serving_secret("old-tls", T).await;
    let chain0 = data(&leaf0, "tls.crt");
    let name = format!("old.{}.svc", env.ns);
    let key0 = signing_key(&env).await;
    let ca0 = certs::of_secret(&key0);

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
    let patch =
        json!({ "metadata": { "annotations": { "service-ca.operators.openshift.io/force-rotation": "second" } } });
    env.op_secrets().patch("signing-key", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let b2 = eventually(T, "the second rotation", || async {
        let b = env.ca_bundle().await;
        (certs::ders(&b).len() == 2 && b != b1).then_some(b)
    })
    .await;
    assert!(tls::rustls_verify_at(&chain0, &b2, &name, SystemTime::now()).is_err(), "two rotations back: not trusted");
}

#[tokio::test]
async fn hard_reset_gives_a_new_ca_and_updates_every_secret_and_bundle() {
    let env = Env::new("ca-reset").await;
    let _op = env.start_operator(&[]);
    let old_bundle = env.ca_bundle().await;
    let old_cn = certs::of_secret(&signing_key(&env).await).subject_cn;
    let n = 20;
    for i in 0..n {
        env.annotated_service(&format!("s{i}"), &format!("s{i}-tls"), false).await;
    }
    let mut cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(json!({})).unwrap();
    cm.metadata = env.meta("bundle");
    cm.metadata.annotations =
        Some([("service.beta.openshift.io/inject-cabundle".to_string(), "true".to_string())].into());
    env.configmaps().create(&PostParams::default(), &cm).await.unwrap();
    for i in 0..n {
        env.serving_secret(&format!("s{i}-tls"), T).await;
    }

    let started = Instant::now();
    env.op_secrets().delete("signing-key", &DeleteParams::default()).await.unwrap();
    let new_key = eventually(T, "a new signing-key", || async {
        let s = env.op_secrets().get_opt("signing-key").await.unwrap()?;
        let cn = pki::CertInfo::parse("tls.crt", certs::ders(&data(&s, "tls.crt"))[0].clone()).ok()?.subject_cn;
        (cn != old_cn).then_some(s)
    })
    .await;
    assert!(new_key.data.as_ref().unwrap().get("ca-bundle.crt").is_none(), "a reset has no bridge");
    let new_ski = certs::ca_ski(&new_key);
    let new_bundle = eventually(T, "the new bundle", || async {
        let b = env.ca_bundle().await;
        (b != old_bundle).then_some(b)
    })
    .await;
    eventually(T, "every serving Secret re-issued", || async {
        let items = env
            .secrets()
            .list(&ListParams::default().labels("service-ca.operators.openshift.io/managed=true"))
            .await
            .unwrap()
            .items;
        (items.len() == n && items.iter().all(|s| certs::signer_of(&data(s, "tls.crt")) == new_ski)).then_some(())
    })
    .await;
    eventually(T, "the injected bundle updated", || async {
        let cm = env.configmaps().get("bundle").await.unwrap();
        (cm.data?.get("service-ca.crt")? == &new_bundle).then_some(())
    })
    .await;
    println!(
        "hard reset: {n} serving Secrets and the injected bundle updated {:?} after signing-key was deleted",
        started.elapsed()
    );

    let secret = env.secrets().get("s0-tls").await.unwrap();
    let name = format!("s0.{}.svc", env.ns);
    tls::rustls_verify_at(&data(&secret, "tls.crt"), &new_bundle, &name, SystemTime::now()).unwrap();
    assert!(
        tls::rustls_verify_at(&data(&secret, "tls.crt"), &old_bundle, &name, SystemTime::now()).is_err(),
        "no bridge after a reset"
    );
    assert!(!env.events(&env.op_ns, None, Some("ServiceCAReset")).await.is_empty());
    let new_cn = certs::of_secret(&new_key).subject_cn;
    eventually(T, "signed-by updated", || async {
        let svc = env.services().get("s0").await.unwrap();
        (svc.annotations().get("service.beta.openshift.io/serving-cert-signed-by") == Some(&new_cn)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn operator_killed_during_rotations_never_invents_a_second_ca() {
    let env = Env::new("ca-midway").await;
    let mut op = env.start_operator(&[]);
    env.ca_bundle().await;
    for (round, delay_ms) in [0u64, 30, 60, 100, 150, 250].into_iter().enumerate() {
        let before = signing_key(&env).await;
        let ski_before = certs::ca_ski(&before);
        let reason = format!("round-{round}");
        let patch =
            json!({ "metadata": { "annotations": { "service-ca.operators.openshift.io/force-rotation": reason } } });
        env.op_secrets().patch("signing-key", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        op.kill();
        op = env.start_operator(&[]);
        // Consistent: the Secret holds exactly one rotation from `before`, the bundle
        // ConfigMap agrees with it, and the reason is recorded once.
        let after = eventually(T, "the rotation to complete", || async {
            let s = signing_key(&env).await;
            let done = s.annotations().get("service-ca.operators.openshift.io/forced-rotation-reason") == Some(&reason);
            done.then_some(s)
        })
        .await;
        let bundle_field = data(&after, "ca-bundle.crt");
        let members = certs::ders(&bundle_field);
        // [new CA, X1 of this round, X1s of the earlier rounds] (all still valid).
        assert_eq!(members.len(), (round + 2).min(pki::MAX_BRIDGES + 1), "[new CA, X1, earlier X1s]");
        let x1 = pki::CertInfo::parse("x1", members[1].clone()).unwrap();
        assert_eq!(
            x1.subject_key_id.as_deref(),
            Some(ski_before.as_slice()),
            "X1 bridges to the CA from before this round: one rotation, not two"
        );
        assert_eq!(certs::ders(&data(&after, "tls.crt")).len(), 1);
        eventually(T, "signing-cabundle to match the Secret", || async {
            (env.ca_bundle().await == bundle_field).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(certs::ca_ski(&signing_key(&env).await), certs::ca_ski(&after), "no further CA appeared");
    }
}

#[tokio::test]
async fn unusable_signing_key_is_reported_never_overwritten_and_signing_continues() {
    let env = Env::new("ca-corrupt").await;
    let op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    op.wait_ready(T).await;
    let good = signing_key(&env).await;
    let other_key = pki::PrivateKey::generate_rsa(2048).unwrap();
    type Change = (&'static str, Vec<u8>);
    let cases: [(&str, Vec<Change>); 2] = [
        (
            "garbage certificate",
            vec![("tls.crt", b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n".to_vec())],
        ),
        ("key that does not match", vec![("tls.key", other_key.to_pem().as_bytes().to_vec())]),
    ];
    for (i, (case, changes)) in cases.into_iter().enumerate() {
        let mut broken = signing_key(&env).await;
        for (k, v) in changes {
            broken.data.as_mut().unwrap().insert(k.to_string(), ByteString(v));
        }
        let broken = env.op_secrets().replace("signing-key", &PostParams::default(), &broken).await.unwrap();
        let warning = eventually(T, "a SigningKeyInvalid Event", || async {
            env.events(&env.op_ns, None, Some("SigningKeyInvalid")).await.into_iter().find(|e| {
                e.note.as_deref().is_some_and(|n| n.contains("keeps signing"))
                    && (i == 0 || e.note.as_deref().is_some_and(|n| n.contains("does not belong to the certificate")))
            })
        })
        .await;
        println!("{case}: {}", warning.note.unwrap());
        let metrics = op.metrics().await.unwrap().1;
        assert!(metrics.contains("service_ca_signing_key_valid 0"), "{case}");
        let (status, body) = op.admin_get("/readyz").await.unwrap();
        assert_eq!(status, 200, "still serving with the held CA");
        assert!(body.contains("degraded"), "{body}");
        // Signing continues with the CA held in memory.
        env.annotated_service(&format!("during-{i}"), &format!("during-{i}-tls"), false).await;
        let s = env.serving_secret(&format!("during-{i}-tls"), T).await;
        tls::rustls_verify_at(&data(&s, "tls.crt"), &bundle, &format!("during-{i}.{}.svc", env.ns), SystemTime::now())
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let still = signing_key(&env).await;
        assert_eq!(still.resource_version(), broken.resource_version(), "{case}: never overwritten");
        // A person puts the good data back.
        let mut fixed = still.clone();
        fixed.data = good.data.clone();
        env.op_secrets().replace("signing-key", &PostParams::default(), &fixed).await.unwrap();
        eventually(T, "signing_key_valid back to 1", || async {
            op.metrics().await.filter(|(_, m)| m.contains("service_ca_signing_key_valid 1")).map(|_| ())
        })
        .await;
    }
}

#[tokio::test]
async fn starting_with_an_unusable_signing_key_is_not_ready_and_creates_nothing() {
    let env = Env::new("ca-corrupt-start").await;
    let garbage: Secret = serde_json::from_value(json!({
        "metadata": { "name": "signing-key" }, "type": "kubernetes.io/tls",
        "data": { "tls.crt": "Z2FyYmFnZQ==", "tls.key": "Z2FyYmFnZQ==" }
    }))
    .unwrap();
    let garbage = env.op_secrets().create(&PostParams::default(), &garbage).await.unwrap();
    let op = env.start_operator(&[]);
    env.annotated_service("waiting", "waiting-tls", false).await;
    let (status, body) = eventually(T, "a /readyz answer", || async {
        op.admin_get("/readyz").await.filter(|(_, b)| b.contains("no usable CA"))
    })
    .await;
    assert_eq!(status, 503, "{body}");
    eventually(T, "the SigningKeyInvalid Event", || async {
        env.events(&env.op_ns, None, Some("SigningKeyInvalid"))
            .await
            .into_iter()
            .find(|e| e.note.as_deref().is_some_and(|n| n.contains("no CA to sign with")))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(signing_key(&env).await.resource_version(), garbage.resource_version());
    assert!(env.secrets().get_opt("waiting-tls").await.unwrap().is_none(), "nothing signed without a CA");
    // Deleting it is the documented reset: a CA appears and the Service gets its Secret.
    env.op_secrets().delete("signing-key", &DeleteParams::default()).await.unwrap();
    env.serving_secret("waiting-tls", T).await;
    op.wait_ready(T).await;
}

#[tokio::test]
async fn bulk_reissue_after_a_rotation_reports_progress_with_an_eta() {
    let env = Env::new("progress").await;
    // One key at a time, no ready keys: the re-issue takes a few seconds.
    let op = env.start_operator(&["--progress-interval", "1s", "--max-concurrent-issuance", "1", "--key-buffer", "0"]);
    let n = 60;
    for i in 0..n {
        env.annotated_service(&format!("p{i}"), &format!("p{i}-tls"), false).await;
    }
    for i in 0..n {
        env.serving_secret(&format!("p{i}-tls"), T).await;
    }
    let patch =
        json!({ "metadata": { "annotations": { "service-ca.operators.openshift.io/force-rotation": "progress" } } });
    env.op_secrets().patch("signing-key", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let finished = format!("re-issue after the CA change: {n} of {n} Secrets done ({n} re-issued) in ");
    eventually(Duration::from_secs(60), "the re-issue to finish", || async {
        op.logs().contains(&finished).then_some(())
    })
    .await;
    let lines: Vec<String> =
        op.logs().lines().filter(|l| l.contains("re-issue after the CA change")).map(str::to_string).collect();
    for line in &lines {
        println!("{}", line.split("INFO").last().unwrap_or(line));
    }
    assert!(lines.iter().any(|l| l.contains(&format!(" of {n} Secrets done")) && l.contains("ETA")), "{lines:?}");
    let page = op.metrics().await.unwrap().1;
    assert!(page.contains("service_ca_reissue_remaining 0"), "nothing left");
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
            let patch = json!({ "metadata": { "annotations": { "service-ca.operators.openshift.io/force-rotation": reason } } });
            env.op_secrets().patch("signing-key", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
            eventually(T, reason, || async {
                let s = env.op_secrets().get("signing-key").await.ok()?;
                (s.annotations().get("service-ca.operators.openshift.io/forced-rotation-reason").map(String::as_str)
                    == Some(reason))
                .then_some(s)
            })
            .await
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

/// A CA of one's own valid until 99991231235959Z (RFC 5280's "no
/// well-defined expiration", common for enterprise roots) is loaded, signs, and the
/// operator stays ready. (Before: every pass panicked adding one second to 9999's end;
/// readiness gone, no Secret.)
#[tokio::test]
async fn a_ca_of_ones_own_valid_until_9999_signs_and_the_operator_stays_ready() {
    let env = Env::new("ca-9999").await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, "Example Corp Root CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = ::time::OffsetDateTime::now_utc() - Duration::from_secs(86_400);
    params.not_after = ::time::Date::from_calendar_date(9999, ::time::Month::December, 31)
        .and_then(|day| day.with_hms(23, 59, 59))
        .unwrap()
        .assume_utc();
    let ca = params.self_signed(&key).unwrap();
    let secret = Secret {
        metadata: kube::api::ObjectMeta { name: Some("signing-key".into()), ..Default::default() },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            [("tls.crt", ca.pem()), ("tls.key", key.serialize_pem())]
                .into_iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
                .collect(),
        ),
        ..Default::default()
    };
    env.op_secrets().create(&PostParams::default(), &secret).await.unwrap();
    assert_eq!(certs::of_secret(&secret).not_after.unix_timestamp(), 253_402_300_799);

    let op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    assert_eq!(certs::ders(&bundle), [ca.der().to_vec()], "the bundle is the CA of one's own");
    let started = SystemTime::now();
    env.annotated_service("far", "far-tls", false).await;
    let serving = env.serving_secret("far-tls", T).await;
    let issued = started.elapsed().unwrap();
    println!("serving Secret from the CA valid until 9999 after {issued:?}");
    let lifetime = 730 * 86_400;
    let since_epoch = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    let not_after = certs::not_after(&serving);
    assert!(
        (since_epoch(started) + lifetime - 2..=since_epoch(SystemTime::now()) + lifetime + 2).contains(&not_after),
        "leaf NotAfter = now + the 730-day lifetime: {not_after}"
    );
    assert_eq!(certs::leaf_aki(&serving), certs::skis(&ca.pem())[0], "signed by the CA of one's own");

    let name = format!("far.{}.svc", env.ns);
    let server = TlsServer::start(&data(&serving, "tls.crt"), &data(&serving, "tls.key"));
    for (stack, result) in tls::connect_all(server.port, &bundle, &name) {
        result.unwrap_or_else(|e| panic!("{stack}: {e}"));
    }

    // Ready, and still ready: every CA pass (the bundle watch, the next wake-up) passes.
    let watched = std::time::Instant::now();
    let mut answers = 0;
    while watched.elapsed() < Duration::from_secs(6) {
        let (status, body) = op.admin_get("/readyz").await.unwrap_or((0, "no answer".into()));
        assert_eq!(status, 200, "/readyz after {:?}: {body}", watched.elapsed());
        answers += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let logs = op.logs();
    assert!(!logs.contains("panicked"), "{logs}");
    println!("/readyz answered 200 {answers} times over {:?}", watched.elapsed());
}
