"""Pure tests of gateway.sessions: sealing, the ticket codec, server keys, serialisation, expiry."""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import secrets
import zlib
from collections.abc import Callable
from typing import Any

import pytest

from gateway.errors import NotAuthenticated
from gateway.models import Identity, LoginState, Session, Ticket, TokenSet
from gateway.sessions import (
    SessionInvalid,
    decode_login_blob,
    decode_ticket,
    dump_login_state,
    dump_session,
    encode_login_blob,
    encode_ticket,
    generate_key,
    key_fingerprint,
    load_login_state,
    load_session,
    login_bound,
    login_time_left,
    needs_touch,
    new_ticket,
    open_login_state,
    pack_session,
    parse_key,
    seal,
    seal_login_state,
    seal_with,
    sealing_key,
    session_end_reason,
    session_key_id,
    store_ttl,
    touched,
    unseal,
)

KEY_OLD = bytes(range(32))
KEY_NEW = bytes(range(100, 132))
SECRET = b"s" * 32
AAD = b"session-id-aaaaaaaaaa"
NONCE = b"n" * 12


def seeded_bytes(seed: int = 1) -> Callable[[int], bytes]:
    rng = random.Random(seed)  # noqa: S311 -- deterministic on purpose, not for secrets
    return rng.randbytes


def make_session(**changes: Any) -> Session:
    session = Session(
        identity=Identity(
            sub="user-1",
            user="alice",
            email="alice@example.com",
            email_verified=True,
            groups=("eng", "ops"),
            preferred_username="alice",
            claims={"sub": "user-1", "roles": ["a", "b"], "nested": {"x": 1, "y": None}},
        ),
        tokens=TokenSet(
            id_token="eyJ.id.token",
            access_token="access",
            refresh_token="refresh",
            token_type="Bearer",
            expires_at=1_700_000_300.5,
        ),
        created_at=1_700_000_000.0,
        last_seen=1_700_000_000.0,
        expires_at=1_700_043_200.0,
        issuer="https://idp.example.com/realms/corp",
        sid="provider-sid",
    )
    return dataclasses.replace(session, **changes)


# --------------------------------------------------------------------------- seal / unseal


def test_session_invalid_is_a_401_with_its_own_reason() -> None:
    err = SessionInvalid("x")
    assert isinstance(err, NotAuthenticated)
    assert err.reason == "session_invalid"
    assert err.status_hint == 401


@pytest.mark.parametrize(
    "plaintext", [b"", b"x", b"{}", bytes(range(256)) * 40], ids=["empty", "one", "json", "10k"]
)
def test_seal_unseal_roundtrip(plaintext: bytes) -> None:
    blob = seal(plaintext, key=KEY_OLD, secret=SECRET, aad=AAD, nonce_bytes=NONCE)
    assert unseal(blob, keys=[KEY_OLD], secret=SECRET, aad=AAD) == plaintext


def test_a_key_derived_ahead_seals_what_seal_seals() -> None:
    ahead = sealing_key(KEY_OLD, SECRET)
    blob = seal_with(ahead, b"session", aad=AAD, nonce_bytes=NONCE)
    assert blob == seal(b"session", key=KEY_OLD, secret=SECRET, aad=AAD, nonce_bytes=NONCE)
    assert unseal(blob, keys=[KEY_OLD], secret=SECRET, aad=AAD) == b"session"
    other = seal_with(sealing_key(KEY_OLD, b"another secret"), b"session", aad=AAD,
                      nonce_bytes=NONCE)
    with pytest.raises(SessionInvalid):
        unseal(other, keys=[KEY_OLD], secret=SECRET, aad=AAD)
    with pytest.raises(ValueError, match="12 bytes"):
        seal_with(ahead, b"session", aad=AAD, nonce_bytes=b"n" * 11)


def test_blob_layout_and_no_plaintext_leak() -> None:
    plaintext = b"refresh-token-value-that-must-not-appear"
    blob = seal(plaintext, key=KEY_OLD, secret=SECRET, aad=AAD, nonce_bytes=NONCE)
    assert blob[0] == 1
    assert blob[1:5] == key_fingerprint(KEY_OLD)
    assert blob[5:17] == NONCE
    assert len(blob) == 1 + 4 + 12 + len(plaintext) + 16
    assert plaintext not in blob
    assert KEY_OLD not in blob
    assert SECRET not in blob


