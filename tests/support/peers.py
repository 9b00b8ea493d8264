"""Real peers for the tests: a private redis-server and the Node test OpenID Provider.

Both run as child processes on free loopback ports, never on the shared 127.0.0.1:6379. Every
wait is bounded by a deadline and checks that the process is still alive; a server that dies or
does not answer in time raises :class:`PeerError` carrying the end of its log. Children get
``PR_SET_PDEATHSIG`` on Linux so that a killed pytest does not leave servers behind.

``tests/conftest.py`` turns these into fixtures; nothing here depends on pytest.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

OP_DIR = Path(__file__).resolve().parent.parent / "op"
OP_PACKAGE = "oidc-provider"

REDIS_START_DEADLINE = 15.0
# Per attempt, two attempts. Generous: under a full -n 2 run node has taken >30 s to listen,
# and once (CI, 2026-11-25) it hung after its first log line for all of 90 s, then every test
# using it failed: a second launch turns such a hang into a delay.
OP_START_DEADLINE = 60.0
OP_START_ATTEMPTS = 2
NPM_CI_DEADLINE = 300.0
STOP_DEADLINE = 5.0
POLL_INTERVAL = 0.02  # between probes of a bounded wait, not a guess at readiness


class PeerError(RuntimeError):
    """A test peer could not be installed, started or used."""


# Test servers get ports from below the kernel's ephemeral range. A port the OS picks with
# bind(0) comes from that range, where every outgoing connection takes its local port too: a
# server starting a moment later could find its port held by some test's client connection
# (seen in CI: a gateway exiting with "address already in use" and a whole module erroring).
_LOWEST_PORT = 10000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago, outside the ephemeral range when
    the system leaves room below it (else one the OS picks)."""
    high = _ephemeral_start()
    for _ in range(100 if high - _LOWEST_PORT >= 1000 else 0):
        port = _LOWEST_PORT + secrets.randbelow(high - _LOWEST_PORT)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


# ---------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _preexec() -> Callable[[], None] | None:
    # PDEATHSIG fires when the *thread* that forked exits, so only use it from the main thread.
    if os.uname().sysname == "Linux" and threading.current_thread() is threading.main_thread():
        return _die_with_parent
    return None


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


class ChildProcess:
    """One server process with its output in a log file.

    ``group``: the process leads a process group of its own, and :meth:`stop` ends the whole
    group (servers that fork workers: nginx, ``gateway run`` with ``server.workers``)."""

    def __init__(self, name: str, args: Sequence[str], log_path: Path, *,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 group: bool = False) -> None:
        self.name = name
        self.group = group
        self.args = list(args)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.alive():
            raise PeerError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"--- start: {' '.join(self.args)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.cwd, preexec_fn=_preexec(),
                start_new_session=self.group,
            )

    def wait_until(self, ready: Callable[[], bool], deadline_s: float, what: str) -> None:
        """Poll ``ready`` until true; fail with the log if the process dies or time runs out."""
        deadline = time.monotonic() + deadline_s
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                self.proc = None
                raise PeerError(f"{self.name} exited (code {code}) while waiting until {what}; "
                                f"its log:\n"
                                f"{tail(self.log_path)}")
            if ready():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise PeerError(f"{self.name}: waited {deadline_s:.0f} s in vain until {what}; "
                                f"its log:\n"
                                f"{tail(self.log_path)}")
            time.sleep(POLL_INTERVAL)

    def signal(self, signum: int) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise PeerError(f"{self.name} is not running")
        self.proc.send_signal(signum)

    def stop(self, timeout: float = STOP_DEADLINE) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time. Safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if self.group:
            # The whole group, leader or not: workers a server forked must not outlive it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(STOP_DEADLINE)
        elif proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # in case a test froze it
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_DEADLINE)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash, nothing saved."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(STOP_DEADLINE)

    def wait_exit(self, timeout: float) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.proc = None
        return code


# ---------------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------------


