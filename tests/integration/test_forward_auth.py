"""Forward-auth (``/oauth2/auth``) with a real gateway, the real oidc-provider and real nginx.

Two halves:

* The HTTP level: raw HTTP/1.1 requests shaped like the ones Traefik's ForwardAuth
  (``X-Forwarded-Method/-Proto/-Host/-Uri``) and Envoy's ext_authz HTTP service (the original
  path after ``path_prefix``, the original authority as ``Host``) send, to a gateway whose
  ``server.trusted_proxies`` is 127.0.0.1/32. Requests from 127.0.0.2 (also loopback, but not
  trusted) play a client reaching the gateway directly: the URL they claim is never believed.
* nginx end to end: Debian's nginx runs ``config/nginx/forward-auth.conf`` in front of the echo
  app, asks the gateway with ``auth_request``, sends unauthenticated browsers to sign in, proxies
  the callback, and copies the gateway's ``X-Auth-Request-*`` answer onto the request to the app
  as ``X-Forwarded-User`` etc.

Users at the test OP: alice (groups eng and admins), bob (group sales).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from multidict import CIMultiDict
from yarl import URL

from tests.support.gateway_proc import GatewayProcess, free_port, gateway_config, start_gateway
from tests.support.login import browser_login, new_browser
from tests.support.upstream import Upstream, running_upstream

pytestmark = [pytest.mark.provider]

REPO = Path(__file__).resolve().parents[2]
NGINX_SITE = REPO / "config" / "nginx" / "forward-auth.conf"
TRUSTED = "127.0.0.1"  # the gateway's trusted_proxies: 127.0.0.1/32
UNTRUSTED = "127.0.0.2"  # loopback too, but outside trusted_proxies
COOKIE = "_oidc_gateway"
HTML = "text/html,application/xhtml+xml,*/*;q=0.8"
IDENTITY = ("user", "email", "groups", "preferred-username", "access-token")


def routes(upstream: str) -> list[dict[str, Any]]:
    return [
        {"name": "public", "match": {"path": "/public/"}, "upstream": upstream, "auth": "public"},
        {"name": "admin", "match": {"path": "/admin/"}, "upstream": upstream,
         "allow": [{"groups": ["admins"]}], "pass_access_token": True},
        {"name": "writes", "match": {"path": "/writes/"}, "upstream": upstream,
         "allow": [{"groups": ["eng"]}], "deny": [{"methods": ["DELETE"]}]},
        {"name": "intranet", "match": {"host": "intranet.test", "path": "/"},
         "upstream": upstream, "allow": [{"groups": ["admins"]}]},
        {"name": "app", "match": {"path": "/app/"}, "upstream": upstream},
        {"name": "signed", "match": {"path": "/signed/"}, "upstream": upstream,
         "headers": {"send": {"X-User-Id": "sub", "X-Mail": "email"}}, "assertion": True},
        # No catch-all: /elsewhere on any other host has no route.
    ]


# ---------------------------------------------------------------------------------------------
# Raw HTTP
# ---------------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def auth_request(self) -> dict[str, str]:
        """The X-Auth-Request-* identity headers of the answer, by suffix; an access token
        shows as its length only, so that no failing assertion prints it."""
        found = {k: self.headers[f"X-Auth-Request-{k}"] for k in IDENTITY
                 if f"X-Auth-Request-{k}" in self.headers}
        if "access-token" in found:
            found["access-token"] = f"<{len(found['access-token'])} characters>"
        return found


async def send_raw(
    port: int, method: str, target: str, headers: Sequence[tuple[str, str]], *,
    source: str = TRUSTED, body: bytes = b"",
) -> Answer:
    """One HTTP/1.1 request written byte for byte from ``source`` (a loopback address), the
    answer read to EOF (``Connection: close``). Bounded in time."""
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers),
             "Connection: close"]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), 5)
    try:
        writer.write("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    out: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, _, value = line.partition(":")
        out.add(name.strip(), value.strip())
    return Answer(int(status_line.split()[1]), out, rest)


def traefik(host: str, uri: str, *, method: str = "GET", cookie: str | None = None,
            proto: str = "https", accept: str = "*/*", gateway_port: int
            ) -> list[tuple[str, str]]:
    """The headers of Traefik's ForwardAuth request: the client's headers (here its cookie and
    Accept), Host = the auth address, and the original request in X-Forwarded-*."""
    headers = [("Host", f"127.0.0.1:{gateway_port}"), ("Accept", accept),
               ("X-Forwarded-Method", method), ("X-Forwarded-Proto", proto),
               ("X-Forwarded-Host", host), ("X-Forwarded-Uri", uri),
               ("X-Forwarded-For", "203.0.113.7")]
    if cookie:
        headers.append(("Cookie", f"other=1; {COOKIE}={cookie}"))
    return headers


def envoy(host: str, *, cookie: str | None = None) -> list[tuple[str, str]]:
    """The headers of Envoy's ext_authz HTTP check: the original authority as Host, the
    allowed headers (the cookie), Content-Length: 0."""
    headers = [("Host", host), ("Content-Length", "0"), ("Accept", "application/json")]
    if cookie:
        headers.append(("Cookie", f"{COOKIE}={cookie}"))
    return headers


# ---------------------------------------------------------------------------------------------
# The world: an echo app, a gateway trusting 127.0.0.1, signed-in users
# ---------------------------------------------------------------------------------------------


@dataclass
class World:
    upstream: Upstream
    provider: Any
    tmp: Path
    gateways: list[GatewayProcess] = field(default_factory=list)
    gw: GatewayProcess | None = None

    @property
    def gateway(self) -> GatewayProcess:
        assert self.gw is not None
        return self.gw

    async def start(self, *extra_origins: str) -> GatewayProcess:
        port = free_port()
        origins = [f"http://127.0.0.1:{port}", *extra_origins]
        client_id, secret = self.provider.register_client(
            redirect_uris=[f"{o}/oauth2/callback" for o in origins])
        config = gateway_config(port=port, issuer=self.provider.issuer, client_id=client_id,
                                client_secret=secret, upstream=self.upstream.url,
                                routes=routes(self.upstream.url))
        config["server"]["trusted_proxies"] = [f"{TRUSTED}/32"]
        self.gw = await start_gateway(config, directory=self.tmp)
        self.gateways.append(self.gw)
        return self.gw

    async def session_of(self, username: str, password: str) -> str:
        """Sign ``username`` in at the gateway (proxy mode) and return the session cookie."""
        async with new_browser() as browser:
            result = await browser_login(browser, f"{self.gateway.url}/app/",
                                         username=username, password=password)
            assert result.status == 200, result.text
            value = next((c.value for c in browser.cookie_jar if c.key == COOKIE), None)
        assert value
        return value


@pytest.fixture
async def world(oidc_provider: Any, tmp_path: Path) -> AsyncIterator[World]:
    async with running_upstream() as upstream:
        w = World(upstream, oidc_provider, tmp_path)
        try:
            yield w
        finally:
            for gw in w.gateways:
                gw.stop()


# ---------------------------------------------------------------------------------------------
# Traefik ForwardAuth
# ---------------------------------------------------------------------------------------------


async def test_traefik_check_answers_for_the_original_request_with_identity_headers(
    world: World,
) -> None:
    gw = await world.start()
    alice = await world.session_of("alice", "wonderland")
    bob = await world.session_of("bob", "builder")

    async def ask(uri: str, cookie: str | None, *, method: str = "GET",
                  host: str = "apps.test") -> Answer:
        return await send_raw(gw.port, "GET", "/oauth2/auth",
                              traefik(host, uri, method=method, cookie=cookie,
                                      gateway_port=gw.port))

    allowed = await ask("/admin/report?year=2024", alice)
    assert allowed.status == 202
    assert allowed.body == b""
    assert allowed.headers["Cache-Control"] == "no-store"
    who = allowed.auth_request()
    assert who.pop("access-token")  # admin passes the access token, and Traefik is trusted
    assert who == {"user": "alice", "email": "alice@example.com", "groups": "eng,admins",
                   "preferred-username": "alice"}

    # Same user, a route without pass_access_token: no token.
    app = await ask("/app/page", alice)
    assert app.status == 202
    assert "access-token" not in app.auth_request()
    assert app.auth_request()["user"] == "alice"

    # bob is signed in but not in admins: 403, no identity.
    denied = await ask("/admin/report", bob)
    assert denied.status == 403
    assert denied.json()["error"] == "policy_denied"
    assert denied.auth_request() == {}

    # Nobody signed in: 401 with the login URL for the ORIGINAL page, on the original origin.
    anonymous = await ask("/admin/report?year=2024&q=a%2Fb", None)
    assert anonymous.status == 401
    assert anonymous.headers["Cache-Control"] == "no-store"
    login_url = anonymous.json()["login_url"]
    # Not a browser navigation (Accept: */*): no URL to redirect to, as the proxy mode's 401.
    assert "X-Auth-Request-Login-Url" not in anonymous.headers
    parts = urlsplit(login_url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "apps.test", "/oauth2/start")
    assert parse_qs(parts.query)["rd"] == ["/admin/report?year=2024&q=a%2Fb"]
    # Traefik hands the 401 to the browser as it is: a browser gets a page with the way in.
    page = await send_raw(gw.port, "GET", "/oauth2/auth", traefik(
        "apps.test", "/app/x?a=1&b=2", accept=HTML, gateway_port=gw.port))
    assert page.status == 401
    assert page.headers["Content-Type"].startswith("text/html")
    assert page.headers["Cache-Control"] == "no-store"
    page_login = page.headers["X-Auth-Request-Login-Url"]
    assert page_login == "https://apps.test/oauth2/start?rd=" + quote("/app/x?a=1&b=2", safe="")
    assert f'href="{page_login}"' in page.body.decode()
    # A form post is no navigation: JSON, no URL to redirect to (the original method counts,
    # not the GET Traefik asks with).
    posted = await send_raw(gw.port, "GET", "/oauth2/auth", traefik(
        "apps.test", "/app/x", method="POST", accept=HTML, gateway_port=gw.port))
    assert posted.status == 401
    assert "X-Auth-Request-Login-Url" not in posted.headers
    assert posted.json()["error"] == "unauthenticated"

    # A public route: 202, and never identity headers, even for a signed-in user.
    public = await ask("/public/logo.png", alice)
    assert public.status == 202
    assert public.auth_request() == {}

    # The method is the original one (X-Forwarded-Method): DELETE is denied on /writes/.
    assert (await ask("/writes/item/1", alice, method="POST")).status == 202
    delete = await ask("/writes/item/1", alice, method="DELETE")
    assert delete.status == 403
    assert delete.json()["error"] == "policy_denied"

    # The host is the original one (X-Forwarded-Host): intranet.test has its own route.
    assert (await ask("/anything", alice, host="intranet.test")).status == 202
    assert (await ask("/anything", bob, host="intranet.test")).status == 403
    # No route for this host and path: 403 (auth_request would turn a 404 into a 500).
    nowhere = await ask("/anything", alice, host="apps.test")
    assert nowhere.status == 403
    assert nowhere.json()["error"] == "no_route"
    # Nothing was proxied: forward-auth never calls the upstream itself.
    assert not [r for r in world.upstream.seen.requests if r["path"] != "/app/"]


async def test_the_check_also_answers_the_routes_own_identity_headers_and_assertion(
    world: World,
) -> None:
    """A route's ``headers:`` and ``assertion: true`` hold in forward-auth mode too: the 202
    carries the headers the proxy mode would send that route's app, for the proxy to copy by
    name, and X-Gateway-Assertion only when a trusted proxy asks (like the access token: an
    app takes an assertion as the user, so a page's script asking must not get one)."""
    gw = await world.start()
    alice = await world.session_of("alice", "wonderland")

    async def ask(uri: str, source: str) -> Answer:
        return await send_raw(gw.port, "GET", "/oauth2/auth", traefik(
            "apps.test", uri, cookie=alice, gateway_port=gw.port), source=source)

    trusted = await ask("/signed/page", TRUSTED)
    assert trusted.status == 202
    assert trusted.headers["X-Mail"] == "alice@example.com"
    sub = trusted.headers["X-User-Id"]
    assert sub
    assert "X-Forwarded-User" not in trusted.headers  # send: replaced the built-in headers
    assert trusted.auth_request()["user"] == "alice"  # the X-Auth-Request-* stay
    (assertion,) = trusted.headers.getall("X-Gateway-Assertion")
    claims = json.loads(base64.urlsafe_b64decode(assertion.split(".")[1] + "=="))
    assert claims["sub"] == sub
    assert claims["aud"] == world.upstream.url  # the route's upstream, as in proxy mode
    assert claims["iss"] == "https://apps.test"  # the original request's origin

    # Asked from outside trusted_proxies (the Envoy path form, believed from anyone): the
    # identity headers, but no assertion.
    untrusted = await send_raw(gw.port, "GET", "/oauth2/auth/signed/page",
                               envoy("apps.test", cookie=alice), source=UNTRUSTED)
    assert untrusted.status == 202
    assert untrusted.headers["X-User-Id"] == sub
    assert "X-Gateway-Assertion" not in untrusted.headers

    # A route without headers: or assertion keeps the answer it had: no extra headers but
    # the built-in ones the proxy mode sends.
    plain = await ask("/app/page", TRUSTED)
    assert plain.status == 202
    assert plain.headers["X-Forwarded-User"] == "alice"
    assert "X-Gateway-Assertion" not in plain.headers
    assert "X-User-Id" not in plain.headers


async def test_the_original_path_is_judged_normalised_and_ambiguous_ones_are_refused(
    world: World,
) -> None:
    gw = await world.start()
    alice = await world.session_of("alice", "wonderland")

    async def ask(uri: str, cookie: str | None = None) -> Answer:
        return await send_raw(gw.port, "GET", "/oauth2/auth",
                              traefik("apps.test", uri, cookie=cookie, gateway_port=gw.port))

    # /public/%2e%2e/admin/ is /admin/, as the proxy mode judges it: sign-in needed, not public.
    assert (await ask("/public/%2e%2e/admin/")).status == 401
    assert (await ask("/public/../admin/x")).status == 401
    assert (await ask("//public//x")).status == 202
    # Paths the proxy mode refuses are refused (403: auth_request knows 2xx, 401, 403 only).
    for bad in ("/public/..;/admin/", "/public/%5c..%5cadmin/", "/public/%zz"):
        refused = await ask(bad, alice)
        assert refused.status == 403, bad
        assert refused.auth_request() == {}


async def test_an_ambiguous_or_incomplete_check_is_a_400(world: World) -> None:
    gw = await world.start()
    alice = await world.session_of("alice", "wonderland")
    base = [("Host", f"127.0.0.1:{gw.port}"), ("Cookie", f"{COOKIE}={alice}")]

    async def ask(*headers: tuple[str, str]) -> Answer:
        return await send_raw(gw.port, "GET", "/oauth2/auth", [*base, *headers])

    # Two different answers to "which page?": a proxy that sets X-Original-URI but passes the
    # client's X-Forwarded-Uri through must not let the client pick.
    two = await ask(("X-Original-URI", "/admin/"), ("X-Forwarded-Uri", "/public/x"),
                    ("X-Forwarded-Method", "GET"))
    assert two.status == 400
    assert "more than once" in two.json()["message"]
    twice = await ask(("X-Forwarded-Uri", "/public/x"), ("X-Forwarded-Uri", "/admin/"),
                      ("X-Forwarded-Method", "GET"))
    assert twice.status == 400
    methods = await ask(("X-Forwarded-Uri", "/writes/x"), ("X-Forwarded-Method", "GET"),
                        ("X-Original-Method", "DELETE"))
    assert methods.status == 400
    # No URI, or no method: the check does not say what it is about.
    for headers in ([("X-Forwarded-Method", "GET")], [("X-Forwarded-Uri", "/app/")], []):
        incomplete = await ask(*headers)
        assert incomplete.status == 400, headers
        assert "X-Original-URI" in incomplete.json()["message"]
    absolute = await ask(("X-Forwarded-Uri", "http://apps.test/app/"),
                         ("X-Forwarded-Method", "GET"))
    assert absolute.status == 400
    assert (await ask(("X-Forwarded-Uri", "/app/"), ("X-Forwarded-Method", "G T"))).status == 400
    # Both names with one and the same value are one answer.
    same = await ask(("X-Original-URI", "/app/"), ("X-Forwarded-Uri", "/app/"),
                     ("X-Original-Method", "GET"))
    assert same.status == 202
    assert same.auth_request()["user"] == "alice"


# ---------------------------------------------------------------------------------------------
# Envoy ext_authz (HTTP service, path_prefix: /oauth2/auth)
# ---------------------------------------------------------------------------------------------


async def test_envoy_check_judges_the_path_after_the_prefix_with_its_own_method_and_host(
    world: World,
) -> None:
    gw = await world.start()
    alice = await world.session_of("alice", "wonderland")
    bob = await world.session_of("bob", "builder")

    async def ask(method: str, path: str, cookie: str | None, *, host: str = "apps.test",
                  source: str = TRUSTED) -> Answer:
        return await send_raw(gw.port, method, f"/oauth2/auth{path}",
                              envoy(host, cookie=cookie), source=source)

    allowed = await ask("GET", "/admin/report?year=2024", alice)
    assert allowed.status == 202
    assert allowed.auth_request()["user"] == "alice"
    assert allowed.auth_request()["access-token"]
    assert (await ask("GET", "/admin/report", bob)).status == 403
    # Envoy asks with the original method.
    assert (await ask("POST", "/writes/item", alice)).status == 202
    assert (await ask("DELETE", "/writes/item", alice)).status == 403
    assert (await ask("HEAD", "/app/", alice)).status == 202
    # The original authority arrives as Host.
    assert (await ask("GET", "/x", alice, host="intranet.test")).status == 202
    assert (await ask("GET", "/x", bob, host="intranet.test")).status == 403
    assert (await ask("GET", "/x", alice, host="apps.test")).status == 403  # no route
    public = await ask("GET", "/public/a.css", alice)
    assert (public.status, public.auth_request()) == (202, {})

    anonymous = await ask("GET", "/app/page?x=1", None, host="intranet.test:8443")
    assert anonymous.status == 401
    # Route intranet (host intranet.test, any path) decides; the login comes back here.
    assert anonymous.json()["login_url"] == (
        "http://intranet.test:8443/oauth2/start?rd=" + quote("/app/page?x=1", safe=""))

    # From a peer outside trusted_proxies the path form still works (it is the request's own
    # path), but an access token is never handed to it.
    direct = await ask("GET", "/admin/report", alice, source=UNTRUSTED)
    assert direct.status == 202
    assert direct.auth_request()["user"] == "alice"
    assert "access-token" not in direct.auth_request()

    # The original path is normalised on its own, as the proxy mode does it: not public.
    assert (await ask("GET", "/public/%2e%2e/admin/", None)).status == 401
    # The prefix itself must be written out, not encoded.
    spelled = await send_raw(gw.port, "GET", "/oauth2/%61uth/app/", envoy("apps.test",
                                                                          cookie=alice))
    assert spelled.status == 400


# ---------------------------------------------------------------------------------------------
# Who may say which URL is judged
# ---------------------------------------------------------------------------------------------


async def test_a_client_cannot_pick_the_url_it_is_judged_on(world: World) -> None:
    gw = await world.start()
    bob = await world.session_of("bob", "builder")

    # Trusted, to compare: bob is refused /admin/ and admitted to /public/.
    trusted = traefik("apps.test", "/public/x", cookie=bob, gateway_port=gw.port)
    assert (await send_raw(gw.port, "GET", "/oauth2/auth", trusted)).status == 202

    # The same headers from a peer outside trusted_proxies are not believed: the check names no
    # page of its own, so it is refused with what to configure, never judged as /public/.
    untrusted = await send_raw(gw.port, "GET", "/oauth2/auth", trusted, source=UNTRUSTED)
    assert untrusted.status == 400
    assert "trusted_proxies" in untrusted.json()["message"]
    assert untrusted.auth_request() == {}
    nginx_style = [("Host", "apps.test"), ("Cookie", f"{COOKIE}={bob}"),
                   ("X-Original-URI", "/public/x"), ("X-Original-Method", "GET")]
    assert (await send_raw(gw.port, "GET", "/oauth2/auth", nginx_style,
                           source=UNTRUSTED)).status == 400

    # The path form judges its own path whoever asks; a header claiming another page (or
    # method, or host) is ignored even from a trusted proxy: the request line is the proxy's
    # word, a header may be the client's passed through.
    claims = [("X-Forwarded-Uri", "/public/x"), ("X-Original-URI", "/public/x"),
              ("X-Forwarded-Method", "GET"), ("X-Forwarded-Host", "intranet.test")]
    for source in (TRUSTED, UNTRUSTED):
        answer = await send_raw(gw.port, "GET", "/oauth2/auth/admin/",
                                [*envoy("apps.test", cookie=bob), *claims], source=source)
        assert answer.status == 403, source
        anonymous = await send_raw(gw.port, "DELETE", "/oauth2/auth/writes/x",
                                   [*envoy("apps.test"), *claims], source=source)
        assert anonymous.status == 401, source
        login = urlsplit(anonymous.json()["login_url"])
        assert login.netloc == "apps.test"
        assert parse_qs(login.query)["rd"] == ["/writes/x"]


# ---------------------------------------------------------------------------------------------
# nginx auth_request, end to end
# ---------------------------------------------------------------------------------------------


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/bin/nginx") if Path(p).exists()), None)
    if found is None:
        raise RuntimeError("nginx is not installed (Debian: apt-get install nginx-light; "
                           ".ci/run installs it)")
    return found


NGINX_MAIN = """\
# Written by tests/integration/test_forward_auth.py around config/nginx/forward-auth.conf.
# One foreground process: no daemon, no workers to orphan; everything under the prefix.
daemon off;
master_process off;
pid nginx.pid;
error_log error.log info;
events {{ worker_connections 256; }}
http {{
    access_log access.log;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    include {site};
}}
"""


@dataclass
class Nginx:
    url: str
    port: int
    prefix: Path
    proc: subprocess.Popen[bytes]

    def logs(self) -> str:
        return (self.prefix / "error.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.contextmanager
def running_nginx(prefix: Path, *, port: int, gateway: str, app: str) -> Iterator[Nginx]:
    """nginx in the foreground with its own prefix, pid file and logs under ``prefix``,
    serving config/nginx/forward-auth.conf on 127.0.0.1:``port``; stopped on the way out."""
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    site = NGINX_SITE.read_text().replace("@LISTEN@", f"127.0.0.1:{port}").replace(
        "@GATEWAY@", gateway).replace("@APP@", app)
    assert not re.search(r"@[A-Z]+@", site), "a placeholder was left"
    (prefix / "forward-auth.conf").write_text(site)
    (prefix / "nginx.conf").write_text(NGINX_MAIN.format(site=prefix / "forward-auth.conf"))
    with (prefix / "stdout.log").open("wb") as out:
        proc = subprocess.Popen(
            [nginx_binary(), "-p", f"{prefix}/", "-e", "error.log", "-c", "nginx.conf"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    server = Nginx(f"http://127.0.0.1:{port}", port, prefix, proc)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {proc.returncode}:\n{server.logs()}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", port), timeout=0.5):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not listen on {port}:\n{server.logs()}")
            time.sleep(0.02)
        yield server
    finally:
        server.stop()


@dataclass
class Front:
    world: World
    gw: GatewayProcess
    nginx: Nginx


@pytest.fixture
async def front(world: World) -> AsyncIterator[Front]:
    nginx_port = free_port()
    # Browsers reach the gateway's /oauth2/ paths through nginx: the callback is on its origin.
    gw = await world.start(f"http://127.0.0.1:{nginx_port}")
    with running_nginx(world.tmp / "nginx", port=nginx_port, gateway=f"127.0.0.1:{gw.port}",
                       app=urlsplit(world.upstream.url).netloc) as nginx:
        yield Front(world, gw, nginx)


def echoed(text: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(text)
    data["h"] = {k.lower(): v for k, v in data["headers"]}
    return data


def present(headers: dict[str, str], *names: str) -> list[str]:
    """Which of ``names`` the app received: names only, so a failure never prints a cookie or
    a token."""
    return [name for name in names if name in headers]


def cookie_names(headers: dict[str, str]) -> list[str]:
    return [pair.partition("=")[0] for pair in headers.get("cookie", "").split("; ") if pair]


async def test_nginx_sends_a_browser_to_sign_in_through_itself_and_the_app_gets_the_identity(
    front: Front,
) -> None:
    nginx, seen = front.nginx, front.world.upstream.seen.requests
    page = f"{nginx.url}/app/page?x=1&y=%2F"
    async with new_browser() as browser:
        async with browser.get(URL(page, encoded=True), headers={"Accept": HTML},
                               allow_redirects=False) as r:
            assert r.status == 302, await r.text()
            location = r.headers["Location"]
            assert r.headers["Cache-Control"] == "no-store"
        # nginx's error_page sends the browser to the gateway's sign-in on nginx's own origin,
        # asking to come back to the page, query string and all.
        start = urlsplit(location)
        assert f"{start.scheme}://{start.netloc}{start.path}" == f"{nginx.url}/oauth2/start"
        assert parse_qs(start.query)["rd"] == ["/app/page?x=1&y=%2F"]
        assert seen == []  # the app saw nothing before the sign-in

        result = await browser_login(browser, page)
        assert result.status == 200, result.text
        # The provider sent the browser back to the callback through nginx.
        assert result.callback_url is not None
        assert result.callback_url.startswith(f"{nginx.url}/oauth2/callback?")
        assert result.url == page
        app = echoed(result.text)
        assert (app["path"], app["query"]) == ("/app/page", "x=1&y=%2F")
        h = app["h"]
        assert h["x-forwarded-user"] == "alice"
        assert h["x-forwarded-email"] == "alice@example.com"
        assert h["x-forwarded-groups"] == "eng,admins"
        assert h["x-forwarded-preferred-username"] == "alice"
        assert present(h, "x-forwarded-access-token") == []  # route app does not pass it
        assert [k for k in h if k.startswith("x-auth-request-")] == []
        assert [n for n in cookie_names(h) if n.startswith(COOKIE)] == []

        # Signed in, the browser goes straight through; /admin/ passes the access token.
        async with browser.get(f"{nginx.url}/admin/x", headers={"Accept": HTML},
                               allow_redirects=False) as r:
            assert r.status == 200
            admin = echoed(await r.text())["h"]
        assert admin["x-forwarded-user"] == "alice"
        assert len(admin["x-forwarded-access-token"]) > 20
        # The gateway's userinfo is reachable through nginx, its check is not.
        async with browser.get(f"{nginx.url}/oauth2/userinfo") as r:
            assert r.status == 200
            assert (await r.json())["user"] == "alice"
        for check in ("/oauth2/auth", "/oauth2/auth/app/page"):
            async with browser.get(f"{nginx.url}{check}", allow_redirects=False) as r:
                assert r.status == 404, check


async def test_nginx_denies_refuses_forged_identity_and_keeps_the_gateway_cookies_from_the_app(
    front: Front,
) -> None:
    nginx, seen = front.nginx, front.world.upstream.seen.requests
    alice = await front.world.session_of("alice", "wonderland")
    bob = await front.world.session_of("bob", "builder")
    host = ("Host", f"127.0.0.1:{nginx.port}")

    async def get(path: str, cookie: str | None, *extra: tuple[str, str],
                  method: str = "GET", body: bytes = b"") -> Answer:
        headers = [host, ("Accept", HTML), *extra]
        if cookie:
            headers.append(("Cookie", f"theme=dark; {COOKIE}={cookie}; "
                                      f"{COOKIE}_login=abc; lang=en"))
        return await send_raw(nginx.port, method, path, headers, body=body)

    forged = [("X-Forwarded-User", "mallory"), ("x-forwarded-groups", "admins"),
              ("X_Forwarded_User", "mallory"), ("X-Auth-Request-User", "mallory"),
              ("X-Forwarded-Access-Token", "forged")]
    mine = await get("/app/x", alice, *forged)
    assert mine.status == 200
    h = echoed(mine.body.decode())["h"]
    assert h["x-forwarded-user"] == "alice"
    assert h["x-forwarded-groups"] == "eng,admins"
    assert present(h, "x_forwarded_user", "x-auth-request-user",
                   "x-forwarded-access-token") == []
    # The app keeps its own cookies and never sees the gateway's.
    assert cookie_names(h) == ["theme", "lang"]

    public = await get("/public/x", None, *forged)
    assert public.status == 200
    assert present(echoed(public.body.decode())["h"], "x-forwarded-user", "x-forwarded-groups",
                   "x-auth-request-user", "x-forwarded-access-token") == []

    # Denied: nginx answers 403 and the app is not asked.
    before = len(seen)
    assert (await get("/admin/x", bob)).status == 403
    # A client naming another page or method in the check's headers changes nothing.
    claims = [("X-Original-URI", "/app/"), ("X-Forwarded-Uri", "/app/"),
              ("X-Original-Method", "GET"), ("X-Forwarded-Method", "GET")]
    assert (await get("/admin/x", bob, *claims)).status == 403
    assert (await get("/writes/x", alice, *claims, method="DELETE")).status == 403
    assert len(seen) == before
    anonymous = await get("/app/x", None, *claims)
    assert anonymous.status == 302
    assert parse_qs(urlsplit(anonymous.headers["Location"]).query)["rd"] == ["/app/x"]
    # Scripts and form posts without a session get a 401 from nginx, never a login page.
    api = await send_raw(nginx.port, "GET", "/app/x", [host, ("Accept", "application/json")])
    assert api.status == 401
    assert "Location" not in api.headers
    form = await get("/app/x", None, ("Content-Type", "text/plain"), method="POST", body=b"a")
    assert form.status == 401
    assert len(seen) == before

    # The original method reaches the gateway: POST is allowed on /writes/, DELETE is not,
    # and the body goes to the app (nginx's check carried none).
    posted = await get("/writes/x", alice, ("Content-Type", "text/plain"), method="POST",
                       body=b"hello")
    assert posted.status == 200
    assert echoed(posted.body.decode())["body_len"] == 5
    assert (await get("/writes/x", alice, method="DELETE")).status == 403
    assert len(seen) == before + 1
