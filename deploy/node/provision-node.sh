#!/usr/bin/env bash
# provision-node.sh — OS prep of a Pnp private node (runbook step 4), before any compose deploy.
#
# Run as root on Ubuntu 20.04, 22.04, 24.04 or Debian 12, 13, script piped over SSH stdin:
#     ssh -p 22 ubuntu@<ipv4> 'sudo bash -s' < provision-node.sh
#     ssh -p 22 debian@<ipv4> 'sudo bash -s -- --docker=distro' < provision-node.sh
# Idempotent: every step looks before it changes, so a re-run on a prepared node changes
# nothing and says so ("nothing changed"); a re-run is how a half-finished run is completed.
#
# Docker comes from Docker's own apt repository (docker-ce + the compose plugin) unless
# `--docker=distro` asks for the distribution's docker.io and compose v2 plugin instead (also
# PN_DOCKER_SOURCE=distro in the environment, or as a line at the top of the script as sent,
# since the deployer's launcher passes no arguments): for nodes that reach only their
# distribution's mirror (air-gapped), and for the VM test. The distribution must carry
# compose v2 (Debian 13, Ubuntu 22.04+; Debian 12 does not: its docker-compose is the Python
# v1, and bookworm-backports has no v2 either): where it does not, the preflight says so and
# stops before anything is changed.
#
# Steps:  1 preflight (root, Ubuntu/Debian)   2 wait for cloud-init   3 timezone Asia/Singapore
#         4 snapd removal   5 swap   6 base packages   7 Docker + compose plugin
#         8 IPv6   9 BBR   10 Docker daemon.json   11 UFW   12 ufw-docker rules
#         13 SSH 22 -> 1022 (key-only, PermitRootLogin no)   14 persistent journald + crash-monitor cron
#         15 auto-update cron   16 deploy dir /apps/kaitu-slave
#
# After step 13 SSH answers on 1022 only (the running session survives); port 22 is closed in
# UFW only once sshd answers on 1022 (its banner read back over loopback). The cloud's own
# firewall must allow 1022/tcp and the k2s ports; that is outside this host.
# With PN_SSH_KEEP_22=1 (the deployer's launcher sets it) sshd listens on 22 as well as on 1022
# and UFW keeps 22 open: only a connection from outside proves the cloud's firewall lets 1022
# in, and the deployer closes 22 itself once it got one (svc-deployer/src/harden.rs). Once it
# has (/var/lib/pnp/ssh-22-closed), a re-run does not open 22 again.
set -Eeuo pipefail

readonly DEPLOY_DIR=/apps/kaitu-slave
readonly SSH_PORT=1022
readonly TIMEZONE=Asia/Singapore
# What k2s publishes (docker-compose.yml `ports:`), opened in UFW for routed traffic.
readonly K2S_PORTS=("443/tcp" "443/udp")
readonly SSHD_DROPIN=/etc/ssh/sshd_config.d/00-pn-hardening.conf
readonly SYSCTL_FILE=/etc/sysctl.d/99-pn-node.conf
# The admin user made here when the session is root's (images that let only root in): once
# this script has set `PermitRootLogin no`, the node is reached as this user (kit::cloud::ADMIN_USER).
readonly ADMIN_USER=${PN_ADMIN_USER:-pnadmin}
readonly SUDOERS_ADMIN=/etc/sudoers.d/90-pnp-admin
# Docker's apt repository key, as Docker publishes it (docs.docker.com, "Install Docker Engine"):
# the downloaded key is trusted only when its primary key has exactly this fingerprint.
readonly DOCKER_KEY_FINGERPRINT=9DC858229FC7DD38854AE2D88D81803C0EBFCD88

