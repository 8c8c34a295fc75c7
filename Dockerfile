# syntax=docker/dockerfile:1
#
# The mycel agent's image: `docker build -t ghcr.io/mycel-mesh/mycel:0.1.0 .` from the
# workspace root. The image holds one binary, /usr/local/bin/mycel; the DaemonSet in
# manifests/ runs `mycel agent`.

# ---- build -------------------------------------------------------------------------------
# The workspace's minimum Rust (rust-version in Cargo.toml), on the Debian release whose
# LLVM packages match the nightly toolchain's LLVM.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .

# The same prerequisites development machines get, installed by the same code:
# `cargo xtask setup` adds the nightly toolchain with rust-src (it builds the kernel
# programs), LLVM's development files of nightly's LLVM version, and bpf-linker 0.13
# built against them. Running it here, rather than repeating its steps, keeps the image
# and the development machines from drifting apart.
#
# The one thing setup cannot do in a build container is mount the kernel filesystems
# (bpffs, cgroup v2): they belong to the host the image later runs on, and building does
# not need them. So a failing setup is accepted only when `setup --check` names nothing
# but those mounts as missing.
RUN set -eu; \
    if ! cargo xtask setup; then \
        cargo xtask setup --check > /tmp/setup-check.txt 2>&1 || true; \
        cat /tmp/setup-check.txt; \
        if grep 'missing:' /tmp/setup-check.txt | grep -v 'missing: mounting '; then \
            echo 'cargo xtask setup failed on more than the kernel filesystems' >&2; \
            exit 1; \
        fi; \
    fi

# agent/build.rs builds the kernel programs with the nightly toolchain and bpf-linker and
# embeds them in the binary.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mycel-agent --bin mycel \
    && install -D -m 0755 target/release/mycel /out/mycel

# ---- runtime -----------------------------------------------------------------------------
# glibc and libgcc for the binary, nothing else: no shell, no package manager. The agent
# reaches the API server with the service account's CA, so it needs no system CA bundle.
FROM gcr.io/distroless/cc-debian12
COPY --from=build /out/mycel /usr/local/bin/mycel
# Root, on purpose: loading eBPF programs and attaching them needs capabilities (CAP_BPF,
# CAP_NET_ADMIN, ...), and Kubernetes grants the capabilities a pod adds only to a
# process running as uid 0. The DaemonSet drops every other capability.
USER 0:0
ENTRYPOINT ["/usr/local/bin/mycel"]
CMD ["agent"]
