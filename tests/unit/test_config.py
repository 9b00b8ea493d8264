"""Pure tests of gateway.config: shipped examples, key-path errors, env expansion, scalar types.

Every problem is asserted as the exact line `oidc-gateway check` prints (``path: message``),
since operators and their scripts read those lines.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from gateway.config import (
    DEFAULT_ALGORITHMS,
    AllowConfig,
    Config,
    format_path,
    json_schema,
    load_config,
    parse_config,
    parse_duration,
    parse_listen,
)
from gateway.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"

RAW_KEY = bytes(range(32))
KEY_STD = base64.b64encode(RAW_KEY).decode()
# Bytes whose standard base64 is full of "+" and "/", so the URL-safe form really differs.
RAW_KEY_URLSAFE = bytes([0xFB, 0xFF] * 16)
KEY_URLSAFE = base64.urlsafe_b64encode(RAW_KEY_URLSAFE).decode()
CLIENT_SECRET = "test-client-secret-0123456789"

ENV = {"OIDC_CLIENT_SECRET": CLIENT_SECRET, "SESSION_KEY": KEY_STD}

DELETE = object()


def base() -> dict[str, Any]:
    """A valid config as parsed YAML: a public route and a protected one."""
    return {
        "version": 1,
        "provider": {
            "issuer": "https://idp.example.com/realms/corp",
            "client_id": "gateway",
            "client_secret": "${OIDC_CLIENT_SECRET}",
        },
        "session": {"keys": ["${SESSION_KEY}"]},
        "routes": [
            {
                "name": "static",
                "match": {"path": "/static/"},
                "upstream": "http://127.0.0.1:8080",
                "auth": "public",
            },
            {
                "name": "wiki",
                "match": {"host": "wiki.example.com", "path": "/"},
                "upstream": "http://127.0.0.1:8080",
                "allow": {"groups": ["eng"]},
            },
        ],
    }


def with_(changes: Mapping[str, object], data: dict[str, Any] | None = None) -> dict[str, Any]:
    """``base()`` with dotted-path changes: ``{"routes.1.match.path": "x"}``; DELETE removes."""
    out = copy.deepcopy(base() if data is None else data)
    for dotted, value in changes.items():
        parts: list[str | int] = [int(p) if p.isdigit() else p for p in dotted.split(".")]
        node: Any = out
        for part in parts[:-1]:
            if isinstance(part, str) and part not in node:
                node[part] = {}
            node = node[part]
        if value is DELETE:
            del node[parts[-1]]
        else:
            node[parts[-1]] = value
    return out


def load(changes: Mapping[str, object] | None = None, env: Mapping[str, str] = ENV) -> Config:
    return parse_config(with_(changes or {}), env)


def problems(changes: Mapping[str, object], env: Mapping[str, str] = ENV) -> list[str]:
    """The problems (``path: message`` lines) a changed ``base()`` gives; it must give some."""
    with pytest.raises(ConfigError) as info:
        parse_config(with_(changes), env)
    return [str(p) for p in info.value.problems]


def text_problems(text: str, env: Mapping[str, str] = ENV) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(text, env)
    return [str(p) for p in info.value.problems]


# ---------------------------------------------------------------------------------------------
# Shipped configs
# ---------------------------------------------------------------------------------------------

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_the_shipped_configs_are_there() -> None:
    assert {p.name for p in SHIPPED} >= {"example.yaml", "minimal.yaml", "dev-memory.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads(path: Path) -> None:
    # Only the two secrets: every other variable a shipped config uses has a default.
    config = load_config(path.read_text(encoding="utf-8"), ENV)
    assert config.provider.client_secret.get_secret_value() == CLIENT_SECRET
    assert config.session.key_bytes[0] == RAW_KEY
    assert config.routes


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
@pytest.mark.parametrize("missing", ["OIDC_CLIENT_SECRET", "SESSION_KEY"])
def test_shipped_configs_take_secrets_only_from_the_environment(path: Path, missing: str) -> None:
    env = {k: v for k, v in ENV.items() if k != missing}
    found = text_problems(path.read_text(encoding="utf-8"), env)
    assert found
    assert all(f"environment variable {missing} is not set" in p for p in found)


def _field_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every key of a model, dotted, descending into sub-models (and into route items)."""
    out: set[str] = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        out.add(path)
        for arg in _model_args(field.annotation):
            out |= _field_paths(arg, path + ".")
    return out


def _model_args(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in getattr(annotation, "__args__", ()) for m in _model_args(a)]