export DEBIAN_FRONTEND=noninteractive
# Ubuntu 22.04+ asks which services to restart after upgrades; never ask.
export NEEDRESTART_MODE=a
# Acquire::Retries: a mirror's hiccup (a reset, a 5xx) is retried, not a failed prep.
readonly APT_OPTS=(-y -q -o DPkg::Lock::Timeout=600 -o Acquire::Retries=5 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

DOCKER_SOURCE=${PN_DOCKER_SOURCE:-docker}
KEEP_22=0
if [ "${PN_SSH_KEEP_22:-0}" = 1 ] && [ ! -f /var/lib/pnp/ssh-22-closed ]; then KEEP_22=1; fi

STEP=0
ADMIN=
CHANGES=()
log() { printf '[provision-node] %s\n' "$*"; }
# Records that this run changed something; the last line lists them (or "nothing changed").
changed() { CHANGES+=("$*"); log "changed: $*"; }
warn() { printf '[provision-node] WARNING: %s\n' "$*" >&2; }
die() { printf '[provision-node] ERROR: %s\n' "$*" >&2; exit 1; }
step() { STEP=$((STEP + 1)); log "step ${STEP}/16: $*"; }
trap 'printf "[provision-node] ERROR: step %s failed at line %s: %s\n" "$STEP" "$LINENO" "$BASH_COMMAND" >&2' ERR

# Writes stdin to $1 (mode $2) only when the content differs. Exit 0 = changed, 1 = unchanged.
write_if_changed() {
  local path=$1 mode=$2 tmp
  tmp=$(mktemp)
  cat >"$tmp"
  if [ -f "$path" ] && cmp -s "$tmp" "$path"; then
    rm -f "$tmp"
    return 1
  fi
  install -D -m "$mode" "$tmp" "$path"
  rm -f "$tmp"
  changed "$path"
  return 0
}

apt_updated=0
apt_update() {
  if [ "$apt_updated" = 0 ]; then
    apt-get "${APT_OPTS[@]}" update
    apt_updated=1
  fi
}

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

apt_install() {
  local missing=() p
  for p in "$@"; do
    installed "$p" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    apt_update
    apt-get "${APT_OPTS[@]}" install --no-install-recommends "${missing[@]}"
    changed "installed ${missing[*]}"
  fi
}

# The candidate version apt would install ("" when the lists do not know the package).
candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ && $2 != "(none)" {print $2; exit}'; }

preflight() {
  step "preflight"
  [ "$(id -u)" -eq 0 ] || die "must run as root (sudo bash -s)"
  case "$DOCKER_SOURCE" in
    docker | distro) ;;
    *) die "--docker must be docker (Docker's repository) or distro (the distribution's packages), not '${DOCKER_SOURCE}'" ;;
  esac
  [ -r /etc/os-release ] || die "no /etc/os-release: cannot tell the distribution"
  # shellcheck source=/dev/null
  . /etc/os-release
  OS_ID=${ID:-unknown}
  local major=${VERSION_ID%%.*}
  case "$OS_ID" in
    ubuntu)
      [ "${major:-0}" -ge 20 ] 2>/dev/null || die "Ubuntu ${VERSION_ID:-?} is too old (20.04 or newer)"
      case "${VERSION_ID:-}" in
        20.04 | 22.04 | 24.04) ;;
        *) warn "Ubuntu ${VERSION_ID} is not one of the tested releases (20.04, 22.04, 24.04)" ;;
      esac
      ;;
    debian)
      [ "${major:-0}" -ge 12 ] 2>/dev/null || die "Debian ${VERSION_ID:-?} is too old (12 or newer)"
      case "$major" in
        12 | 13) ;;
        *) warn "Debian ${VERSION_ID} is not one of the tested releases (12, 13)" ;;
      esac
      ;;
    *) die "Ubuntu (20.04-24.04) or Debian (12, 13) only; this is ${PRETTY_NAME:-$OS_ID}" ;;
  esac
  CODENAME=${VERSION_CODENAME:-${UBUNTU_CODENAME:-}}
  [ -n "$CODENAME" ] || die "cannot tell the ${OS_ID} codename"
  command -v systemctl >/dev/null 2>&1 || die "systemd is required"
  log "${PRETTY_NAME:-$OS_ID ${VERSION_ID:-}}; Docker from ${DOCKER_SOURCE}"
}

# The end of the preflight, under the lock: Docker from the distribution needs its compose v2
# plugin, known before step 3 changes anything.
check_docker_source() {
  if [ "$DOCKER_SOURCE" = distro ] && ! docker_works; then
    apt_update
    DISTRO_COMPOSE=$(distro_compose_package) || die "${PRETTY_NAME:-this distribution} has no docker compose v2 plugin among its packages (--docker=distro): nothing was changed; use Docker's repository (the default, without --docker=distro)"
  fi
}

# The distribution's package of the compose v2 plugin: docker-compose-v2 on Ubuntu,
# docker-compose 2.x on Debian 13 (Debian 12's docker-compose is the old Python v1, which has
# no `docker compose`). Fails when there is none. Needs updated package lists.
DISTRO_COMPOSE=
distro_compose_package() {
  local major
  if [ -n "$(candidate docker-compose-v2)" ]; then
    printf 'docker-compose-v2\n'
    return 0
  fi
  major=$(candidate docker-compose | sed 's/^[0-9]*://' | cut -d. -f1)
  [ -n "$major" ] && [ "$major" -ge 2 ] 2>/dev/null || return 1
  printf 'docker-compose\n'
}

