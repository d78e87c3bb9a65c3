#!/usr/bin/env bash
# `make bench`: the scale benchmarks (benches/scale.rs) against a fresh local control
# plane of their own, with the release build of the operator.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
unset SERVICE_CA_TEST_KUBECONFIG
# The reference for the RSA key-generation figures (BENCH_ONLY=rsa): Go's crypto/rsa.
mkdir -p target/bench
(cd benches/gokeys && go build -o "$top/target/bench/gokeys" .)
export CONTROLPLANE_DIR="$top/target/bench-controlplane"
# No node: the bench makes its own Nodes and pods by hand (tests/support/pods.rs), and
# its figures stay comparable with runs before the node existed.
export CONTROLPLANE_ARGS="--node=false"
scripts/with-controlplane.sh cargo bench --bench scale "$@"
