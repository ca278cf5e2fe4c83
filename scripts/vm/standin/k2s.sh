#!/bin/sh
# Stand-in for the k2s image (kaitu/k2s), test only: the VM test (testkit/tests/node_vm.rs)
# serves it under the real image name so the node's docker-compose.yml runs unchanged. It
# prints the line the verifier looks for and stays up; it tunnels nothing.
trap 'exit 0' TERM INT
printf '%s INFO server ready listen=:443 (stand-in, K2_CENTER_URL %s)\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${K2_CENTER_URL:-unset}"
while :; do
  sleep 1 &
  wait $!
done
