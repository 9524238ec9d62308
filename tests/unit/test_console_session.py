"""The console's sessions as pure functions: signing, expiry on a controlled clock, CSRF, revocation, and
the secret the gateway's workers share."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from nebula.core.apikeys import KeyRecord, KeyScope
from nebula.services.gateway import console_session as cs

SECRET = b"s" * 32
ADMIN = KeyRecord(id="0123456789abcdef", name="ops", digest="a" * 64, scopes=frozenset({KeyScope.ADMIN}))
T0 = 1_000_000.0


def keys(*records: KeyRecord) -> dict[str, KeyRecord]:
    return {r.id: r for r in records}


def check(token: str, now: float = T0 + 1, method: str = "GET", csrf: str | None = None,
          live: dict[str, KeyRecord] | None = None, gateway_open: bool = False) -> KeyRecord | None:
    known = keys(ADMIN) if live is None else live
    return cs.check(SECRET, token, now, method, csrf, known.get, gateway_open)


def refused(status: int, code: str, **kw: object) -> None:
    token = kw.pop("token")
    with pytest.raises(cs.SessionError) as e:
        check(str(token), **kw)  # type: ignore[arg-type]
    assert (e.value.status, e.value.code) == (status, code)


def test_a_session_names_its_key_until_it_expires() -> None:
    token = cs.issue(SECRET, ADMIN, T0, lifetime_s=60)
    assert check(token, now=T0 + 59.9) == ADMIN
    refused(401, "session_expired", token=token, now=T0 + 60)


def test_state_changes_need_the_sessions_csrf_token() -> None:
    token = cs.issue(SECRET, ADMIN, T0)
    for method in ("POST", "PATCH", "DELETE", "PUT"):
        refused(403, "csrf_failed", token=token, method=method)
        refused(403, "csrf_failed", token=token, method=method, csrf="x" * 32)
        other = cs.csrf_token(SECRET, cs.issue(SECRET, ADMIN, T0))  # another session's token
        refused(403, "csrf_failed", token=token, method=method, csrf=other)
        assert check(token, method=method, csrf=cs.csrf_token(SECRET, token)) == ADMIN
    assert check(token, method="HEAD") == ADMIN


def test_a_revoked_replaced_or_demoted_key_ends_its_sessions() -> None:
    token = cs.issue(SECRET, ADMIN, T0)
    refused(401, "session_revoked", token=token, live={})
    replaced = KeyRecord(id=ADMIN.id, name="ops", digest="b" * 64, scopes=ADMIN.scopes)
    refused(401, "session_revoked", token=token, live=keys(replaced))
    demoted = KeyRecord(id=ADMIN.id, name="ops", digest=ADMIN.digest, scopes=frozenset({KeyScope.INFERENCE}))
    refused(401, "session_revoked", token=token, live=keys(demoted))


def test_an_open_gateways_session_lasts_only_while_it_is_open() -> None:
    token = cs.issue(SECRET, None, T0)
    assert check(token, gateway_open=True) is None
    refused(401, "session_revoked", token=token, gateway_open=False)


def test_another_secret_or_garbage_is_not_a_session() -> None:
    token = cs.issue(b"t" * 32, ADMIN, T0)
    refused(401, "session_invalid", token=token)
    for junk in ("", ".", "abc", "abc.def", token.replace(".", "")):
        refused(401, "session_invalid", token=junk)


@given(hs.integers(min_value=0), hs.sampled_from("AQgw-_"))
def test_any_changed_character_breaks_the_signature(where: int, char: str) -> None:
    token = cs.issue(SECRET, ADMIN, T0)
    i = where % len(token)
    changed = token[:i] + char + token[i + 1:]
    if changed == token or token[i] == ".":
        return
    with pytest.raises(cs.SessionError):
        check(changed)


def test_workers_sharing_the_secret_accept_each_others_sessions() -> None:
    env = {cs.SECRET_ENV: cs.new_console_secret(), "PATH": "/usr/bin"}
    first, second = cs.console_secret(dict(env)), cs.console_secret(dict(env))
    assert first == second and len(first) == 32
    token = cs.issue(first, ADMIN, T0)
    assert cs.check(second, token, T0 + 1, "GET", None, keys(ADMIN).get, False) == ADMIN


def test_the_secret_leaves_the_environment_and_a_missing_or_short_one_is_replaced() -> None:
    env = {cs.SECRET_ENV: cs.new_console_secret()}
    cs.console_secret(env)
    assert cs.SECRET_ENV not in env
    alone = [cs.console_secret(given) for given in ({}, {cs.SECRET_ENV: "abcd"}, {cs.SECRET_ENV: "zz"})]
    assert len({*alone}) == 3 and all(len(s) == 32 for s in alone)


def test_renewal_past_half_life_keeps_the_csrf_token() -> None:
    token = cs.issue(SECRET, ADMIN, T0, lifetime_s=100)
    session = cs.parse(SECRET, token, T0)
    assert not cs.should_renew(session, T0 + 49, lifetime_s=100)
    assert cs.should_renew(session, T0 + 51, lifetime_s=100)
    renewed = cs.issue(SECRET, ADMIN, T0 + 51, lifetime_s=100, nonce=session.nonce)
    assert renewed != token and cs.csrf_token(SECRET, renewed) == cs.csrf_token(SECRET, token)
    assert check(renewed, now=T0 + 120, method="POST", csrf=cs.csrf_token(SECRET, token)) == ADMIN


def test_the_cookie_is_out_of_scripts_and_other_sites_reach() -> None:
    plain, tls = cs.CookieAttributes(secure=False), cs.CookieAttributes(secure=True)
    assert plain.httponly and plain.samesite == "Strict" and not plain.secure and tls.secure
    assert plain.max_age == cs.SESSION_S <= 3600


def test_the_content_security_policy_allows_nothing_inline_or_foreign() -> None:
    rules = dict(r.strip().split(" ", 1) for r in cs.CSP.split(";"))
    assert rules["default-src"] == rules["script-src"] == rules["style-src"] == "'self'"
    assert rules["frame-ancestors"] == "'none'" and "unsafe" not in cs.CSP
    assert cs.SECURITY_HEADERS["X-Frame-Options"] == "DENY"
