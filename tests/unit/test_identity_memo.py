"""What the gateway works out per identity (policy answers, identity headers) lives exactly as
long as the Identity object: a process serving sessions for hours keeps no memo of identities
it no longer holds (the 5-minute soak once grew 20 MiB that way). The session ticket read from
a Cookie header is kept by the header's text, in a bounded memo."""

from __future__ import annotations

import gc
import secrets
from types import SimpleNamespace
from typing import Any

from aiohttp.test_utils import make_mocked_request

from gateway.endpoints import Gateway, _KeptAccess, _remember
from gateway.models import Decision, Identity
from gateway.sessions import encode_ticket, new_ticket


def bare_gateway() -> Gateway:
    gateway = Gateway.__new__(Gateway)  # only the memo's state: no config, store or network
    gateway._memos = {}
    return gateway


def test_the_memo_of_an_identity_goes_when_the_identity_goes() -> None:
    gateway = bare_gateway()
    alice = Identity(sub="s-alice", user="alice", claims={"groups": ["eng"]})
    memo = gateway._memo_of(alice)
    _remember(memo, ("access", "app", "GET", None),
              _KeptAccess(True, False, True, Decision(True, "allowed")))
    assert gateway._memo_of(alice) is memo
    assert len(gateway._memos) == 1
    del alice, memo
    gc.collect()
    assert gateway._memos == {}


def test_a_kept_answer_does_not_keep_its_identity_alive() -> None:
    gateway = bare_gateway()
    bob = Identity(sub="s-bob", user="bob")
    kept = _KeptAccess(True, False, True, Decision(True, "allowed"))
    _remember(gateway._memo_of(bob), ("access", "app", "GET", None), kept)
    assert not any(ref is bob for ref in gc.get_referents(kept))
    del bob
    gc.collect()
    assert gateway._memos == {}


def test_one_identity_keeps_a_bounded_number_of_results() -> None:
    gateway = bare_gateway()
    carol = Identity(sub="s-carol", user="carol")
    memo = gateway._memo_of(carol)
    for i in range(1000):  # e.g. a client cycling through addresses
        _remember(memo, ("access", "app", "GET", f"10.0.{i // 256}.{i % 256}"), None)
    assert len(memo) <= 64


def ticket_gateway() -> Gateway:
    gateway = Gateway.__new__(Gateway)  # only what _ticket_of reads
    gateway.cookie_name = "_oidc_gateway"
    gateway._tickets = {}
    return gateway


def cookie_request(header: str) -> Any:
    return make_mocked_request("GET", "/", headers={"Cookie": header})


def test_the_ticket_memo_answers_like_the_cookie_parser_and_stays_bounded() -> None:
    gateway = ticket_gateway()
    alice, bob = new_ticket(secrets.token_bytes), new_ticket(secrets.token_bytes)
    header = f"theme=dark; _oidc_gateway={encode_ticket(alice)}"
    assert gateway._ticket_of(cookie_request(header)) == alice
    assert gateway._ticket_of(cookie_request(header)) == alice  # from the memo
    # Another browser's header, a broken ticket, none at all: each its own answer.
    assert gateway._ticket_of(cookie_request(f"_oidc_gateway={encode_ticket(bob)}")) == bob
    assert gateway._ticket_of(cookie_request(header[:-1])) is None
    assert gateway._ticket_of(cookie_request("theme=dark")) is None
    # A client sending ever new cookies: the memo stays bounded and answers stay right.
    for i in range(5000):  # a light stand-in for the request: a mocked one takes ~2 ms
        junk = f"_oidc_gateway=junk{i}"
        stand_in = SimpleNamespace(headers={"Cookie": junk}, cookies={"_oidc_gateway": junk[14:]})
        assert gateway._ticket_of(stand_in) is None  # type: ignore[arg-type]
    assert len(gateway._tickets) <= 4096
    assert gateway._ticket_of(cookie_request(header)) == alice
    # A header longer than a browser's usual is answered, not kept.
    long_header = f"{'x' * 2000}=1; _oidc_gateway={encode_ticket(bob)}"
    assert gateway._ticket_of(cookie_request(long_header)) == bob
    assert long_header not in gateway._tickets
