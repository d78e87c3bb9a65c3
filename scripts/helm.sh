#!/usr/bin/env bash
# Prints the path of a helm binary of the pinned version, building it from helm's Go
# module the first time (about 1.5 minutes on 2 cores; module download adds a little).
#
# Cached outside the checkout, keyed by version, like the control-plane harness:
#   ${SERVICE_CA_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/service-ca-operator}/helm-<version>/helm
# A helm already on PATH is used only when it is exactly that version.
set -euo pipefail
version=v3.22.0
cache=${SERVICE_CA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/service-ca-operator}
dir="$cache/helm-$version"
if [ -x "$dir/helm" ]; then
  echo "$dir/helm"
  exit 0
fi
if command -v helm >/dev/null && helm version --template '{{.Version}}' 2>/dev/null | grep -qx "$version"; then
  command -v helm
  exit 0
fi
command -v go >/dev/null || { echo "go is not installed: helm $version is built from its Go module with Go 1.26 (https://go.dev/dl), or install helm $version on PATH" >&2; exit 1; }
echo "building helm $version from its Go module (about 1.5 minutes the first time)" >&2
start=$(date +%s)
tmp="$dir.tmp.$$"
mkdir -p "$tmp"
GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOBIN="$tmp" \
  go install -trimpath -ldflags "-X helm.sh/helm/v3/internal/version.version=$version" "helm.sh/helm/v3/cmd/helm@$version"
rm -rf "$dir"
mv "$tmp" "$dir"
echo "built $dir/helm in $(( $(date +%s) - start ))s" >&2
echo "$dir/helm"