def redis_command(port: int, *command: str, password: str | None = None,
                  timeout: float = 0.5) -> bytes:
    """Send one inline command (after AUTH if needed) and return the first reply line."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        if password:
            sock.sendall(b"AUTH " + password.encode() + b"\r\n")
            if not sock.recv(64).startswith(b"+OK"):
                raise PeerError("redis AUTH failed")
        sock.sendall(" ".join(command).encode() + b"\r\n")
        return sock.recv(512)


def redis_answers_ping(port: int, password: str | None = None) -> bool:
    try:
        return redis_command(port, "PING", password=password, timeout=0.3).startswith(b"+PONG")
    except (OSError, PeerError):
        return False


def redis_server_pid(port: int, password: str | None = None) -> int | None:
    """The process id of the redis-server answering on ``port`` (from ``INFO server``)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3) as sock:
            if password:
                sock.sendall(b"AUTH " + password.encode() + b"\r\n")
                if not sock.recv(64).startswith(b"+OK"):
                    return None
            sock.sendall(b"INFO server\r\n")
            reply = b""
            while b"process_id:" not in reply or not reply.endswith(b"\r\n"):
                chunk = sock.recv(65536)
                if not chunk or len(reply) > 1_000_000:
                    break
                reply += chunk
    except OSError:
        return None
    for line in reply.split(b"\r\n"):
        if line.startswith(b"process_id:"):
            return int(line.split(b":", 1)[1])
    return None


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if not found:
        raise PeerError("redis-server is not installed (Debian: apt-get install redis-server)")
    return found


