"""Operator verbs: ``db``, ``clients`` and ``webhooks``."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..errors import ConfigError
from ..models import PRIORITIES
from ..settings import Settings
from ._base import _checked_sessions, _fail, _require_secret_key, _safe_url, _settings, main

if TYPE_CHECKING:
    from ..models import ApiClient
    from ..secretbox import SecretBox
    from ..tenancy import Grant

_Command = TypeVar("_Command", bound=Callable[..., object])

# ------------------------------------------------------------------------ db


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Alembic revision to upgrade to.")
def db_upgrade(revision: str) -> None:
    """Create or migrate the schema at SYNTHGUARD_DATABASE_URL."""
    from ..db import upgrade

    settings = _settings()
    upgrade(settings.database_url, revision)
    click.echo(f"database at {_safe_url(settings.database_url)} is at revision {revision}")


# ------------------------------------------------------------------ webhooks


@main.group()
def webhooks() -> None:
    """Webhook tools."""


@webhooks.command("test")
@click.argument("url")
@click.option(
    "--secret",
    help="A whsec_... secret to sign with (a client's, to test its receiver); default: a new one, printed.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def webhooks_test(url: str, secret: str | None, as_json: bool) -> None:
    """Send one signed `webhook.test` event to URL and report what came back.

    Uses the same sender as the workers: Standard Webhooks signature, no
    redirects, SSRF guard (SYNTHGUARD_WEBHOOK_ALLOW_HTTP,
    SYNTHGUARD_WEBHOOK_ALLOWED_NETWORKS). Exit code 0 on a 2xx answer.
    """
    import uuid as uuid_module

    from ..clients import new_webhook_secret
    from ..errors import UnsafeURL
    from ..models import utcnow
    from ..netguard import URLPolicy
    from ..webhooks import EVENT_TEST, build_body, deliver

    settings = _settings()
    policy = URLPolicy.from_settings(settings)
    try:
        policy.check_url(url)
    except UnsafeURL as exc:
        raise _fail(f"refusing {url}: {exc}") from exc
    generated = secret is None
    secret = secret or new_webhook_secret()
    msg_id = f"msg_test_{uuid_module.uuid4().hex}"
    body = build_body(EVENT_TEST, {"message": "synthguard webhook test"}, timestamp=utcnow())
    result = deliver(
        url, msg_id=msg_id, body=body, secrets=[secret], policy=policy, timeout_s=settings.webhook_timeout_s
    )
    outcome = {
        "url": url,
        "webhook_id": msg_id,
        "ok": result.ok,
        "status": result.status,
        "latency_ms": round(result.latency_ms, 1),
        "error": result.error,
    }
    if generated:
        outcome["secret"] = secret
    if as_json:
        click.echo(json.dumps(outcome))
    else:
        verdict = "delivered" if result.ok else "failed"
        click.echo(
            f"{verdict}: {url} answered {result.status or '-'} in {result.latency_ms:.0f} ms"
            + (f" ({result.error})" if result.error else "")
        )
        if generated:
            click.echo(f"signed with the new secret {secret}")
    sys.exit(0 if result.ok else 1)


# ------------------------------------------------------------------- clients


@main.group()
def clients() -> None:
    """API clients: the producers allowed to call the HTTP API."""


def _check_webhook_url(url: str, settings: Settings) -> str:
    """The sender's own URL policy (scheme, host, blocked IP literals), applied up front."""
    from ..errors import UnsafeURL
    from ..netguard import URLPolicy

    try:
        URLPolicy.from_settings(settings).check_url(url)
    except UnsafeURL as exc:
        raise click.BadParameter(f"{url!r} is refused: {exc}", param_hint="'--webhook-url'") from exc
    return url


def _grants(
    ctx: click.Context, param: click.Parameter, values: str | tuple[str, ...]
) -> Grant | list[Grant]:
    """``BUCKET[/PREFIX]`` values as grants, each checked against S3's naming rules."""
    from ..tenancy import Grant

    single = isinstance(values, str)
    try:
        parsed = [Grant.parse(value) for value in ([values] if single else values)]
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc
    return parsed[0] if single else parsed


