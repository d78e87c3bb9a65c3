//! End-to-end tests on the real control plane (tests/controlplane): real
//! kube-apiserver, etcd, kube-controller-manager, kube-scheduler and one hollow node
//! (the real kubelet over a fake container runtime), the real operator binary, real TLS
//! handshakes. Run them with `make test`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../support/mod.rs"]
mod support;

mod bad_input;
mod envelope;
mod hsm;
mod hsm_keys;
mod injection;
mod inspect;
mod kubelet;
mod kubelet_refresh;
mod metrics;
mod perf;
mod pod_certs;
mod replicas;
mod rotation;
mod serving;
mod shipping;
mod trust;