def test_different_secrets_give_different_ciphertexts_under_one_key() -> None:
    a = seal(b"same", key=KEY_OLD, secret=b"a" * 32, aad=AAD, nonce_bytes=NONCE)
    b = seal(b"same", key=KEY_OLD, secret=b"b" * 32, aad=AAD, nonce_bytes=NONCE)
    assert a[17:] != b[17:]


def test_tampering_any_single_bit_fails() -> None:
    blob = seal(b'{"user":"alice"}', key=KEY_OLD, secret=SECRET, aad=AAD, nonce_bytes=NONCE)
    for position in range(len(blob)):
        for bit in range(8):
            tampered = bytearray(blob)
            tampered[position] ^= 1 << bit
            with pytest.raises(SessionInvalid):
                unseal(bytes(tampered), keys=[KEY_OLD], secret=SECRET, aad=AAD)


@pytest.mark.parametrize("cut", [0, 1, 5, 17, 32])
def test_truncated_blob_fails(cut: int) -> None:
    blob = seal(b"", key=KEY_OLD, secret=SECRET, aad=AAD, nonce_bytes=NONCE)
    assert len(blob) == 33
    with pytest.raises(SessionInvalid):
        unseal(blob[:cut], keys=[KEY_OLD], secret=SECRET, aad=AAD)


def test_extended_blob_fails() -> None:
    blob = seal(b"data", key=KEY_OLD, secret=SECRET, aad=AAD, nonce_bytes=NONCE)
    with pytest.raises(SessionInvalid):
        unseal(blob + b"\x00", keys=[KEY_OLD], secret=SECRET, aad=AAD)


@pytest.mark.parametrize("secret", [b"t" * 32, SECRET[:-1] + b"t", SECRET[:16], b"\x00" * 32, b""])
def test_wrong_secret_fails(secret: bytes) -> None:
    blob = seal(b"data", key=KEY_OLD, secret=SECRET, aad=AAD, nonce_bytes=NONCE)
    with pytest.raises(SessionInvalid):
        unseal(blob, keys=[KEY_OLD], secret=secret, aad=AAD)


@pytest.mark.parametrize("aad", [b"other-session-id-bbbbb", AAD[:-1], AAD + b"x", b""])
def test_blob_under_another_session_id_fails(aad: bytes) -> None:
    blob = seal(b"data", key=KEY_OLD, secret=SECRET, aad=AAD, nonce_bytes=NONCE)
    with pytest.raises(SessionInvalid):
        unseal(blob, keys=[KEY_OLD], secret=SECRET, aad=aad)


@pytest.mark.parametrize(
    ("keys", "opens"),
    [
        ([KEY_OLD], True),
        ([KEY_NEW, KEY_OLD], True),
        ([KEY_OLD, KEY_NEW], True),
        ([KEY_NEW], False),
        ([], False),
        ([b"short"], False),
    ],
    ids=["old-only", "rotated", "old-first", "old-dropped", "no-keys", "bad-key"],
)
def test_key_rotation(keys: list[bytes], opens: bool) -> None:
    blob = seal(b"data", key=KEY_OLD, secret=SECRET, aad=AAD, nonce_bytes=NONCE)
    if opens:
        assert unseal(blob, keys=keys, secret=SECRET, aad=AAD) == b"data"
    else:
        with pytest.raises(SessionInvalid, match=r"no longer in session\.keys"):
            unseal(blob, keys=keys, secret=SECRET, aad=AAD)


def test_after_rotation_new_seals_open_only_with_new_key() -> None:
    blob = seal(b"data", key=KEY_NEW, secret=SECRET, aad=AAD, nonce_bytes=NONCE)
    assert unseal(blob, keys=[KEY_NEW, KEY_OLD], secret=SECRET, aad=AAD) == b"data"
    with pytest.raises(SessionInvalid):
        unseal(blob, keys=[KEY_OLD], secret=SECRET, aad=AAD)


