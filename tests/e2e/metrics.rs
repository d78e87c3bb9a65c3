//! `/metrics` is not open to the whole cluster: by default it is
//! served over TLS with the certificate the operator issues for its own metrics
//! Service, and only to scrapers whose token may `get` the non-resource URL /metrics.

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

use crate::support::tls::{go_connect, openssl_connect, rustls_https_get};
use crate::support::{Cleanup, Env, Operator, T, eventually, http_get};

const METRICS_SERVICE: &str = "service-ca-operator-metrics";

/// A ServiceAccount in the test namespace and a token for it.
async fn service_account_token(env: &Env, name: &str) -> String {
    let api: Api<ServiceAccount> = Api::namespaced(env.client.clone(), &env.ns);
    let sa: ServiceAccount = serde_json::from_value(json!({ "metadata": { "name": name } })).unwrap();
    api.create(&PostParams::default(), &sa).await.unwrap();
    crate::support::objects::token_for(&env.client, &env.ns, name).await
}

/// An operator serving /metrics over TLS as shipped, in `env`'s operator namespace.
struct SecureMetrics {
    op: Operator,
    port: u16,
    bundle: String,
    server_name: String,
}

/// What manifests/metrics-service.yaml ships, in this test's operator namespace: the
/// metrics Service asking for its serving certificate, and a ConfigMap with the
/// injected bundle for scrapers to verify it; then the operator with `--metrics-secure`.
async fn secure_metrics(env: &Env) -> SecureMetrics {
    let mut svc: Service = serde_json::from_value(json!({
        "metadata": { "name": METRICS_SERVICE, "annotations": {
            "service.beta.openshift.io/serving-cert-secret-name": "service-ca-operator-metrics-tls" } },
        "spec": { "ports": [{ "name": "https-metrics", "port": 8443, "targetPort": 8443 }] }
    }))
    .unwrap();
    svc.metadata.labels = Some(env.labels());
    Api::<Service>::namespaced(env.client.clone(), &env.op_ns).create(&PostParams::default(), &svc).await.unwrap();
    let mut cm: ConfigMap = serde_json::from_value(json!({
        "metadata": { "name": "metrics-ca", "annotations": { "service.beta.openshift.io/inject-cabundle": "true" } }
    }))
    .unwrap();
    cm.metadata.labels = Some(env.labels());
    env.op_configmaps().create(&PostParams::default(), &cm).await.unwrap();

    let op = env.start_operator(&["--metrics-secure=true"]);
    let port: u16 = op.metrics_addr.rsplit(':').next().unwrap().parse().unwrap();
    let server_name = format!("{METRICS_SERVICE}.{}.svc", env.op_ns);
    let bundle = eventually(T, "the injected bundle", || async {
        env.op_configmaps().get("metrics-ca").await.ok()?.data?.remove("service-ca.crt")
    })
    .await;
    SecureMetrics { op, port, bundle, server_name }
}

