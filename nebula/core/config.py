"""Nebula's configuration: nested frozen dataclasses, parsed from TOML data and the environment.

Every value has a default and a doc (used by `nebula config init` to write a commented file), and can be
overridden by `NEBULA_<SECTION>_<KEY>` (e.g. NEBULA_GATEWAY_PORT=8080). Parsing is pure: the caller reads
the file and passes its text and the environment; errors name the source, key and what is wrong.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nebula.core.config_rules import validate
from nebula.core.config_values import coerce, from_env, show_key
from nebula.core.engine_args import DEFAULT_ALLOWED_ENGINE_ARGS
from nebula.errors import ConfigError, ValidationError

ENV_PREFIX = "NEBULA_"


def _f(default: Any, doc: str) -> Any:
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults")
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class ClusterConfig:
    etcd_endpoints: tuple[str, ...] = _f(("http://127.0.0.1:2379",), "etcd client URLs, tried in order.")
    etcd_timeout_s: float = _f(5.0, "Timeout of each etcd call, in seconds.")
    lease_ttl_s: int = _f(10, "TTL of the leases that hold node records, instance states and the leader key.")
    etcd_ca_file: str = _f("", "CA bundle that signed etcd's server certificate (https:// endpoints). Empty: the "
                           "system's CAs.")
    etcd_cert_file: str = _f("", "Client certificate for etcd (with etcd_key_file), when etcd asks for one "
                             "(--client-cert-auth).")
    etcd_key_file: str = _f("", "Private key of etcd_cert_file.")
    etcd_user: str = _f("", "etcd user (with etcd_password), when etcd has auth enabled. Empty: no auth.")
    etcd_password: str = _f("", "Password of etcd_user; prefer NEBULA_CLUSTER_ETCD_PASSWORD or a drop-in readable "
                            "only by root and the nebula group.")


@dataclass(frozen=True)
class GatewayConfig:
    host: str = _f("127.0.0.1", "Address the gateway listens on (loopback unless you mean to expose it).")
    port: int = _f(8000, "Port of the OpenAI-compatible API, the admin API and /metrics.")
    max_body_bytes: int = _f(8 * 1024 * 1024, "Largest request body accepted; larger gets 413.")
    max_upload_bytes: int = _f(25 * 1024 * 1024, "Largest upload to /v1/audio/transcriptions and /translations (the "
                               "whole multipart body); larger gets 413 before it is read. 25 MiB: OpenAI's limit "
                               "and vLLM's default (VLLM_MAX_AUDIO_CLIP_FILESIZE_MB).")
    admin_key_hashes: tuple[str, ...] = _f(
        (), "SHA-256 hex digests of admin API keys (they open the OpenAI endpoints too).")
    api_key_hashes: tuple[str, ...] = _f(
        (), "SHA-256 hex digests of inference API keys. Keys also live in etcd (`nebula keys create`); while no "
        "key exists anywhere, nothing needs one.")
    admin_key_digest_file: str = _f(
        "/etc/nebula/admin.key.sha256", "File with the SHA-256 digest of the bootstrap admin key (written at install; "
        "the key itself is root's, in /etc/nebula/admin.key). A missing file adds no key.")
    admin_key_file: str = _f(
        "/etc/nebula/admin.key", "The bootstrap admin key itself (0600, root's): the CLI sends it unless "
        "NEBULA_ADMIN_KEY or NEBULA_ADMIN_KEY_FILE says otherwise, and `nebula up` creates it with "
        "admin_key_digest_file when neither exists. The gateway never reads it. Empty: no bootstrap key.")
    tls_cert_file: str = _f("", "PEM certificate (chain) to serve HTTPS with (with tls_key_file). Empty: plain HTTP.")
    tls_key_file: str = _f("", "PEM private key of tls_cert_file.")
    upstream_timeout_s: float = _f(600.0, "Longest time one inference request may take end to end.")
    # Client connections (docs/security.md, "Connections"): caps that keep file descriptors in hand, deadlines
    # that a trickle of bytes does not extend.
    max_connections: int = _f(0, "Most client connections open at once. 0: derived from the open-file limit, "
                              "(limit - 256) / 2 - 32 (32,608 under the unit's LimitNOFILE=65536). At the cap the "
                              "connection idle longest makes room; with none idle a new one is closed at once, but "
                              "for 32 more kept for /healthz and /metrics.")
    max_connections_per_ip: int = _f(4096, "Most connections from one client address (IPv6: one /64); more are "
                                     "closed at once. 0: no cap. Behind a proxy that hides client addresses, raise it.")
    header_timeout_s: float = _f(20.0, "Longest time a request's head may take to arrive, from the connection's "
                                 "start or a later request's first byte; then 408.")
    body_timeout_s: float = _f(120.0, "Longest time a request's whole body may take to arrive after its head; "
                               "then 408.")
    write_timeout_s: float = _f(60.0, "Longest time an answer may wait for a client that does not read; then the "
                                "connection is cut and the request's key slot freed.")
    request_timeout_s: float = _f(0.0, "Longest time from a request's head to its answer's last byte; then 504, or "
                                  "a stream is cut. 0: upstream_timeout_s + wake_wait_s + 60.")
    # Routing: the gateway picks the replica and forwards to its engine itself (one hop).
    connect_timeout_s: float = _f(2.0, "Timeout to connect to an engine; a refused replica is retried on another.")
    max_attempts: int = _f(3, "Replicas tried per request before the first byte is sent.")
    no_replica_wait_s: float = _f(0.0, "How long a request waits for a ready replica of a loading model "
                                  "before 503 (0: answer 503 at once).")
    load_poll_s: float = _f(1.0, "How often the gateway reads each ready replica's load from its /metrics "
                            "(0: never; route on the gateway's own in-flight counts only).")
    load_timeout_s: float = _f(0.5, "Timeout of one /metrics read. A replica that fails or is slow stays "
                               "routable: its last load counts for 3 polls, then only its in-flight requests.")
    load_waiting_weight: float = _f(2.0, "Weight of each request queued in an engine, against 1 per request "
                                    "the gateway has in flight to it, when picking the least loaded replica.")
    kv_cache_threshold: float = _f(0.9, "KV cache usage (0-1) from which a replica counts as overloaded: it "
                                   "takes the penalty below and loses prefix affinity.")
    kv_cache_penalty: float = _f(8.0, "Score added to a replica whose KV cache usage is at or above the "
                                 "threshold (in units of in-flight requests).")
    affinity_slack: float = _f(4.0, "Requests that share a prompt prefix stay on their replica while its "
                               "score is at most this much above the least loaded one's.")
    # Elastic models (scale to zero, wake on request): services/gateway/wake.py and load_report.py.
    load_report_s: float = _f(2.0, "How often each gateway process publishes its load per model (in-flight and held "
                              "requests, the engines' queues, its last inference request) to /nebula/load/ for the "
                              "scheduler's autoscaling and idle unload (0: never; then no model is ever idle).")
    wake_wait_s: float = _f(300.0, "How long a request for an elastic model with no ready replica is held while "
                            "the model wakes, before 503 model_waking. A cold vLLM start on a GPU (unit start, "
                            "weights from local disk, compile and CUDA graph capture) takes about 1-4 minutes "
                            "for 7-70B models; this stays below the OpenAI and Anthropic SDKs' 600 s timeout so "
                            "the client reads the gateway's advice, not its own timeout.")
    max_held_requests: int = _f(1024, "Most requests one gateway process holds for waking models at once; more "
                                "get 503 model_waking at once, yet still ask for the wake (each held request "
                                "keeps its connection and body; 0: hold none).")
    wake_keepalive_s: float = _f(5.0, "A held `stream: true` request still waiting after this long gets its SSE "
                                 "response started and a comment line (': waking MODEL') this often, so proxies "
                                 "and clients see a live connection; a failed wake then ends the stream with an "
                                 "error event. A client opts out with the header X-Nebula-Wake-Keepalive: 0 (a "
                                 "plain 503 instead). 0: never (streams are held silently, like other requests).")
    access_log: str = _f("errors", "Journal lines per inference request: 'all' (one line each, with model, "
                         "replica, status, duration and request id), 'errors' (only those ending 5xx) or 'off'. "
                         "At thousands of requests per second 'all' costs more CPU than the rest of the path; "
                         "the metrics carry the totals either way.")
    event_loop: str = _f("uvloop", "The gateway's event loop: 'uvloop' (libuv's, in C) or 'asyncio' (Python's own; "
                         "also what runs when uvloop is not installed, with a warning). Measured in the same run "
                         "(`scripts/bench_gateway.py --compare-event-loops`, three runs of 7 figures on 2 cores), "
                         "uvloop's CPU was lower in 15 of 21, by 3% at the median (from 19% lower to 11% "
                         "higher).")
    workers: int = _f(1, "Processes serving the gateway's port, each on a core of its own (SO_REUSEPORT: the "
                      "kernel spreads connections over them). One process saturates one core at a few thousand "
                      "requests per second, and latency then grows with the queue; more keep it flat where "
                      "cores are free. Keys' rate and concurrency limits count across the processes (shared memory).")
    worker_metrics_port: int = _f(0, "With workers > 1: worker i also serves its own /metrics on this port + i "
                                  "(0: each takes a free port) and registers it for Prometheus discovery; /metrics "
                                  "on the main port shows whichever worker took the connection.")


@dataclass(frozen=True)
class SchedulerConfig:
    host: str = _f("127.0.0.1", "Address of the scheduler's /metrics.")
    port: int = _f(8002, "Port of the scheduler's /metrics.")
    node_grace_s: float = _f(60.0, "How long a node may be gone before its replicas are placed elsewhere.")
    resync_s: float = _f(30.0, "Full re-placement period, on top of watch-driven passes.")
    gpu_headroom_mib: int = _f(1024, "Memory of every GPU that placement never hands out, on top of what NVML "
                               "reports used outside Nebula (CUDA contexts, fragmentation, a GPU's total "
                               "rounded up by its board).")
    idle_action: str = _f("stop", "What an elastic model's replicas do once idle for its idle_unload_s, when its "
                          "policy does not say: 'stop' (the unit stops; a wake is a cold start) or 'sleep' "
                          "(vLLM's sleep mode, CUDA only: a CPU model stops instead).")
    target_inflight: float = _f(4.0, "Requests in flight or queued per replica that autoscaling aims at, when a "
                                "model's policy does not say.")
    scale_up_window_s: float = _f(30.0, "Load must stay above the target this long before a replica is added.")
    scale_down_window_s: float = _f(120.0, "Load must stay below target x scale_low_ratio this long before a "
                                    "replica is removed.")
    scale_low_ratio: float = _f(0.3, "Hysteresis: a model counts as underloaded below target x this ratio, so a "
                                "load near the target moves nothing.")
    scale_cooldown_s: float = _f(60.0, "No autoscaling change to a model within this long of its previous change.")
    load_report_stale_s: float = _f(15.0, "Gateway load reports older than this are ignored (their worker stopped "
                                    "publishing); with no fresh report at all nothing is judged idle.")
    scaling_pass_s: float = _f(5.0, "How often the leader re-checks elastic models' load and idleness, on top of "
                               "the passes every change and wake request starts.")
    evict_quiet_s: float = _f(60.0, "An elastic model of lower priority gives way to one that fits nowhere only "
                              "after this long without an inference request (never a busy one).")
    rollout_settle_s: float = _f(5.0, "How long a new replica of a rolling replace or a drain must have been ready "
                                 "(every gateway routes to it) before an old one is retired.")
    rollout_ready_timeout_s: float = _f(900.0, "How long a new replica of a rolling replace may take to become "
                                        "ready before the update rolls back (a weights download counts).")
    rollout_retry_s: float = _f(600.0, "After a drain's new replica failed (nothing to roll back to), how long "
                                "before the scheduler tries again.")


@dataclass(frozen=True)
class NodeConfig:
    name: str = _f("", "This node's name in the cluster. Empty: the host name.")
    address: str = _f("127.0.0.1", "Address at which the gateway reaches this node's engines.")
    host: str = _f("127.0.0.1", "Address of the agent's /metrics.")
    port: int = _f(8003, "Port of the agent's /metrics.")
    gpu_sample_s: float = _f(5.0, "How often the agent reads its GPUs' utilisation, memory, temperature and power "
                             "for /metrics (0: never).")
    gpu_outside_step_mib: int = _f(512, "The node record's per-GPU memory used outside Nebula is rewritten when "
                                   "it moves by at least this much (placement reads it; smaller moves would "
                                   "only churn etcd).")
    gpu_release_timeout_s: float = _f(120.0, "How long after an engine stops its GPU memory may take to come "
                                      "back before nebula_agent_gpu_memory_unreleased_bytes reports it.")
    gpu_release_slack_mib: int = _f(256, "Memory left over after a stop that still counts as released.")
    engine_host: str = _f("127.0.0.1", "Address the engines on this node listen on.")
    port_min: int = _f(18000, "First port handed to engines on this node.")
    port_max: int = _f(18999, "Last port handed to engines on this node.")
    unit_backend: str = _f("auto", "How engines run: 'systemd' (units over D-Bus), 'process' (children of the "
                           "agent), or 'auto' (systemd when it is PID 1).")
    run_dir: str = _f("/run/nebula", "Runtime files: engine specs (engines/<instance>.json), pid files.")
    state_dir: str = _f("/var/lib/nebula", "Persistent state of the agent.")
    cache_dir: str = _f("/var/cache/nebula/models", "Where downloaded model weights are kept: one copy per node, "
                        "shared by every instance and replica on it.")
    hf_endpoint: str = _f("", "Hugging Face Hub endpoint or mirror (e.g. http://hf-mirror.internal). Empty: the "
                          "HF_ENDPOINT environment variable, else the public Hub.")
    hf_token_file: str = _f("", "File holding a Hugging Face access token, for gated or private repos. Empty: none.")
    modelscope_endpoint: str = _f("https://www.modelscope.cn",
                                  "ModelScope endpoint or mirror for modelscope:// sources.")
    modelscope_token_file: str = _f("", "File holding a ModelScope access token. Empty: none.")
    download_workers: int = _f(8, "Files of one model downloaded in parallel.")
    download_retry_max_s: float = _f(300.0, "Longest wait between retries of a download that failed for a "
                                     "passing reason (network, 5xx); waits double from 2 s up to this.")
    resync_s: float = _f(1.0, "How often the agent re-checks its engines (units, /health) on top of watch events; "
                         "a hung engine leaves `ready`, and so the gateway's choice, within about this long.")
    health_timeout_s: float = _f(2.0, "Timeout of the agent's /health check of each engine. Short on purpose: a "
                                 "hung engine takes connections and never answers, and leaves ready (and the "
                                 "gateway's choice) within about resync_s + this; engine.health_timeout_s is the "
                                 "supervisor's (watchdog) check.")
    drain_notice_s: float = _f(2.0, "A replica whose placement was removed (unload, scale down, rolling update, "
                               "node drain) is reported draining at once and keeps serving at least this long, so "
                               "a request a gateway picked just before it saw the change still lands.")
    drain_timeout_s: float = _f(300.0, "How long a removed replica may go on finishing its running requests and "
                                "streams (the gateways send it no new ones) before its engine is stopped anyway.")
    labels: tuple[str, ...] = _f((), "This node's labels as 'key=value' strings (e.g. 'zone=a'), published with its "
                                 "record; a model's `labels` place it only on nodes that carry them all.")


@dataclass(frozen=True)
class EngineConfig:
    runtimes_dir: str = _f("/opt/nebula/engines", "Engine runtimes side by side, one venv per name (e.g. "
                           "vllm-0.32-cu13, from scripts/install-engine.sh): a model's engine_runtime runs "
                           "<runtimes_dir>/<name>/bin/vllm. The agent advertises those it finds.")
    default_runtime: str = _f("vllm", "The runtime of models that name none: <runtimes_dir>/<this>. 'vllm' is the "
                              "link install-engine.sh points at the runtime it installed last.")
    vllm_venv: str = _f("", "The default runtime's venv where it lives outside runtimes_dir (older configs set "
                        "/opt/nebula/engines/vllm, the same place). Empty: <runtimes_dir>/<default_runtime>.")
    hand_specs_dir: str = _f("/etc/nebula/engines", "Specs of hand-run engines (<instance>.toml), used when the "
                             "agent wrote none: `systemctl start nebula-engine@<instance>` with no control plane.")
    vllm_device: str = _f("auto", "'cpu' adds the CPU engine's settings; 'auto' detects from the install.")
    startup_timeout_s: float = _f(900.0, "Longest time a model may take to load before the start fails.")
    health_interval_s: float = _f(2.0, "How often the supervisor checks the engine's /health.")
    health_timeout_s: float = _f(5.0, "Timeout of one /health check; a failed check withholds WATCHDOG=1.")
    watchdog_s: float = _f(30.0, "Engines run as processes (no systemd watchdog): how long a ready engine's /health "
                           "may fail before its supervisor kills it, so that it is restarted. Under systemd the "
                           "unit's WatchdogSec= (30 s) does this instead.")
    stop_timeout_s: float = _f(30.0, "How long in-flight requests may drain on stop before vLLM is killed.")
    cpu_kvcache_gib: int = _f(1, "KV cache size of CPU engines (VLLM_CPU_KVCACHE_SPACE), in GiB.")
    cpu_threads_bind: str = _f(
        "nobind", "VLLM_CPU_OMP_THREADS_BIND of CPU engines. vLLM's 'auto' pins every engine of a node to the same "
        "cores, where a busy engine's spinning threads starve a starting one (seen: a start stalled for minutes); "
        "'nobind' leaves placement to the kernel. Use 'auto' or explicit lists only with one engine per node.")
    default_max_model_len: int = _f(2048, "max_model_len for models that do not set one (0: the model's own).")
    responses_store: bool = _f(
        True, "Generate engines keep the Responses API's stored responses (VLLM_ENABLE_RESPONSES_API_STORE), which "
        "GET /v1/responses/{id}, cancel and previous_response_id need. vLLM keeps every stored response in the "
        "engine's memory until it restarts (no expiry): its memory grows with the responses clients store "
        "(store=true is the API's default). false: nothing is stored, and those requests get 404.")
    extra_args: tuple[str, ...] = _f((), "Arguments added to every `vllm serve` command line (the operator's own: "
                                     "not checked against allowed_engine_args).")
    allowed_engine_args: tuple[str, ...] = _f(
        DEFAULT_ALLOWED_ENGINE_ARGS, "`vllm serve` flags a model's engine_args may use (as `--flag value` or "
        "`--flag=value`); the admin API refuses others (400) and agents and engines check again before a start. "
        "Extend it on every gateway and node. --host, --port, --uds, --served-model-name, --middleware, "
        "--allowed-local-media-path, --trust-remote-code, --api-key, --config and --model can never be allowed.")
    allow_trust_remote_code: bool = _f(False, "Whether a model's spec may set trust_remote_code (vLLM's "
                                       "--trust-remote-code: the engine runs Python shipped with the model). "
                                       "Checked by the admin API, the agent and the engine.")
    user: str = _f("nebula-engine", "Process back-end only, when the agent runs as root: the user engines run as, "
                   "which must exist and must not be able to read the control plane's credentials. Empty: the "
                   "agent's own user. Under systemd the unit's User= decides (nebula-engine).")


@dataclass(frozen=True)
class TracingConfig:
    otlp_endpoint: str = _f("", "OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces). Set: the gateway "
                            "exports a span per request and engines get --otlp-traces-endpoint, so one request is "
                            "one trace. Empty: no spans (W3C traceparent headers still pass through to engines).")
    sample_ratio: float = _f(1.0, "Share of new traces sampled (0-1); a client's sampled traceparent is honoured.")


@dataclass(frozen=True)
class CatalogConfig:
    files: tuple[str, ...] = _f(
        ("/etc/nebula/catalog.toml", "/etc/nebula/catalog.d/*.toml"),
        "Model catalog files (`nebula catalog`, `nebula load NAME`), read in order (a glob in name order); an "
        "entry of a later file replaces an earlier one of the same name. A missing catalog.toml reads the "
        "catalog shipped with Nebula instead.")


@dataclass(frozen=True)
class LogConfig:
    level: str = _f("info", "Log level: debug, info, warning, error.")


@dataclass(frozen=True)
class ModelsConfig:
    profiles_files: tuple[str, ...] = _f(
        ("/etc/nebula/profiles.toml", "/etc/nebula/profiles.d/*.toml"),
        "Model-family profiles files (tool-call and reasoning parsers, extra engine flags per family), read in "
        "order, globs expanded in name order; later entries override earlier ones of the same name. When "
        "/etc/nebula/profiles.toml is absent (a source checkout, tests), the repository's etc/nebula/profiles.toml "
        "beside the nebula package is read in its place. Missing files are skipped.")
    kv_concurrency: int = _f(1, "Sequences of max_model_len tokens the KV cache must hold at once when a model's "
                             "GPU memory is estimated. 1: one full-length request always fits (vLLM refuses to "
                             "start otherwise); shorter requests share the rest. Raise it to size for load.")
    activation_overhead_mib: int = _f(2048, "Per-GPU memory a replica needs beyond weights and KV cache: vLLM's "
                                      "activation peak, CUDA graphs and NCCL/cuBLAS buffers (vLLM logs 1.5-2.5 GiB "
                                      "for 7-70B models).")
    read_timeout_s: float = _f(20.0, "Longest time reading a model's config files and safetensors headers (local "
                               "or from the hub) may take before the load goes on without a profile.")
    read_max_bytes: int = _f(64 * 1024 * 1024, "Most bytes read for one model's profile (config files and "
                             "safetensors headers together); never the weights.")


@dataclass(frozen=True)
class NebulaConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    log: LogConfig = field(default_factory=LogConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(NebulaConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(NebulaConfig)}


def parse_config(data: Mapping[str, Any], env: Mapping[str, str], source: str = "<config>") -> NebulaConfig:
    """Build a validated config from parsed TOML `data` with `env` overrides.

    Raises ValidationError whose message names `source` and the key (`gateway.port`) at fault.
    """
    sections = _sections()
    try:
        built: dict[str, Any] = {}
        for key in data:
            if key == "router":
                if data[key] == {}:
                    continue  # an older `config init` template: the header with every key commented out
                raise ValidationError(key, "the router service is retired: routing moved into the gateway; move "
                                      "these keys (not host, port) into [gateway] and drop [gateway] router_url")
            if key not in sections:
                raise ValidationError(show_key(key), f"unknown section (known: {', '.join(sections)})")
        for sname, stype in sections.items():
            raw = data.get(sname, {})
            if not isinstance(raw, Mapping):
                raise ValidationError(sname, "must be a table ([" + sname + "])")
            hints = typing.get_type_hints(stype)
            names = {f.name for f in dataclasses.fields(stype)}
            for key in raw:
                if key not in names:
                    raise ValidationError(f"{sname}.{show_key(key)}",
                                          f"unknown key (known: {', '.join(sorted(names))})")
            values: dict[str, Any] = {}
            for fname in names:
                where = f"{sname}.{fname}"
                env_name = f"{ENV_PREFIX}{sname}_{fname}".upper()
                if env_name in env:
                    values[fname] = coerce(from_env(env[env_name], hints[fname], env_name), hints[fname],
                                            env_name)
                elif fname in raw:
                    values[fname] = coerce(raw[fname], hints[fname], where)
            built[sname] = stype(**values)
        cfg = NebulaConfig(**built)
        validate(cfg)
        return cfg
    except ValidationError as e:
        where = f"{e.field}: " if e.field else ""
        raise ConfigError(e.field, f"{source}: {where}{e.message}") from None


def parse_config_text(text: str, env: Mapping[str, str], source: str) -> NebulaConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"{source}: not valid TOML: {e}") from None
    return parse_config(data, env, source)


def merge_tables(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Drop-in files (nebula.d/*.toml) override the main file key by key, within each section."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def config_template(cfg: NebulaConfig | None = None) -> list[tuple[str, str, str, Any]]:
    """(section, key, doc, value) for every setting, for writing a commented config file."""
    cfg = cfg or NebulaConfig()
    rows = []
    for sname in _sections():
        section = getattr(cfg, sname)
        for f in dataclasses.fields(section):
            rows.append((sname, f.name, str(f.metadata.get("doc", "")), getattr(section, f.name)))
    return rows
