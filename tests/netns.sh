#!/usr/bin/env bash
# Run a command inside a fresh network namespace holding `lo` and one
# ordinary address, 198.18.0.1 (RFC 2544 benchmarking range) on a veth pair
# that leads nowhere: traffic to it is delivered inside the namespace.
# WebRTC stacks (libwebrtc, Chromium) ignore loopback interfaces, so they
# need that address. Exports MOSELLE_TEST_IP. Needs root. Exit code: the
# command's.
set -euo pipefail

ns="moselle-t-$$-$RANDOM"
cleanup() {
    local pids
    pids="$(ip netns pids "$ns" 2>/dev/null || true)"
    if [[ -n "$pids" ]]; then
        kill $pids 2>/dev/null || true
        sleep 1
        pids="$(ip netns pids "$ns" 2>/dev/null || true)"
        [[ -n "$pids" ]] && kill -9 $pids 2>/dev/null || true
    fi
    ip netns del "$ns" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ip netns add "$ns"
ip netns exec "$ns" ip link set lo up
ip netns exec "$ns" ip link add mt0 type veth peer name mt1
ip netns exec "$ns" ip addr add 198.18.0.1/32 dev mt0
ip netns exec "$ns" ip link set mt0 up
ip netns exec "$ns" ip link set mt1 up
export MOSELLE_TEST_IP=198.18.0.1

set +e
ip netns exec "$ns" "$@"
rc=$?
set -e
exit "$rc"
