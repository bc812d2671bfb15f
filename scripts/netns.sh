#!/usr/bin/env bash
# Network namespaces standing in for machines: `up PREFIX N [RATE]` makes namespaces PREFIX0 ..
# PREFIX(N-1), each with one interface at 10.77.0.(i+1)/24, joined through a bridge, every
# interface shaped to RATE (tc tbf; default 1gbit, `none` for unshaped). `down PREFIX N`
# removes them. Needs root (or CAP_NET_ADMIN). Run a node in one with
#   ip netns exec PREFIX0 pp train ... --nnodes N --rdzv 10.77.0.1:29400
# and cut node i's link with `ip link set PREFIXp<i> down`.
set -euo pipefail

usage() { echo "usage: $0 up|down PREFIX N [RATE]" >&2; exit 2; }
[ $# -ge 3 ] || usage
action=$1 prefix=$2 count=$3 rate=${4:-1gbit}
# Interface names are at most 15 characters.
[ ${#prefix} -le 10 ] || { echo "$0: PREFIX must be at most 10 characters" >&2; exit 2; }
bridge="${prefix}br"

down() {
    for i in $(seq 0 $((count - 1))); do
        ip netns del "${prefix}${i}" 2>/dev/null || true
        ip link del "${prefix}p${i}" 2>/dev/null || true
    done
    ip link del "$bridge" 2>/dev/null || true
}

case $action in
up)
    down
    trap 'down' ERR
    ip link add "$bridge" type bridge
    ip link set "$bridge" up
    for i in $(seq 0 $((count - 1))); do
        ns="${prefix}${i}"
        ip netns add "$ns"
        ip link add "${prefix}v${i}" type veth peer name "${prefix}p${i}"
        ip link set "${prefix}v${i}" netns "$ns"
        ip link set "${prefix}p${i}" master "$bridge" up
        ip -n "$ns" addr add "10.77.0.$((i + 1))/24" dev "${prefix}v${i}"
        ip -n "$ns" link set "${prefix}v${i}" up
        ip -n "$ns" link set lo up
        if [ "$rate" != none ]; then
            # Each node's outgoing traffic, as a Gigabit NIC would send it.
            ip netns exec "$ns" tc qdisc add dev "${prefix}v${i}" root tbf rate "$rate" burst 256kb latency 20ms
        fi
    done
    ;;
down) down ;;
*) usage ;;
esac
