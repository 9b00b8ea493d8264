"""Sessions, pure: the ticket cookie codec, sealing a session for the store, and expiry maths.

Why it is built this way (design §7):

* The browser's cookie holds only an opaque *ticket*: a random session id and a random
  per-session secret. The store holds the session sealed with AES-256-GCM under a key derived
  (HKDF-SHA256) from the server key in ``session.keys`` *and* that secret. A dump of Redis
  therefore reveals no tokens (it lacks the secrets) and cannot be turned into cookies (the
  secrets are not in it); a stolen server key alone opens nothing either.
* Every blob names the server key that sealed it by a 4-byte fingerprint, so after a rotation
  (``keys: [new, old]``) the old sessions still open until they expire, without trial
  decryption under every key.
* The session id is bound into the AEAD's associated data, so a blob copied under another id
  in the store does not open.
* This module is layer 0: no I/O, no clock, no randomness of its own. ``now`` and a
  ``token_bytes`` function come in as arguments, which makes every function here a plain,
  deterministic, table-testable function.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import hmac
import json
import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.errors import NotAuthenticated
from gateway.models import Identity, LoginState, Session, Ticket, TokenSet

__all__ = [
    "KEY_BYTES",
    "NONCE_BYTES",
    "SECRET_BYTES",
    "SESSION_ID_BYTES",
    "SealingKey",
    "SessionInvalid",
    "binding_digest",
    "decode_login_blob",
    "decode_ticket",
    "dump_login_state",
    "dump_session",
    "encode_login_blob",
    "encode_ticket",
    "generate_key",
    "key_fingerprint",
    "load_login_state",
    "load_session",
    "login_bound",
    "login_mark",
    "login_time_left",
    "needs_touch",
    "new_ticket",
    "open_login_state",
    "parse_key",
    "seal",
    "seal_login_state",
    "seal_with",
    "sealing_key",
    "session_end_reason",
    "session_key_id",
    "store_ttl",
    "touched",
    "unseal",
]

TokenBytes = Callable[[int], bytes]
"""Source of randomness, e.g. ``secrets.token_bytes``; passed in so tests are deterministic."""

SESSION_ID_BYTES: Final = 16
"""128 bits: unguessable, and short enough to keep store keys and cookies small."""
SECRET_BYTES: Final = 32
"""256 bits of per-session secret: the half of the sealing key that only the browser holds."""
KEY_BYTES: Final = 32
"""AES-256 server keys."""
NONCE_BYTES: Final = 12
"""The 96-bit nonce AES-GCM is specified for."""

_SEAL_VERSION: Final = 1
_FINGERPRINT_BYTES: Final = 4
_HEADER_BYTES: Final = 1 + _FINGERPRINT_BYTES
_BLOB_MIN: Final = _HEADER_BYTES + NONCE_BYTES + 16  # + the GCM tag of an empty plaintext
_HKDF_INFO: Final = b"oidc-gateway session seal v1"
_SHA256: Final = hashes.SHA256()  # an immutable algorithm name, shared rather than made per seal
_FINGERPRINT_LABEL: Final = b"oidc-gateway key fingerprint v1\x00"

_ID_CHARS: Final = 22  # unpadded base64 length of SESSION_ID_BYTES
_TICKET_RE: Final = re.compile(r"[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}", re.ASCII)
_B64_RE: Final = re.compile(r"[A-Za-z0-9+/_-]+={0,2}", re.ASCII)

_TOUCH_INTERVAL_MAX: Final = 60.0
_DUMP_VERSION: Final = 1

_GEN_KEY_HINT: Final = "make one with `oidc-gateway gen-key`"


class SessionInvalid(NotAuthenticated):
    """A ticket or sealed session that does not open or does not parse.

    It is a 401 like a missing session (the user simply signs in again), but with its own reason
    id so an operator can tell "cookie from before a key was dropped" or tampering apart from
    "no cookie". Messages never include key material, secrets or plaintext.
    """

    reason = "session_invalid"


# --------------------------------------------------------------------------- tickets


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64url_decode_strict(text: str) -> bytes | None:
    """Decode unpadded base64url, rejecting non-canonical encodings (stray low bits)."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    # Two strings that decode to the same bytes would be two cookies for one session:
    # accept only the canonical spelling.
    return raw if _b64url(raw) == text else None


