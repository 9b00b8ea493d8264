"""Provider presets against the adversarial provider: each quirk, accepted in its exact shape
and refused one step beyond it.

Each world is a profile of the provider (``provider.py``) reproducing one real provider's
habit, in front of a real gateway process with that provider's ``preset``:

* Auth0: discovery and tokens spell the issuer with a trailing slash the config leaves out.
* Google: ID tokens whose ``iss`` has no scheme (accepted under ``preset: google`` only).
* Entra multi-tenant: discovery at ``/organizations/v2.0`` publishing the ``{tenantid}``
  template; each token's ``iss`` names its own ``tid``.
* Keycloak behind a cluster-internal URL: a second port stands for the internal Service; the
  gateway's own calls go there while the browser and the tokens keep the public issuer.
* Okta: an org authorization server (issuer = the origin) and a custom one
  (``/oauth2/default``) on the same host; neither's tokens pass for the other's.
* Refresh answers without a new refresh token, without an ID token, or for another ``sub``.

Acceptance and rejection are asserted in full by :mod:`tests.adversarial.world` (no session,
no cookie, nothing forwarded on a refusal).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import pytest_asyncio
from joserfc.jwk import RSAKey

from tests.adversarial.provider import DROP, SUB, AdversarialProvider, Script
from tests.adversarial.world import (
    CLIENT_ID,
    CLIENT_SECRET,
    HTML,
    START_PATH,
    Lab,
    World,
    assert_accepted,
    assert_rejected,
    new_browser,
    running_lab,
    sign_in,
)
from tests.support.gateway_proc import free_port, gateway_config, start_gateway

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.redis]

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
OTHER_TENANT = "9188040d-6c67-4c5b-b112-36a304b66dad"
ProviderExtra = Callable[[AdversarialProvider], dict[str, Any]]


@dataclass
class PresetLab(Lab):
    key: RSAKey  # the one key every provider here signs with


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(
    peer_info: Any, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[PresetLab]:
    key = RSAKey.generate_key(2048, parameters={"kid": "p1", "use": "sig"})
    async with running_lab(peer_info, tmp_path_factory.mktemp("presets")) as base:
        yield PresetLab(base.upstream, base.redis, base.redis_port, base.directory, key)


def preset_world(
    lab: PresetLab,
    name: str,
    *,
    provider_extra: ProviderExtra,
    issuer: Callable[[AdversarialProvider], str] | None = None,
    session_extra: dict[str, Any] | None = None,
    **provider_options: Any,
) -> AbstractAsyncContextManager[World]:
    """A provider profile and a gateway configured for it. ``provider_extra`` and ``issuer``
    see the started provider (its port is only known then); the gateway's ``scopes`` are left
    to the preset."""

    def adjust(provider: AdversarialProvider, config: dict[str, Any]) -> None:
        config["provider"].update(provider_extra(provider))
        if issuer is not None:
            config["provider"]["issuer"] = issuer(provider)
        del config["provider"]["scopes"]
        config["session"].update(session_extra or {})

    return lab.world(name, [lab.key], adjust=adjust, **provider_options)


def _module_world(name: str, provider_extra: ProviderExtra, **options: Any) -> Any:
    @pytest_asyncio.fixture(scope="module", loop_scope="module")
    async def world(lab: PresetLab) -> AsyncIterator[World]:
        async with preset_world(lab, name, provider_extra=provider_extra, **options) as w:
            yield w

    return world


def _slash(p: AdversarialProvider) -> str:
    return p.issuer + "/"


def _template(p: AdversarialProvider) -> str:
    return p.issuer.replace("/organizations/", "/{tenantid}/")


def _origin(p: AdversarialProvider) -> str:
    parts = urlsplit(p.issuer)
    return f"{parts.scheme}://{parts.netloc}"


# The claims.user of the google and auth0 presets is the email; written back to the user name
# here so the common acceptance check (X-Forwarded-User: alice) applies: a written key wins.
_AS_ALICE = {"claims": {"user": "preferred_username"}}

generic_world = _module_world(
    "generic",
    lambda p: {"preset": "generic"},
    end_session=True,
    # Tokens that expire within refresh_before: every request refreshes first.
    session_extra={"refresh_before": "60s"},
)
google_world = _module_world(
    "google", lambda p: {"preset": "google", **_AS_ALICE}, end_session=True
)
auth0_world = _module_world("auth0", lambda p: {"preset": "auth0", **_AS_ALICE}, issuer_as=_slash)
entra_world = _module_world(
    "entra",
    lambda p: {"preset": "entra", "tenants": [TENANT]},
    issuer=_template,
    issuer_path="/organizations/v2.0",
    issuer_as=_template,
    iss_parameter_supported=False,  # as Entra: no RFC 9207 iss in the answer
)
split_world = _module_world(
    "split",
    lambda p: {"preset": "keycloak", "backchannel_url": p.internal_origin},
    internal_port=True,
    end_session=True,
)
okta_custom_world = _module_world(
    "okta-custom", lambda p: {"preset": "okta"}, issuer_path="/oauth2/default"
)
okta_org_world = _module_world("okta-org", lambda p: {"preset": "okta"})


def _fresh(world: World) -> World:
    world.provider.reset()
    world.provider.hits.clear()
    return world


@pytest.fixture
def generic(generic_world: World) -> World:
    return _fresh(generic_world)


@pytest.fixture
def google(google_world: World) -> World:
    return _fresh(google_world)


@pytest.fixture
def auth0(auth0_world: World) -> World:
    return _fresh(auth0_world)


@pytest.fixture
def entra(entra_world: World) -> World:
    return _fresh(entra_world)


@pytest.fixture
def split(split_world: World) -> World:
    return _fresh(split_world)


@pytest.fixture
def okta_custom(okta_custom_world: World) -> World:
    return _fresh(okta_custom_world)


@pytest.fixture
def okta_org(okta_org_world: World) -> World:
    return _fresh(okta_org_world)


async def rejected(world: World, *, says: str, status: int = 401) -> None:
    async with new_browser() as browser:
        before = await world.snapshot()
        walk = await sign_in(world, browser)
        await assert_rejected(world, browser, walk, before, status=status, says=says)


async def accepted(world: World) -> dict[str, str]:
    async with new_browser() as browser:
        before = await world.snapshot()
        walk = await sign_in(world, browser)
        return await assert_accepted(world, browser, walk, before)


# ---------------------------------------------------------------------------------------------
# Auth0: the trailing slash
# ---------------------------------------------------------------------------------------------


async def test_auth0_issuer_with_the_trailing_slash_signs_in(auth0: World) -> None:
    """Config without the slash, discovery and tokens with it: one slash is the only
    difference let through, and the tokens carry discovery's spelling."""
    assert not auth0.provider.issuer.endswith("/")
    await accepted(auth0)
    # Preset auth0: offline_access asked for (refresh tokens), no auth params of Google's.
    authorize = auth0.provider.last_authorize
    assert authorize["scope"].split() == ["openid", "email", "profile", "offline_access"]
    assert "access_type" not in authorize
    assert "prompt" not in authorize


