"""Fuzz targets for the config loader: whatever the file holds, ``oidc-gateway check`` and
``run`` answer with the list of problems (ConfigError, exit 2), never a traceback; and a config
that passes ``check`` builds the tables ``run`` needs.

Inputs: arbitrary text; YAML assembled from YAML's own syntax and the config's vocabulary
(anchors, merge keys, tags, flow and block collections, tricky scalars such as ``.nan``,
``0x1f``, huge integers and dates, ``${ENV}`` references); deep nesting; arbitrary JSON-like
structures; and the valid example config with one or two values replaced by anything.
Hypothesis drives them (no atheris: its coverage feedback needs a specially built CPython on
3.11 and would not add a bounded CI run), bounded by the profile in conftest.py.
"""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.config import Config, load_config, parse_config
from gateway.errors import ConfigError
from gateway.headers import HeaderPolicy
from gateway.routing import RouteTable

KEY = base64.b64encode(bytes(range(32))).decode()
ENV = {"OIDC_CLIENT_SECRET": "s3cret", "SESSION_KEY": KEY, "EMPTY": ""}

BASE: dict[str, Any] = {
    "version": 1,
    "server": {"listen": "127.0.0.1:4180", "trusted_proxies": ["10.0.0.0/8"]},
    "provider": {
        "issuer": "https://idp.example.com/realms/corp",
        "client_id": "gateway",
        "client_secret": "${OIDC_CLIENT_SECRET}",
    },
    "session": {"store": "memory", "keys": ["${SESSION_KEY}"]},
    "routes": [
        {
            "name": "static",
            "match": {"host": "app.example.com", "path": "/static/"},
            "upstream": "http://127.0.0.1:8080",
            "auth": "public",
        },
        {
            "name": "app",
            "match": {"path": "/", "methods": ["GET", "POST"]},
            "upstream": "http://127.0.0.1:8080",
            "allow": {"groups": ["eng"]},
        },
    ],
}

KEYS = [
    "version", "server", "listen", "public_url", "trusted_proxies", "prefix", "strip_headers",
    "provider", "issuer", "client_id", "client_secret", "scopes", "claims", "algorithms",
    "session", "store", "redis_url", "keys", "cookie", "name", "secure", "lifetime",
    "routes", "match", "host", "path", "methods", "upstream", "auth", "allow", "groups",
    "users", "emails", "email_domains", "timeout", "logging", "level", "alow", "<<", "",
]
SCALARS = [
    "1", "0", "-1", "1.5", ".nan", ".NaN", ".inf", "-.inf", "0x1f", "0o17", "0b101", "1_000",
    "1e999", "9" * 5000, "-" + "9" * 5000, "0x" + "f" * 5000, "1:30", "190:20:30",
    "2001-12-14", "2001-12-14t21:59:43.10-05:00", "~", "null", "true", "yes", "no", "on",
    "off", "y", "n", "''", '""', '"\\ud800"', '"\\x00"', '"\\u2028"', "'a''b'", "|", ">-",
    "!!binary aGVsbG8=", "!!python/object/apply:os.system ['true']", "!!set {a, b}",
    "!!omap [a: 1]", "!!omap [1]", "!!timestamp x", "!!int x", "!!int ''", "!!int 0b",
    "!!bool x", "!!float x", '!!float ""', "!!null x", "!!str", "!custom x", "&a 1",
    "*a", "*undefined", "${SESSION_KEY}", "${NOPE}", "${EMPTY:-d}", "${X:y}", "${", "$$",
    "$${SESSION_KEY}", "http://127.0.0.1:8080", "https://[::1", "redis://:p@h/0", "/",
    "/..;/", "/.;x/", "/a/..;", "/%2e", "/\\", "*.example.com", "*", "X-Auth-*", "12h",
    "1h30m", "0s", "500ms", "1e3", "[", "]", "{", "}", "[1, [2, [3]]]", "{a: {b: {c: 1}}}",
    "? [a]", "? {a: 1}", ":", "- - -", "---", "...", "#", "%YAML 1.1", "%TAG ! x", "\t",
    "\ufeff", "\x85", "é",
]


