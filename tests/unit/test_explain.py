"""`oidc-gateway explain` as an operator runs it: in-process `main([...])` on the shipped configs,
its exit status (0 forwarded, 1 not, 2 config or argument error) and what it prints; and the
README's "Authorization" section, whose every command is run and compared."""

from __future__ import annotations

import base64
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "config" / "example.yaml")
AUTHZ = ROOT / "config" / "authorization.yaml"
KEY = base64.b64encode(bytes(range(32))).decode()


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment the shipped configs need, as for `check`."""
    monkeypatch.setenv("OIDC_CLIENT_SECRET", "test-client-secret")
    monkeypatch.setenv("SESSION_KEY", KEY)
    monkeypatch.delenv("REDIS_URL", raising=False)


def explain(capsys: pytest.CaptureFixture[str], *args: str, config: str = EXAMPLE) -> tuple[
    int, dict[str, str], list[str]
]:
    """Run explain; (exit status, the "key: value" lines by key, the header lines)."""
    status = main(["explain", "-c", config, *args])
    out = capsys.readouterr().out
    fields: dict[str, str] = {}
    headers: list[str] = []
    for line in out.splitlines():
        if line.startswith("  "):
            headers.append(line.strip())
        else:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return status, fields, headers


def header(headers: list[str], name: str) -> list[str]:
    return [h.split(": ", 1)[1] if ": " in h else "" for h in headers
            if h.split(":", 1)[0].lower() == name.lower()]


# ---------------------------------------------------------------------------------------------
# config/example.yaml, route by route
# ---------------------------------------------------------------------------------------------

ENGINEER = ("--user", "erin", "--groups", "eng", "--email", "erin@example.com")


def test_public_route_is_forwarded_without_identity(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, headers = explain(capsys, "GET", "https://wiki.example.com/static/app.css",
                                   *ENGINEER)
    assert status == 0
    assert out["route"].startswith("wiki-static (routes[0]")
    assert out["login"].startswith("not needed")
    assert out["upstream"] == "GET http://127.0.0.1:8080/static/app.css"
    assert not header(headers, "X-Forwarded-User")
    assert out["result"] == "forwarded to the upstream (exit 0)"


def test_allowed_by_a_combined_rule_with_the_headers_the_upstream_gets(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out, headers = explain(
        capsys, "GET", "https://wiki.example.com/page?rev=2", *ENGINEER,
        "--client-ip", "203.0.113.9",
        "-H", "X-Forwarded-User: root", "-H", "x_forwarded_groups: admins",
        "-H", "Cookie: theme=dark; _oidc_gateway=not-for-the-app", "-H", "Accept: text/html",
    )
    assert status == 0
    assert out["route"] == (
        "wiki (routes[1]: host wiki.example.com, path /, methods any) -> http://127.0.0.1:8080")
    assert out["decision"] == "allow"
    assert out["rule"] == "allow[0]"
    assert out["reason"] == (
        'allowed by allow[0] of route "wiki": email_domains: example.com, groups: eng')
    assert out["upstream"] == "GET http://127.0.0.1:8080/page?rev=2"
    # The client's identity headers are gone in every spelling; the gateway's are there.
    assert header(headers, "X-Forwarded-User") == ["erin"]
    assert header(headers, "X-Forwarded-Groups") == ["eng"]
    assert header(headers, "x_forwarded_groups") == []
    assert header(headers, "X-Forwarded-Email") == ["erin@example.com"]
    assert header(headers, "Cookie") == ["theme=dark"]
    assert header(headers, "Accept") == ["text/html"]
    assert header(headers, "X-Forwarded-For") == ["203.0.113.9"]
    assert header(headers, "Host") == ["wiki.example.com"]


def test_deny_wins_over_a_matching_allow_rule(capsys: pytest.CaptureFixture[str]) -> None:
    # bob is named by allow[1] of "wiki", and deny[1] refuses bob in "leavers".
    status, out, headers = explain(capsys, "GET", "https://wiki.example.com/",
                                   "--user", "bob", "--groups", "leavers")
    assert status == 1
    assert out["decision"] == "deny"
    assert out["rule"] == "deny[1]"
    assert out["reason"] == 'denied by deny[1] of route "wiki": users: bob, groups: leavers'
    assert "upstream" not in out
    assert headers == []
    assert out["result"] == "not forwarded (exit 1)"
    status, out, _ = explain(capsys, "GET", "https://wiki.example.com/", "--user", "bob")
    assert (status, out["rule"]) == (0, "allow[1]")


@pytest.mark.parametrize(
    ("method", "status", "rule"),
    [("GET", 0, "allow[2]"), ("HEAD", 0, "allow[2]"), ("POST", 1, "deny[0]"),
     ("DELETE", 1, "deny[0]")],
)
def test_partner_reads_but_never_writes(
    capsys: pytest.CaptureFixture[str], method: str, status: int, rule: str
) -> None:
    got, out, _ = explain(capsys, method, "https://wiki.example.com/page",
                          "--user", "carol", "--email", "Carol@Partner.Example.org")
    assert (got, out["rule"]) == (status, rule)


def test_nested_claims_must_all_match(capsys: pytest.CaptureFixture[str]) -> None:
    claims = ('{"sub": "u-1", "preferred_username": "dora", '
              '"realm_access": {"roles": ["offline_access", "wiki-editor"]}, '
              '"department": "support"}')
    status, out, _ = explain(capsys, "GET", "https://wiki.example.com/", "--claims", claims)
    assert (status, out["rule"]) == (0, "allow[3]")
    assert out["reason"].endswith(
        "claims: realm_access.roles='wiki-editor', department='support'")
    status, out, _ = explain(capsys, "GET", "https://wiki.example.com/", "--claims",
                             claims.replace("support", "sales"))
    assert (status, out["rule"]) == (1, "none (no allow rule matched)")


@pytest.mark.parametrize(
    ("method", "client", "forwarded_for", "status", "seen_as"),
    [
        ("GET", "10.20.1.1", None, 0, "10.20.1.1"),
        ("GET", "10.21.1.1", None, 1, "10.21.1.1"),
        ("POST", "10.20.1.1", None, 1, "10.20.1.1"),
        # From the load balancer (10.0.0.0/8 is trusted): its X-Forwarded-For names the client.
        ("GET", "10.0.0.5", "10.20.7.7", 0, "10.20.7.7"),
        ("GET", "10.0.0.5", "198.51.100.1", 1, "198.51.100.1"),
        # From anyone else, X-Forwarded-For is not believed: a forged one does not help.
        ("GET", "198.51.100.1", "10.20.7.7", 1, "198.51.100.1"),
    ],
)
def test_networks_judge_the_trusted_client_address(
    capsys: pytest.CaptureFixture[str], method: str, client: str, forwarded_for: str | None,
    status: int, seen_as: str,
) -> None:
    extra = ["-H", f"X-Forwarded-For: {forwarded_for}"] if forwarded_for else []
    got, out, _ = explain(capsys, method, "https://wiki.example.com/", "--user", "ci-bot",
                          "--client-ip", client, *extra)
    assert out["client"] == seen_as
    assert got == status
    if status == 0:
        assert out["reason"].startswith('allowed by allow[4] of route "wiki": users: ci-bot, ')


def test_without_a_session_the_answer_depends_on_unauthenticated(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out, _ = explain(capsys, "GET", "https://wiki.example.com/page")
    assert status == 1
    assert out["identity"].startswith("none")
    assert out["login"] == (
        "needed (auth: required); without a session, browser navigations get a 302 to "
        "sign-in, other requests a 401 (JSON with login_url)")
    assert out["decision"].startswith("sign-in needed")
    status, out, _ = explain(capsys, "GET", "https://wiki.example.com/api/pages")
    assert status == 1
    assert out["route"].startswith("wiki-api (routes[2]")
    assert out["login"] == (
        "needed (auth: required); without a session, every request gets a 401 (JSON with "
        "login_url), as unauthenticated: 401 says")


def test_an_optional_route_passes_everyone_and_identifies_the_signed_in(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out, headers = explain(capsys, "GET", "https://www.example.com/")
    assert status == 0
    assert out["login"].startswith("optional")
    assert not header(headers, "X-Forwarded-User")
    status, out, headers = explain(capsys, "GET", "https://www.example.com/", "--user", "eve")
    assert status == 0
    assert header(headers, "X-Forwarded-User") == ["eve"]


@pytest.mark.parametrize(
    ("who", "status", "rule"),
    [
        (("--user", "sam", "--groups", "staff", "--email", "sam@example.com"), 0,
         "default_policy.allow[0]"),
        (("--user", "sam", "--groups", "staff", "--email", "sam@example.org"), 1,
         "none (no allow rule matched)"),
        (("--user", "mallory", "--groups", "staff", "--email", "m@example.com"), 1,
         "default_policy.deny[0]"),
        (("--claims", '{"sub": "a1", "email": "auditor@audit.example.net", "acr": "mfa"}'), 0,
         "default_policy.allow[2]"),
        (("--claims", '{"sub": "a1", "email": "auditor@audit.example.net", '
                      '"email_verified": false, "acr": "mfa"}'), 1,
         "none (no allow rule matched)"),
    ],
)
def test_a_route_without_rules_follows_default_policy(
    capsys: pytest.CaptureFixture[str], who: tuple[str, ...], status: int, rule: str
) -> None:
    # A client address outside default_policy.deny[4]'s network (unknown would be refused).
    got, out, _ = explain(capsys, "GET", "https://status.example.com/", *who,
                          "--client-ip", "10.9.9.9")
    assert (got, out["rule"]) == (status, rule)
    assert "default_policy" in out["reason"]


def test_the_one_mapping_form_is_reported_as_such(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = explain(capsys, "GET", "https://grafana.example.com/d/1",
                             "--user", "sue", "--groups", "sre")
    assert status == 0
    assert out["rule"] == "allow (the one-mapping form: any listed value admits)"
    assert out["reason"] == 'allowed by allow of route "grafana": groups: sre'


def test_the_path_is_judged_as_it_will_be_forwarded(capsys: pytest.CaptureFixture[str]) -> None:
    # Not the public /static/ route: the dot-segments are resolved before matching.
    status, out, _ = explain(capsys, "GET", "https://wiki.example.com/static/%2e%2e/admin")
    assert out["path"] == "/admin"
    assert out["route"].startswith("wiki (routes[1]")
    assert status == 1


@pytest.mark.parametrize(
    ("method", "url", "line", "expected"),
    [
        ("PATCH", "https://grafana.example.com/x", "route", "none matches: 404 from the gateway"),
        ("GET", "https://nowhere.example.com/", "route", "none matches: 404 from the gateway"),
        ("GET", "https://wiki.example.com/oauth2/start", "route",
         "none: the gateway's own endpoint answers this path"),
        ("GET", "https://wiki.example.com/ping", "route",
         "none: the gateway's own endpoint answers this path"),
        ("GET", "https://wiki.example.com/a/%zz", "answer",
         '400: the request path has a "%" that is not followed by two hex digits '
         "(before any route is matched)"),
        ("GET", "https://wiki.example.com/a/%5cb", "answer",
         "400: the request path contains an encoded control character or backslash "
         "(before any route is matched)"),
    ],
)
def test_requests_that_reach_no_upstream_exit_1(
    capsys: pytest.CaptureFixture[str], method: str, url: str, line: str, expected: str
) -> None:
    status, out, _ = explain(capsys, method, url, *ENGINEER)
    assert status == 1
    assert out[line] == expected
    assert out["result"] == "not forwarded (exit 1)"


def test_access_token_is_shown_as_a_placeholder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "token.yaml"
    config.write_text(f"""
