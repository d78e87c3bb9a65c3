#!/usr/bin/env bash
# `make run`: runs the operator (no leader election). With KUBECONFIG set, against that
# cluster; otherwise starts the local control plane first and tells how to reach it.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
op="$top/target/debug/service-ca-operator"
namespace=${SERVICE_CA_NAMESPACE:-openshift-service-ca}
if [ -n "${KUBECONFIG:-}" ]; then
  exec "$op" run --leader-elect=false "$@"
fi
dir=${CONTROLPLANE_DIR:-$top/target/controlplane}
bin=$("$top/tests/controlplane/build.sh")
mkdir -p "$dir"
"$bin" run --data-dir "$dir" --exit-with-parent >"$dir/harness.out" 2>&1 &
harness=$!
trap 'kill -TERM $harness 2>/dev/null; wait $harness 2>/dev/null' EXIT
for _ in $(seq 1 600); do
  grep -q '^READY' "$dir/harness.out" 2>/dev/null && break
  kill -0 "$harness" 2>/dev/null || { cat "$dir/harness.out" >&2; exit 1; }
  sleep 0.5
done
export KUBECONFIG="$dir/kubeconfig"
kubectl_hint="export KUBECONFIG=$KUBECONFIG"
echo "local control plane ready; in another shell:  $kubectl_hint" >&2
# The operator's namespace must exist (the manifests create it in a real cluster).
"$op" --version >/dev/null
if command -v kubectl >/dev/null; then
  kubectl get namespace "$namespace" >/dev/null 2>&1 || kubectl create namespace "$namespace" >/dev/null
fi
"$op" run --leader-elect=false --admin-addr "${SERVICE_CA_ADMIN_ADDR:-127.0.0.1:8080}" "$@"
