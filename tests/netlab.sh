#!/usr/bin/env bash
# A small network lab for connectivity tests ("UDP is blocked for this
# client"): three namespaces on one L2 segment, a bridge in a fourth (hub)
#
#     server 198.18.0.1/24 --+
#     client 198.18.0.2/24 --+-- bridge (hub namespace)
#     proxy  198.18.0.3/24 --+
#
# Each node namespace has `lo` up and one veth (lab0) into the bridge; IPv6
# is off so only the addresses above exist. The given command runs INSIDE
# the client namespace; start servers with
#     ip netns exec "$MOSELLE_NS_SERVER" ...   (and $MOSELLE_NS_PROXY)
# which works from there (same mount namespace, /run/netns is shared).
# The bridge ports in the hub are v-server, v-client, v-proxy: filter there
# (`ip netns exec "$MOSELLE_NS_HUB" nft ...`, family bridge) to drop packets
# silently on the path, as a network firewall does.
# Exports MOSELLE_NS_{SERVER,CLIENT,PROXY,HUB}, MOSELLE_{SERVER,CLIENT,PROXY}_IP
# and MOSELLE_TEST_IP (the client's address). On exit every process in the
# four namespaces is killed and the namespaces are deleted. Needs root.
# Exit code: the command's.
#   tests/netlab.sh COMMAND [ARGS...]
set -euo pipefail

if (($# == 0)); then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
fi

id="ml-$$-$RANDOM"
hub="$id-hub"
declare -A ns=([server]="$id-srv" [client]="$id-cli" [proxy]="$id-prx")
declare -A addr=([server]=198.18.0.1 [client]=198.18.0.2 [proxy]=198.18.0.3)
all_ns=("${ns[server]}" "${ns[client]}" "${ns[proxy]}" "$hub")

kill_in() { # signal, namespaces...
    local sig=$1 n pids
    shift
    for n in "$@"; do
        pids="$(ip netns pids "$n" 2>/dev/null || true)"
        [[ -n "$pids" ]] && kill "-$sig" $pids 2>/dev/null || true
    done
}
cleanup() {
    local n left=""
    kill_in TERM "${all_ns[@]}"
    for n in "${all_ns[@]}"; do left+="$(ip netns pids "$n" 2>/dev/null || true)"; done
    if [[ -n "$left" ]]; then
        sleep 1
        kill_in KILL "${all_ns[@]}"
    fi
    for n in "${all_ns[@]}"; do ip netns del "$n" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

quiet_ns() { # namespace: lo up, no IPv6 (no link-local noise, no ND)
    ip netns exec "$1" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    ip -n "$1" link set lo up
}

ip netns add "$hub"
quiet_ns "$hub"
ip -n "$hub" link add br0 type bridge
ip -n "$hub" link set br0 up
for role in server client proxy; do
    n="${ns[$role]}"
    ip netns add "$n"
    quiet_ns "$n"
    # One end stays in the hub (on the bridge), the other becomes lab0 in the node.
    ip -n "$hub" link add "v-$role" type veth peer name lab0 netns "$n"
    ip -n "$hub" link set "v-$role" master br0
    ip -n "$hub" link set "v-$role" up
    ip -n "$n" addr add "${addr[$role]}/24" dev lab0
    ip -n "$n" link set lab0 up
done

export MOSELLE_NS_SERVER="${ns[server]}" MOSELLE_NS_CLIENT="${ns[client]}" MOSELLE_NS_PROXY="${ns[proxy]}"
export MOSELLE_NS_HUB="$hub"
export MOSELLE_SERVER_IP="${addr[server]}" MOSELLE_CLIENT_IP="${addr[client]}" MOSELLE_PROXY_IP="${addr[proxy]}"
export MOSELLE_TEST_IP="${addr[client]}"

set +e
ip netns exec "${ns[client]}" "$@"
rc=$?
set -e
exit "$rc"