/// Whether the API server answers a SubjectAccessReview for `get /metrics` by the
/// ServiceAccount `sa` of the test namespace with `allowed`.
async fn access_is(env: &Env, sa: &str, allowed: bool) -> Option<()> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!("system:serviceaccount:{}:{sa}", env.ns)),
            non_resource_attributes: Some(NonResourceAttributes {
                path: Some("/metrics".into()),
                verb: Some("get".into()),
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<SubjectAccessReview> = Api::all(env.client.clone());
    (api.create(&PostParams::default(), &review).await.ok()?.status?.allowed == allowed).then_some(())
}

/// The shipped reader role bound to ServiceAccount `sa` (created here); its token once
/// the binding is in effect. Returns the binding's name.
async fn authorised_scraper(env: &Env, sa: &str, cleanup: &mut Cleanup) -> (String, String) {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/metrics-clusterrole.yaml")).unwrap();
    let mut role: ClusterRole = serde_saphyr::from_str(&shipped).unwrap();
    let role_name = format!("{}-metrics-reader", env.run);
    role.metadata = serde_json::from_value(json!({ "name": role_name })).unwrap();
    Api::<ClusterRole>::all(env.client.clone()).create(&PostParams::default(), &role).await.unwrap();
    cleanup.add::<ClusterRole>(role_name.clone());
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": { "name": role_name },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name },
        "subjects": [{ "kind": "ServiceAccount", "name": sa, "namespace": env.ns }]
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(env.client.clone()).create(&PostParams::default(), &binding).await.unwrap();
    cleanup.add::<ClusterRoleBinding>(role_name.clone());
    let token = service_account_token(env, sa).await;
    // Ask before the operator does, so its (cached) verdict sees the binding.
    eventually(T, "the binding in effect", || access_is(env, sa, true)).await;
    (token, role_name)
}

#[tokio::test]
async fn metrics_are_served_over_tls_to_authorised_scrapers_only() {
    let env = Env::new("secure-metrics").await;
    let SecureMetrics { op, port, bundle, server_name } = secure_metrics(&env).await;

    // Unauthenticated: refused, over a chain that verifies against the injected bundle.
    let (status, body) = eventually(T, "the metrics server serving its issued certificate", || async {
        rustls_https_get(port, &bundle, &server_name, "/metrics", None).ok()
    })
    .await;
    assert_eq!(status, 401, "an unauthenticated scrape must be refused: {body}");
    let (status, _) = rustls_https_get(port, &bundle, &server_name, "/metrics", Some("not-a-token")).unwrap();
    assert_eq!(status, 401, "a token the API server does not know must be refused");
    openssl_connect(port, &bundle, &server_name).expect("OpenSSL verifies the metrics server's chain");
    go_connect(port, &bundle, &server_name).expect("Go verifies the metrics server's chain");
    // Nothing in plain HTTP on the metrics port.
    let plain = http_get(&format!("http://{}/metrics", op.metrics_addr)).await;
    assert!(!matches!(plain, Some((200, _))), "/metrics must not be served in plain HTTP: {plain:?}");
    // The probes stay plain HTTP for the kubelet.
    op.wait_ready(T).await;

    // A token whose user may not get /metrics: forbidden, and told who it is.
    let stranger = service_account_token(&env, "stranger").await;
    let (status, body) = rustls_https_get(port, &bundle, &server_name, "/metrics", Some(&stranger)).unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains(&format!("system:serviceaccount:{}:stranger", env.ns)), "{body}");

    // The shipped reader role, bound to a scraper: allowed.
    let mut cleanup = Cleanup::default();
    let (scraper, _) = authorised_scraper(&env, "scraper", &mut cleanup).await;
    let (status, body) = rustls_https_get(port, &bundle, &server_name, "/metrics", Some(&scraper)).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("service_ca_certificates_issued_total"), "{body}");
}

/// The soft limit on open files of this process (children inherit it).
/// This process's open-files limit (soft, hard).
fn open_files_limits() -> (u64, u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap_or_default();
    let field = |i: usize| line.split_whitespace().nth(i).and_then(|v| v.parse().ok()).unwrap_or(u64::MAX);
    (field(3), field(4))
}

/// The open-files limit this process (and the operator it starts) gets: the soft
/// limit raised to the hard one with util-linux's `prlimit` when it is lower than
/// `needed`, as a person would with `ulimit -n`.
fn open_files_limit(needed: u64) -> u64 {
    let (soft, hard) = open_files_limits();
    if soft < needed && hard > soft {
        let raise = format!("--nofile={hard}:{hard}");
        let _ = std::process::Command::new("prlimit").args(["--pid", &std::process::id().to_string(), &raise]).status();
    }
    open_files_limits().0
}