@st.composite
def yaml_document(draw: st.DrawFn, depth: int = 0) -> str:
    """Block-style YAML lines: keys from the config's vocabulary, values from tricky scalars,
    nested mappings and sequences, anchors and merge keys."""
    lines: list[str] = []
    indent = "  " * depth
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["scalar", "map", "seq", "raw", "anchor", "merge"]))
        k = draw(st.sampled_from(KEYS))
        if kind == "scalar":
            lines.append(f"{indent}{k}: {draw(st.sampled_from(SCALARS))}")
        elif kind == "map" and depth < 4:
            lines.append(f"{indent}{k}:")
            lines.append(draw(yaml_document(depth + 1)))
        elif kind == "seq" and depth < 4:
            lines.append(f"{indent}{k}:")
            for _ in range(draw(st.integers(0, 3))):
                lines.append(f"{indent}  - {draw(st.sampled_from(SCALARS))}")
        elif kind == "anchor":
            lines.append(f"{indent}{k}: &a {{x: 1}}")
        elif kind == "merge":
            lines.append(f"{indent}<<: *a")
        else:
            lines.append(indent + draw(st.text(max_size=20)))
    return "\n".join(lines)


def valid_yaml() -> str:
    return yaml.safe_dump(BASE, sort_keys=False)


@st.composite
def edited_yaml(draw: st.DrawFn) -> str:
    """The valid config's text with a line inserted, deleted or replaced by YAML-ish text."""
    lines = valid_yaml().splitlines()
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(lines)))
        how = draw(st.sampled_from(["insert", "delete", "replace"]))
        new = draw(st.one_of(
            st.builds(lambda i, k, v: f"{'  ' * i}{k}: {v}", st.integers(0, 4),
                      st.sampled_from(KEYS), st.sampled_from(SCALARS)),
            st.text(max_size=30),
        ))
        if how == "insert":
            lines.insert(at, new)
        elif lines and at < len(lines):
            if how == "delete":
                del lines[at]
            else:
                lines[at] = new
    return "\n".join(lines)


@st.composite
def deep_nesting(draw: st.DrawFn) -> str:
    """Flow or block nesting thousands deep: a recursion bomb for parser and validator alike."""
    n = draw(st.integers(1, 900))
    style = draw(st.sampled_from(["flow-seq", "flow-map", "block", "routes"]))
    if style == "flow-seq":
        return "[" * n + "]" * n
    if style == "flow-map":
        return "{a: " * n + "1" + "}" * n
    if style == "block":
        return "".join(f"{'  ' * i}a:\n" for i in range(min(n, 400))) + "  " * min(n, 400) + "1"
    return valid_yaml() + "\n" + "x: " + "[" * n + "]" * n


config_text = st.one_of(
    st.text(),
    yaml_document(),
    edited_yaml(),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
)


def check_and_build(text: str) -> Config | None:
    """What ``check`` and ``run`` do with a file: load it (a ConfigError is the one expected
    failure) and, when it loads, build the route table, header policy and keys."""
    try:
        config = load_config(text, ENV)
    except ConfigError as exc:
        error = exc
    else:
        build(config)
        return config
    assert error.problems, "a ConfigError must name at least one problem"
    return None


def build(config: Config) -> None:
    """The pure parts ``run`` builds from a config; each must accept what ``check`` passed."""
    RouteTable(config.routes)
    HeaderPolicy(
        strip_patterns=config.server.strip_headers,
        own_cookie_name=config.session.cookie.name,
    )
    assert config.session.key_bytes
    config.server.listen_address  # noqa: B018 - parsing it is the check


FUZZ = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(config_text)
@example("version: 1\nx: " + "9" * 5000)
@example("version: 1\nx: 2001-13-45")
@example("a: !!timestamp x\nb: !!bool x\nc: !!int ''\nd: !!int 0x\ne: !!float ''")
@example("a: !!omap [1]")
@example("a: !!python/object/apply:os.system ['true']")
@example("? [a]\n: 1")
@example("version: 1\nversion: 1")
@example(valid_yaml().replace("path: /static/", "path: /..;/static/"))
@example(valid_yaml().replace("path: /static/", "path: /.;v=1/"))
def test_load_config_raises_nothing_but_config_error(text: str) -> None:
    check_and_build(text)