@pytest.mark.parametrize(
    "iss",
    [
        pytest.param(lambda p: p.issuer, id="config-spelling-not-discoverys"),
        pytest.param(lambda p: p.issuer + "//", id="two-slashes"),
        pytest.param(lambda p: "https://evil.auth0.com/", id="another-tenant"),
    ],
)
async def test_auth0_tokens_must_carry_discoverys_exact_issuer(
    auth0: World, iss: Callable[[AdversarialProvider], str]
) -> None:
    auth0.provider.script = Script(claims={"iss": iss(auth0.provider)})
    await rejected(auth0, says="another issuer")


# ---------------------------------------------------------------------------------------------
# Google: iss without the scheme, and its auth params
# ---------------------------------------------------------------------------------------------


def _schemeless(p: AdversarialProvider) -> str:
    return p.issuer.split("://", 1)[1]


async def test_google_schemeless_iss_is_accepted_under_the_google_preset(google: World) -> None:
    google.provider.script = Script(claims={"iss": _schemeless(google.provider)})
    await accepted(google)
    authorize = google.provider.last_authorize
    assert authorize["access_type"] == "offline"
    assert authorize["prompt"] == "consent"


async def test_google_schemeless_iss_is_refused_without_the_preset(generic: World) -> None:
    generic.provider.script = Script(claims={"iss": _schemeless(generic.provider)})
    await rejected(generic, says="another issuer")


