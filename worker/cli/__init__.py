"""The ``synthguard`` command. ``main`` is the click group (the entry point ``worker.cli:main``);
each module adds its verbs to it: ``scan`` (scan, results, demo), ``evaluate`` (eval),
``services`` (worker, beat, api, models), ``producers`` (enqueue, backfill), ``moderation``
(review, bank) and ``admin`` (db, clients, webhooks). Verbs parse options and print; the work is in the engine's modules.
"""

from __future__ import annotations

from . import admin, evaluate, moderation, producers, scan, services  # noqa: F401 - each registers its verbs on main
from ._base import main

__all__ = ["main"]