# Each deep document costs up to ~0.2 s (PyYAML recurses until Python stops it, at about 450
# levels), so this
# target runs a thirtieth of the profile's examples.
@settings(
    parent=FUZZ, max_examples=max(5, settings().max_examples // 30)
)
@given(deep_nesting())
@example("[" * 2000 + "]" * 2000)
@example("{a: " * 3000 + "1" + "}" * 3000)
def test_deeply_nested_config_is_a_config_error(text: str) -> None:
    check_and_build(text)


# JSON-like structures: what yaml.safe_load or json.loads could hand to parse_config.
json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
    st.sampled_from(SCALARS),
)
json_like = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=5)), inner,
                        max_size=4),
    ),
    max_leaves=25,
)


@st.composite
def mutated_config(draw: st.DrawFn) -> dict[str, Any]:
    """The valid config with one or two values anywhere in it replaced by anything, or a key
    added or removed."""
    data = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 2))):
        node: Any = data
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            k = draw(st.sampled_from(keys))
            child = node[k]
            if isinstance(child, dict | list) and child and draw(st.booleans()):
                node = child
                continue
            how = draw(st.sampled_from(["replace", "delete", "add"]))
            if how == "replace":
                node[k] = draw(json_like)
            elif how == "delete" and isinstance(node, dict):
                del node[k]
            elif isinstance(node, dict):
                node[draw(st.sampled_from(KEYS))] = draw(json_like)
            else:
                node.append(draw(json_like))
            break
    return data


PATH_PIECES = ["", ".", "..", "..;", ".;x", ";", "a", "é", "%2e", "\\", "?", "#", " ", "\t", "~"]


@st.composite
def route_variants(draw: st.DrawFn) -> dict[str, Any]:
    """The valid config with the values the router and header policy compile at start-up
    (match path, host and methods, strip_headers, cookie name) drawn near their validity line:
    the path always, one other value at a time (so that most configs still load)."""
    data = copy.deepcopy(BASE)
    match = data["routes"][0]["match"]
    match["path"] = "/" + "/".join(draw(st.lists(
        st.lists(st.sampled_from(PATH_PIECES), max_size=3).map("".join), max_size=4
    )))
    which = draw(st.sampled_from(["host", "methods", "strip", "cookie", None]))
    if which == "host":
        match["host"] = draw(st.sampled_from([
            "*.example.com", "*.", "*", "APP.example.com", "app.example.com.", "-a.example.com",
            "a_b.example.com", "[::1]", "127.0.0.1", "xn--bcher-kva.example", "a..b",
        ]))
    elif which == "methods":
        data["routes"][1]["match"]["methods"] = draw(st.lists(
            st.sampled_from(["GET", "get", "HEAD", "PROPFIND", "", "*"]), max_size=3
        ))
    elif which == "strip":
        data["server"]["strip_headers"] = draw(st.lists(
            st.sampled_from(["X-Auth-*", "*", "-*", "_*", "X_Y", "a b", "Remote-User", ""]),
            max_size=3,
        ))
    elif which == "cookie":
        data["session"]["cookie"] = {
            "name": draw(st.sampled_from(["_gw", "", "a;b", "x" * 65, "__Host-x"]))
        }
    return data


@FUZZ
@given(st.one_of(json_like, mutated_config(), route_variants()))
@example({"version": 1, 1: 2, None: 3, False: 4, 2.5: 5})
@example({**BASE, "routes": [{**BASE["routes"][1], "match": {"path": "/..;/"}}]})
def test_parse_config_of_any_structure_raises_nothing_but_config_error(data: Any) -> None:
    """What a YAML or JSON parser can produce is a Config or a ConfigError; and an accepted
    config builds. The same structure written as JSON text (YAML's flow style) does too."""
    try:
        build(parse_config(data, ENV))
    except ConfigError as exc:
        error: ConfigError | None = exc
    else:
        error = None
    assert error is None or error.problems
    try:
        text = json.dumps(data)
    except (TypeError, ValueError):  # NaN/inf are fine JSON for Python, non-str keys are not
        return
    check_and_build(text)
