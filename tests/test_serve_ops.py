"""Operating ``tornado-sse serve``: its log keeps credentials out. A real hub process
(tests.test_server.start_hub).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import wait_until
from tests.test_server import Hub, start_hub
from tornado_sse.server import is_secret_name


@pytest.fixture(scope="module")
def json_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """A hub logging JSON lines (so that the access line's ``path`` field is checked too)."""
    hub = start_hub(tmp_path_factory.mktemp("ops") / "hub.log", "--log-json")
    yield hub
    hub.stop()


# ---------------------------------------------------------------------- log redaction

#: query parameter -> its secret value; every one must be written as REDACTED
SECRETS = {
    "password": "pw-value-1",
    "api-key": "apikey-value-2",
    "api_token": "apitoken-value-3",
    "API_KEY": "apikey-value-4",
    "apiKey": "apikey-value-5",
    "X-Amz-Signature": "sig-value-6",
    "client_secret": "secret-value-7",
    "sessionId": "session-value-8",
    "passwd": "passwd-value-9",
    "access_token": "token-value-10",
    "Authorization": "auth-value-11",
    "pwd": "pwd-value-12",
}


@pytest.mark.gen_test(timeout=20)
async def test_access_log_redacts_the_credential_family(json_hub: Hub) -> None:
    query = "&".join(f"{name}={value}" for name, value in SECRETS.items())
    assert json_hub.get(f"/healthz?channel=kept-visible&keyword=kept-too&{query}").is_success
    await wait_until(lambda: "kept-visible" in json_hub.log())
    log = json_hub.log()
    for name, value in SECRETS.items():
        assert value not in log, f"{name}'s value reached the log"
        assert f"{name}=REDACTED" in log
    assert "channel=kept-visible" in log and "keyword=kept-too" in log


@pytest.mark.gen_test(timeout=20)
async def test_tornados_own_warnings_are_redacted(json_hub: Hub) -> None:
    # Tornado logs "400 GET <uri> (client): Invalid unicode in channel" itself, quoting the URI.
    reply = json_hub.get("/events?channel=%FF&password=leaky-value&api-key=leaky-key")
    assert reply.status_code == 400
    await wait_until(lambda: "Invalid unicode" in json_hub.log())
    log = json_hub.log()
    assert "leaky-value" not in log and "leaky-key" not in log
    assert "password=REDACTED" in log


@pytest.mark.parametrize(
    "name",
    ["token", "Token", "pass-word", "user.password", "PHPSESSID", "refreshToken", "sig", "otp"],
)
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name", ["channel", "last_event_id", "keyword", "id", "event", "monkey", "author"]
)
def test_ordinary_names(name: str) -> None:
    assert not is_secret_name(name)
