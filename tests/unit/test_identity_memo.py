"""What the gateway works out per identity (policy answers, identity headers) lives exactly as
long as the Identity object: a process serving sessions for hours keeps no memo of identities
it no longer holds (the 5-minute soak once grew 20 MiB that way)."""

from __future__ import annotations

import gc

from gateway.endpoints import Gateway, _KeptAccess, _remember
from gateway.models import Decision, Identity


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
