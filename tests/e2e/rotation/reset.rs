//! A hard reset, an operator killed during rotations, an unusable signing-key, a CA of
//! one's own (docs/spec.md §3).

use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{ListParams, PostParams};
use serde_json::json;
use service_ca_operator::pki;

use super::signing_key;
use crate::support::tls::{self, TlsServer};
use crate::support::{Env, T, certs, data, eventually};

#[tokio::test]
async fn hard_reset_gives_a_new_ca_and_updates_every_secret_and_bundle() {
    let env = Env::new("ca-reset").await;
    // ECDSA leaves: the reset is the point, not 40 RSA keys (the CA's stays RSA).
    let _op = env.start_operator(&["--default-key-algorithm", "ecdsa"]);
    let old_bundle = env.ca_bundle().await;
    let old_cn = certs::of_secret(&signing_key(&env).await).subject_cn;
    let n = 20;
    env.annotated_services(n).await;
    let mut cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(json!({})).unwrap();
    cm.metadata = env.meta("bundle");
    cm.metadata.annotations =
        Some([("service.beta.openshift.io/inject-cabundle".to_string(), "true".to_string())].into());
    env.configmaps().create(&PostParams::default(), &cm).await.unwrap();
    for i in 0..n {
        env.serving_secret(&format!("s{i}-tls"), T).await;
    }

    let started = Instant::now();
    env.hard_reset().await;
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
        env.force_rotation(&reason).await;
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
    env.hard_reset().await;
    env.serving_secret("waiting-tls", T).await;
    op.wait_ready(T).await;
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