wait_for_boot() {
  step "wait for cloud-init"
  if command -v cloud-init >/dev/null 2>&1; then
    # Status 2 = finished with recoverable errors: the image is usable.
    cloud-init status --wait >/dev/null 2>&1 || warn "cloud-init reported errors; continuing"
  fi
}

set_timezone() {
  step "timezone ${TIMEZONE}"
  local current
  current=$(timedatectl show -p Timezone --value 2>/dev/null || true)
  if [ "$current" != "$TIMEZONE" ]; then
    timedatectl set-timezone "$TIMEZONE" 2>/dev/null || ln -sfn "/usr/share/zoneinfo/${TIMEZONE}" /etc/localtime
    changed "timezone ${TIMEZONE} (was ${current:-unknown})"
  fi
}

remove_snapd() {
  step "snapd removal"
  if command -v snap >/dev/null 2>&1; then
    local s
    # Applications first, then the bases and snapd itself (removal fails in the other order).
    while read -r s; do
      [ -n "$s" ] && { snap remove --purge "$s" >/dev/null 2>&1 || warn "could not remove snap $s"; }
    done < <(snap list 2>/dev/null | awk 'NR > 1 && $1 !~ /^(core[0-9]*|bare|snapd)$/ {print $1}')
    for s in core24 core22 core20 core18 core bare snapd; do
      if snap list "$s" >/dev/null 2>&1; then
        snap remove --purge "$s" >/dev/null 2>&1 || warn "could not remove snap $s"
      fi
    done
  fi
  if installed snapd; then
    systemctl disable --now snapd.service snapd.socket snapd.seeded.service >/dev/null 2>&1 || true
    apt-get "${APT_OPTS[@]}" purge snapd
    changed "snapd purged"
  fi
  rm -rf /snap /var/snap /var/lib/snapd /var/cache/snapd
  # Keep apt from pulling it back in as a dependency.
  write_if_changed /etc/apt/preferences.d/no-snapd.pref 0644 <<'EOF' || true
Package: snapd
Pin: release a=*
Pin-Priority: -10
EOF
}

make_swap() {
  step "swap"
  if [ -n "$(swapon --show=NAME --noheadings 2>/dev/null)" ]; then
    log "swap present"
  else
    local mem_mb size_mb free_mb
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    size_mb=$((mem_mb <= 2048 ? 2048 : 4096))
    free_mb=$(df -Pm / | awk 'NR == 2 {print $4}')
    if [ "$free_mb" -lt $((size_mb + 2048)) ]; then
      warn "only ${free_mb} MiB free on /: no swap file"
    else
      if [ ! -f /swapfile ]; then
        fallocate -l "${size_mb}M" /swapfile 2>/dev/null || dd if=/dev/zero of=/swapfile bs=1M count="$size_mb" status=none
      fi
      chmod 600 /swapfile
      mkswap /swapfile >/dev/null
      swapon /swapfile
      changed "swap file of ${size_mb} MiB"
    fi
  fi
  if [ -f /swapfile ] && ! grep -qE '^/swapfile[[:space:]]' /etc/fstab; then
    printf '/swapfile none swap sw 0 0\n' >>/etc/fstab
    changed "/etc/fstab (swap)"
  fi
}

base_packages() {
  step "base packages"
  # sudo: the admin user's way to root once root may not log in (step 13; visudo checks it).
  local pkgs=(ca-certificates curl ufw cron util-linux iproute2 logrotate sudo)
  # gnupg is for Docker's repository key; the distribution's own packages need none.
  [ "$DOCKER_SOURCE" = distro ] || pkgs+=(gnupg)
  apt_install "${pkgs[@]}"
}

docker_works() { command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; }

install_docker() {
  if [ "$DOCKER_SOURCE" = distro ]; then
    install_docker_distro
  else
    install_docker_ce
  fi
  if ! systemctl is-enabled --quiet docker || ! systemctl is-active --quiet docker; then
    systemctl enable --now docker >/dev/null 2>&1
    changed "docker service enabled and started"
  fi
  docker compose version >/dev/null || die "docker compose plugin not working"
}

