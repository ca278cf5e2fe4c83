#!/bin/sh
# Stand-in for the k2-sidecar image (kaitu/k2-sidecar), test only (testkit/tests/node_vm.rs):
# what the runbook says the sidecar does, in busybox sh, talking to K2_CENTER_URL (center-sim
# on the VM's host, http only):
#   - POST /slave/register with Basic base64(ipv4:K2_NODE_SECRET) and the claim, until 2xx;
#     logs "Registration completed tunnels=1";
#   - with K2_PRIVATE_CLAIM set: "DIAG: usage-reporter-start", then every
#     STANDIN_USAGE_INTERVAL seconds POST /slave/usage with the cumulative byte counters of the
#     host's NICs read from /host/proc/net/dev (the compose mount) and the kernel's boot id;
#     logs "usage-reporter-cycle-ok" per accepted report, with the ledger total Center
#     answered (used=): the test checks Center's ledger against the node's own counters.
# A TERM (docker stop, a shutdown) ends it after the report in flight is logged, not in between.
# Secrets move only through shell builtins (printf) and pipes, never a command line: the test
# samples every process's command line in the VM. The public IPv4 a real sidecar would detect
# is STANDIN_PUBLIC_IPV4 (baked into the stand-in image by the test).
set -u
stop=0
trap 'stop=1' TERM INT

log() { printf '%s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }

url=${K2_CENTER_URL%/}
case "$url" in
  http://*) ;;
  *) log "stand-in speaks plain http only; K2_CENTER_URL is not http://"; exec sleep 2147483647 ;;
esac
hostport=${url#http://}
hostport=${hostport%%/*}
host=${hostport%:*}
port=${hostport##*:}
[ "$port" = "$hostport" ] && port=80
ip=${STANDIN_PUBLIC_IPV4:?}
auth=$(printf '%s:%s' "$ip" "${K2_NODE_SECRET:?}" | base64 | tr -d '\n')
domain=${K2_DOMAIN:-}
[ -n "$domain" ] || domain="$(printf '%s' "$ip" | tr . -).sslip.io"

# post PATH BODY: sets $status to the HTTP status (000 when there was no answer).
post() {
  resp=$(printf 'POST %s HTTP/1.0\r\nHost: %s\r\nAuthorization: Basic %s\r\nContent-Type: application/json\r\nContent-Length: %s\r\n\r\n%s' \
    "$1" "$hostport" "$auth" "${#2}" "$2" | nc -w 10 "$host" "$port" 2>/dev/null)
  status=$(printf '%s\n' "$resp" | head -n 1 | cut -d ' ' -f 2)
  [ -n "$status" ] || status=000
  used=$(printf '%s\n' "$resp" | sed -n 's/.*"trafficUsedBytes":\([0-9][0-9]*\).*/\1/p' | head -n 1)
}

claim=${K2_PRIVATE_CLAIM:-}
body=$(printf '{"name":"%s","region":"%s","ipType":"%s","privateClaim":"%s","domain":"%s"}' \
  "${K2_NODE_NAME:-}" "${K2_NODE_REGION:-}" "${K2_IP_TYPE:-unknown}" "$claim" "$domain")
while :; do
  post /slave/register "$body"
  case "$status" in
    2*) log "Registration completed tunnels=1 domain=${domain}"; break ;;
    *) log "Registration failed (HTTP ${status}); retrying" ;;
  esac
  [ "$stop" = 1 ] && exit 0
  sleep 3 &
  wait $!
  [ "$stop" = 1 ] && exit 0
done
body=

if [ -z "$claim" ]; then
  log "Usage reporter disabled (not a private node)"
  while [ "$stop" = 0 ]; do sleep 3600 & wait $!; done
  exit 0
fi
claim=

interval=${STANDIN_USAGE_INTERVAL:-5}
log "DIAG: usage-reporter-start interval=${interval}s"
while :; do
  # The host's NICs: not loopback, not Docker's bridges and veths.
  counters=$(sed 's/:/ /' /host/proc/net/dev | awk 'NR > 2 && $1 != "lo" && $1 !~ /^(docker|veth|br-)/ {rx += $2; tx += $10} END {printf "%.0f %.0f", rx, tx}')
  rx=${counters% *}
  tx=${counters#* }
  boot=$(cat /proc/sys/kernel/random/boot_id)
  post /slave/usage "$(printf '{"rxBytes":%s,"txBytes":%s,"bootId":"%s"}' "$rx" "$tx" "$boot")"
  case "$status" in
    2*) log "usage-reporter-cycle-ok rx=${rx} tx=${tx} boot=${boot} used=${used:-?}" ;;
    *) log "usage-reporter-cycle-failed HTTP ${status}" ;;
  esac
  [ "$stop" = 1 ] && exit 0
  sleep "$interval" &
  wait $!
  [ "$stop" = 1 ] && exit 0
done
