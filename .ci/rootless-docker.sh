#!/usr/bin/env bash
# Real rootless Docker daemons for the end-to-end tests (tests/e2e), on a machine without systemd.
#
#   bash .ci/rootless-docker.sh start   # as root; safe to run again while they run
#   bash .ci/rootless-docker.sh stop    # as root; safe when nothing runs
#   bash .ci/rootless-docker.sh rootfs  # prints the path of the busybox image's tar (the system tests)
#
# start: installs what is missing (Debian 12), makes the test users dr-alice and dr-bob (each with
# a rootless daemon at /run/user/<uid>/docker.sock and a local busybox image) and dr-carol (no
# daemon, for the router's error path), and waits until both daemons answer.
# stop: stops the daemons and everything they started, whatever state they are in.
#
# State (pid files, daemon logs) lives in $DR_E2E_STATE (default /run/docker-router-e2e).
set -euo pipefail

DAEMON_USERS=(dr-alice dr-bob)
NO_DAEMON_USER=dr-carol
IMAGE=dr-busybox:latest
# Bump when the image's contents change: start re-imports an image without this label value.
IMAGE_REVISION=2
STATE=${DR_E2E_STATE:-/run/docker-router-e2e}
START_DEADLINE=${DR_E2E_START_DEADLINE:-60}
STOP_DEADLINE=${DR_E2E_STOP_DEADLINE:-30}
PACKAGES=(docker.io rootlesskit uidmap busybox-static curl)
ROOTLESS_SH=/usr/share/docker.io/contrib/dockerd-rootless.sh
SAFE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { echo "rootless-docker: $*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# Installs only what is missing, so a second run needs no network.
installPackages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
    [ -x "$ROOTLESS_SH" ] || die "$ROOTLESS_SH is missing (package docker.io)"
    command -v docker >/dev/null || die "no docker CLI on PATH"
}

# The largest end of any subordinate id range in FILE (or the default start), so that a range we
# add never overlaps another user's.
nextSubidStart() {
    awk -F: 'BEGIN { m = 100000 } NF == 3 && $2 + $3 > m { m = $2 + $3 } END { print m }' "$1"
}

ensureUser() {
    local name=$1 uid
    if ! id -u "$name" >/dev/null 2>&1; then
        log "creating user $name"
        useradd --create-home --shell /bin/bash "$name"
    fi
    uid=$(id -u "$name")
    local home; home=$(getent passwd "$name" | cut -d: -f6)
    [ -d "$home" ] || install -d -m 0700 -o "$name" -g "$(id -g "$name")" "$home"
    # useradd adds subordinate ids from login.defs; an older user or another useradd may not have.
    touch /etc/subuid /etc/subgid
    if ! grep -q "^$name:" /etc/subuid; then
        local s; s=$(nextSubidStart /etc/subuid)
        usermod --add-subuids "$s-$((s + 65535))" "$name"
    fi
    if ! grep -q "^$name:" /etc/subgid; then
        local s; s=$(nextSubidStart /etc/subgid)
        usermod --add-subgids "$s-$((s + 65535))" "$name"
    fi
    # What a login session would have made: the runtime directory the router's default template names.
    install -d -m 0755 -o root -g root /run/user
    install -d -m 0700 -o "$name" -g "$(id -g "$name")" "/run/user/$uid"
}

sockPath() { echo "/run/user/$(id -u "$1")/docker.sock"; }

ping() {
    curl -sf --max-time 5 --unix-socket "$(sockPath "$1")" http://x/_ping >/dev/null 2>&1
}

# Runs a command as NAME with the environment a rootless docker user would have.
asUser() {
    local name=$1 uid home; shift
    uid=$(id -u "$name"); home=$(getent passwd "$name" | cut -d: -f6)
    (cd /tmp && setpriv --reuid="$uid" --regid="$(id -g "$name")" --init-groups \
        env -i PATH="$SAFE_PATH" HOME="$home" USER="$name" LOGNAME="$name" \
        XDG_RUNTIME_DIR="/run/user/$uid" DOCKER_HOST="unix:///run/user/$uid/docker.sock" "$@")
}

pidAlive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

startDaemon() {
    local name=$1 pidfile="$STATE/$1.pid" logfile="$STATE/$1.log"
    if pidAlive "$pidfile"; then
        log "$name: daemon already running (pid $(cat "$pidfile"))"
        return
    fi
    log "$name: starting rootless dockerd"
    : >"$logfile"
    # setsid, setpriv, env and the script all exec, so $! is rootlesskit's pid; setsid gives it a
    # session of its own, away from our terminal's signals. cwd /tmp: the user may not be able to
    # enter ours. The host's network (no slirp4netns: /dev/net/tun can't be opened here), no port
    # driver, bridge, iptables or forwarding: the tests' containers all run with --network none.
    (cd /tmp && exec setsid setpriv --reuid="$(id -u "$name")" --regid="$(id -g "$name")" --init-groups \
        env -i PATH="$SAFE_PATH" HOME="$(getent passwd "$name" | cut -d: -f6)" \
        USER="$name" LOGNAME="$name" XDG_RUNTIME_DIR="/run/user/$(id -u "$name")" \
        DOCKERD_ROOTLESS_ROOTLESSKIT_NET=host DOCKERD_ROOTLESS_ROOTLESSKIT_PORT_DRIVER=none \
        "$ROOTLESS_SH" --storage-driver=vfs --iptables=false --bridge=none --ip-forward=false \
        </dev/null >>"$logfile" 2>&1) &
    echo $! >"$pidfile"
}

