#!/usr/bin/env bash
# The one command that sets up a machine and runs every check and test:
#
#   scripts/test.sh [PYTEST ARGS...]        e.g. scripts/test.sh -k engine -x
#
# On a fresh Debian 12 machine (as root) it installs the system packages, the dev venv (.venv), the vLLM
# engine runtime and the tiny test models; on a machine where that is done already each set-up phase is a
# quick up-to-date check, so developers run the same command. Then: ruff, mypy --strict, lint-imports,
# pytest. Every phase prints how long it took.
#
# Environment (all optional):
#   NEBULA_TEST_VLLM_VENV  engine venv the engine tests use; default /opt/nebula/engines/vllm (root) or
#                          ~/.cache/nebula/engines/vllm. A plain venv directory there is used as it is.
#   NEBULA_TEST_MODELS     tiny models directory; default <cache>/tiny-models
#   NEBULA_CACHE           cache root; default /var/cache/nebula-dev (root; not the services' own /var/cache/nebula) or ~/.cache/nebula
#   NEBULA_SKIP_SETUP=1    skip the set-up phases (apt, venvs, models): just run the checks and tests
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

# Remember where the caller finds uv and Python (pyenv, ~/.local/bin) before narrowing PATH; from here on
# Debian tools must run with Debian's Python, not whatever pyenv shim comes first (apt's maintainer
# scripts run `python3`).
caller_path=$PATH
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export DEBIAN_FRONTEND=noninteractive

t_start=$SECONDS
phase_name=""
phase_t0=0
phase() {  # close the previous phase's timer and start the next
    if [[ -n $phase_name ]]; then
        printf '==> %-14s %4d s\n' "$phase_name" $((SECONDS - phase_t0))
    fi
    phase_name=$1
    phase_t0=$SECONDS
    [[ -z $phase_name ]] || printf '==> %s ...\n' "$phase_name"
}
trap 'rc=$?; if ((rc)); then echo "==> FAILED in phase: ${phase_name:-?} (exit $rc)" >&2; fi' EXIT

if ((EUID == 0)); then
    cache=${NEBULA_CACHE:-/var/cache/nebula-dev}
    engine=${NEBULA_TEST_VLLM_VENV:-/opt/nebula/engines/vllm}
else
    cache=${NEBULA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nebula}
    engine=${NEBULA_TEST_VLLM_VENV:-$cache/engines/vllm}
fi
models=${NEBULA_TEST_MODELS:-$cache/tiny-models}
# debootstrap: the Debian 13 root the trixie package is built and tested in (scripts/debian-root.sh).
apt_packages=(etcd-server systemd-container dbus polkitd gcc python3-dev python3-venv
              python3-pip dpkg-dev lintian prometheus systemd-journal-remote openssl debootstrap wrk
              chromium chromium-driver)

find_python311() {
    # Debian's own 3.11 first (what production nodes have), else the first python3.11 the caller has.
    if [[ -x /usr/bin/python3 ]] && /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'
    then
        echo /usr/bin/python3
    else
        PATH=$caller_path command -v python3.11 || { echo "test.sh: no Python 3.11 found" >&2; return 1; }
    fi
}