# Whether the armored key file $1 holds exactly one primary key, with Docker's published
# fingerprint. In a throw-away keyring: nothing is imported anywhere.
docker_key_ok() {
  local home fprs
  home=$(mktemp -d)
  fprs=$(GNUPGHOME=$home gpg --batch --no-tty --with-colons --show-keys "$1" 2>/dev/null |
    awk -F: '$1 == "pub" {p = 1; next} $1 == "fpr" && p {print $10; p = 0}' || true)
  rm -rf "$home"
  [ "$fprs" = "$DOCKER_KEY_FINGERPRINT" ]
}

# Docker CE and the compose plugin from Docker's repository for this distribution.
install_docker_ce() {
  step "Docker CE (Docker's repository)"
  local keyring=/etc/apt/keyrings/docker.asc arch list base="https://download.docker.com/linux/${OS_ID}"
  if installed docker-ce && installed docker-compose-plugin; then
    log "Docker CE present: $(docker --version 2>/dev/null || echo unknown)"
    return 0
  fi
  # Distribution packages conflict with Docker CE's.
  local p conflicting=()
  for p in docker.io docker-doc docker-compose docker-compose-v2 docker-buildx podman-docker containerd runc; do
    installed "$p" && conflicting+=("$p")
  done
  if [ "${#conflicting[@]}" -gt 0 ]; then
    apt-get "${APT_OPTS[@]}" remove "${conflicting[@]}"
    changed "removed ${conflicting[*]}"
  fi
  install -m 0755 -d /etc/apt/keyrings
  if [ ! -s "$keyring" ]; then
    curl -fsSL --retry 5 --retry-delay 3 "${base}/gpg" -o "${keyring}.tmp"
    if ! docker_key_ok "${keyring}.tmp"; then
      rm -f "${keyring}.tmp"
      die "the key at ${base}/gpg is not Docker's (fingerprint ${DOCKER_KEY_FINGERPRINT} expected): not trusted, nothing installed from Docker's repository"
    fi
    mv "${keyring}.tmp" "$keyring"
    chmod a+r "$keyring"
    changed "$keyring"
  fi
  # Checked on every run: a key replaced since is not trusted either.
  docker_key_ok "$keyring" || die "${keyring} is not Docker's key (fingerprint ${DOCKER_KEY_FINGERPRINT} expected): not trusted"
  arch=$(dpkg --print-architecture)
  list="deb [arch=${arch} signed-by=${keyring}] ${base} ${CODENAME} stable"
  if printf '%s\n' "$list" | write_if_changed /etc/apt/sources.list.d/docker.list 0644; then
    apt_updated=0
  fi
  apt_update
  apt-get "${APT_OPTS[@]}" install docker-ce docker-ce-cli containerd.io docker-buildx-plugin docker-compose-plugin
  changed "installed Docker CE"
}

# docker.io and the compose v2 plugin from the distribution's own mirror (no other host).
install_docker_distro() {
  step "Docker (the distribution's packages)"
  if docker_works; then
    log "Docker present: $(docker --version 2>/dev/null || echo unknown), compose $(docker compose version --short 2>/dev/null || echo unknown)"
    return 0
  fi
  # Found by the preflight (known here too when Docker stopped working since).
  local compose=$DISTRO_COMPOSE
  [ -n "$compose" ] || { apt_update; compose=$(distro_compose_package); } ||
    die "${PRETTY_NAME:-this distribution} has no docker compose v2 plugin among its packages; use Docker's repository (the default, without --docker=distro)"
  # Debian 13 ships the client apart (docker-cli, only recommended by docker.io).
  local pkgs=(docker.io "$compose")
  [ -z "$(candidate docker-cli)" ] || pkgs+=(docker-cli)
  apt_install "${pkgs[@]}"
  docker_works || die "docker.io and ${compose} are installed, but 'docker compose' does not work"
}

SYSCTL_CHANGED=0
write_sysctl() {
  # IPv6 on (some images ship it disabled), BBR with fq, modest swap use.
  if write_if_changed "$SYSCTL_FILE" 0644 <<'EOF'; then SYSCTL_CHANGED=1; fi
# Pnp node tuning (provision-node.sh). Edits here are overwritten by the next prep run.
net.ipv6.conf.all.disable_ipv6 = 0
net.ipv6.conf.default.disable_ipv6 = 0
net.ipv6.conf.lo.disable_ipv6 = 0
net.core.default_qdisc = fq
net.ipv4.tcp_congestion_control = bbr
vm.swappiness = 10
EOF
}

