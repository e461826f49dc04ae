"""Request and response bodies of the HTTP API, with the documentation OpenAPI shows.

One module per concept: ``common`` (problem bodies, UTC timestamps, example ids),
``scans`` (scans and images), ``events`` (S3 event notifications), ``webhooks``
(deliveries, endpoints, signing secrets), ``operations`` (health, readiness).
Routers import from this package, never from its modules, so a model can move
between them without touching a router.
"""

from __future__ import annotations

from . import common, events, operations, scans, webhooks
from .common import *  # noqa: F403
from .events import *  # noqa: F403
from .operations import *  # noqa: F403
from .scans import *  # noqa: F403
from .webhooks import *  # noqa: F403

# Each module names what it offers; the package offers all of it.
__all__: list[str] = []
__all__ += common.__all__
__all__ += events.__all__
__all__ += operations.__all__
__all__ += scans.__all__
__all__ += webhooks.__all__
