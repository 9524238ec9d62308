"""The etcd keyspace. Each key has exactly one writer (named per function)."""

ROOT = "/nebula/"
MODELS = ROOT + "models/"
NODES = ROOT + "nodes/"
PLACEMENTS = ROOT + "placements/"
INSTANCES = ROOT + "instances/"
SCHEDULER_LEADER = ROOT + "leader/scheduler"


def model_key(name: str) -> str:
    """Desired model; written by the gateway's admin API."""
    return MODELS + name


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
