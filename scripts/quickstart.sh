#!/usr/bin/env bash
# A whole Nebula on this one machine, serving a small model, from a fresh Debian 12 or 13 (run as root):
#
#   scripts/quickstart.sh
#
# It installs etcd and the control plane (/opt/nebula/venv, `nebula` on PATH), the vLLM engine runtime
# (/opt/nebula/engines/<runtime>, linked as /opt/nebula/engines/vllm: the GPU build where NVML sees a GPU,
# else the CPU build), builds a tiny chat model locally (no model hub needed), writes
# /etc/nebula/nebula.toml if there is none, brings Nebula up (`nebula up`: systemd units where systemd is
# PID 1, supervised child processes elsewhere; it also makes the bootstrap admin key, /etc/nebula/admin.key
# and its digest, if there is none, so the admin API is closed from the start), loads the model through the
# admin API (desired state in etcd -> scheduler -> node agent -> engine) and waits until it answers. With the
# tiny models it also loads `embed` (a tiny sentence-transformers BERT) and `rerank` (a tiny cross-encoder), so
# chat with tool calls and json_schema, embeddings and rerank can all be tried at once; the gateway reads
# each model's files and turns on what its family needs (etc/nebula/profiles.toml).
# Rerunning it is safe and quick; an existing key is kept.
#
# It installs Debian packages only where missing, and never upgrades, downgrades or removes one the machine
# has: where apt would, it stops and says which (upgrade them yourself, then rerun).
#
# Environment: NEBULA_MODEL_NAME (default tiny), NEBULA_MODEL_SOURCE (a model directory to serve instead
# of the tiny one), NEBULA_PREFIX (default /opt/nebula), NEBULA_ENGINE_DEVICE (cpu or gpu: which engine
# runtime, instead of the choice by GPU), NEBULA_QUICKSTART_ENGINE=0 (the control plane only: no engine
# runtime, no model; `scripts/install-engine.sh` and `nebula load` later).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
caller_path=$PATH
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export DEBIAN_FRONTEND=noninteractive
prefix=${NEBULA_PREFIX:-/opt/nebula}
name=${NEBULA_MODEL_NAME:-tiny}
t0=$SECONDS
step() { printf '\n==> [%4d s] %s\n' $((SECONDS - t0)) "$*"; }

((EUID == 0)) || { echo "quickstart: run as root (it installs packages and services)" >&2; exit 1; }

