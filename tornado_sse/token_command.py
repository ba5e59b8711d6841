"""``tornado-sse token``: print a signed token granting channels, for tests and scripts.

The token is the one `.auth.TokenVerifier` (and the hub's ``--jwt-secret`` / ``--jwt-public-key``)
checks; see `.auth.create_token`. Prefer ``$TORNADO_SSE_JWT_SECRET`` to ``--secret``: a command
line is visible to every user of the machine.
"""

from __future__ import annotations

from pathlib import Path

import click

from .cli import require_module

__all__ = ["SECRET_ENV", "token_command"]

#: the environment variable holding the HMAC secret (shared with the hub's --jwt-secret)
SECRET_ENV = "TORNADO_SSE_JWT_SECRET"  # noqa: S105 (a variable name, not a secret)


@click.command(name="token")
@click.option(
    "--secret",
    envvar=SECRET_ENV,
    show_envvar=True,
    metavar="SECRET",
    help="HMAC secret (at least 32 bytes) to sign with (HS256).",
)
@click.option(
    "--private-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="PEM private key to sign with instead (RS256, ES256/384/512 or EdDSA, from its type).",
)
@click.option("--sub", "subject", metavar="SUBJECT", help="The token's subject (sub claim).")
@click.option(
    "--subscribe",
    multiple=True,
    metavar="PATTERN",
    help="Channel the token may follow: a name, or a prefix ending in * (repeatable).",
)
@click.option(
    "--publish",
    multiple=True,
    metavar="PATTERN",
    help="Channel the token may publish to: a name, or a prefix ending in * (repeatable).",
)
@click.option(
    "--ttl",
    type=click.FloatRange(min=0, min_open=True),
    default=3600.0,
    show_default=True,
    help="Seconds until the token expires.",
)
@click.option("--audience", metavar="AUD", help="The aud claim (the hub's --jwt-audience).")
@click.option("--issuer", metavar="ISS", help="The iss claim (the hub's --jwt-issuer).")
def token_command(
    secret: str | None,
    private_key: Path | None,
    subject: str | None,
    subscribe: tuple[str, ...],
    publish: tuple[str, ...],
    ttl: float,
    audience: str | None,
    issuer: str | None,
) -> None:
    """Print a signed token (a JWT) granting channels to follow and to publish to.

    \b
    tornado-sse token --secret "$SECRET" --sub alice --subscribe 'user/alice' \\
        --publish 'room/*' --ttl 3600
    """
    require_module("jwt", "token", "pip install 'tornado-sse[jwt]'")
    from .auth import create_token
    from .errors import InvalidKeyError

    if (secret is None) == (private_key is None):
        raise click.UsageError(f"give one of --secret (or ${SECRET_ENV}) and --private-key")
    if not subscribe and not publish:
        raise click.UsageError("grant at least one --subscribe or --publish pattern")
    key: str | bytes = secret if secret is not None else private_key.read_bytes()  # type: ignore[union-attr]
    try:
        token = create_token(
            key,
            subject=subject,
            subscribe=subscribe,
            publish=publish,
            ttl=ttl,
            audience=audience,
            issuer=issuer,
        )
    except InvalidKeyError as exc:
        flag = "--secret" if secret is not None else "--private-key"
        raise click.BadParameter(str(exc), param_hint=flag) from exc
    click.echo(token)
