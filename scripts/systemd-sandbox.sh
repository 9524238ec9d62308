#!/usr/bin/env bash
# systemd-sandbox.sh - a throw-away, real systemd (PID 1) for Nebula's integration tests, on hosts whose
# PID 1 is not systemd (CI VMs, containers with privileges).
#
#   scripts/systemd-sandbox.sh up   NAME [PATH...]   boot; PATHs are bind-mounted read-write at the same place
#   scripts/systemd-sandbox.sh down NAME             orderly halt and cleanup (idempotent)
#   scripts/systemd-sandbox.sh exec NAME CMD...      run CMD inside the container (all its namespaces)
#
# How: systemd-nspawn --boot on a tmpfs-backed overlay of the host's own / (no image to build; writes vanish
# on down). Only basic.target boots (journald, dbus, tmpfiles), so none of the host's services start inside.
# The container shares the host's network namespace: a unit's TCP port is reachable on 127.0.0.1.
# The container has its own /tmp: anything a test shares with units must live under a bound PATH.
#
# State: /tmp/nebula-sdci-NAME/env (shell syntax) with SDCI_LEADER (host pid of the container's PID 1),
# SDCI_ROOT (/proc/PID/root: the container's files), SDCI_DBUS (system bus address usable from the host),
# SDCI_EXEC (a wrapper that runs a command inside).
#
# Knobs: SDCI_BOOT_TIMEOUT (s, default 45), SDCI_DOWN_TIMEOUT (s, default 20), SDCI_LOWER (the tree the
# overlay shows, default the host's /: e.g. a debootstrapped root of another release, scripts/debian-root.sh).
# Facts this relies on (systemd 252, cgroup v1 hybrid host): see the project's testing docs. Resource
# limits (MemoryMax=, CPUQuota=) are not enforced inside: tests must not assert them.
set -euo pipefail

die() { echo "systemd-sandbox: $*" >&2; exit 1; }
usage() { die "usage: $0 up NAME [PATH...] | down NAME | exec NAME CMD..."; }

[ $# -ge 2 ] || usage
CMD=$1 NAME=$2; shift 2
case $NAME in *[!A-Za-z0-9_-]*|'') die "NAME must be letters, digits, '-' or '_'";; esac
STATE=/tmp/nebula-sdci-$NAME
MACHINE=nebula-$NAME

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

up() {
    local boot_timeout=${SDCI_BOOT_TIMEOUT:-45} lower=${SDCI_LOWER:-/}
    [ "$(id -u)" = 0 ] || die "must run as root (nspawn, overlay, cgroups)"
    command -v systemd-nspawn >/dev/null || die "systemd-nspawn missing: apt-get install systemd-container dbus"
    if [ -f "$STATE/nspawn.pid" ] && alive "$(cat "$STATE/nspawn.pid")"; then
        die "sandbox $NAME already running; run '$0 down $NAME' first"
    fi
    for p in "$@"; do [ -d "$p" ] || die "bind path $p is not a directory"; done
    [ -x "$lower/lib/systemd/systemd" ] || die "SDCI_LOWER=$lower has no systemd"
    rm -rf "$STATE"; mkdir -p "$STATE/mnt"

    # A cgroup of our own per sandbox: nspawn --keep-unit puts "supervisor" and "payload" under the caller's
    # cgroup, so two sandboxes started from one shell would otherwise share them.
    local cg_dirs="" h base cur d
    for h in systemd unified; do
        case $h in
            systemd) base=/sys/fs/cgroup/systemd; cur=$(awk -F: '$2=="name=systemd"{print $3}' /proc/self/cgroup);;
            unified) base=/sys/fs/cgroup/unified; cur=$(awk -F: '$1=="0"{print $3}' /proc/self/cgroup);;
        esac
        [ -d "$base" ] || continue
        d=$base${cur%/}/nebula-sdci-$NAME; mkdir -p "$d"; cg_dirs="$cg_dirs $d"
    done
    echo "CG_DIRS='$cg_dirs'" > "$STATE/cgroups"

    local nspawn_args=(--machine="$MACHINE" --register=no --keep-unit --boot --console=read-only
                       --setenv=SDCI=1)
    for p in "$@"; do nspawn_args+=(--bind="$(realpath "$p")"); done

    # The launcher runs in a private mount namespace: the overlay and tmpfs never appear on the host.
    cat > "$STATE/launch.sh" <<EOF
