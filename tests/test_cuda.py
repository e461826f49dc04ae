"""The detector on a CUDA GPU: parity with the CPU reference, batching, the pinned staging path.

Skipped where no CUDA device is visible (CI has none); run on a GPU host with
``python -m pytest tests/test_cuda.py``. The numbers behind the precision
default are in bench/RESULTS.md (GPU section).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from conftest import good_fixture_files
from worker.batching import MicroBatcher
from worker.detector import CHANNELS_LAST_MIN_BATCH, CUDA_AUTO_PRECISION, Detector, batch_buckets
from worker.imaging import decode_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")

# The bar for a faster path to be the default: scores within 1e-3 of the reference.
DEFAULT_PARITY = 1e-3
# Strict float32 on the GPU differs from the CPU only in the order of summation.
FLOAT32_PARITY = 1e-5


@pytest.fixture(scope="module")
def cpu_detector(checkpoint: Path) -> Detector:
    from worker.settings import Settings

    # The reference: the eager float32 model, not the CPU's frozen form (which is within 1e-5 of it).
    return Detector.from_settings(Settings(model_checkpoint=str(checkpoint), device="cpu", model_freeze_cpu=False))


def _gpu(settings_factory, precision: str = "auto") -> Detector:  # type: ignore[no-untyped-def]
    return Detector.from_settings(settings_factory(device="cuda", precision=precision))


@pytest.fixture(scope="module")
def pixels(cpu_detector: Detector) -> list[torch.Tensor]:
    """Every decodable fixture of every layer as the model's uint8 input."""
    out = []
    for path in good_fixture_files():
        decoded = decode_image(path.read_bytes(), max_pixels=100_000_000)
        out.append(cpu_detector.preprocess(decoded.image))
    assert len(out) >= 10
    return out


def _conv_weight(detector: Detector) -> torch.Tensor:
    return next(p for p in detector.model.parameters() if p.ndim == 4)


def test_default_precision_on_cuda(settings_factory) -> None:
    settings = settings_factory(device="cuda")
    detector = Detector.from_settings(settings)
    assert detector.device.type == "cuda" and detector.precision == CUDA_AUTO_PRECISION
    # warmed at load, every batch padded to one of them
    assert detector.buckets == batch_buckets(settings.batch_size)
    # float32 keeps the default layout: channels_last made each batch size's first pass seconds long
    assert not detector.channels_last and _conv_weight(detector).is_contiguous()


def test_channels_last_only_for_large_reduced_precision_batches(
    settings_factory, cpu_detector: Detector, pixels
) -> None:
    small = Detector.from_settings(settings_factory(device="cuda", precision="float16", batch_size=32))
    assert not small.channels_last and _conv_weight(small).is_contiguous()
    large = Detector.from_settings(
        settings_factory(device="cuda", precision="float16", batch_size=CHANNELS_LAST_MIN_BATCH)
    )
    assert large.channels_last and _conv_weight(large).is_contiguous(memory_format=torch.channels_last)
    # The layout changes the kernels, not the verdicts: confident ones agree with the reference.
    reference = torch.tensor(cpu_detector.predict(pixels))
    confident = (reference - 0.5).abs() > 0.25
    scores = torch.tensor(large.predict(pixels))
    assert torch.equal((scores >= 0.5)[confident], (reference >= 0.5)[confident])


@pytest.mark.parametrize(("precision", "bound"), [("float32", FLOAT32_PARITY), ("auto", DEFAULT_PARITY)])
def test_scores_match_the_cpu_reference(
    precision: str, bound: float, settings_factory, cpu_detector: Detector, pixels
) -> None:
    """The parity test: the default GPU path stays within 1e-3 of the float32 CPU scores on the fixtures."""
    reference = torch.tensor(cpu_detector.predict(pixels))
    scores = torch.tensor(_gpu(settings_factory, precision).predict(pixels))
    drift = (scores - reference).abs()
    assert float(drift.max()) <= bound, f"max drift {float(drift.max()):.2e} on image {int(drift.argmax())}"


def test_reduced_precisions_stay_close(settings_factory, cpu_detector: Detector, pixels) -> None:
    """Opt-in precisions really change the arithmetic (scores move), but no confident verdict turns."""
    reference = torch.tensor(cpu_detector.predict(pixels))
    confident = (reference - 0.5).abs() > 0.25
    for precision in ("tf32", "float16", "bfloat16"):
        detector = _gpu(settings_factory, precision)
        assert detector.precision == precision
        scores = torch.tensor(detector.predict(pixels))
        assert not torch.equal(scores, reference), f"{precision} computed exactly the float32 scores"
        assert torch.equal((scores >= 0.5)[confident], (reference >= 0.5)[confident]), precision


def test_batch_composition_does_not_change_a_score(settings_factory, pixels) -> None:
    detector = _gpu(settings_factory, "float32")
    together = torch.tensor(detector.predict(pixels))
    alone = torch.tensor([detector.predict([p])[0] for p in pixels])
    assert torch.allclose(together, alone, atol=FLOAT32_PARITY, rtol=0)


