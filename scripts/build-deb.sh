#!/usr/bin/env bash
# Build the nebula Debian packages: a staged venv + dpkg-deb --build (see docs/packaging.md), one per release.
#
#   scripts/build-deb.sh [-o OUTDIR] [--release R]   build OUTDIR/nebula_<version>+deb<N>_amd64.deb for release
#                                                    R: bookworm (Debian 12, python3.11), trixie (Debian 13,
#                                                    python3.13), or all (the default: both); OUTDIR: dist
#   scripts/build-deb.sh --relock                    regenerate packaging/debian/requirements*.lock
#
# The control plane goes into its own venv at /opt/nebula/venv (inside a staging root), made by the release's
# own /usr/bin/python3.X and filled offline from a wheelhouse that holds exactly the hash-pinned versions of
# the release's lock (packaging/debian/requirements.lock for 3.11, requirements-py313.lock for 3.13). The
# wheelhouse is built once per lock (pip checks every hash) and reused: a warm build takes a few seconds.
# A release other than the host's is built inside a throw-away overlay of a debootstrapped root of that
# release (scripts/debian-root.sh, cached by date), by this same script run there with that release's Python,
# pip, dpkg-dev and lintian; the host keeps nothing of it but the .deb. Each package must pass its release's
# lintian (--fail-on error,warning).
# The vLLM engine runtime is not in this package (scripts/install-engine.sh).
#
# Environment: NEBULA_WHEELHOUSE (wheelhouse cache root, default ~/.cache/nebula/deb-wheelhouse),
# UV (the uv binary; default: the caller's `uv`; without one, Debian's pip does the same, slower),
# SOURCE_DATE_EPOCH (default: the changelog's date), NEBULA_CACHE (the roots: scripts/debian-root.sh).
# Needs: python3 python3-venv python3-pip dpkg-dev lintian gcc python3-dev (+ uv); another release: root,
# debootstrap. The only code compiled is the gateway's data path (scripts/compile_data_path.py, with mypyc).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
deb=$repo/packaging/debian
lock=$deb/requirements.lock

# Find uv before narrowing PATH (it may live behind a pyenv shim or in ~/.local/bin). From here on only
# Debian's tools and Debian's Python run: a pyenv python3 would build a venv no Debian host has.
uv=${UV:-$(command -v uv || true)}
if [[ -z $uv ]]; then  # where scripts/test.sh and quickstart.sh install it when the caller has none
    for c in "${XDG_CACHE_HOME:-$HOME/.cache}/nebula/uv/bin/uv" /var/cache/nebula-dev/uv/bin/uv \
             /opt/nebula/uv/bin/uv "$HOME/.local/bin/uv"; do
        [[ -x $c ]] && { uv=$c; break; }
    done
fi
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C.UTF-8 TZ=UTC PYTHONDONTWRITEBYTECODE=1
unset PYTHONPATH VIRTUAL_ENV
log() { printf 'build-deb: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

outdir=$repo/dist
relock=0
release=all
while (($#)); do
    case $1 in
        -o) outdir=$2; shift 2 ;;
        -o*) outdir=${1#-o}; shift ;;
        --release) release=$2; shift 2 ;;
        --release=*) release=${1#*=}; shift ;;
        --relock) relock=1; shift ;;
        -h|--help) sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

# The supported releases, each with the Debian major, the Python it ships and its lock.
releases=(bookworm trixie)
release_info() {  # release_info CODENAME: sets deb_major, pyver, lock
    case $1 in
        bookworm) deb_major=12 pyver=3.11 lock=$deb/requirements.lock ;;
        trixie) deb_major=13 pyver=3.13 lock=$deb/requirements-py313.lock ;;
        *) die "unknown release '$1': one of ${releases[*]} or all" ;;
    esac
}

