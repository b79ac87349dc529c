#!/usr/bin/env bash
# Run the LiveKit-SDK conformance tests inside a fresh network namespace that holds only
# `lo` and one veth address (libwebrtc would otherwise also gather candidates on eth0). Needs root.
#   tests/python/run.sh [pytest args...]        e.g. tests/python/run.sh -k four_party -x
# Env: MOSELLE_BIN (server binary, default target/debug/moselle), PYTHON_VENV (default .venv).
# Exit code: pytest's.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${PYTHON_VENV:-$repo/.venv}"
pytest_bin="$venv/bin/pytest"
if [[ ! -x "$pytest_bin" ]]; then
    echo "run.sh: $pytest_bin not found; create it with:" >&2
    echo "  python3 -m venv $venv && $venv/bin/pip install -r $here/requirements.txt" >&2
    exit 2
fi
export MOSELLE_BIN="${MOSELLE_BIN:-$repo/target/debug/moselle}"
export PYTHONDONTWRITEBYTECODE=1

ns="moselle-t-$$-$RANDOM"
cleanup() {
    # end whatever is still running inside our namespace (only processes we started there)
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
# libwebrtc ignores loopback interfaces: give the namespace one ordinary
# address (RFC 2544 benchmarking range) on a veth pair that leads nowhere.
# Traffic to it is delivered inside the namespace.
ip netns exec "$ns" ip link add mt0 type veth peer name mt1
ip netns exec "$ns" ip addr add 198.18.0.1/32 dev mt0
ip netns exec "$ns" ip link set mt0 up
ip netns exec "$ns" ip link set mt1 up
export MOSELLE_TEST_IP=198.18.0.1

# Default to this directory unless a test path (file, dir or file::test) was given.
target=("$here")
for a in "$@"; do
    if [[ "$a" != -* && -e "${a%%::*}" ]] || [[ "$a" != -* && -e "$repo/${a%%::*}" ]]; then
        target=()
        break
    fi
done

set +e
(cd "$repo" && ip netns exec "$ns" "$pytest_bin" "${target[@]}" "$@")
rc=$?
set -e
exit "$rc"