def test_staging_buffer_serves_any_size_and_dtype(settings_factory, cpu_detector: Detector, pixels) -> None:
    """One pinned buffer is reused: growing, shrinking and float batches still score the right images."""
    detector = _gpu(settings_factory, "float32")
    expected = torch.tensor(cpu_detector.predict(pixels))
    big = pixels * 20
    got_big = torch.tensor(detector.predict(big))
    assert torch.allclose(got_big, expected.repeat(20), atol=FLOAT32_PARITY, rtol=0)
    got_small = torch.tensor(detector.predict(pixels[:3]))
    assert torch.allclose(got_small, expected[:3], atol=FLOAT32_PARITY, rtol=0)
    floats = [cpu_detector.normalise(p[None])[0] for p in pixels[:5]]
    got_float = torch.tensor(detector.predict(floats))
    assert torch.allclose(got_float, expected[:5], atol=FLOAT32_PARITY, rtol=0)


def test_normalising_on_the_gpu_is_the_reference_input(settings_factory, cpu_detector: Detector, pixels) -> None:
    detector = _gpu(settings_factory, "float32")
    batch = torch.stack(pixels)
    on_gpu = detector.normalise(batch.cuda()).cpu()
    assert torch.equal(on_gpu, cpu_detector.normalise(batch))


def test_many_threads_through_the_batcher(settings_factory, cpu_detector: Detector, pixels) -> None:
    """The worker's shape: many threads submit single images; each gets its own image's score."""
    detector = _gpu(settings_factory, "float32")
    expected = cpu_detector.predict(pixels)
    results: dict[int, float] = {}
    sizes: list[int] = []
    with MicroBatcher(detector.predict, max_batch=16, max_wait_s=0.05, on_batch=lambda s: sizes.append(s.size)) as b:
        barrier = threading.Barrier(len(pixels))

        def one(i: int) -> None:
            barrier.wait()
            results[i] = b(pixels[i], timeout=60)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(pixels))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert max(sizes) > 1
    for i, score in enumerate(expected):
        assert abs(results[i] - score) <= FLOAT32_PARITY, i


def test_a_cuda_scorer_prepares_images_in_one_process_per_core(
    checkpoint: Path, cpu_detector: Detector, pixels
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from worker.preparing import usable_cores
    from worker.scoring import Scorer
    from worker.settings import Settings
    from worker.storage import ObjectRef

    # SYNTHGUARD_PREPARE_PROCESSES and SYNTHGUARD_CONCURRENCY left unset, as on a GPU host by default.
    settings = Settings(model_checkpoint=str(checkpoint), device="cuda", database_url="sqlite://")
    files = good_fixture_files()
    with Scorer(settings, Detector.from_settings(settings), allow_local=True) as scorer:
        assert scorer.preparer.processes == usable_cores()
        assert scorer.concurrency == max(8, 2 * usable_cores())
        with ThreadPoolExecutor(scorer.concurrency) as threads:
            scores = list(threads.map(lambda p: scorer.score(ObjectRef(None, str(p))).score, files))
    reference = cpu_detector.predict(pixels)
    assert scores == pytest.approx(reference, abs=FLOAT32_PARITY)


def test_jpegs_decoded_by_nvjpeg_score_and_read_like_the_cpu_path(checkpoint: Path) -> None:
    """SYNTHGUARD_DEVICE_DECODE on a GPU: nvJPEG's pixels give the CPU path's provenance (the watermark
    read from them bit for bit as the CPU reader would) and scores within the issue's 1e-3 for a lever
    (2.0e-4 on the CPU device; the default path keeps 1e-5, which is why this one is opt-in)."""
    import numpy as np

    import worker.device_decode as device_decode
    from worker.provenance import watermark
    from worker.scoring import Scorer
    from worker.settings import Settings
    from worker.storage import ObjectRef

    files = good_fixture_files()
    results = {}
    for on_device in (False, True):
        settings = Settings(
            model_checkpoint=str(checkpoint), device="cuda", database_url="sqlite://", device_decode=on_device
        )
        with Scorer(settings, Detector.from_settings(settings), allow_local=True) as scorer:
            results[on_device] = [scorer.score(ObjectRef(None, str(p))) for p in files]
    drift = [abs(a.score - b.score) for a, b in zip(results[False], results[True], strict=True)]
    assert max(drift) <= 1e-3, f"nvJPEG's path drifts {max(drift):.2e}: record it in bench/RESULTS.md"
    for path, want, got in zip(files, results[False], results[True], strict=True):
        assert got.provenance == want.provenance, path.name
    jpegs = [p.read_bytes() for p in files if p.read_bytes()[:3] == b"\xff\xd8\xff"]
    decoded = device_decode.decode(jpegs, torch.device("cuda"))
    for pixels in decoded:
        if isinstance(pixels, device_decode.Refused):
            continue
        assert pixels.device.type == "cuda"
        bits = device_decode.watermark_bits(pixels)
        if bits is None:
            continue
        rgb = pixels.permute(1, 2, 0).cpu().numpy()
        rows, nbx = watermark.scan_blocks(rgb.shape[1], rgb.shape[0]) or (0, 0)
        crop = np.ascontiguousarray(rgb[: 8 * rows, : 8 * nbx])
        assert np.array_equal(bits, watermark.block_bits(watermark.convert(crop, np.empty((2, *crop.shape), np.uint8))))
