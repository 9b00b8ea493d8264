"""SessionCache rules that need no Redis: expiry, size bound, races with invalidation, and
that a session is handed only to the secret that opened it."""

from __future__ import annotations

from gateway.models import Identity, Session, TokenSet
from gateway.session_cache import SessionCache, Subscriber

SESSION = Session(
    identity=Identity(sub="s1", user="alice"),
    tokens=TokenSet(id_token="x"),
    created_at=0.0,
    last_seen=0.0,
    expires_at=100.0,
    issuer="https://op.example",
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cache(clock: Clock, *, ttl: float = 10.0, max_entries: int = 100) -> SessionCache:
    return SessionCache(ttl=ttl, max_entries=max_entries, clock=clock)


def put(c: SessionCache, key: str, blob: bytes = b"sealed") -> None:
    token = c.begin(key)
    assert c.fill(key, token, blob) is not None


def test_an_entry_is_served_until_its_ttl_then_read_again() -> None:
    clock = Clock()
    c = cache(clock, ttl=10.0)
    put(c, "s:1")
    clock.now += 9.9
    entry = c.lookup("s:1")
    assert entry is not None
    assert entry.blob == b"sealed"
    clock.now += 0.2
    assert c.lookup("s:1") is None
    assert len(c) == 0


def test_an_invalidation_during_a_read_keeps_the_old_value_out() -> None:
    c = cache(Clock())
    token = c.begin("s:1")
    c.invalidate("s:1")  # another process signed the user out while we read Redis
    assert c.fill("s:1", token, b"old") is None
    assert c.lookup("s:1") is None


def test_of_overlapping_reads_the_first_to_finish_fills() -> None:
    c = cache(Clock())
    first = c.begin("s:1")
    second = c.begin("s:1")
    assert c.fill("s:1", second, b"b") is not None
    assert c.fill("s:1", first, b"a") is None  # already filled: the entry stays
    entry = c.lookup("s:1")
    assert entry is not None
    assert entry.blob == b"b"


def test_a_read_begun_before_an_invalidation_never_fills() -> None:
    c = cache(Clock())
    before = c.begin("s:1")
    c.invalidate("s:1")
    after = c.begin("s:1")
    assert c.fill("s:1", before, b"old") is None
    assert c.lookup("s:1") is None
    assert c.fill("s:1", after, b"new") is not None


def test_steady_concurrent_reads_of_one_session_fill_the_cache() -> None:
    """50 requests of one session always in flight, each read finishing after the next one
    began (a busy dashboard, or an entry that just expired under load): the cache fills at
    the first read that finishes, and the rest are hits."""
    c = cache(Clock())
    in_flight = [c.begin("s:1") for _ in range(50)]
    reads = 0
    for _ in range(200):
        if c.holds("s:1"):
            break
        token = in_flight.pop(0)
        in_flight.append(c.begin("s:1"))  # the next request arrives before this read ends
        c.fill("s:1", token, b"sealed")
        reads += 1
    assert c.lookup("s:1") is not None
    assert reads == 1


def test_absent_sessions_are_never_cached() -> None:
    c = cache(Clock())
    token = c.begin("s:random")
    assert c.fill("s:random", token, None) is None
    assert len(c) == 0


def test_the_cache_holds_at_most_max_entries_oldest_out_first() -> None:
    c = cache(Clock(), max_entries=3)
    for i in range(5):
        put(c, f"s:{i}")
    assert len(c) == 3
    assert c.lookup("s:0") is None
    assert c.lookup("s:1") is None
    assert c.lookup("s:4") is not None


def test_an_opened_session_goes_only_to_the_secret_that_opened_it() -> None:
    c = cache(Clock())
    put(c, "s:1")
    entry = c.lookup("s:1")
    assert entry is not None
    assert c.opened(entry, b"right secret") is None  # nothing opened yet
    c.remember(entry, b"right secret", SESSION)
    assert c.opened(entry, b"right secret") is SESSION
    assert c.opened(entry, b"wrong secret") is None


def test_a_cache_with_a_bus_is_not_used_before_its_subscription_answers() -> None:
    class NoBus:
        async def publish(self, channel: str, message: bytes) -> None:
            raise AssertionError("not called")

        def pubsub(self) -> Subscriber:
            raise AssertionError("not called")

        def channel(self, name: str) -> str:
            return "p:" + name

    c = SessionCache(ttl=10.0, max_entries=10, bus=NoBus(), clock=Clock())
    assert not c.usable
    token = c.begin("s:1")
    assert c.fill("s:1", token, b"sealed") is None
    assert c.lookup("s:1") is None