if ((relock)); then
    [[ -n $uv ]] || die "--relock needs uv (set UV=/path/to/uv)"
    cd "$repo"
    for r in "${releases[@]}"; do
        release_info "$r"
        # Resolved for the target (CPython $pyver, x86_64), not for whatever Python runs uv. The current lock
        # (for a new release: the first release's) is the resolver's preference: versions move only as needed.
        cp "$lock" "$lock.tmp" 2>/dev/null || cp "$deb/requirements.lock" "$lock.tmp"
        "$uv" pip compile pyproject.toml --quiet --generate-hashes --python-version "$pyver" \
            --python-platform x86_64-unknown-linux-gnu --no-header -o "$lock.tmp"
        { cat <<EOF
# Locked runtime dependencies of the nebula .deb's control-plane venv (/opt/nebula/venv) for Debian $deb_major
# ($r, Python $pyver), with hashes. scripts/build-deb.sh installs exactly these versions (offline, from a
# wheelhouse built from this file). Regenerate after changing [project] dependencies in pyproject.toml, and
# commit the result:
#    scripts/build-deb.sh --relock
# which runs: uv pip compile pyproject.toml --generate-hashes --python-version $pyver
#             --python-platform x86_64-unknown-linux-gnu -o ${lock#"$repo"/}
EOF
          cat "$lock.tmp"; } >"$lock"
        rm -f "$lock.tmp"
        log "wrote $lock ($(grep -c '^[a-z0-9]' "$lock") packages)"
    done
    exit 0
fi

if [[ $release == all ]]; then
    for r in "${releases[@]}"; do
        "${BASH_SOURCE[0]}" -o "$outdir" --release "$r"
    done
    exit 0
fi
release_info "$release"
host_release=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")

if [[ $release != "$host_release" ]]; then
    # Another release: this script again, inside a throw-away overlay of that release's debootstrapped root,
    # so the venv is made by that release's Python and checked by its lintian. The repository is seen
    # read-only at the same path, the output and wheelhouse directories read-write; nothing else of the host.
    ((EUID == 0)) || die "building for $release on $host_release needs root (a chroot into a debootstrapped root)"
    root=$("$repo/scripts/debian-root.sh" "$release")
    mkdir -p "$outdir"
    outdir=$(realpath "$outdir")
    wh_root=${NEBULA_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/nebula/deb-wheelhouse}
    mkdir -p "$wh_root"
    wh_root=$(realpath "$wh_root")
    export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(dpkg-parsechangelog -l "$deb/changelog" -S Timestamp)}
    log "building for $release in an overlay of $root"
    unshare --mount --propagation private bash -euo pipefail -c '
        root=$1 repo=$2 outdir=$3 wh=$4 uv=$5; shift 5
        m=$(mktemp -d /tmp/nebula-deb-root.XXXXXX)
        mount -t tmpfs nebula-deb "$m"
        mkdir -p "$m/upper" "$m/work" "$m/merged"
        mount -t overlay overlay -o "lowerdir=$root,upperdir=$m/upper,workdir=$m/work" "$m/merged"
        r=$m/merged
        for d in "$repo" "$outdir" "$wh"; do mkdir -p "$r$d"; mount --bind "$d" "$r$d"; done
        mount -o remount,bind,ro "$r$repo"
        if [[ -n $uv ]]; then touch "$r/usr/local/bin/uv"; mount --bind "$uv" "$r/usr/local/bin/uv"; fi
        mount -t proc proc "$r/proc"
        mount --rbind /dev "$r/dev"
        # The host'"'"'s resolver and trust store (it holds a proxy'"'"'s CA where the network has one): the
        # wheelhouse is downloaded from inside.
        cp /etc/resolv.conf "$r/etc/resolv.conf"
        cp /etc/ssl/certs/ca-certificates.crt "$r/etc/ssl/certs/ca-certificates.crt"
        rc=0
        env -i HOME=/root PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 \
            SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
            SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" NEBULA_WHEELHOUSE="$wh" ${uv:+UV=/usr/local/bin/uv} \
            chroot "$r" "$repo/scripts/build-deb.sh" "$@" || rc=$?
        umount -R "$m/merged" 2>/dev/null || umount -l "$m/merged"
        umount "$m"
        rmdir "$m"
        exit $rc
    ' build "$root" "$repo" "$outdir" "$wh_root" "$uv" -o "$outdir" --release "$release"
    exit 0
