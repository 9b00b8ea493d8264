"""The gateway's Set-Cookie values read as aiohttp's own set_cookie would write them."""

from __future__ import annotations

import pytest
from aiohttp import web

from gateway.headers import set_cookie

CASES = [
    ("_oidc_gateway", "Yu9bpyqPskgQHoA7QtYsMQ.0_V-abc", 28800, "/", None, False, "Lax"),
    ("__Host-_oidc_gateway", "abc_-.DEF", 600, "/", None, True, "Strict"),
    ("gw_login", "x", 1, "/", "example.com", True, "Lax"),
    ("gw", "v", 0, "/oauth2", "a.example.org", False, "Strict"),
]


@pytest.mark.parametrize(("name", "value", "max_age", "path", "domain", "secure", "samesite"),
                         CASES)
def test_the_header_is_aiohttps_own(
    name: str, value: str, max_age: int, path: str, domain: str | None, secure: bool,
    samesite: str,
) -> None:
    reference = web.Response()
    reference.set_cookie(name, value, max_age=max_age, path=path, domain=domain,
                         secure=secure, httponly=True, samesite=samesite)
    expected = [m.output(header="")[1:] for m in reference.cookies.values()]
    assert [set_cookie(name, value, max_age=max_age, path=path, domain=domain,
                       secure=secure, samesite=samesite)] == expected


@pytest.mark.parametrize("value", ["", 'a b', 'a;b', 'a"b', "a,b", "a\\b", "a\nb", "\u00e9"])
def test_a_value_that_would_need_quoting_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="quoting"):
        set_cookie("n", value, max_age=1, path="/", domain=None, secure=True, samesite="Lax")


@pytest.mark.parametrize("domain", ["example.com; Secure", "exa mple.com", "a\r\nSet-Cookie: x"])
def test_an_attribute_cannot_add_attributes_or_lines(domain: str) -> None:
    with pytest.raises(ValueError, match="Path or Domain"):
        set_cookie("n", "v", max_age=1, path="/", domain=domain, secure=True, samesite="Lax")
