//! Safe in a shared cluster: nothing a namespace user controls makes the
//! operator loop, burn the shared key pool or echo unbounded input; what the user
//! removed stops costing anything; a CA that cannot be rotated is never a silent
//! failure; flags that can only misbehave are refused at start-up.

use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::support::annotations::{ALPHA_ERR_NUM, BETA_ERR, BETA_ERR_NUM, BETA_NAME, MANAGED};
use crate::support::{Env, T, annotation, certs, eventually, metric};

async fn error_count(env: &Env, svc: &str) -> u32 {
    let s = env.services().get(svc).await.unwrap();
    annotation(&s.metadata, BETA_ERR_NUM).and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// Services s0 … s{n-1}, each with its Secret issued; then the namespace's user freezes
/// every Secret.
async fn issue_and_freeze(env: &Env, n: u32) {
    // Created, awaited and frozen all at once (one after the other, the setup alone took
    // 20 s on a loaded machine).
    env.annotated_services(n as usize).await;
    let managed = ListParams::default().labels(&format!("{MANAGED}=true"));
    eventually(T, "every Secret issued", || async {
        let secrets = env.secrets().list(&managed).await.ok()?.items;
        let issued = secrets.iter().filter(|s| s.data.as_ref().is_some_and(|d| d.contains_key("tls.crt"))).count();
        (issued >= n as usize).then_some(())
    })
    .await;
    // The namespace's user freezes every Secret.
    let patch = json!({ "immutable": true });
    futures::future::join_all((0..n).map(|i| {
        let patch = &patch;
        async move {
            env.secrets().patch(&format!("s{i}-tls"), &PatchParams::default(), &Patch::Merge(patch)).await.unwrap()
        }
    }))
    .await;
}

/// How many of s0-tls … s{n-1}-tls carry a leaf of the CA `ski` now.
async fn reissued_by(env: &Env, n: u32, ski: &[u8]) -> u32 {
    let mut reissued = 0;
    for i in 0..n {
        // A Secret being re-created is absent for a moment (deleted, then created once
        // the garbage collector has let it go): not re-issued yet.
        let Some(s) = env.secrets().get_opt(&format!("s{i}-tls")).await.unwrap() else { continue };
        if certs::try_signer_of(&crate::support::data(&s, "tls.crt")).as_deref() == Some(ski) {
            reissued += 1;
        }
    }
    reissued
}

/// Waits until s0-tls … s{n-1}-tls all carry a leaf of the CA `ski`, and checks each
/// was re-created as a regular managed Secret.
async fn all_reissued_as_regular_secrets(env: &Env, n: u32, ski: &[u8]) {
    let all = eventually(Duration::from_secs(90), "every immutable Secret re-issued by the new CA", || async {
        let mut done = Vec::new();
        for i in 0..n {
            let s = env.secrets().get(&format!("s{i}-tls")).await.ok()?;
            (certs::try_signer_of(&crate::support::data(&s, "tls.crt")).as_deref() == Some(ski)).then_some(())?;
            done.push(s);
        }
        Some(done)
    })
    .await;
    for s in &all {
        assert_eq!(s.immutable, None, "{}: re-created as a regular Secret", s.name_any());
        assert_eq!(s.labels().get(MANAGED).map(String::as_str), Some("true"));
    }
}

#[tokio::test]
async fn immutable_managed_secrets_are_recreated_through_a_rotation_without_starving_new_services() {
    let env = Env::new("immutable").await;
    // No ready-key buffer: every key generated is one an issuance asked for.
    let op = env.start_operator(&["--key-buffer", "0"]);
    let n: u32 = 50;
    issue_and_freeze(&env, n).await;
    let keys_before = metric(&op.metrics_page().await, "service_ca_keys_generated_total");
    env.force_rotation("frozen").await;
    let new_ski = certs::ca_ski(&env.rotated("frozen").await);

    // A Service annotated in the middle of the re-issue still gets its Secret promptly.
    let started = Instant::now();
    env.annotated_service("fresh", "fresh-tls", false).await;
    env.serving_secret("fresh-tls", T).await;
    let fresh = started.elapsed();
    // How much of the bulk re-issue was done by then: a starved Service waits for all of it.
    let reissued_before_fresh = reissued_by(&env, n, &new_ski).await;

    all_reissued_as_regular_secrets(&env, n, &new_ski).await;
    // Quiet afterwards: every key was spent once.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let page = op.metrics_page().await;
    let keys = metric(&page, "service_ca_keys_generated_total") - keys_before;
    println!(
        "{n} immutable Secrets through a forced rotation: new Service's Secret after {fresh:?}, when \
         {reissued_before_fresh} of {n} were re-issued; {keys} keys generated ({:.2} per Secret, incl. the CA key and \
         the new Service's); issuance failures {}",
        keys / f64::from(n),
        metric(&page, "service_ca_certificate_issuance_failures_total")
    );
    // Promptly, or (on a machine shared with the other tests) at least ahead of the
    // bulk re-issue still under way.
    assert!(
        fresh < Duration::from_secs(5) || reissued_before_fresh < n,
        "a new Service waited {fresh:?}, behind the whole re-issue ({reissued_before_fresh} of {n} done first)"
    );
    // One key per Secret, the new Service's and the CA key — plus at most one per Secret
    // when the serving-cert controller, woken by the delete of a re-creation, races it
    // (its key is then parked for that Service's next certificate, not lost). A loop
    // would cost one key per attempt, every few seconds.
    assert!(keys <= f64::from(2 * n + 2), "{keys} keys for {n} Secrets: attempts are burning keys");
}

/// Server-side applies `value`, an admissionregistration.k8s.io/v1 object.
async fn apply_admission_object(client: &kube::Client, value: serde_json::Value) {
    let kind = value["kind"].as_str().unwrap().to_string();
    let name = value["metadata"]["name"].as_str().unwrap().to_string();
    let gvk = kube::api::GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", &kind);
    let (resource, _) = kube::discovery::pinned_kind(client, &gvk).await.unwrap();
    let api: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), &resource);
    api.patch(&name, &PatchParams::apply("e2e").force(), &Patch::Apply(value)).await.unwrap();
}

