"""Claims that are not where or what a gateway expects, as real providers send them.

Each case drives a real gateway process through a real login against the adversarial
provider, scripted to reproduce one provider's quirk, and then opens routes whose rules
depend on it: Keycloak's roles in the access token (used only once its signature, issuer and
``azp`` check out), claim paths with literal keys (``resource_access["my.app"]``,
``cognito:groups``), ``email_verified: "false"``, scalar and broken groups claims, Entra's
``xms_edov`` and group overage (Microsoft Graph, paged, on its configured origin only),
Google's ``hd`` and Okta's 100-group cap. Every quirk has a case where it admits and one
where it must not: groups that cannot be had make every rule on groups fail closed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from joserfc.jwk import Key, RSAKey

from tests.adversarial.provider import DROP, SUB, AdversarialProvider, Script
from tests.adversarial.world import (
    HTML,
    SESSION_COOKIE,
    Lab,
    World,
    assert_rejected,
    jar_has,
    new_browser,
    running_lab,
    sign_in,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.redis]

UNAVAILABLE = "group membership is unavailable"
EMAIL = "alice@example.test"
ROLES_PATH = 'resource_access["my.app"].roles'


@dataclass(frozen=True)
class Keys:
    r1: RSAKey  # the provider's published key
    r3: RSAKey  # never published: the attacker's


@pytest.fixture(scope="module")
def keys() -> Keys:
    def rsa(kid: str) -> RSAKey:
        return RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig"})

    return Keys(rsa("r1"), rsa("r3"))


def claims_world(
    lab: Lab,
    name: str,
    keys: list[Key],
    claims: dict[str, Any],
    extra: Callable[[AdversarialProvider], dict[str, Any]] | None = None,
) -> AbstractAsyncContextManager[World]:
    """A gateway whose ``provider.claims`` are ``claims`` (userinfo off: every claim comes
    from the tokens the script shapes), with the routes of :func:`routes`."""

    def adjust(provider: AdversarialProvider, config: dict[str, Any]) -> None:
        config["provider"].update(
            {"claims": claims, "userinfo": False, **(extra(provider) if extra else {})}
        )
        config["routes"] = routes(lab.upstream.url)

    return lab.world(name, keys, adjust=adjust)


def routes(upstream: str) -> list[dict[str, Any]]:
    def route(name: str, path: str, **rules: Any) -> dict[str, Any]:
        return {"name": name, "match": {"path": path}, "upstream": upstream, **rules}

    return [
        route("open", "/open/"),
        route("group", "/group/", allow=[{"groups": ["eng"]}]),
        route("deny", "/deny/", deny=[{"groups": ["contractors"]}]),
        route("mail", "/mail/", allow=[{"emails": [EMAIL]}]),
        route("domain", "/domain/", allow=[{"email_domains": ["example.test"]}]),
        route("role", "/role/", allow=[{"claims": {ROLES_PATH: ["editor"]}}]),
        route("app", "/"),
    ]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(peer_info: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Lab]:
    async with running_lab(peer_info, tmp_path_factory.mktemp("claims")) as lab:
        yield lab


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def keycloak_world(lab: Lab, keys: Keys) -> AsyncIterator[World]:
    claims = {"groups": ROLES_PATH, "groups_from": ["access_token"]}
    async with claims_world(lab, "keycloak", [keys.r1], claims) as world:
        yield world


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cognito_world(lab: Lab, keys: Keys) -> AsyncIterator[World]:
    claims = {"groups": '["cognito:groups"]', "user": '["cognito:username"]'}
    async with claims_world(lab, "cognito", [keys.r1], claims) as world:
        yield world


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def entra_world(lab: Lab, keys: Keys) -> AsyncIterator[World]:
    claims = {"email_verified": "xms_edov", "groups_overage": "graph"}
    async with claims_world(
        lab, "entra", [keys.r1], claims, extra=lambda p: {"graph_url": p.issuer}
    ) as world:
        yield world


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def workspace_world(lab: Lab, keys: Keys) -> AsyncIterator[World]:
    """Google's hosted domain and Okta's groups cap, in one gateway (they are independent)."""
    claims = {"hosted_domain": "hd", "groups_cap": 100}
    async with claims_world(lab, "workspace", [keys.r1], claims) as world:
        yield world


def _fresh(world: World, script: Script) -> World:
    world.provider.reset()
    world.provider.script = script
    world.provider.calls.clear()  # counts per test
    return world


# ---------------------------------------------------------------------------------------------
# A signed-in browser and what it may open
# ---------------------------------------------------------------------------------------------


@dataclass
class Visit:
    status: int
    text: str
    headers: dict[str, str]  # what the upstream received, lower-cased names (200 only)


async def signed_in(world: World, browser: aiohttp.ClientSession) -> None:
    """Sign in through a route without rules; the login itself must succeed."""
    walk = await sign_in(world, browser, "/open/start")
    trace = [(h.status, h.url) for h in walk.hops]
    assert [h.status for h in walk.hops] == [302, 302, 302, 200], (trace, walk.page[:2000])
    assert jar_has(browser, SESSION_COOKIE)


async def visit(world: World, browser: aiohttp.ClientSession, path: str) -> Visit:
    async with browser.get(world.gateway.url + path, headers=HTML, allow_redirects=False) as resp:
        text = await resp.text()
        headers: dict[str, str] = {}
        if resp.status == 200:
            headers = {k.lower(): v for k, v in json.loads(text)["headers"]}
        return Visit(resp.status, text, headers)


async def login_and_visit(world: World, *paths: str) -> dict[str, Visit]:
    async with new_browser() as browser:
        await signed_in(world, browser)
        return {path: await visit(world, browser, path) for path in paths}


def assert_unavailable(seen: Visit) -> None:
    """403 with the reason on the page: not a missing group, missing membership data."""
    assert seen.status == 403, seen.text[:500]
    assert UNAVAILABLE in seen.text, seen.text[:2000]


# ---------------------------------------------------------------------------------------------
# Keycloak: roles in the access token, used only once it is proven
# ---------------------------------------------------------------------------------------------

KEYCLOAK_ROLES = {"resource_access": {"my.app": {"roles": ["eng", "editor"]}}}


async def test_keycloak_roles_from_a_valid_access_token_admit(keycloak_world: World) -> None:
    world = _fresh(keycloak_world, Script(login_access_token=KEYCLOAK_ROLES))
    seen = await login_and_visit(world, "/group/x", "/deny/x", "/open/x")
    assert seen["/group/x"].status == 200
    assert seen["/group/x"].headers["x-forwarded-groups"] == "eng,editor"
    assert seen["/deny/x"].status == 200
    # The ID token's own claims are not replaced by the access token's.
    assert seen["/open/x"].headers["x-forwarded-user"] == SUB


@pytest.mark.parametrize(
    ("script", "log_says"),
    [
        pytest.param(
            Script(login_access_token=KEYCLOAK_ROLES, login_access_signature="corrupt"),
            "signature is invalid",
            id="bad-signature",
        ),
        pytest.param(
            Script(login_access_token={**KEYCLOAK_ROLES, "azp": "another-client"}),
            "another client",
            id="other-azp",
        ),
        pytest.param(
            Script(login_access_token={**KEYCLOAK_ROLES, "iss": "https://evil.test"}),
            "another issuer",
            id="other-issuer",
        ),
        pytest.param(
            Script(login_access_token={**KEYCLOAK_ROLES, "exp": lambda now: now - 3600}),
            "expired",
            id="expired",
        ),
        pytest.param(Script(login_access_token=None), "not a signed JWT", id="opaque"),
    ],
)
async def test_keycloak_roles_from_an_unproven_access_token_fail_closed(
    keycloak_world: World, keys: Keys, script: Script, log_says: str
) -> None:
    """The login still works (the ID token is fine), but the roles are unavailable: the
    allow rule on groups refuses, the deny rule on groups refuses too, and the user is told
    why; the access token is never logged."""
    world = _fresh(keycloak_world, script)
    seen = await login_and_visit(world, "/group/x", "/deny/x", "/open/x")
    assert_unavailable(seen["/group/x"])
    assert_unavailable(seen["/deny/x"])
    assert seen["/open/x"].status == 200
    assert "x-forwarded-groups" not in seen["/open/x"].headers
    logs = world.gateway.logs()
    assert log_says in logs
    assert "group membership unavailable" in logs  # the audit line's decision reason
    for token in world.provider.issued:
        assert token not in logs


async def test_keycloak_access_token_signed_by_an_unknown_key_fails_closed(
    keycloak_world: World, keys: Keys
) -> None:
    world = _fresh(
        keycloak_world, Script(login_access_token=KEYCLOAK_ROLES, login_access_key=keys.r3)
    )
    seen = await login_and_visit(world, "/group/x")
    assert_unavailable(seen["/group/x"])


@pytest.mark.parametrize(
    ("roles_claim", "status"),
    [
        pytest.param(
            {"resource_access": {"my.app": {"roles": ["editor"]}}}, 200, id="literal-dotted-key"
        ),
        # The same words split at the dot are another claim: it must not match.
        pytest.param(
            {"resource_access": {"my": {"app": {"roles": ["editor"]}}}}, 403, id="split-at-the-dot"
        ),
        pytest.param({"resource_access": {"my.app": {"roles": "editor"}}}, 200, id="scalar-role"),
    ],
)
async def test_claim_rule_paths_with_literal_keys(
    keycloak_world: World, roles_claim: dict[str, Any], status: int
) -> None:
    world = _fresh(keycloak_world, Script(claims=roles_claim, login_access_token=KEYCLOAK_ROLES))
    seen = await login_and_visit(world, "/role/x")
    assert seen["/role/x"].status == status


# ---------------------------------------------------------------------------------------------
# Cognito: cognito:groups, string booleans, scalar and broken groups, a missing sub
# ---------------------------------------------------------------------------------------------


def cognito(**claims: Any) -> Script:
    return Script(claims={"cognito:username": "alice", "email": EMAIL, **claims})


async def test_cognito_groups_claim_with_a_colon(cognito_world: World) -> None:
    world = _fresh(cognito_world, cognito(**{"cognito:groups": ["eng", "ops"]}))
    seen = await login_and_visit(world, "/group/x", "/deny/x")
    assert seen["/group/x"].status == 200
    assert seen["/group/x"].headers["x-forwarded-groups"] == "eng,ops"
    assert seen["/group/x"].headers["x-forwarded-user"] == "alice"
    assert seen["/deny/x"].status == 200


async def test_cognito_groups_nested_under_cognito_is_another_claim(cognito_world: World) -> None:
    world = _fresh(cognito_world, cognito(cognito={"groups": ["eng"]}))
    seen = await login_and_visit(world, "/group/x")
    assert seen["/group/x"].status == 403
    assert UNAVAILABLE not in seen["/group/x"].text  # simply not a member


async def test_a_scalar_groups_claim_is_one_group(cognito_world: World) -> None:
    world = _fresh(cognito_world, cognito(**{"cognito:groups": "eng"}))
    seen = await login_and_visit(world, "/group/x")
    assert seen["/group/x"].status == 200
    assert seen["/group/x"].headers["x-forwarded-groups"] == "eng"


@pytest.mark.parametrize(
    "groups",
    [
        pytest.param(["eng", None], id="null-member"),
        pytest.param(["eng", 7], id="number-member"),
        pytest.param(["eng", {"name": "contractors"}], id="object-member"),
        pytest.param(None, id="null-claim"),
    ],
)
async def test_broken_groups_make_every_group_rule_fail_closed(
    cognito_world: World, groups: Any
) -> None:
    """ "eng" is there, yet the allow rule refuses: the member that is not a name could be
    the group a deny rule names. The deny rule refuses too; a route without rules admits,
    and no group header is sent."""
    world = _fresh(cognito_world, cognito(**{"cognito:groups": groups}))
    seen = await login_and_visit(world, "/group/x", "/deny/x", "/open/x")
    assert_unavailable(seen["/group/x"])
    assert_unavailable(seen["/deny/x"])
    assert seen["/open/x"].status == 200
    assert "x-forwarded-groups" not in seen["/open/x"].headers


@pytest.mark.parametrize(
    ("verified", "status"),
    [
        pytest.param("false", 403, id="string-false"),
        pytest.param("0", 403, id="string-zero"),
        pytest.param(0, 403, id="number-zero"),
        pytest.param(1, 403, id="number-one"),
        pytest.param(False, 403, id="false"),
        pytest.param("true", 200, id="string-true"),
        pytest.param(True, 200, id="true"),
    ],
)
async def test_email_verified_is_true_only_when_it_says_true(
    cognito_world: World, verified: Any, status: int
) -> None:
    world = _fresh(cognito_world, cognito(email_verified=verified))
    seen = await login_and_visit(world, "/mail/x", "/domain/x")
    assert seen["/mail/x"].status == status
    assert seen["/domain/x"].status == status
    if status == 403:
        assert UNAVAILABLE not in seen["/mail/x"].text


@pytest.mark.parametrize(
    "sub", [DROP, "", 12345, None], ids=["rp-id_token-sub-missing", "empty", "number", "null"]
)
async def test_an_id_token_without_sub_is_a_provider_configuration_error(
    cognito_world: World, sub: Any
) -> None:
    world = _fresh(cognito_world, cognito(sub=sub))
    async with new_browser() as browser:
        before = await world.snapshot()
        walk = await sign_in(world, browser)
        await assert_rejected(
            world, browser, walk, before, status=502, says="The sign-in service is misconfigured"
        )
        assert "no subject (sub)" in walk.page


# ---------------------------------------------------------------------------------------------
# Entra ID: xms_edov, and group overage resolved through Microsoft Graph
# ---------------------------------------------------------------------------------------------


def entra(world: World, **script: Any) -> Script:
    claims = {
        "preferred_username": "alice",
        "email": EMAIL,
        "xms_edov": True,
        "_claim_names": {"groups": "src1"},
        "_claim_sources": {"src1": {"endpoint": f"{world.provider.issuer}/claim-source"}},
    }
    claims.update(script.pop("claims", {}))
    return Script(claims=claims, **script)


@pytest.mark.parametrize(
    ("edov", "status"),
    [
        pytest.param(True, 200, id="verified"),
        pytest.param(False, 403, id="false"),
        pytest.param("false", 403, id="string-false"),
        pytest.param(DROP, 403, id="absent"),
    ],
)
async def test_entra_xms_edov_decides_whether_the_email_counts(
    entra_world: World, edov: Any, status: int
) -> None:
    """Entra's email claim is whatever the user's profile says (nOAuth): without
    xms_edov true, domain and address rules never admit."""
    world = _fresh(entra_world, Script())
    world.provider.script = entra(world, claims={"xms_edov": edov}, graph_groups=["eng"])
    seen = await login_and_visit(world, "/domain/x", "/mail/x")
    assert seen["/domain/x"].status == status
    assert seen["/mail/x"].status == status


async def test_entra_overage_groups_come_from_graph_once(entra_world: World) -> None:
    world = _fresh(entra_world, Script())
    world.provider.script = entra(world, graph_groups=["ops", "eng"])
    async with new_browser() as browser:
        await signed_in(world, browser)
        first = await visit(world, browser, "/group/x")
        again = await visit(world, browser, "/group/y")
        denied = await visit(world, browser, "/deny/x")
    assert first.status == 200
    assert first.headers["x-forwarded-groups"] == "ops,eng"  # no directory role among them
    assert again.status == 200
    assert denied.status == 200
    assert world.provider.calls["graph"] == 1  # resolved at login, kept in the session
    assert world.provider.calls["claim_source"] == 0  # the URL in the token is never called


async def test_entra_hasgroups_is_an_overage_too(entra_world: World) -> None:
    world = _fresh(entra_world, Script())
    world.provider.script = entra(
        world,
        claims={"_claim_names": DROP, "_claim_sources": DROP, "hasgroups": True},
        graph_groups=["eng"],
    )
    seen = await login_and_visit(world, "/group/x")
    assert seen["/group/x"].status == 200
    assert world.provider.calls["graph"] == 1


async def test_entra_overage_follows_graph_paging(entra_world: World) -> None:
    world = _fresh(entra_world, Script())
    groups = [f"group-{i:03d}" for i in range(249)] + ["eng"]
    world.provider.script = entra(world, graph_groups=groups, graph_page_size=100)
    seen = await login_and_visit(world, "/group/x")
    assert seen["/group/x"].status == 200  # "eng" is on the third page
    assert seen["/group/x"].headers["x-forwarded-groups"].endswith(",eng")
    assert world.provider.calls["graph"] == 3


async def test_entra_overage_next_link_off_the_graph_origin_is_not_followed(
    entra_world: World,
) -> None:
    """A nextLink on another origin (here: the same server under another host name, so a
    call would be counted) is not followed: the groups are unavailable, rules fail closed."""
    world = _fresh(entra_world, Script())
    port = world.provider.issuer.rsplit(":", 1)[1]
    world.provider.script = entra(
        world,
        graph_groups=[f"g{i}" for i in range(150)] + ["eng"],
        graph_page_size=100,
        graph_next_origin=f"http://localhost:{port}",
    )
    seen = await login_and_visit(world, "/group/x", "/deny/x", "/open/x")
    assert world.provider.calls["graph"] == 1
    assert_unavailable(seen["/group/x"])
    assert_unavailable(seen["/deny/x"])
    assert seen["/open/x"].status == 200
    assert "leaves provider.graph_url" in world.gateway.logs()


@pytest.mark.parametrize(
    "graph",
    [
        pytest.param({"graph_status": 503}, id="graph-down"),
        pytest.param({"graph_status": 403}, id="graph-forbidden"),
        pytest.param({"graph_groups": None}, id="graph-404"),
    ],
)
async def test_entra_overage_with_graph_failing_denies_group_rules(
    entra_world: World, graph: dict[str, Any]
) -> None:
    world = _fresh(entra_world, Script())
    world.provider.script = entra(world, **{"graph_groups": ["eng"], **graph})
    seen = await login_and_visit(world, "/group/x", "/deny/x", "/open/x", "/domain/x")
    assert_unavailable(seen["/group/x"])
    assert_unavailable(seen["/deny/x"])
    assert seen["/open/x"].status == 200
    assert seen["/domain/x"].status == 200  # rules that do not mention groups still decide
    logs = world.gateway.logs()
    assert "group overage not resolved" in logs
    assert "group membership unavailable" in logs
    for token in world.provider.issued:
        assert token not in logs


async def test_entra_without_overage_groups_are_just_empty(entra_world: World) -> None:
    """The control: no groups and no overage is an ordinary user without groups."""
    world = _fresh(entra_world, Script())
    world.provider.script = entra(world, claims={"_claim_names": DROP, "_claim_sources": DROP})
    seen = await login_and_visit(world, "/group/x", "/deny/x")
    assert seen["/group/x"].status == 403
    assert UNAVAILABLE not in seen["/group/x"].text
    assert seen["/deny/x"].status == 200
    assert world.provider.calls["graph"] == 0


# ---------------------------------------------------------------------------------------------
# Google: hd for Workspace domain rules; Okta: the 100-group cap
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hd", "status"),
    [
        pytest.param("example.test", 200, id="workspace-domain"),
        pytest.param("EXAMPLE.test", 200, id="domain-case"),
        pytest.param(DROP, 403, id="personal-account"),
        pytest.param("other.test", 403, id="other-workspace"),
    ],
)
async def test_google_hd_must_vouch_for_the_email_domain(
    workspace_world: World, hd: Any, status: int
) -> None:
    """A verified address at example.test from a personal account is not example.test's
    Workspace: only hd says so. The exact-address rule does not depend on hd."""
    world = _fresh(
        workspace_world, Script(claims={"email": EMAIL, "email_verified": True, "hd": hd})
    )
    seen = await login_and_visit(world, "/domain/x", "/mail/x")
    assert seen["/domain/x"].status == status
    assert seen["/mail/x"].status == 200


async def test_okta_groups_at_the_cap_make_deny_rules_fail_closed(workspace_world: World) -> None:
    groups = ["eng"] + [f"team-{i:02d}" for i in range(99)]
    world = _fresh(workspace_world, Script(claims={"groups": groups}))
    seen = await login_and_visit(world, "/group/x", "/deny/x")
    assert seen["/group/x"].status == 200  # a group that is there still admits
    assert seen["/deny/x"].status == 403  # "contractors" may be among the cut ones
    logs = world.gateway.logs()
    assert "may be truncated" in logs
    assert "possibly truncated" in logs  # the deny decision's reason


async def test_okta_groups_below_the_cap_are_complete(workspace_world: World) -> None:
    groups = ["eng"] + [f"team-{i:02d}" for i in range(98)]
    world = _fresh(workspace_world, Script(claims={"groups": groups}))
    marker = len(world.gateway.logs())
    seen = await login_and_visit(world, "/group/x", "/deny/x")
    assert seen["/group/x"].status == 200
    assert seen["/deny/x"].status == 200
    assert "may be truncated" not in world.gateway.logs()[marker:]