def test_unknown_version_fails() -> None:
    blob = bytearray(seal(b"data", key=KEY_OLD, secret=SECRET, aad=AAD, nonce_bytes=NONCE))
    blob[0] = 2
    with pytest.raises(SessionInvalid, match="format version 2"):
        unseal(bytes(blob), keys=[KEY_OLD], secret=SECRET, aad=AAD)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"key": b"k" * 31}, "32 bytes"),
        ({"key": b"k" * 16}, "32 bytes"),
        ({"nonce_bytes": b"n" * 11}, "12 bytes"),
        ({"nonce_bytes": b"n" * 16}, "12 bytes"),
        ({"secret": b""}, "secret"),
    ],
)
def test_seal_rejects_bad_arguments(kwargs: dict[str, bytes], message: str) -> None:
    args = {"key": KEY_OLD, "secret": SECRET, "aad": AAD, "nonce_bytes": NONCE} | kwargs
    with pytest.raises(ValueError, match=message):
        seal(b"data", **args)


def test_error_messages_leak_nothing_secret() -> None:
    blob = seal(b"plaintext-secret", key=KEY_OLD, secret=SECRET, aad=AAD, nonce_bytes=NONCE)
    with pytest.raises(SessionInvalid) as info:
        unseal(blob, keys=[KEY_OLD], secret=b"x" * 32, aad=AAD)
    text = str(info.value)
    for secret_value in (KEY_OLD, SECRET, b"plaintext-secret"):
        assert secret_value.hex() not in text
        assert repr(secret_value) not in text


# --------------------------------------------------------------------------- tickets


def test_new_ticket_shapes() -> None:
    ticket = new_ticket(secrets.token_bytes)
    assert len(ticket.session_id) == 22
    assert len(ticket.secret) == 32
    assert "=" not in ticket.session_id
    assert session_key_id(ticket) == ticket.session_id


def test_new_ticket_uses_the_given_randomness() -> None:
    assert new_ticket(seeded_bytes(7)) == new_ticket(seeded_bytes(7))
    assert new_ticket(seeded_bytes(7)) != new_ticket(seeded_bytes(8))
    ticket = new_ticket(lambda n: b"\xff" * n)
    assert ticket.session_id == "_" * 21 + "w"
    assert ticket.secret == b"\xff" * 32


def test_new_ticket_rejects_short_randomness() -> None:
    with pytest.raises(ValueError, match="wrong number of bytes"):
        new_ticket(lambda n: b"x" * (n - 1))


@pytest.mark.parametrize("seed", range(20))
def test_ticket_roundtrip(seed: int) -> None:
    ticket = new_ticket(seeded_bytes(seed))
    encoded = encode_ticket(ticket)
    assert len(encoded) == 66
    assert set(encoded) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    assert decode_ticket(encoded) == ticket


GOOD = encode_ticket(new_ticket(lambda n: bytes(range(n))))
GOOD_ID, GOOD_SECRET = GOOD.split(".")


@pytest.mark.parametrize(
    "value",
    [
        "",
        ".",
        GOOD_ID,
        GOOD_SECRET,
        GOOD + ".",
        "." + GOOD,
        GOOD + "A",
        GOOD[:-1],
        GOOD_ID[:-1] + "." + GOOD_SECRET,
        GOOD_ID + "A." + GOOD_SECRET,
        GOOD_ID + ".." + GOOD_SECRET,
        GOOD_ID + "." + GOOD_SECRET + "=",
        GOOD_ID + "==." + GOOD_SECRET,
        GOOD_ID + "." + GOOD_SECRET[:-1] + "+",
        GOOD_ID[:-1] + "/" + "." + GOOD_SECRET,
        " " + GOOD,
        GOOD + " ",
        GOOD + "\n",
        GOOD.replace(".", ":"),
        GOOD.replace(".", "%2E"),
        # non-canonical: same bytes, stray low bits in the last character
        GOOD_ID[:-1] + "B" + "." + GOOD_SECRET,
        GOOD_ID + "." + GOOD_SECRET[:-1] + chr(ord(GOOD_SECRET[-1]) + 1),
        # non-ASCII lookalikes
        GOOD_ID[:-1] + "\uff21" + "." + GOOD_SECRET,
        GOOD_ID[:-1] + "\u0661" + "." + GOOD_SECRET,
        "a" * 66,
        "a" * 10_000,
    ],
)
def test_decode_ticket_rejects_malformed(value: str) -> None:
    assert decode_ticket(GOOD) is not None
    assert decode_ticket(value) is None


@pytest.mark.parametrize("value", [None, b"bytes", 42, ["x"]])
def test_decode_ticket_rejects_non_strings(value: object) -> None:
    assert decode_ticket(value) is None  # type: ignore[arg-type]


