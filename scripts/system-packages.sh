#!/usr/bin/env bash
# The system tools the build and tests use that no Rust or Go build provides: a C
# toolchain (cc, make, ar, strip and glibc's development files: ring and jemalloc are
# compiled from C, the image binary is stripped and ldd names its libraries), OpenSSL's
# command-line client (interoperability tests), buildah (the image is built and run
# without Docker), python3 (the lint scripts: import cycles, the design tree, file and function sizes) and kubectl (the shipping and GitOps
# tests drive the cluster with it, as people do), SoftHSM2 and OpenSC's pkcs11-tool (the
# tests of the CA key in a PKCS#11 token). Installs all but kubectl with apt
# when run as root; kubectl is not in Debian's own archive, so it must be present (the
# development machines and CI have it); otherwise says what to install.
set -euo pipefail
declare -A package=([cc]=build-essential [make]=build-essential [strip]=binutils [openssl]=openssl
  [buildah]=buildah [python3]=python3 [softhsm2-util]=softhsm2 [pkcs11-tool]=opensc)
tools=(cc make strip openssl buildah python3 softhsm2-util pkcs11-tool)
missing=()
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${package[$tool]}")
done
# glibc's development files (libc6-dev: C runtime objects and headers for ring's and jemalloc's C).
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || ! command -v apt-get >/dev/null || missing+=(libc6-dev)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing ${missing[*]} with apt" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null || true
fi
still=()
for tool in "${tools[@]}" kubectl; do command -v "$tool" >/dev/null 2>&1 || still+=("$tool"); done
if [ ${#still[@]} -gt 0 ]; then
  echo "make test needs ${still[*]}: install them (Debian: apt-get install ${still[*]}; kubectl: https://kubernetes.io/docs/tasks/tools/)" >&2
  exit 1
fi
