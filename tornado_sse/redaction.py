"""Keeping credentials out of logs and messages (standard library only).

A URL may carry a credential in its query (``?token=...``, ``?api-key=...``) or its userinfo
(``redis://:password@host``). Whatever we log or put in an error message goes through here: the
hub's access log and every line of its log handler (`RedactingFilter`), the client's log lines
and error messages. Which query parameters count as credentials is a documented family
(docs/serve.md, "Logging"), matched on the words of the name, so that ``password``,
``api-key``, ``API_KEY``, ``apiKey``, ``api_token`` and ``X-Amz-Signature`` are all caught
(issue 12, item 11).
"""

from __future__ import annotations

import logging
import re
import urllib.parse

__all__ = ["RedactingFilter", "is_secret_name", "redact_text", "redact_url"]

#: a query parameter is a credential (its value is logged as ``REDACTED``) when one of the
#: words of its name (split at anything but letters and digits, case-insensitive) is one of
#: these, or its name without separators ends with one of `_SECRET_ENDINGS` (``accessToken``,
#: ``PHPSESSID``); docs/serve.md ("Logging") lists the family
_SECRET_WORDS = frozenset(
    {
        "token",
        "secret",
        "password",
        "passwd",
        "passphrase",
        "pass",
        "pwd",
        "key",
        "apikey",
        "auth",
        "authorization",
        "signature",
        "sig",
        "session",
        "sessionid",
        "sid",
        "credential",
        "credentials",
        "jwt",
        "bearer",
        "cookie",
        "otp",
    }
)
_SECRET_ENDINGS = (
    "token",
    "secret",
    "password",
    "passwd",
    "apikey",
    "accesskey",
    "privatekey",
    "secretkey",
    "sessionid",
    "sessid",
    "signature",
    "credential",
    "credentials",
    "auth",
)
_NAME_WORDS = re.compile(r"[^a-z0-9]+")
#: ``name=value`` of a query string inside a log message (an access line, Tornado's warnings)
_QUERY_PAIR = re.compile(r"(?<=[?&;])([^=&;#\s'\"?]+)=([^&;#\s'\"]*)")


def is_secret_name(name: str) -> bool:
    """Whether a query parameter called *name* holds a credential (its value is never logged).

    ``password``, ``api-key``, ``API_KEY``, ``apiKey``, ``api_token``, ``X-Amz-Signature``,
    ``client_secret``, ``sessionId`` ... are; ``channel``, ``last_event_id``, ``keyword`` are not.
    """
    lowered = urllib.parse.unquote_plus(name).lower()
    words = [word for word in _NAME_WORDS.split(lowered) if word]
    return any(word in _SECRET_WORDS for word in words) or "".join(words).endswith(_SECRET_ENDINGS)


def redact_url(url: str) -> str:
    """*url* (absolute, or a request's path and query) with the values of credential-like
    query parameters replaced by ``REDACTED``, and a password in it by ``***``."""
    head, sep, query = url.partition("?")
    if "@" in head and "://" in head:
        scheme, _, rest = head.partition("://")
        authority, slash, path = rest.partition("/")
        userinfo, at, host = authority.rpartition("@")
        if at and ":" in userinfo:
            head = f"{scheme}://{userinfo.partition(':')[0]}:***@{host}{slash}{path}"
    if not sep:
        return head
    query, hash_, fragment = query.partition("#")
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if any(is_secret_name(key) for key, _ in pairs):
        clean = [(k, "REDACTED" if is_secret_name(k) else v) for k, v in pairs]
        query = urllib.parse.urlencode(clean)
    return f"{head}?{query}{hash_}{fragment}"


def redact_text(text: str) -> str:
    """*text* with the value of every credential-like ``name=value`` that follows ``?``, ``&``
    or ``;`` replaced by ``REDACTED`` (URLs quoted in a message)."""
    if "=" not in text:
        return text
    return _QUERY_PAIR.sub(_redact_pair, text)


def _redact_pair(match: re.Match[str]) -> str:
    name = match.group(1)
    return f"{name}=REDACTED" if is_secret_name(name) else match.group(0)


class RedactingFilter(logging.Filter):
    """Redacts credential-like query parameters in any log line that quotes a URL.

    The access log redacts its own path; this catches the lines Tornado writes itself, which
    quote the request's URI (``400 GET /events?...: Invalid unicode in channel``, the request
    dump of an uncaught exception).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "?" in message and "=" in message:
            message = redact_text(message)
        # formatted once: the formatter's getMessage() then has nothing left to do
        record.msg = message
        record.args = None
        return True
