use super::*;

fn parse(args: &[&str]) -> Config {
    match Cli::try_parse_from(args).unwrap().into_mode() {
        Mode::Run(config) => *config,
        Mode::Inspect(_) => panic!("not a run command line: {args:?}"),
    }
}

#[test]
fn inspect_subcommand_parses_kubectl_style_flags() {
    let Mode::Inspect(a) =
        Cli::try_parse_from(["x", "inspect", "-n", "shop", "-l", "app=web", "-o", "json"]).unwrap().into_mode()
    else {
        panic!("inspect expected")
    };
    assert_eq!((a.namespace.as_deref(), a.selector.as_str()), (Some("shop"), "app=web"));
    assert_eq!(a.output, Output::Json);
    assert!(!a.restart && !a.yes);
    assert!(Cli::try_parse_from(["x", "inspect", "-n", "a", "-A"]).is_err(), "-n and -A conflict");
    assert!(Cli::try_parse_from(["x", "inspect", "--yes"]).is_err(), "--yes needs --restart");
}

#[test]
fn defaults_match_the_original_system() {
    let c = parse(&["service-ca-operator"]);
    assert_eq!(c.namespace, "openshift-service-ca");
    assert_eq!(c.ca_lifetime, Duration::from_secs(790 * 86_400));
    assert_eq!(c.policy.ca_rotate_before, Duration::from_secs(395 * 86_400));
    assert_eq!(c.policy.cert_lifetime, Duration::from_secs(730 * 86_400));
    assert_eq!(c.cert_refresh_before(), Duration::from_secs(730 * 86_400 / 3));
    assert_eq!(c.cluster_domain, "cluster.local");
    assert!(c.leader_elect);
    assert!(c.pod_certificates);
    assert_eq!(c.pod_signer_name, "service-ca.operators.openshift.io/serving");
    assert_eq!(c.pod_certificate_max_lifetime, Duration::from_secs(86_400));
    assert!(c.allowed_key_algorithms.is_empty(), "all");
    assert!(c.validate().is_ok());
}

#[test]
fn run_subcommand_and_human_durations() {
    let c = parse(&["service-ca-operator", "run", "--cert-lifetime", "90s", "--leader-elect=false"]);
    assert_eq!(c.policy.cert_lifetime, Duration::from_secs(90));
    assert_eq!(c.cert_refresh_before(), Duration::from_secs(45));
    assert!(!c.leader_elect);
    let c = parse(&["service-ca-operator", "--ca-lifetime", "30d", "--ca-rotate-before", "12h 30m"]);
    assert_eq!(c.ca_lifetime, Duration::from_secs(30 * 86_400));
    assert_eq!(c.policy.ca_rotate_before, Duration::from_secs(45_000));
}

#[test]
fn impossible_combinations_are_refused() {
    let c = parse(&["x", "--ca-lifetime", "1h", "--ca-rotate-before", "2h"]);
    assert!(c.validate().unwrap_err().contains("--ca-rotate-before"));
    let c = parse(&["x", "--cert-lifetime", "1h", "--cert-refresh-before", "1h"]);
    assert!(c.validate().unwrap_err().contains("--cert-refresh-before"));
    let c = parse(&["x", "--ca-lifetime", "10000y"]);
    assert!(c.validate().unwrap_err().contains("and 100 years"), "would overflow the certificate dates");
}

#[test]
fn every_duration_flag_is_refused_outside_its_bounds_naming_flag_value_and_range() {
    for (flag, too_short, too_long, range) in [
        ("--ca-lifetime", Some("59s"), "101y", "between 1m and 100 years"),
        ("--ca-rotate-before", Some("0s"), "101y", "between 1s and 100 years"),
        ("--cert-lifetime", Some("59s"), "101y", "between 1m and 100 years"),
        ("--cert-refresh-before", Some("0s"), "101y", "between 1s and 100 years"),
        ("--lease-duration", Some("2s"), "61m", "between 3s and 1h"),
        ("--progress-interval", Some("0s"), "25h", "between 1s and 1d"),
        ("--pod-certificate-max-lifetime", Some("59m"), "92d", "between 1h and 91d"),
        ("--pod-certificate-grace", None, "10000y", "between 0s and 1d"),
    ] {
        for value in too_short.into_iter().chain([too_long]) {
            let error = parse(&["x", flag, value]).validate().unwrap_err();
            assert!(error.starts_with(&format!("{flag} (")), "{flag} {value}: {error}");
            assert!(error.contains(range), "{flag} {value}: {error}");
        }
    }
    // The ends of each range are accepted (with the flags they must stay below).
    for args in [
        &["x", "--ca-lifetime", "1m", "--ca-rotate-before", "1s"][..],
        &["x", "--ca-lifetime", "100y", "--ca-rotate-before", "99y"],
        &["x", "--cert-lifetime", "1m", "--cert-refresh-before", "1s"],
        &["x", "--cert-lifetime", "100y", "--cert-refresh-before", "99y"],
        &["x", "--lease-duration", "3s", "--progress-interval", "1s", "--pod-certificate-grace", "0s"],
        &["x", "--lease-duration", "1h", "--progress-interval", "1d", "--pod-certificate-grace", "1d"],
        &["x", "--pod-certificate-max-lifetime", "1h"],
        &["x", "--pod-certificate-max-lifetime", "91d"],
    ] {
        assert_eq!(parse(args).validate(), Ok(()), "{args:?}");
    }
}