/// An admission policy of the namespace's owner that denies every update of Secrets, and
/// its binding; returns their name once it is in force (an update of Secret `web-tls`
/// denied).
async fn deny_secret_updates(env: &Env) -> String {
    let policy = format!("deny-secret-updates-{}", env.ns);
    apply_admission_object(
        &env.client,
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
            "metadata": { "name": policy },
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": { "resourceRules": [{ "apiGroups": [""], "apiVersions": ["v1"],
                                                          "operations": ["UPDATE"], "resources": ["secrets"] }] },
                "validations": [{ "expression": "false", "message": "Secrets here are frozen by policy" }]
            }
        }),
    )
    .await;
    apply_admission_object(
        &env.client,
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": { "name": policy },
            "spec": { "policyName": policy, "validationActions": ["Deny"],
                      "matchResources": { "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": env.ns } } } }
        }),
    )
    .await;
    // The policy is in force once an update of ours is denied.
    eventually(T, "the admission policy to be in force", || async {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos().to_string();
        let patch = json!({ "metadata": { "annotations": { "probe": now } } });
        env.secrets().patch("web-tls", &PatchParams::default(), &Patch::Merge(&patch)).await.err().map(drop)
    })
    .await;
    policy
}

/// Deletes the binding of the policy [`deny_secret_updates`] made.
async fn delete_policy_binding(env: &Env, policy: &str) {
    let _ = Api::<kube::api::DynamicObject>::all_with(
        env.client.clone(),
        &kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "admissionregistration.k8s.io",
            "v1",
            "ValidatingAdmissionPolicyBinding",
        )),
    )
    .delete(policy, &DeleteParams::default())
    .await;
}

