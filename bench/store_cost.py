#!/usr/bin/env python
"""What claiming and storing cost the worker per image: `python bench/store_cost.py [--images 600]`.

Runs the service's own `Scorer._claim` and `Scorer._write_batch` (the writer's batch function) in
one thread against PostgreSQL, for images of one bulk scan whose client has no webhook, results
stored `--batch` at a time (2: the mean forward batch of a busy 2-core worker), and prints the
thread's CPU milliseconds per image for each, in `--rounds` rounds. This is Python time in the
worker process (SQLAlchemy, psycopg), which its threads share one GIL for; the database's own
work is not in it. Needs PostgreSQL (`BENCH_POSTGRES_URL`; database synthguard_store_cost,
created and dropped here). Asserts nothing beyond every image ending `done`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATABASE = "synthguard_store_cost"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600, help="images per round")
    parser.add_argument("--batch", type=int, default=2, help="results stored per transaction")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    from bench.run import PG_ADMIN, Env
    from worker.clients import create_client
    from worker.db import upgrade
    from worker.detector import Detector
    from worker.intake import create_scan
    from worker.scoring import Scorer, ScoreResult
    from worker.settings import Settings
    from worker.storage import ObjectRef

    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        conn.exec_driver_sql(f'CREATE DATABASE "{DATABASE}"')
    url = make_url(PG_ADMIN).set(database=DATABASE).render_as_string(hide_password=False)
    try:
        upgrade(url)
        env = Env(Path(tempfile.mkdtemp(prefix="synthguard-store-cost-")))
        env._build_checkpoint()
        settings = Settings(model_checkpoint=str(env.checkpoint), device="cpu", database_url=url, prepare_processes=0)
        total = args.images * (args.rounds + 1)
        result = ScoreResult(
            etag="etag", version_id=None, sha256="0" * 64, size_bytes=200_000, format="JPEG", width=1024,
            height=1024, score=0.9, provenance={"ai": False, "signals": {}}, provenance_ai=False,
        )
        with Scorer(settings, Detector.from_settings(settings)) as scorer:
            with scorer.sessions.begin() as session:
                client = create_client(session, "store-cost", all_buckets=True).client
                refs = [ObjectRef("bench", f"k{i}.jpg") for i in range(total)]
                _, ids = create_scan(session, refs, origin="bench", threshold=0.5, client_id=client.id,
                                     priority="bulk")
            pending = iter(ids)
            print(f"thread CPU ms per image, results stored {args.batch} per transaction, {args.images} images a round")
            for round_ in range(args.rounds + 1):
                claim_s = store_s = 0.0
                for _ in range(args.images // args.batch):
                    batch = [next(pending) for _ in range(args.batch)]
                    started = time.thread_time()
                    for image_id in batch:
                        if scorer._claim(image_id) is None:
                            raise RuntimeError(f"image {image_id} could not be claimed")
                    claimed = time.thread_time()
                    outcomes = scorer._write_batch([(image_id, result) for image_id in batch])
                    store_s += time.thread_time() - claimed
                    claim_s += claimed - started
                    if any(getattr(o, "state", None) != "done" for o in outcomes):
                        raise RuntimeError(f"not stored: {outcomes}")
                if round_:  # the first round warms caches and the pool
                    print(f"  round {round_}: claim {1000 * claim_s / args.images:.2f}, "
                          f"store {1000 * store_s / args.images:.2f}")
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        admin.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
