"""Signed tokens through real Tornado servers on loopback (issue 13): `tornado_sse.auth` in an
embedded `EventStreamHandler`, read by a raw socket client and by the reconnecting
`tornado_sse.client.EventSource`; the ``tornado-sse token`` command as a real process.

Bad tokens of every kind get 401 (never 500), missing grants 403 naming the channel, and a token
that expires mid-stream ends the stream with ``token-expired``; the client takes a fresh token
and resumes with nothing lost or repeated.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
from typing import Any

import jwt
import pytest
import tornado.web
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.helpers import RawStream, wait_until
from tornado_sse import (
    ConnectionSet,
    Event,
    EventStreamError,
    EventStreamHandler,
    InProcessBroker,
    InvalidKeyError,
    Metrics,
    auth,
)
from tornado_sse.cli import main
from tornado_sse.client import TOKEN_EXPIRED, EventSource

TIMEOUT = 20
SECRET = "s3cret-for-tests-only-0123456789abcdef"  # 38 bytes: HS256 only
OTHER_SECRET = "another-secret-for-tests-0123456789abcdef"


def _pem_public(private: Any) -> bytes:
    return private.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _pem_private(private: Any) -> bytes:
    return private.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PUBLIC = _pem_public(RSA_KEY)
RSA_PRIVATE = _pem_private(RSA_KEY)

HS = auth.TokenVerifier(secret=SECRET)
RS = auth.TokenVerifier(public_key=RSA_PUBLIC, audience="hub", issuer="https://issuer.example")


class Private(EventStreamHandler):
    """Follows what the token grants; ``?optional=1`` lets anonymous requests follow ``news``."""

    def get_current_user(self) -> auth.Grants | None:
        verifier: auth.TokenVerifier = self.settings["verifier"]
        return verifier.authenticate(self, required=not self.get_query_argument("optional", ""))

    def check_channel(self, channel: str) -> bool:
        grants: auth.Grants | None = self.current_user
        if grants is None:
            return channel == "news"
        grants.check_subscribe(channel)
        return True


class PrivateRS(Private):
    """The same, verified with an RSA public key, an audience and an issuer."""

    def get_current_user(self) -> auth.Grants | None:
        return RS.authenticate(self)


#: the status of every request answered by the test's app, in order
STATUSES: list[int] = []


@pytest.fixture(autouse=True)
def _clear_statuses() -> None:
    STATUSES.clear()


@pytest.fixture
def broker() -> InProcessBroker:
    return InProcessBroker(history_size=1000)


@pytest.fixture
def app(broker: InProcessBroker) -> tornado.web.Application:
    return tornado.web.Application(
        [(r"/events", Private), (r"/rs", PrivateRS)],
        sse_broker=broker,
        sse_connections=ConnectionSet(prune_interval=0.05),
        sse_metrics=Metrics(),
        sse_retry_interval=0.05,
        verifier=HS,
        statuses=STATUSES,
        log_function=lambda handler: STATUSES.append(handler.get_status()),
    )


def token(**kwargs: Any) -> str:
    kwargs.setdefault("subscribe", ["user/alice", "room/*"])
    kwargs.setdefault("subject", "alice")
    return auth.create_token(kwargs.pop("key", SECRET), **kwargs)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A token made by hand, as an attacker would (PyJWT refuses to make these)."""
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())
    signature = b"" if key is None else hmac.new(key, head.encode(), hashlib.sha256).digest()
    return head + "." + _b64(signature)


def grants_payload(**extra: Any) -> dict[str, Any]:
    return {
        "sub": "mallory",
        "exp": int(time.time()) + 600,
        "tornado_sse": {"subscribe": ["*"]},
        **extra,
    }


async def opened(port: int, path: str, headers: dict[str, str] | None = None) -> RawStream:
    stream = await RawStream.open(port, path, headers)
    if stream.status == 200:
        await stream.read_until(lambda s: s.parser.last_event_id != "")
    else:
        await stream.read_to_end()
    return stream


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


# ---------------------------------------------------------------------- bad tokens: 401


