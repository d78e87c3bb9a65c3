#!/usr/bin/env bash
# Runs a command with a test control plane: uses the one named by
# SERVICE_CA_TEST_KUBECONFIG if set, otherwise starts a fresh one (in
# $CONTROLPLANE_DIR, default target/test-controlplane), exports
# SERVICE_CA_TEST_KUBECONFIG for the command, and stops it afterwards.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${SERVICE_CA_TEST_KUBECONFIG:-}" ]; then
  exec "$@"
fi
dir=${CONTROLPLANE_DIR:-$top/target/test-controlplane}
bin=$("$top/tests/controlplane/build.sh")
mkdir -p "$dir"
log="$dir/harness.out"
# CONTROLPLANE_ARGS: more harness flags (the bench passes --node=false).
# shellcheck disable=SC2086
"$bin" run --data-dir "$dir" --exit-with-parent ${CONTROLPLANE_ARGS:-} >"$log" 2>&1 &
harness=$!
cleanup() {
  kill -TERM "$harness" 2>/dev/null || true
  wait "$harness" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 600); do
  if grep -q '^READY' "$log" 2>/dev/null; then break; fi
  if ! kill -0 "$harness" 2>/dev/null; then
    echo "the control plane exited before it was ready:" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.5
done
grep -q '^READY' "$log" || { echo "the control plane was not ready after 5 minutes:" >&2; cat "$log" >&2; exit 1; }
grep '^READY' "$log" >&2
export SERVICE_CA_TEST_KUBECONFIG="$dir/kubeconfig"
"$@"
