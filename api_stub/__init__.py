"""The producer-facing HTTP API (FastAPI). Built in the queue-service issue."""
