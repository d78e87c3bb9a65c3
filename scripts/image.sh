#!/usr/bin/env bash
# Builds the operator's container image without a Docker engine, with buildah:
# FROM scratch, the release binary /service-ca-operator (dynamically linked) and the few
# glibc libraries it loads (ld.so, libc, libm, libgcc_s, at their paths), user
# 65532:65532, no shell. Dynamic, so that it can load a PKCS#11 module (--pkcs11-module):
# a static glibc binary cannot dlopen one. The Dockerfile builds the same layout for
# people with Docker.
#
#   scripts/image.sh [image-name]     default localhost/service-ca-operator:dev
#
# buildah runs rootless-free here: vfs storage (no overlay mounts needed) and chroot
# isolation (no runc), so it works inside an unprivileged VM or CI container as root.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
image=${1:-${SERVICE_CA_IMAGE:-localhost/service-ca-operator:dev}}
if ! command -v buildah >/dev/null; then
  echo "buildah is not installed: apt-get install -y buildah (Debian/Ubuntu; .ci/run does it), or build with the Dockerfile" >&2
  exit 1
fi
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
b() { buildah --storage-driver vfs "$@"; }

start=$(date +%s)
# The same build as `make build` (target/release), so the two share it.
cargo build --release --locked --bin service-ca-operator
built=$(date +%s)
# Symbols stripped (25 MB -> about half); the Dockerfile does the same.
mkdir -p target/image
bin=target/image/service-ca-operator
strip -o "$bin" target/release/service-ca-operator
# The libraries it loads, by the paths ldd gives (the loader, libc, libm, libgcc_s),
# copied with their contents (not symlinks) to the same paths in the image.
libs=$(ldd "$bin" | grep -o '/[^ ]*' | sort -u)
for lib in $libs; do
  case "$lib" in
    */ld-linux-x86-64.so.2|*/libc.so.6|*/libm.so.6|*/libgcc_s.so.1) ;;
    *) echo "$bin needs $lib, which the image does not ship" >&2; exit 1 ;;
  esac
done

ctr=$(b from scratch)
trap 'b rm "$ctr" >/dev/null 2>&1 || true' EXIT
b copy --chown 0:0 --chmod 0755 "$ctr" "$bin" /service-ca-operator >/dev/null
for lib in $libs; do
  b copy --chown 0:0 --chmod 0755 "$ctr" "$(readlink -f "$lib")" "$lib" >/dev/null
done
b config \
  --user 65532:65532 \
  --port 8080/tcp --port 8443/tcp \
  --entrypoint '["/service-ca-operator"]' \
  --cmd '["run"]' \
  --label org.opencontainers.image.title=service-ca-operator \
  --label org.opencontainers.image.version="$(awk -F'"' '/^version =/ { print $2; exit }' Cargo.toml)" \
  "$ctr"
old=$(b images --quiet --no-trunc "$image" 2>/dev/null | head -1 || true)
b commit --quiet --rm "$ctr" "$image" >/dev/null
trap - EXIT
# The previous build of this name is now untagged: drop it (vfs keeps full copies).
new=$(b images --quiet --no-trunc "$image" | head -1)
if [ -n "$old" ] && [ "$old" != "$new" ]; then b rmi "$old" >/dev/null 2>&1 || true; fi
size=$(b images --format '{{.Size}}' "$image" | head -1)
echo "built $image ($size) in $(( $(date +%s) - start ))s (cargo $(( built - start ))s, image $(( $(date +%s) - built ))s)" >&2
echo "$image"
