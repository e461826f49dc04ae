"""synthguard's engine and shared core: fetch, decode, classify and store (the Celery worker
runs it), and what every process shares: settings, models and migrations, intake, tenancy,
queueing, webhooks, and the ``synthguard`` command. The HTTP API lives in ``api_stub``.

``from worker import enqueue`` queues S3 objects from producers in the same codebase.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .queueing import enqueue

__all__ = ["__version__", "enqueue"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package must not pull in Celery, SQLAlchemy and boto3.
    if name == "enqueue":
        from .queueing import enqueue

        return enqueue
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
