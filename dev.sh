#!/usr/bin/env bash
# weir's one entry point for a fresh Debian machine (run as root, or it re-runs itself with sudo):
#   ./dev.sh up     install what is missing, build, and run a one-node cluster (weir up)
#   ./dev.sh test   install what is missing, then fmt check, clippy -D warnings, all tests
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(id -u)" != 0 ]; then
    exec sudo -E env "PATH=$PATH" "$0" "$@"
fi

APT_PACKAGES=(
    build-essential pkg-config protobuf-compiler curl ca-certificates
    clang-22 llvm-22 llvm-22-dev libpolly-22-dev bpftool iproute2 iptables
    etcd-server etcd-client dnsutils
    python3 procps util-linux
    knot dnsperf nginx haproxy wrk nghttp2-client
)

# A fresh machine may still hold the apt lock (unattended upgrades) or drop a download.
APT_OPTS=(-o DPkg::Lock::Timeout=600 -o Acquire::Retries=5)

install_deps() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "dev.sh: installing ${missing[*]}"
        for try in 1 2 3; do
            apt-get "${APT_OPTS[@]}" update -qq && break
            [ "$try" = 3 ] && exit 1
            sleep 10
        done
        DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" install -y -qq "${missing[@]}" >/dev/null
    fi
    # Debian installs etcd-server with a system service; weir starts its own etcd in tests.
    systemctl disable --now etcd >/dev/null 2>&1 || true
    if ! command -v kubectl >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" install -y -qq kubernetes-client >/dev/null
    fi
    if ! command -v cargo >/dev/null; then
        echo "dev.sh: cargo not found; install Rust 1.95 with rustup first" >&2
        exit 1
    fi
    # The BPF programs build with -Z build-std=core (needs rust-src) and link with
    # bpf-linker built against the LLVM that rustc uses (22); its default wants LLVM 23.
    # rustfmt and clippy run in `test`; a minimal rustup profile has neither.
    local installed
    installed=$(rustup component list --installed 2>/dev/null || true)
    for c in rust-src rustfmt clippy; do
        grep -q "^$c" <<<"$installed" || rustup component add "$c"
    done
    if ! command -v bpf-linker >/dev/null; then
        PATH=/usr/lib/llvm-22/bin:$PATH CARGO_NET_RETRY=10 \
            cargo install --locked bpf-linker@0.13.0 --no-default-features --features llvm-22
    fi
}

case "${1:-}" in
    up)
        shift
        install_deps
        cargo build --release --bin weir
        # Pods run their `command` from the node's filesystem: examples run `weir echo`.
        install -m 0755 target/release/weir /usr/local/bin/weir
        exec /usr/local/bin/weir up "$@"
        ;;
    test)
        install_deps
        cargo fmt --all --check
        cargo clippy --workspace --all-targets -- -D warnings
        # The BPF programs are a crate of their own (outside the workspace, built for
        # bpfel-unknown-none by dataplane/lb's build script): check them the same way.
        (cd ebpf/lb-ebpf && RUSTC_BOOTSTRAP=1 cargo fmt --check &&
            RUSTC_BOOTSTRAP=1 cargo clippy --target bpfel-unknown-none -Z build-std=core \
                --release -- -D warnings)
        cargo test --workspace --no-fail-fast
        ;;
    *)
        echo "usage: $0 up [weir up flags] | test" >&2
        exit 2
        ;;
esac
