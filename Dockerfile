# syntax=docker/dockerfile:1
# service-ca-operator image: a static binary on a distroless base, running as non-root.
# (Not built on the development machine, which has no Docker engine; see README.)

# Build stage: a fully static binary (musl), so the runtime image needs no libc.
FROM docker.io/library/rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --target x86_64-unknown-linux-musl --bin service-ca-operator \
 && cp target/x86_64-unknown-linux-musl/release/service-ca-operator /service-ca-operator

# Runtime stage: only the binary (plus CA certificates and /etc/passwd for nonroot).
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /service-ca-operator /service-ca-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/service-ca-operator"]
CMD ["run"]