@pytest.mark.parametrize(
    "iss",
    [
        pytest.param("accounts.google.com", id="the-real-google"),
        pytest.param(lambda p: "evil.example:" + str(urlsplit(p.issuer).port), id="other-host"),
        pytest.param(lambda p: "ftp://" + _schemeless(p), id="other-scheme"),
    ],
)
async def test_google_preset_accepts_no_other_spelling(google: World, iss: Any) -> None:
    value = iss(google.provider) if callable(iss) else iss
    google.provider.script = Script(claims={"iss": value})
    await rejected(google, says="another issuer")


# ---------------------------------------------------------------------------------------------
# Entra multi-tenant: {tenantid}
# ---------------------------------------------------------------------------------------------


def _tenant_iss(p: AdversarialProvider, tid: str) -> str:
    return _template(p).replace("{tenantid}", tid)


async def test_entra_token_of_an_admitted_tenant_signs_in(entra: World) -> None:
    p = entra.provider
    p.script = Script(claims={"iss": _tenant_iss(p, TENANT), "tid": TENANT})
    await accepted(entra)
    # The preset asked for offline_access (Entra's refresh tokens).
    assert p.last_authorize["scope"].split()[-1] == "offline_access"


@pytest.mark.parametrize(
    ("claims", "says"),
    [
        pytest.param(
            lambda p: {"iss": _tenant_iss(p, OTHER_TENANT), "tid": OTHER_TENANT},
            "not in provider.tenants",
            id="tenant-not-admitted",
        ),
        pytest.param(
            lambda p: {"iss": _tenant_iss(p, OTHER_TENANT), "tid": TENANT},
            "another issuer",
            id="iss-of-another-tenant",
        ),
        pytest.param(lambda p: {"iss": _tenant_iss(p, TENANT), "tid": DROP}, "tenant", id="no-tid"),
        pytest.param(
            lambda p: {"iss": _template(p), "tid": TENANT},
            "another issuer",
            id="literal-template-as-iss",
        ),
        pytest.param(
            lambda p: {"iss": _tenant_iss(p, "a/b"), "tid": "a/b"}, "tenant", id="tid-with-a-slash"
        ),
    ],
)
async def test_entra_refuses_tenants_and_issuers_outside_the_template(
    entra: World, claims: Callable[[AdversarialProvider], dict[str, Any]], says: str
) -> None:
    entra.provider.script = Script(claims=claims(entra.provider))
    await rejected(entra, says=says)


# ---------------------------------------------------------------------------------------------
# Split horizon: internal back-channel, public issuer
# ---------------------------------------------------------------------------------------------


async def test_split_horizon_calls_the_provider_internally_and_sends_the_browser_publicly(
    split: World,
) -> None:
    p = split.provider
    await accepted(split)
    sites = {path: site for site, path in p.hits}
    assert sites["/authorize"] == "public"  # the browser
    assert sites["/token"] == "internal"
    assert sites["/userinfo"] == "internal"
    assert [path for site, path in p.hits if site == "public"] == ["/authorize"]


async def test_split_horizon_discovery_and_jwks_go_internal(lab: PresetLab) -> None:
    async with preset_world(
        lab,
        "split-start",
        provider_extra=lambda p: {"preset": "keycloak", "backchannel_url": p.internal_origin},
        internal_port=True,
    ) as world:
        hits = {path: site for site, path in world.provider.hits}
        assert hits["/.well-known/openid-configuration"] == "internal"
        assert hits["/jwks"] == "internal"
        assert ("public", "/.well-known/openid-configuration") not in world.provider.hits


async def test_split_horizon_token_with_the_internal_issuer_is_refused(split: World) -> None:
    split.provider.script = Script(claims={"iss": split.provider.internal_origin})
    await rejected(split, says="another issuer")
    assert split.provider.internal_origin != split.provider.issuer