def test_ticket_secret_is_exact() -> None:
    ticket = decode_ticket(GOOD)
    assert ticket == Ticket(session_id=GOOD_ID, secret=bytes(range(32)))


# --------------------------------------------------------------------------- server keys


@pytest.mark.parametrize(
    "text",
    [
        base64.b64encode(KEY_NEW).decode(),
        base64.urlsafe_b64encode(KEY_NEW).decode(),
        base64.b64encode(KEY_NEW).decode().rstrip("="),
        base64.urlsafe_b64encode(KEY_NEW).decode().rstrip("="),
        base64.b64encode(KEY_NEW).decode() + "\n",
        "  " + base64.b64encode(KEY_NEW).decode() + "  ",
    ],
    ids=["std", "urlsafe", "std-unpadded", "urlsafe-unpadded", "newline", "spaces"],
)
def test_parse_key_accepts(text: str) -> None:
    assert parse_key(text) == KEY_NEW


def test_parse_key_accepts_both_alphabets_for_a_key_that_needs_them() -> None:
    key = b"\xfb\xff" * 16  # encodes to '+' and '/' (or '-' and '_')
    std = base64.b64encode(key).decode()
    assert "+" in std or "/" in std
    assert parse_key(std) == key
    assert parse_key(base64.urlsafe_b64encode(key).decode()) == key


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (base64.b64encode(b"k" * 16).decode(), "got 16 bytes"),
        (base64.b64encode(b"k" * 31).decode(), "got 31 bytes"),
        (base64.b64encode(b"k" * 33).decode(), "got 33 bytes"),
        (base64.b64encode(b"k" * 64).decode(), "got 64 bytes"),
        ("", "not base64"),
        ("   ", "not base64"),
        ("not base64!", "not base64"),
        ("a", "not base64"),
        ("abcde", "not base64"),
        ("+/-_" * 11, "not base64"),
        ("${SESSION_KEY}", "not base64"),
        ("=" * 4, "not base64"),
        ("AAAA=AAA", "not base64"),
        ("é" * 44, "not base64"),
    ],
)
def test_parse_key_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_key(text)
    assert "must be base64 of 32 bytes" in str(info.value)
    assert "`oidc-gateway gen-key`" in str(info.value)
    if len(text.strip()) > 8:  # the (secret) value is never echoed into logs
        assert text.strip() not in str(info.value)


def test_generate_key_roundtrip() -> None:
    text = generate_key(secrets.token_bytes)
    assert len(text) == 44
    assert len(parse_key(text)) == 32
    assert generate_key(lambda n: b"\x00" * n) == "A" * 43 + "="
    with pytest.raises(ValueError, match="wrong number of bytes"):
        generate_key(lambda n: b"\x00" * (n - 1))


def test_fingerprints_differ_between_keys() -> None:
    assert key_fingerprint(KEY_OLD) != key_fingerprint(KEY_NEW)
    assert len(key_fingerprint(KEY_OLD)) == 4


# --------------------------------------------------------------------------- serialisation


def test_session_roundtrip() -> None:
    session = make_session()
    data = dump_session(session)
    assert b" " not in data.replace(b"https://", b"")  # compact separators
    assert load_session(data) == session


@pytest.mark.parametrize(
    "changes",
    [
        {"sid": None},
        {
            "identity": Identity(sub="s", user="u"),
            "tokens": TokenSet(id_token="t"),
        },
        {"created_at": 1, "last_seen": 2, "expires_at": 3},
        {"identity": Identity(sub="s", user="ünï\u2028", claims={"k": "\u0000"})},
    ],
    ids=["no-sid", "minimal", "int-times", "unicode"],
)
def test_session_roundtrip_variants(changes: dict[str, Any]) -> None:
    session = make_session(**changes)
    loaded = load_session(dump_session(session))
    assert loaded == session
    assert isinstance(loaded.created_at, float)


def test_dump_session_rejects_non_json_claims() -> None:
    session = make_session(identity=Identity(sub="s", user="u", claims={"x": object()}))
    with pytest.raises(ValueError, match="JSON"):
        dump_session(session)
    session = make_session(identity=Identity(sub="s", user="u", claims={"x": float("nan")}))
    with pytest.raises(ValueError, match="JSON"):
        dump_session(session)


def _good_session_obj() -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(dump_session(make_session()))
    return obj


def _mutated(path: str, value: Any) -> bytes:
    obj = _good_session_obj()
    *parents, last = path.split(".")
    target = obj
    for part in parents:
        target = target[part]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return json.dumps(obj).encode()


