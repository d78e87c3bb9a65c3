//! Issue 25, proof 2: the kubelet refreshes a pod certificate at the `beginRefreshAt`
//! the operator sets, and across a forced rotation every pairing of the old or the
//! refreshed certificate with the old or the new projected bundle handshakes (the
//! rotation trust rule of docs/spec.md §3.3 and §5.3, applied to pods).
//!
//! The API server keeps `beginRefreshAt` at least 10 min after NotBefore, and allows
//! NotBefore at most 5 min back; the kubelet adds up to 5 min of jitter and looks every
//! 1-2 min. So a refresh takes 6 to 13 minutes however the operator is set: this test
//! runs in `make test-slow`, not in `make test`.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::certificates::v1::PodCertificateRequest;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::ListParams;
use x509_parser::prelude::*;

use super::kubelet::World;
use crate::support::certs::{ca_ski, ders, signer_of, skis};
use crate::support::node::{file, node, split_bundle, uid};
use crate::support::tls::{rustls_verify_at, serve_in_every_stack};
use crate::support::{eventually, time_scale};

const T: Duration = Duration::from_secs(90);
/// `beginRefreshAt` (6 min after issuance here), the kubelet's jitter (up to 5 min),
/// its refresh pass (every 1-2 min) and a pod sync (10 s), with room.
const REFRESH: Duration = Duration::from_secs(15 * 60);
/// The API server's margin: `beginRefreshAt` at least this long after NotBefore.
const MARGIN: Duration = Duration::from_secs(600);

/// An Issued request's status times, and its leaf's serial.
#[derive(Debug)]
struct Issued {
    serial: Vec<u8>,
    not_before: SystemTime,
    not_after: SystemTime,
    begin_refresh_at: SystemTime,
}

fn system_time(t: &Time) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.0.as_second()).unwrap())
}

/// The serial number of a chain's leaf.
fn serial(chain_pem: &str) -> Vec<u8> {
    let der = ders(chain_pem).into_iter().next().expect("a leaf");
    X509Certificate::from_der(&der).unwrap().1.raw_serial().to_vec()
}

/// The status of the request whose leaf has `serial`.
async fn issued(w: &World, serial_of_leaf: &[u8]) -> Issued {
    let pcrs = w.requests().list(&ListParams::default()).await.unwrap().items;
    let status = pcrs
        .iter()
        .filter_map(|pcr: &PodCertificateRequest| pcr.status.as_ref())
        .find(|s| s.certificate_chain.as_deref().is_some_and(|chain| serial(chain) == serial_of_leaf))
        .unwrap_or_else(|| panic!("no request issued the leaf the pod holds: {pcrs:#?}"));
    Issued {
        serial: serial_of_leaf.to_vec(),
        not_before: system_time(status.not_before.as_ref().unwrap()),
        not_after: system_time(status.not_after.as_ref().unwrap()),
        begin_refresh_at: system_time(status.begin_refresh_at.as_ref().unwrap()),
    }
}

/// Seconds from the Unix epoch, for the printed figures.
fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
}

/// The test's world, refreshing as early as the API server allows, NotBefore 4 min
/// back, one hour (the shortest lifetime): beginRefreshAt is NotBefore + 10 min, 6 min
/// after issuance.
async fn refreshing_early() -> World {
    World::new(
        "kubelet-refresh",
        &[
            "--pod-certificate-refresh-at",
            "0",
            "--pod-certificate-backdate",
            "4m",
            "--pod-certificate-max-lifetime",
            "1h",
        ],
    )
    .await
}

/// The kubelet refreshes on its own: a new key, a new request, new files. Waits for the
/// refreshed `credentials` and checks they were written at `first`'s beginRefreshAt (not
/// before, and not long after); returns them. `created`: when the pod was.
async fn refreshed_at_begin_refresh_at(credentials: &Path, first: &Issued, created: Instant) -> String {
    let waiting = Instant::now();
    let (second, written) = eventually(REFRESH, "the kubelet's refreshed credentials.pem", || async {
        let text = std::fs::read_to_string(credentials).ok()?;
        let written = std::fs::metadata(credentials).ok()?.modified().ok()?;
        (serial(&split_bundle(&text).1) != first.serial).then_some((text, written))
    })
    .await;
    let late = written.duration_since(first.begin_refresh_at).unwrap_or_else(|e| {
        panic!(
            "the kubelet refreshed {:?} before beginRefreshAt: the operator's time was not the one it used",
            e.duration()
        )
    });
    eprintln!(
        "beginRefreshAt → refreshed credentials.pem written: {late:?} (kubelet jitter up to 5 min, refresh pass every \
         1-2 min, pod sync 10 s); pod created → refreshed: {:?}; waited after the rotation {:?}",
        created.elapsed(),
        waiting.elapsed()
    );
    assert!(late < Duration::from_secs(600).mul_f64(time_scale()), "refreshed at beginRefreshAt, not {late:?} after");
    second
}

