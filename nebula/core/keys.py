"""The etcd keyspace. Each key has exactly one writer (named per function)."""

ROOT = "/nebula/"
MODELS = ROOT + "models/"
NODES = ROOT + "nodes/"
PLACEMENTS = ROOT + "placements/"
INSTANCES = ROOT + "instances/"
SCHEDULER_LEADER = ROOT + "leader/scheduler"
PULLS = ROOT + "pulls/"
PULL_STATUS = ROOT + "pull-status/"
MODEL_STATUS = ROOT + "status/models/"
SERVICES = ROOT + "services/"
APIKEYS = ROOT + "apikeys/"
ADAPTERS = ROOT + "adapters/"
SCALE = ROOT + "scale/"
LOAD = ROOT + "load/"
WAKE = ROOT + "wake/"
ROLLOUTS = ROOT + "rollouts/"
ROLLOUT_STATUS = ROOT + "status/rollouts/"
DRAINS = ROOT + "drains/"
LOG_ACCESS = ROOT + "log-access/"


def model_key(name: str) -> str:
    """Desired model; written by the gateway's admin API. The one exception: a rolling replace whose new replica
    fails is rolled back by the scheduler leader, which writes the rollout record's previous spec back here,
    fenced and guarded by this key's mod revision (an admin's later write always wins)."""
    return MODELS + name


def adapter_key(name: str) -> str:
    """A desired LoRA adapter (core/lora.py); written by the gateway's admin API."""
    return ADAPTERS + name


def apikey_key(key_id: str) -> str:
    """An API key's record (digest, scopes, limits; never the token); written by the gateway's admin API."""
    return APIKEYS + key_id


def service_key(service: str, node: str, address: str) -> str:
    """Where one running service's /metrics answers (for Prometheus discovery); written by that service
    under a lease of its own, so the record leaves with the process."""
    return SERVICES + service + "/" + node + "/" + address


def node_key(node: str) -> str:
    """Node record under the agent's lease; written by that node's agent."""
    return NODES + node


def node_placements_prefix(node: str) -> str:
    return PLACEMENTS + node + "/"


def placement_key(node: str, instance: str) -> str:
    """Placement of one instance on one node; written only by the scheduler leader."""
    return PLACEMENTS + node + "/" + instance


def instance_key(instance: str) -> str:
    """Observed state of one instance; written only by the agent of the node that runs it."""
    return INSTANCES + instance


def split_placement_key(key: str) -> tuple[str, str] | None:
    """`/nebula/placements/<node>/<instance>` -> (node, instance); None for anything else."""
    if not key.startswith(PLACEMENTS):
        return None
    rest = key[len(PLACEMENTS):]
    node, sep, instance = rest.partition("/")
    if not sep or not node or not instance or "/" in instance:
        return None
    return node, instance


def pull_key(node: str, pull: str) -> str:
    """Pull intent: fetch a source into that node's cache; written by the gateway's admin API."""
    return PULLS + node + "/" + pull


def node_pulls_prefix(node: str) -> str:
    return PULLS + node + "/"


def pull_status_key(node: str, pull: str) -> str:
    """Progress of one pull on one node, under the agent's lease; written only by that node's agent."""
    return PULL_STATUS + node + "/" + pull


def model_status_key(model: str) -> str:
    """Why a model has replicas that fit nowhere, under the leader's lease; written only by the scheduler leader."""
    return MODEL_STATUS + model


def scale_key(model: str) -> str:
    """How many replicas of an elastic model the scheduler wants now (core/elastic.py ScaleState); written only
    by the scheduler leader, fenced."""
    return SCALE + model


def load_key(reporter: str) -> str:
    """One gateway worker's view of every model's load (core/elastic.py LoadReport); written by that worker
    under a lease of its own."""
    return LOAD + reporter


def wake_key(model: str) -> str:
    """Requests are held for a model with no ready replica (core/elastic.py WakeRequest); created by any gateway
    worker (put if absent), deleted by the scheduler leader, fenced, once it has acted."""
    return WAKE + model


def rollout_key(model: str) -> str:
    """A rolling replace in progress (core/rollout_records.py RolloutRecord); created by the gateway's admin API in
    the transaction that writes the model's new spec (only while absent: one update at a time), deleted by the
    scheduler leader, fenced, once the rollout is done or rolled back."""
    return ROLLOUTS + model


def rollout_status_key(model: str) -> str:
    """How a model's rolling replace stands or ended (RolloutStatus); written only by the scheduler leader, fenced."""
    return ROLLOUT_STATUS + model


def drain_key(node: str) -> str:
    """A node being drained (DrainRecord): nothing new is placed there and its replicas move away; written and
    deleted by the gateway's admin API."""
    return DRAINS + node


def log_access_key(node: str) -> str:
    """Where a node agent serves its engines' logs and the token it asks for (core/engine_logs.py LogAccess);
    written by that node's agent under a lease of its own. Read only by gateways: no listing shows it."""
    return LOG_ACCESS + node