#[test]
fn flags_that_can_only_misbehave_are_refused_naming_the_flag() {
    for (args, flag) in [
        (&["x", "--controller-concurrency", "0"][..], "--controller-concurrency"),
        (&["x", "--max-concurrent-issuance", "0"], "--max-concurrent-issuance"),
        (&["x", "--key-buffer", "18446744073709551615"], "--key-buffer"),
        (&["x", "--key-buffer-idle", "1025"], "--key-buffer-idle"),
        (&["x", "--cluster-domain", ""], "--cluster-domain"),
        (&["x", "--cluster-domain", "bad_domain..x"], "--cluster-domain"),
        (&["x", "--cluster-domain=-x.local"], "--cluster-domain"),
    ] {
        let error = parse(args).validate().unwrap_err();
        assert!(error.contains(flag), "{args:?}: {error}");
    }
    assert!(parse(&["x", "--cluster-domain", "corp.example"]).validate().is_ok());
    for bad in ["serving", "kubernetes.io/x", "example.com/", "example.com/a/b", "Example.com/x"] {
        let error = parse(&["x", "--pod-signer-name", bad]).validate().unwrap_err();
        assert!(error.contains("--pod-signer-name"), "{bad}: {error}");
    }
    let error = parse(&["x", "--allowed-key-algorithms", "ecdsa,rsa-4096"]).validate().unwrap_err();
    assert!(error.contains("--allowed-key-algorithms (ecdsa-p256, rsa-4096)"), "{error}");
    assert!(parse(&["x", "--allowed-key-algorithms", "ecdsa, rsa"]).validate().is_ok());
    let c = parse(&["x", "--allowed-key-algorithms", "ECDSA-P384", "--default-key-algorithm", "ecdsa-p384"]);
    assert_eq!(c.allowed_key_algorithms, [KeyKind::EcdsaP384]);
    assert!(Cli::try_parse_from(["x", "--allowed-key-algorithms", "rsa,dsa"]).is_err(), "an unknown value");
    let error = parse(&["x", "--pod-certificate-max-lifetime", "30m"]).validate().unwrap_err();
    assert!(error.contains("--pod-certificate-max-lifetime"), "{error}");
}

#[test]
fn pod_certificate_timing_defaults_ranges_and_refusals() {
    let c = parse(&["x"]);
    assert_eq!(c.pod_timing.timing(), crate::pki::PodTiming { backdate: Duration::from_secs(1), refresh_at: 0.5 });
    assert_eq!(c.pod_timing.timing(), crate::pki::PodTiming::default(), "the flags' defaults are the PKI's");
    for args in [
        &["x", "--pod-certificate-refresh-at", "0", "--pod-certificate-backdate", "0s"][..],
        &["x", "--pod-certificate-refresh-at", "1", "--pod-certificate-backdate", "4m"],
        &["x", "--pod-certificate-refresh-at", "0.8", "--pod-certificate-backdate", "90s"],
    ] {
        assert_eq!(parse(args).validate(), Ok(()), "{args:?}");
    }
    let c = parse(&["x", "--pod-certificate-refresh-at", "0.25", "--pod-certificate-backdate", "2m"]);
    assert_eq!(c.pod_timing.timing(), crate::pki::PodTiming { backdate: Duration::from_secs(120), refresh_at: 0.25 });
    for (args, expected) in [
        (&["x", "--pod-certificate-refresh-at", "1.5"][..], "--pod-certificate-refresh-at (1.5) must be a fraction"),
        (&["x", "--pod-certificate-refresh-at=-0.1"], "--pod-certificate-refresh-at (-0.1)"),
        (&["x", "--pod-certificate-refresh-at", "NaN"], "--pod-certificate-refresh-at (NaN)"),
        (&["x", "--pod-certificate-backdate", "5m"], "--pod-certificate-backdate (5m) must be between 0s and 4m"),
    ] {
        let error = parse(args).validate().unwrap_err();
        assert!(error.starts_with(expected), "{args:?}: {error}");
    }
    assert!(Cli::try_parse_from(["x", "--pod-certificate-refresh-at", "half"]).is_err());
}