version: 1
provider: {{issuer: "https://idp.example.com", client_id: gw, client_secret: s}}
session: {{keys: ["{KEY}"]}}
routes:
  - {{name: api, upstream: "http://127.0.0.1:9000", pass_access_token: true,
      pass_host_header: false}}
""")
    status, _, headers = explain(capsys, "GET", "http://api.test/x", "--user", "u",
                                 config=str(config))
    assert status == 0
    assert header(headers, "X-Forwarded-Access-Token") == ["<the session's access token>"]
    assert header(headers, "Host") == ["127.0.0.1:9000"]


# ---------------------------------------------------------------------------------------------
# Exit 2: config and argument errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--claims", "{not json"), "--claims is not JSON"),
        (("--claims", "[1]"), "--claims must be a JSON object"),
        (("--claims", '{"email": "a@example.com"}'), "The ID token has no subject (sub)."),
        (("--claims", '{"sub": "1"}', "--user", "u"), "give either --claims or --user"),
        (("--groups", "eng"), "--groups and --email describe a user: add --user"),
        (("--user", "u", "--client-ip", "10.0.0.300"), "is not an IP address"),
        (("--user", "u", "-H", "no colon"), "is not 'Name: value'"),
    ],
)
def test_bad_arguments_exit_2(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    assert main(["explain", "-c", EXAMPLE, "GET", "https://wiki.example.com/", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err


def test_a_url_that_is_not_absolute_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "-c", EXAMPLE, "GET", "/page"]) == 2
    assert "'/page' is not an absolute http:// or https:// URL" in capsys.readouterr().err


def test_a_bad_config_exits_2_with_key_paths(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(f"""
version: 1
provider: {{issuer: "https://idp.example.com", client_id: gw, client_secret: s}}
session: {{keys: ["{KEY}"]}}
routes:
  - name: wiki
    upstream: "http://127.0.0.1:8080"
    allow:
      - groups: []
      - claims: {{"realm_access..roles": [admin]}}