def _data_paths(node: Any, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            out.add(path)
            # allow.claims holds claim names chosen by the user, not config keys.
            if not path.endswith("allow.claims"):
                out |= _data_paths(value, path + ".")
    elif isinstance(node, list):
        for item in node:
            out |= _data_paths(item, prefix)
    return out


def test_the_example_sets_every_key_of_the_model() -> None:
    text = (CONFIG_DIR / "example.yaml").read_text(encoding="utf-8")
    missing = _field_paths(Config) - _data_paths(yaml.safe_load(text))
    assert not missing, f"config/example.yaml does not show: {sorted(missing)}"


def _explained(key: str, lines: list[str]) -> bool:
    """A comment names the key, or the key's line has a comment on it or right above it."""
    comments = [line for line in lines if line.lstrip().startswith("#")]
    if any(re.search(rf"\b{key}\b", line) for line in comments):
        return True
    return any(
        re.match(rf"\s*(- )?{key}:", line)
        and ("#" in line or lines[i - 1].lstrip().startswith("#"))
        for i, line in enumerate(lines)
        if i > 0
    )


def test_the_example_comments_every_key() -> None:
    lines = (CONFIG_DIR / "example.yaml").read_text(encoding="utf-8").splitlines()
    keys = {path.rsplit(".", 1)[-1] for path in _field_paths(Config)}
    unexplained = sorted(key for key in keys if not _explained(key, lines))
    assert not unexplained, f"config/example.yaml does not explain: {unexplained}"


# ---------------------------------------------------------------------------------------------
# Key paths and messages
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"routes.1.match.path": "wiki"}, 'routes[1].match.path: must start with "/"'),
        ({"routes.0.alow": {"groups": ["eng"]}}, "routes[0].alow: unknown key"),
        ({"verison": 1}, "verison: unknown key"),
        ({"server.lisen": ":4180"}, "server.lisen: unknown key"),
        ({"provider.client_ids": "x"}, "provider.client_ids: unknown key"),
        ({"provider.claims.usr": "sub"}, "provider.claims.usr: unknown key"),
        ({"session.key": ["x"]}, "session.key: unknown key"),
        ({"session.cookie.nmae": "x"}, "session.cookie.nmae: unknown key"),
        ({"routes.1.match.hots": "a.example.com"}, "routes[1].match.hots: unknown key"),
        ({"routes.1.allow.emials": ["a@example.com"]}, "routes[1].allow.emials: unknown key"),
        ({"logging.lvl": "debug"}, "logging.lvl: unknown key"),
        ({"version": 2}, "version: must be one of 1"),
        ({"version": DELETE}, "version: required key is missing"),
        ({"provider.client_id": DELETE}, "provider.client_id: required key is missing"),
        ({"provider.client_id": ""}, "provider.client_id: must not be empty"),
        ({"routes.0.upstream": DELETE}, "routes[0].upstream: required key is missing"),
        ({"routes": []}, "routes: must list at least one entry"),
        ({"routes": {"name": "x"}}, "routes: must be a list"),
        ({"server": "0.0.0.0:4180"}, "server: must be a mapping (key: value)"),
        ({"session.cookie.secure": "maybe"}, "session.cookie.secure: must be true or false"),
        (
            {"session.cookie.samesite": "none"},
            "session.cookie.samesite: must be one of 'lax' or 'strict'",
        ),
        ({"server.max_header_count": "many"}, "server.max_header_count: must be a whole number"),
        ({"provider.client_id": 42}, "provider.client_id: must be a string"),
        ({"session.store": "etcd"}, "session.store: must be one of 'redis' or 'memory'"),
        (
            {"session.redis_url": "http://redis"},
            "session.redis_url: must be a redis://, rediss:// or unix:// URL",
        ),
        (
            {"server.prefix": "oauth2"},
            'server.prefix: must start with "/" and be a plain path like /oauth2',
        ),
        (
            {"routes.1.match.methods": ["GET", "FETCH"]},
            "routes[1].match.methods: 'FETCH' is not an HTTP method",
        ),
        (
            {"routes.1.match.host": "wiki example"},
            "routes[1].match.host: 'wiki example' is not a host name "
            "(a wildcard is written *.example.com)",
        ),
        (
            {"routes.1.match.path": "/a/../b"},
            "routes[1].match.path: must be a plain path prefix without ?, #, %, \\ or dot-segments",
        ),
        (
            {"routes.1.allow.claims": {"dept": [{"a": 1}]}},
            "routes[1].allow.claims.dept[0]: must be a string, a whole number or true/false",
        ),
        (
            {"routes.1.allow.email_domains": ["@example.com"]},
            "routes[1].allow.email_domains: '@example.com' must be a bare domain "
            "such as example.com",
        ),
        (
            {"server.strip_headers": ["X-Auth-Request-*", "*"]},
            "server.strip_headers: '*' is not a header name, or a header-name prefix ending "
            "in * (X-Auth-Request-*); a bare * would remove every header",
        ),
        (
            {"provider.issuer": "idp.example.com"},
            "provider.issuer: must be an http:// or https:// URL, got 'idp.example.com'",
        ),
        (
            {"server.public_url": "https://apps.example.com/base"},
            "server.public_url: must be an origin only (scheme, host and port), without a path",
        ),
    ],
)
def test_problem_paths_and_messages(changes: dict[str, object], expected: str) -> None:
    assert problems(changes) == [expected]


