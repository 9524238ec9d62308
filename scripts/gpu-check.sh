#!/usr/bin/env bash
# Nebula's GPU path on one real GPU machine, offline and without vLLM, in a few minutes (scripts/gpu_check.py
# lists the checks: NVML inventory and free memory, placement with declared and estimated memory, pinning and
# tensor-parallel argv, stand-in engines taking their GPU share, memory freed after the stop).
#
#   scripts/gpu-check.sh --prepare DIR   on a machine with the package cache or the network: DIR gets
#                                        Nebula's wheel, the locked nvidia-ml-py wheel and the check scripts
#                                        (well under 1 MiB); copy DIR to the GPU machine
#   DIR/gpu-check.sh [ARGS]              on the GPU machine: runs from DIR alone (no network, no install), with
#   scripts/gpu-check.sh DIR [ARGS]      $PYTHON (default python3), which must have torch for the stand-ins
#   scripts/gpu-check.sh [ARGS]          from a checkout, where nebula's dependencies are importable
#
# ARGS go to gpu_check.py (--python, --start-timeout, --free-timeout, --run-root).
# Exit status: 0 every check passed, 1 one failed, 3 no NVIDIA GPU visible, 2 usage or preparation error.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python3}
die() { printf 'gpu-check: %s\n' "$*" >&2; exit 2; }

prepare() {
    local dir=$1 repo lock wh
    repo=$(cd "$here/.." && pwd)
    lock=$repo/packaging/debian/requirements.lock
    [[ -f $repo/pyproject.toml && -f $lock ]] || die "--prepare runs from a Nebula checkout (scripts/gpu-check.sh)"
    mkdir -p "$dir/wheels"
    work=$(mktemp -d)
    trap 'rm -rf "${work:-}"' EXIT
    # Nebula's wheel, built from a copy so that setuptools' build/ and *.egg-info never land in the checkout.
    mkdir -p "$work/src"
    cp "$repo/pyproject.toml" "$work/src/"
    (cd "$repo" && tar --exclude=__pycache__ --exclude='*.pyc' -cf - nebula) | tar -C "$work/src" -xf -
    rm -f "$dir"/wheels/nebula-*.whl
    "$python" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$dir/wheels" "$work/src" \
        2>"$work/build.log" || { cat "$work/build.log" >&2; die "building the nebula wheel failed"; }
    # nvidia-ml-py exactly as locked (pure Python): from the .deb build's wheelhouse when it holds it, else
    # downloaded with the lock's hashes checked.
    awk '/^nvidia-ml-py==/ {p = 1} p {print} p && !/\\$/ {exit}' "$lock" >"$work/nvml.txt"
    [[ -s $work/nvml.txt ]] || die "no nvidia-ml-py in $lock"
    local version whl
    version=$(sed -n '1s/^nvidia-ml-py==\([^ ]*\).*/\1/p' "$work/nvml.txt")
    wh=${NEBULA_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/nebula/deb-wheelhouse}
    whl=$(find "$wh" -name "nvidia_ml_py-$version-py3-none-any.whl" 2>/dev/null | head -n 1 || true)
    if [[ -n $whl ]]; then
        cp "$whl" "$dir/wheels/"
    else
        "$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
            --require-hashes -r "$work/nvml.txt" -d "$dir/wheels" || die "could not fetch nvidia-ml-py==$version"
    fi
    cp "$here/gpu_check.py" "$here/gpu_standin.py" "$here/gpu-check.sh" "$dir/"
    printf 'gpu-check: prepared %s (%s): copy it to the GPU machine and run %s/gpu-check.sh\n' \
        "$dir" "$(du -sh "$dir" | cut -f1)" "$(basename "$dir")" >&2
}

check_python() {
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
        || die "$python is not Python 3.11 or newer: set PYTHON to one (with torch, for the stand-in engines)"
}

run_from() {
    local dir=$1 path="" whl
    shift
    check_python
    for whl in "$dir"/wheels/*.whl; do
        [[ -f $whl ]] && path+="${path:+:}$whl"
    done
    [[ -n $path ]] || die "$dir/wheels holds no wheels: run scripts/gpu-check.sh --prepare $dir first"
    # Pure-Python wheels import straight from their zip files: nothing is installed on the GPU machine.
    PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}" exec "$python" "$dir/gpu_check.py" --python "$python" "$@"
}

case ${1:-} in
    --prepare)
        [[ $# -eq 2 ]] || die "usage: scripts/gpu-check.sh --prepare DIR"
        prepare "$2" ;;
    -h|--help)
        sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' ;;
    *)
        if [[ $# -gt 0 && -d $1 && -d $1/wheels ]]; then
            dir=$(cd "$1" && pwd)
            shift
            run_from "$dir" "$@"
        elif [[ -d $here/wheels ]]; then
            run_from "$here" "$@"
        else
            check_python
            exec "$python" "$here/gpu_check.py" --python "$python" "$@"
        fi ;;
esac
