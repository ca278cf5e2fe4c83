#!/usr/bin/env bash
# auto-update.sh — the node's update path. The stack's images are pinned by digest in
# docker-compose.yml (`image: repo:${K2_VERSION…}@sha256:…`); this resolves the digest the
# registry now serves for each image's tag (K2_VERSION from .env), and when one moved:
#   1. rewrites the pin (the previous file kept as docker-compose.yml.previous),
#   2. `docker compose pull` + `up -d` (recreates only the containers whose image changed),
#   3. waits for every container to be running and not restarting; if they are not, puts the
#      old pins back and `up -d` again (the old images are still here: nothing is pruned
#      before success), and exits 1.
# Never `down`: the node stays up through an update. Run daily by /etc/cron.d/k2s-auto-update
# (provision-node.sh); safe to run by hand. PN_UPDATE_SETTLE_SECONDS (60): how long new
# containers must stay up.
set -Eeuo pipefail

readonly DEPLOY_DIR=${1:-/apps/kaitu-slave}
readonly SETTLE=${PN_UPDATE_SETTLE_SECONDS:-60}
readonly COMPOSE=(docker compose -f docker-compose.yml)
readonly PIN_RE='^[[:space:]]*image:[[:space:]]*([^:@[:space:]]+):[^@]*@(sha256:[0-9a-f]{64})[[:space:]]*$'

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
version=$(sed -n 's/^K2_VERSION=//p' .env | tail -n 1)
if [ -z "$version" ]; then
  log "no K2_VERSION in .env; nothing to update"
  exit 1
fi

# The digest the registry serves for repo:tag now (pulled by tag, read from RepoDigests).
current_digest() {
  local ref="$1:$2"
  docker pull -q "$ref" >/dev/null || return 1
  docker image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$ref" |
    sed -n "s|^\(docker\.io/\)\{0,1\}$1@\(sha256:[0-9a-f]\{64\}\)$|\2|p" | head -n 1
}

new=$(mktemp)
trap 'rm -f "$new"' EXIT
moved=0 pins=0
while IFS= read -r line || [ -n "$line" ]; do
  if [[ $line =~ $PIN_RE ]]; then
    repo=${BASH_REMATCH[1]} old=${BASH_REMATCH[2]}
    pins=$((pins + 1))
    if ! digest=$(current_digest "$repo" "$version") || [ -z "$digest" ]; then
      log "cannot resolve ${repo}:${version} at the registry; nothing changed"
      exit 1
    fi
    if [ "$digest" != "$old" ]; then
      log "${repo}:${version}: ${old} -> ${digest}"
      line=${line/"$old"/"$digest"}
      moved=$((moved + 1))
    fi
  fi
  printf '%s\n' "$line" >>"$new"
done <docker-compose.yml
if [ "$pins" = 0 ]; then
  log "docker-compose.yml pins no image by digest; not updating an unpinned stack"
  exit 1
fi
if [ "$moved" = 0 ]; then
  log "up to date: ${pins} image(s) pinned at the registry's current digest"
  exit 0
fi

# `id restarts` of every container of the project.
restarts() {
  local id
  for id in $("${COMPOSE[@]}" ps -a -q); do
    printf '%s %s\n' "$id" "$(docker inspect -f '{{.RestartCount}}' "$id")"
  done
}

# Every container of the project running, none restarting, none restarted since $1 (restarts'
# output taken right after `up -d`): a container that crashes and is restarted by its policy
# is not up.
stack_up() {
  local ids id state
  ids=$("${COMPOSE[@]}" ps -a -q) || return 1
  [ -n "$ids" ] || return 1
  for id in $ids; do
    state=$(docker inspect -f '{{.State.Status}} {{.State.Restarting}}' "$id") || return 1
    [ "$state" = "running false" ] || return 1
    [ "$(restarts | grep "^${id} ")" = "$(printf '%s\n' "$1" | grep "^${id} ")" ] || return 1
  done
}

cp -p docker-compose.yml docker-compose.yml.previous
cat "$new" >docker-compose.yml
log "pull"
if "${COMPOSE[@]}" pull --quiet && "${COMPOSE[@]}" up -d; then
  ok=1
  before=$(restarts)
  for _ in $(seq 1 "$((SETTLE / 5 + 1))"); do
    sleep 5
    stack_up "$before" || { ok=0; break; }
  done
else
  ok=0
fi
if [ "$ok" = 1 ]; then
  rm -f docker-compose.yml.previous
  # Only dangling layers (the images replaced just now); tagged images stay.
  docker image prune -f >/dev/null 2>&1 || true
  log "done: $("${COMPOSE[@]}" ps --format '{{.Name}} {{.State}}' 2>/dev/null | tr '\n' ' ')"
  exit 0
fi
log "the new containers did not stay up; rolling the pins back"
cat docker-compose.yml.previous >docker-compose.yml
rm -f docker-compose.yml.previous
"${COMPOSE[@]}" up -d || log "up -d on the old pins failed too"
log "rolled back: $("${COMPOSE[@]}" ps --format '{{.Name}} {{.State}}' 2>/dev/null | tr '\n' ' ')"
exit 1
