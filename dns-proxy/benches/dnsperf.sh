#!/usr/bin/env bash
# Throughput of the dns-proxy against dnsmasq serving the same 1,000 names, in
# one run, interleaved: dnsperf (Debian) on loopback, 3 rounds of 10 s against
# each. Prints queries per second and average latency per round, the medians,
# and the proxy/dnsmasq ratio. Bounded in time; loopback only.
#
#   bash dns-proxy/benches/dnsperf.sh        (as root on a fresh machine: installs dnsperf, dnsmasq)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

packages=()
command -v dnsperf >/dev/null || packages+=(dnsperf)
command -v dnsmasq >/dev/null || packages+=(dnsmasq-base)
if [ ${#packages[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"
fi
cargo build --quiet --release -p podless-dns --example dns-serve

ROUNDS=${ROUNDS:-3}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
PROXY_PORT=25353
DNSMASQ_PORT=25354
work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

{
  echo "services:"
  for i in $(seq 0 999); do
    printf -- "- name: svc-%d\n  namespace: default\n  vips: [10.96.%d.%d]\n" "$i" $((i / 250)) $((i % 250 + 1))
  done
  echo "clients:"
  echo "  127.0.0.1: default"
} > "$work/records.yaml"
for i in $(seq 0 999); do
  printf "10.96.%d.%d svc-%d.default.svc.cluster.local\n" $((i / 250)) $((i % 250 + 1)) "$i"
done > "$work/hosts"
for i in $(seq 0 999); do
  printf "svc-%d.default.svc.cluster.local A\n" "$i"
done > "$work/queries"

target/release/examples/dns-serve --listen 127.0.0.1:$PROXY_PORT --records "$work/records.yaml" > "$work/proxy.log" 2>&1 &
pids+=($!)
dnsmasq --keep-in-foreground --no-resolv --no-hosts --addn-hosts="$work/hosts" \
  --listen-address=127.0.0.1 --bind-interfaces --port=$DNSMASQ_PORT --cache-size=10000 \
  --user=root --pid-file="$work/dnsmasq.pid" > "$work/dnsmasq.log" 2>&1 &
pids+=($!)
sleep 1
dig @127.0.0.1 -p $PROXY_PORT +short svc-7.default.svc.cluster.local | grep -q 10.96.0.8
dig @127.0.0.1 -p $DNSMASQ_PORT +short svc-7.default.svc.cluster.local | grep -q 10.96.0.8

measure() { # port -> "qps latency_ms"
  dnsperf -s 127.0.0.1 -p "$1" -d "$work/queries" -l "$SECONDS_PER_RUN" -c 4 -q 200 2>&1 |
    awk '/Queries per second:/ {qps=$4} /Average Latency \(s\):/ {lat=$4*1000} /Queries lost:/ {lost=$3} END {printf "%.0f %.3f %s\n", qps, lat, lost}'
}

declare -a proxy_qps dnsmasq_qps
printf "%-6s %-8s %12s %14s %8s\n" round server "queries/s" "avg latency" lost
for round in $(seq 1 "$ROUNDS"); do
  for server in proxy dnsmasq; do
    port=$PROXY_PORT; [ "$server" = dnsmasq ] && port=$DNSMASQ_PORT
    read -r qps latency lost < <(measure "$port")
    printf "%-6s %-8s %12s %11s ms %8s\n" "$round" "$server" "$qps" "$latency" "$lost"
    if [ "$server" = proxy ]; then proxy_qps+=("$qps"); else dnsmasq_qps+=("$qps"); fi
  done
done
median() { printf "%s\n" "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
p=$(median "${proxy_qps[@]}"); d=$(median "${dnsmasq_qps[@]}")
echo "median queries/s: proxy $p, dnsmasq $d, ratio proxy/dnsmasq $(awk -v p="$p" -v d="$d" 'BEGIN {printf "%.2f", p/d}')"