enable_ipv6() {
  step "IPv6"
  write_sysctl
  [ -d /proc/sys/net/ipv6 ] || warn "the kernel has IPv6 disabled at boot (ipv6.disable=1); IPv6 stays off"
}

enable_bbr() {
  step "BBR"
  if printf 'tcp_bbr\n' | write_if_changed /etc/modules-load.d/pn-bbr.conf 0644; then SYSCTL_CHANGED=1; fi
  modprobe tcp_bbr 2>/dev/null || warn "tcp_bbr module not loadable (may be built in)"
  if [ "$SYSCTL_CHANGED" = 1 ] || [ "$(sysctl -n net.ipv4.tcp_congestion_control 2>/dev/null)" != bbr ]; then
    sysctl --system >/dev/null
  fi
  log "congestion control: $(sysctl -n net.ipv4.tcp_congestion_control 2>/dev/null || echo unknown)"
}

docker_daemon_json() {
  step "Docker daemon.json"
  if write_if_changed /etc/docker/daemon.json 0644 <<'EOF'; then
{
  "log-driver": "json-file",
  "log-opts": { "max-size": "20m", "max-file": "5" },
  "live-restore": true,
  "ipv6": true,
  "fixed-cidr-v6": "fd00:6b32:0:ffff::/64"
}
EOF
    if dockerd --help 2>/dev/null | grep -q -- '--validate'; then
      dockerd --validate --config-file /etc/docker/daemon.json >/dev/null || die "daemon.json rejected by dockerd"
    fi
    # live-restore keeps running containers up across this restart.
    systemctl restart docker
    log "docker restarted with the new daemon.json"
  fi
}

# Runs ufw with its arguments and records a change when it reports one.
ufw_do() {
  local out
  out=$(ufw "$@" 2>&1) || { printf '%s\n' "$out" >&2; return 1; }
  case "$out" in
    *"Rule added"* | *"Rules updated"* | *"Rule updated"* | *"Rule deleted"* | *"Rules deleted"*) changed "ufw $*" ;;
  esac
}

setup_ufw() {
  step "UFW"
  if ! grep -q '^IPV6=yes' /etc/default/ufw; then
    sed -i 's/^IPV6=.*/IPV6=yes/' /etc/default/ufw
    changed "/etc/default/ufw IPV6=yes"
  fi
  if ! grep -q '^DEFAULT_INPUT_POLICY="DROP"' /etc/default/ufw; then
    ufw default deny incoming >/dev/null
    changed "ufw default deny incoming"
  fi
  if ! grep -q '^DEFAULT_OUTPUT_POLICY="ACCEPT"' /etc/default/ufw; then
    ufw default allow outgoing >/dev/null
    changed "ufw default allow outgoing"
  fi
  # 22 stays open until sshd answers on the hardened port (step 13), so a failure in between
  # cannot lock the node out (with KEEP_22, until the deployer saw 1022 from outside).
  if [ "$KEEP_22" = 1 ] || ! sshd_answers_on "$SSH_PORT"; then
    ufw_do allow 22/tcp
  fi
  ufw_do allow "${SSH_PORT}/tcp"
  local p
  for p in "${K2S_PORTS[@]}"; do
    ufw_do allow "$p"
  done
  if ! ufw status | grep -q '^Status: active'; then
    ufw --force enable >/dev/null
    changed "ufw enabled"
  fi
}