_DELETE = object()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b"null",
        b'"string"',
        b"\xff\xfe",
        b"{" * 5,
        b"[" * 100_000 + b"]" * 100_000,
        json.dumps(_good_session_obj()).encode().replace(b"1700000000.0", b"NaN", 1),
        json.dumps(_good_session_obj()).encode().replace(b"1700000000.0", b"Infinity", 1),
        _mutated("v", 2),
        _mutated("v", True),
        _mutated("v", "1"),
        _mutated("v", _DELETE),
        _mutated("identity", _DELETE),
        _mutated("identity", "alice"),
        _mutated("identity.sub", None),
        _mutated("identity.sub", 1),
        _mutated("identity.user", _DELETE),
        _mutated("identity.email", 1),
        _mutated("identity.email_verified", "yes"),
        _mutated("identity.email_verified", 1),
        _mutated("identity.groups", "eng"),
        _mutated("identity.groups", ["eng", 1]),
        _mutated("identity.groups", [["eng"]]),
        _mutated("identity.groups", None),
        _mutated("identity.claims", []),
        _mutated("identity.claims", None),
        _mutated("identity.extra", 1),
        _mutated("tokens", None),
        _mutated("tokens.id_token", None),
        _mutated("tokens.access_token", 5),
        _mutated("tokens.refresh_token", ["x"]),
        _mutated("tokens.token_type", None),
        _mutated("tokens.expires_at", "soon"),
        _mutated("tokens.expires_at", True),
        _mutated("tokens.extra", 1),
        _mutated("created_at", "2024-01-01"),
        _mutated("created_at", None),
        _mutated("last_seen", False),
        _mutated("expires_at", [1]),
        _mutated("expires_at", 1e400),
        _mutated("issuer", None),
        _mutated("sid", 3),
        _mutated("extra", "field"),
    ],
)
def test_load_session_rejects_malformed(data: bytes) -> None:
    with pytest.raises(SessionInvalid):
        load_session(data)


def test_load_session_rejects_non_bytes() -> None:
    with pytest.raises(SessionInvalid):
        load_session("{}")  # type: ignore[arg-type]


LOGIN = LoginState(
    state="st", nonce="no", code_verifier="cv" * 30, target="/wiki?x=1", created_at=10.5
)
DIGEST = bytes(range(16))


def test_login_state_roundtrip() -> None:
    assert load_login_state(dump_login_state(LOGIN, binding=DIGEST), state="st") == (
        LOGIN, DIGEST)


def _login_obj(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"v": 1, "nonce": "n", "code_verifier": "c", "target": "/",
                           "created_at": 1, "binding": "AAECAwQFBgcICQoLDA0ODw"}
    obj.update(changes)
    return {k: v for k, v in obj.items() if v is not ...}


@pytest.mark.parametrize(
    "obj",
    [
        {},
        _login_obj(created_at=...),
        _login_obj(created_at="1"),
        _login_obj(nonce=None),
        _login_obj(nonce=1),
        _login_obj(v=2),
        _login_obj(more=1),
        _login_obj(state="s"),  # the state is never inside: it is made from the blob
        _login_obj(binding=...),
        _login_obj(binding="AAECAwQFBgcICQoLDA0ODx"),  # not canonical base64url
        _login_obj(binding="AAECAwQFBgcICQoLDA0O"),  # 15 bytes
        [],
    ],
)
def test_load_login_state_rejects_malformed(obj: Any) -> None:
    with pytest.raises(SessionInvalid):
        load_login_state(json.dumps(obj).encode(), state="st")


def test_a_sealed_login_state_opens_with_its_binding() -> None:
    binding = secrets.token_bytes(32)
    # A nonce as long as a real one: LOGIN's two-letter "no" turned up in the random state by
    # chance in about one run in fifteen.
    sent = dataclasses.replace(LOGIN, nonce=secrets.token_urlsafe(24))
    blob = seal_login_state(sent, binding=binding, key=KEY_NEW, token_bytes=secrets.token_bytes)
    state = encode_login_blob(blob)
    assert decode_login_blob(state) == blob
    login, digest = open_login_state(blob, keys=[KEY_OLD, KEY_NEW], state=state)
    assert login == dataclasses.replace(sent, state=state)
    assert login_bound(digest, binding)
    assert not login_bound(digest, secrets.token_bytes(32))  # another browser's binding
    assert not login_bound(digest, None)  # no binding cookie
    # Nothing of the login or the binding is readable in the state the provider sees.
    for secret in (sent.nonce, sent.code_verifier, "/wiki?x=1", binding.hex()):
        assert secret not in state
    assert binding not in blob