engine=${NEBULA_QUICKSTART_ENGINE:-1}
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
apt_updated=0
apt_install() {  # apt_install PKG...: install what is missing, refusing to change any installed package
    local need=() p changes
    for p in "$@"; do installed "$p" || need+=("$p"); done
    ((${#need[@]})) || return 0
    ((apt_updated)) || { apt-get update -q; apt_updated=1; }
    # apt's plan first: "Inst P [version]" upgrades (or downgrades) an installed P, "Remv P" removes one.
    changes=$(apt-get install -s -q --no-install-recommends "${need[@]}" \
              | sed -n 's/^Inst \([^ ]*\) \[\([^]]*\)\].*/\1 (\2)/p; s/^Remv \([^ ]*\).*/\1 (removed)/p')
    if [[ -n $changes ]]; then
        echo "quickstart: installing ${need[*]} would change packages this machine has: $(echo $changes);" \
             "the quickstart changes none: update them yourself (apt-get upgrade), then rerun" >&2
        exit 1
    fi
    apt-get install -y -q --no-install-recommends "${need[@]}"
}

step "system packages"
apt_install etcd-server ca-certificates
if [[ -d /run/systemd/system ]]; then
    # The package starts its own etcd on 127.0.0.1:2379, which is what Nebula's defaults expect.
    systemctl enable --now etcd.service
fi

step "control plane -> $prefix/venv"
python=/usr/bin/python3
uv=$(PATH=$caller_path command -v uv || true)
if [[ -z $uv ]]; then
    uv=/opt/nebula/uv/bin/uv
    if [[ ! -x $uv ]]; then
        "$python" -m pip --version >/dev/null 2>&1 || apt_install python3-pip
        # --target: a directory of its own, beside (not in) Debian's externally managed site-packages.
        "$python" -m pip install -q --disable-pip-version-check --target /opt/nebula/uv uv
    fi
fi
export UV=$uv
# Nothing is compiled: every dependency is a wheel, and the journal is written through the host's own
# libsystemd (nebula/adapters/journal.py), so no -dev package (whose install would upgrade systemd) is needed.
[[ -x $prefix/venv/bin/python ]] || "$uv" venv --quiet --python "$python" "$prefix/venv"
"$uv" pip install --quiet --python "$prefix/venv/bin/python" "$repo"
ln -sf "$prefix/venv/bin/nebula" /usr/local/bin/nebula
# The units run /usr/bin/nebula (where the Debian package puts it).
[[ -e /usr/bin/nebula ]] || ln -s "$prefix/venv/bin/nebula" /usr/bin/nebula

if ((engine)); then
    step "vLLM engine runtime -> $prefix/engines (${NEBULA_ENGINE_DEVICE:-auto})"
    # auto: the GPU lock where NVML sees a GPU, else the CPU one (the local +cpu torch wheel where
    # /opt/wheels has it, else the public index's); NEBULA_ENGINE_DEVICE overrides (install-engine.sh).
    # vLLM's compiled extension links libnuma (not part of a minimal Debian; the wheels do not bundle it).
    apt_install libnuma1
    "$repo/scripts/install-engine.sh" --runtime auto "$prefix/engines/vllm"

    step "model"
    if [[ -n ${NEBULA_MODEL_SOURCE:-} ]]; then
        source_dir=$NEBULA_MODEL_SOURCE
    else
        "$prefix/engines/vllm/bin/python" "$repo/scripts/make_tiny_models.py" /var/lib/nebula/models
        source_dir=/var/lib/nebula/models/tiny-llama
    fi
fi

step "config /etc/nebula (nebula.toml, catalog, model families)"
mkdir -p /etc/nebula/engines /etc/nebula/nebula.d /etc/nebula/catalog.d /etc/nebula/profiles.d
[[ -f /etc/nebula/nebula.toml ]] || nebula config init
# The shipped model catalog and model families, as the package installs them; your own go in catalog.d/ and
# profiles.d/ (a rerun refreshes these two and never touches the drop-ins).
install -m 0644 "$repo/etc/nebula/catalog.toml" "$repo/etc/nebula/profiles.toml" /etc/nebula/
# Settings of this machine go in a drop-in, so the main file stays the commented reference.
cat >/etc/nebula/nebula.d/10-quickstart.toml <<EOF
[engine]
runtimes_dir = "$prefix/engines"
EOF
nebula config check

# Engines run as their own user, which cannot read the control plane's credentials (docs/security.md).
getent passwd nebula-engine >/dev/null || useradd --system --user-group --home-dir /var/lib/nebula-engine \
    --no-create-home --shell /usr/sbin/nologin nebula-engine

if [[ -d /run/systemd/system ]]; then
    step "systemd units"
    getent passwd nebula >/dev/null || useradd --system --home-dir /var/lib/nebula --shell /usr/sbin/nologin nebula
    install -m 0644 "$repo"/units/*.service "$repo"/units/*.target /etc/systemd/system/
    # The agent (User=nebula) starts and stops engine units over D-Bus: allow exactly that.
    install -D -m 0644 "$repo/packaging/polkit/50-nebula.rules" /etc/polkit-1/rules.d/50-nebula.rules
    mkdir -p /var/lib/nebula  # (no tiny models made there when NEBULA_MODEL_SOURCE or ..._ENGINE=0)
    chown -R nebula:nebula /var/lib/nebula
    systemctl daemon-reload
    systemctl enable nebula.target nebula-gateway nebula-scheduler nebula-node
fi

step "nebula up (and the bootstrap admin key)"
nebula up
[[ -s /etc/nebula/admin.key ]] || { echo "quickstart: no /etc/nebula/admin.key after nebula up" >&2; exit 1; }
if ((!engine)); then
    echo "
The control plane is up ($((SECONDS - t0)) s; NEBULA_QUICKSTART_ENGINE=0: no engine runtime, no model).
Next: $repo/scripts/install-engine.sh, then nebula load NAME --source DIR; nebula status shows the state."
    exit 0
fi

step "load $name from $source_dir"
nebula load "$name" --source "$source_dir" --max-model-len 512 --wait 900
if [[ -z ${NEBULA_MODEL_SOURCE:-} ]]; then
    # The task (embed, rerank) is read from the models' own files.
    step "load embed and rerank (tiny BERTs)"
    nebula load embed --source /var/lib/nebula/models/tiny-bert-embed --wait 900
    nebula load rerank --source /var/lib/nebula/models/tiny-bert-rerank --wait 900
fi

cat <<EOF

Nebula is up and serving '$name' ($((SECONDS - t0)) s). Every request needs a key: the admin key is
/etc/nebula/admin.key (root's; the nebula CLI sends it). Make an inference key for clients and try it:

  KEY=\$(nebula keys create quickstart)
  curl -s http://127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer \$KEY" \\
       -H 'Content-Type: application/json' \\
       -d '{"model": "$name", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}'

  # tool calls (the model's family turns the parser on; a random tiny model needs the call forced):
  curl -s http://127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer \$KEY" \\
       -H 'Content-Type: application/json' \\
       -d '{"model": "$name", "messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 64,
            "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object",
              "properties": {"city": {"type": "string", "enum": ["paris", "lima"]}}, "required": ["city"]}}}],
            "tool_choice": "required"}'
$( [[ -n ${NEBULA_MODEL_SOURCE:-} ]] || cat <<EOT
  curl -s http://127.0.0.1:8000/v1/embeddings -H "Authorization: Bearer \$KEY" \\
       -H 'Content-Type: application/json' -d '{"model": "embed", "input": ["hello", "world"]}'
  curl -s http://127.0.0.1:8000/v1/rerank -H "Authorization: Bearer \$KEY" \\
       -H 'Content-Type: application/json' -d '{"model": "rerank", "query": "hi", "documents": ["hello", "bye"]}'
EOT
)

  nebula list              # models, replicas, phases, nodes
  nebula show $name         # what Nebula read from its files: family, parsers, limits, memory
  nebula status            # nodes and models at a glance
  nebula logs $name         # the engine's log
  nebula unload $name       # drain and stop it
  nebula down              # stop everything
EOF