def test_every_problem_is_reported_at_once() -> None:
    text = """\
version: 1
server:
  listen: "0.0.0.0:99999"
  lisen: ":4180"
provider:
  issuer: "https://idp.example.com"
  client_id: "gateway"
  client_secret: "${OIDC_CLIENT_SECRET}"
  scopes: [email]
session:
  keys: ["${SESSION_KEY}", "dG9vIHNob3J0"]
  lifetime: 0
routes:
  - name: wiki
    match: {path: wiki}
    upstream: "http://127.0.0.1:8080/app"
    alow: {groups: [eng]}
  - name: wiki
    upstream: "http://127.0.0.1:8080"
"""
    found = text_problems(text)
    assert found == [
        "server.listen: port '99999' must be a number from 1 to 65535",
        "server.lisen: unknown key",
        'provider.scopes: must include "openid"',
        "session.lifetime: must be longer than zero",
        "session.keys[1]: must be base64 of 32 bytes, got 9 bytes; "
        "make a key with `oidc-gateway gen-key`",
        'routes[0].match.path: must start with "/"',
        "routes[0].upstream: must be an origin only (scheme, host and port), without a path",
        "routes[0].alow: unknown key",
    ]
    # Duplicate names are checked once every route is valid on its own.
    fixed = (
        text.replace("0.0.0.0:99999", "0.0.0.0:4180")
        .replace('  lisen: ":4180"\n', "")
        .replace("[email]", "[openid, email]")
        .replace(', "dG9vIHNob3J0"', "")
        .replace("lifetime: 0", "lifetime: 12h")
        .replace("path: wiki", "path: /")
        .replace("8080/app", "8080")
        .replace("alow", "allow")
    )
    assert text_problems(fixed) == [
        "routes: route name 'wiki' is used twice (routes[0] and routes[1])"
    ]


def test_config_error_message_lists_every_problem_on_its_own_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(with_({"server.lisen": 1, "logging.lvl": 2}), ENV)
    assert str(info.value) == "server.lisen: unknown key\nlogging.lvl: unknown key"
    assert info.value.reason == "config_invalid"


def test_an_unknown_key_is_reported_even_when_its_value_uses_a_missing_variable() -> None:
    assert problems({"routes.0.alow": "${NOPE}"}) == [
        "routes[0].alow: environment variable NOPE is not set",
        "routes[0].alow: unknown key",
    ]


@pytest.mark.parametrize(
    ("loc", "expected"),
    [
        ((), ""),
        (("version",), "version"),
        (("routes", 1, "match", "path"), "routes[1].match.path"),
        (("session", "keys", 0), "session.keys[0]"),
        (("routes", 0, "allow", "claims", "dept", 2), "routes[0].allow.claims.dept[2]"),
    ],
)
def test_format_path(loc: tuple[str | int, ...], expected: str) -> None:
    assert format_path(loc) == expected


# ---------------------------------------------------------------------------------------------
# Environment expansion
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "env", "expected"),
    [
        ("${PREFIX}", {"PREFIX": "gw:"}, "gw:"),
        ("a-${PREFIX}-b", {"PREFIX": "x"}, "a-x-b"),
        ("${A}${B}", {"A": "1", "B": "2"}, "12"),
        ("${PREFIX:-dflt:}", {}, "dflt:"),
        ("${PREFIX:-dflt:}", {"PREFIX": ""}, "dflt:"),
        ("${PREFIX:-dflt:}", {"PREFIX": "set:"}, "set:"),
        ("${PREFIX:-}", {}, ""),
        ("${PREFIX}", {"PREFIX": ""}, ""),
        ("${U:-redis://h:6379/0}", {}, "redis://h:6379/0"),
        ("$$", {}, "$"),
        ("$${PREFIX}", {"PREFIX": "x"}, "${PREFIX}"),
        ("a$$$${X}", {"X": "x"}, "a$${X}"),
        ("$$$${X}", {"X": "y"}, "$${X}"),
        ("$$${X}", {"X": "y"}, "$y"),
        ("cost$5", {}, "cost$5"),
        ("$PREFIX", {"PREFIX": "x"}, "$PREFIX"),
        # The value of a variable is not expanded again.
        ("${X}", {"X": "${Y}"}, "${Y}"),
        ("${X}", {"X": "$$"}, "$$"),
    ],
)
def test_env_expansion(value: str, env: dict[str, str], expected: str) -> None:
    config = load({"session.key_prefix": value}, env={**ENV, **env})
    assert config.session.key_prefix == expected


