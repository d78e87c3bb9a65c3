//! Faults on the real API server: the operator killed with SIGKILL mid-issuance, the API
//! server stopped and restarted, another writer on the same objects. Nothing is lost or
//! issued twice, nothing of others is overwritten, no restart is needed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::support::annotations::INJECT;
use crate::support::objects::webhook_json;
use crate::support::tls::{self};
use crate::support::{Env, PrivateControlPlane, T, certs, data, eventually};

#[tokio::test]
async fn kill_9_while_issuing_200_certificates_ends_with_one_secret_each_and_one_ca() {
    let env = Env::new("crash").await;
    let foreign: Secret =
        serde_json::from_value(json!({ "metadata": { "name": "foreign" }, "data": { "k": "dg==" } })).unwrap();
    let foreign = env.secrets().create(&PostParams::default(), &foreign).await.unwrap();
    // The 200 Services are there before the operator starts, and it issues two at a
    // time at first: the kill lands mid-way on any machine. ECDSA keys: what is proven
    // here is what a crash leaves, not how fast RSA keys are made. (200, not 500: the
    // same crash for two fifths of the shared API server's work.)
    let n = 200;
    futures::stream::iter(0..n)
        .map(|i| {
            let env = &env;
            async move { env.annotated_service(&format!("c{i}"), &format!("c{i}-tls"), false).await }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let mut op = env.start_operator(&["--default-key-algorithm", "ecdsa", "--max-concurrent-issuance", "2"]);
    let managed = ListParams::default().labels("service-ca.operators.openshift.io/managed=true");
    eventually(Duration::from_secs(60), "issuance under way", || async {
        (env.secrets().list(&managed).await.unwrap().items.len() >= 25).then_some(())
    })
    .await;
    let ca_before = certs::ca_ski(&env.op_secrets().get("signing-key").await.unwrap());
    op.kill();
    let at_kill = env.secrets().list(&managed).await.unwrap().items.len();
    println!("kill -9 with {at_kill}/{n} certificates issued");
    assert!(at_kill < n);
    let restarted = Instant::now();
    let _op = env.start_operator(&["--default-key-algorithm", "ecdsa"]);
    let secrets = eventually(Duration::from_secs(120), "all 200 Secrets", || async {
        let items = env.secrets().list(&managed).await.unwrap().items;
        (items.len() >= n).then_some(items)
    })
    .await;
    println!("all {n} Secrets {:?} after the restart", restarted.elapsed());
    assert_eq!(secrets.len(), n, "exactly one Secret per Service");
    assert_eq!(certs::ca_ski(&env.op_secrets().get("signing-key").await.unwrap()), ca_before, "still the one CA");
    let bundle = env.ca_bundle().await;
    for secret in &secrets {
        assert_eq!(certs::leaf_aki(secret), ca_before);
        let svc = secret.name_any().trim_end_matches("-tls").to_string();
        tls::rustls_verify_at(&data(secret, "tls.crt"), &bundle, &format!("{svc}.{}.svc", env.ns), SystemTime::now())
            .unwrap();
    }
    let still = env.secrets().get("foreign").await.unwrap();
    assert_eq!(still.resource_version(), foreign.resource_version(), "nothing foreign changed");
}

#[tokio::test]
async fn api_server_outage_is_visible_in_readyz_and_survived_without_a_restart() {
    let cp = PrivateControlPlane::start("outage");
    let env = Env::on("outage", &cp.kubeconfig).await;
    let mut op = env.start_operator(&[]);
    op.wait_ready(T).await;
    let pid = op.pid();
    // Created all at once (one after the other they took seconds on a loaded machine).
    let env_ref = &env;
    futures::future::join_all((0..10).map(|i| async move {
        env_ref.annotated_service(&format!("before{i}"), &format!("before{i}-tls"), false).await
    }))
    .await;
    // Work is pending when the API server goes away.
    futures::future::join_all((0..20).map(|i| async move {
        env_ref.annotated_service(&format!("during{i}"), &format!("during{i}-tls"), false).await
    }))
    .await;
    // Down from the signal on: kube-apiserver stops listening within milliseconds of its
    // SIGTERM, while its process takes seconds to end (the harness kills it after 5 s),
    // and stop_apiserver() returns only then.
    let down = Instant::now();
    cp.stop_apiserver();
    let ended = down.elapsed();
    let mut seen_not_ready = None;
    // 10 s: /readyz tells at once; the pending Services are retried twice meanwhile (an
    // unreachable API server is retried every 5 s).
    let outage = Duration::from_secs(10);
    while (down.elapsed() < outage || seen_not_ready.is_none()) && down.elapsed() < outage * 3 {
        if let Some((503, body)) = op.admin_get("/readyz").await
            && body.contains("not reachable")
        {
            seen_not_ready.get_or_insert(down.elapsed());
        }
        assert!(op.running(), "the operator must not exit during the outage:\n{}", op.logs());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let noticed = seen_not_ready.expect("/readyz never reported the outage");
    cp.start_apiserver();
    let up = Instant::now();
    op.wait_ready(Duration::from_secs(90)).await;
    let ready_again = up.elapsed();
    futures::future::join_all(
        (0..20)
            .map(|i| async move { env_ref.serving_secret(&format!("during{i}-tls"), Duration::from_secs(90)).await }),
    )
    .await;
    env.annotated_service("after", "after-tls", false).await;
    env.serving_secret("after-tls", T).await;
    println!(
        "API server down {outage:?}: its process ended {ended:?} after the signal, /readyz reported the outage {:?} \
         after that, was ready again {ready_again:?} after the API server returned; same process",
        noticed.saturating_sub(ended)
    );
    assert!(op.running() && op.pid() == pid, "no restart");
}

/// `service_ca_reconcile_total` per controller.
fn reconciles(metrics: &str) -> BTreeMap<String, u64> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("service_ca_reconcile_total{controller=\""))
        .filter_map(|l| {
            let (controller, rest) = l.split_once('"')?;
            Some((controller.to_string(), rest.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn a_relist_after_an_api_server_restart_reconciles_only_what_changed() {
    // A restarted API server expires every watch; the relist replays every object.
    // Unchanged objects must cost nothing: no reconcile, no read.
    let cp = PrivateControlPlane::start("relist");
    let env = Env::on("relist", &cp.kubeconfig).await;
    let op = env.start_operator(&[]);
    op.wait_ready(T).await;
    let n = 10;
    // Created and awaited all at once.
    futures::future::join_all((0..n).map(|i| {
        let env = &env;
        async move {
            env.annotated_service(&format!("s{i}"), &format!("s{i}-tls"), false).await;
            let mut cm = ConfigMap { metadata: env.meta(&format!("cm{i}")), ..Default::default() };
            cm.metadata.annotations = Some(BTreeMap::from([(INJECT.to_string(), "true".to_string())]));
            env.configmaps().create(&PostParams::default(), &cm).await.unwrap();
            env.serving_secret(&format!("s{i}-tls"), T).await;
            eventually(T, "the ConfigMap injected", || async {
                let cm = env.configmaps().get(&format!("cm{i}")).await.ok()?;
                cm.data?.contains_key("service-ca.crt").then_some(())
            })
            .await;
        }
    }))
    .await;
    // Quiet: the counters stand still for two seconds.
    eventually(T, "the operator to be quiet", || async {
        let now = reconciles(&op.metrics().await?.1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        (now == reconciles(&op.metrics().await?.1)).then_some(())
    })
    .await;
    let before = reconciles(&op.metrics().await.unwrap().1);

    // Down from the signal on (stop_apiserver() returns once the process has ended,
    // seconds later); whether the watches relisted is checked below.
    cp.stop_apiserver();
    cp.start_apiserver();
    op.wait_ready(Duration::from_secs(90)).await;
    // The relist happened (the test proves nothing otherwise) ...
    let relisted = |kind: &str| {
        let listed = format!("listed kind={kind}");
        op.logs().lines().filter(|l| l.contains(&listed)).count() >= 2
    };
    eventually(T, "the Secret and ConfigMap watches to relist", || async {
        (relisted("Secret") && relisted("ConfigMap")).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // ... and replayed nothing: none of the n Secrets or n ConfigMaps was looked at again.
    let after = reconciles(&op.metrics().await.unwrap().1);
    let delta = |c: &str| after.get(c).copied().unwrap_or(0) - before.get(c).copied().unwrap_or(0);
    println!(
        "after the relist of {n} Secrets and {n} ConfigMaps: {} cert-refresh, {} serving-cert, {} ca-bundle reconciles",
        delta("cert-refresh"),
        delta("serving-cert"),
        delta("ca-bundle")
    );
    for controller in ["cert-refresh", "serving-cert", "ca-bundle"] {
        assert!(
            delta(controller) < n,
            "{controller} re-reconciled unchanged objects after the relist: {before:?} -> {after:?}"
        );
    }
}

/// A ConfigMap `cm` (with binary data of its owner's) and a
/// ValidatingWebhookConfiguration of two entries, both asking for the bundle; returns
/// the latter's API and name.
async fn injection_targets(env: &Env) -> (Api<ValidatingWebhookConfiguration>, String) {
    let mut cm: ConfigMap = serde_json::from_value(json!({ "binaryData": { "b": "AA==" } })).unwrap();
    cm.metadata = env.meta("cm");
    cm.metadata.annotations = Some(BTreeMap::from([(INJECT.to_string(), "true".to_string())]));
    env.configmaps().create(&PostParams::default(), &cm).await.unwrap();
    let vwcs: Api<ValidatingWebhookConfiguration> = Api::all(env.client.clone());
    let mut vwc: ValidatingWebhookConfiguration =
        serde_json::from_value(webhook_json("ValidatingWebhookConfiguration", &env.run, &["a", "b"])).unwrap();
    vwc.metadata.annotations = Some(BTreeMap::from([(INJECT.to_string(), "true".to_string())]));
    let vwc_name = vwcs.create(&PostParams::default(), &vwc).await.unwrap().name_any();
    (vwcs, vwc_name)
}

/// One round of the other writer: their label on the Secret `w-tls`, the ConfigMap `cm`
/// and the webhook configuration (with a webhook field of theirs, server-side applied),
/// at the same time as they change our fields of the Secret and the ConfigMap.
async fn other_writer_round(env: &Env, vwcs: &Api<ValidatingWebhookConfiguration>, vwc_name: &str, round: i32) {
    let theirs = PatchParams::apply("other-writer").force();
    let label = json!({ "metadata": { "labels": { "other-writer": round.to_string() } } });
    let other = async {
        let (secrets, configmaps, merge) = (env.secrets(), env.configmaps(), PatchParams::default());
        let (label_patch, hook_patch) = (
            Patch::Merge(&label),
            json!({ "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": { "name": vwc_name, "labels": { "other-writer": round.to_string() } },
            "webhooks": [{ "name": format!("b.{}.example.com", env.run), "timeoutSeconds": (round % 20) + 1 }] }),
        );
        let hook_patch = Patch::Apply(&hook_patch);
        let (a, b, c) = tokio::join!(
            secrets.patch("w-tls", &merge, &label_patch),
            configmaps.patch("cm", &merge, &label_patch),
            vwcs.patch(vwc_name, &theirs, &hook_patch)
        );
        a.unwrap();
        b.unwrap();
        c.unwrap();
    };
    let disturb = async {
        let extra = json!({ "data": { "extra": "eA==" } });
        let _ = env.secrets().patch("w-tls", &PatchParams::default(), &Patch::Merge(&extra)).await;
        let tamper = json!({ "data": { "service-ca.crt": format!("tampered {round}") } });
        let _ = env.configmaps().patch("cm", &PatchParams::default(), &Patch::Merge(&tamper)).await;
    };
    tokio::join!(other, disturb);
}

#[tokio::test]
async fn concurrent_writers_keep_their_own_fields_and_ours_converge() {
    let env = Env::new("concurrent").await;
    let _op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    env.annotated_service("w", "w-tls", false).await;
    env.serving_secret("w-tls", T).await;
    let (vwcs, vwc_name) = injection_targets(&env).await;

    // The other writer: their own label on each object, again and again, while they
    // also disturb our fields so that the operator writes at the same time.
    let rounds = 15;
    for round in 0..rounds {
        other_writer_round(&env, &vwcs, &vwc_name, round).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = (rounds - 1).to_string();
    let secret = eventually(T, "the Secret converged", || async {
        let s = env.secrets().get("w-tls").await.unwrap();
        (s.data.as_ref()?.len() == 2).then_some(s)
    })
    .await;
    assert_eq!(secret.labels().get("other-writer"), Some(&last), "their label on the Secret survived");
    let cm = eventually(T, "the ConfigMap converged", || async {
        let c = env.configmaps().get("cm").await.unwrap();
        (c.data.as_ref()?.get("service-ca.crt")? == &bundle).then_some(c)
    })
    .await;
    assert_eq!(cm.labels().get("other-writer"), Some(&last));
    assert_eq!(cm.binary_data.unwrap()["b"].0, vec![0]);
    let hooks = eventually(T, "the webhooks carry the bundle", || async {
        let v = vwcs.get(&vwc_name).await.unwrap();
        v.webhooks
            .as_ref()?
            .iter()
            .all(|w| w.client_config.ca_bundle.as_ref().is_some_and(|b| b.0 == bundle.as_bytes()))
            .then_some(v)
    })
    .await;
    assert_eq!(hooks.labels().get("other-writer"), Some(&last));
    assert_eq!(
        hooks.webhooks.unwrap()[1].timeout_seconds,
        Some(((rounds - 1) % 20) + 1),
        "their webhook field survived"
    );
    vwcs.delete(&vwc_name, &DeleteParams::default()).await.unwrap();
}
