"""Signed tokens (JWT) that grant channels: who may follow and who may publish what.

One model for the hub, embedded applications and browsers (issue 13). A token is a JWT whose
claim ``tornado_sse`` holds its grants::

    {"sub": "alice", "exp": 1767225600,
     "tornado_sse": {"subscribe": ["user/alice", "room/*"], "publish": ["room/*"]}}

A *pattern* is an exact channel name, or a prefix ending in ``*`` that matches every channel
starting with it (``*`` alone matches all). `TokenVerifier` checks a token and returns its
`Grants`; in an `.EventStreamHandler` subclass it takes a few lines::

    verifier = TokenVerifier(secret=SECRET)

    class Private(tornado_sse.EventStreamHandler):
        def get_current_user(self):
            return verifier.authenticate(self)       # Grants, or 401

        def check_channel(self, channel):
            return self.current_user.may_subscribe(channel)    # False: 403

`TokenVerifier.authenticate` also closes the stream at the token's ``exp`` with an event named
``token-expired`` (`.EventStreamHandler.close_at`): a stream never outlives its token. The client
takes a fresh token and reconnects with its last id, and resumes exactly.

PyJWT does the signature and the registered claims (``pip install 'tornado-sse[jwt]'``): there is
no hand-written JWT code here. ``import tornado_sse`` never imports this module, and this module
imports PyJWT only to verify or make a token (the hub uses `Grants` and `token_from_request`
with ``--auth-url`` alone, without PyJWT).

Deliberate choices:

* **Algorithms follow the key, never the token.** An HMAC secret verifies HS256/384/512 (only
  those its length suits, RFC 7518 section 3.2); a PEM public key verifies the algorithms of its
  type (RSA: RS*/PS*; EC: the ES* of its curve; Ed25519/Ed448: EdDSA). ``none`` is never
  accepted, nor an HMAC algorithm with a public key (the classic forgery: sign HS256 with the
  public key as the secret). A secret that is a PEM key is refused: say ``public_key=``.
* **Secure defaults.** HMAC secrets of fewer than 32 bytes and RSA keys under 2048 bits are
  refused. A token carrying ``aud`` is refused unless an audience is configured, and when one
  is, a token without ``aud`` is refused (PyJWT's rules); likewise ``iss``.
* **A token present but invalid is never anonymous.** An expired or badly signed token gets 401
  even where anonymous access would be allowed: a client must learn that its token went bad.
* **Where the token comes from**, first found wins: the ``Authorization: Bearer`` header
  (explicit, non-browser clients), the ``access_token`` query parameter (explicit, for
  ``EventSource``, which cannot set headers), then the cookie (ambient: a stale cookie must not
  beat a token the page chose). The hub's access log redacts ``access_token``; an embedded
  application that logs query strings should do the same.
* **401 without a token says no error code** (``WWW-Authenticate: Bearer``), as RFC 6750
  section 3.1 asks; with a bad token it says ``Bearer error="invalid_token"``. Messages name
  what was wrong (expired, signature, audience ...) and never repeat the token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import tornado.httputil
import tornado.web

from .broker.base import validate_channel
from .errors import (
    AccessDeniedError,
    AuthenticationError,
    InvalidChannelError,
    InvalidKeyError,
)
from .handler import EventStreamHandler
from .protocol import Event

if TYPE_CHECKING:
    import jwt

__all__ = [
    "CLAIM",
    "COOKIE",
    "MAX_TOKEN_LENGTH",
    "QUERY_PARAMETER",
    "TOKEN_EXPIRED",
    "Grants",
    "TokenVerifier",
    "create_token",
    "matches",
    "token_expired_event",
    "token_from_request",
    "validate_pattern",
]

#: the claim holding the grants
CLAIM = "tornado_sse"
#: the default name of the cookie holding a token
COOKIE = "tornado_sse_token"
#: the query parameter holding a token (for EventSource, which cannot set headers)
QUERY_PARAMETER = "access_token"
#: the name of the event that ends a stream whose token expired
TOKEN_EXPIRED = "token-expired"  # noqa: S105 (an event name, not a secret)
#: characters of a token beyond which it is refused unread
MAX_TOKEN_LENGTH = 8192
#: the shortest HMAC secret accepted, in bytes (RFC 7518 section 3.2, for HS256)
MIN_SECRET_BYTES = 32
#: the smallest RSA key accepted, in bits
MIN_RSA_BITS = 2048

_HMAC = (("HS256", 32), ("HS384", 48), ("HS512", 64))
_EC_CURVES = {
    "secp256r1": "ES256",
    "secp384r1": "ES384",
    "secp521r1": "ES512",
    "secp256k1": "ES256K",
}


def validate_pattern(pattern: object) -> str:
    """Return *pattern*, a channel name or a prefix ending in ``*``, or raise `.InvalidKeyError`.

    ``room/*`` matches ``room/1`` and ``room/a/b``; ``*`` matches every channel; ``*`` anywhere
    but at the end is refused.
    """
    if not isinstance(pattern, str):
        raise InvalidKeyError(f"a channel pattern must be a string, not {type(pattern).__name__}")
    prefix = pattern[:-1] if pattern.endswith("*") else pattern
    if prefix or not pattern.endswith("*"):
        try:
            validate_channel(prefix)
        except InvalidChannelError as exc:
            raise InvalidKeyError(f"invalid channel pattern {pattern!r}: {exc}") from exc
    return pattern


def matches(pattern: str, channel: str) -> bool:
    """Whether *pattern* (exact, or a prefix ending in ``*``) covers *channel*."""
    if pattern.endswith("*"):
        return channel.startswith(pattern[:-1])
    return channel == pattern


@dataclass(frozen=True, slots=True)
class Grants:
    """What a verified token allows.

    :ivar subject: the ``sub`` claim (``None`` if absent).
    :ivar subscribe: patterns of the channels it may follow.
    :ivar publish: patterns of the channels it may publish to.
    :ivar expires: when the token stops being accepted, a `time.time` value: its ``exp`` plus
        the verifier's leeway (``None``: it never expires).
    :ivar claims: every claim of the token, for an application's own (a tenant, roles).
    """

    subject: str | None = None
    subscribe: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    expires: float | None = None
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def may_subscribe(self, channel: str) -> bool:
        """Whether a ``subscribe`` pattern covers *channel*."""
        return any(matches(pattern, channel) for pattern in self.subscribe)

    def may_publish(self, channel: str) -> bool:
        """Whether a ``publish`` pattern covers *channel*."""
        return any(matches(pattern, channel) for pattern in self.publish)

    def check_subscribe(self, channel: str) -> None:
        """Raise `.AccessDeniedError` (403 naming *channel*) unless it may be followed."""
        if not self.may_subscribe(channel):
            raise AccessDeniedError(channel, "subscribe")

    def check_publish(self, channel: str) -> None:
        """Raise `.AccessDeniedError` (403 naming *channel*) unless it may be published to."""
        if not self.may_publish(channel):
            raise AccessDeniedError(channel, "publish")


def token_expired_event(grants: Grants) -> Event:
    """The event that ends a stream at its token's expiry: named ``token-expired``, without an
    id (the client resumes after the last event it received), with JSON data giving ``exp``
    (data, since browsers do not dispatch an event with none)."""
    return Event(json.dumps({"exp": grants.claims.get("exp", grants.expires)}), event=TOKEN_EXPIRED)


def token_from_request(
    request: tornado.httputil.HTTPServerRequest, cookie: str | None = COOKIE
) -> str | None:
    """The token a request carries: its ``Authorization: Bearer`` header, else its
    ``access_token`` query parameter, else the cookie named *cookie* (``None``: no cookie);
    ``None`` when it carries none.

    An ``Authorization`` header of another scheme (``Basic``) is not a token and is passed over.

    :raises AuthenticationError: for a ``Bearer`` header without a token, several
        ``access_token`` parameters, or a token longer than `MAX_TOKEN_LENGTH`.
    """
    token: str | None = None
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() == "bearer":
            token = value.strip()
            if not token:
                raise AuthenticationError("malformed Authorization header: Bearer without a token")
    if token is None:
        values = request.query_arguments.get(QUERY_PARAMETER, [])
        if len(values) > 1:
            raise AuthenticationError(f"more than one {QUERY_PARAMETER} parameter")
        if values:
            token = values[0].decode("latin-1")
    if token is None and cookie:
        morsel = request.cookies.get(cookie)
        if morsel is not None and morsel.value:
            token = morsel.value
    if token is not None and len(token) > MAX_TOKEN_LENGTH:
        raise AuthenticationError(f"token too long (more than {MAX_TOKEN_LENGTH} characters)")
    return token


def _jwt() -> Any:
    """PyJWT, or an ImportError saying which extra brings it."""
    try:
        import jwt
    except ImportError as exc:
        raise ImportError(
            "signed tokens need PyJWT: pip install 'tornado-sse[jwt]'", name="jwt"
        ) from exc
    return jwt


def _reason(exc: jwt.PyJWTError) -> str:
    jwt = _jwt()
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token lacks the {exc.claim!r} claim"
    reasons = (
        (jwt.ExpiredSignatureError, "token expired"),
        (jwt.ImmatureSignatureError, "token not yet valid"),
        (jwt.InvalidAudienceError, "token audience not accepted"),
        (jwt.InvalidIssuerError, "token issuer not accepted"),
        (jwt.InvalidSignatureError, "token signature invalid"),
        (jwt.InvalidAlgorithmError, "token algorithm not accepted"),
        (jwt.DecodeError, "token malformed"),
    )
    for kind, reason in reasons:
        if isinstance(exc, kind):
            return reason
    return "token invalid"


def _patterns(grants: Mapping[str, Any], key: str) -> tuple[str, ...]:
    values = grants.get(key, [])
    if not isinstance(values, list):
        raise AuthenticationError(f"token grants malformed: {CLAIM}.{key} is not a list")
    try:
        return tuple(validate_pattern(value) for value in values)
    except InvalidKeyError as exc:
        raise AuthenticationError(f"token grants malformed: {exc}") from exc


class TokenVerifier:
    """Verifies tokens with one key and returns their `Grants`.

    Give exactly one of:

    :param secret: an HMAC secret (``str`` as UTF-8, or ``bytes``) of at least 32 bytes; tokens
        signed HS256 (and HS384 from 48 bytes, HS512 from 64) are accepted.
    :param public_key: a PEM public key (RSA of 2048 bits or more, EC P-256/384/521 or
        secp256k1, Ed25519, Ed448); tokens signed with its type's algorithms are accepted.
    :param audience: when set, a token's ``aud`` must name it (and must be present).
    :param issuer: when set, a token's ``iss`` must be it (and must be present).
    :param leeway: seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``. Default 0.
    :param cookie: the cookie `authenticate` reads a token from (``None``: none).
    :raises InvalidKeyError: for a key that cannot be used (too short, not a public key ...).
    """

    def __init__(
        self,
        *,
        secret: str | bytes | None = None,
        public_key: str | bytes | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        cookie: str | None = COOKIE,
    ) -> None:
        if (secret is None) == (public_key is None):
            raise InvalidKeyError("give exactly one of secret= (HMAC) and public_key= (PEM)")
        _jwt()
        self.audience = audience
        self.issuer = issuer
        self.leeway = float(leeway)
        self.cookie = cookie
        self._key: Any
        if secret is not None:
            self._key, self.algorithms = _hmac_key(secret)
        else:
            assert public_key is not None
            self._key, self.algorithms = _public_key(public_key)

    def verify(self, token: str) -> Grants:
        """The grants of *token*, checked: signature, algorithm, ``exp``, ``nbf``, ``aud``,
        ``iss``, and the form of the ``tornado_sse`` claim.

        :raises AuthenticationError: saying what is wrong (never repeating the token).
        """
        if not isinstance(token, str) or not token:
            raise AuthenticationError("token missing")
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthenticationError(f"token too long (more than {MAX_TOKEN_LENGTH} characters)")
        jwt = _jwt()
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=list(self.algorithms),
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
            )
        except jwt.PyJWTError as exc:
            raise AuthenticationError(_reason(exc)) from exc
        except (ValueError, TypeError) as exc:  # a key PyJWT cannot prepare for this header
            raise AuthenticationError("token malformed") from exc
        grants = claims.get(CLAIM, {})
        if not isinstance(grants, dict):
            raise AuthenticationError(f"token grants malformed: {CLAIM} is not an object")
        subject = claims.get("sub")
        expires = claims.get("exp")
        return Grants(
            subject=subject if isinstance(subject, str) else None,
            subscribe=_patterns(grants, "subscribe"),
            publish=_patterns(grants, "publish"),
            expires=float(expires) + self.leeway if expires is not None else None,
            claims=claims,
        )

    def authenticate(
        self, handler: tornado.web.RequestHandler, *, required: bool = True
    ) -> Grants | None:
        """The grants of the token *handler*'s request carries (see `token_from_request`).

        On an `.EventStreamHandler`, the stream is also closed at the token's expiry with a
        ``token-expired`` event (`token_expired_event`). Call it from `get_current_user`.

        :param required: without a token, raise (the default) or return ``None`` (anonymous:
            your `check_channel` then decides what anonymous requests may follow). A token
            present but invalid raises either way.
        :raises AuthenticationError: no token (when required) or an invalid one: 401.
        """
        token = token_from_request(handler.request, self.cookie)
        if token is None:
            if not required:
                return None
            raise AuthenticationError("a token is required", error=None)
        grants = self.verify(token)
        if grants.expires is not None and isinstance(handler, EventStreamHandler):
            handler.close_at(grants.expires, token_expired_event(grants))
        return grants


def _hmac_key(secret: str | bytes) -> tuple[bytes, tuple[str, ...]]:
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if key.lstrip().startswith(b"-----BEGIN"):
        raise InvalidKeyError("the secret is a PEM key: pass a public key as public_key=")
    if len(key) < MIN_SECRET_BYTES:
        raise InvalidKeyError(
            f"an HMAC secret needs at least {MIN_SECRET_BYTES} bytes (it has {len(key)}): "
            "make one with python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return key, tuple(name for name, size in _HMAC if len(key) >= size)


def _public_key(pem: str | bytes) -> tuple[Any, tuple[str, ...]]:
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = pem.encode("ascii", "replace") if isinstance(pem, str) else bytes(pem)
    if b"PRIVATE KEY" in data:
        raise InvalidKeyError("this is a private key: give the hub only the public key")
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise InvalidKeyError(f"not a PEM public key: {exc}") from exc
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise InvalidKeyError(
                f"an RSA key needs at least {MIN_RSA_BITS} bits (it has {key.key_size})"
            )
        return key, ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = _EC_CURVES.get(key.curve.name)
        if algorithm is None:
            raise InvalidKeyError(f"EC curve {key.curve.name} has no JWT algorithm")
        return key, (algorithm,)
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return key, ("EdDSA",)
    raise InvalidKeyError(f"unsupported public key type {type(key).__name__}")


def create_token(
    key: str | bytes,
    *,
    subject: str | None = None,
    subscribe: Iterable[str] = (),
    publish: Iterable[str] = (),
    ttl: float | None = 3600.0,
    algorithm: str | None = None,
    audience: str | None = None,
    issuer: str | None = None,
    claims: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> str:
    """A signed token granting *subscribe* and *publish* patterns, for tests, scripts and your
    own backend (``tornado-sse token`` prints one).

    :param key: the HMAC secret (``HS*``) or the PEM private key (``RS*``, ``ES*``, ``EdDSA``).
    :param algorithm: default: HS256 for a secret; for a private key, RS256 (RSA), the ES* of
        its curve (EC) or EdDSA (Ed25519, Ed448).
    :param ttl: seconds until ``exp``; ``None`` for a token that never expires.
    :param claims: further claims (they may not replace ``tornado_sse``).
    :param now: the issue time (`time.time` value) instead of the clock's.
    :raises InvalidKeyError: for an invalid pattern, ``none`` or an unknown algorithm.
    """
    jwt = _jwt()
    if algorithm is None:
        algorithm = _signing_algorithm(key)
    if algorithm.lower() == "none" or algorithm not in jwt.algorithms.get_default_algorithms():
        raise InvalidKeyError(f"cannot sign with algorithm {algorithm!r}")
    if algorithm.startswith("HS"):
        _hmac_key(key)
    issued = int(now if now is not None else time.time())
    payload: dict[str, Any] = dict(claims or {})
    payload["iat"] = issued
    payload[CLAIM] = {
        "subscribe": [validate_pattern(p) for p in subscribe],
        "publish": [validate_pattern(p) for p in publish],
    }
    if subject is not None:
        payload["sub"] = subject
    if ttl is not None:
        payload["exp"] = issued + int(ttl)
    if audience is not None:
        payload["aud"] = audience
    if issuer is not None:
        payload["iss"] = issuer
    try:
        return str(jwt.encode(payload, key, algorithm=algorithm))
    except (ValueError, TypeError, jwt.InvalidKeyError) as exc:
        raise InvalidKeyError(f"cannot sign with this key as {algorithm}: {exc}") from exc


def _signing_algorithm(key: str | bytes) -> str:
    data = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    if not data.lstrip().startswith(b"-----BEGIN"):
        return "HS256"
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        private = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidKeyError(f"not a PEM private key without a password: {exc}") from exc
    if isinstance(private, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(private, ec.EllipticCurvePrivateKey):
        algorithm = _EC_CURVES.get(private.curve.name)
        if algorithm is not None:
            return algorithm
    if isinstance(private, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return "EdDSA"
    raise InvalidKeyError(f"no JWT algorithm for a {type(private).__name__}")