#[tokio::test]
async fn refused_writes_are_reported_backed_off_capped_and_cost_no_new_keys() {
    let env = Env::new("refused").await;
    // No ready-key buffer: every key generated is one an attempt asked for.
    let op = env.start_operator(&["--key-buffer", "0"]);
    env.annotated_service("web", "web-tls", false).await;
    env.serving_secret("web-tls", T).await;

    // An admission policy of the namespace's owner denies every update of Secrets.
    let policy = deny_secret_updates(&env).await;

    env.force_rotation("refused").await;
    env.rotated("refused").await;
    eventually(T, "the first reported failure", || async { (error_count(&env, "web").await >= 1).then_some(()) }).await;
    let keys_at_first = metric(&op.metrics_page().await, "service_ca_keys_generated_total");
    // Backoff 2 s, 4 s: two more reported failures about 6 s later.
    eventually(Duration::from_secs(40), "three reported failures", || async {
        (error_count(&env, "web").await >= 3).then_some(())
    })
    .await;
    let svc = env.services().get("web").await.unwrap();
    let message = annotation(&svc.metadata, BETA_ERR).unwrap().to_string();
    assert!(message.contains("frozen by policy"), "{message}");
    let warnings = env.events(&env.ns, Some("web"), Some("ServingCertificateError")).await;
    assert!(!warnings.is_empty(), "a Warning Event on the Service");
    let page = op.metrics_page().await;
    let keys = metric(&page, "service_ca_keys_generated_total") - keys_at_first;
    let failures = metric(&page, "service_ca_certificate_issuance_failures_total{reason=\"refused\"");
    println!("{failures} refused attempts; the retries after the first cost {keys} keys");
    assert!(failures >= 3.0);
    assert_eq!(keys, 0.0, "every retry signs over the key of the first attempt");

    // The cap: at 10 the operator stops until a person edits the annotations.
    let patch = json!({ "metadata": { "annotations": { BETA_ERR_NUM: "9", ALPHA_ERR_NUM: "9" } } });
    env.services().patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    eventually(Duration::from_secs(60), "the failure count to reach 10", || async {
        (error_count(&env, "web").await >= 10).then_some(())
    })
    .await;
    // The tenth failure's Warning (written after the count) is the last write.
    eventually(T, "the Warning that retrying stopped", || async {
        let events = env.events(&env.ns, Some("web"), Some("ServingCertificateError")).await;
        events.iter().any(|e| e.note.as_deref().is_some_and(|n| n.contains("Stopped retrying"))).then_some(())
    })
    .await;
    let writes = metric(&op.metrics_page().await, "service_ca_api_writes_total");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(metric(&op.metrics_page().await, "service_ca_api_writes_total"), writes, "no write after the cap");
    delete_policy_binding(&env, &policy).await;
}

#[tokio::test]
async fn huge_user_input_is_echoed_bounded_and_the_cap_is_reached() {
    let env = Env::new("huge").await;
    let op = env.start_operator(&[]);
    // A 90 KB Secret name, one failure short of the cap.
    let huge_name = "x".repeat(90_000);
    env.service_with("long", &[(BETA_NAME, &huge_name), (BETA_ERR_NUM, "9"), (ALPHA_ERR_NUM, "9")], false).await;
    // A foreign Secret whose originating-service-uid is 200 KB.
    let foreign: Secret = serde_json::from_value(json!({
        "metadata": { "name": "taken", "annotations": {
            "service.beta.openshift.io/originating-service-uid": "u".repeat(200_000) } },
        "type": "kubernetes.io/tls",
        "data": { "tls.crt": "", "tls.key": "" }
    }))
    .unwrap();
    env.secrets().create(&PostParams::default(), &foreign).await.unwrap();
    env.service_with("clash", &[(BETA_NAME, "taken"), (BETA_ERR_NUM, "9"), (ALPHA_ERR_NUM, "9")], false).await;

    for svc in ["long", "clash"] {
        eventually(T, &format!("{svc} at the cap"), || async { (error_count(&env, svc).await >= 10).then_some(()) })
            .await;
        let s = env.services().get(svc).await.unwrap();
        let message = annotation(&s.metadata, BETA_ERR).unwrap();
        println!("{svc}: {} bytes of error message", message.len());
        assert!(message.len() < 1_000, "{svc}: the echo is bounded ({} bytes)", message.len());
    }
    let page = op.metrics_page().await;
    let writes = metric(&page, "service_ca_api_writes_total{resource=\"services\"");
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = metric(&op.metrics_page().await, "service_ca_api_writes_total{resource=\"services\"");
    println!("Service writes: {writes} to reach the cap, {} after", after - writes);
    assert_eq!(writes, 2.0, "one write per Service took each to the cap");
    assert_eq!(after, writes, "and none after");
}