def test_every_sealed_login_state_has_its_own_salt_and_nonce() -> None:
    blobs = {seal_login_state(LOGIN, binding=b"b" * 32, key=KEY_NEW,
                              token_bytes=secrets.token_bytes) for _ in range(50)}
    assert len({blob[:16] for blob in blobs}) == 50


def test_a_tampered_truncated_or_foreign_login_state_does_not_open() -> None:
    blob = seal_login_state(LOGIN, binding=b"b" * 32, key=KEY_NEW, token_bytes=seeded_bytes())
    for i in range(len(blob)):  # every byte: salt, header, nonce, ciphertext, tag
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(SessionInvalid):
            open_login_state(bytes(bad), keys=[KEY_NEW], state="s")
    for cut in (0, 16, 40, len(blob) - 1):
        with pytest.raises(SessionInvalid):
            open_login_state(blob[:cut], keys=[KEY_NEW], state="s")
    with pytest.raises(SessionInvalid):  # a key that is no longer configured
        open_login_state(blob, keys=[KEY_OLD], state="s")
    # A session blob is no login state, even under the same key.
    ticket = Ticket("id", b"b" * 32)
    session_blob = seal(dump_session(make_session()), key=KEY_NEW, secret=ticket.secret,
                        aad=b"s:id", nonce_bytes=b"n" * 12)
    with pytest.raises(SessionInvalid):
        open_login_state(b"b" * 16 + session_blob, keys=[KEY_NEW], state="s")


def test_an_inline_state_has_one_spelling() -> None:
    blob = seal_login_state(LOGIN, binding=b"b" * 32, key=KEY_NEW, token_bytes=seeded_bytes())
    state = encode_login_blob(blob)
    assert decode_login_blob(state + "=") is None
    assert decode_login_blob(state + "A") is None  # one char more: no longer whole bytes
    last = state[-1]
    respelled = state[:-1] + ("B" if last == "A" else "A")  # other stray low bits
    assert decode_login_blob(respelled) != blob


def test_sealed_session_end_to_end() -> None:
    """How the wiring uses this module: ticket → seal the dump → store → unseal → load."""
    token_bytes = seeded_bytes(3)
    ticket = new_ticket(token_bytes)
    session = make_session()
    aad = session_key_id(ticket).encode()
    blob = seal(
        dump_session(session),
        key=KEY_NEW,
        secret=ticket.secret,
        aad=aad,
        nonce_bytes=token_bytes(12),
    )
    cookie = encode_ticket(ticket)
    back = decode_ticket(cookie)
    assert back is not None
    opened = unseal(blob, keys=[KEY_NEW], secret=back.secret, aad=session_key_id(back).encode())
    assert load_session(opened) == session
    assert b"refresh" not in blob


# --------------------------------------------------------------------------- expiry maths

T0 = 1_700_000_000.0
HOUR = 3600.0


@pytest.mark.parametrize(
    ("last_seen", "expires_at", "now", "idle", "expected"),
    [
        (T0, T0 + 12 * HOUR, T0, HOUR, None),
        (T0, T0 + 12 * HOUR, T0 + HOUR - 0.001, HOUR, None),
        (T0, T0 + 12 * HOUR, T0 + HOUR, HOUR, "idle"),
        (T0, T0 + 12 * HOUR, T0 + 2 * HOUR, HOUR, "idle"),
        (T0 + 11.5 * HOUR, T0 + 12 * HOUR, T0 + 12 * HOUR - 0.001, HOUR, None),
        (T0 + 11.5 * HOUR, T0 + 12 * HOUR, T0 + 12 * HOUR, HOUR, "lifetime"),
        (T0 + 11.5 * HOUR, T0 + 12 * HOUR, T0 + 13 * HOUR, HOUR, "lifetime"),
        # both apply: the hard lifetime wins
        (T0, T0 + 12 * HOUR, T0 + 20 * HOUR, HOUR, "lifetime"),
        # last_seen from a replica whose clock runs ahead
        (T0 + 5, T0 + 12 * HOUR, T0, HOUR, None),
    ],
)
def test_session_end_reason(
    last_seen: float, expires_at: float, now: float, idle: float, expected: str | None
) -> None:
    session = make_session(created_at=T0, last_seen=last_seen, expires_at=expires_at)
    assert session_end_reason(session, now=now, idle_timeout=idle) == expected