BAD_HS = {
    "wrong signature": lambda: token(key=OTHER_SECRET),
    "alg none": lambda: forged({"alg": "none", "typ": "JWT"}, grants_payload(), None),
    "alg none, signed": lambda: forged({"alg": "none"}, grants_payload(), SECRET.encode()),
    "expired": lambda: token(now=time.time() - 7200, ttl=3600),
    "not yet valid": lambda: token(claims={"nbf": int(time.time()) + 600}),
    "audience not configured": lambda: token(audience="elsewhere"),
    "garbage": lambda: "garbage",
    "three garbage parts": lambda: "a.b.c",
    "bad base64": lambda: "eyJ!!!.eyJ$$$.sig",
    "10 KB long": lambda: token(claims={"pad": "x" * 10_000}),
    "grants not an object": lambda: forged(
        {"alg": "HS256"}, grants_payload(tornado_sse="everything"), SECRET.encode()
    ),
    "subscribe not a list": lambda: forged(
        {"alg": "HS256"}, grants_payload(tornado_sse={"subscribe": "*"}), SECRET.encode()
    ),
    "a pattern with a star inside": lambda: forged(
        {"alg": "HS256"}, grants_payload(tornado_sse={"subscribe": ["a*b"]}), SECRET.encode()
    ),
    "sub not a string": lambda: forged({"alg": "HS256"}, grants_payload(sub=42), SECRET.encode()),
    "exp not a number": lambda: forged(
        {"alg": "HS256"}, grants_payload(exp="tomorrow"), SECRET.encode()
    ),
}


@pytest.mark.gen_test(timeout=TIMEOUT)
@pytest.mark.parametrize("kind", sorted(BAD_HS))
async def test_bad_tokens_are_401_with_a_challenge(port: int, kind: str) -> None:
    bad = BAD_HS[kind]()
    for headers, path in [
        (bearer(bad), "/events?channel=user/alice"),
        ({}, f"/events?channel=user/alice&access_token={bad}"),
        ({"Cookie": f"tornado_sse_token={bad}"}, "/events?channel=user/alice"),
    ]:
        stream = await opened(port, path, headers)
        assert stream.status == 401, (kind, stream.raw)
        assert stream.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        message = stream.raw.decode()
        assert message.startswith("token"), message
        assert bad not in message


