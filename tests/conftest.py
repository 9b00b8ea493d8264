"""Real peers for the whole test run: one redis-server and one Node test OP.

They start ONCE per pytest run, in the controlling process (``pytest_configure`` when this is
not an xdist worker), on free loopback ports, and stop in ``pytest_unconfigure``. Under
pytest-xdist the controller hands their addresses to every worker through
``node.workerinput`` (``pytest_configure_node``). A peer that fails to start does not stop the
run: each test that needs it errors with the reason and the peer's log, while tests that do not
need it run as usual. ``OIDCGW_TEST_PEERS=0`` skips starting them (e.g. unit tests on a machine
without node or redis-server).

Fixtures (see tests/support/peers.py for the objects):

- ``oidc_provider`` (session): :class:`OidcProvider` with ``issuer`` and
  ``register_client(redirect_uris, auth_method="client_secret_basic",
  post_logout_redirect_uris=None, *, access_token_ttl=None, id_token_ttl=None,
  refresh_token_ttl=None) -> (client_id, client_secret)``.
- ``oidc_provider_factory`` (function): ``factory(**OP_ENV) -> OidcProviderServer``, a private OP
  (e.g. ``factory(OP_ACCESS_TOKEN_TTL=2)``) a test may ``stop()`` and ``start()``.
- ``redis_target`` (function): :class:`RedisTarget` ``(url, prefix, host, port)`` on the shared
  server; the prefix is unique to the test and its keys are deleted afterwards.
  ``redis_url`` and ``redis_key_prefix`` are the two halves.
- ``redis_server_factory`` (function): ``factory(*, persist=True, password=None, start=True,
  unixsocket=None) -> RedisServer`` with ``url``, ``start()``, ``stop()``, ``kill()``,
  ``freeze()``, ``thaw()``.
- ``free_tcp_port`` (function): a free port on 127.0.0.1.

Tests using the Redis fixtures get the ``redis`` marker and those using the OP get the
``provider`` marker automatically, so ``-m "not provider"`` deselects them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.peers import (
    OidcProvider,
    OidcProviderFactory,
    OidcProviderServer,
    PeerError,
    RedisServer,
    RedisServerFactory,
    RedisTarget,
    delete_prefix,
    ensure_op_installed,
    free_port,
)

PEERS_KEY = "oidcgw_peers"  # in node.workerinput
REDIS_FIXTURES = frozenset(
    {"redis_target", "redis_url", "redis_key_prefix", "redis_server_factory"})
PROVIDER_FIXTURES = frozenset({"oidc_provider", "oidc_provider_factory"})


# ---------------------------------------------------------------------------------------------
# The shared peers: started by the controller, described to the workers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerInfo:
    """What a worker needs to reach the shared peers (JSON over execnet)."""

    log_dir: str
    redis_port: int | None = None
    redis_error: str | None = None
    op_issuer: str | None = None
    op_log: str | None = None
    op_error: str | None = None

    def to_wire(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_wire(cls, raw: str) -> PeerInfo:
        return cls(**json.loads(raw))


class SharedPeers:
    """The controller's redis-server and OP processes."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.redis: RedisServer | None = None
        self.op: OidcProviderServer | None = None
        self.info = PeerInfo(log_dir=str(log_dir))

    def start(self) -> PeerInfo:
        redis_error = op_error = None
        # Launch both, then wait for both: the OP's start (about a second) overlaps Redis's.
        try:
            ensure_op_installed()
            self.op = OidcProviderServer(self.log_dir / "oidc-provider.log")
            self.op.launch()
        except PeerError as exc:
            op_error = str(exc)
        try:
            self.redis = RedisServer(self.log_dir / "redis", persist=False)
            self.redis.start()
        except PeerError as exc:
            redis_error = str(exc)
        if self.op is not None and op_error is None:
            try:
                self.op.wait_ready()
            except PeerError as exc:
                op_error = str(exc)
        self.info = PeerInfo(
            log_dir=str(self.log_dir),
            redis_port=self.redis.port if self.redis and not redis_error else None,
            redis_error=redis_error,
            op_issuer=self.op.issuer if self.op and not op_error else None,
            op_log=str(self.op.log_path) if self.op else None,
            op_error=op_error,
        )
        return self.info

    def health(self) -> list[str]:
        """Problems seen at the end of the run (a peer that died while tests ran)."""
        problems = []
        if self.redis is not None and self.info.redis_port and not self.redis.running:
            problems.append(f"the shared redis-server died during the run:\n{self.redis.logs()}")
        if self.op is not None and self.info.op_issuer and not self.op.running:
            problems.append(f"the shared oidc-provider died during the run:\n{self.op.logs()}")
        return problems

    def stop(self) -> None:
        for peer in (self.op, self.redis):
            if peer is not None:
                with contextlib.suppress(Exception):
                    peer.stop()


