"""The naive baseline: one Celery task per image, the reference pipeline's way.

Each task downloads its object, decodes it at full size with Pillow, runs the
timm eval transform, calls the model on a batch of one, and stores the result
in its own transaction. Run as a prefork worker, one process per core:

    celery -A bench.naive worker -P prefork -c 2 -Q bench.naive

Configuration from the environment (set by bench/run.py): BENCH_BROKER_URL,
BENCH_DATABASE_URL, BENCH_S3_ENDPOINT_URL, BENCH_CHECKPOINT, BENCH_TORCH_THREADS.
It shares the broker, database and S3 server with synthguard, and writes to its
own table ``bench_naive_results``.
"""

from __future__ import annotations

import io
import os
import time

from celery import Celery
from celery.signals import worker_process_init

QUEUE = "bench.naive"
ARCH = "tf_mobilenetv3_large_100"

app = Celery("bench_naive", broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/10"))
app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

_state: dict[str, object] = {}

DDL = """
CREATE TABLE IF NOT EXISTS bench_naive_results (
    id BIGSERIAL PRIMARY KEY,
    run TEXT NOT NULL,
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    score DOUBLE PRECISION,
    error TEXT,
    completed_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
)
"""


def _pg_dsn() -> str:
    return os.environ["BENCH_DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")


@worker_process_init.connect
def _load(**_: object) -> None:
    """Each prefork child loads its own model, S3 client and database connection."""
    import boto3
    import psycopg
    import timm
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "1")))
    model = timm.create_model(ARCH, num_classes=2, pretrained=False)
    model.load_state_dict(load_file(os.environ["BENCH_CHECKPOINT"]))
    model.eval()
    config = timm.data.resolve_data_config(model=model)
    _state["model"] = model
    _state["transform"] = timm.data.create_transform(**config, is_training=False)
    _state["s3"] = boto3.client("s3", endpoint_url=os.environ["BENCH_S3_ENDPOINT_URL"])
    _state["db"] = psycopg.connect(_pg_dsn())


def ensure_table() -> None:
    import psycopg

    with psycopg.connect(_pg_dsn(), autocommit=True) as conn:
        conn.execute(DDL)


@app.task(name="bench.naive.score")
def score(run: str, bucket: str, key: str) -> None:
    import torch
    from PIL import Image

    if "model" not in _state:  # solo pool or a child the signal missed
        _load()
    err = None
    p = None
    try:
        data = _state["s3"].get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[attr-defined]
        image = Image.open(io.BytesIO(data))
        image = image.convert("RGB")  # full-size decode
        x = _state["transform"](image).unsqueeze(0)  # type: ignore[operator]
        with torch.inference_mode():
            p = float(_state["model"](x).softmax(-1)[0, 0])  # type: ignore[operator]
    except Exception as exc:  # noqa: BLE001 - recorded, like a failed image
        err = f"{type(exc).__name__}: {exc}"
    conn = _state["db"]
    with conn.transaction():  # type: ignore[attr-defined]
        conn.execute(  # type: ignore[attr-defined]
            "INSERT INTO bench_naive_results (run, bucket, key, score, error) VALUES (%s, %s, %s, %s, %s)",
            (run, bucket, key, p, err),
        )
    _ = time