setup_ufw_docker() {
  step "ufw-docker rules"
  # Docker publishes ports through FORWARD, past UFW's INPUT rules. These blocks (the
  # ufw-docker pattern) send published traffic through ufw-user-forward, so only what
  # `ufw route allow` opens is reachable; private ranges keep talking to each other.
  local changed=0
  if ! grep -q '^# BEGIN UFW AND DOCKER' /etc/ufw/after.rules; then
    cat >>/etc/ufw/after.rules <<'EOF'

# BEGIN UFW AND DOCKER
*filter
:ufw-user-forward - [0:0]
:ufw-docker-logging-deny - [0:0]
:DOCKER-USER - [0:0]
-A DOCKER-USER -j ufw-user-forward

-A DOCKER-USER -j RETURN -s 10.0.0.0/8
-A DOCKER-USER -j RETURN -s 172.16.0.0/12
-A DOCKER-USER -j RETURN -s 192.168.0.0/16

-A DOCKER-USER -p udp -m udp --sport 53 --dport 1024:65535 -j RETURN

-A DOCKER-USER -j ufw-docker-logging-deny -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -d 192.168.0.0/16
-A DOCKER-USER -j ufw-docker-logging-deny -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -d 10.0.0.0/8
-A DOCKER-USER -j ufw-docker-logging-deny -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -d 172.16.0.0/12
-A DOCKER-USER -j ufw-docker-logging-deny -p udp -m udp --dport 0:32767 -d 192.168.0.0/16
-A DOCKER-USER -j ufw-docker-logging-deny -p udp -m udp --dport 0:32767 -d 10.0.0.0/8
-A DOCKER-USER -j ufw-docker-logging-deny -p udp -m udp --dport 0:32767 -d 172.16.0.0/12

-A DOCKER-USER -j RETURN

-A ufw-docker-logging-deny -m limit --limit 3/min --limit-burst 10 -j LOG --log-prefix "[UFW DOCKER BLOCK] "
-A ufw-docker-logging-deny -j DROP

COMMIT
# END UFW AND DOCKER
EOF
    changed=1
  fi
  if [ -f /etc/ufw/after6.rules ] && ! grep -q '^# BEGIN UFW AND DOCKER' /etc/ufw/after6.rules; then
    cat >>/etc/ufw/after6.rules <<'EOF'

# BEGIN UFW AND DOCKER
*filter
:ufw6-user-forward - [0:0]
:ufw6-docker-logging-deny - [0:0]
:DOCKER-USER - [0:0]
-A DOCKER-USER -j ufw6-user-forward

-A DOCKER-USER -j RETURN -s fd00::/8

-A DOCKER-USER -p udp -m udp --sport 53 --dport 1024:65535 -j RETURN

-A DOCKER-USER -j ufw6-docker-logging-deny -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -d fd00::/8
-A DOCKER-USER -j ufw6-docker-logging-deny -p udp -m udp --dport 0:32767 -d fd00::/8

-A DOCKER-USER -j RETURN

-A ufw6-docker-logging-deny -m limit --limit 3/min --limit-burst 10 -j LOG --log-prefix "[UFW DOCKER BLOCK] "
-A ufw6-docker-logging-deny -j DROP

COMMIT
# END UFW AND DOCKER
EOF
    changed=1
  fi
  local p port proto
  for p in "${K2S_PORTS[@]}"; do
    port=${p%/*}
    proto=${p#*/}
    ufw_do route allow proto "$proto" from any to any port "$port"
  done
  if [ "$changed" = 1 ]; then
    changed "ufw-docker rules in /etc/ufw/after*.rules"
    ufw reload >/dev/null
  fi
}

sshd_listens_on() { ss -ltnH "sport = :$1" | grep -q .; }

# Whether an SSH server answers on 127.0.0.1:$1: its banner read back, not just a socket.
sshd_answers_on() {
  local line
  # shellcheck disable=SC2016 # $1 and $l belong to the inner shell.
  line=$(timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && IFS= read -r -t 4 l <&3 && printf "%s" "$l"' pnp-probe "$1" 2>/dev/null || true)
  case "$line" in SSH-2.0-*) return 0 ;; *) return 1 ;; esac
}

SSHD_BACKUP=
# Puts the previous sshd configuration back and restarts sshd on it, so a failed hardening
# leaves the node reachable as it was (port 22 is still open in UFW until step 13 succeeds).
restore_sshd() {
  if [ -n "$SSHD_BACKUP" ] && [ -f "$SSHD_BACKUP" ]; then
    cp -p "$SSHD_BACKUP" /etc/ssh/sshd_config
    rm -f "$SSHD_DROPIN" "$SSHD_BACKUP"
    SSHD_BACKUP=
    systemctl restart ssh.service >/dev/null 2>&1 || true
  fi
}