def test_env_expansion_reaches_lists_and_nested_mappings() -> None:
    config = load(
        {"routes.1.allow.groups": ["${G1}", "static", "${G2:-ops}"], "server.listen": "${L}"},
        env={**ENV, "G1": "eng", "L": "127.0.0.1:9000"},
    )
    assert isinstance(config.routes[1].allow, AllowConfig)  # the one-mapping form
    assert config.routes[1].allow.groups == ("eng", "static", "ops")
    assert config.server.listen_address == ("127.0.0.1", 9000)


def test_env_expansion_leaves_non_strings_alone() -> None:
    config = load({"server.max_header_count": 50, "session.cookie.secure": False})
    assert config.server.max_header_count == 50
    assert config.session.cookie.secure is False


@pytest.mark.parametrize(
    ("missing", "expected"),
    [
        (
            "OIDC_CLIENT_SECRET",
            "provider.client_secret: environment variable OIDC_CLIENT_SECRET is not set",
        ),
        ("SESSION_KEY", "session.keys[0]: environment variable SESSION_KEY is not set"),
    ],
)
def test_a_missing_secret_names_the_variable_and_the_key(missing: str, expected: str) -> None:
    env = {k: v for k, v in ENV.items() if k != missing}
    # One problem: not also "must not be empty" or "not base64" for the empty value.
    assert problems({}, env=env) == [expected]


def test_a_missing_variable_inside_a_value_is_one_problem() -> None:
    assert problems({"provider.issuer": "https://${IDP_HOST}/realms/corp"}) == [
        "provider.issuer: environment variable IDP_HOST is not set"
    ]


def test_every_missing_variable_is_reported() -> None:
    assert problems({}, env={}) == [
        "provider.client_secret: environment variable OIDC_CLIENT_SECRET is not set",
        "session.keys[0]: environment variable SESSION_KEY is not set",
    ]


@pytest.mark.parametrize(
    "value",
    ["${X:default}", "${X-default}", "${1X}", "${X", "${}", "${A:-${B}}", "${X Y}", "pre${X}${"],
)
def test_a_malformed_reference_is_an_error_not_literal_text(value: str) -> None:
    found = problems({"provider.client_secret": value}, env={**ENV, "X": "x", "A": "a", "B": "b"})
    assert len(found) == 1
    assert found[0].startswith("provider.client_secret: bad environment reference ")
    assert "write ${NAME} or ${NAME:-default}, and $$ for a literal $" in found[0]


