#!/usr/bin/env bash
# Moselle and Janus VideoRoom side by side, same generator, same run:
#   loadtest/janus.sh [LOADTEST ARGS...]      e.g. --scenario meeting --sizes 8
# Janus ignores loopback interfaces, so both servers and the generator run
# in a network namespace of their own on a veth address (10.77.0.1). Needs
# root, Debian's janus and `cargo build --release --workspace` (or
# LOADTEST_BIN=<a loadtest binary>, with its `moselle` beside it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v janus >/dev/null || { echo "janus not installed (apt-get install -y janus)" >&2; exit 1; }
bin="${LOADTEST_BIN:-target/release/loadtest}"
[[ -x $bin ]] || { echo "$bin missing: cargo build --release --workspace" >&2; exit 1; }
ns="moselle-janus-$$"
ip netns add "$ns"
trap 'ip netns del "$ns" 2>/dev/null || true' EXIT
ip -n "$ns" link set lo up
ip -n "$ns" link add mlt0 type veth peer name mlt1
ip -n "$ns" link set mlt0 up
ip -n "$ns" link set mlt1 up
ip -n "$ns" addr add 10.77.0.1/32 dev mlt0
ip netns exec "$ns" "$bin" --ip 10.77.0.1 --janus-iface mlt0 --target moselle,janus "$@"
