#!/usr/bin/env bash
# scripts/bench_workers.py on a machine that has none of its parts: many cores and a Python, but no network,
# no etcd, no wrk and none of Nebula's dependencies (the device machines lent to some sessions: 16 cores,
# Python 3.12, nothing to install from). Only a many-core machine gives the 4- and 8-worker figures.
#
#   scripts/bench-workers-kit.sh --prepare DIR [--python X.Y]
#       here (with the package index): DIR gets the wheels of what the gateway and the bench import, for
#       CPython X.Y (default: this one's), at the versions and hashes packaging/debian/ locks; etcd; and wrk
#       with the libraries it links (LuaJIT, OpenSSL 3), which a machine other than Debian may lack.
#       About 45 MiB: put DIR inside the checkout, ignored (.bench-kit/ is), so that it travels with it.
#   scripts/bench-workers-kit.sh DIR [ARGS]
#       there, from the checkout: unpacks the wheels into a temporary directory (no pip, nothing installed),
#       puts DIR/bin first on PATH and runs scripts/bench_workers.py ARGS with $PYTHON (default python3).
#
# For a device machine, in one call: run `bash scripts/bench-workers-kit.sh .bench-kit --duration-s 10` with
# carry [".bench-kit"]; the bench's header names the wrk and etcd it ran and the Python.
# Exit status: bench_workers.py's; 2 a usage or preparation error.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
die() { printf 'bench-workers-kit: %s\n' "$*" >&2; exit 2; }

# What the gateway (`nebula gateway run`), the canned engine and the bench import, with what those import in
# turn (httpx2's transport: anyio, httpcore2, h11, truststore, certifi). tests/integration/test_bench_workers.py
# runs the whole bench from a kit under a Python that has none of them, so a missing one fails there.
packages=(aetcd aiohappyeyeballs aiohttp aiosignal anyio attrs certifi frozenlist grpcio h11 httpcore2 httptools
          httpx2 idna multidict orjson prometheus-client propcache protobuf truststore typing-extensions uvloop yarl)
# The glibc the binaries need at most is 2.34 (etcd's, and Debian 12's OpenSSL): wheels built for newer glibc
# would not be the limit, so none are taken.
platforms=(manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64
           manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64)

prepare() {
    local dir=$1 version=$2 python lock work req p lib
    python=${PYTHON:-python3}  # a Python with pip, which downloads for any target version
    "$python" -m pip --version >/dev/null 2>&1 || die "$python has no pip: apt-get install -y python3-pip, or set PYTHON"
    [[ -n $version ]] || version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    [[ $version =~ ^3\.[0-9]+$ ]] || die "--python takes a version like 3.12, not '$version'"
    # Debian 13's lock for 3.13, Debian 12's for the rest: the same versions have wheels for each CPython.
    lock=$repo/packaging/debian/requirements.lock
    [[ $version == 3.13 ]] && lock=$repo/packaging/debian/requirements-py313.lock
    [[ -f $lock ]] || die "--prepare runs from a Nebula checkout ($lock is missing)"
    for p in etcd wrk; do command -v "$p" >/dev/null || die "$p is not installed here: apt-get install -y ${p/etcd/etcd-server}"; done
    work=$(mktemp -d)
    trap 'rm -rf "${work:-}"' EXIT
    req=$work/requirements.txt
    for p in "${packages[@]}"; do
        awk -v want="$p" 'tolower($1) ~ "^" want "==" {f = 1} f {print} f && !/\\$/ {exit}' "$lock" >>"$req"
        grep -qi "^$p==" "$req" || die "$p is not in $lock"
    done
    rm -rf "$dir/wheels" "$dir/bin" "$dir/libexec" "$dir/lib"  # its own parts: DIR may hold other kits
    mkdir -p "$dir/wheels" "$dir/bin" "$dir/libexec" "$dir/lib"
    local plat_args=()
    for p in "${platforms[@]}"; do plat_args+=(--platform "$p"); done
    "$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --require-hashes \
        --python-version "$version" --implementation cp --abi "cp${version/./}" --abi abi3 --abi none \
        "${plat_args[@]}" --platform any -r "$req" -d "$dir/wheels" >"$work/pip.log" 2>&1 \
        || { cat "$work/pip.log" >&2; die "downloading the wheels for CPython $version failed"; }
    cp "$(command -v etcd)" "$dir/bin/etcd"
    cp "$(command -v wrk)" "$dir/libexec/wrk"
    # Only the libraries wrk links that a machine may lack; libc and the loader are the machine's own.
    for lib in libluajit-5.1.so.2 libssl.so.3 libcrypto.so.3; do
        p=$(ldd "$(command -v wrk)" | awk -v l="$lib" '$1 == l {print $3}')
        [[ -n $p ]] || die "wrk here does not link $lib: the kit expects Debian's wrk"
        cp -L "$p" "$dir/lib/$lib"
    done
    cat >"$dir/bin/wrk" <<'EOF'
#!/bin/sh
# wrk with the libraries the kit carries (exec: the bench counts its CPU as this process's).
kit=$(cd "$(dirname "$0")/.." && pwd)
LD_LIBRARY_PATH="$kit/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$kit/libexec/wrk" "$@"
EOF
    chmod 0755 "$dir/bin/wrk"
    echo "$version" >"$dir/python-version"
    printf 'bench-workers-kit: prepared %s for CPython %s (%s, %d wheels)\n' \
        "$dir" "$version" "$(du -sh "$dir" | cut -f1)" "$(ls "$dir/wheels" | wc -l)" >&2
}

run_kit() {
    local dir=$1 python=${PYTHON:-python3} want have site rc=0
    shift
    [[ -f $dir/python-version && -d $dir/wheels ]] || die "$dir is not a kit: make one with --prepare $dir"
    want=$(cat "$dir/python-version")
    have=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
        || die "$python does not run: set PYTHON to a CPython $want"
    [[ $have == "$want" ]] || die "the kit's wheels are for CPython $want and $python is $have: set PYTHON to a" \
        "CPython $want, or prepare the kit with --python $have"
    "$dir/bin/etcd" --version >/dev/null 2>&1 \
        || die "the kit's etcd does not run here: $("$dir/bin/etcd" --version 2>&1 | head -n 1)"
    site=$(mktemp -d)
    trap 'rm -rf "${site:-}"' EXIT
    # A wheel is a zip of what goes into site-packages; those carried have no .data to place elsewhere.
    "$python" - "$dir/wheels" "$site" <<'EOF' || die "unpacking the wheels failed"
import pathlib, sys, zipfile
wheels, site = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for wheel in sorted(wheels.glob("*.whl")):
    zipfile.ZipFile(wheel).extractall(site)
EOF
    PATH="$(cd "$dir" && pwd)/bin:$PATH" PYTHONPATH="$site" PYTHONNOUSERSITE=1 \
        "$python" "$repo/scripts/bench_workers.py" "$@" || rc=$?
    return "$rc"
}

case ${1:-} in
    --prepare)
        [[ $# -eq 2 || ($# -eq 4 && $3 == --python) ]] || die "usage: scripts/bench-workers-kit.sh --prepare DIR [--python X.Y]"
        prepare "$2" "${4:-}" ;;
    -h|--help|"")
        sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' ;;
    *)
        [[ -d $1 ]] || die "$1: no such kit (usage: scripts/bench-workers-kit.sh DIR [ARGS], after --prepare DIR)"
        run_kit "$@" ;;
esac