# ---------------------------------------------------------------------------------------------
# Durations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("12h", 43200.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("500ms", 0.5),
        ("45s", 45.0),
        ("15m", 900.0),
        ("7d", 604800.0),
        ("1.5h", 5400.0),
        ("1m30s500ms", 90.5),
        (45, 45.0),
        (2.5, 2.5),
        ("45", 45.0),
        ("2.5", 2.5),
        (" 10s ", 10.0),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)
    assert load({"session.lifetime": value}).session.lifetime == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("12x", "'12x' is not a duration; use a number with a unit: 30s, 15m, 12h, 1h30m"),
        ("h", "'h' is not a duration; use a number with a unit: 30s, 15m, 12h, 1h30m"),
        ("1h30", "'1h30' is not a duration; use a number with a unit: 30s, 15m, 12h, 1h30m"),
        ("-5s", "'-5s' is not a duration; use a number with a unit: 30s, 15m, 12h, 1h30m"),
        ("", "'' is not a duration; use a number with a unit: 30s, 15m, 12h, 1h30m"),
        ("nan", "'nan' is not a duration; use a number with a unit: 30s, 15m, 12h, 1h30m"),
        ("inf", "'inf' is not a duration; use a number with a unit: 30s, 15m, 12h, 1h30m"),
        ("1e3", "'1e3' is not a duration; use a number with a unit: 30s, 15m, 12h, 1h30m"),
        ("1_0", "'1_0' is not a duration; use a number with a unit: 30s, 15m, 12h, 1h30m"),
        (
            "twelve hours",
            "'twelve hours' is not a duration; use a number with a unit: 30s, 15m, 12h, 1h30m",
        ),
        (True, "must be a duration such as 30s, 15m, 12h or 1h30m"),
        (None, "must be a duration such as 30s, 15m, 12h or 1h30m"),
        (["1h"], "must be a duration such as 30s, 15m, 12h or 1h30m"),
        (float("nan"), "must be a finite duration such as 30s, 15m, 12h or 1h30m"),
        (float("inf"), "must be a finite duration such as 30s, 15m, 12h or 1h30m"),
        (0, "must be longer than zero"),
        (0.0, "must be longer than zero"),
        ("0", "must be longer than zero"),
        ("0s", "must be longer than zero"),
        ("0h0m", "must be longer than zero"),
        (-1, "must be longer than zero"),
        (-0.5, "must be longer than zero"),
    ],
)
def test_bad_durations(value: object, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        parse_duration(value)
    assert problems({"session.idle_timeout": value}) == [f"session.idle_timeout: {message}"]


def test_duration_defaults() -> None:
    config = load()
    assert config.session.lifetime == 12 * 3600
    assert config.session.idle_timeout == 3600
    assert config.routes[0].timeout == 30
    assert config.provider.leeway == 60


# ---------------------------------------------------------------------------------------------
# Listen address
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("0.0.0.0:4180", ("0.0.0.0", 4180)),
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]:4180", ("::1", 4180)),
        ("[::]:65535", ("::", 65535)),
        (":4180", ("0.0.0.0", 4180)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_listen(value: str, address: tuple[str, int]) -> None:
    assert parse_listen(value) == address
    assert load({"server.listen": value}).server.listen_address == address


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0.0.0.0:0", "port '0' must be a number from 1 to 65535"),
        ("0.0.0.0:65536", "port '65536' must be a number from 1 to 65535"),
        ("0.0.0.0:http", "port 'http' must be a number from 1 to 65535"),
        ("0.0.0.0:-1", "port '-1' must be a number from 1 to 65535"),
        ("0.0.0.0:", "port '' must be a number from 1 to 65535"),
        # Unicode digits are digits to str.isdigit(), and int() reads them.
        (
            "0.0.0.0:\uff14\uff11\uff18\uff10",
            "port '\uff14\uff11\uff18\uff10' must be a number from 1 to 65535",
        ),
        ("4180", "'4180' is not host:port, e.g. 0.0.0.0:4180 or 127.0.0.1:4180"),
        ("::1:4180", "write an IPv6 address in brackets, e.g. [::1]:4180"),
        ("[::1]", "'[::1]' is not host:port (IPv6 as [::1]:4180)"),
        ("[::1]4180", "'[::1]4180' is not host:port (IPv6 as [::1]:4180)"),
        ("[wiki.example.com]:80", "'wiki.example.com' in brackets is not an IPv6 address"),
    ],
)
def test_bad_listen(value: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        parse_listen(value)
    assert problems({"server.listen": value}) == [f"server.listen: {message}"]


# ---------------------------------------------------------------------------------------------
# Session keys
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "raw"),
    [
        (KEY_STD, RAW_KEY),
        (KEY_URLSAFE, RAW_KEY_URLSAFE),
        (KEY_URLSAFE.rstrip("="), RAW_KEY_URLSAFE),
        (base64.b64encode(RAW_KEY_URLSAFE).decode(), RAW_KEY_URLSAFE),
    ],
    ids=["std", "urlsafe", "urlsafe-unpadded", "std-with-plus-slash"],
)
def test_session_keys(key: str, raw: bytes) -> None:
    assert "-" in KEY_URLSAFE or "_" in KEY_URLSAFE
    config = load(env={**ENV, "SESSION_KEY": key})
    assert config.session.key_bytes == (raw,)


def test_several_session_keys_keep_their_order() -> None:
    config = load({"session.keys": ["${SESSION_KEY}", KEY_URLSAFE]})
    assert config.session.key_bytes == (RAW_KEY, RAW_KEY_URLSAFE)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            [base64.b64encode(bytes(31)).decode()],
            "session.keys[0]: must be base64 of 32 bytes, got 31 bytes; "
            "make a key with `oidc-gateway gen-key`",
        ),
        (
            [KEY_STD, base64.b64encode(bytes(33)).decode()],
            "session.keys[1]: must be base64 of 32 bytes, got 33 bytes; "
            "make a key with `oidc-gateway gen-key`",
        ),
        (
            [KEY_STD, "not base64 at all!"],
            "session.keys[1]: is not base64; make a key with `oidc-gateway gen-key`",
        ),
        (
            ["correct horse battery staple"],
            "session.keys[0]: is not base64; make a key with `oidc-gateway gen-key`",
        ),
        ([], "session.keys: must list at least one entry"),
    ],
    ids=["31-bytes", "33-bytes", "not-base64", "passphrase", "none"],
)
def test_bad_session_keys(keys: list[str], expected: str) -> None:
    assert problems({"session.keys": keys}) == [expected]