""")
    assert main(["explain", "-c", str(config), "GET", "https://wiki.example.com/"]) == 2
    err = capsys.readouterr().err
    assert "routes[0].allow[0].groups: lists no value" in err
    assert "routes[0].allow[1].claims: 'realm_access..roles' is not a claim path" in err


def test_a_missing_secret_is_a_config_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SESSION_KEY")
    assert main(["explain", "-c", EXAMPLE, "GET", "https://wiki.example.com/"]) == 2
    assert "session.keys[0]: environment variable SESSION_KEY is not set" in (
        capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------
# The README's "Authorization" section: every command shown runs and prints what is shown
# ---------------------------------------------------------------------------------------------


def _authorization_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Authorization\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end != -1 else len(text)]


def _blocks(section: str, language: str) -> list[str]:
    """The fenced blocks of ``language`` ("" for plain fences), fences paired in order."""
    blocks: list[str] = []
    current: list[str] | None = None
    kind = ""
    for line in section.splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, kind = [], line[3:].strip()
            else:
                if kind == language:
                    blocks.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def _examples() -> list[tuple[list[str], str]]:
    out = []
    for block in _blocks(_authorization_section(), ""):
        if not block.startswith("$ oidc-gateway explain"):
            continue
        lines = block.splitlines(keepends=True)
        command = ""
        while True:  # the command, with its "\" continuations
            line = lines.pop(0)
            command += line
            if line.rstrip("\n").endswith("\\") or command.count("'") % 2:
                continue
            break
        argv = shlex.split(command.removeprefix("$ ").replace("\\\n", " "))
        out.append((argv, "".join(lines)))
    return out


EXAMPLES = _examples()


def test_the_readme_shows_explain_examples() -> None:
    assert len(EXAMPLES) >= 6


@pytest.mark.parametrize(("argv", "shown"), EXAMPLES, ids=[f"example {i + 1}"
                                                           for i in range(len(EXAMPLES))])
def test_every_readme_explain_example_prints_what_it_shows(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str],
    shown: str,
) -> None:
    monkeypatch.chdir(ROOT)
    assert argv[0] == "oidc-gateway"
    status = main(argv[1:])
    printed = capsys.readouterr().out
    assert printed == shown
    assert f"(exit {status})" in printed.splitlines()[-1]


def test_the_readme_yaml_is_config_authorization_yaml() -> None:
    shipped = yaml.safe_load(AUTHZ.read_text(encoding="utf-8"))
    routes = {r["name"]: r for r in shipped["routes"]}
    compared = 0
    for block in _blocks(_authorization_section(), "yaml"):
        doc: Any = yaml.safe_load(block)
        if isinstance(doc, dict):
            if "default_policy" in doc:
                assert doc["default_policy"] == shipped["default_policy"]
                compared += 1
            doc = doc.get("routes", [])
        for route in doc:
            assert route == routes[route["name"]], route["name"]
            compared += 1
    assert compared >= 6


def test_an_unknown_client_address_fails_closed(capsys: pytest.CaptureFixture[str]) -> None:
    # Without --client-ip the address is unknown: a deny rule on networks refuses.
    status, out, _ = explain(capsys, "GET", "https://status.example.com/", "--user", "sam",
                             "--groups", "staff", "--email", "sam@example.com")
    assert status == 1
    assert out["client"] == "unknown (give --client-ip)"
    assert out["rule"] == "default_policy.deny[4]"
    assert out["reason"].endswith("networks: client address unknown")
