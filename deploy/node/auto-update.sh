#!/usr/bin/env bash
# auto-update.sh — keeps the node's k2s stack current on its pinned images (K2_VERSION in
# .env): `docker compose pull`, then `up -d`, which recreates only the containers whose
# image or configuration changed. Never `down`: the node stays up through an update.
# Run daily by /etc/cron.d/k2s-auto-update (provision-node.sh); safe to run by hand.
set -Eeuo pipefail

readonly DEPLOY_DIR=${1:-/apps/kaitu-slave}
readonly COMPOSE=(docker compose -f docker-compose.yml)

log() {
  printf '[k2s-auto-update] %s\n' "$*"
  logger -t k2s-auto-update -- "$*" 2>/dev/null || true
}

# One run at a time (a slow pull must not overlap the next cron run).
exec 9>/run/k2s-auto-update.lock
flock -n 9 || { log "another run is in progress"; exit 0; }

cd "$DEPLOY_DIR"
if [ ! -f docker-compose.yml ] || [ ! -f .env ]; then
  log "no stack in ${DEPLOY_DIR}; nothing to update"
  exit 0
fi

log "pull"
if ! "${COMPOSE[@]}" pull --quiet; then
  log "pull failed; the running containers are left as they are"
  exit 1
fi
log "up -d"
"${COMPOSE[@]}" up -d
# Only dangling layers (the images replaced just now); tagged images stay.
docker image prune -f >/dev/null 2>&1 || true
log "done: $("${COMPOSE[@]}" ps --format '{{.Name}} {{.State}}' 2>/dev/null | tr '\n' ' ')"
