"""`synthguard eval`: metrics against hand-computed values, and the command end to end."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image as PILImage
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from conftest import make_test_model
from worker.cli import main
from worker.evaluation import (
    accuracy_at,
    average_precision,
    bootstrap_ci,
    confusion,
    label_from_path,
    parse_label,
    reliability,
    roc_auc,
    roc_curve,
    threshold_for_fpr,
)
from worker.models import DONE, Image

# Three AI, three real; at threshold 0.5: AI 0.9, 0.8 flagged, 0.4 missed; real 0.6 flagged.
LABELS = [1, 1, 1, 0, 0, 0]
SCORES = [0.9, 0.8, 0.4, 0.6, 0.3, 0.1]
PLOTS = ("roc.png", "precision_recall.png", "score_histogram.png", "reliability.png")


# ------------------------------------------------------------------- pure metrics


def test_confusion_accuracy_precision_recall() -> None:
    matrix = confusion(LABELS, SCORES, 0.5)
    assert (matrix.tp, matrix.fp, matrix.tn, matrix.fn) == (2, 1, 2, 1)
    assert matrix.accuracy == pytest.approx(4 / 6)
    assert matrix.precision == pytest.approx(2 / 3)
    assert matrix.recall == pytest.approx(2 / 3)
    assert matrix.fpr == pytest.approx(1 / 3)
    # A score equal to the threshold is flagged, as the scorer flags it.
    assert confusion([1], [0.5], 0.5).tp == 1


def test_rates_without_a_denominator_are_none() -> None:
    matrix = confusion([0, 0], [0.1, 0.2], 0.5)
    assert matrix.precision is None
    assert matrix.recall is None
    assert matrix.accuracy == 1.0


def test_roc_auc_counts_pairs_and_halves_ties() -> None:
    # Pairs (AI above real): 0.9 beats 3, 0.8 beats 3, 0.4 beats 2 -> 8 of 9.
    assert roc_auc(LABELS, SCORES) == pytest.approx(8 / 9)
    # AI 0.5 vs real 0.5 is a tie (1/2); the other three pairs are won -> 3.5 of 4.
    assert roc_auc([1, 0, 1, 0], [0.5, 0.5, 0.7, 0.2]) == pytest.approx(0.875)
    assert roc_auc([1, 1], [0.2, 0.3]) is None


def test_roc_curve_runs_from_origin_to_one() -> None:
    fpr, tpr, thresholds = roc_curve(LABELS, SCORES)
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert thresholds[0] == np.inf
    # Trapezoids under the curve give the same area as the pair count.
    assert np.trapezoid(tpr, fpr) == pytest.approx(8 / 9)


def test_average_precision() -> None:
    # Ranked 0.9 AI, 0.8 AI, 0.6 real, 0.4 AI: precision 1, 1, -, 3/4 where recall grows by 1/3.
    assert average_precision(LABELS, SCORES) == pytest.approx(1 / 3 + 1 / 3 + 1 / 3 * 3 / 4)
    # Tied scores form one step: at 0.7 P=1 R=1/2; at 0.5 P=2/3 R=1.
    assert average_precision([1, 0, 1, 0], [0.5, 0.5, 0.7, 0.2]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision([0, 0], [0.1, 0.2]) is None


def test_threshold_for_target_fpr() -> None:
    # One false positive in three real images is allowed: 0.4 is the lowest such threshold.
    loose = threshold_for_fpr(LABELS, SCORES, 0.34)
    assert loose["threshold"] == pytest.approx(0.4)
    assert loose["recall"] == pytest.approx(1.0)
    assert loose["false_positives"] == 1
    # None allowed: the threshold must pass the real 0.6; the next score up is 0.8.
    strict = threshold_for_fpr(LABELS, SCORES, 0.01)
    assert strict["threshold"] == pytest.approx(0.8)
    assert strict["recall"] == pytest.approx(2 / 3)
    assert strict["fpr"] == 0.0
    assert strict["negatives_needed"] == 100
    # The highest score is a real image: nothing may be flagged at all.
    none = threshold_for_fpr([0, 1], [0.9, 0.5], 0.01)
    assert none["threshold"] > 0.9
    assert none["recall"] == 0.0
    assert none["above_all_scores"]
    assert not strict["above_all_scores"]


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(7)
    labels = np.repeat([1, 0], 100)
    scores = np.clip(np.concatenate([rng.normal(0.65, 0.2, 100), rng.normal(0.35, 0.2, 100)]), 0, 1)
    for metric in (roc_auc, average_precision, accuracy_at(0.5)):
        interval = bootstrap_ci(labels, scores, metric, samples=300, seed=3)
        assert interval is not None
        assert interval[0] <= metric(labels, scores) <= interval[1]
        assert interval[0] < interval[1]
        assert bootstrap_ci(labels, scores, metric, samples=300, seed=3) == interval
    assert bootstrap_ci(labels, scores, roc_auc, samples=300, seed=4) != bootstrap_ci(
        labels, scores, roc_auc, samples=300, seed=3
    )


def test_reliability_bins_and_calibration_error() -> None:
    bins, ece = reliability([0, 1, 1], [0.05, 0.15, 0.95])
    filled = [(b["mean_score"], b["share_ai"], b["count"]) for b in bins if b["count"]]
    assert filled == [
        (pytest.approx(0.05), 0.0, 1),
        (pytest.approx(0.15), 1.0, 1),
        (pytest.approx(0.95), 1.0, 1),
    ]
    assert ece == pytest.approx((0.05 + 0.85 + 0.05) / 3)


def test_labels_from_layout_and_words() -> None:
    assert label_from_path("ai/midjourney/x.png") == (1, "ai/midjourney")
    assert label_from_path("real/x.jpg") == (0, "real")
    assert label_from_path("AI/x.png") == (1, "ai")
    assert label_from_path("other/x.png") is None
    assert label_from_path("x.png") is None
    assert parse_label(" Real ") == 0
    assert parse_label("fake") == 1
    assert parse_label("label") is None


# ------------------------------------------------------------------- end to end


def _env(tmp_path: Path, checkpoint: Path) -> dict[str, str]:
    return {
        "SYNTHGUARD_DATABASE_URL": f"sqlite:///{tmp_path / 'eval.db'}",
        "SYNTHGUARD_MODEL_CHECKPOINT": str(checkpoint),
        "SYNTHGUARD_DEVICE": "cpu",
        "SYNTHGUARD_THRESHOLD": "0.5",
    }


def _eval(env: dict[str, str], *args: str) -> dict:
    result = CliRunner().invoke(main, ["eval", *args, "--json", "--bootstrap", "200"], env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _stored(env: dict[str, str]) -> list[Image]:
    engine = create_engine(env["SYNTHGUARD_DATABASE_URL"])
    with Session(engine) as session:
        rows = list(session.scalars(select(Image).where(Image.state == DONE)))
    engine.dispose()
    return rows


def _count(env: dict[str, str], *where: object) -> int:
    engine = create_engine(env["SYNTHGUARD_DATABASE_URL"])
    with Session(engine) as session:
        n = session.scalar(select(func.count()).select_from(Image).where(*where))
    engine.dispose()
    return int(n or 0)


def _assert_real_png(path: Path) -> None:
    assert path.stat().st_size > 0
    with PILImage.open(path) as image:
        assert image.format == "PNG"
        colours = image.convert("RGB").getcolors(1 << 24)
    assert colours is not None
    assert len(colours) > 1, f"{path.name} is a single colour"


@pytest.fixture
def labelled_set(tmp_path: Path, fixtures_dir: Path) -> Path:
    """ai/comfyui/*.png (generated fixtures), real/*.jpg, and one broken file among the real ones."""
    root = tmp_path / "set"
    (root / "ai" / "comfyui").mkdir(parents=True)
    (root / "real").mkdir()
    for png in sorted((fixtures_dir / "generated").glob("*.png")):
        shutil.copy(png, root / "ai" / "comfyui" / png.name)
    for jpg in sorted((fixtures_dir / "real").glob("*.jpg")):
        shutil.copy(jpg, root / "real" / jpg.name)
    shutil.copy(fixtures_dir / "bad" / "truncated.jpg", root / "real" / "truncated.jpg")
    (root / "README.txt").write_text("not in a label folder")
    return root


def test_eval_directory_report_metrics_provenance_and_cache(
    tmp_path: Path, checkpoint: Path, labelled_set: Path
) -> None:
    env = _env(tmp_path, checkpoint)
    out = tmp_path / "report"
    first = _eval(env, str(labelled_set), "--out", str(out), "--target-fpr", "0.01", "--target-fpr", "0.5")
    n_ai = len(list((labelled_set / "ai" / "comfyui").iterdir()))
    n_real = len(list((labelled_set / "real").glob("*.jpg"))) - 1

    # Every labelled file counted; the broken one listed, not scored; the README ignored.
    assert first["counts"]["images"] == n_ai + n_real + 1
    assert first["counts"]["scored"] == n_ai + n_real
    assert first["counts"]["unlabelled"] == 1
    assert first["counts"]["cached"] == 0
    assert [Path(f["uri"]).name for f in first["failed"]] == ["truncated.jpg"]
    assert first["failed"][0]["error"].startswith("corrupt_image")

    # The metrics agree with the scores stored in the database, recomputed here by brute force.
    rows = {Path(r.key).name: r for r in _stored(env)}
    ai = [rows[p.name] for p in (labelled_set / "ai" / "comfyui").iterdir()]
    real = [rows[p.name] for p in (labelled_set / "real").glob("*.jpg") if p.name != "truncated.jpg"]
    tp = sum(r.score >= 0.5 for r in ai)
    fp = sum(r.score >= 0.5 for r in real)
    overall = first["overall"]
    assert overall["confusion"] == {"tp": tp, "fp": fp, "tn": len(real) - fp, "fn": len(ai) - tp}
    assert overall["accuracy"] == pytest.approx((tp + len(real) - fp) / (len(ai) + len(real)))
    pairs = [(a.score > r.score) + 0.5 * (a.score == r.score) for a in ai for r in real]
    assert overall["roc_auc"] == pytest.approx(sum(pairs) / len(pairs))
    for name in ("accuracy", "roc_auc", "average_precision"):
        low, high = overall["ci"][name]
        assert low <= overall[name] <= high
    assert [t["target_fpr"] for t in first["target_fpr"]] == [0.01, 0.5]
    assert all(t["fpr"] <= t["target_fpr"] for t in first["target_fpr"])

    # Provenance column: the ComfyUI fixtures say AI in their metadata.
    caught_alone = sum(bool(r.provenance["ai"]) and r.score < 0.5 for r in ai)
    assert sum(bool(r.provenance["ai"]) for r in ai) == len(ai)
    assert first["provenance"]["ai_with_provenance"] == len(ai)
    assert first["provenance"]["ai_caught_by_provenance_alone"] == caught_alone
    assert first["provenance"]["real_false_positives_by_provenance"] == sum(
        bool(r.provenance["ai"]) for r in real
    )

    # Per generator: the files' provenance names each model (worker.attribution), and the recall of
    # each row is that of its images' stored scores.
    by_generator = {g["generator"]: g for g in first["by_generator"]}
    named = {r.generator["name"]: r for r in ai}
    assert set(by_generator) == set(named) and len(named) == len(ai)
    for name, row in named.items():
        assert by_generator[name]["images"] == 1
        assert by_generator[name]["recall"] == (1.0 if row.score >= 0.5 else 0.0)
        assert by_generator[name]["recall_with_provenance"] == 1.0  # each says AI in its metadata

    # Per source folder.
    sources = {g["source"]: g for g in first["by_source"]}
    assert set(sources) == {"ai/comfyui", "real"}
    assert sources["ai/comfyui"]["ai"] == n_ai
    assert sources["real"]["failed"] == 1

    # The report: named model version, tables, valid non-blank plots.
    version = first["model"]["version"]
    assert version.startswith("sha256:")
    report = (out / "report.md").read_text()
    assert version in report
    assert "| model | dataset | accuracy |" in report
    assert "## Recall by generator" in report and "| Stable Diffusion XL | 1 |" in report
    assert "truncated.jpg" in report
    for name in PLOTS:
        assert f"]({name})" in report
        _assert_real_png(out / name)

    # Second run: every scored image comes from the cache; no new forward pass is stored.
    done_before = _count(env, Image.state == DONE)
    second = _eval(env, str(labelled_set), "--out", str(tmp_path / "again"))
    assert second["counts"]["cached"] == n_ai + n_real
    assert second["counts"]["newly_scored"] == 0
    assert _count(env, Image.state == DONE) == done_before
    # Same scores, same seed: the same metrics, intervals included.
    assert second["overall"] == first["overall"]


def test_eval_csv_with_sources_and_compare(tmp_path: Path, checkpoint: Path, fixtures_dir: Path) -> None:
    from safetensors.torch import save_file

    table = tmp_path / "labels.csv"
    generated = sorted((fixtures_dir / "generated").glob("*.png"))[:4]
    real = sorted((fixtures_dir / "real").glob("*.jpg"))
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        # Columns named in the header, the generator before the source.
        writer.writerow(["key", "label", "generator", "source"])
        for i, path in enumerate(generated):
            # The label's generator wins over the one the file's provenance names; blank: the file's.
            writer.writerow([str(path), "ai", "Midjourney" if i < 2 else "", "sdxl" if i % 2 else "flux"])
        for path in real:
            # Relative to the CSV's folder, with no source: grouped under its class.
            writer.writerow([os.path.relpath(path, table.parent), "real"])
    other = tmp_path / "other.safetensors"
    model = make_test_model(seed=99)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(other))

    env = _env(tmp_path, checkpoint)
    out = tmp_path / "csv-report"
    doc = _eval(env, str(table), "--out", str(out), "--compare", str(other))
    assert doc["counts"]["images"] == len(generated) + len(real)
    assert doc["counts"]["failed"] == 0
    sources = {g["source"]: g["images"] for g in doc["by_source"]}
    assert sources == {"flux": 2, "sdxl": 2, "real": len(real)}
    generators = {g["generator"]: g["images"] for g in doc["by_generator"]}
    from worker.attribution import attribute
    from worker.provenance import read_provenance

    def provenance_name(path: Path) -> str:
        data = path.read_bytes()
        found = attribute(read_provenance(data, "png").to_json())
        assert found is not None
        return found.name

    assert generators == {"Midjourney": 2, **{provenance_name(p): 1 for p in generated[2:]}}

    versions = [row["model_version"] for row in doc["comparison"]]
    assert versions[0] == doc["model"]["version"]
    assert len(set(versions)) == 2
    assert doc["comparison"][0]["accuracy"] == doc["overall"]["accuracy"]
    assert all(row["scored"] == len(generated) + len(real) for row in doc["comparison"])
    report = (out / "report.md").read_text()
    assert "## Model comparison" in report
    assert versions[1] in report


def test_eval_s3_prefix(tmp_path: Path, checkpoint: Path, fixtures_dir: Path, s3_client, bucket: str) -> None:
    files = {
        "set/ai/flux/a.png": fixtures_dir / "generated" / "flux_dev_example.png",
        "set/ai/b.png": fixtures_dir / "generated" / "sdxl_simple_example.png",
        "set/real/c.jpg": fixtures_dir / "real" / "IMG_0003.jpg",
        "set/real/d.jpg": fixtures_dir / "real" / "P1000827.jpg",
        "set/notes.txt": fixtures_dir / "README.md",
    }
    for key, path in files.items():
        s3_client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
    env = _env(tmp_path, checkpoint) | {"SYNTHGUARD_S3_ENDPOINT_URL": s3_client.meta.endpoint_url}
    doc = _eval(env, f"s3://{bucket}/set", "--out", str(tmp_path / "s3-report"))
    counts = doc["counts"]
    assert (counts["images"], counts["scored"], counts["failed"], counts["unlabelled"]) == (4, 4, 0, 1)
    assert {g["source"]: g["images"] for g in doc["by_source"]} == {"ai/flux": 1, "ai": 1, "real": 2}