fi

python=/usr/bin/python$pyver
[[ -x $python ]] || die "$python missing: apt-get install python$pyver python3-venv"

t0=$SECONDS
[[ -f $lock ]] || die "no $lock: run scripts/build-deb.sh --relock"
version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
          "$repo/pyproject.toml")
deb_version=$(dpkg-parsechangelog -l "$deb/changelog" -S Version)
[[ $deb_version == "$version" ]] \
    || die "packaging/debian/changelog is at $deb_version but pyproject.toml at $version: add a changelog entry"
# One package per release, told apart by a +debN suffix: both can sit in one apt repository, and a host
# upgraded from Debian 12 to 13 moves from +deb12 to +deb13 as an upgrade (deb12 sorts before deb13).
pkg_version=$version+deb$deb_major
# The same inputs give the same file dates, whenever and wherever the package is built.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(dpkg-parsechangelog -l "$deb/changelog" -S Timestamp)}

# --- wheelhouse: the locked wheels, built once per lock ------------------------------------------------
wh_root=${NEBULA_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/nebula/deb-wheelhouse}
key=$( { cat "$lock"; "$python" -V; } | sha256sum | cut -c1-16)
wh=$wh_root/$key
if [[ ! -f $wh/.complete ]]; then
    mkdir -p "$wh_root"
    exec 9>"$wh_root/.lock"
    flock 9
    if [[ ! -f $wh/.complete ]]; then
        log "building wheelhouse $wh"
        rm -rf "$wh" "$wh.tmp"
        # pip checks each downloaded file against the lock's hashes (pure-Python sdists become wheels).
        "$python" -m pip wheel --quiet --disable-pip-version-check --no-cache-dir --require-hashes --no-deps \
            -r "$lock" -w "$wh.tmp" 2>"$wh_root/pip.log" || { cat "$wh_root/pip.log" >&2; die "pip wheel failed"; }
        touch "$wh.tmp/.complete"
        mv "$wh.tmp" "$wh"
    fi
    exec 9>&-
fi