/// Idle connections cannot exhaust the admin ports. 15,000 idle TCP
/// connections to the TLS metrics port (measured before the fix: RSS 23 -> 145 MiB,
/// every one held by a handshake task) leave the operator's RSS under 64 MiB, /readyz
/// answering within 100 ms, and the metrics port answering once they are gone.
#[tokio::test]
async fn idle_connections_cannot_exhaust_the_admin_ports() {
    const IDLE: usize = 15_000;
    let limit = open_files_limit(16_500);
    assert!(
        limit >= 16_500,
        "this test holds {IDLE} sockets: raise the open-files limit (ulimit -n) above 16,500, not {limit}"
    );
    let env = Env::new("idle-connections").await;
    let SecureMetrics { op, port, bundle, server_name } = secure_metrics(&env).await;
    eventually(T, "the metrics server serving its issued certificate", || async {
        rustls_https_get(port, &bundle, &server_name, "/metrics", None).ok()
    })
    .await;
    op.wait_ready(T).await;
    let before = op.rss_kib();

    let started = Instant::now();
    let idle: Vec<tokio::net::TcpStream> = futures::stream::iter(0..IDLE)
        .map(|_| async move {
            tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(("127.0.0.1", port)))
                .await
                .ok()?
                .ok()
        })
        .buffer_unordered(64)
        .filter_map(|c| async move { c })
        .collect()
        .await;
    let opened = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = op.rss_kib();
    let mut readyz = Vec::new();
    for _ in 0..5 {
        let at = Instant::now();
        let answer = op.admin_get("/readyz").await;
        readyz.push(at.elapsed());
        assert!(matches!(answer, Some((200, _))), "/readyz while {} connections are open: {answer:?}", idle.len());
    }
    readyz.sort();
    let median = readyz[readyz.len() / 2];
    eprintln!(
        "{} of {IDLE} idle connections opened in {opened:?}; operator RSS {} -> {} KiB (peak {} KiB); /readyz {readyz:?}",
        idle.len(),
        before,
        during,
        op.peak_rss_kib()
    );
    assert!(during < 64 * 1024, "RSS {during} KiB with {} idle connections (target < 64 MiB)", idle.len());
    assert!(median < Duration::from_millis(100), "/readyz took {median:?} (median of 5) during the flood");

    drop(idle);
    let (status, _) = eventually(T, "the metrics port answering after the flood", || async {
        rustls_https_get(port, &bundle, &server_name, "/metrics", None).ok()
    })
    .await;
    assert_eq!(status, 401);
    assert!(!op.logs().contains("panicked"), "{}", op.logs());
}

/// 1,000 made-up bearer tokens do not evict an authorised scraper's
/// verdict (before the fix, the 256th new token cleared the whole cache). Shown by
/// revoking the scraper's binding after its first scrape: while its verdict is cached
/// (30 s), it is still served.
#[tokio::test]
async fn made_up_tokens_do_not_evict_an_authorised_scrapers_verdict() {
    const MADE_UP: usize = 1_000;
    let env = Env::new("made-up-tokens").await;
    let SecureMetrics { op, port, bundle, server_name } = secure_metrics(&env).await;
    op.wait_ready(T).await;
    let mut cleanup = Cleanup::default();
    let (scraper, binding) = authorised_scraper(&env, "scraper", &mut cleanup).await;
    let (status, body) = eventually(T, "the scraper served", || async {
        rustls_https_get(port, &bundle, &server_name, "/metrics", Some(&scraper)).ok().filter(|(s, _)| *s == 200)
    })
    .await;
    assert_eq!(status, 200, "{body}");
    let cached_at = Instant::now();
    Api::<ClusterRoleBinding>::all(env.client.clone()).delete(&binding, &Default::default()).await.unwrap();
    eventually(T, "the binding revoked", || access_is(&env, "scraper", false)).await;

    let statuses: Vec<u16> = futures::stream::iter(0..MADE_UP)
        .map(|i| {
            let (bundle, server_name) = (bundle.clone(), server_name.clone());
            tokio::task::spawn_blocking(move || {
                let token = format!("made-up-token-{i:04}");
                rustls_https_get(port, &bundle, &server_name, "/metrics", Some(&token)).map(|(s, _)| s).unwrap_or(0)
            })
        })
        .buffer_unordered(64)
        .map(|r| r.unwrap())
        .collect()
        .await;
    let mut counts = std::collections::BTreeMap::new();
    for s in &statuses {
        *counts.entry(*s).or_insert(0) += 1;
    }
    let (status, _) = rustls_https_get(port, &bundle, &server_name, "/metrics", Some(&scraper)).unwrap();
    let elapsed = cached_at.elapsed();
    eprintln!(
        "{MADE_UP} made-up tokens answered {counts:?} (0: no answer); then the scraper got {status}, {elapsed:?} after its verdict was cached"
    );
    assert!(elapsed < Duration::from_secs(29), "too slow to conclude: the verdict may have expired ({elapsed:?})");
    assert!(!counts.contains_key(&200), "a made-up token was served: {counts:?}");
    assert_eq!(status, 200, "the authorised scraper's verdict was evicted by made-up tokens");
}

