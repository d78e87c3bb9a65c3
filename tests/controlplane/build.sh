#!/usr/bin/env bash
# Builds the control-plane harness (etcd + kube-apiserver + kube-controller-manager from
# the Kubernetes Go modules) once per distinct source, and prints the binary's path.
#
# The binary is cached outside the checkout, keyed by a hash of go.mod, go.sum and the
# harness sources, so a second build on the same machine is instant:
#   ${SERVICE_CA_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/service-ca-operator}/controlplane-<hash>/controlplane
#   build.sh --path   prints where the binary is (or would be) without building.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
key=$(cd "$here" && cat go.mod go.sum ./*.go | sha256sum | cut -c1-16)
cache=${SERVICE_CA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/service-ca-operator}
bin="$cache/controlplane-$key/controlplane"
if [ "${1:-}" = "--path" ]; then
  echo "$bin"
  exit 0
fi
if [ ! -x "$bin" ]; then
  command -v go >/dev/null || { echo "go is not installed: the test control plane is built from source with Go 1.26 (https://go.dev/dl)" >&2; exit 1; }
  version=$(awk '$1 == "k8s.io/kubernetes" { print $2 }' "$here/go.mod")
  echo "building the control-plane harness (k8s.io/kubernetes $version); a cold build takes 10-25 minutes on 2 cores" >&2
  mkdir -p "$(dirname "$bin")"
  start=$(date +%s)
  (cd "$here" && GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false go build -trimpath -o "$bin.tmp.$$" .)
  mv "$bin.tmp.$$" "$bin"
  echo "built $bin in $(( $(date +%s) - start ))s" >&2
fi
echo "$bin"
