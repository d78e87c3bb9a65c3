//! Serving certificates (docs/spec.md §1), end to end: the real operator binary, the real API
//! server, real TLS handshakes with the issued certificates.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::ResourceExt;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use service_ca_operator::pki::{self, CaPolicy, CertificateAuthority, LeafRequest, PrivateKey};

use crate::support::tls::{self, TlsServer};
use crate::support::{Env, annotation, certs, data, eventually};

const BETA_NAME: &str = "service.beta.openshift.io/serving-cert-secret-name";
const ALPHA_NAME: &str = "service.alpha.openshift.io/serving-cert-secret-name";
const T: Duration = Duration::from_secs(30);

async fn service(env: &Env, name: &str) -> Service {
    env.services().get(name).await.unwrap()
}

#[tokio::test]
async fn annotated_service_gets_a_correct_secret_and_serves_tls() {
    let env = Env::new("serving-basic").await;
    let _op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    let started = Instant::now();
    let svc = env.annotated_service("test1", "test1", false).await;
    let secret = env.serving_secret("test1", Duration::from_secs(10)).await;
    let latency = started.elapsed();
    println!("serving Secret appeared {latency:?} after the annotated Service was created");

    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let keys: Vec<&String> = secret.data.as_ref().unwrap().keys().collect();
    assert_eq!(keys, ["tls.crt", "tls.key"]);
    assert!(data(&secret, "tls.key").starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    let m = &secret.metadata;
    assert_eq!(annotation(m, "service.beta.openshift.io/originating-service-name"), Some("test1"));
    assert_eq!(annotation(m, "service.beta.openshift.io/originating-service-uid"), svc.metadata.uid.as_deref());
    assert_eq!(annotation(m, "service.alpha.openshift.io/originating-service-uid"), None, "beta Service, beta keys");
    let (sans, not_after) = (certs::sans(&secret), certs::not_after(&secret));
    let expiry = pki::format_expiry(::time::OffsetDateTime::from_unix_timestamp(not_after).unwrap());
    assert_eq!(annotation(m, "service.beta.openshift.io/expiry"), Some(expiry.as_str()));
    assert_eq!(annotation(m, "service.alpha.openshift.io/expiry"), Some(expiry.as_str()));
    assert!(expiry.ends_with('Z') && expiry.len() == 20, "RFC 3339, UTC, whole seconds: {expiry}");
    let owner = &secret.owner_references()[0];
    assert_eq!((owner.api_version.as_str(), owner.kind.as_str(), owner.name.as_str()), ("v1", "Service", "test1"));
    assert_eq!(Some(&owner.uid), svc.metadata.uid.as_ref());
    assert_eq!(secret.labels().get("service-ca.operators.openshift.io/managed").map(String::as_str), Some("true"));
    let ns = &env.ns;
    assert_eq!(sans, [format!("test1.{ns}.svc"), format!("test1.{ns}.svc.cluster.local")]);

    // The Service records its signer.
    let cn = certs::cn(&env.op_secrets().get("signing-key").await.unwrap());
    let svc = eventually(T, "serving-cert-signed-by", || async {
        let s = service(&env, "test1").await;
        (annotation(&s.metadata, "service.beta.openshift.io/serving-cert-signed-by") == Some(cn.as_str())).then_some(s)
    })
    .await;
    assert_eq!(annotation(&svc.metadata, "service.alpha.openshift.io/serving-cert-signed-by"), Some(cn.as_str()));
    assert!(!env.events(&env.ns, Some("test1"), Some("ServingCertificateIssued")).await.is_empty());

    // A TLS server using the Secret, verified by clients trusting signing-cabundle.
    let server = TlsServer::start(&data(&secret, "tls.crt"), &data(&secret, "tls.key"));
    for (stack, result) in tls::connect_all(server.port, &bundle, &format!("test1.{ns}.svc")) {
        result.unwrap_or_else(|e| panic!("{stack}: {e}"));
    }
    assert!(tls::rustls_connect(server.port, &bundle, &format!("other.{ns}.svc")).is_err());
}

#[tokio::test]
async fn headless_service_certificate_covers_its_pods() {
    let env = Env::new("serving-headless").await;
    let _op = env.start_operator(&[]);
    let bundle = env.ca_bundle().await;
    env.annotated_service("web", "web-tls", true).await;
    let secret = env.serving_secret("web-tls", T).await;
    let ns = &env.ns;
    let sans = certs::sans(&secret);
    assert_eq!(
        sans,
        [
            format!("*.web.{ns}.svc"),
            format!("*.web.{ns}.svc.cluster.local"),
            format!("web.{ns}.svc"),
            format!("web.{ns}.svc.cluster.local")
        ]
    );
    let server = TlsServer::start(&data(&secret, "tls.crt"), &data(&secret, "tls.key"));
    for name in [format!("web-0.web.{ns}.svc"), format!("web.{ns}.svc"), format!("web-1.web.{ns}.svc.cluster.local")] {
        for (stack, result) in tls::connect_all(server.port, &bundle, &name) {
            result.unwrap_or_else(|e| panic!("{stack} for {name}: {e}"));
        }
    }
}

#[tokio::test]
async fn alpha_annotation_gets_alpha_keys_and_beta_wins_over_alpha() {
    let env = Env::new("serving-alpha").await;
    let _op = env.start_operator(&[]);
    env.service_with("old", &[(ALPHA_NAME, "old-tls")], false).await;
    env.service_with("both", &[(ALPHA_NAME, "alpha-tls"), (BETA_NAME, "beta-tls")], false).await;
    let old = env.serving_secret("old-tls", T).await;
    assert!(annotation(&old.metadata, "service.alpha.openshift.io/originating-service-uid").is_some());
    assert!(annotation(&old.metadata, "service.beta.openshift.io/originating-service-uid").is_none());
    assert!(annotation(&old.metadata, "service.beta.openshift.io/expiry").is_some(), "expiry in both forms");
    assert!(annotation(&old.metadata, "service.alpha.openshift.io/expiry").is_some());
    env.serving_secret("beta-tls", T).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(env.secrets().get_opt("alpha-tls").await.unwrap().is_none(), "beta wins when both are set");
}

#[tokio::test]
async fn foreign_secret_is_never_modified_errors_are_counted_and_capped() {
    let env = Env::new("serving-foreign").await;
    let foreign: Secret = serde_json::from_value(json!({
        "metadata": { "name": "taken" }, "type": "Opaque", "data": { "password": "aHVudGVyMg==" }
    }))
    .unwrap();
    let foreign = env.secrets().create(&PostParams::default(), &foreign).await.unwrap();
    let _op = env.start_operator(&[]);
    env.annotated_service("svc", "taken", false).await;

    let beta_err = "service.beta.openshift.io/serving-cert-generation-error";
    let beta_num = "service.beta.openshift.io/serving-cert-generation-error-num";
    let svc = eventually(T, "generation error annotations", || async {
        let s = service(&env, "svc").await;
        annotation(&s.metadata, beta_num).is_some().then_some(s)
    })
    .await;
    let message = annotation(&svc.metadata, beta_err).unwrap().to_string();
    assert!(message.contains(&format!("{}/taken", env.ns)) && message.contains("never modifies it"), "{message}");
    assert_eq!(
        annotation(&svc.metadata, "service.alpha.openshift.io/serving-cert-generation-error"),
        Some(message.as_str())
    );
    assert!(annotation(&svc.metadata, "service.alpha.openshift.io/serving-cert-generation-error-num").is_some());
    // Ours, by reason: the API server's own ClusterIP repair loop may also put a
    // Warning on a Service when the machine is busy.
    let warning = eventually(T, "Warning Event", || async {
        env.events(&env.ns, Some("svc"), Some("ServingCertificateError"))
            .await
            .into_iter()
            .find(|e| e.type_.as_deref() == Some("Warning"))
    })
    .await;
    assert!(
        warning.note.as_deref().unwrap_or_default().contains("taken"),
        "{warning:?}\nall events: {:?}",
        env.events(&env.ns, Some("svc"), None).await
    );

    // Consecutive failures count up (retries with backoff: 2 s, 4 s, ...).
    eventually(T, "the failure count to reach 2", || async {
        let s = service(&env, "svc").await;
        (annotation(&s.metadata, beta_num) == Some("2")).then_some(())
    })
    .await;

    // At 10 it stops: jump to 9 (as if 9 attempts had failed) and watch it stop at 10.
    let patch = json!({ "metadata": { "annotations": { beta_num: "9", "service.alpha.openshift.io/serving-cert-generation-error-num": "9" } } });
    env.services().patch("svc", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let capped = eventually(Duration::from_secs(90), "the count to reach 10", || async {
        let s = service(&env, "svc").await;
        (annotation(&s.metadata, beta_num) == Some("10")).then_some(s)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(70)).await;
    let later = service(&env, "svc").await;
    assert_eq!(later.resource_version(), capped.resource_version(), "no more attempts after 10 failures");

    // The foreign Secret was never touched.
    let still = env.secrets().get("taken").await.unwrap();
    assert_eq!(still.resource_version(), foreign.resource_version());
    assert_eq!(still.data, foreign.data);

    // A person frees the name and clears the errors: the operator tries again and succeeds.
    env.secrets().delete("taken", &DeleteParams::default()).await.unwrap();
    let patch = json!({ "metadata": { "annotations": { beta_num: null, beta_err: null,
        "service.alpha.openshift.io/serving-cert-generation-error-num": null,
        "service.alpha.openshift.io/serving-cert-generation-error": null } } });
    env.services().patch("svc", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let ours = env.serving_secret("taken", T).await;
    assert_eq!(ours.type_.as_deref(), Some("kubernetes.io/tls"));
    eventually(T, "errors cleared and signed-by set", || async {
        let s = service(&env, "svc").await;
        (annotation(&s.metadata, beta_num).is_none()
            && annotation(&s.metadata, "service.beta.openshift.io/serving-cert-signed-by").is_some())
        .then_some(())
    })
    .await;
}

#[tokio::test]
async fn invalid_secret_name_is_reported_not_crashed_on() {
    let env = Env::new("serving-badname").await;
    let mut op = env.start_operator(&[]);
    env.annotated_service("svc", "Not_A_Valid.Name", false).await;
    let svc = eventually(T, "error annotation", || async {
        let s = service(&env, "svc").await;
        annotation(&s.metadata, "service.beta.openshift.io/serving-cert-generation-error").map(|m| m.to_string())
    })
    .await;
    assert!(svc.contains("not a valid Secret name"), "{svc}");
    assert!(op.running(), "the operator keeps running");
}

#[tokio::test]
async fn service_turning_headless_gets_a_new_certificate_with_wildcards() {
    let env = Env::new("serving-sanchange").await;
    let _op = env.start_operator(&[]);
    env.annotated_service("db", "db-tls", false).await;
    let before = env.serving_secret("db-tls", T).await;
    assert_eq!(certs::sans(&before).len(), 2);
    // clusterIP is immutable: the Service is re-created headless (same name, new UID).
    env.services().delete("db", &DeleteParams::default()).await.unwrap();
    eventually(T, "old Secret garbage-collected", || async {
        env.secrets().get_opt("db-tls").await.unwrap().is_none().then_some(())
    })
    .await;
    env.annotated_service("db", "db-tls", true).await;
    let after = eventually(T, "headless certificate", || async {
        let s = env.secrets().get_opt("db-tls").await.unwrap()?;
        (certs::sans(&s).len() == 4).then_some(s)
    })
    .await;
    assert!(certs::sans(&after)[0].starts_with("*.db."));
}

/// Watches a Secret until `check` holds; returns it.
async fn secret_until(env: &Env, name: &str, what: &str, check: impl Fn(&Secret) -> bool) -> Secret {
    eventually(T, what, || async { env.secrets().get_opt(name).await.unwrap().filter(|s| check(s)) }).await
}

async fn put_data(env: &Env, name: &str, data: BTreeMap<String, ByteString>) {
    let mut secret = env.secrets().get(name).await.unwrap();
    secret.data = Some(data);
    env.secrets().replace(name, &PostParams::default(), &secret).await.unwrap();
}

#[tokio::test]
async fn tampered_missing_or_foreign_signed_data_is_reissued_and_extra_keys_are_stripped() {
    let env = Env::new("serving-tamper").await;
    let _op = env.start_operator(&[]);
    env.annotated_service("app", "app-tls", false).await;
    let original = env.serving_secret("app-tls", T).await;
    let serial0 = certs::serial(&original);
    let valid = |s: &Secret| pki::pem::decode_certificates("tls.crt", data(s, "tls.crt").as_bytes()).is_ok();

    // Extra keys go, without a new certificate.
    let mut extra = original.data.clone().unwrap();
    extra.insert("ca.crt".into(), ByteString(b"x".to_vec()));
    put_data(&env, "app-tls", extra).await;
    let stripped = secret_until(&env, "app-tls", "extra key removed", |s| s.data.as_ref().unwrap().len() == 2).await;
    assert_eq!(data(&stripped, "tls.crt"), data(&original, "tls.crt"), "not re-issued");

    // Garbage certificate: re-issued.
    let mut garbage = original.data.clone().unwrap();
    garbage.insert("tls.crt".into(), ByteString(b"garbage".to_vec()));
    put_data(&env, "app-tls", garbage).await;
    let fixed = secret_until(&env, "app-tls", "garbage replaced", valid).await;
    let serial1 = certs::serial(&fixed);
    assert_ne!(serial1, serial0);

    // Missing key (the API server insists on the entry for kubernetes.io/tls, so it is
    // emptied): re-issued.
    let mut no_key = fixed.data.clone().unwrap();
    no_key.insert("tls.key".into(), ByteString(Vec::new()));
    put_data(&env, "app-tls", no_key).await;
    let fixed = secret_until(&env, "app-tls", "key restored", |s| !data(s, "tls.key").is_empty()).await;
    assert_ne!(certs::serial(&fixed), serial1);

    // A well-formed certificate for the right names, from another CA (AKI mismatch).
    let now = ::time::OffsetDateTime::now_utc();
    let other = CertificateAuthority::create(
        PrivateKey::generate_rsa(2048).unwrap(),
        now,
        &CaPolicy { lifetime: Duration::from_secs(86_400 * 30), rotate_before: Duration::from_secs(86_400) },
    )
    .unwrap();
    let uid = env.services().get("app").await.unwrap().uid().unwrap();
    let req = LeafRequest {
        service: "app".into(),
        namespace: env.ns.clone(),
        uid: uid.clone(),
        headless: false,
        cluster_domain: "cluster.local".into(),
        key: service_ca_operator::pki::KeyKind::Rsa { bits: 2048 },
    };
    let key = PrivateKey::generate_rsa(2048).unwrap();
    let impostor = other.issue(&req, &key, now, Duration::from_secs(86_400)).unwrap();
    let impostor_crt = impostor.chain_pem.clone();
    put_data(
        &env,
        "app-tls",
        BTreeMap::from([
            ("tls.crt".to_string(), ByteString(impostor.chain_pem.into_bytes())),
            ("tls.key".to_string(), ByteString(impostor.key_pem.as_bytes().to_vec())),
        ]),
    )
    .await;
    let fixed =
        secret_until(&env, "app-tls", "certificate from another CA replaced", |s| data(s, "tls.crt") != impostor_crt)
            .await;
    let bundle = env.ca_bundle().await;
    let server = TlsServer::start(&data(&fixed, "tls.crt"), &data(&fixed, "tls.key"));
    tls::rustls_connect(server.port, &bundle, &format!("app.{}.svc", env.ns)).unwrap();
}

#[tokio::test]
async fn deleted_secret_is_recreated_with_a_new_key() {
    let env = Env::new("serving-delete").await;
    let _op = env.start_operator(&[]);
    env.annotated_service("api", "api-tls", false).await;
    let first = env.serving_secret("api-tls", T).await;
    env.secrets().delete("api-tls", &DeleteParams::default()).await.unwrap();
    let second = secret_until(&env, "api-tls", "re-created Secret", |s| s.uid() != first.uid()).await;
    assert_ne!(data(&second, "tls.key"), data(&first, "tls.key"));
}

#[tokio::test]
async fn refresh_happens_at_the_scheduled_moment() {
    let env = Env::new("serving-refresh").await;
    // 60 s certificates, refreshed when 20 s are left: due 40 s after issuance. ECDSA
    // keys: the test measures when the refresh is scheduled, not how long a fresh RSA
    // key takes at the key threads' lower priority on a loaded machine (4 s was seen
    // with the whole suite running on 2 cores).
    let _op = env.start_operator(&[
        "--cert-lifetime",
        "60s",
        "--cert-refresh-before",
        "20s",
        "--default-key-algorithm",
        "ecdsa",
    ]);
    env.annotated_service("tick", "tick-tls", false).await;
    let first = env.serving_secret("tick-tls", T).await;
    let (not_after, serial) = (certs::not_after(&first), certs::serial(&first));
    let due = not_after - 20;
    let second = eventually(Duration::from_secs(70), "the scheduled refresh", || async {
        let s = env.secrets().get("tick-tls").await.unwrap();
        (certs::serial(&s) != serial).then_some(s)
    })
    .await;
    let refreshed_at = ::time::OffsetDateTime::now_utc().unix_timestamp();
    let new_not_after = certs::not_after(&second);
    // The new certificate's NotBefore is (issuance - 1 s): compare with the due moment.
    let issued_at = new_not_after - 60;
    println!("refresh due at {due}, issued at {issued_at} (observed {refreshed_at}): {} s late", issued_at - due);
    assert!(issued_at >= due - 1 && issued_at <= due + 3, "refresh at {issued_at}, due {due}");
}

#[tokio::test]
async fn removing_the_annotation_leaves_the_secret_alone_and_renaming_creates_a_new_one() {
    let env = Env::new("serving-annot").await;
    let _op = env.start_operator(&[]);
    env.annotated_service("keep", "keep-tls", false).await;
    let first = env.serving_secret("keep-tls", T).await;

    // Renaming: a new Secret, the old one stays.
    let patch = json!({ "metadata": { "annotations": { BETA_NAME: "keep-tls-2" } } });
    env.services().patch("keep", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    env.serving_secret("keep-tls-2", T).await;
    assert!(env.secrets().get_opt("keep-tls").await.unwrap().is_some());

    // Removing: the Secret stays and is no longer maintained (an extra key survives).
    let patch = json!({ "metadata": { "annotations": { BETA_NAME: null } } });
    env.services().patch("keep", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let mut data = first.data.clone().unwrap();
    data.insert("note".into(), ByteString(b"left alone".to_vec()));
    put_data(&env, "keep-tls", data).await;
    let mut data2 = env.secrets().get("keep-tls-2").await.unwrap().data.unwrap();
    data2.insert("note".into(), ByteString(b"left alone".to_vec()));
    put_data(&env, "keep-tls-2", data2).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    for name in ["keep-tls", "keep-tls-2"] {
        let s = env.secrets().get(name).await.unwrap();
        assert!(s.data.unwrap().contains_key("note"), "{name} was modified after the annotation was removed");
    }
}

#[tokio::test]
async fn restart_with_200_pending_services_ends_with_exactly_one_secret_each() {
    let env = Env::new("serving-restart").await;
    // Bystanders that must not change.
    let cm: ConfigMap =
        serde_json::from_value(json!({ "metadata": { "name": "bystander" }, "data": { "k": "v" } })).unwrap();
    let bystander = env.configmaps().create(&PostParams::default(), &cm).await.unwrap();
    let plain = env.service_with("plain", &[], false).await;

    let mut op = env.start_operator(&[]);
    env.ca_bundle().await;
    let n = 200;
    let creations = (0..n).map(|i| {
        let env = &env;
        async move { env.annotated_service(&format!("s{i}"), &format!("s{i}-tls"), i % 10 == 0).await }
    });
    futures::future::join_all(creations).await;
    let managed = ListParams::default().labels("service-ca.operators.openshift.io/managed=true");
    // Stop it while work is pending.
    eventually(T, "some Secrets issued", || async {
        let count = env.secrets().list(&managed).await.unwrap().items.len();
        (count >= 10).then_some(())
    })
    .await;
    op.kill();
    let at_stop = env.secrets().list(&managed).await.unwrap().items.len();
    println!("operator killed with {at_stop}/{n} Secrets issued");
    assert!(at_stop < n, "the kill should land mid-way");

    let _op = env.start_operator(&[]);
    eventually(Duration::from_secs(120), "all 200 Secrets", || async {
        let items = env.secrets().list(&managed).await.unwrap().items;
        (items.len() >= n).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let secrets: Vec<Secret> = env.secrets().list(&managed).await.unwrap().items;
    assert_eq!(secrets.len(), n, "exactly one Secret per Service");
    let bundle = env.ca_bundle().await;
    let services: BTreeMap<String, Service> = env
        .services()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|s| (s.name_any(), s))
        .collect();
    for secret in &secrets {
        let svc_name = secret.name_any().trim_end_matches("-tls").to_string();
        let svc = &services[&svc_name];
        assert_eq!(secret.owner_references()[0].uid, svc.uid().unwrap());
        let name = format!("{svc_name}.{}.svc", env.ns);
        tls::rustls_verify_at(&data(secret, "tls.crt"), &bundle, &name, std::time::SystemTime::now())
            .unwrap_or_else(|e| panic!("{}: {e}", secret.name_any()));
    }
    assert_eq!(env.configmaps().get("bystander").await.unwrap().resource_version(), bystander.resource_version());
    assert_eq!(env.services().get("plain").await.unwrap().resource_version(), plain.resource_version());
    let all = env.secrets().list(&ListParams::default()).await.unwrap().items.len();
    assert_eq!(all, n, "no other Secret was created");
}

#[tokio::test]
async fn services_outside_the_selector_are_not_touched() {
    let env = Env::new("serving-selector").await;
    let _op = env.start_operator(&[]);
    let mut svc: Service = serde_json::from_value(json!({ "spec": { "ports": [{ "port": 443 }] } })).unwrap();
    svc.metadata.name = Some("other".into());
    svc.metadata.annotations = Some(BTreeMap::from([(BETA_NAME.to_string(), "other-tls".to_string())]));
    env.services().create(&PostParams::default(), &svc).await.unwrap();
    env.annotated_service("mine", "mine-tls", false).await;
    env.serving_secret("mine-tls", T).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(env.secrets().get_opt("other-tls").await.unwrap().is_none());
}