#[tokio::test]
async fn a_deleted_namespace_costs_nothing_once_it_is_gone() {
    let env = Env::new("nsgone").await;
    // ECDSA keys and 20 Services: what is shown is what the gone objects cost, not
    // their issuance (each Service's Secret is one more object for the deletion).
    let op = env.start_operator(&["--default-key-algorithm", "ecdsa"]);
    let n = 20;
    env.annotated_services(n).await;
    for i in 0..n {
        env.serving_secret(&format!("s{i}-tls"), Duration::from_secs(60)).await;
    }
    let namespaces: Api<Namespace> = Api::all(env.client.clone());
    namespaces.delete(&env.ns, &DeleteParams::background()).await.unwrap();
    eventually(Duration::from_secs(120), "the namespace to be gone", || async {
        namespaces.get_opt(&env.ns).await.unwrap().is_none().then_some(())
    })
    .await;
    // Work already under way when it went (the deletion's own events) may still finish,
    // within seconds; what must not happen is retrying for the gone objects.
    let gone = Instant::now();
    eventually(Duration::from_secs(15), "the operator to settle", || async {
        let before = metric(&op.metrics().await?.1, "service_ca_api_writes_total");
        tokio::time::sleep(Duration::from_secs(2)).await;
        (metric(&op.metrics().await?.1, "service_ca_api_writes_total") == before).then_some(())
    })
    .await;
    println!("settled {:?} after the namespace was gone", gone.elapsed());
    let page = op.metrics_page().await;
    let (errors, writes) =
        (metric(&page, "service_ca_reconcile_errors_total"), metric(&page, "service_ca_api_writes_total"));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let page = op.metrics_page().await;
    let (errors_after, writes_after) =
        (metric(&page, "service_ca_reconcile_errors_total"), metric(&page, "service_ca_api_writes_total"));
    println!("after the namespace went: {} reconcile errors, {} writes", errors_after - errors, writes_after - writes);
    assert_eq!(errors_after, errors, "no reconcile errors once the namespace is gone");
    assert_eq!(writes_after, writes, "no writes once the namespace is gone");
}