def _limit_options(command: _Command) -> _Command:
    """The per-client lanes and limits, shared by ``clients create`` and ``clients set``."""
    for option in reversed(
        [
            click.option(
                "--lane",
                "lanes",
                multiple=True,
                type=click.Choice(PRIORITIES),
                help="A lane the client may queue on (repeatable)  [default: realtime and bulk].",
            ),
            click.option(
                "--max-pending-realtime",
                type=click.IntRange(0),
                help="Images it may have queued or processing on the realtime lane (0: no cap) "
                "[default: SYNTHGUARD_CLIENT_MAX_PENDING_REALTIME].",
            ),
            click.option(
                "--max-pending-bulk",
                type=click.IntRange(0),
                help="The same for the bulk lane [default: SYNTHGUARD_CLIENT_MAX_PENDING_BULK].",
            ),
            click.option(
                "--images-per-minute",
                type=click.IntRange(0),
                help="Images it may submit per minute through the API (0: no limit) "
                "[default: SYNTHGUARD_API_IMAGE_RATE_LIMIT_PER_MINUTE].",
            ),
            click.option(
                "--callback-host",
                "callback_hosts",
                multiple=True,
                help="A host its scans' callback_url may name (repeatable); none given: any host the "
                "URL policy allows.",
            ),
        ]
    ):
        command = option(command)
    return command


@clients.command("create")
@click.argument("name")
@click.option(
    "--bucket",
    "grants",
    multiple=True,
    callback=_grants,
    metavar="BUCKET[/PREFIX]",
    help="A bucket, or a folder of one, the client may have scored (repeatable).",
)
@click.option(
    "--all-buckets",
    is_flag=True,
    help="Let the client reach every bucket the workers can read: for single-tenant installs only.",
)
@click.option(
    "--webhook-url",
    help="Where this client's signed webhooks go: https://..., or http://... only with "
    "SYNTHGUARD_WEBHOOK_ALLOW_HTTP=true.",
)
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1),
    help="The client's default flag threshold on p(synthetic) [default: SYNTHGUARD_THRESHOLD].",
)
@_limit_options
@click.option("--json", "as_json", is_flag=True, help='Print {"id", "api_key", "webhook_secret"} as JSON.')
def clients_create(
    name: str,
    grants: list[Grant],
    all_buckets: bool,
    webhook_url: str | None,
    threshold: float | None,
    lanes: tuple[str, ...],
    max_pending_realtime: int | None,
    max_pending_bulk: int | None,
    images_per_minute: int | None,
    callback_hosts: tuple[str, ...],
    as_json: bool,
) -> None:
    """Create an API client named NAME; print its id, API key and webhook secret.

    Say what it may reach: --bucket BUCKET[/PREFIX] (repeatable; a prefix is a
    folder, so uploads/kyc grants uploads/kyc/... and never uploads/kyc-old/...)
    or --all-buckets. Objects outside its grants are refused with 403 before
    anything is queued.

    Both secrets are shown only this once: the API key is stored only as a hash and
    cannot be recovered, and the webhook secret (whsec_...) is what the client
    needs to verify the signatures of the webhooks it receives (stored encrypted
    with SYNTHGUARD_SECRET_KEY).
    """
    from ..clients import create_client

    name = name.strip()
    if not name or len(name) > 200:
        raise click.BadParameter("must be 1 to 200 characters", param_hint="'NAME'")
    if bool(grants) == all_buckets:
        raise click.UsageError(
            "say what the client may reach: --bucket BUCKET[/PREFIX] (repeatable) or --all-buckets, not both"
        )
    settings = _settings()
    if webhook_url is not None:
        _check_webhook_url(webhook_url, settings)
    _require_secret_key(settings, "`clients create`")
    box = _secret_box(settings)
    with _checked_sessions(settings).begin() as session:
        new = create_client(
            session,
            name,
            grants=grants,
            all_buckets=all_buckets,
            webhook_url=webhook_url,
            default_threshold=threshold,
            lanes=lanes or None,
            max_pending_realtime=max_pending_realtime,
            max_pending_bulk=max_pending_bulk,
            images_per_minute=images_per_minute,
            callback_hosts=callback_hosts or None,
            box=box,
        )
        client_id = new.client.id
    if as_json:
        click.echo(
            json.dumps({"id": str(client_id), "api_key": new.api_key, "webhook_secret": new.webhook_secret})
        )
        return
    click.echo(f"created client {name!r}")
    click.echo(f"  id              {client_id}")
    click.echo(f"  api key         {new.api_key}")
    click.echo(f"  webhook secret  {new.webhook_secret}")
    click.echo(f"  may reach       {'every bucket' if all_buckets else ', '.join(map(str, grants))}")
    click.echo(
        "\nSave the API key and the webhook secret now: they are shown only this once.\n"
        "The API key is stored only as a hash and cannot be shown again; send it as "
        "'Authorization: Bearer <api key>'.\n"
        "The webhook secret is needed to verify the webhook-signature header of this client's webhooks."
    )