#!/usr/bin/env bash
set -euo pipefail
echo \$\$ > "$STATE/nspawn.pid"
for d in $cg_dirs; do echo \$\$ > "\$d/cgroup.procs"; done
M=$STATE/mnt
mount -t tmpfs -o mode=755 nebula-sdci-$NAME "\$M"
mkdir -p "\$M/upper" "\$M/work" "\$M/root"
mount -t overlay overlay -o "lowerdir=$lower,upperdir=\$M/upper,workdir=\$M/work" "\$M/root"
R=\$M/root
systemd-id128 new > "\$R/etc/machine-id"
echo "$MACHINE" > "\$R/etc/hostname"
mkdir -p "\$R/etc/systemd/system" "\$R/etc/tmpfiles.d"
printf '[Unit]\nDescription=Nebula test boot (basic.target only)\nRequires=basic.target\nAfter=basic.target\nAllowIsolate=yes\n' \
    > "\$R/etc/systemd/system/nebula-sdci.target"
ln -sf /dev/null "\$R/etc/systemd/system/timers.target"
# Debian wipes /tmp at boot; bound paths may live under it.
echo 'd /tmp 1777 root root -' > "\$R/etc/tmpfiles.d/tmp.conf"
# nspawn keeps scratch state under /run/systemd/nspawn*: keep it off the host's /run.
mount -t tmpfs -o mode=755 nebula-sdci-run /run
# systemd 256+ (Debian 13) boots on this cgroup v1 (hybrid) host only when told to; in a container it reads
# such options from its own command line. Older systemd ignores the word.
exec systemd-nspawn -D "\$R" ${nspawn_args[*]@Q} -- systemd.unit=nebula-sdci.target SYSTEMD_CGROUP_ENABLE_LEGACY_FORCE=1
EOF
    chmod +x "$STATE/launch.sh"

    local t0; t0=$(date +%s.%N)
    setsid unshare --mount --propagation private "$STATE/launch.sh" > "$STATE/console.log" 2>&1 < /dev/null &
    for _ in $(seq 100); do [ -s "$STATE/nspawn.pid" ] && break; sleep 0.05; done
    local nspawn; nspawn=$(cat "$STATE/nspawn.pid")

    # The container's PID 1: nspawn's child named systemd in another pid namespace.
    local mypidns leader="" deadline c ns
    mypidns=$(readlink /proc/self/ns/pid)
    deadline=$(( $(date +%s) + boot_timeout ))
    while [ -z "$leader" ]; do
        alive "$nspawn" || { cat "$STATE/console.log" >&2; die "nspawn exited"; }
        [ "$(date +%s)" -lt "$deadline" ] || die "timeout waiting for the container's PID 1"
        for c in $(cat /proc/"$nspawn"/task/*/children 2>/dev/null); do
            ns=$(readlink /proc/"$c"/ns/pid 2>/dev/null) || continue
            [ "$ns" != "$mypidns" ] && [ "$(cat /proc/"$c"/comm 2>/dev/null)" = systemd ] && leader=$c
        done
        [ -n "$leader" ] || sleep 0.1
    done
    echo "$leader" > "$STATE/leader.pid"

    cat > "$STATE/exec" <<EOF
#!/bin/sh
# Run a command inside the sandbox, in the same directory when it exists there.
L=\$(cat $STATE/leader.pid)
if [ -d "/proc/\$L/root\$PWD" ]; then exec nsenter -t "\$L" -a --wd="/proc/\$L/root\$PWD" -- "\$@"; fi
exec nsenter -t "\$L" -a -- "\$@"
EOF
    chmod +x "$STATE/exec"

    until [ -S "/proc/$leader/root/run/systemd/private" ]; do
        alive "$leader" || { cat "$STATE/console.log" >&2; die "the container's PID 1 died"; }
        [ "$(date +%s)" -lt "$deadline" ] || die "timeout waiting for /run/systemd/private"
        sleep 0.1
    done
    local left st
    left=$(( deadline - $(date +%s) )); [ "$left" -gt 0 ] || left=1
    st=$(timeout "$left" "$STATE/exec" systemctl is-system-running --wait 2>&1) || true
    case "$st" in
        running|degraded) ;;
        *) cat "$STATE/console.log" >&2; die "system did not come up: '$st'";;
    esac
    # The system bus is socket-activated: the first call starts dbus-daemon.
    timeout 20 "$STATE/exec" busctl --system --quiet call org.freedesktop.DBus /org/freedesktop/DBus \
        org.freedesktop.DBus GetId >/dev/null 2>&1 || true
    local t1; t1=$(date +%s.%N)

    cat > "$STATE/env" <<EOF
SDCI_NAME=$NAME
SDCI_STATE=$STATE
SDCI_LEADER=$leader
SDCI_ROOT=/proc/$leader/root
SDCI_EXEC=$STATE/exec
SDCI_DBUS=unix:path=/proc/$leader/root/run/dbus/system_bus_socket
EOF
    echo "systemd-sandbox: $NAME up in $(awk "BEGIN{printf \"%.1f\", $t1-$t0}") s (state=$st leader=$leader env=$STATE/env)"
}

down() {
    local timeout=${SDCI_DOWN_TIMEOUT:-20}
    [ -d "$STATE" ] || { echo "systemd-sandbox: $NAME not running"; return 0; }
    local t0 nspawn leader
    t0=$(date +%s.%N)
    nspawn=$(cat "$STATE/nspawn.pid" 2>/dev/null || true)
    leader=$(cat "$STATE/leader.pid" 2>/dev/null || true)
    # Only the pids recorded at `up` are signalled, and only while they still are what we started.
    if alive "$nspawn" && [ "$(cat /proc/"$nspawn"/comm 2>/dev/null)" = systemd-nspawn ]; then
        kill -TERM "$nspawn"      # nspawn asks the container's systemd for a clean halt
        for _ in $(seq $((timeout * 10))); do alive "$nspawn" || break; sleep 0.1; done
        if alive "$nspawn"; then
            echo "systemd-sandbox: nspawn did not exit in ${timeout}s, SIGKILL" >&2
            alive "$leader" && kill -KILL "$leader"     # PID 1 of the pid namespace: takes all with it
            kill -KILL "$nspawn"
            sleep 0.5
        fi
    elif alive "$leader" && [ "$(cat /proc/"$leader"/comm 2>/dev/null)" = systemd ]; then
        kill -KILL "$leader"; sleep 0.5
    fi
    if [ -f "$STATE/cgroups" ]; then
        . "$STATE/cgroups"
        for d in ${CG_DIRS:-}; do
            [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
            [ -d "$d" ] && echo "systemd-sandbox: warning: could not remove $d (processes left?)" >&2
        done
    fi
    mountpoint -q "$STATE/mnt" 2>/dev/null && umount -l "$STATE/mnt"
    cp "$STATE/console.log" "/tmp/nebula-sdci-$NAME.console.log" 2>/dev/null || true
    rm -rf "$STATE"
    local t1; t1=$(date +%s.%N)
    echo "systemd-sandbox: $NAME down in $(awk "BEGIN{printf \"%.1f\", $t1-$t0}") s"
}

case $CMD in
    up) up "$@";;
    down) down;;
    exec) [ -x "$STATE/exec" ] || die "sandbox $NAME is not running"; exec "$STATE/exec" "$@";;
    *) usage;;
esac