_shared_key = pytest.StashKey[SharedPeers]()
_info_key = pytest.StashKey[PeerInfo]()
_failed_key = pytest.StashKey[bool]()


class _XdistPeers:
    """Registered only when pytest-xdist is loaded (its hook is unknown otherwise)."""

    def __init__(self, info: PeerInfo) -> None:
        self.info = info

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput[PEERS_KEY] = self.info.to_wire()


def _wants_no_peers(config: pytest.Config) -> bool:
    if os.environ.get("OIDCGW_TEST_PEERS", "1") == "0":
        return True
    opt = config.option
    return any(getattr(opt, name, False) for name in (
        "help", "version", "collectonly", "showfixtures", "show_fixtures_per_test", "markers"))


def pytest_configure(config: pytest.Config) -> None:
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    if workerinput is not None:  # an xdist worker: the controller started the peers
        raw = workerinput.get(PEERS_KEY)
        if raw:
            config.stash[_info_key] = PeerInfo.from_wire(raw)
        return
    if _wants_no_peers(config):
        return
    shared = SharedPeers(Path(tempfile.mkdtemp(prefix="oidcgw-peers-")))
    config.stash[_shared_key] = shared
    try:
        config.stash[_info_key] = shared.start()
    except BaseException:
        shared.stop()
        raise
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistPeers(config.stash[_info_key]), "oidcgw-xdist-peers")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_failed_key] = exitstatus not in (0, 5)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    shared = config.stash.get(_shared_key, None)
    if shared is None:
        return
    problems = shared.health()
    if problems or exitstatus not in (0, 5):
        terminalreporter.section("test peers")
        terminalreporter.write_line(f"peer logs kept in {shared.log_dir}")
        for problem in problems:
            terminalreporter.write_line(problem)


def pytest_unconfigure(config: pytest.Config) -> None:
    shared = config.stash.get(_shared_key, None)
    if shared is None:
        return
    shared.stop()
    if not config.stash.get(_failed_key, False) and not shared.health():
        shutil.rmtree(shared.log_dir, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the peers they use, before ``-m`` deselects anything."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & REDIS_FIXTURES and not item.get_closest_marker("redis"):
            item.add_marker(pytest.mark.redis)
        if names & PROVIDER_FIXTURES and not item.get_closest_marker("provider"):
            item.add_marker(pytest.mark.provider)


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


def _worker_id() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


@pytest.fixture(scope="session")
def peer_info(pytestconfig: pytest.Config) -> PeerInfo:
    info = pytestconfig.stash.get(_info_key, None)
    if info is None:
        pytest.fail("the shared test peers were not started (OIDCGW_TEST_PEERS=0?)", pytrace=False)
    return info


@pytest.fixture(scope="session")
def oidc_provider(peer_info: PeerInfo) -> OidcProvider:
    """The shared test OP (tests/op/server.js): register your own client on it."""
    if peer_info.op_error or not peer_info.op_issuer:
        pytest.fail(f"the test OP did not start: {peer_info.op_error}", pytrace=False)
    provider = OidcProvider(peer_info.op_issuer,
                            Path(peer_info.op_log) if peer_info.op_log else None)
    try:
        provider.discovery()
    except (OSError, PeerError) as exc:
        pytest.fail(f"the test OP does not answer: {exc}\n{provider.logs()}", pytrace=False)
    return provider


@pytest.fixture
def oidc_provider_factory(tmp_path: Path) -> Iterator[OidcProviderFactory]:
    factory = OidcProviderFactory(tmp_path / "op")
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def redis_key_prefix() -> str:
    """A key prefix no other test (on any worker) uses."""
    return f"test:{_worker_id()}:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def redis_target(peer_info: PeerInfo, redis_key_prefix: str) -> Iterator[RedisTarget]:
    """The shared redis-server and this test's own key prefix (keys deleted afterwards)."""
    if peer_info.redis_error or not peer_info.redis_port:
        pytest.fail(f"the shared redis-server did not start: {peer_info.redis_error}",
                    pytrace=False)
    port = peer_info.redis_port
    target = RedisTarget(f"redis://127.0.0.1:{port}/0", redis_key_prefix, port=port)
    try:
        yield target
    finally:
        delete_prefix(port, redis_key_prefix)


@pytest.fixture
def redis_url(redis_target: RedisTarget) -> str:
    """``redis://127.0.0.1:PORT/0`` of the shared server; use ``redis_key_prefix`` for keys."""
    return redis_target.url


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[RedisServerFactory]:
    factory = RedisServerFactory(tmp_path / "redis")
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def free_tcp_port() -> int:
    return free_port()

