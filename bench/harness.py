"""The servers the benchmark measures, started on 127.0.0.1 and always stopped again.

Every server runs in its own process group (so a gateway or nginx that forks is stopped whole)
and gets ``PR_SET_PDEATHSIG`` on Linux, so that even a bench killed with SIGKILL (a CI timeout)
leaves nothing listening. :class:`Harness` is a context manager: whatever happens inside, every
process it started is stopped on the way out. Redis and the test OpenID Provider come from
``tests/support/peers.py``, the same helpers the integration tests use.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.gateway_proc import gateway_config, new_session_key
from tests.support.peers import (
    ChildProcess,
    OidcProviderServer,
    PeerError,
    RedisServer,
    ensure_op_installed,
    free_port,
    tail,
)

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
NGINX_TEMPLATE = BENCH_DIR / "upstream" / "nginx.conf.in"
NGINX_LOCATIONS = BENCH_DIR / "upstream" / "locations.conf"

SMALL_BODY = b"upstream ok: fixed 64-byte benchmark body .....................\n"
ONE_MIB = 1024 * 1024
START_DEADLINE = 30.0


# What a server that cannot start or is missing raises; the message says what to install or
# read. The same error as the test peers' (the bench starts its servers with their ChildProcess).
HarnessError = PeerError


def find_program(name: str, debian_package: str) -> str:
    """The path of a program, looking in /usr/sbin too (nginx lives there)."""
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None)
    if not found:
        raise HarnessError(f"{name} is not installed (Debian: apt-get install {debian_package})")
    return found


def http_status(url_host: str, port: int, path: str, *, accept: str = "*/*",
                timeout: float = 1.0) -> int | None:
    """Status of one GET to 127.0.0.1, or None when nothing answers."""
    conn = http.client.HTTPConnection(url_host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Accept": accept})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


# --------------------------------------------------------------------------------------- /proc


def proc_status_kib(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM), or None if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a gateway may fork worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: split after the last ")".
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree: list[int] = []
    todo = [pid]
    while todo and len(tree) < 10_000:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def listener_pids(port: int) -> set[int]:
    """Every process holding the listening TCP socket on 127.0.0.1:``port`` (nginx, Apache and
    a multi-process gateway share one among several processes), plus their descendants."""
    wanted = f"0100007F:{port:04X}"
    inodes = set()
    try:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[1] == wanted and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    except OSError:
        return set()
    pids: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                pids.add(int(entry.name))
        except OSError:
            continue
    for pid in list(pids):
        pids.update(process_tree(pid))
    return pids


def cpu_seconds(pids: set[int]) -> dict[int, float]:
    """User + system CPU seconds used so far by each live process of ``pids``."""
    tick = os.sysconf("SC_CLK_TCK")
    used = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        used[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return used


def tree_status_kib(pid: int, field: str) -> tuple[int, int]:
    """Sum of a /proc status field over a process tree, and the number of processes."""
    values = [v for p in process_tree(pid) if (v := proc_status_kib(p, field)) is not None]
    return sum(values), len(values)


# ------------------------------------------------------------------------------------- servers


class Harness(contextlib.ExitStack):
    """Starts the bench's servers in ``run_dir``; leaving the ``with`` block stops them all."""

    def __init__(self, run_dir: Path, *, gateway_settings: Mapping[str, Any] | None = None,
                 gateway_src: Path = REPO_DIR, provider: ExternalProvider | None = None) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.provider = provider
        self.gateway_src = gateway_src
        self.gateway_settings = dict(gateway_settings or {})
        self.redis: RedisServer | None = None
        self.op: OidcProviderServer | None = None
        self.upstream_url = ""
        self.gateway_url = ""
        self.gateway: ChildProcess | None = None
        self.session_key = new_session_key()
        self.key_prefix = "bench:"
        self.config: dict[str, Any] = {}

    def start_all(self, *, log: Callable[[str], None]) -> None:
        """Redis, upstream and OP first (the OP's start overlaps the others), then the gateway."""
        nginx = find_program("nginx", "nginx-light")
        find_program("wrk", "wrk")
        op = None
        if self.provider is None:
            ensure_op_installed()
            op = OidcProviderServer(self.run_dir / "oidc-provider.log")
            op.launch()
            self.callback(op.stop)
            self.op = op
        redis = RedisServer(self.run_dir / "redis", persist=False)
        self.callback(redis.stop)
        redis.start()
        self.redis = redis
        self.upstream_url = self._start_upstream(nginx)
        if op is not None:
            op.wait_ready()
        issuer = op.issuer if op is not None else self.provider.issuer  # type: ignore[union-attr]
        log(f"redis {redis.url}, upstream {self.upstream_url}, provider {issuer}")
        self.gateway_url = self._start_gateway()
        log(f"gateway {self.gateway_url} (pid {self.gateway_pid}), config {self.config_path}")

    # nginx ------------------------------------------------------------------------------------

    def _start_upstream(self, nginx: str) -> str:
        folder = self.run_dir / "upstream"
        (folder / "tmp").mkdir(parents=True, exist_ok=True)
        # Deterministic, incompressible-looking bytes: nothing on the way may shrink them.
        (folder / "bench-1m.bin").write_bytes(bytes(range(256)) * (ONE_MIB // 256))
        port = free_port()
        text = NGINX_TEMPLATE.read_text().replace("@PORT@", str(port)).replace(
            "@LOCATIONS@", str(NGINX_LOCATIONS))
        conf = folder / "nginx.conf"
        conf.write_text(text)
        service = ChildProcess("nginx upstream", [nginx, "-p", f"{folder}/", "-e", "error.log",
                                                  "-c", str(conf)], folder / "stdout.log",
                               group=True)
        service.start()
        self.callback(service.stop)
        service.wait_until(lambda: http_status("127.0.0.1", port, "/healthz") == 200,
                           START_DEADLINE, f"it answers on 127.0.0.1:{port}")
        return f"http://127.0.0.1:{port}"

    # gateway ----------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.run_dir / "gateway.yaml"

    @property
    def gateway_pid(self) -> int:
        pid = self.gateway.pid if self.gateway is not None else None
        if pid is None:
            raise HarnessError("the gateway is not started")
        return pid

    def _start_gateway(self) -> str:
        if self.redis is None or (self.op is None and self.provider is None):
            raise HarnessError("start the provider and Redis first")
        if self.provider is not None:
            port = self.provider.gateway_port
            url = f"http://127.0.0.1:{port}"
            issuer = self.provider.issuer
            client_id, client_secret = self.provider.client_id, self.provider.client_secret
        else:
            assert self.op is not None  # noqa: S101 - checked above
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            issuer = self.op.issuer
            client_id, client_secret = self.op.register_client([f"{url}/oauth2/callback"])
        config = bench_config(
            port=port, issuer=issuer, client_id=client_id, client_secret=client_secret,
            upstream=self.upstream_url, store="redis", redis_url=self.redis.url,
            key_prefix=self.key_prefix, session_key=self.session_key,
        )
        for dotted, value in self.gateway_settings.items():
            _set_dotted(config, dotted, value)
        self.config = config
        self.config_path.write_text(yaml.safe_dump(config))
        service = ChildProcess(
            "gateway", [sys.executable, "-m", "gateway", "run", "-c", str(self.config_path)],
            self.run_dir / "gateway.log", cwd=self.gateway_src, env=gateway_env(self.gateway_src),
            group=True,
        )
        service.start()
        self.callback(service.stop)
        self.gateway = service
        workers = int((config.get("server") or {}).get("workers") or 1)
        service.wait_until(lambda: every_worker_ready(port, workers),
                           START_DEADLINE, f"it is ready on {url}/ready")
        return url

    def gateway_log_tail(self) -> str:
        return tail(self.run_dir / "gateway.log", 40)


def every_worker_ready(port: int, workers: int) -> bool:
    """``/ready`` answers 200 on ten new connections in a row (one with one process). Each
    new connection goes to one worker (SO_REUSEPORT), and a worker still loading the provider
    answers 503 (a run's first login failed so once): ten in a row on one of two workers by
    chance is 1 in 512."""
    tries = 1 if workers <= 1 else 10
    return all(http_status("127.0.0.1", port, "/ready") == 200 for _ in range(tries))


def bench_config(*, upstream: str, **settings: Any) -> dict[str, Any]:
    """The benchmarked gateway's config: ``gateway_config`` (``settings``: port, provider,
    store...) with one route on which every path needs a session, as in the peer's Apache
    (``<Location />`` valid-user), and no access log on either side (logins still log)."""
    config = gateway_config(
        upstream=upstream,
        routes=[{"name": "app", "match": {"path": "/"}, "upstream": upstream}], **settings)
    config["logging"] = {"level": "info", "format": "json", "access_log": False}
    return config


@dataclass(frozen=True)
class ExternalProvider:
    """A provider already running (``--provider``), e.g. the peer's (``../shared/peer/``), so
    that our gateway and the one compared log in at the same provider. Its client must allow
    ``http://127.0.0.1:<gateway_port>/oauth2/callback``."""

    issuer: str
    client_id: str
    client_secret: str
    gateway_port: int


def gateway_env(gateway_src: Path) -> dict[str, str]:
    """Environment for a process that must import the gateway from ``gateway_src``.

    ``python -m`` puts the working directory first on sys.path, ahead of the editable install
    of this checkout; PYTHONPATH adds this checkout after it for ``bench`` and ``tests``.
    """
    env = dict(os.environ)
    if gateway_src.resolve() != REPO_DIR:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_DIR), env.get("PYTHONPATH", "")) if p)
    return env


def _set_dotted(config: dict[str, Any], dotted: str, value: Any) -> None:
    """``server.listen`` style assignment into the generated config (``--set``)."""
    parts = dotted.split(".")
    node = config
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise HarnessError(f"--set {dotted}: {part} is not a mapping in the config")
        node = child
    node[parts[-1]] = value


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM/SIGHUP become KeyboardInterrupt, so the ``finally`` blocks stop every server."""
    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, _raise) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