waitDaemon() {
    local name=$1 deadline=$((SECONDS + START_DEADLINE))
    until ping "$name"; do
        if ! pidAlive "$STATE/$name.pid" || [ $SECONDS -ge $deadline ]; then
            log "$name: daemon exited or did not answer on $(sockPath "$name") within ${START_DEADLINE}s; log tail:"
            tail -n 40 "$STATE/$name.log" >&2 || true
            die "$name: rootless dockerd is not usable"
        fi
        sleep 0.5
    done
    log "$name: daemon answers on $(sockPath "$name")"
}

# A busybox root filesystem imported as $IMAGE: no registry is reachable.
ensureImage() {
    local name=$1 label
    label=$(asUser "$name" docker image inspect --format '{{index .Config.Labels "dr-e2e-revision"}}' "$IMAGE" 2>/dev/null || true)
    if [ "$label" = "$IMAGE_REVISION" ]; then
        return
    fi
    log "$name: importing $IMAGE (revision $IMAGE_REVISION)"
    asUser "$name" docker import --change "LABEL dr-e2e-revision=$IMAGE_REVISION" - "$IMAGE" \
        <"$(rootfsTar)" >/dev/null
    # As a non-root user too: the root directory must be walkable by anyone.
    asUser "$name" docker run --rm --network none --user 1000:1000 "$IMAGE" true \
        || die "$name: a container of $IMAGE does not run; see $STATE/$name.log"
}

# The tar of a busybox root filesystem, made once per revision.
rootfsTar() {
    local tar="$STATE/rootfs-$IMAGE_REVISION.tar" tmp applet
    if [ ! -s "$tar" ]; then
        tmp=$(mktemp -d)
        # mktemp's 0700 would become the image's / and lock out non-root container users.
        chmod 0755 "$tmp"
        mkdir -p "$tmp"/{bin,etc,tmp,proc,sys,dev,root}
        chmod 1777 "$tmp/tmp"
        cp "$(command -v busybox)" "$tmp/bin/busybox"
        # What `busybox --install -s` does, with relative links (it would link to the host path).
        for applet in $("$tmp/bin/busybox" --list); do
            [ "$applet" = busybox ] || ln -sf busybox "$tmp/bin/$applet"
        done
        echo 'root:x:0:0:root:/root:/bin/sh' >"$tmp/etc/passwd"
        echo 'root:x:0:' >"$tmp/etc/group"
        tar -C "$tmp" --owner=0 --group=0 --numeric-owner -cf "$tar.part" .
        mv "$tar.part" "$tar"
        rm -rf "$tmp"
    fi
    echo "$tar"
}

# PID and every process below it, so that we end only what we started.
descendants() {
    local pid=$1 child
    echo "$pid"
    for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
        descendants "$child"
    done
}

# Asks the daemon to stop; stopDaemon waits. Split so both daemons shut down at the same time.
signalDaemon() {
    local pidfile="$STATE/$1.pid"
    if pidAlive "$pidfile"; then
        log "$1: stopping daemon (pid $(cat "$pidfile"))"
        # rootlesskit passes SIGTERM to dockerd, which stops its containers and containerd.
        kill -TERM "$(cat "$pidfile")" 2>/dev/null || true
    fi
}

stopDaemon() {
    local name=$1 pidfile="$STATE/$1.pid" pid pids deadline uid
    uid=$(id -u "$name" 2>/dev/null) || return 0
    if pidAlive "$pidfile"; then
        pid=$(cat "$pidfile")
        deadline=$((SECONDS + STOP_DEADLINE))
        while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            pids=$(descendants "$pid")
            log "$name: still running after ${STOP_DEADLINE}s, killing $(echo $pids)"
            kill -KILL $pids 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
    # Leftovers of a killed daemon (shims reparented to init): only this test user's processes.
    pids=$(ps -o pid= -u "$uid" 2>/dev/null || true)
    if [ -n "$pids" ]; then
        log "$name: killing leftover processes $(echo $pids)"
        kill -KILL $pids 2>/dev/null || true
    fi
    rm -rf "/run/user/$uid/docker.sock" "/run/user/$uid/docker.pid" "/run/user/$uid/dockerd-rootless"
}

start() {
    [ "$(id -u)" = 0 ] || die "run as root"
    installPackages
    install -d -m 0755 "$STATE"
    local name
    for name in "${DAEMON_USERS[@]}" "$NO_DAEMON_USER"; do ensureUser "$name"; done
    for name in "${DAEMON_USERS[@]}"; do startDaemon "$name"; done
    for name in "${DAEMON_USERS[@]}"; do waitDaemon "$name"; done
    for name in "${DAEMON_USERS[@]}"; do ensureImage "$name"; done
    log "ready: ${DAEMON_USERS[*]} have $IMAGE; $NO_DAEMON_USER has no daemon"
}

stop() {
    [ "$(id -u)" = 0 ] || die "run as root"
    local name
    for name in "${DAEMON_USERS[@]}"; do signalDaemon "$name"; done
    for name in "${DAEMON_USERS[@]}"; do stopDaemon "$name"; done
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    rootfs) install -d -m 0755 "$STATE" && rootfsTar ;;
    *) echo "usage: $0 start|stop|rootfs" >&2; exit 2 ;;
esac