def new_ticket(token_bytes: TokenBytes) -> Ticket:
    """A fresh ticket for a new login: a new id every time (no session fixation)."""
    session_id = _b64url(token_bytes(SESSION_ID_BYTES))
    secret = token_bytes(SECRET_BYTES)
    if len(session_id) != _ID_CHARS or len(secret) != SECRET_BYTES:
        raise ValueError("token_bytes returned the wrong number of bytes")
    return Ticket(session_id=session_id, secret=secret)


def encode_ticket(ticket: Ticket) -> str:
    """The cookie value: ``<id>.<base64url secret>``, only characters that need no quoting."""
    return f"{ticket.session_id}.{_b64url(ticket.secret)}"


def decode_ticket(value: str) -> Ticket | None:
    """Parse a cookie value; anything not exactly what :func:`encode_ticket` makes is ``None``.

    It never raises: the cookie is attacker-controlled input, and "no valid ticket" is the only
    answer the caller needs (it then treats the request as signed out).
    """
    if not isinstance(value, str) or _TICKET_RE.fullmatch(value) is None:
        return None
    session_id, encoded_secret = value.split(".")
    if _b64url_decode_strict(session_id) is None:
        return None
    secret = _b64url_decode_strict(encoded_secret)
    if secret is None or len(secret) != SECRET_BYTES:
        return None
    return Ticket(session_id=session_id, secret=secret)


def session_key_id(ticket: Ticket) -> str:
    """The part of the store key that names this session.

    Just the id: without the secret from the cookie the stored blob cannot be opened, so the id
    need not be hidden from whoever can read the store.
    """
    return ticket.session_id


# --------------------------------------------------------------------------- server keys


def parse_key(b64: str) -> bytes:
    """Read one ``session.keys`` entry: standard or URL-safe base64 of exactly 32 bytes.

    Raises ``ValueError`` with a message the operator can act on. The message never repeats the
    value, because it is a secret and error messages end up in logs.
    """
    not_base64 = ValueError(
        f"must be base64 of {KEY_BYTES} bytes, got text that is not base64; {_GEN_KEY_HINT}"
    )
    text = b64.strip()  # a trailing newline from a file or `echo` is not the user's intent
    mixed = any(c in text for c in "+/") and any(c in text for c in "-_")
    if mixed or _B64_RE.fullmatch(text) is None:
        raise not_base64
    unpadded = text.rstrip("=")
    try:
        raw = base64.urlsafe_b64decode(
            (unpadded + "=" * (-len(unpadded) % 4)).replace("+", "-").replace("/", "_")
        )
    except (binascii.Error, ValueError):
        raise not_base64 from None
    if len(raw) != KEY_BYTES:
        raise ValueError(
            f"must be base64 of {KEY_BYTES} bytes, got {len(raw)} bytes; {_GEN_KEY_HINT}"
        )
    return raw


def generate_key(token_bytes: TokenBytes) -> str:
    """A fresh server key as standard base64 (what ``oidc-gateway gen-key`` prints)."""
    raw = token_bytes(KEY_BYTES)
    if len(raw) != KEY_BYTES:
        raise ValueError("token_bytes returned the wrong number of bytes")
    return base64.b64encode(raw).decode("ascii")


@functools.lru_cache(maxsize=64)
def key_fingerprint(key: bytes) -> bytes:
    """4 bytes naming a server key inside a blob, so unseal picks the right key directly.

    A domain-separated hash truncated to 32 bits: it reveals nothing usable about a 256-bit key.
    Kept per key (a few configured keys): every seal and unseal asks for it, and a SHA-256 of
    OpenSSL's was 2 % of a login's callback at idle (issue 7).
    """
    return hashlib.sha256(_FINGERPRINT_LABEL + key).digest()[:_FINGERPRINT_BYTES]


