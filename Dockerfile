# syntax=docker/dockerfile:1
# The shop in one image: the native host and the four service components, run
# as a non-root user with deploy/app.container.toml as its manifest.
#
#   docker build -t shop-host .
#   docker compose up -d              Kafka, PostgreSQL, three hosts and a gateway
#   docker run --rm shop-host check   validate the manifest and compile the components
#
# The base images are pinned to a release (add `@sha256:...` to pin them to
# the byte). Both stages must stay on the same Debian release, since the host
# links the builder's glibc; the Rust release is the workspace's rust-version.

FROM rust:1.95.0-bookworm AS builder

# rdkafka (default features plus tokio and ssl, no `cmake-build`, so no cmake)
# builds librdkafka and its C++ wrapper from the bundled source with
# ./configure and make, and links the system zlib and OpenSSL it finds through
# pkg-config. The rust image has all of it; naming it makes a slimmer base
# fail here, not in a build script.
# Debian's versions are not pinned: the pinned base image fixes the release,
# and a security update within it is wanted.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ make pkg-config zlib1g-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*
RUN rustup target add wasm32-wasip2

WORKDIR /src
COPY . .

# The registry and target/ are cache mounts: a source change rebuilds only the
# crates it touches. Artifacts are copied out of target/ in the same step,
# since a cache mount is not part of the image.
# The components are the ones the image's manifest serves, as
# scripts/services.sh reads them (Rust crates only: no node here).
# hadolint ignore=SC2046,SC2086
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    scripts/services.sh --manifest deploy/app.container.toml builds >/tmp/builds \
    && if grep -v '^rust ' /tmp/builds; then echo "the image builds Rust components only" >&2; exit 1; fi \
    && crates="$(cut -d ' ' -f 2 /tmp/builds)" \
    && cargo build --release --locked --target wasm32-wasip2 $(printf -- '-p %s ' $crates) \
    && cargo build --release --locked -p host \
    && mkdir -p /out/components \
    && cp target/release/host /out/host \
    && for name in $crates; do \
        cp "target/wasm32-wasip2/release/$name.wasm" /out/components/; \
    done

FROM debian:12.12-slim AS runtime

# The host needs libc, libgcc_s and zlib, all in the slim image, and OpenSSL 3
# (libssl3) for Kafka over TLS; ca-certificates are the trust store librdkafka
# verifies a managed cluster's certificate against (`[kafka.properties]`,
# HOST_KAFKA_PROPERTIES). PostgreSQL is still reached without TLS.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 shop \
    && useradd --system --uid 10001 --gid shop --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin shop

WORKDIR /app
COPY --from=builder /out/host /usr/local/bin/host
COPY --from=builder /out/components/ /app/components/
COPY deploy/app.container.toml /app/app.toml
# The manifest's state_dir (instance slot files, the compile cache's seal key)
# and cache_dir (compiled components) are the only places the host writes;
# everything else in /app stays root's and read-only to it. 0700: the host
# refuses a cache directory others may write.
RUN install -d -o shop -g shop -m 0700 /app/var /app/var/state /app/var/component-cache

USER 10001:10001
ENV HOST_MANIFEST=/app/app.toml \
    RUST_LOG=info
# payment, order, email, analytics, gateway (the admin API stays on loopback
# unless HOST_ADMIN_BIND says otherwise).
EXPOSE 3001 3002 3003 3004 3005
# The host finishes in-flight events and commits their offsets on SIGTERM.
STOPSIGNAL SIGTERM
ENTRYPOINT ["host"]
CMD ["run"]
