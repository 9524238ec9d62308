#!/usr/bin/env bash
# debian-root.sh - a throw-away Debian root (debootstrap), cached by date, for building and testing the
# package of a release other than the host's (the Debian 13 .deb is built with trixie's own Python inside it,
# and tested in a real systemd booted from an overlay of it).
#
#   scripts/debian-root.sh trixie      print the root's path, making it first when there is none fresh enough
#                                      (bookworm too, for a Debian 13 host building the Debian 12 package)
#
# The root is made once and reused by every build and test until it is NEBULA_ROOT_MAX_AGE_DAYS old
# (default 7: a week-old root still has the release's current packages but for a few point updates); a new
# one replaces it then. Nothing is ever run in the root itself but the builds (in a chroot); tests boot an
# overlay of it, so it stays as debootstrap left it.
#
# Environment: NEBULA_CACHE (default /var/cache/nebula-dev), NEBULA_ROOT_MAX_AGE_DAYS (default 7),
# NEBULA_DEBIAN_MIRROR (default: the host's own Debian mirror, read from its apt sources).
# Needs: root, debootstrap, debian-archive-keyring (Debian 12's knows trixie's keys).
set -euo pipefail

export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8
log() { printf 'debian-root: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

suite=${1:-}
case $suite in
    bookworm|trixie) ;;
    *) die "usage: $0 bookworm|trixie (a supported release other than the host's)" ;;
esac
[[ $(id -u) == 0 ]] || die "must run as root (debootstrap)"
command -v debootstrap >/dev/null || die "debootstrap missing: apt-get install debootstrap"

# What the root holds: a bootable systemd (the package test), the package's dependencies (so `apt install
# ./nebula_*.deb` resolves offline), and the build's tools (trixie's python3.13 makes the staged venv,
# dpkg-dev computes its shared-library dependencies, trixie's lintian checks the result, gcc and python3-dev
# compile the gateway's data path for trixie's Python: scripts/compile_data_path.py).
packages=systemd,systemd-sysv,dbus,polkitd,libsystemd0,python3,python3-venv,python3-pip,ca-certificates
packages+=,dpkg-dev,binutils,lintian,procps,iproute2,gcc,python3-dev
# Virtual packages debootstrap cannot resolve by itself: polkitd needs a logind (libpam-systemd provides
# default-logind), lintian's libnet-ssleay-perl needs perl-openssl-abi-3.
packages+=,libpam-systemd,perl-openssl-defaults
cache=${NEBULA_CACHE:-/var/cache/nebula-dev}/roots
max_age=${NEBULA_ROOT_MAX_AGE_DAYS:-7}
key=$(printf '%s\n' "$suite" "$packages" | sha256sum | cut -c1-8)

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9  # one debootstrap at a time; a second caller waits, then reuses its root

# Newest complete root of this suite and package list made within max_age days.
today=$(date -u +%Y%m%d)
for ((age = 0; age < max_age; age++)); do
    d=$cache/$suite-$key-$(date -u -d "$today - $age days" +%Y%m%d)
    if [[ -f $d/.complete ]]; then
        echo "$d"
        exit 0
    fi
done

mirror=${NEBULA_DEBIAN_MIRROR:-}
if [[ -z $mirror ]]; then
    # The first Debian archive the host's apt uses (deb822 .sources or one-line .list), wherever it is.
    mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2}' | grep '/debian/\?$' | head -1)
    [[ -n $mirror ]] || mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) {print $i; break}}' | grep '/debian/\?$' | head -1)
    [[ -n $mirror ]] || die "no Debian mirror in the host's apt sources: set NEBULA_DEBIAN_MIRROR"
fi

root=$cache/$suite-$key-$today
rm -rf "$root" "$root.tmp"
log "debootstrap $suite into $root.tmp (a few minutes; cached until $max_age days old)"
t0=$SECONDS
if ! debootstrap --variant=minbase --include="$packages" --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
        "$suite" "$root.tmp" "$mirror" >"$cache/$suite-debootstrap.log" 2>&1; then
    tail -20 "$cache/$suite-debootstrap.log" >&2
    die "debootstrap failed (log: $cache/$suite-debootstrap.log)"
fi
# apt inside the root uses the same mirror, with the release's security and point updates.
cat >"$root.tmp/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
EOF
# Downloaded .debs are not part of the image.
rm -f "$root.tmp"/var/cache/apt/archives/*.deb
chroot "$root.tmp" dpkg-query -W -f='${Package} ${Version}\n' >"$root.tmp/.packages"
touch "$root.tmp/.complete"
mv "$root.tmp" "$root"
# Older roots of this suite are superseded.
for old in "$cache/$suite"-*; do
    [[ $old == "$root" || ! -d $old ]] || rm -rf "$old"
done
log "made $root in $((SECONDS - t0)) s ($(du -sh "$root" | cut -f1), $(wc -l <"$root/.packages") packages)"
echo "$root"
