"""The slim install (`pip install synthguard`, the API image): everything but scoring runs without
the model stack, and the verbs that score say what to install.

The model stack is hidden from the commands under test by a ``sitecustomize`` that marks its
packages absent (``sys.modules[name] = None``: ``import`` raises ModuleNotFoundError and
``importlib.util.find_spec`` answers None, as for a package that was never installed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from corpus import encode, photo
from sqlalchemy import select

from conftest import _free_port, image_states, synthguard_command, wait_until
from worker.cli._base import MODEL_EXTRA_HINT, MODEL_STACK
from worker.models import DONE, QUEUED, Image


@pytest.fixture
def slim_env(service_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "slim-site"
    site.mkdir()
    # A finder that answers "no such module", as an install without them would: a None placed in
    # sys.modules instead looks present to libraries that only test `name in sys.modules` (psycopg).
    (site / "sitecustomize.py").write_text(
        "import sys\n\n\n"
        "class Hidden:\n"
        f"    names = {sorted(MODEL_STACK)!r}\n\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in self.names:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "        return None\n\n\n"
        "sys.meta_path.insert(0, Hidden())\n",
        encoding="utf-8",
    )
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    env = {**service_env, "PYTHONPATH": path}
    # The hiding itself must work, or every test below would pass for the wrong reason.
    probe = subprocess.run([sys.executable, "-c", "import torch"], env={**os.environ, **env}, capture_output=True)
    assert probe.returncode != 0 and b"ModuleNotFoundError" in probe.stderr
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*synthguard_command(), *args], env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def _jpeg(seed: int) -> bytes:
    return encode(photo(96, 80, seed), "JPEG", quality=90)


@pytest.mark.parametrize("verb", ["worker", "scan", "eval", "demo"])
def test_a_verb_that_scores_says_what_to_install_and_touches_nothing(
    verb: str, slim_env: dict[str, str], tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(_jpeg(1))
    args = {"worker": [], "scan": [str(images)], "eval": [str(images)], "demo": ["--dir", "demo"]}[verb]
    result = _run([verb, *args], {**slim_env, "SYNTHGUARD_DATABASE_URL": f"sqlite:///{tmp_path}/slim.db"}, tmp_path)
    assert result.returncode == 1, result.stderr
    assert MODEL_EXTRA_HINT in result.stderr and "torch" in result.stderr
    assert "Traceback" not in result.stderr
    # Stopped before anything else: no sample set written, no database made.
    assert not (tmp_path / "demo").exists() and not (tmp_path / "slim.db").exists()


def test_the_api_producers_and_beat_run_without_the_model_stack(
    slim_env: dict[str, str], s3_client, bucket, sessions, start_service, tmp_path: Path
) -> None:
    for key in ("up/0.jpg", "up/1.jpg", "old/0.jpg", "old/1.jpg", "old/2.jpg"):
        s3_client.put_object(Bucket=bucket, Key=key, Body=_jpeg(len(key) + int(key[-5])))
    assert _run(["db", "upgrade"], slim_env).returncode == 0

    created = _run(["clients", "create", "slim", "--all-buckets", "--json"], slim_env)
    assert created.returncode == 0, created.stderr
    api_key = json.loads(created.stdout)["api_key"]

    port = _free_port()
    api_log = (tmp_path / "api.log").open("wb")
    api = subprocess.Popen(
        [*synthguard_command(), "api", "--port", str(port)],
        env={**os.environ, **slim_env},
        stdout=api_log,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                assert api.poll() is None, (tmp_path / "api.log").read_text()
                return False

        wait_until(ready, message="the slim API ready")
        posted = httpx.post(
            f"{base}/v1/scans",
            json={"objects": [{"bucket": bucket, "key": "up/0.jpg"}]},
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=10,
        )
        assert posted.status_code == 202, posted.text
        via_api = [uuid.UUID(i["id"]) for i in posted.json()["images"]]

        enqueued = _run(["enqueue", f"s3://{bucket}/up/1.jpg", "--json"], slim_env)
        assert enqueued.returncode == 0, enqueued.stderr
        via_enqueue = [uuid.UUID(i["id"]) for i in json.loads(enqueued.stdout)["images"]]

        backfilled = _run(["backfill", f"s3://{bucket}/old/", "--json"], slim_env)
        assert backfilled.returncode == 0, backfilled.stderr
        backfill = json.loads(backfilled.stdout)
        assert backfill["enqueued"] == 3 and backfill["model_version"].startswith("sha256:")

        with sessions() as session:
            backfilled_ids = list(session.scalars(select(Image.id).where(Image.scan_id == uuid.UUID(backfill["scan_id"]))))
        everything = [*via_api, *via_enqueue, *backfilled_ids]
        assert image_states(sessions, everything) == {QUEUED: 5}

        # beat from the slim install, a worker with the model stack: the whole loop.
        start_service("beat", env=slim_env)
        start_service("worker")
        wait_until(lambda: image_states(sessions, everything) == {DONE: 5}, message="the slim producers' images")
        shown = _run(["results", backfill["scan_id"], "--json"], slim_env)
        assert shown.returncode == 0, shown.stderr
        assert sorted(i["key"] for i in json.loads(shown.stdout)["images"]) == [f"old/{n}.jpg" for n in range(3)]

        # The moderation loop's API and commands need no model stack either.
        reviewed = httpx.post(
            f"{base}/v1/images/{via_api[0]}/review",
            json={"verdict": "ai"},
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=10,
        )
        assert reviewed.status_code == 201 and reviewed.json()["bank"] == "added", reviewed.text
        exported = _run(["bank", "export", "--client", "slim"], slim_env)
        assert exported.returncode == 0, exported.stderr
        with sessions() as session:
            banked = session.get(Image, via_api[0]).pdq
        assert banked and banked in exported.stdout
    finally:
        api.terminate()
        api.wait(30)
        api_log.close()