BAD_RS = {
    "HS256 signed with the public key": lambda: forged(
        {"alg": "HS256", "typ": "JWT"},
        grants_payload(aud="hub", iss="https://issuer.example"),
        RSA_PUBLIC,
    ),
    "signed by another RSA key": lambda: token(
        key=_pem_private(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        audience="hub",
        issuer="https://issuer.example",
    ),
    "wrong audience": lambda: token(
        key=RSA_PRIVATE, audience="other", issuer="https://issuer.example"
    ),
    "no audience": lambda: token(key=RSA_PRIVATE, issuer="https://issuer.example"),
    "wrong issuer": lambda: token(key=RSA_PRIVATE, audience="hub", issuer="https://evil.example"),
    "an HMAC token": lambda: token(audience="hub", issuer="https://issuer.example"),
}


@pytest.mark.gen_test(timeout=TIMEOUT)
@pytest.mark.parametrize("kind", sorted(BAD_RS))
async def test_bad_tokens_for_a_public_key_are_401(port: int, kind: str) -> None:
    stream = await opened(port, "/rs?channel=user/alice", bearer(BAD_RS[kind]()))
    assert stream.status == 401, (kind, stream.raw)
    assert stream.headers["www-authenticate"] == 'Bearer error="invalid_token"'


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_messages_say_what_is_wrong(port: int) -> None:
    cases = {
        BAD_HS["expired"](): "token expired",
        BAD_HS["not yet valid"](): "token not yet valid",
        BAD_HS["wrong signature"](): "token signature invalid",
        BAD_HS["alg none"](): "token algorithm not accepted",
        BAD_HS["garbage"](): "token malformed",
        BAD_HS["10 KB long"](): "token too long (more than 8192 characters)",
    }
    for bad, message in cases.items():
        stream = await opened(port, "/events?channel=user/alice", bearer(bad))
        assert stream.raw.decode().strip() == message


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_good_rsa_token_opens(port: int) -> None:
    good = token(key=RSA_PRIVATE, audience="hub", issuer="https://issuer.example")
    assert jwt.get_unverified_header(good)["alg"] == "RS256"
    stream = await opened(port, "/rs?channel=user/alice", bearer(good))
    assert stream.status == 200
    stream.close()


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_no_token_is_401_without_an_error_code(port: int) -> None:
    stream = await opened(port, "/events?channel=user/alice")
    assert stream.status == 401
    assert stream.headers["www-authenticate"] == "Bearer"
    assert stream.raw.decode().strip() == "a token is required"


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_bad_token_is_never_taken_for_anonymous(port: int) -> None:
    """Where anonymous requests may follow ``news``, an expired token still gets 401."""
    anonymous = await opened(port, "/events?channel=news&optional=1")
    assert anonymous.status == 200
    anonymous.close()
    expired = await opened(port, "/events?channel=news&optional=1", bearer(BAD_HS["expired"]()))
    assert expired.status == 401
    assert expired.raw.decode().strip() == "token expired"


@pytest.mark.gen_test(timeout=TIMEOUT)
@pytest.mark.parametrize(
    ("headers", "path", "message"),
    [
        ({"Authorization": "Bearer "}, "", "malformed Authorization header"),
        ({}, "&access_token=a&access_token=b", "more than one access_token parameter"),
    ],
)
async def test_malformed_credentials_are_401(
    port: int, headers: dict[str, str], path: str, message: str
) -> None:
    stream = await opened(port, "/events?channel=user/alice" + path, headers)
    assert stream.status == 401
    assert stream.raw.decode().startswith(message)


# ---------------------------------------------------------------------- grants: 403


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_grants_decide_channels(port: int) -> None:
    good = token(subscribe=["user/alice", "room/*"])
    for channel in ["user/alice", "room/1", "room/a/b", "room/"]:
        stream = await opened(port, f"/events?channel={channel}", bearer(good))
        assert stream.status == 200, channel
        stream.close()
    for channel in ["user/alicex", "user/bob", "room", "news"]:
        stream = await opened(port, f"/events?channel=room/1&channel={channel}", bearer(good))
        assert stream.status == 403, channel
        assert stream.raw.decode().strip() == f"not allowed to follow channel {channel!r}"
        assert "www-authenticate" not in stream.headers


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_token_sources_and_their_order(port: int) -> None:
    alice = token(subscribe=["user/alice"])
    bob = token(subject="bob", subscribe=["user/bob"])
    cookie = {"Cookie": f"tornado_sse_token={alice}"}
    for headers, query in [
        (bearer(alice), ""),
        ({}, f"&access_token={alice}"),
        (cookie, ""),
        ({**cookie, "Authorization": "Basic dXNlcjpwYXNz"}, ""),  # not a token: passed over
    ]:
        stream = await opened(port, "/events?channel=user/alice" + query, headers)
        assert stream.status == 200, (headers, query)
        stream.close()
    # the explicit token wins over the ambient cookie; the header over the query
    stream = await opened(port, f"/events?channel=user/bob&access_token={bob}", cookie)
    assert stream.status == 200
    stream.close()
    stream = await opened(port, f"/events?channel=user/bob&access_token={bob}", bearer(alice))
    assert stream.status == 403


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_replayed_history_is_authorized_like_live_events(
    port: int, broker: InProcessBroker
) -> None:
    first = await broker.publish("user/bob", "bob's secret")
    await broker.publish("user/alice", "for alice")
    stream = await opened(
        port, "/events?channel=user/bob", {**bearer(token()), "Last-Event-ID": first}
    )
    assert stream.status == 403
    assert b"secret" not in stream.raw


# ---------------------------------------------------------------------- expiry


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_stream_ends_at_its_token_expiry(port: int, broker: InProcessBroker) -> None:
    expires = int(time.time()) + 2
    short = token(claims={}, now=expires - 3600)
    stream = await opened(port, "/events?channel=user/alice", bearer(short))
    sent = await broker.publish("user/alice", "before")
    await stream.read_to_end(timeout=10)
    assert stream.events[0] == Event("before", id=sent)
    assert stream.events[-1].event == "token-expired"
    assert stream.events[-1].id is None
    assert json.loads(stream.events[-1].data) == {"exp": expires}
    assert time.time() >= expires
    again = await opened(port, "/events?channel=user/alice", bearer(short))
    assert again.status == 401
    assert again.raw.decode().strip() == "token expired"


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_client_takes_a_fresh_token_and_resumes_exactly(
    port: int, broker: InProcessBroker
) -> None:
    """Events published before, during and after the expiry arrive once each, in order."""
    issued: list[str] = []

    async def fresh_token() -> str:
        await asyncio.sleep(0)
        ttl = 2 if not issued else 3600
        issued.append(token(ttl=ttl))
        return issued[-1]

    url = f"http://127.0.0.1:{port}/events?channel=user/alice"
    published: list[str] = []
    stop = asyncio.Event()

    async def publisher() -> None:
        number = 0
        while not stop.is_set():
            await broker.publish("user/alice", str(number))
            published.append(str(number))
            number += 1
            await asyncio.sleep(0.02)

    received: list[Event] = []
    after_expiry = -1
    async with EventSource(url, token=fresh_token, retry=0.05) as source:
        await wait_until(lambda: source.last_event_id)  # primed: the stream is subscribed
        task = asyncio.create_task(publisher())
        try:
            async for event in source:
                received.append(event)
                if event.event == TOKEN_EXPIRED:
                    after_expiry = 0
                elif after_expiry >= 0:
                    after_expiry += 1
                    if after_expiry == 20:
                        break
        finally:
            stop.set()
            await task
        assert source.connections == 2
    assert len(issued) == 2
    assert 401 not in STATUSES  # renewed at token-expired, not after a refusal
    assert [e.event for e in received].count(TOKEN_EXPIRED) == 1
    data = [e.data for e in received if e.event is None]
    assert len(data) > 20
    assert data == published[: len(data)]  # nothing lost, nothing repeated, in order


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_a_fixed_token_that_expired_stops_the_client(port: int) -> None:
    short = token(now=int(time.time()) + 2 - 3600)
    url = f"http://127.0.0.1:{port}/events?channel=user/alice"
    events: list[Event] = []
    with pytest.raises(EventStreamError) as caught:
        async with EventSource(url, token=short, retry=0.05) as source:
            async for event in source:
                events.append(event)
    assert caught.value.status == 401
    assert caught.value.body == "token expired"
    assert [e.event for e in events] == [TOKEN_EXPIRED]
    assert source.connections == 1


@pytest.mark.gen_test(timeout=TIMEOUT)
async def test_client_renews_a_token_that_expired_while_away(port: int) -> None:
    """A 401 to a token the function gave earlier takes a fresh one, once; a 401 to a fresh
    token stops the client."""
    calls: list[str] = []

    def tokens() -> str:
        calls.append("call")
        return BAD_HS["expired"]() if len(calls) != 2 else token()

    url = f"http://127.0.0.1:{port}/events?channel=user/alice"
    with pytest.raises(EventStreamError) as caught:
        async with EventSource(url, token=tokens) as source:
            await asyncio.wait_for(source.__anext__(), TIMEOUT)
    assert caught.value.status == 401 and calls == ["call"]  # a fresh token refused: stop

    calls.clear()
    calls.append("first")  # the next call (the second) gives a good token
    source = EventSource(url, token=tokens)
    source._token = BAD_HS["expired"]()  # as if it had expired while the network was down
    async with source:
        await wait_until(lambda: source.connected)
    assert calls == ["first", "call"]


def test_client_token_arguments() -> None:
    url = "http://127.0.0.1:1/events"
    with pytest.raises(ValueError, match="either token or an Authorization header"):
        EventSource(url, token="t", headers={"authorization": "Bearer x"})
    with pytest.raises(ValueError, match="printable ASCII"):
        EventSource(url, token="a b")
    with pytest.raises(TypeError):
        EventSource(url, token=42)  # type: ignore[arg-type]
    assert TOKEN_EXPIRED == auth.TOKEN_EXPIRED


# ---------------------------------------------------------------------- keys and patterns


def test_keys_are_checked_and_algorithms_pinned() -> None:
    assert HS.algorithms == ("HS256",)
    assert auth.TokenVerifier(secret="x" * 64).algorithms == ("HS256", "HS384", "HS512")
    assert RS.algorithms[:3] == ("RS256", "RS384", "RS512")
    p256 = ec.generate_private_key(ec.SECP256R1())
    assert auth.TokenVerifier(public_key=_pem_public(p256)).algorithms == ("ES256",)
    ed = ed25519.Ed25519PrivateKey.generate()
    verifier = auth.TokenVerifier(public_key=_pem_public(ed))
    assert verifier.algorithms == ("EdDSA",)
    grants = verifier.verify(auth.create_token(_pem_private(ed), subscribe=["a"]))
    assert grants.subscribe == ("a",)
    es = auth.create_token(_pem_private(p256), subscribe=["a"])
    assert jwt.get_unverified_header(es)["alg"] == "ES256"

    refused = {
        "at least 32 bytes": {"secret": "short"},
        "is a PEM key": {"secret": RSA_PUBLIC.decode()},
        "private key": {"public_key": RSA_PRIVATE},
        "not a PEM public key": {"public_key": "hello"},
        "exactly one": {},
    }
    for message, kwargs in refused.items():
        with pytest.raises(InvalidKeyError, match=message):
            auth.TokenVerifier(**kwargs)
    with pytest.raises(InvalidKeyError, match="exactly one"):
        auth.TokenVerifier(secret=SECRET, public_key=RSA_PUBLIC)
    with pytest.raises(InvalidKeyError, match="2048 bits"):
        small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        auth.TokenVerifier(public_key=_pem_public(small))
    with pytest.raises(InvalidKeyError, match="algorithm 'none'"):
        auth.create_token(SECRET, algorithm="none")


def test_patterns() -> None:
    assert auth.matches("*", "anything")
    assert auth.matches("room/*", "room/1")
    assert not auth.matches("room/*", "room")
    assert auth.matches("room", "room")
    assert not auth.matches("room", "room/1")
    for bad in ["a*b", "**", "", " a", "a b*", 42]:
        with pytest.raises(InvalidKeyError):
            auth.validate_pattern(bad)
    grants = HS.verify(token(subscribe=["a/*"], publish=["b"]))
    assert grants.may_subscribe("a/x") and not grants.may_subscribe("b")
    assert grants.may_publish("b") and not grants.may_publish("a/x")
    assert grants.subject == "alice"


# ---------------------------------------------------------------------- the command


def test_token_command_prints_a_token_the_verifier_accepts() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tornado_sse.cli",
            "token",
            "--sub",
            "alice",
            "--subscribe",
            "user/alice",
            "--publish",
            "room/*",
            "--ttl",
            "3600",
        ],
        env={"TORNADO_SSE_JWT_SECRET": SECRET, "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    grants = HS.verify(result.stdout.strip())
    assert grants.subject == "alice"
    assert grants.subscribe == ("user/alice",)
    assert grants.publish == ("room/*",)
    assert grants.expires is not None and 3590 < grants.expires - time.time() <= 3600


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--secret", "short", "--subscribe", "a"], "at least 32 bytes"),
        (["--secret", SECRET, "--subscribe", "a*b"], "invalid channel pattern"),
        (["--secret", SECRET], "at least one --subscribe or --publish"),
        (["--subscribe", "a"], "give one of --secret"),
    ],
)
def test_token_command_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["token", *args], env={"TORNADO_SSE_JWT_SECRET": None})
    assert result.exit_code == 2
    assert message in result.output