if [[ ${NEBULA_SKIP_SETUP:-0} != 1 ]]; then
    # --- system packages -------------------------------------------------------------------------
    phase "apt"
    missing=()
    for p in "${apt_packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]})); then
        if ((EUID != 0)); then
            echo "test.sh: missing Debian packages: ${missing[*]}; install them as root" >&2
            exit 1
        fi
        apt-get update -q
        # apt's plan first, said out loud: on a machine whose packages lag the mirror, the test tools need some
        # upgraded (systemd-container needs the mirror's libsystemd0, lintian its perl). This is the test
        # machine's set-up, so it goes ahead; the operators' set-up paths (quickstart.sh, the .deb) refuse
        # to change an installed package instead (tests/integration/test_quickstart_releases.py).
        changes=$(apt-get install -s -q --no-install-recommends "${missing[@]}" \
                  | sed -n 's/^Inst \([^ ]*\) \[\([^]]*\)\].*/\1 (\2)/p; s/^Remv \([^ ]*\).*/\1 (removed)/p')
        if [[ -n $changes ]]; then
            echo "test.sh: installing ${missing[*]} also changes installed packages (from version):" $changes
        fi
        # Recommends would pull dozens of packages (prometheus alone ~48) that no test needs.
        apt-get install -y -q --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"
    else
        echo "all present"
    fi

    # --- uv and the dev venv -----------------------------------------------------------------------
    phase "dev venv"
    python=$(find_python311)
    uv=${UV:-$(PATH=$caller_path command -v uv || true)}
    if [[ -z $uv ]]; then
        # pip --target: a private copy that neither touches Debian's externally managed site-packages
        # nor depends on an active venv.
        uv="$cache/uv/bin/uv"
        if [[ ! -x $uv ]]; then
            echo "uv not found; installing it with pip into $cache/uv"
            mkdir -p "$cache"
            if ! "$python" -m pip --version >/dev/null 2>&1 && ((EUID == 0)); then
                # a minimal Debian has no pip
                apt-get update -q && apt-get install -y -q --no-install-recommends python3-pip
            fi
            "$python" -m pip install --quiet --disable-pip-version-check --target "$cache/uv" uv
        fi
    fi
    export UV=$uv  # install-engine.sh uses the same uv
    # The venv is current when it was made from this pyproject.toml; skipping the resolver keeps a
    # developer's rerun offline and instant.
    locks=(packaging/debian/requirements.lock tests/requirements.lock)
    want=$( { sha256sum pyproject.toml "${locks[@]}"; echo "$python"; echo bytecode; } | sha256sum | cut -c1-64)
    if [[ -x .venv/bin/python && $(cat .venv/.nebula-dev-stamp 2>/dev/null) == "$want" ]]; then
        echo "up to date"
    else
        if ! [[ -x .venv/bin/python ]] \
            || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
            "$uv" venv --quiet --clear --python "$python" .venv
        fi
        # --compile-bytecode: the suite starts hundreds of service processes, and where PYTHONDONTWRITEBYTECODE is
        # set (CI images) each would compile aiohttp & co. again (0.96 s of CPU per start from source, 0.54 s
        # from bytecode, measured on 2 cores).
        # -c: the runtime dependencies as the .deb ships them, the test tools as the suite last passed with them,
        # not whatever is newest today.
        "$uv" pip install --quiet --compile-bytecode --python .venv/bin/python -c "${locks[0]}" -c "${locks[1]}" \
            -e '.[test]'
        echo "$want" >.venv/.nebula-dev-stamp
    fi

    # --- vLLM engine runtime -----------------------------------------------------------------------
    phase "engine"
    if [[ -d $engine && ! -L $engine ]]; then
        # Someone's own venv (NEBULA_TEST_VLLM_VENV pointing at it): use it, don't manage it.
        [[ -x $engine/bin/vllm ]] || { echo "test.sh: $engine has no bin/vllm" >&2; exit 1; }
        echo "using existing venv $engine"
    else
        # The suite runs CPU engines, whatever the machine has (a GPU dev box would pick the CUDA runtime).
        scripts/install-engine.sh --runtime cpu "$engine"
    fi

    # --- the other release's root ------------------------------------------------------------------
    # The package of the supported release that is not the host's (Debian 13 on a Debian 12 host) is built and
    # tested in it (scripts/debian-root.sh: debootstrap, ~3 minutes, then cached by date under $cache/roots;
    # a CI cache of $cache keeps it between runs).
    if ((EUID == 0)); then
        phase "debian root"
        case $(. /etc/os-release && echo "${VERSION_CODENAME:-}") in
            trixie) NEBULA_CACHE=$cache scripts/debian-root.sh bookworm ;;
            *) NEBULA_CACHE=$cache scripts/debian-root.sh trixie ;;
        esac
    fi

    # --- tiny models -------------------------------------------------------------------------------
    phase "models"
    # The engine's Python builds them: the models must load with the libraries that will serve them.
    "$engine/bin/python" scripts/make_tiny_models.py "$models"
fi

# --- checks and tests ------------------------------------------------------------------------------
# Each check runs even when an earlier one failed, so one CI run reports every problem; the exit status
# still fails if any did.
export PATH="$repo/.venv/bin:$PATH"
export NEBULA_TEST_VLLM_VENV=$engine NEBULA_TEST_MODELS=$models
failed=()
check() {  # check NAME CMD...: run CMD as phase NAME, remember a failure
    phase "$1"
    local rc=0
    "${@:2}" || rc=$?
    if [[ $1 == pytest && $rc == 5 ]]; then
        # "no tests collected" means the suite or its discovery is broken, not that all is well.
        echo "test.sh: pytest collected no tests" >&2
    fi
    ((rc == 0)) || failed+=("$1 (exit $rc)")
}
check ruff ruff check .
check mypy mypy --strict
check lint-imports lint-imports
# `python -m pytest` puts the repo root on sys.path, so tests can import the shared tests.harness package.
check pytest python -m pytest -q --durations=25 tests/ "$@"
phase ""
if ((${#failed[@]})); then
    printf '==> FAILED: %s\n' "${failed[@]}" >&2
    trap - EXIT
    exit 1
fi
printf '==> all passed in %d s\n' $((SECONDS - t_start))
