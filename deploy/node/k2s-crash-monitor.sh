#!/usr/bin/env bash
# k2s-crash-monitor.sh — run every 5 minutes by /etc/cron.d/k2s-crash-monitor
# (provision-node.sh). For each container of the stack (k2s, k2-sidecar): when it is not
# running, or has restarted since the last check, the evidence (state, exit code, the last
# log lines) goes to the journal (tag k2s-crash-monitor, kept across reboots) and to
# /var/log/k2s-crash/; a stopped stack is brought back with `up -d` — never `down`.
set -Euo pipefail

readonly DEPLOY_DIR=${1:-/apps/kaitu-slave}
readonly STATE_DIR=/var/lib/k2s-crash-monitor
readonly LOG_DIR=/var/log/k2s-crash
readonly CONTAINERS=(k2s k2-sidecar)
readonly KEEP_DAYS=14

log() {
  printf '[k2s-crash-monitor] %s\n' "$*"
  logger -t k2s-crash-monitor -- "$*" 2>/dev/null || true
}

exec 9>/run/k2s-crash-monitor.lock
flock -n 9 || exit 0

[ -f "${DEPLOY_DIR}/docker-compose.yml" ] || exit 0
command -v docker >/dev/null 2>&1 || { log "docker is missing"; exit 1; }
mkdir -p "$STATE_DIR" "$LOG_DIR"
chmod 700 "$LOG_DIR"

# Keeps what a crash left behind. Container logs never carry .env values.
record() {
  local name=$1 why=$2 file
  file="${LOG_DIR}/$(date +%Y%m%dT%H%M%S)-${name}.log"
  {
    printf 'container: %s\nwhy: %s\nat: %s\n\n' "$name" "$why" "$(date -Is)"
    docker inspect -f 'status={{.State.Status}} exit={{.State.ExitCode}} oom={{.State.OOMKilled}} error={{.State.Error}} started={{.State.StartedAt}} finished={{.State.FinishedAt}} restarts={{.RestartCount}}' "$name" 2>&1 || true
    printf '\n--- last 200 log lines ---\n'
    docker logs --tail 200 "$name" 2>&1 || true
  } >"$file"
  chmod 600 "$file"
  log "${name}: ${why} (details in ${file})"
}

need_up=0
for name in "${CONTAINERS[@]}"; do
  running=$(docker inspect -f '{{.State.Running}}' "$name" 2>/dev/null || echo missing)
  restarts=$(docker inspect -f '{{.RestartCount}}' "$name" 2>/dev/null || echo 0)
  previous=$(cat "${STATE_DIR}/${name}.restarts" 2>/dev/null || echo 0)
  case "$running" in
    true)
      if [ "$restarts" -gt "$previous" ] 2>/dev/null; then
        record "$name" "restarted $((restarts - previous)) time(s) since the last check"
      fi
      ;;
    missing)
      log "${name}: no such container"
      need_up=1
      ;;
    *)
      record "$name" "not running"
      need_up=1
      ;;
  esac
  printf '%s\n' "$restarts" >"${STATE_DIR}/${name}.restarts"
done

if [ "$need_up" = 1 ]; then
  if (cd "$DEPLOY_DIR" && docker compose -f docker-compose.yml up -d) >/dev/null 2>&1; then
    log "stack brought back with up -d"
  else
    log "up -d failed; see docker compose in ${DEPLOY_DIR}"
  fi
fi

find "$LOG_DIR" -type f -name '*.log' -mtime +"$KEEP_DAYS" -delete 2>/dev/null || true