/// The control: without its bridge, the refreshed leaf (of `chain`) is not trusted by the
/// old bundle.
fn assert_untrusted_without_the_bridge(chain: &str, old_bundle: &str, server_name: &str) {
    let certs = ders(chain);
    let bridgeless: String =
        [&certs[0], &certs[2]].iter().map(|der| ::pem::encode(&::pem::Pem::new("CERTIFICATE", der.to_vec()))).collect();
    assert!(rustls_verify_at(&bridgeless, old_bundle, server_name, SystemTime::now()).is_err());
}

#[tokio::test]
#[ignore = "slow: make test-slow"]
async fn the_kubelet_refreshes_the_pod_certificate_at_begin_refresh_at_and_old_and_new_bundles_trust_both_certificates()
{
    let w = refreshing_early().await;
    let server_name = format!("web.{}.svc", w.env.ns);
    w.env.service_with("web", &[], false).await;
    let client = w.pod("client-0", "client", vec![w.bundle_volume()]).await;
    let created = Instant::now();
    let web = w.pod("web-0", "web", vec![w.cert_volume("ECDSAP256")]).await;
    let credentials = node().volume_dir(&uid(&web), "projected", "tls").join("credentials.pem");
    let (key1, chain1) = split_bundle(&file(&credentials, T).await);
    let first_files = created.elapsed();
    let first = issued(&w, &serial(&chain1)).await;
    eprintln!(
        "pod created → credentials.pem: {first_files:?}; notBefore {} beginRefreshAt {} notAfter {} (Unix s), now {}",
        unix(first.not_before),
        unix(first.begin_refresh_at),
        unix(first.not_after),
        unix(SystemTime::now())
    );
    assert_eq!(first.begin_refresh_at, first.not_before + MARGIN, "--pod-certificate-refresh-at 0, clamped");
    assert_eq!(first.not_after.duration_since(first.not_before).unwrap(), Duration::from_secs(3600));

    // The bundle a client holds before the rotation: the old CA alone.
    let ca_file = node().volume_dir(&uid(&client), "projected", "ca").join("ca-bundle.crt");
    let old_bundle = file(&ca_file, T).await;
    let old_ski = signer_of(&chain1);
    assert_eq!(
        skis(&old_bundle),
        std::slice::from_ref(&old_ski),
        "the old bundle trusts the first certificate's CA only"
    );

    w.env.force_rotation("kubelet-refresh").await;
    let new_ski = ca_ski(&w.env.rotated("kubelet-refresh").await);
    let new_bundle = eventually(T, "the client pod's projected bundle trusting the new CA", || async {
        let pem = std::fs::read_to_string(&ca_file).ok()?;
        skis(&pem).contains(&new_ski).then_some(pem)
    })
    .await;
    assert!(skis(&new_bundle).contains(&old_ski), "the new bundle still trusts the old CA");

    let second = refreshed_at_begin_refresh_at(&credentials, &first, created).await;
    let (key2, chain2) = split_bundle(&second);
    assert_ne!(key2, key1, "the kubelet made a new key");
    assert_eq!(signer_of(&chain2), new_ski, "the refreshed certificate is the new CA's");
    assert_eq!(ders(&chain2).len(), 3, "leaf, the bridge to the old CA, the new CA");
    let refreshed = issued(&w, &serial(&chain2)).await;
    assert_eq!(refreshed.begin_refresh_at, refreshed.not_before + MARGIN);
    assert_eq!(w.requests().list(&ListParams::default()).await.unwrap().items.len(), 2, "one request per key");

    handshakes_across_the_rotation([(&chain1, &key1), (&chain2, &key2)], [&old_bundle, &new_bundle], &server_name);
    assert_untrusted_without_the_bridge(&chain2, &old_bundle, &server_name);
}

/// Every certificate served (rustls, OpenSSL, Go) to every client stack trusting each
/// bundle: 2 × 2 × 9 handshakes.
fn handshakes_across_the_rotation(pairs: [(&String, &String); 2], bundles: [&String; 2], server_name: &str) {
    let started = Instant::now();
    let mut failures = Vec::new();
    for ((chain, key), cert) in pairs.into_iter().zip(["first certificate", "refreshed certificate"]) {
        for (bundle, which) in bundles.into_iter().zip(["old bundle", "new bundle"]) {
            for failure in serve_in_every_stack(chain, key, bundle, server_name) {
                failures.push(format!("{cert}, {which}: {failure}"));
            }
        }
    }
    assert!(failures.is_empty(), "handshakes failed: {failures:#?}");
    eprintln!(
        "36 handshakes (first and refreshed certificate × old and new bundle × 3 servers × 3 clients) in {:?}",
        started.elapsed()
    );
}