# --------------------------------------------------------------------------- sealing


def _derive(key: bytes, secret: bytes) -> AESGCM:
    """The per-session AES-256 key: needs both the server key and the cookie's secret."""
    hkdf = HKDF(algorithm=_SHA256, length=32, salt=secret, info=_HKDF_INFO)
    return AESGCM(hkdf.derive(key))


@dataclasses.dataclass(frozen=True, slots=True)
class SealingKey:
    """What :func:`seal` derives from a server key and a ticket's secret, made ahead of the
    seal: a login's callback takes one made after the login before it (issue 7: HKDF and
    AES-GCM's set-up were 0.1 ms of a callback at idle)."""

    header: bytes
    cipher: AESGCM = dataclasses.field(repr=False)


def sealing_key(key: bytes, secret: bytes) -> SealingKey:
    """The key :func:`seal_with` seals with, for server key ``key`` and a ticket's ``secret``."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"session key must be {KEY_BYTES} bytes, got {len(key)}")
    if not secret:
        raise ValueError("session secret must not be empty")
    return SealingKey(bytes([_SEAL_VERSION]) + key_fingerprint(key), _derive(key, secret))


def seal(plaintext: bytes, *, key: bytes, secret: bytes, aad: bytes, nonce_bytes: bytes) -> bytes:
    """Encrypt and authenticate ``plaintext`` for the store.

    Blob layout: version (1) | key fingerprint (4) | nonce (12) | ciphertext+tag. The header is
    part of the associated data together with ``aad`` (the session id), so changing any byte,
    or moving the blob under another id, makes :func:`unseal` fail. ``nonce_bytes`` comes from
    the caller's CSPRNG (fresh for every seal; random 96-bit nonces are safe here because each
    session has its own derived key and is sealed only a handful of times).
    """
    return seal_with(sealing_key(key, secret), plaintext, aad=aad, nonce_bytes=nonce_bytes)


def seal_with(sealing: SealingKey, plaintext: bytes, *, aad: bytes, nonce_bytes: bytes) -> bytes:
    """:func:`seal` with a key derived ahead (:func:`sealing_key`)."""
    if len(nonce_bytes) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes, got {len(nonce_bytes)}")
    header = sealing.header
    return header + nonce_bytes + sealing.cipher.encrypt(nonce_bytes, plaintext, header + aad)


def unseal(blob: bytes, *, keys: Sequence[bytes], secret: bytes, aad: bytes) -> bytes:
    """Open a blob made by :func:`seal` with any of ``keys`` (the first seals, all open).

    Only keys whose fingerprint matches the blob are tried: a blob can only have been sealed by
    such a key, so this is both the fast path and sufficient. Every failure (unknown version,
    key no longer configured, tampering, wrong secret, wrong session id, truncation) raises
    :class:`SessionInvalid` and says which, without leaking anything secret.
    """
    if not isinstance(blob, bytes | bytearray) or len(blob) < _BLOB_MIN:
        raise SessionInvalid("sealed session is truncated")
    blob = bytes(blob)
    if blob[0] != _SEAL_VERSION:
        raise SessionInvalid(f"sealed session has unknown format version {blob[0]}")
    if not secret:
        raise SessionInvalid("session secret is empty")
    header = blob[:_HEADER_BYTES]
    fingerprint = header[1:]
    nonce = blob[_HEADER_BYTES : _HEADER_BYTES + NONCE_BYTES]
    ciphertext = blob[_HEADER_BYTES + NONCE_BYTES :]
    candidates = [k for k in keys if len(k) == KEY_BYTES and key_fingerprint(k) == fingerprint]
    if not candidates:
        raise SessionInvalid("session was sealed with a key that is no longer in session.keys")
    for key in candidates:
        try:
            return _derive(key, secret).decrypt(nonce, ciphertext, header + aad)
        except InvalidTag:
            continue
    raise SessionInvalid("sealed session does not open (tampered, or wrong ticket)")


# --------------------------------------------------------------------------- serialisation


def _dumps(obj: Mapping[str, Any]) -> bytes:
    try:
        text = json.dumps(
            obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False, sort_keys=True
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"value is not JSON-serialisable: {exc}") from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate, which the provider's JSON may carry ("\ud800" is a valid escape) and
        # json.loads hands over as is; it has no UTF-8 form, so write every non-ASCII character
        # as a \u escape instead: json.loads reads the same strings back exactly.
        return json.dumps(
            obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False, sort_keys=True
        ).encode("ascii")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


# Built once: json.loads with any keyword argument builds a new decoder on every call, and a
# session is parsed on every signed-in request.
_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant)


def _loads_object(data: bytes, what: str) -> dict[str, Any]:
    if not isinstance(data, bytes | bytearray):
        raise SessionInvalid(f"{what}: expected bytes")
    try:
        obj = _DECODER.decode(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SessionInvalid(f"{what}: not valid JSON") from None
    if not isinstance(obj, dict):
        raise SessionInvalid(f"{what}: expected a JSON object")
    return obj


def _check_keys(obj: Mapping[str, Any], expected: frozenset[str], what: str) -> None:
    keys = set(obj)
    if keys != expected:
        missing = sorted(expected - keys)
        unknown = sorted(keys - expected)
        raise SessionInvalid(f"{what}: missing fields {missing}, unknown fields {unknown}")


def _str(obj: Mapping[str, Any], name: str, what: str) -> str:
    value = obj[name]
    if not isinstance(value, str):
        raise SessionInvalid(f"{what}.{name}: expected a string")
    return value


def _opt_str(obj: Mapping[str, Any], name: str, what: str) -> str | None:
    value = obj[name]
    if value is not None and not isinstance(value, str):
        raise SessionInvalid(f"{what}.{name}: expected a string or null")
    return value


def _num(obj: Mapping[str, Any], name: str, what: str) -> float:
    value = obj[name]
    # bool is an int subclass: reject it explicitly.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SessionInvalid(f"{what}.{name}: expected a number")
    result = float(value)
    if not math.isfinite(result):
        raise SessionInvalid(f"{what}.{name}: expected a finite number")
    return result


def _opt_num(obj: Mapping[str, Any], name: str, what: str) -> float | None:
    return None if obj[name] is None else _num(obj, name, what)


def _opt_bool(obj: Mapping[str, Any], name: str, what: str) -> bool | None:
    value = obj[name]
    if value is not None and not isinstance(value, bool):
        raise SessionInvalid(f"{what}.{name}: expected true, false or null")
    return value


def _object(obj: Mapping[str, Any], name: str, what: str) -> dict[str, Any]:
    value = obj[name]
    if not isinstance(value, dict):
        raise SessionInvalid(f"{what}.{name}: expected an object")
    return value


def _version(obj: Mapping[str, Any], what: str) -> None:
    version = obj.get("v")
    if isinstance(version, bool) or version != _DUMP_VERSION:
        raise SessionInvalid(f"{what}: unsupported format version {version!r}")


_SESSION_FIELDS: Final = frozenset(
    {"v", "identity", "tokens", "created_at", "last_seen", "expires_at", "issuer", "sid"}
)
_IDENTITY_FIELDS: Final = frozenset(
    {"sub", "user", "email", "email_verified", "groups", "preferred_username", "claims"}
)
# Added later: sessions sealed before carry none of them and load with the defaults (groups
# complete, no hosted-domain claim), which is what those sessions were decided with.
_IDENTITY_OPTIONAL: Final = frozenset({"groups_state", "domain_verified"})
_GROUPS_STATES: Final = frozenset({"ok", "truncated", "unavailable", "invalid"})
_TOKEN_FIELDS: Final = frozenset(
    {"id_token", "access_token", "refresh_token", "token_type", "expires_at"}
)
_LOGIN_FIELDS: Final = frozenset(
    {"v", "nonce", "code_verifier", "target", "created_at", "binding"}
)


def dump_session(session: Session) -> bytes:
    """Compact JSON of a session (the plaintext that :func:`seal` protects).

    Carries a format version, so a later change of shape is detected rather than misread.
    Raises ``ValueError`` if ``identity.claims`` holds something that is not JSON.
    """
    identity = session.identity
    tokens = session.tokens
    return _dumps(
        {
            "v": _DUMP_VERSION,
            "identity": {
                "sub": identity.sub,
                "user": identity.user,
                "email": identity.email,
                "email_verified": identity.email_verified,
                "groups": list(identity.groups),
                "preferred_username": identity.preferred_username,
                "claims": dict(identity.claims),
                "groups_state": identity.groups_state,
                "domain_verified": identity.domain_verified,
            },
            "tokens": {
                "id_token": tokens.id_token,
                "access_token": tokens.access_token,
                "refresh_token": tokens.refresh_token,
                "token_type": tokens.token_type,
                "expires_at": tokens.expires_at,
            },
            "created_at": session.created_at,
            "last_seen": session.last_seen,
            "expires_at": session.expires_at,
            "issuer": session.issuer,
            "sid": session.sid,
        }
    )


def pack_session(session: Session) -> bytes:
    """What is sealed into the store: :func:`dump_session`, deflated (:func:`load_session`
    reads both)."""
    return _compress(dump_session(session))


# A session's JSON repeats itself (the claims beside the identity built from them, base64 JWTs):
# deflated it is about a third smaller, which is what keeps a memory-store session under 2 KB
# of RSS. The blob is authenticated before it is inflated, and inflating is bounded all the same.
_MAX_SESSION_JSON: Final = 1 << 20


def _compress(data: bytes) -> bytes:
    return zlib.compress(data, 6)


def _decompress(data: bytes, what: str) -> bytes:
    """Inflate :func:`_compress` output; JSON as written before compression passes as is."""
    if not isinstance(data, bytes | bytearray) or data[:1] == b"{":
        return data  # _loads_object says what is wrong with anything else
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, _MAX_SESSION_JSON)
    except zlib.error as exc:
        raise SessionInvalid(f"{what}: not a stored session ({exc})") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise SessionInvalid(f"{what}: stored session is truncated or too large")
    return out


def load_session(data: bytes) -> Session:
    """Parse :func:`dump_session` output, checking every field's type.

    The blob was authenticated before it got here, so a failure means version skew or a bug,
    not an attack; either way the only safe answer is :class:`SessionInvalid` (sign in again),
    never a half-filled Session that policy decisions would then trust.
    """
    what = "session"
    obj = _loads_object(_decompress(data, what), what)
    _version(obj, what)
    _check_keys(obj, _SESSION_FIELDS, what)

    raw_identity = _object(obj, "identity", what)
    iwhat = f"{what}.identity"
    _check_keys(
        {k: v for k, v in raw_identity.items() if k not in _IDENTITY_OPTIONAL},
        _IDENTITY_FIELDS,
        iwhat,
    )
    groups = raw_identity["groups"]
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise SessionInvalid(f"{iwhat}.groups: expected a list of strings")
    groups_state = raw_identity.get("groups_state", "ok")
    if groups_state not in _GROUPS_STATES:
        raise SessionInvalid(f"{iwhat}.groups_state: expected one of {sorted(_GROUPS_STATES)}")
    domain_verified = _opt_bool({"domain_verified": None, **raw_identity}, "domain_verified", iwhat)
    identity = Identity(
        sub=_str(raw_identity, "sub", iwhat),
        user=_str(raw_identity, "user", iwhat),
        email=_opt_str(raw_identity, "email", iwhat),
        email_verified=_opt_bool(raw_identity, "email_verified", iwhat),
        groups=tuple(groups),
        preferred_username=_opt_str(raw_identity, "preferred_username", iwhat),
        claims=_object(raw_identity, "claims", iwhat),
        groups_state=groups_state,
        domain_verified=domain_verified,
    )

    raw_tokens = _object(obj, "tokens", what)
    twhat = f"{what}.tokens"
    _check_keys(raw_tokens, _TOKEN_FIELDS, twhat)
    tokens = TokenSet(
        id_token=_str(raw_tokens, "id_token", twhat),
        access_token=_opt_str(raw_tokens, "access_token", twhat),
        refresh_token=_opt_str(raw_tokens, "refresh_token", twhat),
        token_type=_str(raw_tokens, "token_type", twhat),
        expires_at=_opt_num(raw_tokens, "expires_at", twhat),
    )

    return Session(
        identity=identity,
        tokens=tokens,
        created_at=_num(obj, "created_at", what),
        last_seen=_num(obj, "last_seen", what),
        expires_at=_num(obj, "expires_at", what),
        issuer=_str(obj, "issuer", what),
        sid=_opt_str(obj, "sid", what),
    )


def dump_login_state(state: LoginState, *, binding: bytes) -> bytes:
    """Compact JSON of a pending login: what :func:`seal_login_state` protects.

    ``binding`` is :func:`binding_digest` of the browser's binding cookie. ``state.state``
    is not in it: the state sent to the provider is made from this very blob.
    """
    return _dumps(
        {
            "v": _DUMP_VERSION,
            "nonce": state.nonce,
            "code_verifier": state.code_verifier,
            "target": state.target,
            "created_at": state.created_at,
            "binding": _b64url(binding),
        }
    )


def load_login_state(data: bytes, *, state: str) -> tuple[LoginState, bytes]:
    """Parse :func:`dump_login_state` output strictly: the login (its ``state`` is the one the
    browser brought back) and the binding digest. Anything malformed is SessionInvalid."""
    what = "login state"
    obj = _loads_object(data, what)
    _version(obj, what)
    _check_keys(obj, _LOGIN_FIELDS, what)
    binding = _b64url_decode_strict(_str(obj, "binding", what))
    if binding is None or len(binding) != _BINDING_DIGEST_BYTES:
        raise SessionInvalid("login state: binding is not a digest")
    login = LoginState(
        state=state,
        nonce=_str(obj, "nonce", what),
        code_verifier=_str(obj, "code_verifier", what),
        target=_str(obj, "target", what),
        created_at=_num(obj, "created_at", what),
    )
    return login, binding


# --------------------------------------------------------------------------- login state sealing

_BINDING_DIGEST_BYTES: Final = 16
_LOGIN_SALT_BYTES: Final = 16
_LOGIN_AAD: Final = b"oidc-gateway login state"


def binding_digest(binding: bytes) -> bytes:
    """What a sealed login state keeps of the browser's binding cookie (not the cookie)."""
    return hashlib.sha256(b"oidc-gateway login binding\0" + binding).digest()[
        :_BINDING_DIGEST_BYTES
    ]