#[tokio::test]
async fn a_secret_the_service_no_longer_names_is_released_and_notes_survive_a_rotation() {
    let env = Env::new("release").await;
    let op = env.start_operator(&[]);
    env.annotated_service("web", "old-tls", false).await;
    env.serving_secret("old-tls", T).await;
    eventually(T, "the old Secret's expiry series", || async {
        let page = op.metrics().await?.1;
        page.contains("secret=\"old-tls\"").then_some(())
    })
    .await;
    let patch = json!({ "metadata": { "annotations": { BETA_NAME: "new-tls" } } });
    env.services().patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    env.serving_secret("new-tls", T).await;
    let old = eventually(T, "the old Secret released", || async {
        let s = env.secrets().get("old-tls").await.ok()?;
        (!s.labels().contains_key(MANAGED)).then_some(s)
    })
    .await;
    assert!(old.data.as_ref().is_some_and(|d| d.contains_key("tls.crt")), "the old Secret keeps its data");
    eventually(T, "the old Secret's series gone", || async {
        let page = op.metrics().await?.1;
        (!page.contains("secret=\"old-tls\"") && page.contains("secret=\"new-tls\"")).then_some(())
    })
    .await;

    // A person's own data key in signing-key survives a rotation.
    let patch = json!({ "data": { "notes": ByteString(b"rotated by the platform team".to_vec()) } });
    env.op_secrets().patch("signing-key", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    env.force_rotation("keep-notes").await;
    let after = env.rotated("keep-notes").await;
    let data = after.data.unwrap_or_default();
    assert!(data.contains_key("ca-bundle.crt"), "rotated");
    assert_eq!(data.get("notes").map(|b| b.0.as_slice()), Some(&b"rotated by the platform team"[..]));
}

#[tokio::test]
async fn a_failing_rotation_is_reported_once_degrades_readiness_and_costs_one_key() {
    let env = Env::new("rotfail").await;
    let op = env.start_operator(&["--key-buffer", "0"]);
    env.ca_bundle().await;
    // signing-key frozen: the rotation's write is refused by the API server.
    let patch = json!({ "immutable": true });
    env.op_secrets().patch("signing-key", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let keys_before = metric(&op.metrics_page().await, "service_ca_keys_generated_total");
    env.force_rotation("blocked").await;
    eventually(Duration::from_secs(40), "three failed attempts", || async {
        (metric(&op.metrics().await?.1, "service_ca_rotation_failures_total") >= 3.0).then_some(())
    })
    .await;
    let (status, body) = op.admin_get("/readyz").await.unwrap();
    assert_eq!(status, 200, "still serving with the current CA");
    assert!(body.contains("degraded"), "{body}");
    let warnings = env.events(&env.op_ns, Some("signing-key"), Some("ServiceCARotationFailed")).await;
    assert_eq!(warnings.len(), 1, "one Event for the same failure: {warnings:?}");
    let keys = metric(&op.metrics_page().await, "service_ca_keys_generated_total") - keys_before;
    assert_eq!(keys, 1.0, "one CA key, reused by every attempt");
}

#[test]
fn flags_that_can_only_misbehave_are_refused_at_start_up_naming_the_flag() {
    // An identity longer than a member Lease may carry.
    let long_identity = "x".repeat(129);
    for (args, flag) in [
        (&["--lease-identity", long_identity.as_str()][..], "--lease-identity"),
        (&["--controller-concurrency", "0"], "--controller-concurrency"),
        (&["--max-concurrent-issuance", "0"], "--max-concurrent-issuance"),
        (&["--key-buffer", "18446744073709551615"], "--key-buffer"),
        (&["--cluster-domain", ""], "--cluster-domain"),
        (&["--cluster-domain", "bad_domain..x"], "--cluster-domain"),
        // Every duration flag has bounds: the refusal names the flag, the value
        // and the range instead of a panic or a timer that never fires.
        (&["--pod-certificate-grace", "10000y"], "--pod-certificate-grace (3652500d) must be between 0s and 1d"),
        (&["--progress-interval", "0s"], "--progress-interval (0s) must be between 1s and 1d"),
        (&["--lease-duration", "2h"], "--lease-duration (2h) must be between 3s and 1h"),
        (
            &["--pod-certificate-max-lifetime", "365d"],
            "--pod-certificate-max-lifetime (365d) must be between 1h and 91d",
        ),
        (&["--cert-lifetime", "1s"], "--cert-lifetime (1s) must be between 1m and 100 years"),
        (&["--ca-lifetime", "10000y"], "--ca-lifetime (3652500d) must be between 1m and 100 years"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_service-ca-operator"))
            .args(args)
            .env("KUBECONFIG", "/nonexistent")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked") && !stderr.contains("memory allocation"), "{args:?}: {stderr}");
    }
}
