# syntax=docker/dockerfile:1
# service-ca-operator image for people with Docker. The same layout as scripts/image.sh
# (`make image`, buildah, no Docker engine), which the tests build and run: FROM
# scratch, one file /service-ca-operator (statically linked), user 65532:65532, no
# shell, entrypoint the binary, default command `run`.

# Build stage: a static binary (glibc, -C target-feature=+crt-static), so the runtime
# image needs no libc. The operator reaches the API server by IP (in-cluster config) and
# trusts the in-cluster CA, so it needs no resolver libraries and no CA certificates.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --target x86_64-unknown-linux-gnu --bin service-ca-operator \
 && strip -o /service-ca-operator target/x86_64-unknown-linux-gnu/release/service-ca-operator

# Runtime stage: only the binary.
FROM scratch
COPY --from=build --chmod=0755 /service-ca-operator /service-ca-operator
USER 65532:65532
EXPOSE 8080 8443
ENTRYPOINT ["/service-ca-operator"]
CMD ["run"]