# The user the node is reached as once root may not log in: the one this session came in as
# (cloud-init's default user — ubuntu, admin, debian — or the admin user Pnp's own cloud-init
# made), or, when the session is root's (images that let only root in), ADMIN_USER made here
# with root's keys and passwordless sudo. Without a key for it this stops before sshd is
# touched: the node is never locked out.
ensure_admin_user() {
  local who=${SUDO_USER:-root} home
  if [ "$who" != root ] && id -u "$who" >/dev/null 2>&1 && [ "$(id -u "$who")" != 0 ]; then
    ADMIN=$who
    log "admin user: ${ADMIN} (this session's)"
    return 0
  fi
  [ -s /root/.ssh/authorized_keys ] || die "root has no authorized_keys to give ${ADMIN_USER}: PermitRootLogin no would lock the node out; sshd left as it is"
  if ! id -u "$ADMIN_USER" >/dev/null 2>&1; then
    useradd --create-home --shell /bin/bash "$ADMIN_USER"
    changed "admin user ${ADMIN_USER}"
  fi
  home=$(getent passwd "$ADMIN_USER" | cut -d: -f6)
  install -d -m 0700 -o "$ADMIN_USER" -g "$ADMIN_USER" "$home/.ssh"
  # Root's keys, without cloud-init's disable_root command in front of them.
  write_if_changed "$home/.ssh/authorized_keys" 0600 \
    < <(sed -E 's/^.*(ssh-(ed25519|rsa|dss)|ecdsa-sha2-[a-z0-9]+|sk-[a-z0-9@.-]+) /\1 /' /root/.ssh/authorized_keys) || true
  chown "$ADMIN_USER:" "$home/.ssh/authorized_keys"
  local tmp
  tmp=$(mktemp)
  printf '# Pnp: the node admin (provision-node.sh).\n%s ALL=(ALL) NOPASSWD:ALL\n' "$ADMIN_USER" >"$tmp"
  visudo -cqf "$tmp" >/dev/null || { rm -f "$tmp"; die "visudo rejected the sudoers line for ${ADMIN_USER}"; }
  write_if_changed "$SUDOERS_ADMIN" 0440 <"$tmp" || true
  rm -f "$tmp"
  ADMIN=$ADMIN_USER
  log "admin user: ${ADMIN} (root's keys, passwordless sudo)"
}

harden_ssh() {
  step "SSH ${SSH_PORT} (key-only, no root login)"
  ensure_admin_user
  local main=/etc/ssh/sshd_config changed=0
  SSHD_BACKUP=$(mktemp)
  cp -p "$main" "$SSHD_BACKUP"
  # The drop-ins must be read (Ubuntu 20.04+ includes them; make sure).
  if ! grep -qE '^[[:space:]]*Include[[:space:]]+/etc/ssh/sshd_config\.d/\*\.conf' "$main"; then
    sed -i '1i Include /etc/ssh/sshd_config.d/*.conf' "$main"
    changed=1
  fi
  # Port lines add up in sshd: keep only ours.
  if grep -qE '^[[:space:]]*Port[[:space:]]' "$main"; then
    sed -i -E 's/^([[:space:]]*Port[[:space:]])/#\1/' "$main"
    changed=1
  fi
  # 00- sorts before cloud-init's 50-cloud-init.conf; sshd keeps the first value it reads.
  local keep=""
  if [ "$KEEP_22" = 1 ]; then
    # Port lines add up: 22 as well, until the deployer's close-22 script removes both lines.
    keep=$'# pnp:keep-22 until the deployer reaches the hardened port from outside\nPort 22\n'
  fi
  if write_if_changed "$SSHD_DROPIN" 0644 <<EOF; then changed=1; fi
# Pnp node SSH hardening (provision-node.sh).
${keep}Port ${SSH_PORT}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
PermitEmptyPasswords no
X11Forwarding no
MaxAuthTries 3
LoginGraceTime 30
ClientAliveInterval 60
ClientAliveCountMax 5
EOF
  mkdir -p /run/sshd
  if ! sshd -t; then
    restore_sshd
    die "sshd rejected the hardened configuration; restored the previous one"
  fi
  if [ "$changed" = 0 ] && sshd_answers_on "$SSH_PORT"; then
    log "sshd already on ${SSH_PORT}"
  else
    # Ubuntu 22.10+ starts sshd from ssh.socket, which pins port 22; use the service
    # instead so `Port` applies. Running sessions belong to their own processes and stay.
    if systemctl list-unit-files ssh.socket >/dev/null 2>&1 && systemctl is-enabled ssh.socket >/dev/null 2>&1; then
      systemctl disable --now ssh.socket >/dev/null 2>&1 || true
      rm -f /etc/systemd/system/ssh.service.d/00-socket.conf /etc/systemd/system/ssh.socket.d/addresses.conf
      systemctl daemon-reload
    fi
    systemctl enable ssh.service >/dev/null 2>&1 || true
    changed "sshd moved to ${SSH_PORT}"
    if ! systemctl restart ssh.service; then
      restore_sshd
      die "sshd did not restart on the hardened configuration; restored the previous one"
    fi
    local i
    for i in $(seq 1 40); do
      sshd_answers_on "$SSH_PORT" && break
      if [ "$i" = 40 ]; then
        restore_sshd
        die "sshd does not answer on ${SSH_PORT}; restored the previous configuration, port 22 left open"
      fi
      sleep 0.5
    done
    log "sshd answers on ${SSH_PORT}"
  fi
  rm -f "$SSHD_BACKUP"
  SSHD_BACKUP=
  # Only now, with sshd answering on the hardened port, is it safe to close 22.
  sshd_answers_on "$SSH_PORT" || die "sshd does not answer on ${SSH_PORT}; port 22 left open"
  if [ "$KEEP_22" = 1 ]; then
    log "port 22 kept open until the deployer reaches ${SSH_PORT} from outside"
  elif ufw status | grep -qE '^22/tcp[[:space:]]'; then
    ufw_do delete allow 22/tcp
  fi
}