#[tokio::test]
async fn admin_endpoints_serve_probes_and_the_spec_metrics() {
    let env = Env::new("admin").await;
    // No cap: other tests' Secrets on the shared control plane expire before this one's.
    let op = env.start_operator(&["--metrics-max-secret-series", "1000000"]);
    op.wait_ready(T).await;
    env.annotated_service("m", "m-tls", false).await;
    env.serving_secret("m-tls", T).await;
    assert_eq!(op.admin_get("/livez").await.unwrap().0, 200);
    let (status, body) = op.admin_get("/readyz").await.unwrap();
    assert_eq!((status, body.trim()), (200, "ok"));
    let names = [
        "service_ca_expiry_time_seconds ",
        "service_ca_serving_certificate_expiry_time_seconds{",
        "service_ca_reconcile_total{controller=\"serving-cert\"}",
        "service_ca_reconcile_duration_seconds_bucket{controller=\"cert-refresh\"",
        "service_ca_certificates_issued_total{reason=\"absent\"} 1",
        "service_ca_signing_key_valid 1",
    ];
    let secret_series = format!("namespace=\"{}\",secret=\"m-tls\"", env.ns);
    eventually(T, "every metric of docs/spec.md §4", || async {
        let (_, m) = op.metrics().await?;
        (m.contains(&secret_series) && names.iter().all(|n| m.contains(n))).then_some(())
    })
    .await;
}

/// docs/spec.md §4: one expiry series per managed Secret, for at most
/// `--metrics-max-secret-series` of them — those expiring first — so a cluster of
/// 10,000 Services does not expose 10,000 series, and an expiry alert still sees the
/// Secrets nearest their end. (The shared control plane holds other tests' Secrets too:
/// the test checks that nothing shown expires after a Secret left out.)
#[tokio::test]
async fn expiry_series_are_bounded_to_the_secrets_expiring_first() {
    let env = Env::new("series").await;
    let op = env.start_operator(&["--metrics-max-secret-series", "2", "--default-key-algorithm", "ecdsa"]);
    op.wait_ready(T).await;
    // Issued one after the other, more than a second apart: NotAfter (whole seconds)
    // orders them, the third last.
    let mut third_expiry = None;
    for name in ["first", "second", "third"] {
        env.annotated_service(name, &format!("{name}-tls"), false).await;
        let secret = env.serving_secret(&format!("{name}-tls"), T).await;
        third_expiry = secret.metadata.annotations.and_then(|a| a.get(crate::support::annotations::EXPIRY).cloned());
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let third_expiry = time::OffsetDateTime::parse(
        &third_expiry.expect("the third Secret's expiry annotation"),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
    .unix_timestamp() as f64;
    let page = eventually(T, "the third Secret counted", || async {
        let (_, page) = op.metrics().await?;
        (crate::support::metric(&page, "service_ca_serving_certificates") >= 3.0).then_some(page)
    })
    .await;
    let shown: Vec<f64> = page
        .lines()
        .filter(|l| l.starts_with("service_ca_serving_certificate_expiry_time_seconds{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(!shown.is_empty() && shown.len() <= 2, "{} expiry series with a cap of 2:\n{page}", shown.len());
    let third = format!("namespace=\"{}\",secret=\"third-tls\"", env.ns);
    assert!(!page.contains(&third), "the third Secret expires after two others, beyond the cap:\n{page}");
    assert!(shown.iter().all(|&e| e <= third_expiry), "a series shown expires after one left out: {shown:?}");
}