def _secret_box(settings: Settings) -> SecretBox:
    from ..secretbox import SecretBox

    try:
        return SecretBox.from_settings(settings)
    except ConfigError as exc:
        raise _fail(exc.message) from exc


@contextmanager
def _one_client(name: str) -> Iterator[tuple[Session, ApiClient, Settings]]:
    """A transaction holding the client NAME (a name or an id), or a clear error."""
    from ..clients import ClientNotFound, find_client

    settings = _settings()
    with _checked_sessions(settings).begin() as session:
        try:
            client = find_client(session, name)
        except ClientNotFound as exc:
            raise _fail(str(exc)) from exc
        yield session, client, settings


@clients.command("grant")
@click.argument("name")
@click.argument("grant", metavar="BUCKET[/PREFIX]", callback=_grants)
def clients_grant(name: str, grant: Grant) -> None:
    """Let client NAME (a name or an id) have objects in BUCKET, or under BUCKET/PREFIX/, scored."""
    from ..clients import add_grant

    with _one_client(name) as (session, client, _):
        added = add_grant(session, client, grant)
    click.echo(f"{'granted' if added else 'already granted'}: {client.name} may reach s3://{grant}")


@clients.command("revoke")
@click.argument("name")
@click.argument("grant", metavar="BUCKET[/PREFIX]", callback=_grants)
def clients_revoke(name: str, grant: Grant) -> None:
    """Take a grant away from client NAME, exactly as `clients list` shows it.

    From then on the client's requests for those objects are 403, and its
    images there that are still queued fail with access_denied, unfetched.
    """
    from ..clients import remove_grant
    from ..tenancy import Grant

    with _one_client(name) as (session, client, _):
        removed = remove_grant(session, client, grant)
        left = [str(Grant(g.bucket, g.prefix)) for g in client.grants]
    if not removed:
        raise _fail(f"{client.name} has no grant s3://{grant}; its grants: {', '.join(left) or 'none'}")
    click.echo(f"revoked: {client.name} may no longer reach s3://{grant}")


@clients.command("set")
@click.argument("name")
@_limit_options
@click.option(
    "--any-callback-host",
    is_flag=True,
    help="Drop the client's callback hosts: its scans' callback_url may name any host the URL policy allows.",
)
def clients_set(
    name: str,
    lanes: tuple[str, ...],
    max_pending_realtime: int | None,
    max_pending_bulk: int | None,
    images_per_minute: int | None,
    callback_hosts: tuple[str, ...],
    any_callback_host: bool,
) -> None:
    """Change the lanes and limits of client NAME; options not given stay as they are."""
    from ..clients import check_lanes, normalize_hosts

    if callback_hosts and any_callback_host:
        raise click.UsageError("--callback-host and --any-callback-host contradict each other: give one")
    with _one_client(name) as (_, client, _):
        if lanes:
            client.lanes = check_lanes(lanes)
        for column, value in (
            ("max_pending_realtime", max_pending_realtime),
            ("max_pending_bulk", max_pending_bulk),
            ("images_per_minute", images_per_minute),
        ):
            if value is not None:
                setattr(client, column, value)
        if callback_hosts:
            client.callback_hosts = normalize_hosts(callback_hosts)
        elif any_callback_host:
            client.callback_hosts = None
    click.echo(f"updated client {client.name}")