class RedisServer:
    """A private redis-server on a free loopback port that a test may stop, freeze and restart.

    It always comes back on the same port (and URL). With ``persist=True`` (the default for
    :func:`redis_server_factory`) ``stop()`` saves the data set first (``SHUTDOWN SAVE``) and
    ``start()`` loads it again, like a real Redis with snapshots that restarts; ``kill()`` is a
    crash that keeps nothing written since the last stop. With ``persist=False`` nothing is ever
    written to disk.
    """

    def __init__(self, workdir: Path, *, port: int | None = None, password: str | None = None,
                 persist: bool = False, unixsocket: Path | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.password = password
        self.persist = persist
        self.unixsocket = unixsocket
        workdir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]
        if password:
            args += ["--requirepass", password]
        if unixsocket is not None:  # as well as the port
            args += ["--unixsocket", str(unixsocket), "--unixsocketperm", "700"]
        self.process = ChildProcess(f"redis-server :{self.port}", args, workdir / "redis.log")

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process.alive()

    def ping(self) -> bool:
        return redis_answers_ping(self.port, self.password)

    def _ours_answers(self) -> bool:
        # Our process, not another server that holds the port (then ours exits: EADDRINUSE).
        pid = self.process.pid
        return pid is not None and redis_server_pid(self.port, self.password) == pid

    def start(self) -> None:
        self.process.start()
        self.process.wait_until(self._ours_answers, REDIS_START_DEADLINE, "it answers on its port")

    def stop(self) -> None:
        """Stop it (saving first when ``persist``); connections fail until ``start()``."""
        if not self.process.alive():
            self.process.stop()
            return
        if self.persist:
            self.thaw()
            with contextlib.suppress(OSError, PeerError):
                redis_command(self.port, "SHUTDOWN", "SAVE", password=self.password,
                              timeout=STOP_DEADLINE)
            if self.process.wait_exit(STOP_DEADLINE) is not None:
                return
        self.process.stop()

    def kill(self) -> None:
        self.process.kill()

    def freeze(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but nothing answers."""
        self.process.signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def logs(self) -> str:
        return tail(self.process.log_path, 200)


# ---------------------------------------------------------------------------------------------
# The Node test OpenID Provider
# ---------------------------------------------------------------------------------------------


def _wanted_op_version() -> str:
    package = json.loads((OP_DIR / "package.json").read_text())
    return str(package["dependencies"][OP_PACKAGE])


def _installed_op_version() -> str | None:
    try:
        installed = json.loads((OP_DIR / "node_modules" / OP_PACKAGE / "package.json").read_text())
    except (OSError, ValueError):
        return None
    return str(installed.get("version"))


def ensure_op_installed() -> None:
    """``npm ci`` in tests/op unless the pinned oidc-provider is already there (idempotent)."""
    if _installed_op_version() == _wanted_op_version():
        return
    npm = shutil.which("npm")
    if not npm:
        raise PeerError("npm is not installed (Debian: apt-get install nodejs npm)")
    try:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=OP_DIR, capture_output=True,
            text=True, timeout=NPM_CI_DEADLINE, check=False, stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise PeerError(f"npm ci in {OP_DIR} took over {NPM_CI_DEADLINE:.0f} s") from exc
    if done.returncode != 0 or _installed_op_version() != _wanted_op_version():
        raise PeerError(f"npm ci in {OP_DIR} failed ({done.returncode}):\n"
                        f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def http_json(method: str, url: str, body: Mapping[str, Any] | None = None, *,
              headers: Mapping[str, str] | None = None,
              timeout: float = 10.0) -> tuple[int, Any]:
    """A plain HTTP/1.1 request to a loopback server; returns (status, parsed JSON or text)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost"):
        raise PeerError(f"test helpers only talk to loopback http: {url}")
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        all_headers = {"Accept": "application/json", **(headers or {})}
        if payload is not None:
            all_headers.setdefault("Content-Type", "application/json")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        conn.request(method, path, body=payload, headers=all_headers)
        resp = conn.getresponse()
        raw = resp.read().decode(errors="replace")
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw
    finally:
        conn.close()


@dataclass
class OidcProvider:
    """The test OP as tests see it: its issuer, and dynamic client registration.

    Users: alice/wonderland (groups eng, admins) and bob/builder (groups sales).
    """

    issuer: str
    log_path: Path | None = None
    _discovery: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        return int(urlsplit(self.issuer).port or 80)

    def discovery(self) -> dict[str, Any]:
        """The provider's /.well-known/openid-configuration (fetched once)."""
        if self._discovery is None:
            status, doc = http_json("GET", f"{self.issuer}/.well-known/openid-configuration")
            if status != 200 or not isinstance(doc, dict):
                raise PeerError(f"discovery answered {status}: {doc!r}")
            self._discovery = doc
        return self._discovery

    def endpoint(self, name: str) -> str:
        """e.g. ``endpoint("token")`` → the discovery document's ``token_endpoint``."""
        return str(self.discovery()[f"{name}_endpoint"])

    def register(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        """POST raw client metadata to the registration endpoint; returns the OP's answer."""
        status, answer = http_json("POST", self.endpoint("registration"), metadata)
        if status != 201 or not isinstance(answer, dict):
            raise PeerError(f"client registration answered {status}: {answer!r}")
        return answer

    def register_client(
        self,
        redirect_uris: Sequence[str],
        auth_method: str = "client_secret_basic",
        post_logout_redirect_uris: Sequence[str] | None = None,
        *,
        access_token_ttl: int | None = None,
        id_token_ttl: int | None = None,
        refresh_token_ttl: int | None = None,
        **extra: Any,
    ) -> tuple[str, str]:
        """Register a confidential web client; returns ``(client_id, client_secret)``.

        ``post_logout_redirect_uris`` defaults to each redirect URI's origin + ``/``. The
        ``*_ttl`` arguments (seconds) shorten this client's tokens only. ``extra`` is passed as
        further client metadata.
        """
        if auth_method not in ("client_secret_basic", "client_secret_post"):
            raise PeerError(f"a confidential client needs client_secret_basic/post: {auth_method}")
        if post_logout_redirect_uris is None:
            post_logout_redirect_uris = sorted({origin_of(u) + "/" for u in redirect_uris})
        metadata: dict[str, Any] = {
            "application_type": "web",
            "redirect_uris": list(redirect_uris),
            "post_logout_redirect_uris": list(post_logout_redirect_uris),
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": auth_method,
            "client_name": "oidc-gateway test",
        }
        for key, ttl in (("x_access_token_ttl", access_token_ttl),
                         ("x_id_token_ttl", id_token_ttl),
                         ("x_refresh_token_ttl", refresh_token_ttl)):
            if ttl is not None:
                metadata[key] = ttl
        metadata.update(extra)
        answer = self.register(metadata)
        return str(answer["client_id"]), str(answer["client_secret"])

    def logs(self) -> str:
        return tail(self.log_path, 200) if self.log_path else "(log not available here)"


def node_binary() -> str:
    found = shutil.which("node")
    if not found:
        raise PeerError("node is not installed (Debian: apt-get install nodejs npm)")
    return found


class OidcProviderServer(OidcProvider):
    """A Node test OP process (tests/op/server.js). ``env`` sets its OP_* knobs.

    Restarting it forgets everything: registered clients, signing keys, sessions.
    """

    def __init__(self, log_path: Path, *, port: int | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.op_port = port or free_port()
        super().__init__(issuer=f"http://127.0.0.1:{self.op_port}", log_path=log_path)
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("OP_")}
        child_env.update(env or {})
        child_env["OP_PORT"] = str(self.op_port)
        self.process = ChildProcess(f"oidc-provider :{self.op_port}",
                                    [node_binary(), str(OP_DIR / "server.js")], log_path,
                                    env=child_env, cwd=OP_DIR)

    def _answers(self) -> bool:
        try:
            status, doc = http_json("GET", f"{self.issuer}/.well-known/openid-configuration",
                                    timeout=1.0)
        except OSError:
            return False
        return status == 200 and isinstance(doc, dict) and doc.get("issuer") == self.issuer

    def start(self) -> None:
        """Start it (run ``npm ci`` first if needed) and wait until discovery answers."""
        ensure_op_installed()
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        self._discovery = None
        self.process.start()

    def wait_ready(self) -> None:
        for attempt in range(1, OP_START_ATTEMPTS + 1):
            try:
                self.process.wait_until(self._answers, OP_START_DEADLINE,
                                        "it serves its discovery document")
                return
            except PeerError:
                # wait_until stopped it (or it exited): launch it again, same port, once.
                if attempt == OP_START_ATTEMPTS:
                    raise
                self.launch()

    def stop(self) -> None:
        self.process.stop()
        self._discovery = None

    @property
    def running(self) -> bool:
        return self.process.alive()


# ---------------------------------------------------------------------------------------------
# What the fixtures hand to tests
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisTarget:
    """Where a test may keep data on the shared Redis: every key must start with ``prefix``."""

    url: str
    prefix: str
    host: str = "127.0.0.1"
    port: int = 0
    db: int = 0

    def key(self, name: str) -> str:
        return self.prefix + name


def delete_prefix(port: int, prefix: str) -> None:
    """Delete every key under ``prefix`` (best effort)."""
    client = redis.Redis(host="127.0.0.1", port=port, db=0, socket_timeout=2.0,
                         socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0))
    try:
        batch: list[Any] = []
        for key in client.scan_iter(match=prefix + "*", count=500):
            batch.append(key)
            if len(batch) >= 500:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    except redis.RedisError:
        pass  # best effort: the server is private to this run and holds no data on disk
    finally:
        client.close()


class RedisServerFactory:
    """Starts private redis-servers; all are stopped after the test, whatever happened."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers: list[RedisServer] = []

    def __call__(self, *, persist: bool = True, password: str | None = None,
                 start: bool = True, unixsocket: Path | None = None) -> RedisServer:
        server = RedisServer(self.directory / f"redis-{len(self.servers)}", password=password,
                             persist=persist, unixsocket=unixsocket)
        self.servers.append(server)
        if start:
            server.start()
        return server

    def close(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.process.stop()


class OidcProviderFactory:
    """Starts private OPs with their own OP_* settings; all are stopped after the test."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers: list[OidcProviderServer] = []

    def __call__(self, *, start: bool = True, **env: str | int) -> OidcProviderServer:
        for key in env:
            if not key.startswith("OP_"):
                raise PeerError(f"OP settings are OP_* variables, not {key}")
        n = len(self.servers)
        server = OidcProviderServer(self.directory / f"oidc-provider-{n}.log",
                                    env={k: str(v) for k, v in env.items()})
        self.servers.append(server)
        if start:
            server.start()
        return server

    def close(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.stop()
