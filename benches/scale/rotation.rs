//! B3 forced rotation and B4 injection into many ConfigMaps, run by the RSA and the ECDSA
//! parts alike.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use super::{
    CREATE_CONCURRENCY, Report, count_issued_by, first_seen, injected, invalid_secrets, ms, percentile, scaled,
    support, times,
};
use support::{Env, certs, eventually};

/// B4: injection into many ConfigMaps at once (reported as `label`). Returns how many.
pub async fn b4_injection(env: &Env, label: &str, report: &mut Report) -> usize {
    let n4 = scaled(1000);
    let cms_seen = first_seen(env.configmaps(), &format!("{}={}", support::RUN_LABEL, env.run), injected);
    let started = Instant::now();
    let cm_created: HashMap<String, Instant> = futures::stream::iter(0..n4)
        .map(|i| async move {
            let mut cm: ConfigMap = serde_json::from_value(json!({})).unwrap();
            cm.metadata = env.meta(&format!("cm{i}"));
            cm.metadata.annotations =
                Some(BTreeMap::from([("service.beta.openshift.io/inject-cabundle".into(), "true".into())]));
            let t = Instant::now();
            env.configmaps().create(&PostParams::default(), &cm).await.unwrap();
            (format!("cm{i}"), t)
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect()
        .await;
    eventually(Duration::from_secs(300), "every ConfigMap injected", || {
        let done = cm_created.keys().all(|k| cms_seen.lock().unwrap().contains_key(k));
        async move { done.then_some(()) }
    })
    .await;
    let last = cm_created.keys().map(|k| cms_seen.lock().unwrap()[k]).max().unwrap();
    let mut per_object: Vec<Duration> = cm_created.iter().map(|(k, t)| cms_seen.lock().unwrap()[k] - *t).collect();
    per_object.sort();
    println!("\n{label} injection ({n4} annotated ConfigMaps created at once)");
    report.row(&format!("{label} all injected after"), format!("{:.1} s", (last - started).as_secs_f64()), "");
    report.row(
        &format!("{label} per object (created -> injected) p50"),
        format!("{:.0} ms", ms(percentile(&per_object, 0.5))),
        "",
    );
    report.json.insert(
        label.to_lowercase().replace(['-', ' '], "_"),
        json!({ "n": n4, "seconds": (last - started).as_secs_f64(), "p50_ms": ms(percentile(&per_object, 0.5)),
                "p99_ms": ms(percentile(&per_object, 0.99)) }),
    );
    n4
}

/// B3: forced rotation with `n_secrets` serving Secrets and `n4` injected ConfigMaps
/// in place (reported as `label`); the re-issue rate is compared with `compare` (what,
/// rate). Returns the re-issue rate.
pub async fn b3_rotation(
    env: &Env,
    label: &str,
    (n_secrets, n4): (usize, usize),
    compare: (&str, Option<f64>),
    target: &str,
    report: &mut Report,
) -> f64 {
    let old_ski = certs::ca_ski(&env.op_secrets().get("signing-key").await.unwrap());
    let old_bundle = env.ca_bundle().await;
    let started = Instant::now();
    let patch =
        json!({ "metadata": { "annotations": { "service-ca.operators.openshift.io/force-rotation": "bench" } } });
    env.op_secrets().patch("signing-key", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let new_ski = eventually(Duration::from_secs(30), "the rotation", || async {
        let ski = certs::ca_ski(&env.op_secrets().get("signing-key").await.unwrap());
        (ski != old_ski).then_some(ski)
    })
    .await;
    // The Secret is written before the bundle ConfigMap: wait for the new bundle itself.
    let new_bundle = eventually(Duration::from_secs(30), "the new bundle", || async {
        let bundle = env.ca_bundle().await;
        (bundle != old_bundle).then_some(bundle)
    })
    .await;
    let mut injected_at = None;
    let mut reissued_at = None;
    while injected_at.is_none() || reissued_at.is_none() {
        if injected_at.is_none() {
            let cms = env
                .configmaps()
                .list(&ListParams::default().labels(&format!("{}={}", support::RUN_LABEL, env.run)))
                .await
                .unwrap();
            if cms
                .items
                .iter()
                .filter(|c| c.data.as_ref().and_then(|d| d.get("service-ca.crt")) == Some(&new_bundle))
                .count()
                == n4
            {
                injected_at = Some(started.elapsed());
            }
        }
        if reissued_at.is_none() && count_issued_by(env, &new_ski).await == n_secrets {
            reissued_at = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(started.elapsed() < Duration::from_secs(900), "rotation did not finish");
    }
    let (reissued, reinjected) = (reissued_at.unwrap(), injected_at.unwrap());
    let reissue_rate = n_secrets as f64 / reissued.as_secs_f64();
    let invalid = invalid_secrets(env, &new_bundle, |_| true).await;
    println!("\n{label} rotation (forced, {n_secrets} serving Secrets, {n4} injected ConfigMaps)");
    report.row(&format!("{label} every bundle re-injected after"), format!("{:.1} s", reinjected.as_secs_f64()), "");
    report.row(
        &format!("{label} every leaf re-issued after"),
        format!("{:.1} s ({invalid} invalid against the new bundle)", reissued.as_secs_f64()),
        "",
    );
    let (compare_what, compare_rate) = compare;
    report.row(&format!("{label} re-issue rate vs. {compare_what}"), times(reissue_rate, compare_rate), target);
    report.json.insert(
        label.to_lowercase().replace('-', "_"),
        json!({ "secrets": n_secrets, "configmaps": n4, "reissued_seconds": reissued.as_secs_f64(),
                "reinjected_seconds": reinjected.as_secs_f64(), "reissue_rate": reissue_rate, "invalid": invalid,
                "compared_with": compare_what, "compared_rate": compare_rate }),
    );
    reissue_rate
}