@clients.command("rotate-key")
@click.argument("name")
@click.option(
    "--overlap",
    type=click.FloatRange(0),
    default=0,
    show_default=True,
    help="Seconds the current key keeps working beside the new one; 0 stops it at once (a leaked key).",
)
@click.option("--json", "as_json", is_flag=True, help='Print {"id", "api_key", "previous_valid_until"} as JSON.')
def clients_rotate_key(name: str, overlap: float, as_json: bool) -> None:
    """Issue a new API key for client NAME; print it once."""
    from ..clients import rotate_api_key

    with _one_client(name) as (session, client, _):
        api_key = rotate_api_key(session, client, overlap_s=overlap)
        until = client.api_key_previous_until
        client_id = client.id
    if as_json:
        click.echo(
            json.dumps(
                {"id": str(client_id), "api_key": api_key, "previous_valid_until": until.isoformat() if until else None}
            )
        )
        return
    click.echo(f"new api key  {api_key}")
    click.echo(
        f"the previous key works until {_utc_minute(until.isoformat())}" if until else "the previous key no longer works"
    )


@clients.command("disable")
@click.argument("name")
def clients_disable(name: str) -> None:
    """Stop client NAME at once: every request with its keys is 401 from now on."""
    from ..clients import disable_client

    with _one_client(name) as (session, client, _):
        changed = disable_client(session, client)
    click.echo(f"disabled: {client.name}" if changed else f"{client.name} was already disabled")


@clients.command("rotate-secret")
@click.argument("name")
@click.option(
    "--revoke-previous",
    is_flag=True,
    help="The replaced secret stops signing at once (a leaked secret); otherwise it signs beside the "
    "new one for SYNTHGUARD_WEBHOOK_SECRET_OVERLAP_S.",
)
@click.option("--json", "as_json", is_flag=True, help='Print {"webhook_secret", "previous_valid_until"} as JSON.')
def clients_rotate_secret(name: str, revoke_previous: bool, as_json: bool) -> None:
    """Issue a new webhook signing secret for client NAME; print it once."""
    from ..clients import SecretRotationConflict, rotate_webhook_secret

    with _one_client(name) as (session, client, settings):
        _require_secret_key(settings, "`clients rotate-secret`")
        try:
            secret, until = rotate_webhook_secret(
                session,
                client,
                _secret_box(settings),
                overlap_s=settings.webhook_secret_overlap_s,
                revoke_previous=revoke_previous,
            )
        except SecretRotationConflict as exc:
            raise _fail(f"{exc} (--revoke-previous)") from exc
    if as_json:
        click.echo(json.dumps({"webhook_secret": secret, "previous_valid_until": until.isoformat() if until else None}))
        return
    click.echo(f"new webhook secret  {secret}")
    click.echo(
        f"the previous secret also signs until {_utc_minute(until.isoformat())}"
        if until
        else "the previous secret no longer signs"
    )


@clients.command("enable-webhook")
@click.argument("name")
@click.option("--url", help="A scan's callback URL that was disabled  [default: the client's webhook URL].")
def clients_enable_webhook(name: str, url: str | None) -> None:
    """Send to a disabled webhook endpoint of client NAME again (it answered 410 or kept failing)."""
    from ..outbox import enable_endpoint

    with _one_client(name) as (session, client, _):
        enabled = enable_endpoint(session, client.id, url)
    where = url or client.webhook_url or "its webhook URL"
    click.echo(f"enabled: {where}" if enabled else f"{where} was not disabled for {client.name}")