def test_session_keys_are_required() -> None:
    assert problems({"session.keys": DELETE}) == ["session.keys: required key is missing"]


# ---------------------------------------------------------------------------------------------
# Provider
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithms", "expected"),
    [
        (
            ["none"],
            'provider.algorithms: "none" is never accepted: unsigned ID tokens prove nothing',
        ),
        (
            ["RS256", "None"],
            'provider.algorithms: "none" is never accepted: unsigned ID tokens prove nothing',
        ),
        (
            ["RS1"],
            "provider.algorithms: unknown algorithm 'RS1'; known: ['ES256', 'ES384', 'ES512', "
            "'EdDSA', 'HS256', 'HS384', 'HS512', 'PS256', 'PS384', 'PS512', 'RS256', 'RS384', "
            "'RS512']",
        ),
        ([], "provider.algorithms: must list at least one algorithm"),
    ],
)
def test_bad_algorithms(algorithms: list[str], expected: str) -> None:
    assert problems({"provider.algorithms": algorithms}) == [expected]


def test_algorithms_default_to_asymmetric_ones_and_hmac_only_when_listed() -> None:
    assert load().provider.algorithms == DEFAULT_ALGORITHMS
    assert not any(a.startswith("HS") for a in DEFAULT_ALGORITHMS)
    assert load({"provider.algorithms": ["HS256"]}).provider.algorithms == ("HS256",)


@pytest.mark.parametrize("scopes", [["email", "profile"], [], ["OpenID"]])
def test_scopes_must_include_openid(scopes: list[str]) -> None:
    assert problems({"provider.scopes": scopes}) == ['provider.scopes: must include "openid"']


@pytest.mark.parametrize(
    ("method", "ok"),
    [("client_secret_basic", True), ("client_secret_post", True), ("private_key_jwt", False)],
)
def test_token_endpoint_auth(method: str, ok: bool) -> None:
    if ok:
        assert load({"provider.token_endpoint_auth": method}).provider.token_endpoint_auth == method
    else:
        assert problems({"provider.token_endpoint_auth": method}) == [
            "provider.token_endpoint_auth: must be one of 'client_secret_basic' or "
            "'client_secret_post'"
        ]


def test_an_empty_client_secret_is_an_error() -> None:
    assert problems({}, env={**ENV, "OIDC_CLIENT_SECRET": ""}) == [
        "provider.client_secret: must not be empty"
    ]


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "allow",
    [{}, {"groups": []}, {"users": [], "emails": [], "email_domains": [], "claims": {}}],
)
def test_allow_without_rules_is_an_error(allow: dict[str, object]) -> None:
    assert problems({"routes.1.allow": allow}) == [
        "routes[1].allow: names no rule, so it would admit nobody; list users, emails, "
        "email_domains, groups or claims, or remove allow to admit every signed-in user"
    ]


def test_a_route_without_allow_admits_every_signed_in_user() -> None:
    route = load({"routes.1.allow": DELETE}).routes[1]
    assert route.allow is None
    assert route.auth == "required"


def test_each_kind_of_allow_rule() -> None:
    allow = {
        "users": ["alice"],
        "emails": ["bob@example.org"],
        "email_domains": ["Example.COM"],
        "groups": ["eng"],
        "claims": {"department": ["eng", 7, True]},
    }
    rules = load({"routes.1.allow": allow}).routes[1].allow
    assert isinstance(rules, AllowConfig)  # the one-mapping form
    assert rules.users == ("alice",)
    assert rules.emails == ("bob@example.org",)
    assert rules.email_domains == ("example.com",)
    assert rules.groups == ("eng",)
    # Types are kept: the policy never coerces "true" to True.
    assert [type(v) for v in rules.claims["department"]] == [str, int, bool]


def test_a_public_route_cannot_have_allow_rules() -> None:
    assert problems({"routes.0.allow": {"groups": ["eng"]}}) == [
        "routes[0]: a public route admits everyone; remove allow or set auth: required"
    ]