def seal_login_state(
    state: LoginState, *, binding: bytes, key: bytes, token_bytes: TokenBytes
) -> bytes:
    """A pending login sealed under the server key, to travel in the ``state`` parameter.

    No store write per redirect (an unauthenticated flood of them filled Redis and cost half
    of each redirect's CPU, issue 7), as mod_auth_openidc and oauth2-proxy keep it client-side
    too. Blob layout: salt (16) | :func:`seal` blob. The random salt gives every login its own
    derived AES key, so GCM's random nonces never share a key however many logins start. The
    browser binding is a digest inside, checked apart from the seal: a state opened by the
    server key is genuine, and is used up (single use) before its binding is compared, so a
    callback tried in another browser spends it, as a stored state did.
    """
    salt = token_bytes(_LOGIN_SALT_BYTES)
    if len(salt) != _LOGIN_SALT_BYTES:
        raise ValueError("token_bytes returned the wrong number of bytes")
    plaintext = dump_login_state(state, binding=binding_digest(binding))
    return salt + seal(plaintext, key=key, secret=salt, aad=_LOGIN_AAD,
                       nonce_bytes=token_bytes(NONCE_BYTES))


def open_login_state(
    blob: bytes, *, keys: Sequence[bytes], state: str
) -> tuple[LoginState, bytes]:
    """Open :func:`seal_login_state`'s blob: the login and its binding digest. A forged,
    altered or truncated blob, or one sealed by a key no longer configured, is SessionInvalid."""
    if len(blob) < _LOGIN_SALT_BYTES + _BLOB_MIN:
        raise SessionInvalid("login state is truncated")
    salt = blob[:_LOGIN_SALT_BYTES]
    data = unseal(blob[_LOGIN_SALT_BYTES:], keys=keys, secret=salt, aad=_LOGIN_AAD)
    return load_login_state(data, state=state)


