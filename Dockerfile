# syntax=docker/dockerfile:1
#
# One image for the three binaries: orchd (the default command), orch-worker
# and orchctl.
#
#   docker build -t orchestrator:0.1.0 .
#   docker run --rm orchestrator:0.1.0 orchctl --help
#
# No system protoc is needed: build.rs compiles proto/ with protox.
# See docs/deployment.md for compose and Kubernetes.

# The workspace's rust-version (MSRV). scripts/check-deploy.sh fails when a
# dependency in Cargo.lock needs a newer compiler than this.
ARG RUST_VERSION=1.88

# ---------------------------------------------------------------- toolchain
# Builder and runtime are both Debian 12 (bookworm): the binaries link
# against the builder's glibc, so the two must not drift apart.
FROM rust:${RUST_VERSION}-bookworm AS chef
# cargo-chef turns the manifests and Cargo.lock into a "recipe" so that the
# dependencies build in a layer of their own, reused until Cargo.lock or a
# Cargo.toml changes. Pinned, and --locked, so its own build is reproducible.
RUN cargo install cargo-chef --locked --version 0.1.78 \
    && rm -rf "$CARGO_HOME/registry"
WORKDIR /src

# ------------------------------------------------------------------ planner
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# ------------------------------------------------------------------ builder
FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# Dependencies only: the workspace's own crates are stubs at this point. The
# registry cache mount keeps downloaded crates across builds even when this
# layer is invalidated by a Cargo.lock change. Both steps select the same
# packages (the root package is a library, so a bare `--bin orchd` finds
# nothing): cargo unifies features over what it builds, and a different
# selection would rebuild the dependencies in the second step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    cargo chef cook --release --locked --recipe-path recipe.json \
        -p orchestrator-server -p orchestrator-worker -p orchestrator-cli
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    cargo build --release --locked \
        -p orchestrator-server -p orchestrator-worker -p orchestrator-cli \
    && install -D -m 0755 -t /out \
        target/release/orchd target/release/orch-worker target/release/orchctl

# ------------------------------------------------------------------ runtime
FROM debian:bookworm-slim AS runtime
# ca-certificates: for rediss:// and amqps:// URLs. tini as PID 1 forwards
# SIGTERM to the binary (which drains on it) and reaps orphans, e.g. the
# children of processes run by the worker's `exec` handler.
# Versions are not pinned (DL3008): bookworm's security updates replace
# them, and a pin would break the build on the next point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*
# A fixed, unprivileged UID/GID: Kubernetes' runAsUser/fsGroup and any host
# volume permissions can rely on 10001.
RUN groupadd --gid 10001 orch \
    && useradd --uid 10001 --gid orch --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin orch
COPY --from=builder /out/ /usr/local/bin/
USER 10001:10001
# Nothing is written at run time; /tmp is only for the `exec` handler's jobs
# (mount a tmpfs/emptyDir there with a read-only root filesystem).
WORKDIR /tmp
# REST and gRPC of orchd (orch-worker and orchctl listen on nothing).
EXPOSE 8000 50051
# No HEALTHCHECK here: it would apply to orch-worker too, which serves no
# port. docker-compose.yml and the Kubernetes probes check orchd instead.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["orchd", "serve"]

LABEL org.opencontainers.image.title="orchestrator" \
      org.opencontainers.image.description="orchd, orch-worker and orchctl: a distributed job orchestrator" \
      org.opencontainers.image.licenses="Apache-2.0"