@pytest.mark.parametrize(
    ("last_seen", "expires_at", "now", "idle", "expected"),
    [
        # fresh: idle bounds it
        (T0, T0 + 12 * HOUR, T0, HOUR, 3600),
        # near the end of the lifetime: lifetime bounds it
        (T0 + 11.9 * HOUR, T0 + 12 * HOUR, T0 + 11.9 * HOUR, HOUR, 360),
        # rounds up
        (T0, T0 + 100.2, T0, HOUR, 101),
        (T0, T0 + 12 * HOUR, T0, 0.5, 1),
        # at least 1, even when already over
        (T0, T0 + 10, T0 + 10, HOUR, 1),
        (T0, T0 + 10, T0 + 50, HOUR, 1),
        # written without a touch: idle counts from last_seen
        (T0, T0 + 12 * HOUR, T0 + 600, HOUR, 3000),
        (T0, T0 + 12 * HOUR, T0 + 600.5, HOUR, 3000),
    ],
)
def test_store_ttl(
    last_seen: float, expires_at: float, now: float, idle: float, expected: int
) -> None:
    session = make_session(created_at=T0, last_seen=last_seen, expires_at=expires_at)
    ttl = store_ttl(session, now=now, idle_timeout=idle)
    assert ttl == expected
    assert isinstance(ttl, int)


def test_store_ttl_rejects_non_finite() -> None:
    session = make_session(expires_at=float("inf"), last_seen=float("inf"))
    with pytest.raises(ValueError, match="finite"):
        store_ttl(session, now=T0, idle_timeout=float("inf"))


@pytest.mark.parametrize(
    ("age", "idle", "expected"),
    [
        (0, HOUR, False),
        (59.9, HOUR, False),
        (60, HOUR, False),
        (60.1, HOUR, True),
        (600, HOUR, True),
        # short idle timeout: a tenth of it
        (29, 300, False),
        (30.5, 300, True),
        (0.5, 10, False),
        (1.5, 10, True),
        # clock skew between replicas
        (-5, HOUR, False),
    ],
)
def test_needs_touch(age: float, idle: float, expected: bool) -> None:
    session = make_session(last_seen=T0)
    assert needs_touch(session, now=T0 + age, idle_timeout=idle) is expected


def test_touched() -> None:
    session = make_session(last_seen=T0)
    later = touched(session, T0 + 100)
    assert later.last_seen == T0 + 100
    assert dataclasses.replace(later, last_seen=T0) == session
    assert session.last_seen == T0  # frozen, unchanged
    assert touched(session, T0 - 5).last_seen == T0  # never backwards
    assert not needs_touch(later, now=T0 + 100, idle_timeout=HOUR)


LOGIN_TIMEOUT = 600.0  # session.login_timeout's default


@pytest.mark.parametrize(
    ("age", "expected"),
    [(0, False), (LOGIN_TIMEOUT - 0.001, False), (LOGIN_TIMEOUT, True), (10_000, True)],
)
def test_login_time_left(age: float, expected: bool) -> None:
    state = LoginState(state="s", nonce="n", code_verifier="c", target="/", created_at=T0)
    left = login_time_left(state, now=T0 + age, timeout=LOGIN_TIMEOUT)
    assert (left <= 0) is expected
    assert left == pytest.approx(LOGIN_TIMEOUT - age, abs=1e-6)


def test_packed_sessions_are_smaller_and_open_like_the_json_of_earlier_versions() -> None:
    session = make_session()
    packed = pack_session(session)
    assert len(packed) < len(dump_session(session))
    assert load_session(packed) == session
    # Sessions sealed before compression (plain JSON) still open after an upgrade.
    assert load_session(dump_session(session)) == session


def test_a_packed_session_that_is_cut_short_or_inflates_too_far_is_refused() -> None:
    packed = pack_session(make_session())
    with pytest.raises(SessionInvalid):
        load_session(packed[:-5])
    with pytest.raises(SessionInvalid):
        load_session(zlib.compress(b"{" + b" " * (2 << 20) + b"}"))
