"""Properties of the session cookie codec, the AES-GCM seal and the session serialisation.

The cookie is attacker-controlled text, the store's blobs are attacker-controlled bytes for
anyone who can write to Redis, and identities carry whatever the provider's JSON held. So:
decoding any text is a ticket or ``None``, never an exception; only the one canonical spelling
of a ticket decodes (two different cookies never name the same session); a sealed blob opens
only unchanged, under the right key, secret and session id; and every session the provider can
produce survives the trip through the store exactly.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.models import Identity, Session, Ticket, TokenSet
from gateway.sessions import (
    KEY_BYTES,
    NONCE_BYTES,
    SECRET_BYTES,
    SESSION_ID_BYTES,
    SessionInvalid,
    decode_ticket,
    dump_session,
    encode_ticket,
    load_session,
    new_ticket,
    seal,
    unseal,
)

B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


ticket = st.builds(
    Ticket,
    session_id=st.binary(min_size=SESSION_ID_BYTES, max_size=SESSION_ID_BYTES).map(_b64url),
    secret=st.binary(min_size=SECRET_BYTES, max_size=SECRET_BYTES),
)
# Text shaped like a cookie value (the ticket's length and alphabet, so the codec's canonical
# checks are what decides), near misses of it, and anything at all.
cookie_shaped = st.tuples(
    st.text(alphabet=B64URL, min_size=22, max_size=22),
    st.text(alphabet=B64URL, min_size=43, max_size=43),
).map(".".join)


@st.composite
def mutated_cookie(draw: st.DrawFn) -> str:
    """A real cookie with one character replaced, inserted or removed, or a decoration added
    (padding, whitespace, a newline, a quote, standard-base64 letters, look-alike digits)."""
    value = encode_ticket(draw(ticket))
    at = draw(st.integers(0, len(value) - 1))
    char = draw(st.one_of(
        st.sampled_from(B64URL),
        # Padding, standard base64, separators, quoting, controls; an Arabic-Indic digit and a
        # fullwidth letter (Unicode-aware regexes take them for \\d and \\w); a surrogate.
        st.sampled_from(
            ["=", "+", "/", ".", " ", "\n", "\t", '"', "%", "\x00", "\u0663", "\uff21", "\udcff"]
        ),
    ))
    how = draw(st.sampled_from(["replace", "insert", "delete", "append", "prepend"]))
    if how == "replace":
        return value[:at] + char + value[at + 1 :]
    if how == "insert":
        return value[:at] + char + value[at:]
    if how == "delete":
        return value[:at] + value[at + 1 :]
    return value + char if how == "append" else char + value


cookie_text = st.one_of(
    cookie_shaped,
    mutated_cookie(),
    st.text(),
    st.binary().map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.binary().map(lambda b: b.decode("latin-1")),
)


@given(ticket)
def test_decode_inverts_encode(t: Ticket) -> None:
    """Every ticket survives the cookie: decode(encode(t)) == t, in characters that need no
    quoting in a Cookie header."""
    value = encode_ticket(t)
    assert decode_ticket(value) == t
    assert all(c in B64URL + "." for c in value)


@given(cookie_text)
@example("")
@example("a" * 22 + "." + "A" * 43 + "\n")
@example("A" * 21 + "B." + "A" * 43)  # stray low bits in the id's last character
def test_decode_never_raises_and_accepts_only_the_canonical_spelling(value: str) -> None:
    """Whatever the cookie holds, decoding gives a ticket or None, never an exception; and a
    decoded ticket re-encodes to exactly the text it came from. So two different cookie values
    never decode to the same ticket (no second spelling of someone's session, no cookie that
    passes a comparison on the text but names another session)."""
    decoded = decode_ticket(value)
    if decoded is not None:
        assert encode_ticket(decoded) == value
        assert len(decoded.secret) == SECRET_BYTES


@given(ticket, mutated_cookie())
def test_two_different_cookies_never_name_one_ticket(t: Ticket, other: str) -> None:
    value = encode_ticket(t)
    if other != value:
        assert decode_ticket(other) != t or decode_ticket(other) is None


@given(st.binary(max_size=100))
def test_decode_of_bytes_is_none(raw: bytes) -> None:
    """A caller that hands over bytes (or any non-text) gets None, not a TypeError."""
    assert decode_ticket(raw) is None  # type: ignore[arg-type]


TICKET_BYTES = SESSION_ID_BYTES + SECRET_BYTES


@given(st.binary(min_size=TICKET_BYTES, max_size=TICKET_BYTES))
def test_new_tickets_round_trip(random: bytes) -> None:
    """Tickets made from any random bytes are valid cookies (no length or alphabet surprise)."""
    chunks = iter([random[:SESSION_ID_BYTES], random[SESSION_ID_BYTES:]])
    t = new_ticket(lambda n: next(chunks))
    assert decode_ticket(encode_ticket(t)) == t


# ---------------------------------------------------------------------------------------------
# Sealing
# ---------------------------------------------------------------------------------------------

key = st.binary(min_size=KEY_BYTES, max_size=KEY_BYTES)
secret = st.binary(min_size=1, max_size=SECRET_BYTES)
nonce = st.binary(min_size=NONCE_BYTES, max_size=NONCE_BYTES)
aad = st.binary(max_size=40)
plaintext = st.binary(max_size=300)


@given(plaintext, key, st.lists(key, max_size=3), secret, aad, nonce, st.randoms())
def test_seal_unseal_round_trip_under_any_key_ring(
    data: bytes, k: bytes, others: list[bytes], s: bytes, a: bytes, n: bytes, rnd: Any
) -> None:
    """A blob opens under any key ring that still holds its key, wherever the key sits in it
    (rotation: the first key seals, all open)."""
    blob = seal(data, key=k, secret=s, aad=a, nonce_bytes=n)
    ring = [*others, k]
    rnd.shuffle(ring)
    assert unseal(blob, keys=ring, secret=s, aad=a) == data


@st.composite
def mutation(draw: st.DrawFn, blob: bytes) -> bytes:
    """``blob`` changed in one way: a bit flipped anywhere, cut short, extended, or spliced."""
    how = draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if how == "flip":
        i = draw(st.integers(0, len(blob) - 1))
        bit = 1 << draw(st.integers(0, 7))
        return blob[:i] + bytes([blob[i] ^ bit]) + blob[i + 1 :]
    if how == "truncate":
        return blob[: draw(st.integers(0, len(blob) - 1))]
    if how == "extend":
        return blob + draw(st.binary(min_size=1, max_size=20))
    i = draw(st.integers(0, len(blob)))
    j = draw(st.integers(i, len(blob)))
    replacement = draw(st.binary(max_size=20))
    return blob[:i] + replacement + blob[j:] if blob[i:j] != replacement else blob + b"\x00"


@given(st.data(), plaintext, key, secret, aad, nonce)
def test_any_change_to_a_sealed_blob_fails_to_open(
    data: st.DataObject, pt: bytes, k: bytes, s: bytes, a: bytes, n: bytes
) -> None:
    """Any change to the blob, or opening it under another session id, another ticket secret or
    without its key, is SessionInvalid (a 401: sign in again), never the plaintext and never
    another exception."""
    blob = seal(pt, key=k, secret=s, aad=a, nonce_bytes=n)
    changed = data.draw(mutation(blob))
    assert changed != blob
    with pytest.raises(SessionInvalid):
        unseal(changed, keys=[k], secret=s, aad=a)
    other_aad = data.draw(aad.filter(lambda x: x != a))
    with pytest.raises(SessionInvalid):
        unseal(blob, keys=[k], secret=s, aad=other_aad)
    # Another secret of the same length: every real secret has SECRET_BYTES (decode_ticket and
    # the binding cookie check it). Lengths must stay fixed, because HKDF uses the secret as an
    # HMAC key, and HMAC pads keys with zero bytes: b"k" and b"k\0" derive the same key.
    other_secret = data.draw(
        st.binary(min_size=len(s), max_size=len(s)).filter(lambda x: x != s)
    )
    with pytest.raises(SessionInvalid):
        unseal(blob, keys=[k], secret=other_secret, aad=a)
    other_key = data.draw(key.filter(lambda x: x != k))
    with pytest.raises(SessionInvalid):
        unseal(blob, keys=[other_key], secret=s, aad=a)


@given(st.binary(max_size=200), st.lists(key, max_size=2), st.binary(max_size=32), aad)
def test_unseal_of_arbitrary_bytes_is_session_invalid(
    blob: bytes, keys: list[bytes], s: bytes, a: bytes
) -> None:
    """What the store returns may be anything (a foreign writer, a truncated value): opening
    it is the plaintext of a real seal or SessionInvalid, nothing else."""
    with pytest.raises(SessionInvalid):
        unseal(blob, keys=keys, secret=s, aad=a)


# ---------------------------------------------------------------------------------------------
# Sessions through the store
# ---------------------------------------------------------------------------------------------

# JSON as json.loads hands it over: strings with anything a "\\uXXXX" escape can produce, lone
# surrogates included (the provider's ID token and userinfo are JSON).
json_text = st.text(
    alphabet=st.one_of(st.characters(), st.sampled_from(["\ud800", "\udfff", "\x00", "\u2028"])),
    max_size=15,
)
json_value = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), json_text,
        st.floats(allow_nan=False, allow_infinity=False),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(json_text, inner, max_size=3)
    ),
    max_leaves=10,
)
finite = st.floats(min_value=0, max_value=4e9, allow_nan=False)
session = st.builds(
    Session,
    identity=st.builds(
        Identity,
        sub=json_text,
        user=json_text,
        email=st.one_of(st.none(), json_text),
        email_verified=st.one_of(st.none(), st.booleans()),
        groups=st.lists(json_text, max_size=4).map(tuple),
        preferred_username=st.one_of(st.none(), json_text),
        claims=st.dictionaries(json_text, json_value, max_size=4),
    ),
    tokens=st.builds(
        TokenSet,
        id_token=json_text,
        access_token=st.one_of(st.none(), json_text),
        refresh_token=st.one_of(st.none(), json_text),
        token_type=json_text,
        expires_at=st.one_of(st.none(), finite),
    ),
    created_at=finite,
    last_seen=finite,
    expires_at=finite,
    issuer=json_text,
    sid=st.one_of(st.none(), json_text),
)


def _same(a: Any, b: Any) -> bool:
    """Equality that also tells 0.0 from -0.0 apart and compares floats exactly."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return bool(a == b)


@given(session, key, st.binary(min_size=1, max_size=32), nonce)
@example(
    Session(
        identity=Identity(sub="s", user="al\ud800ice", claims={"name": "\udfff"}),
        tokens=TokenSet(id_token="t"), created_at=1.0, last_seen=1.0, expires_at=2.0,
        issuer="https://idp.example",
    ),
    b"k" * KEY_BYTES, b"s", b"n" * NONCE_BYTES,
)
def test_every_session_survives_the_store_exactly(
    sess: Session, k: bytes, s: bytes, n: bytes
) -> None:
    """Whatever identity and claims the provider sent, the session is serialised, sealed,
    opened and parsed back to exactly itself: a login never fails (a 500) on what the
    provider's JSON legitimately holds, and nothing is altered on the way."""
    blob = seal(dump_session(sess), key=k, secret=s, aad=b"s:id", nonce_bytes=n)
    back = load_session(unseal(blob, keys=[k], secret=s, aad=b"s:id"))
    assert back == sess
    assert _same(back.created_at, sess.created_at)


@given(st.binary(max_size=300))
def test_load_session_of_arbitrary_bytes_is_session_invalid(raw: bytes) -> None:
    with pytest.raises(SessionInvalid):
        load_session(raw)