async def test_split_horizon_discovery_naming_the_internal_issuer_is_refused(
    lab: PresetLab,
) -> None:
    """Keycloak without a fixed hostname names whatever host it was asked through: the
    gateway must not take the internal name for the issuer, so it never becomes ready."""
    port = free_port()
    prefix = f"presets:{uuid.uuid4().hex[:8]}:"
    async with AdversarialProvider(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uri=f"http://127.0.0.1:{port}/oauth2/callback",
        keys=[lab.key],
        internal_port=True,
        issuer_as=lambda p: p.internal_origin,
    ) as provider:
        config = gateway_config(
            port=port,
            issuer=provider.issuer,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            upstream=lab.upstream.url,
            key_prefix=prefix,
            provider_extra={
                "preset": "keycloak",
                "backchannel_url": provider.internal_origin,
                "timeout": "2s",
            },
        )
        gateway = await start_gateway(
            config, directory=lab.directory / "split-bad", wait_ready=False
        )
        try:
            for _ in range(100):
                if "must be identical" in gateway.logs():
                    break
                await asyncio.sleep(0.05)
            assert provider.calls["discovery"] >= 1
            async with aiohttp.ClientSession() as http:
                async with http.get(gateway.url + "/ready") as resp:
                    assert resp.status == 503
                async with http.get(
                    gateway.url + START_PATH, headers=HTML, allow_redirects=False
                ) as resp:
                    assert resp.status == 503
                    assert "/authorize" not in resp.headers.get("Location", "")
            assert "must be identical" in gateway.logs()
            assert provider.calls["authorize"] == 0
        finally:
            gateway.stop()


# ---------------------------------------------------------------------------------------------
# Okta: org vs custom authorization server
# ---------------------------------------------------------------------------------------------


async def test_okta_custom_authorization_server_signs_in(okta_custom: World) -> None:
    assert okta_custom.provider.issuer.endswith("/oauth2/default")
    await accepted(okta_custom)


async def test_okta_org_authorization_server_signs_in(okta_org: World) -> None:
    assert urlsplit(okta_org.provider.issuer).path == ""
    await accepted(okta_org)


async def test_okta_org_token_does_not_pass_for_the_custom_server(okta_custom: World) -> None:
    okta_custom.provider.script = Script(claims={"iss": _origin(okta_custom.provider)})
    await rejected(okta_custom, says="another issuer")


async def test_okta_custom_token_does_not_pass_for_the_org_server(okta_org: World) -> None:
    okta_org.provider.script = Script(claims={"iss": okta_org.provider.issuer + "/oauth2/default"})
    await rejected(okta_org, says="another issuer")


# ---------------------------------------------------------------------------------------------
# Sign-out: provider or local
# ---------------------------------------------------------------------------------------------


async def _signed_in(world: World, browser: aiohttp.ClientSession) -> None:
    before = await world.snapshot()
    walk = await sign_in(world, browser)
    await assert_accepted(world, browser, walk, before)


async def test_logout_provider_goes_to_the_end_session_endpoint(split: World) -> None:
    async with new_browser() as browser:
        await _signed_in(split, browser)
        async with browser.get(
            split.gateway.url + "/oauth2/sign_out?rd=/bye", allow_redirects=False
        ) as resp:
            assert resp.status == 302
            location = resp.headers["Location"]
        # The browser goes to the public end_session_endpoint, never the internal origin.
        assert location.startswith(split.provider.issuer + "/logout?")
        query = parse_qs(urlsplit(location).query)
        assert query["client_id"] == [CLIENT_ID]
        assert query["post_logout_redirect_uri"] == [split.gateway.url + "/bye"]


async def test_logout_local_stays_at_the_gateway(google: World) -> None:
    """preset google: logout local, although this provider offers end_session_endpoint."""
    async with new_browser() as browser:
        await _signed_in(google, browser)
        sessions = await google.sessions()
        async with browser.get(
            google.gateway.url + "/oauth2/sign_out?rd=/bye", allow_redirects=False
        ) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == "/bye"
        assert await google.sessions() == sessions - 1


# ---------------------------------------------------------------------------------------------
# Refresh response shapes
# ---------------------------------------------------------------------------------------------

# The code exchange hands out a refresh token and an access token that is due for refresh at
# once (expires_in below session.refresh_before): the next request refreshes first.
_DUE = {"expires_in": 5}


async def _page(world: World, browser: aiohttp.ClientSession) -> tuple[int, dict[str, str]]:
    async with browser.get(
        world.gateway.url + START_PATH, headers=HTML, allow_redirects=False
    ) as resp:
        if resp.status != 200:
            return resp.status, {}
        seen = json.loads(await resp.text())
    return 200, {k.lower(): v for k, v in seen["headers"]}


async def test_refresh_without_a_new_refresh_token_keeps_the_old_one(generic: World) -> None:
    p = generic.provider
    p.script = Script(
        refresh_token=True, token_response=_DUE, refresh_response={"refresh_token": DROP, **_DUE}
    )
    async with new_browser() as browser:
        await _signed_in(generic, browser)
        for _ in range(2):
            status, headers = await _page(generic, browser)
            assert status == 200
            assert headers["x-forwarded-user"] == "alice"
    first, second = p.refresh_forms[-2:]
    assert first["refresh_token"] == second["refresh_token"]