def test_duplicate_route_names() -> None:
    assert problems({"routes.1.name": "static"}) == [
        "routes: route name 'static' is used twice (routes[0] and routes[1])"
    ]


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        (
            "http://127.0.0.1:8080/app",
            "must be an origin only (scheme, host and port), without a path",
        ),
        ("http://127.0.0.1:8080/?debug=1", "must not have a query or fragment"),
        ("http://127.0.0.1:8080#top", "must not have a query or fragment"),
        ("http://user:pw@127.0.0.1:8080", "must not contain credentials"),
        ("http://user@127.0.0.1:8080", "must not contain credentials"),
        ("ftp://127.0.0.1", "must be an http:// or https:// URL, got 'ftp://127.0.0.1'"),
        ("127.0.0.1:8080", "must be an http:// or https:// URL, got '127.0.0.1:8080'"),
        ("http://:8080", "must be an http:// or https:// URL, got 'http://:8080'"),
        ("http://127.0.0.1:99999", "has an invalid port"),
    ],
)
def test_bad_upstreams(upstream: str, message: str) -> None:
    assert problems({"routes.1.upstream": upstream}) == [f"routes[1].upstream: {message}"]


@pytest.mark.parametrize(
    ("upstream", "stored"),
    [
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
        ("https://grafana.internal", "https://grafana.internal"),
        ("http://[::1]:3000", "http://[::1]:3000"),
    ],
)
def test_upstreams(upstream: str, stored: str) -> None:
    assert load({"routes.1.upstream": upstream}).routes[1].upstream == stored


def test_methods_are_upper_cased_and_none_means_any() -> None:
    config = load({"routes.1.match.methods": ["get", "Post"]})
    assert config.routes[1].match.methods == ("GET", "POST")
    assert config.routes[0].match.methods is None
    assert problems({"routes.1.match.methods": []}) == [
        "routes[1].match.methods: must list at least one method, or be left out to match any"
    ]


def test_wildcard_hosts_are_lower_cased() -> None:
    assert load({"routes.1.match.host": "*.Apps.Example.com"}).routes[1].match.host == (
        "*.apps.example.com"
    )


# ---------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------


def test_trusted_proxies() -> None:
    config = load(
        {"server.trusted_proxies": ["10.0.0.0/8", "192.168.1.7", "fd00::/8", "10.1.2.3/16"]}
    )
    assert config.server.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.7/32"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("10.1.0.0/16"),  # host bits are dropped, not an error
    )
    assert load().server.trusted_proxies == ()


@pytest.mark.parametrize(
    ("proxies", "expected"),
    [
        (["10.0.0.0/8", "bad"], "server.trusted_proxies[1]: 'bad' is not an IP address or CIDR"),
        (["10.0.0.0/33"], "server.trusted_proxies[0]: '10.0.0.0/33' is not an IP address or CIDR"),
        (
            ["proxy.internal"],
            "server.trusted_proxies[0]: 'proxy.internal' is not an IP address or CIDR",
        ),
        ("10.0.0.0/8", "server.trusted_proxies: must be a list"),
    ],
)
def test_bad_trusted_proxies(proxies: object, expected: str) -> None:
    assert problems({"server.trusted_proxies": proxies}) == [expected]


def test_defaults() -> None:
    config = load()
    assert config.server.listen_address == ("0.0.0.0", 4180)
    assert config.server.prefix == "/oauth2"
    assert config.server.public_url is None
    assert config.session.store == "redis"
    assert config.session.cookie.secure is True
    assert config.session.cookie.samesite == "lax"
    assert config.provider.scopes == ("openid", "email", "profile")
    assert config.provider.token_endpoint_auth == "client_secret_basic"
    assert config.routes[1].auth == "required"
    assert config.routes[1].pass_access_token is False
    assert config.logging.format == "json"


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("owner", "attribute", "value"),
    [
        ("config", "version", 2),
        ("server", "listen", "0.0.0.0:1"),
        ("provider", "client_id", "other"),
        ("cookie", "secure", False),
        ("route", "upstream", "http://evil.example"),
        ("allow", "groups", ("everyone",)),
    ],
)
def test_the_model_is_frozen(owner: str, attribute: str, value: object) -> None:
    config = load()
    allow = config.routes[1].allow
    objects: dict[str, object] = {
        "config": config,
        "server": config.server,
        "provider": config.provider,
        "cookie": config.session.cookie,
        "route": config.routes[1],
        "allow": allow,
    }
    with pytest.raises(ValidationError, match="frozen"):
        setattr(objects[owner], attribute, value)
    # Lists become tuples, so they cannot be changed in place either.
    assert isinstance(config.routes, tuple)
    assert isinstance(allow, AllowConfig)
    assert isinstance(allow.groups, tuple)


