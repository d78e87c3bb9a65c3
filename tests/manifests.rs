//! Shipping artefacts checked without a cluster: the Dockerfile's shape (no Docker
//! engine here; the same layout is built with buildah and run by tests/e2e/shipping/image.rs), and the manifests' least-privilege and hardening rules.
//! That the manifests apply and grant exactly what the code uses is proven on the real
//! API server in tests/e2e/shipping/manifests.rs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use serde_json::Value;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Value {
    serde_saphyr::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn dockerfile_is_multi_stage_minimal_non_root_with_the_binary_as_entrypoint() {
    let text = read("Dockerfile");
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    assert!(froms[0].contains(" AS build"), "{froms:?}");
    let runtime = froms.last().unwrap();
    assert!(runtime.contains("distroless/static") || runtime.contains("scratch"), "minimal runtime image: {runtime}");
    // Dynamically linked (a static glibc binary cannot load a PKCS#11 module), built like
    // scripts/image.sh, with the libraries ldd names copied into the runtime stage.
    assert!(text.contains("cargo build --release --locked --bin service-ca-operator"), "built like scripts/image.sh");
    assert!(!text.contains("crt-static"), "not static: --pkcs11-module must load");
    assert!(text.contains("ldd /service-ca-operator") && text.contains("cp -L"), "the libraries it loads, copied");
    assert!(text.contains("--locked"), "reproducible: Cargo.lock honoured");
    let last_stage = &text[text.rfind("\nFROM ").unwrap()..];
    assert!(last_stage.contains("COPY --from=build --chmod=0755 /service-ca-operator /service-ca-operator"));
    assert!(last_stage.contains("COPY --from=build /rootfs/ /"), "the libraries, and nothing else from the build");
    let user = last_stage.lines().find(|l| l.starts_with("USER ")).expect("USER in the runtime stage");
    let uid = user.trim_start_matches("USER ").split(':').next().unwrap();
    assert!(
        uid != "0" && uid != "root" && uid.parse::<u32>().is_ok_and(|u| u >= 1000),
        "non-root numeric user: {user}"
    );
    assert!(last_stage.contains(r#"ENTRYPOINT ["/service-ca-operator"]"#));
    assert!(read(".dockerignore").lines().any(|l| l.trim() == "target/"));
}

/// (file, apiGroups, resources, verbs) of one RBAC rule.
type Rule = (String, Vec<String>, Vec<String>, Vec<String>);

/// Every RBAC rule of the manifests.
fn rbac_rules() -> Vec<Rule> {
    let strings =
        |v: &Value| -> Vec<String> { v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect() };
    let mut out = Vec::new();
    for file in ["manifests/clusterrole.yaml", "manifests/role.yaml"] {
        for rule in yaml(file)["rules"].as_array().unwrap() {
            out.push((
                file.to_string(),
                strings(&rule["apiGroups"]),
                strings(&rule["resources"]),
                strings(&rule["verbs"]),
            ));
        }
    }
    out
}

#[test]
fn rbac_has_no_wildcards_and_every_rule_says_why() {
    for (file, groups, resources, verbs) in rbac_rules() {
        for item in groups.iter().chain(&resources).chain(&verbs) {
            assert!(!item.contains('*'), "{file}: wildcard in {groups:?} {resources:?} {verbs:?}");
        }
        // The only deletes, of the operator's own objects: member Leases in its own
        // namespace (a replica that stops removes its own; expired ones are cleared),
        // and a serving Secret a user made immutable (re-created when its certificate
        // must change; guarded by UID and resourceVersion).
        let may_delete =
            (file == "manifests/role.yaml" && groups == ["coordination.k8s.io"] && resources == ["leases"])
                || (file == "manifests/clusterrole.yaml" && groups == [""] && resources == ["secrets"]);
        assert!(
            !verbs.iter().any(|v| (v == "delete" && !may_delete)
                || v == "deletecollection"
                || v == "escalate"
                || v == "bind"
                || v == "impersonate"),
            "{file}: {verbs:?}"
        );
    }
    for file in ["manifests/clusterrole.yaml", "manifests/role.yaml"] {
        let text = read(file);
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim_start().starts_with("- apiGroups:") {
                let comment: Vec<&str> =
                    lines[..i].iter().rev().take_while(|l| l.trim_start().starts_with('#')).copied().collect();
                assert!(
                    comment.iter().any(|c| c.contains("why:")),
                    "{file}:{}: rule without a `# why:` comment",
                    i + 1
                );
            }
        }
    }
    // Secrets: exactly what the code needs (delete only for an immutable one of ours).
    let secrets = rbac_rules().into_iter().find(|(_, _, r, _)| r.contains(&"secrets".to_string())).unwrap();
    assert_eq!(secrets.3, ["get", "list", "watch", "create", "update", "delete"]);
}

#[test]
fn deployment_is_hardened_probed_and_bounded() {
    let d = yaml("manifests/deployment.yaml");
    assert_eq!(d["spec"]["replicas"], 2);
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(pod["serviceAccountName"], "service-ca-operator");
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    for kind in ["requests", "limits"] {
        assert!(c["resources"][kind]["memory"].is_string() && c["resources"][kind]["cpu"].is_string(), "{kind}");
    }
}

#[test]
fn kustomization_lists_every_manifest() {
    let k = yaml("manifests/kustomization.yaml");
    let listed: Vec<&str> = k["resources"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let mut files: Vec<String> = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .collect();
    files.sort();
    let mut listed_sorted: Vec<String> = listed.iter().map(|s| s.to_string()).collect();
    listed_sorted.sort();
    assert_eq!(listed_sorted, files);
}

#[test]
fn chart_values_have_the_binary_defaults() {
    use clap::Parser;
    use service_ca_operator::config::{Cli, Mode};
    let Mode::Run(c) = Cli::try_parse_from(["service-ca-operator"]).unwrap().into_mode() else { panic!("run") };
    let v = yaml("charts/service-ca-operator/values.yaml");
    let o = &v["operator"];
    let duration = |key: &str| humantime::parse_duration(o[key].as_str().unwrap()).unwrap();
    assert_eq!(duration("caLifetime"), c.ca_lifetime);
    assert_eq!(duration("caRotateBefore"), c.policy.ca_rotate_before);
    assert_eq!(duration("certLifetime"), c.policy.cert_lifetime);
    assert_eq!(duration("leaseDuration"), c.lease_duration);
    assert!(o["certRefreshBefore"].is_null() && c.policy.cert_refresh_before.is_none());
    assert!(o["leaseIdentity"].is_null() && c.lease_identity.is_none());
    assert!(o["maxConcurrentIssuance"].is_null() && c.max_concurrent_issuance.is_none());
    assert_eq!(o["clusterDomain"], c.cluster_domain.as_str());
    assert_eq!(o["leaderElect"], c.leader_elect);
    assert_eq!(o["shareIssuance"], c.share_issuance);
    assert_eq!(o["adminAddr"], c.admin_addr.to_string().as_str());
    assert_eq!(o["metricsAddr"], c.metrics_addr.to_string().as_str());
    assert_eq!(o["metricsSecure"], c.metrics_secure);
    assert_eq!(o["metricsMaxSecretSeries"], c.metrics_max_secret_series as u64);
    assert_eq!(o["logLevel"], c.log_level.as_str());
    assert_eq!(o["selector"], c.selector.as_str());
    assert_eq!(o["namespaceBundles"], c.trust.namespace_bundles);
    assert_eq!(o["namespaceBundleSelector"], c.trust.namespace_bundle_selector.as_str());
    assert_eq!(o["keyBuffer"], c.key_buffer as u64);
    assert_eq!(o["controllerConcurrency"], c.controller_concurrency as u64);
    assert_eq!(duration("progressInterval"), c.progress_interval);
    assert_eq!(o["defaultKeyAlgorithm"].as_str().unwrap().parse(), Ok(c.default_key_algorithm));
    assert!(o["caKeyAlgorithm"].is_null() && c.ca_key_algorithm.is_none());
    assert!(o["caKeyPkcs11Uri"].is_null() && c.pkcs11.ca_key_pkcs11_uri.is_none());
    assert!(o["pkcs11Module"].is_null() && c.pkcs11.pkcs11_module.is_none());
    assert!(o["pkcs11PinSecret"].is_null() && c.pkcs11.pkcs11_pin_file.is_none());
    assert!(
        o["pkcs11OnReset"].is_null() && c.pkcs11.pkcs11_on_reset == service_ca_operator::pki::pkcs11::OnReset::Keep
    );
    assert!(o["allowedKeyAlgorithms"].is_null() && c.allowed_key_algorithms.is_empty());
    assert_eq!(o["podCertificates"], c.pod_certificates);
    assert_eq!(o["podSignerName"], c.pod_signer_name.as_str());
    assert_eq!(duration("podCertificateMaxLifetime"), c.pod_certificate_max_lifetime);
    assert_eq!(duration("podCertificateGrace"), c.pod_certificate_grace);
    assert_eq!(o["podCertificateRefreshAt"].as_f64(), Some(c.pod_timing.pod_certificate_refresh_at));
    assert_eq!(duration("podCertificateBackdate"), c.pod_timing.pod_certificate_backdate);
    // The one deliberate difference: JSON logs in a cluster (the binary prints plain
    // text for people at a terminal).
    assert_eq!(o["logFormat"], "json");
    // Every flag of `run` is a value (by its environment variable in the template).
    let template = read("charts/service-ca-operator/templates/deployment.yaml");
    let help = <Cli as clap::CommandFactory>::command();
    let run = help.find_subcommand("run").unwrap();
    for arg in run.get_arguments() {
        let Some(env) = arg.get_env() else { continue };
        let env = env.to_string_lossy();
        assert!(template.contains(&*env), "{env} (--{}) is not a chart value", arg.get_id());
    }
}