def login_bound(digest: bytes, binding: bytes | None) -> bool:
    """Whether this browser's binding cookie is the one the login was started with."""
    return binding is not None and hmac.compare_digest(digest, binding_digest(binding))


def encode_login_blob(blob: bytes) -> str:
    return _b64url(blob)


def login_mark(blob: bytes) -> str:
    """The store key suffix that marks a sealed login state used: a digest of its blob, so
    the mark reveals nothing of the state and one blob has one mark."""
    return _b64url(hashlib.sha256(blob).digest())


def decode_login_blob(text: str) -> bytes | None:
    """The blob of an inline state; None unless it is canonical base64url (one spelling per
    blob, so the single-use mark, keyed by the blob, cannot be dodged by re-spelling it)."""
    return _b64url_decode_strict(text)


# --------------------------------------------------------------------------- expiry maths


def session_end_reason(session: Session, *, now: float, idle_timeout: float) -> str | None:
    """Why the session is over at ``now`` — ``"lifetime"`` or ``"idle"`` — or ``None``.

    Enforced here, server-side, on every request, because the store's TTL is only a cleanup
    aid (it is refreshed lazily, see :func:`needs_touch`) and a cookie's own expiry is up to
    the browser. Lifetime wins when both apply: it is the hard limit.
    """
    if now >= session.expires_at:
        return "lifetime"
    if now - session.last_seen >= idle_timeout:
        return "idle"
    return None