# --- staging root -----------------------------------------------------------------------------------
work=$(mktemp -d /tmp/nebula-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
stage=$work/root
venv=$stage/opt/nebula/venv
mkdir -p "$stage"

# The project's wheel, built from a copy so that setuptools' build/ and *.egg-info never land in the checkout.
mkdir -p "$work/src"
cp "$repo/pyproject.toml" "$work/src/"
(cd "$repo" && tar --exclude=__pycache__ --exclude='*.pyc' -cf - nebula) | tar -C "$work/src" -xf -
# uv when there is one (faster); Debian's pip otherwise. Either fetches the build backend (setuptools)
# from its cache or the index.
if [[ -n $uv ]]; then
    "$uv" build --quiet --wheel --python "$python" -o "$work/wheel" "$work/src" 2>"$work/build.log"
else
    "$python" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$work/wheel" "$work/src" \
        2>"$work/build.log"
fi || { cat "$work/build.log" >&2; die "building the nebula wheel failed"; }

"$python" -m venv --without-pip "$venv"
# Exactly the locked versions (name==version; the hashes were checked when the wheelhouse was built), no
# resolver, no index.
sed -n 's/^\([A-Za-z0-9._-]*==[^ ;]*\).*/\1/p' "$lock" >"$work/pins.txt"
if [[ -n $uv ]]; then
    "$uv" pip install --quiet --python "$venv/bin/python" --offline --no-index --no-deps --no-cache \
        --link-mode=copy --find-links "$wh" -r "$work/pins.txt" "$work"/wheel/nebula-*.whl
    # Every requirement of nebula and its dependencies must hold: catches a lock older than pyproject.toml.
    "$uv" pip check --quiet --python "$venv/bin/python" || die "the venv is inconsistent: run --relock"
else
    pip=("$python" -m pip --disable-pip-version-check --python "$venv/bin/python")
    "${pip[@]}" install --quiet --no-index --no-deps --no-compile --find-links "$wh" -r "$work/pins.txt" \
        "$work"/wheel/nebula-*.whl
    "${pip[@]}" check >/dev/null || { "${pip[@]}" check >&2; die "the venv is inconsistent: run --relock"; }
fi

# --- the compiled data path ----------------------------------------------------------------------------
# The gateway's request and answer parsing, request rules and relay, compiled with mypyc beside their sources
# in the venv (Python imports an extension module before its .py): a quarter less of the gateway's Python per
# request, 4% less of its whole CPU at the median (scripts/compile_data_path.py has the figures). This
# release's Python compiles them in a throw-away venv that holds the locked dependencies (mypy reads their
# types) and mypy and setuptools at the test lock's versions, cached beside the wheelhouse, so only a
# machine's first build fetches them.
tools=$work/compile-venv
site=$venv/lib/python$pyver/site-packages
"$python" -m venv --without-pip "$tools"
if [[ -n $uv ]]; then
    UV_CACHE_DIR=$wh_root/uv-cache "$uv" pip install --quiet --python "$tools/bin/python" --find-links "$wh" \
        -c "$repo/tests/requirements.lock" -r "$work/pins.txt" mypy setuptools 2>"$work/compile.log"
else
    "$python" -m pip --disable-pip-version-check --python "$tools/bin/python" install --quiet \
        --cache-dir "$wh_root/pip-cache" --find-links "$wh" -c "$repo/tests/requirements.lock" -r "$work/pins.txt" \
        mypy setuptools 2>"$work/compile.log"
fi || { cat "$work/compile.log" >&2; die "installing mypy to compile the data path failed"; }
"$tools/bin/python" "$repo/scripts/compile_data_path.py" "$work/src" --install "$site" >"$work/compiled" \
    2>"$work/compile.log" \
    || { cat "$work/compile.log" >&2; die "compiling the data path failed (it needs gcc and python$pyver-dev)"; }
# Listed in nebula's RECORD (the hashes are filled in below, with every other row's).
record=$(echo "$site"/nebula-*.dist-info/RECORD)
sed "s|^$site/||; s|\$|,,|" "$work/compiled" >>"$record"
"$venv/bin/python" "$repo/scripts/compile_data_path.py" --check "$site" \
    || die "the venv does not load the compiled data path"
log "compiled the data path: $(wc -l <"$work/compiled") extension modules"

# /etc/nebula: the repository's etc/nebula/*.toml, each a conffile (the reference nebula.toml, every setting
# documented and commented out; the model catalog; other shipped data files). Admins put their settings in
# nebula.d/ and their catalog entries in catalog.d/, which never trigger a conffile prompt.
mkdir -p "$stage/etc/nebula/nebula.d" "$stage/etc/nebula/catalog.d" "$stage/etc/nebula/engines"
install -m 0644 -t "$stage/etc/nebula" "$repo"/etc/nebula/*.toml
"$venv/bin/nebula" config init --stdout | cmp -s - "$stage/etc/nebula/nebula.toml" \
    || die "etc/nebula/nebula.toml is not what this build's config generates: run" \
           "python -m nebula config init --stdout > etc/nebula/nebula.toml, and commit it"
"$python" - "$stage/etc/nebula/nebula.toml" <<'EOF'
import sys, tomllib
data = tomllib.load(open(sys.argv[1], "rb"))
if any(data.values()):
    sys.exit(f"build-deb: {sys.argv[1]} sets values; the packaged file must be comment-only: {data}")
EOF

# Make the venv relocatable to /opt/nebula/venv: the staging prefix appears in bin/ shebangs and
# pyvenv.cfg. Activation scripts are for interactive use, not for a service venv: dropped. So is
# direct_url.json (it names the build's temporary wheel path).
rm -f "$venv"/bin/activate* "$venv"/bin/Activate.ps1
find "$venv" -name direct_url.json -delete
# uv's own cache metadata (install timestamps) is no part of an installed distribution.
find "$venv" -name uv_cache.json -delete
{ grep -lIr --null -F "$stage" "$venv/bin" "$venv/pyvenv.cfg" || true; } | xargs -0 -r sed -i "s|$stage||g"
find "$venv" -depth -type d -name __pycache__ -exec rm -rf {} +
# Console scripts of dependencies (idna, ...) are not this package's commands; the empty include/ is unused.
find "$venv/bin" -type f ! -name nebula -delete
# (Python 3.13's venv also writes a .gitignore: no VCS files in a package.)
rm -rf "$venv/include" "$venv/.lock" "$venv/.gitignore"
# Library modules are not scripts: a few wheels ship modules with a `#!/usr/bin/env python` line, or
# everything executable (protobuf). Blank the line (line numbers in tracebacks stay right) and fix modes.
find "$venv/lib" -type f -exec chmod 0644 {} +
{ find "$venv/lib" -type f -name '*.py' -exec grep -l --null '^#!' {} + || true; } | xargs -0 -r sed -i '1s/^#!.*$//'
# Bundled wheels' shared objects keep no debugging symbols (as dh_strip would do).
find "$venv" -name '*.so*' -type f -exec strip --strip-unneeded --remove-section=.comment --remove-section=.note {} +
# RECORD files must describe the files as shipped (rewritten shebangs, blanked lines, stripped objects,
# dropped scripts): recompute each row's hash and size, drop rows of files that are gone. This also keeps
# the build reproducible (the console scripts' hashes would otherwise depend on the random staging path).
"$python" - "$venv/lib/python$pyver/site-packages" <<'PY'
import base64, csv, hashlib, io, pathlib, sys
site = pathlib.Path(sys.argv[1])
for record in sorted(site.glob("*.dist-info/RECORD")):
    rows = []
    for row in csv.reader(io.StringIO(record.read_text())):
        if not row:
            continue
        path = (site / row[0]).resolve()
        if path == record.resolve():
            rows.append([row[0], "", ""])
        elif path.is_file():
            data = path.read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append([row[0], f"sha256={digest}", str(len(data))])
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    record.write_text(out.getvalue())
PY

# Files from the repository. Debian 13 is merged-/usr only: its packages put units in /usr/lib (its lintian
# flags /lib as an aliased location); Debian 12's put them in /lib.
unitdir=lib/systemd/system
((deb_major < 13)) || unitdir=usr/lib/systemd/system
install -D -m 0644 -t "$stage/$unitdir" "$repo"/units/*.service "$repo"/units/*.target
install -D -m 0644 -t "$stage/usr/share/polkit-1/rules.d" "$repo/packaging/polkit/50-nebula.rules"
# Monitoring, to copy into place: /etc/prometheus and Grafana's provisioning belong to their own packages.
install -D -m 0644 -t "$stage/usr/share/nebula/prometheus" "$repo"/etc/prometheus/*.yml
install -D -m 0644 -t "$stage/usr/share/nebula/grafana" "$repo/etc/grafana/nebula.json"
# Log shipping (docs/observability.md), laid out as under /etc/systemd/: systemd-journal-remote's package owns it.
(cd "$repo/etc" && find systemd -type f -name '*.conf' -exec install -D -m 0644 {} "$stage/usr/share/nebula/{}" \;)
install -D -m 0644 "$repo/packaging/sysusers.d/nebula.conf" "$stage/usr/lib/sysusers.d/nebula.conf"
install -D -m 0644 "$repo/packaging/tmpfiles.d/nebula.conf" "$stage/usr/lib/tmpfiles.d/nebula.conf"
mkdir -p "$stage/usr/bin"
ln -s /opt/nebula/venv/bin/nebula "$stage/usr/bin/nebula"
doc=$stage/usr/share/doc/nebula
# README.md stays uncompressed: the units' Documentation= points at it.
install -D -m 0644 "$repo/README.md" "$doc/README.md"
install -m 0644 "$repo/docs/packaging.md" "$doc/packaging.md"
install -m 0644 "$deb/copyright" "$doc/copyright"
gzip -9nc "$deb/changelog" >"$doc/changelog.gz"
install -D -m 0644 "$deb/nebula.1" "$stage/usr/share/man/man1/nebula.1"
gzip -9n "$stage/usr/share/man/man1/nebula.1"
sed "s/@PY@/$pyver/g; s/@PYTAG@/${pyver/./}/g" "$deb/lintian-overrides" >"$work/lintian-overrides"
install -D -m 0644 "$work/lintian-overrides" "$stage/usr/share/lintian/overrides/nebula"

if grep -rlI -F "$stage" "$stage" >"$work/leaks"; then
    die "the staging path is left in: $(tr '\n' ' ' <"$work/leaks")"
fi

# --- control files ----------------------------------------------------------------------------------
mkdir -p "$stage/DEBIAN" "$work/debian"
# The maintainer scripts act on the control-plane units: every nebula-*.service of units/ but templates.
control_plane=$(cd "$repo/units" && ls nebula-*.service | grep -v '@' | tr '\n' ' ' | sed 's/ $//')
[[ -n $control_plane ]] || die "no control-plane units in units/"
for script in postinst prerm postrm; do
    sed "s|@CONTROL_PLANE@|$control_plane|g" "$deb/$script" >"$stage/DEBIAN/$script"
    chmod 0755 "$stage/DEBIAN/$script"
    ! grep -q '@[A-Z_]*@' "$stage/DEBIAN/$script" || die "unfilled token in $script"
    sh -n "$stage/DEBIAN/$script"
done
(cd "$stage" && find etc/nebula -maxdepth 1 -name '*.toml' -type f -printf '/%p\n' | sort) >"$stage/DEBIAN/conffiles"
# dpkg-shlibdeps and dpkg-gencontrol expect a source tree with debian/control.
cp "$deb/control" "$deb/changelog" "$work/debian/"
mapfile -t elfs < <(find "$venv" -type f -name '*.so*' | sort)
# (Its warnings about wheels linked against libraries they do not use are the wheels' business.)
(cd "$work" && dpkg-shlibdeps -O --ignore-missing-info "${elfs[@]}" 2>"$work/shlibdeps.log") | sed 's/^shlibs:Depends=//' \
    >"$work/shlibs"
# The venv's bin/python links the release's own python3.X, whose ABI its compiled wheels are built for: a
# later default python3 must not break it, so the package depends on that very interpreter.
(cd "$work" && dpkg-gencontrol -pnebula -P"$stage" -v"$pkg_version" -Vshlibs:Depends="$(cat "$work/shlibs")" \
    -Vpython:Depends="python$pyver")
(cd "$stage" && find . \( -path ./DEBIAN -o -path ./etc \) -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) \
    >"$stage/DEBIAN/md5sums"
chmod 0644 "$stage/DEBIAN/md5sums" "$stage/DEBIAN/conffiles" "$stage/DEBIAN/control"

# Normalised modes and dates; root ownership comes from --root-owner-group.
chmod -R u+rwX,go+rX,go-w "$stage"
find "$stage" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

mkdir -p "$outdir"
out=$outdir/nebula_${pkg_version}_amd64.deb
# xz -1: 8 MB instead of 7 MB at -6, in a fifth of the time (most of it is grpcio's 17 MB extension).
dpkg-deb --root-owner-group -Zxz -z1 --build "$stage" "$out" >/dev/null
log "built $out ($(du -h "$out" | cut -f1), installed $(dpkg-deb -f "$out" Installed-Size) KiB) in $((SECONDS - t0)) s"
# The release's own lintian (for another release this runs inside that release's root).
if command -v lintian >/dev/null; then
    lintian --fail-on error,warning "$out" >"$work/lintian.log" 2>&1 || { cat "$work/lintian.log" >&2; die "lintian: $out"; }
    log "lintian $(lintian --version | cut -d' ' -f2): no errors or warnings"
fi
echo "$out"
