"""synthguard's engine: fetch, decode, classify and store; the Celery worker runs it."""

__version__ = "0.1.0"