def store_ttl(session: Session, *, now: float, idle_timeout: float) -> int:
    """Whole seconds the store should keep the session when writing it at ``now``.

    ``min(expires_at - now, last_seen + idle_timeout - now)``, rounded up and at least 1. For a
    freshly touched session (``last_seen == now``) that is ``min(expires_at - now,
    idle_timeout)``. Rounding up means the store never drops a session the server-side checks
    would still accept; the minimum of 1 keeps the value valid for Redis ``SET PX``.
    """
    remaining = min(session.expires_at - now, session.last_seen + idle_timeout - now)
    if not math.isfinite(remaining):
        raise ValueError("session times must be finite numbers")
    return max(1, math.ceil(remaining))


def needs_touch(session: Session, *, now: float, idle_timeout: float) -> bool:
    """Whether ``last_seen`` is stale enough to be worth writing back to the store.

    Writing on every request would put a store write (and a re-seal) on the hot path. Instead
    ``last_seen`` is refreshed once it is older than ``min(60 s, idle_timeout / 10)``, so the
    idle timeout is enforced with an error of at most a tenth of itself.
    """
    return now - session.last_seen > min(_TOUCH_INTERVAL_MAX, idle_timeout / 10)


def touched(session: Session, now: float) -> Session:
    """The session with ``last_seen`` moved to ``now`` (never backwards).

    Never backwards, because replicas' clocks differ slightly and a lagging replica must not
    make a session look idler than it is.
    """
    return dataclasses.replace(session, last_seen=max(session.last_seen, now))


def login_time_left(state: LoginState, *, now: float, timeout: float) -> float:
    """Seconds a pending login may still take (``session.login_timeout``); 0 or less: expired.

    Checked besides any store TTL because stores expire lazily, and an old authorization
    response replayed late must not complete a login. Also how long its single-use mark must
    be kept.
    """
    return timeout - (now - state.created_at)
