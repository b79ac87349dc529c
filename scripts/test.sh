#!/usr/bin/env bash
# Run every test of the project on a fresh machine of this kind: installs what
# the tests need (idempotently), then lint, unit and integration tests, and the
# conformance tests with real LiveKit clients in a network namespace.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$(pwd)

step() { printf '\n=== %s (%s)\n' "$*" "$(date +%T)"; }

# --- system packages -------------------------------------------------------
need_apt=()
command -v ip >/dev/null || need_apt+=(iproute2)
command -v curl >/dev/null || need_apt+=(curl)
command -v openssl >/dev/null || need_apt+=(openssl)
command -v nft >/dev/null || need_apt+=(nftables)
[[ -x /usr/bin/chromium ]] || need_apt+=(chromium)
command -v redis-server >/dev/null || need_apt+=(redis-server)
# The network lab's HTTP proxy and TURN server (tests/netlab.sh).
command -v tinyproxy >/dev/null || need_apt+=(tinyproxy)
command -v turnserver >/dev/null || need_apt+=(coturn)
# The load generator encodes real Opus with the system libopus.
[[ -f /usr/include/opus/opus.h ]] || need_apt+=(libopus-dev)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
# The Debian package test traces the installed server (tests/package/run.sh).
command -v strace >/dev/null || need_apt+=(strace)
# The peer SFU the load generator measures side by side (loadtest/janus.sh).
command -v janus >/dev/null || need_apt+=(janus)
if ((${#need_apt[@]})); then
    step "apt-get install ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}"
fi

# --- Python venv for the real LiveKit SDK ----------------------------------
venv="$root/.venv"
req="$root/tests/python/requirements.txt"
stamp="$venv/.requirements.sha256"
if [[ ! -x "$venv/bin/python" ]]; then
    step "python venv"
    python3 -m venv "$venv"
fi
if [[ ! -f "$stamp" ]] || ! sha256sum --status -c "$stamp" 2>/dev/null; then
    step "pip install -r tests/python/requirements.txt"
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
    sha256sum "$req" > "$stamp"
fi

# --- npm: livekit-client for the call page, playwright-core for the tests --
if [[ ! -d web/node_modules/livekit-client ]] || [[ web/package-lock.json -nt web/node_modules/.package-lock.json ]]; then
    step "npm ci --prefix web"
    npm ci --prefix web --no-audit --no-fund
fi

# --- Rust ----------------------------------------------------------------------
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
# No separate `cargo build`: the tests build every binary the later steps
# run, and clippy --all-targets has already checked the benches compile.
step "cargo test"
cargo test --workspace

# libFuzzer on every parser and the engine's datagram entry, a few seconds
# each from the seeds (scripts/fuzz.sh SECONDS runs them for longer).
step "fuzz: each target for 3 s (scripts/fuzz.sh --dev 3)"
scripts/fuzz.sh --dev 3

# The generator's Janus VideoRoom client against the real Janus, beside
# Moselle (seconds, small sizes: it checks media flows, it is no benchmark).
step "load generator: Moselle and Janus side by side (loadtest/janus.sh --smoke)"
LOADTEST_BIN="$root/target/debug/loadtest" loadtest/janus.sh --smoke --quiet \
    --scenario meeting --scenario livestream --out "$root/target/janus-smoke"
loadtest/check-side-by-side.py "$root/target/janus-smoke/report.json"

# --- Real clients ----------------------------------------------------------
step "conformance: LiveKit Python SDK"
MOSELLE_BIN="$root/target/debug/moselle" tests/python/run.sh -q

step "Debian package: cargo-deb, dpkg -i, a call through the installed node, purge"
tests/package/run.sh

step "browser: livekit-client in headless Chromium"
MOSELLE_BIN="$root/target/debug/moselle" tests/netns.sh node --test tests/browser/

step "Element Call: the real app in Chromium, Synapse with MatrixRTC, end-to-end encrypted calls"
MOSELLE_BIN="$root/target/debug/moselle" tests/element-call/run.sh

# Client, server and proxy in separate namespaces, nftables on the client.
step "connectivity: LiveKit Python SDK with UDP blocked (network lab)"
MOSELLE_BIN="$root/target/debug/moselle" PYTHONDONTWRITEBYTECODE=1 \
    tests/netlab.sh "$venv/bin/pytest" tests/connectivity -q

# One file at a time: they share the client namespace's firewall and the lab's fixed ports.
step "connectivity: Chromium with UDP blocked, and through an HTTP proxy with TURN over TLS (network lab)"
MOSELLE_BIN="$root/target/debug/moselle" tests/netlab.sh node --test --test-concurrency=1 tests/browser-lab/

echo
echo "all tests passed ($(date +%T))"