def test_secrets_stay_out_of_repr() -> None:
    redis_password = "redis-pass-4711"
    config = load({"session.redis_url": f"redis://:{redis_password}@redis.internal:6379/0"})
    for text in (repr(config), str(config), repr(config.provider), repr(config.session)):
        assert CLIENT_SECRET not in text
        assert KEY_STD not in text
        assert redis_password not in text
    assert "**********" in repr(config.provider)
    # The values are still there for the code that needs them.
    assert config.provider.client_secret.get_secret_value() == CLIENT_SECRET
    assert config.session.keys[0].get_secret_value() == KEY_STD
    assert redis_password in config.session.redis_url


# ---------------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "version: 1\nserver:\n  listen: [a, b\nprovider: x\n",
            "YAML syntax error at line 4, column 9: expected ',' or ']', but got ':'",
        ),
        (
            "version: 1\nserver:\n  listen: a\n   prefix: b\n",
            "YAML syntax error at line 4, column 10: mapping values are not allowed here",
        ),
        (
            "version: 1\n\tserver: {}\n",
            "YAML syntax error at line 2, column 1: found character '\\t' that cannot start any "
            "token",
        ),
        (
            # PyYAML would keep the second allow and drop the first's rules without a word.
            "routes:\n  - name: a\n    allow: {groups: [a]}\n    allow: {groups: [b]}\n",
            "YAML syntax error at line 4, column 5: key 'allow' is given twice",
        ),
        (
            "version: 1\n---\nversion: 1\n",
            "YAML syntax error at line 2, column 1: expected a single document in the stream, "
            "but found another document",
        ),
    ],
    ids=["unclosed-list", "bad-indent", "tab", "duplicate-key", "two-documents"],
)
def test_yaml_syntax_errors_give_line_and_column(text: str, expected: str) -> None:
    assert text_problems(text) == [expected]


def test_yaml_merge_keys_may_override() -> None:
    text = """\
version: 1
provider:
  issuer: "https://idp.example.com"
  client_id: gateway
  client_secret: "${OIDC_CLIENT_SECRET}"
session: {keys: ["${SESSION_KEY}"]}
routes:
  - &app {name: a, upstream: "http://127.0.0.1:8080", timeout: 10s}
  - <<: *app
    name: b
    match: {path: /b}
"""
    config = load_config(text, ENV)
    assert [(r.name, r.timeout) for r in config.routes] == [("a", 10.0), ("b", 10.0)]


def test_yaml_is_loaded_safely() -> None:
    found = text_problems("version: !!python/object/apply:os.system ['true']\n")
    assert len(found) == 1
    assert found[0].startswith("YAML syntax error at line 1, column 10: ")


@pytest.mark.parametrize(
    "text", ["", "# only a comment\n", "- version: 1\n", "just a string\n", "42\n", "null\n"]
)
def test_the_config_must_be_a_mapping(text: str) -> None:
    assert text_problems(text) == ["the config must be a YAML mapping (key: value)"]


# ---------------------------------------------------------------------------------------------
# JSON Schema
# ---------------------------------------------------------------------------------------------


def test_json_schema() -> None:
    schema = json.loads(json.dumps(json_schema()))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object"
    assert list(schema["properties"]) == [
        "version",
        "server",
        "provider",
        "session",
        "default_policy",
        "routes",
        "logging",
        "headers",
        "assertion",
        "admin",
    ]
    assert set(schema["required"]) == {"version", "provider", "session", "routes"}
    # extra="forbid" reaches editors too: every object rejects unknown keys.
    for name, definition in schema["$defs"].items():
        assert definition.get("additionalProperties") is False, name


@pytest.mark.parametrize(
    ("model", "field"),
    [
        ("SessionConfig", "lifetime"),
        ("SessionConfig", "idle_timeout"),
        ("ServerConfig", "keepalive_timeout"),
        ("ProviderConfig", "leeway"),
        ("RouteConfig", "timeout"),
    ],
)
def test_json_schema_describes_durations_as_string_or_number(model: str, field: str) -> None:
    prop = json_schema()["$defs"][model]["properties"][field]
    types = {option["type"] for option in prop["anyOf"]}
    assert types == {"string", "number"}
    pattern = next(o["pattern"] for o in prop["anyOf"] if o["type"] == "string")
    for good in ("12h", "1h30m", "500ms", "45", "2.5", "7d"):
        assert re.search(pattern, good), good
    for bad in ("12x", "h", "-5s", "nan", ""):
        assert not re.search(pattern, bad), bad


def test_json_schema_marks_secrets_write_only() -> None:
    defs = json_schema()["$defs"]
    assert defs["ProviderConfig"]["properties"]["client_secret"]["writeOnly"] is True
    assert defs["SessionConfig"]["properties"]["keys"]["items"]["writeOnly"] is True
