"""A key this gateway created, whose record its mirror saw before the creating handler went on: deleting it
from etcd (a revoke at another gateway, or an operator) must end it here too, and reopen a gateway that has
no key left."""

from __future__ import annotations

from nebula.core.apikeys import KeyRecord, KeyScope, digest
from nebula.services.cluster.mirror import MirrorState
from nebula.services.gateway.auth import Authenticator, Scope
from nebula.services.http.errors import ApiError

RECORD = KeyRecord(id="00000000000000aa", name="ops", digest=digest("tok"), scopes=frozenset({KeyScope.ADMIN}))


def refused(auth: Authenticator, token: str) -> bool:
    try:
        auth.authenticate(Scope.ADMIN, f"Bearer {token}")
    except ApiError as e:
        return e.status == 401
    return False


def test_the_mirror_first_then_the_handler_then_a_delete() -> None:
    auth = Authenticator((), (), lambda: 0.0)
    auth.update_keys(MirrorState(records={}))
    auth.update_keys(MirrorState(records={"/nebula/apikeys/aa": RECORD}))  # the watch beat the handler
    auth.created(RECORD)
    assert auth.authenticate(Scope.ADMIN, "Bearer tok") == RECORD
    auth.update_keys(MirrorState(records={}))  # deleted in etcd
    assert auth.is_open and auth.authenticate(Scope.ADMIN, None) is None
    auth.update_keys(MirrorState(records={"/nebula/apikeys/bb": KeyRecord(
        id="00000000000000bb", name="other", digest=digest("other"), scopes=frozenset({KeyScope.ADMIN}))}))
    assert refused(auth, "tok")


def test_the_handler_first_then_the_mirror_then_a_delete() -> None:
    auth = Authenticator((), (), lambda: 0.0)
    auth.update_keys(MirrorState(records={}))
    auth.created(RECORD)  # works here before the mirror sees it
    assert auth.authenticate(Scope.ADMIN, "Bearer tok") == RECORD
    auth.update_keys(MirrorState(records={"/nebula/apikeys/aa": RECORD}))
    auth.update_keys(MirrorState(records={}))
    assert auth.is_open