journald_and_crash_monitor() {
  step "persistent journald + crash monitor"
  mkdir -p /var/log/journal
  if write_if_changed /etc/systemd/journald.conf.d/pn-persistent.conf 0644 <<'EOF'; then
[Journal]
Storage=persistent
SystemMaxUse=500M
EOF
    systemd-tmpfiles --create --prefix /var/log/journal >/dev/null 2>&1 || true
    systemctl restart systemd-journald
  fi
  if ! systemctl is-enabled --quiet cron 2>/dev/null || ! systemctl is-active --quiet cron 2>/dev/null; then
    systemctl enable --now cron >/dev/null 2>&1 || true
    changed "cron enabled and started"
  fi
  # cron.d file names must not contain dots. The script arrives with the stack (step 6).
  write_if_changed /etc/cron.d/k2s-crash-monitor 0644 <<EOF || true
# Pnp: watch the k2s stack every 5 minutes (provision-node.sh).
SHELL=/bin/bash
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
*/5 * * * * root [ -f ${DEPLOY_DIR}/k2s-crash-monitor.sh ] && /bin/bash ${DEPLOY_DIR}/k2s-crash-monitor.sh >/dev/null 2>&1
EOF
}

auto_update_cron() {
  step "auto-update cron"
  # A fixed time per host (from its name), so nodes do not all pull at once.
  local sum minute hour
  sum=$(hostname | cksum | awk '{print $1}')
  minute=$((sum % 60))
  hour=$(((sum / 60) % 6 + 2))
  write_if_changed /etc/cron.d/k2s-auto-update 0644 <<EOF || true
# Pnp: pull + up -d the k2s stack daily (provision-node.sh). Never down.
SHELL=/bin/bash
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
${minute} ${hour} * * * root [ -f ${DEPLOY_DIR}/auto-update.sh ] && /bin/bash ${DEPLOY_DIR}/auto-update.sh >/dev/null 2>&1
EOF
}

deploy_dir() {
  step "deploy dir ${DEPLOY_DIR}"
  if [ ! -d "$DEPLOY_DIR" ]; then
    changed "$DEPLOY_DIR"
  fi
  install -d -m 0755 -o root -g root "$DEPLOY_DIR"
}

usage() {
  printf 'usage: provision-node.sh [--docker=docker|distro]\n' >&2
  exit 2
}

main() {
  # The script itself arrives on stdin (`bash -s`): nothing below may read from it.
  exec </dev/null
  local a
  for a in "$@"; do
    case "$a" in
      --docker=*) DOCKER_SOURCE=${a#--docker=} ;;
      -h | --help) usage ;;
      *) warn "unknown argument: $a"; usage ;;
    esac
  done
  preflight
  # A second run (say, from a deployer restarted mid-prep) waits for the first one.
  exec 8>/run/provision-node.lock
  flock 8
  # cloud-init first: the check's apt-get update would race it for apt's lists lock
  # (DPkg::Lock::Timeout does not cover that lock). Waiting changes nothing on the node.
  wait_for_boot
  check_docker_source
  set_timezone
  remove_snapd
  make_swap
  base_packages
  install_docker
  enable_ipv6
  enable_bbr
  docker_daemon_json
  setup_ufw
  setup_ufw_docker
  harden_ssh
  journald_and_crash_monitor
  auto_update_cron
  deploy_dir
  log "done: SSH on ${SSH_PORT} for ${ADMIN} (root may not log in), Docker $(docker --version 2>/dev/null | awk '{print $3}' | tr -d ,), deploy dir ${DEPLOY_DIR}"
  if [ "${#CHANGES[@]}" -eq 0 ]; then
    log "nothing changed (already provisioned)"
  else
    log "${#CHANGES[@]} change(s) made"
  fi
}

main "$@"
