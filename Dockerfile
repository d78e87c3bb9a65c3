# syntax=docker/dockerfile:1
# service-ca-operator image for people with Docker. The same layout as scripts/image.sh
# (`make image`, buildah, no Docker engine), which the tests build and run: FROM
# scratch, the binary /service-ca-operator and the glibc libraries it loads, user
# 65532:65532, no shell, entrypoint the binary, default command `run`.

# Build stage: a dynamically linked binary, so that it can load a PKCS#11 module
# (--pkcs11-module; a static glibc binary cannot dlopen one), and the few libraries it
# needs (ld.so, libc, libm, libgcc_s) under /rootfs at the paths ldd gives. The operator
# reaches the API server by IP (in-cluster config) and trusts the in-cluster CA, so it
# needs no resolver libraries and no CA certificates.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin service-ca-operator \
 && strip -o /service-ca-operator target/release/service-ca-operator \
 && for lib in $(ldd /service-ca-operator | grep -o '/[^ ]*' | sort -u); do \
      mkdir -p "/rootfs$(dirname "$lib")" && cp -L "$lib" "/rootfs$lib"; \
    done

# Runtime stage: the libraries and the binary.
FROM scratch
COPY --from=build /rootfs/ /
COPY --from=build --chmod=0755 /service-ca-operator /service-ca-operator
USER 65532:65532
EXPOSE 8080 8443
ENTRYPOINT ["/service-ca-operator"]
CMD ["run"]
