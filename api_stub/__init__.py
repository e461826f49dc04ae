"""The HTTP API (FastAPI): what producers and clients call.

``app.py`` builds the application; one router per resource (scans, S3 events,
webhooks, operations), ``schemas/`` for request and response models (a module
per concept), ``problems.py`` for every error answer, ``auth.py`` and
``ratelimit.py`` in front. It writes nothing itself: intake, tenancy and
results come from ``worker``, the engine and shared core.
"""
