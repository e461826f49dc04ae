"""The long-running processes (``worker``, ``beat``, ``api``) and ``models``."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from ..errors import ConfigError
from ._base import (
    _checked_sessions,
    _fail,
    _load_detector,
    _producer_app,
    _require_model_stack,
    _require_secret_key,
    _safe_url,
    _settings,
    main,
)


def _queue_names(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--queues``: lanes by short name (``realtime``) or queue name (``synthguard.realtime``)."""
    if value is None:
        return None
    from ..celery_app import QUEUES

    by_name = {name: name for name in QUEUES} | {name.removeprefix("synthguard."): name for name in QUEUES}
    names = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [name for name in names if name not in by_name]
    if unknown or not names:
        # A typo would otherwise start a worker that listens on a queue nothing publishes to.
        raise click.BadParameter(
            f"unknown queue {', '.join(map(repr, unknown)) or '(none given)'}; choose from "
            f"{', '.join(name.removeprefix('synthguard.') for name in QUEUES)} (or {', '.join(QUEUES)})",
            ctx=ctx,
            param=param,
        )
    return ",".join(dict.fromkeys(by_name[name] for name in names))


@main.command()
@click.option(
    "--concurrency", type=click.IntRange(1), help="Threads feeding the model [SYNTHGUARD_CONCURRENCY]."
)
@click.option(
    "--queues",
    default=None,
    callback=_queue_names,
    help="Comma-separated queues to consume, polled in the order given (default: "
    "realtime,webhooks,overflow,bulk; queue names such as synthguard.bulk work too). overflow holds "
    "realtime images of a client past its burst (SYNTHGUARD_REALTIME_BURST): give it to some worker. One "
    "worker with realtime,webhooks beside the backfill's keeps realtime latency low (docs/operations.md).",
)
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--hostname", help="Celery node name, unique per worker process (default: celery@HOST).")
def worker(concurrency: int | None, queues: str | None, loglevel: str, hostname: str | None) -> None:
    """Run a queue worker: one process, one model, many threads feeding its micro-batcher.

    Pin it to a GPU with SYNTHGUARD_DEVICE=cuda:N, one worker per GPU, each with its
    own --hostname; it decodes in one preparing process per core
    (SYNTHGUARD_PREPARE_PROCESSES, docs/operations.md, Sizing). The model is loaded
    before any message is taken, so a bad checkpoint stops the worker at once.
    """
    _require_model_stack("worker")
    from ..celery_app import QUEUES, app
    from ..metrics import start_metrics_server
    from ..scoring import Scorer
    from ..tasks import install_scorer

    settings = _settings(concurrency=concurrency)
    _require_secret_key(settings, "the worker")
    sessions = _checked_sessions(settings)
    detector = _load_detector(settings, allow_untrained=False)
    try:
        scorer = Scorer(settings, detector, sessions=sessions)
    except ConfigError as exc:  # e.g. preparing processes that cannot start
        raise _fail(exc.message) from exc
    install_scorer(scorer)
    # Started before consuming: a port already taken stops the worker here, not mid-flight.
    start_metrics_server(settings, QUEUES)
    argv = [
        "worker",
        "--pool=threads",
        f"--concurrency={scorer.concurrency}",
        f"--queues={queues or ','.join(QUEUES)}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    app.worker_main(argv)


@main.command()
@click.option("--loglevel", default="INFO", show_default=True)
def beat(loglevel: str) -> None:
    """Run the scheduler: every SYNTHGUARD_SWEEP_INTERVAL_S it queues the sweeper, which
    re-publishes images left queued or processing longer than SYNTHGUARD_STALE_AFTER_S,
    sends due webhooks, and asks again for review crops left pending that long."""
    from ..celery_app import app

    # In-memory schedule: an interval job needs no state file on disk.
    app.start(["beat", f"--loglevel={loglevel}", "--scheduler=celery.beat:Scheduler"])


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help="Server processes.")
def api(host: str, port: int, workers: int) -> None:
    """Serve the HTTP API (OpenAPI at /openapi.json, docs at /docs)."""
    import os

    import uvicorn

    from ..logs import current_format

    settings = _settings()
    _require_secret_key(settings, "the API")
    _checked_sessions(settings)
    # Server processes started with --workers read the format again from the environment.
    os.environ["SYNTHGUARD_LOG_FORMAT"] = current_format()
    uvicorn.run(
        "api_stub.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        proxy_headers=True,
        # Our logging, not uvicorn's: its access line would bypass redaction and the request id.
        log_config=None,
        access_log=False,
    )


@main.command()
@click.option("--timeout", default=2.0, show_default=True, type=click.FloatRange(0.1), help="Seconds to wait for workers.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def models(timeout: float, as_json: bool) -> None:
    """What each running worker has loaded, and how many stored scores each model version produced.

    Workers answer over the broker (Celery remote control). During a rollout,
    restart workers one by one with the new SYNTHGUARD_MODEL_CHECKPOINT; every
    score keeps the version that produced it, and `synthguard backfill` queues
    again what the current version has not scored.
    """
    from sqlalchemy import func

    from ..models import DONE, Image

    settings = _settings()
    try:
        with _producer_app(settings) as celery:
            replies = celery.control.broadcast("synthguard_model", reply=True, timeout=timeout)
    except Exception as exc:  # kombu raises many kinds
        raise _fail(f"cannot reach the broker at {_safe_url(settings.broker_url)}: {exc}") from exc
    workers = sorted(
        ({"worker": host, **answer} for reply in replies or [] for host, answer in reply.items()),
        key=lambda w: str(w["worker"]),
    )
    with _checked_sessions(settings)() as session:
        stored = session.execute(
            select(Image.model_name, Image.model_version, func.count(), func.max(Image.completed_at))
            .where(Image.state == DONE)
            .group_by(Image.model_name, Image.model_version)
            .order_by(func.max(Image.completed_at).desc())
        ).all()
    versions = [
        {"name": n, "version": v, "scores": int(c), "last_scored_at": t.isoformat() if t else None}
        for n, v, c, t in stored
    ]
    if as_json:
        click.echo(json.dumps({"workers": workers, "stored_versions": versions}, indent=2, default=str))
        return
    console = Console(width=None if Console().is_terminal else 1000)
    table = Table(title=f"{len(workers)} worker(s) answered", title_justify="left")
    for column in ("worker", "model", "version", "device", "batch", "threads", "preparing processes"):
        table.add_column(column)
    for w in workers:
        version = str(w.get("version", "-")) + (" (UNTRAINED)" if w.get("untrained") else "")
        device = str(w.get("device", "-")) + (" (frozen)" if w.get("frozen") else "")
        table.add_row(str(w["worker"]), str(w.get("name", "-")), version, device,
                      str(w.get("batch_size", "-")), str(w.get("concurrency", "-")),
                      str(w.get("prepare_processes", "-")))
    console.print(table)
    stored_table = Table(title="stored scores by model version", title_justify="left")
    for column in ("model", "version", "scores", "last scored"):
        stored_table.add_column(column)
    for v in versions:
        stored_table.add_row(str(v["name"]), str(v["version"]), str(v["scores"]), str(v["last_scored_at"] or ""))
    console.print(stored_table)
