"""Load with ``wrk``, and single probe requests that say what a correct answer looks like.

wrk counts only non-2xx/3xx answers as errors, so a gateway that lost the session and answered
every "authenticated" request with a 302 would look fast. Before each run a probe request (the
same method, path and headers, over a raw socket) checks the status and the body, and records
the answer's size in bytes; after the run, wrk's bytes per request must match it ("body check").

Targets must be on the loopback interface: this refuses anything else.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bench.harness import BENCH_DIR, HarnessError, find_program

WRK_SCRIPT = BENCH_DIR / "wrk" / "bench.lua"
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
API_ACCEPT = "application/json"
WRK_TIMEOUT = "5s"  # a request slower than this counts as a timeout error
BODY_CHECK_TOLERANCE = 0.02  # Date, random state values...: answers vary by a few bytes at most


def check_loopback_url(url: str) -> str:
    """``http://127.x.x.x:PORT`` or ``http://localhost:PORT`` without a path; returns it."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    ok = parts.scheme == "http" and parts.path in ("", "/") and not parts.query
    if ok and host != "localhost":
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = False
    if not ok:
        raise HarnessError(f"targets must be http://127.x.x.x:PORT (loopback only), got {url!r}")
    return url.rstrip("/")


@dataclass(frozen=True)
class Request:
    """What every request of one run looks like."""

    method: str
    path: str
    accept: str
    cookie: str | None = None
    body_bytes: int = 0


@dataclass(frozen=True)
class Answer:
    """One probe's answer: status, size on the wire, body length and start, Location."""

    status: int
    wire_bytes: int
    body_len: int
    body_head: bytes
    location: str | None


def read_answer(sock: socket.socket) -> Answer:
    """Read one whole answer (head, then its Content-Length or chunked body) from ``sock``."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise HarnessError("the server closed the connection before its answer's headers")
        buf += chunk
        if len(buf) > 1_000_000:
            raise HarnessError("answer headers over 1 MB")
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = rest
    limit = 64 * 1024 * 1024
    if "content-length" in headers:
        want = int(headers["content-length"])
        while len(body) < want:
            chunk = sock.recv(min(1 << 20, want - len(body)))
            if not chunk:
                break
            body += chunk
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        while not body.endswith(b"0\r\n\r\n") and len(body) < limit:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            body += chunk
    wire = len(head) + 4 + len(body)
    return Answer(status, wire, len(body), body[:256], headers.get("location"))


def probe(base_url: str, req: Request, *, timeout: float = 15.0) -> Answer:
    """Send one request like wrk's and read the whole answer."""
    parts = urlsplit(check_loopback_url(base_url))
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    lines = [f"{req.method} {req.path} HTTP/1.1", f"Host: {host}:{port}", f"Accept: {req.accept}"]
    if req.cookie:
        lines.append(f"Cookie: {req.cookie}")
    if req.body_bytes:
        lines += ["Content-Type: application/octet-stream", f"Content-Length: {req.body_bytes}"]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        if req.body_bytes:
            sock.sendall(b"x" * req.body_bytes)
        return read_answer(sock)


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_us: int
    bytes: int
    err_connect: int
    err_read: int
    err_write: int
    err_status: int
    err_timeout: int
    lat_p50_us: int
    lat_p99_us: int
    # wrk counts every answer outside 2xx/3xx as a "status" error; for the 401 case those are
    # the expected answers (the probe and the body check make sure of it), not errors.
    status_expected: bool = False

    @property
    def rps(self) -> float:
        return self.requests / (self.duration_us / 1e6) if self.duration_us else 0.0

    @property
    def errors(self) -> int:
        status = 0 if self.status_expected else self.err_status
        return self.err_connect + self.err_read + self.err_write + status + self.err_timeout

    def error_text(self) -> str:
        status = 0 if self.status_expected else self.err_status
        parts = [f"{name} {n}" for name, n in (
            ("connect", self.err_connect), ("read", self.err_read), ("write", self.err_write),
            ("status", status), ("timeout", self.err_timeout)) if n]
        return f"{self.errors} ({', '.join(parts)})" if parts else "0"

    def body_check(self, expected_wire_bytes: int, connections: int) -> str | None:
        """None when the answers were the expected ones, else what was wrong.

        wrk's byte count also holds the answers still arriving when time ran out (up to one per
        connection), so the upper bound allows for those.
        """
        if not self.requests:
            return "no request completed"
        per = self.bytes / self.requests
        slack = BODY_CHECK_TOLERANCE * expected_wire_bytes + 2
        in_flight = connections * expected_wire_bytes / self.requests
        if per < expected_wire_bytes - slack or per > expected_wire_bytes + slack + in_flight:
            return f"{per:.0f} bytes per answer, expected {expected_wire_bytes}"
        return None


def run_wrk(base_url: str, req: Request, *, duration: int, connections: int, threads: int,
            log_path: Path | None = None) -> WrkResult:
    """One wrk run, bounded by its duration plus a hard margin."""
    url = check_loopback_url(base_url) + req.path
    wrk = find_program("wrk", "wrk")
    threads = max(1, min(threads, connections))
    args = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", WRK_TIMEOUT,
            "-s", str(WRK_SCRIPT), "-H", f"Accept: {req.accept}", url]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_")}
    if req.cookie:
        env["BENCH_COOKIE"] = req.cookie  # environment, not argv: not visible in ps
    if req.body_bytes:
        env["BENCH_BODY_BYTES"] = str(req.body_bytes)
    try:
        done = subprocess.run(  # noqa: S603 - fixed argument list
            args, capture_output=True, text=True, env=env, timeout=duration + 30, check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"wrk on {url} did not finish within {duration + 30} s") from exc
    if log_path is not None:
        with log_path.open("a") as log:
            log.write(f"--- wrk {req.method} {url} -c{connections} -d{duration}s\n{done.stdout}"
                      f"{done.stderr}")
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if done.returncode != 0 or line is None:
        raise HarnessError(f"wrk on {url} failed (exit {done.returncode}): "
                           f"{done.stderr.strip()[-500:]}")
    raw = json.loads(line.removeprefix("WRKJSON "))
    return WrkResult(
        requests=int(raw["requests"]), duration_us=int(raw["duration_us"]),
        bytes=int(raw["bytes"]), err_connect=int(raw["err_connect"]),
        err_read=int(raw["err_read"]), err_write=int(raw["err_write"]),
        err_status=int(raw["err_status"]), err_timeout=int(raw["err_timeout"]),
        lat_p50_us=int(raw["lat_p50_us"]), lat_p99_us=int(raw["lat_p99_us"]))
