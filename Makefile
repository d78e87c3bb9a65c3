# The one task runner: CI calls the same targets people do.
CARGO ?= cargo
CONTROLPLANE_DIR ?= target/controlplane
# e2e tests mostly wait on the API server: run several at once (4: with 6, a machine
# that is slow at RSA keys reached a load of 12 on 2 cores and timing tests failed).
E2E_THREADS ?= 4

# The image the tests build and run (scripts/image.sh; buildah, no Docker engine).
IMAGE ?= localhost/service-ca-operator:dev

.PHONY: system-packages all build test test-slow lint unit e2e run controlplane controlplane-build helm image bench fuzz deny fmt

all: build

build:
	$(CARGO) build --release

## Everything CI checks: format, lints, dependency audit, unit + PKI tests, then the
## end-to-end tests against a real control plane started for this run (including the
## Helm chart with helm itself, and the image built here and run).
## Sets itself up: missing openssl, buildah and python3 with apt (kubectl must be there);
## cargo-deny, helm and the control plane built once and cached in
## ~/.cache/service-ca-operator.
test: system-packages lint deny controlplane-build helm image
	$(CARGO) build --tests --bins
	SERVICE_CA_TEST_IMAGE=$(IMAGE) scripts/with-controlplane.sh $(CARGO) test -- --test-threads $(E2E_THREADS)

system-packages:
	@scripts/system-packages.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	python3 scripts/import-cycles.py src
	python3 scripts/design-tree.py
	python3 scripts/sizes.py

## Unit and PKI tests only (no cluster).
unit:
	$(CARGO) test --lib --test pki

## End-to-end tests only.
e2e: controlplane-build helm image
	SERVICE_CA_TEST_IMAGE=$(IMAGE) scripts/with-controlplane.sh $(CARGO) test --test e2e -- --test-threads $(E2E_THREADS)

## The slow end-to-end tests (#[ignore = "slow: make test-slow"]): the kubelet refreshing a
## pod certificate at beginRefreshAt, which the API server puts 10 min or more after
## NotBefore (6 to 13 minutes). CI runs it after make test.
test-slow: system-packages controlplane-build
	$(CARGO) build --tests --bins
	scripts/with-controlplane.sh $(CARGO) test --test e2e -- --ignored --test-threads 2

deny:
	scripts/cargo-deny.sh

## Build (or fetch from the cache) helm, pinned (scripts/helm.sh).
helm:
	@scripts/helm.sh >/dev/null

## The container image, without a Docker engine (buildah; FROM scratch, the binary and its four glibc libraries).
image:
	scripts/image.sh $(IMAGE)

## Build (or fetch from the cache) the control-plane harness.
controlplane-build:
	@tests/controlplane/build.sh >/dev/null

## Run the local control plane in the foreground (kubeconfig in $(CONTROLPLANE_DIR)/kubeconfig).
controlplane: controlplane-build
	exec $$(tests/controlplane/build.sh) run --data-dir $(CONTROLPLANE_DIR)

## Run the operator. Without KUBECONFIG, against a local control plane started for it.
run:
	$(CARGO) build
	scripts/run.sh

## Scale benchmarks on a fresh local control plane (table + target/bench/results.json).
bench:
	scripts/bench.sh

## A longer bounded fuzzing run (make test runs 2,000 cases per target).
FUZZ_CASES ?= 100000
fuzz:
	FUZZ_CASES=$(FUZZ_CASES) $(CARGO) test --release --test fuzz -- --nocapture

fmt:
	$(CARGO) fmt --all