async def test_refresh_with_a_rotated_refresh_token_uses_the_new_one(generic: World) -> None:
    """The counterpart: a rotating provider spends the old token, so keeping it would end the
    session with invalid_grant."""
    p = generic.provider
    p.script = Script(refresh_token=True, token_response=_DUE, refresh_response=_DUE)
    async with new_browser() as browser:
        await _signed_in(generic, browser)
        for _ in range(3):
            status, _ = await _page(generic, browser)
            assert status == 200
    forms = p.refresh_forms[-3:]
    assert len({f["refresh_token"] for f in forms}) == 3


async def test_refresh_without_an_id_token_keeps_the_identity(generic: World) -> None:
    p = generic.provider
    p.script = Script(refresh_token=True, token_response=_DUE, refresh_response=_DUE)
    async with new_browser() as browser:
        await _signed_in(generic, browser)  # its last hop refreshed already
        refreshes = len(p.refresh_forms)
        assert refreshes >= 1
        status, headers = await _page(generic, browser)
    assert len(p.refresh_forms) == refreshes + 1
    assert status == 200
    assert headers["x-forwarded-user"] == "alice"
    assert headers["x-forwarded-email"] == "alice@example.test"


async def test_refresh_with_an_id_token_for_the_same_sub_continues(generic: World) -> None:
    p = generic.provider
    p.script = Script(
        refresh_token=True, token_response=_DUE, refresh_response=_DUE, refresh_id_token=True
    )
    async with new_browser() as browser:
        await _signed_in(generic, browser)
        refreshes = len(p.refresh_forms)
        status, headers = await _page(generic, browser)
    assert len(p.refresh_forms) == refreshes + 1
    assert status == 200
    assert headers["x-forwarded-user"] == "alice"


async def test_refresh_with_a_new_id_token_updates_the_groups(generic: World) -> None:
    """A user removed from a group at the provider loses it at the next refresh, not at the
    end of the session; without a new ID token the groups stay as they were."""
    p = generic.provider
    p.script = Script(
        refresh_token=True, token_response=_DUE, refresh_response=_DUE, refresh_id_token=True
    )
    async with new_browser() as browser:
        await _signed_in(generic, browser)
        status, headers = await _page(generic, browser)
        assert status == 200
        assert headers["x-forwarded-groups"] == "eng"
        # Removed from eng at the provider: the ID token and userinfo say so from now on.
        p.script.refresh_claims = {"groups": ["eng-alumni"]}
        p.script.userinfo = {"groups": ["eng-alumni"]}
        status, headers = await _page(generic, browser)
        assert status == 200
        assert headers["x-forwarded-groups"] == "eng-alumni"
        # Refreshes without an ID token from now on: the last known groups stay.
        p.script.refresh_id_token = False
        p.script.refresh_claims = {"groups": ["someone-else"]}
        p.script.userinfo = {"groups": ["someone-else"]}
        status, headers = await _page(generic, browser)
        assert status == 200
        assert headers["x-forwarded-groups"] == "eng-alumni"


async def test_refresh_with_an_id_token_for_another_sub_ends_the_session(
    generic: World,
) -> None:
    p = generic.provider
    p.script = Script(
        refresh_token=True, token_response=_DUE, refresh_response=_DUE, refresh_id_token=True
    )
    async with new_browser() as browser:
        await _signed_in(generic, browser)  # refreshed once, for alice
        p.script.refresh_claims = {"sub": "mallory-" + SUB}
        refreshes = len(p.refresh_forms)
        before = await generic.snapshot()
        async with browser.get(
            generic.gateway.url + START_PATH, headers=HTML, allow_redirects=False
        ) as resp:
            # Sign in again: straight to the provider, nothing forwarded.
            assert resp.status == 302
            assert resp.headers["Location"].startswith(p.issuer + "/authorize")
        after = await generic.snapshot()
        assert len(p.refresh_forms) == refreshes + 1
        assert after.sessions == before.sessions - 1
        assert after.upstream == before.upstream
        # The old cookie no longer opens anything.
        async with browser.get(generic.gateway.url + "/oauth2/userinfo") as resp:
            assert resp.status == 401
