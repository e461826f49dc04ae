"""``synthguard scan``, ``results`` and ``demo`` as a user runs them: every fixture folder,
through S3 on PostgreSQL and from disk on SQLite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import BAD_FIXTURES, CORPUS, GOOD_FOLDERS, good_fixture_files
from worker.cli import main

# Every layer names its generated files alike (tests/corpus.py).
GENERATED = {p.name for p in (CORPUS / "generated").glob("*.png")}


def _env(**values: object) -> dict[str, str]:
    return {f"SYNTHGUARD_{k.upper()}": str(v) for k, v in values.items()}


def _invoke(args: list[str], env: dict[str, str]):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


def _by_name(doc: dict) -> dict[str, dict]:  # type: ignore[type-arg]
    return {Path(image["key"]).name: image for image in doc["images"]}


def _check_fixture_results(doc: dict, checkpoint_version: str) -> None:  # type: ignore[type-arg]
    images = _by_name(doc)
    good = {p.name for p in good_fixture_files()}
    assert good | set(BAD_FIXTURES) <= set(images)
    for name in set(images) - good - set(BAD_FIXTURES):
        # Anything else in the folders (a licence text) is not an image, and says so.
        assert images[name]["error_code"] == "unsupported_format", name
    for name in good:
        image = images[name]
        assert image["state"] == "done", (name, image["error_message"])
        assert 0.0 <= image["score"] <= 1.0
        ai_evidence = image["provenance"]["ai"]
        # Generator metadata flags an image whatever its score; its absence changes nothing.
        assert ai_evidence == (name in GENERATED)
        assert image["flagged"] == (image["score"] >= image["threshold"] or ai_evidence)
        assert image["model_version"] == checkpoint_version
        assert image["sha256"] and image["width"] and image["height"]
    for name, code in BAD_FIXTURES.items():
        assert images[name]["state"] == "failed"
        assert images[name]["error_code"] == code, (name, images[name]["error_message"])
        assert images[name]["error_message"]
    assert doc["completed_at"] is not None


@pytest.fixture(scope="module")
def checkpoint_version(checkpoint: Path) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:12]


def test_scan_of_every_fixture_folder_from_disk_on_sqlite(
    fixtures_dir: Path, checkpoint: Path, checkpoint_version: str, tmp_path: Path
) -> None:
    env = _env(database_url=f"sqlite:///{tmp_path / 'scan.db'}", model_checkpoint=checkpoint, device="cpu")
    folders = [str(fixtures_dir / f) for f in (*GOOD_FOLDERS, "bad")]
    result = _invoke(["scan", "--json", *folders], env)
    assert result.exit_code == 1, result.output  # the bad ones could not be scored
    doc = json.loads(result.stdout)
    _check_fixture_results(doc, checkpoint_version)

    again = _invoke(["results", "--json"], env)
    assert again.exit_code == 0
    assert json.loads(again.stdout)["images"] == doc["images"]

    table = _invoke(["results", doc["scan_id"]], env)
    assert "corrupt_image" in table.stdout and "IMG_0003.jpg" in table.stdout


def test_scan_of_an_s3_prefix_on_postgres(
    fixtures_dir: Path, checkpoint: Path, checkpoint_version: str, s3_endpoint: str, s3_client, bucket: str, pg_url: str
) -> None:
    s3_client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    etags = {}
    for folder in (*GOOD_FOLDERS, "bad"):
        for path in sorted((fixtures_dir / folder).iterdir()):
            if path.name.endswith(".md") or path.name.startswith("LICENSE"):
                continue
            key = f"uploads/{folder}/{path.name}"
            etags[path.name] = s3_client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())["ETag"].strip('"')
    s3_client.put_object(Bucket=bucket, Key="elsewhere/not-scanned.jpg", Body=b"x")
    env = _env(database_url=pg_url, model_checkpoint=checkpoint, device="cpu", s3_endpoint_url=s3_endpoint)
    result = _invoke(["scan", "--json", f"s3://{bucket}/uploads/"], env)
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    _check_fixture_results(doc, checkpoint_version)
    for name, image in _by_name(doc).items():
        assert image["bucket"] == bucket
        if image["state"] == "done":
            assert image["etag"] == etags[name]
            assert image["version_id"]


def test_scan_exits_zero_when_every_image_is_scored(corpus_dir: Path, checkpoint: Path, tmp_path: Path) -> None:
    env = _env(database_url=f"sqlite:///{tmp_path / 'ok.db'}", model_checkpoint=checkpoint, device="cpu")
    result = _invoke(["scan", str(corpus_dir / "real")], env)
    assert result.exit_code == 0, result.output
    assert "3 images: 3 done" in result.stdout


def test_scan_names_the_setting_when_the_hub_cannot_be_reached(corpus_dir: Path, tmp_path: Path) -> None:
    env = _env(database_url=f"sqlite:///{tmp_path / 'x.db'}", device="cpu")
    result = _invoke(["scan", str(corpus_dir / "real")], env)
    assert result.exit_code == 1
    assert "SYNTHGUARD_MODEL_CHECKPOINT" in result.output


def test_demo_offline_says_untrained_on_every_line_and_in_every_row(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    result = _invoke(["demo", "--dir", str(tmp_path / "samples")], _env(database_url=url, device="cpu"))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) >= 8
    for line in lines:
        assert "UNTRAINED" in line, line
    assert "UNTRAINED" in result.stderr

    from sqlalchemy import create_engine, text

    with create_engine(url).connect() as conn:
        rows = conn.execute(text("SELECT model_version, flagged, state, error_code FROM images")).all()
    assert len(rows) == 7
    assert {r.model_version for r in rows if r.state == "done"} == {"untrained"}
    assert all(r.flagged is None for r in rows)
    assert sorted(r.error_code for r in rows if r.state == "failed") == ["corrupt_image", "unsupported_format"]


def test_the_installed_command_runs(corpus_dir: Path, checkpoint: Path, tmp_path: Path) -> None:
    env = {**os.environ, **_env(database_url=f"sqlite:///{tmp_path / 'cmd.db'}", model_checkpoint=checkpoint, device="cpu")}
    exe = Path(sys.executable).with_name("synthguard")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "worker.cli"]
    done = subprocess.run(
        [*command, "scan", "--json", str(corpus_dir / "bad" / "image.svg")],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 1, done.stderr
    (image,) = json.loads(done.stdout)["images"]
    assert image["error_code"] == "unsupported_format"