@clients.command("encrypt-secrets")
def clients_encrypt_secrets() -> None:
    """Encrypt every stored webhook secret under the first key of SYNTHGUARD_SECRET_KEY.

    Run it after setting the key on an install that stored secrets in plain
    text, and after putting a new key first (the old one after it) to move
    every secret to the new key before the old one is removed.
    """
    from ..clients import encrypt_secrets

    settings = _settings()
    box = _secret_box(settings)
    if not box.encrypts:
        raise _fail("SYNTHGUARD_SECRET_KEY is not set; make one with `synthguard clients new-secret-key`")
    with _checked_sessions(settings).begin() as session:
        try:
            changed = encrypt_secrets(session, box)
        except ConfigError as exc:
            raise _fail(exc.message) from exc
    click.echo(f"{changed} webhook secret(s) encrypted under the first key")


@clients.command("new-secret-key")
def clients_new_secret_key() -> None:
    """Print a new key for SYNTHGUARD_SECRET_KEY (Fernet: 32 random bytes, url-safe base64)."""
    from ..secretbox import new_secret_key

    click.echo(new_secret_key())


@clients.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the clients as JSON.")
def clients_list(as_json: bool) -> None:
    """List API clients: id, name, key prefix, grants, lanes, limits, webhook URL, created, disabled.

    Keys and webhook secrets are never shown; only the first characters of
    each key, to tell keys apart.
    """
    from ..models import ApiClient
    from ..tenancy import Grant

    with _checked_sessions(_settings())() as session:
        rows = list(session.scalars(select(ApiClient).order_by(ApiClient.created_at, ApiClient.name)))
        docs = [
            {
                "id": str(c.id),
                "name": c.name,
                "key_prefix": c.api_key_prefix,
                "all_buckets": c.all_buckets,
                "grants": [str(Grant(g.bucket, g.prefix)) for g in c.grants],
                "lanes": c.lanes or list(PRIORITIES),
                "max_pending_realtime": c.max_pending_realtime,
                "max_pending_bulk": c.max_pending_bulk,
                "images_per_minute": c.images_per_minute,
                "callback_hosts": c.callback_hosts,
                "webhook_url": c.webhook_url,
                "default_threshold": c.default_threshold,
                "created_at": c.created_at.isoformat(),
                "disabled": c.disabled_at is not None,
                "disabled_at": c.disabled_at.isoformat() if c.disabled_at else None,
            }
            for c in rows
        ]
    if as_json:
        click.echo(json.dumps(docs, indent=2))
        return
    if not docs:
        click.echo("no API clients yet; create one with `synthguard clients create NAME --bucket BUCKET`")
        return
    # Several lines per client rather than a table: ids must be copied whole on any terminal width.
    for doc in docs:
        threshold = "default" if doc["default_threshold"] is None else f"{doc['default_threshold']:g}"
        click.echo(f"{doc['id']}  {doc['name']}" + ("  [disabled]" if doc["disabled"] else ""))
        click.echo(
            f"    key {doc['key_prefix']}...  threshold {threshold}  created {_utc_minute(doc['created_at'])}"
            f"  webhook {doc['webhook_url'] or '-'}"
            + (f"  disabled {_utc_minute(doc['disabled_at'])}" if doc["disabled_at"] else "")
        )
        reach = "every bucket" if doc["all_buckets"] else ", ".join(doc["grants"]) or "nothing"
        click.echo(f"    grants {reach}  lanes {','.join(doc['lanes'])}")
        limits = [
            f"{label} {doc[field]}"
            for label, field in (
                ("max pending realtime", "max_pending_realtime"),
                ("max pending bulk", "max_pending_bulk"),
                ("images/min", "images_per_minute"),
            )
            if doc[field] is not None
        ]
        if doc["callback_hosts"]:
            limits.append("callback hosts " + ",".join(doc["callback_hosts"]))
        if limits:
            click.echo("    " + "  ".join(limits))


def _utc_minute(iso: str) -> str:
    from datetime import UTC, datetime

    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
