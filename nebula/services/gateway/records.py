"""Node records as read from etcd by the admin endpoints: a damaged record is logged and left out."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from nebula.adapters.store import KeyValue
from nebula.core.model import NodeRecord, loads
from nebula.errors import ValidationError

log = logging.getLogger(__name__)


def node_records(items: Iterable[KeyValue]) -> list[NodeRecord]:
    out = []
    for kv in items:
        try:
            out.append(NodeRecord.from_dict(loads(kv.value)))
        except (ValidationError, KeyError, TypeError, ValueError) as e:
            log.warning("invalid node record %s: %r", kv.key, e)
    return out
