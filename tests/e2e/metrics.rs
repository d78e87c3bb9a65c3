//! `/metrics` is not open to the whole cluster (issue 14, item 10): by default it is
//! served over TLS with the certificate the operator issues for its own metrics
//! Service, and only to scrapers whose token may `get` the non-resource URL /metrics.

use std::time::Duration;

use k8s_openapi::api::authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

use crate::support::tls::{go_connect, openssl_connect, rustls_https_get};
use crate::support::{Cleanup, Env, eventually, http_get};

const T: Duration = Duration::from_secs(30);
const METRICS_SERVICE: &str = "service-ca-operator-metrics";

/// A ServiceAccount in the test namespace and a token for it.
async fn service_account_token(env: &Env, name: &str) -> String {
    let api: Api<ServiceAccount> = Api::namespaced(env.client.clone(), &env.ns);
    let sa: ServiceAccount = serde_json::from_value(json!({ "metadata": { "name": name } })).unwrap();
    api.create(&PostParams::default(), &sa).await.unwrap();
    crate::cluster::token_for(&env.client, &env.ns, name).await
}

#[tokio::test]
async fn metrics_are_served_over_tls_to_authorised_scrapers_only() {
    let env = Env::new("secure-metrics").await;
    // What manifests/metrics-service.yaml ships, in this test's operator namespace:
    // the metrics Service asking for its serving certificate, and a ConfigMap with the
    // injected bundle for scrapers to verify it.
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
        "subjects": [{ "kind": "ServiceAccount", "name": "scraper", "namespace": env.ns }]
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(env.client.clone()).create(&PostParams::default(), &binding).await.unwrap();
    cleanup.add::<ClusterRoleBinding>(role_name.clone());
    let scraper = service_account_token(&env, "scraper").await;
    // Ask before the operator does, so its (cached) verdict sees the binding.
    eventually(T, "the binding in effect", || async {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(format!("system:serviceaccount:{}:scraper", env.ns)),
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some("/metrics".into()),
                    verb: Some("get".into()),
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(env.client.clone());
        api.create(&PostParams::default(), &review).await.ok()?.status?.allowed.then_some(())
    })
    .await;
    let (status, body) = rustls_https_get(port, &bundle, &server_name, "/metrics", Some(&scraper)).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("service_ca_certificates_issued_total"), "{body}");
}
