#!/usr/bin/env python
"""synthguard GPU benchmark: `python bench/gpu.py [--quick] [--fixtures DIR] [--compile]`. Prints tables.

Run on a machine with a CUDA GPU; asserts nothing. What it measures, in one run:
  1. model ceiling: the service's model on ready, normalised tensors already on the GPU, per
     precision (SYNTHGUARD_PRECISION), memory format (the detector's own, and channels_last) and
     batch size, with each size's first call timed; torch.compile with --compile;
  2. the service's `Detector.predict` from CPU tensors (uint8 pixels through a pinned buffer and
     normalised on the GPU, against float tensors normalised on the CPU);
  3. score parity of each precision against the float32 CPU reference, the eager model (fixtures
     and synthetic images);
  4. decoding: `decode_image` + `Detector.preprocess` (and + `read_provenance`), 1 process, 16
     threads in one process, one process per core, and one process's threads handing the stages to
     one preparing process per core (SYNTHGUARD_PREPARE_PROCESSES);
  5. the worker's path without broker, database and S3: threads that decode, read provenance and
     preprocess (themselves or through preparing processes), feeding the service's MicroBatcher and
     `Detector.predict` on the GPU, in one process and in several processes sharing the GPU;
  6. SYNTHGUARD_DEVICE_DECODE's batch function: JPEGs decoded by nvJPEG (torchvision) and resized on the GPU,
     its rate and its score drift against the CPU reference (section `gpujpeg`).
Nothing is downloaded: the checkpoint is built with timm (pretrained=False) and saved as safetensors.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["HF_HUB_OFFLINE"] = "1"

from bench.run import SETS, fixture_files, make_set, table  # noqa: E402

ARCH = "tf_mobilenetv3_large_100"
PRECISIONS = ("float32", "tf32", "float16", "bfloat16")
# "default": the memory format the detector picks itself (contiguous at SYNTHGUARD_BATCH_SIZE 32).
LAYOUTS = ("default", "channels_last")
LOG = print


def build_checkpoint(folder: Path) -> Path:
    """The test checkpoint (random weights, classifier scaled as in tests/conftest.py)."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(1234)
    model = timm.create_model(ARCH, num_classes=2, pretrained=False)
    with torch.no_grad():
        model.classifier.weight.mul_(60.0)
    path = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def detector(checkpoint: Path, device: str, precision: str = "auto", batch_size: int = 32,  # type: ignore[no-untyped-def]
             frozen: bool = True):
    """The service's detector; ``frozen=False`` on a CPU is the eager model, the float32 reference."""
    from worker.detector import Detector
    from worker.settings import Settings

    return Detector.from_settings(
        Settings(
            model_checkpoint=str(checkpoint),
            device=device,
            precision=precision,
            batch_size=batch_size,
            model_freeze_cpu=frozen,
            database_url="sqlite://",
        )
    )


# ------------------------------------------------------------------ 1, 2: the model


def cuda_rate(fn, images_per_call: int, min_s: float) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(img/s from the median call, median ms per call), timed with CUDA events after a warm-up."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    t_end = time.perf_counter() + min_s
    while time.perf_counter() < t_end or len(times) < 5:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    ms = statistics.median(times)
    return images_per_call / (ms / 1000.0), ms


def model_ceiling(checkpoint: Path, batches: list[int], min_s: float, compile_model: bool) -> dict:
    import torch

    out: dict[str, Any] = {"eager": {}, "compiled": {}, "predict": {}}
    for precision in PRECISIONS:
        for layout in LAYOUTS:
            det = detector(checkpoint, "cuda", precision)
            if layout == "channels_last" and not det.channels_last:
                det.model = det.model.to(memory_format=torch.channels_last)
                det.channels_last = True
            for bs in batches:
                # Three input sets in rotation, so repeated calls do not just re-read the L2 cache.
                inputs = [torch.randn(bs, 3, 224, 224, device="cuda") for _ in range(3)]
                turn = iter(range(1 << 30))

                def run(det=det, inputs=inputs, turn=turn) -> None:  # type: ignore[no-untyped-def]
                    with torch.inference_mode():
                        det._forward(inputs[next(turn) % 3])

                # The first call at a new batch size: what an image would wait if it were not warmed up.
                t0 = time.perf_counter()
                run()
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                rate, ms = cuda_rate(run, bs, min_s)
                out["eager"][f"{precision}/{layout}/{bs}"] = {"img_s": rate, "ms": ms, "first_s": first}
                LOG(f"  eager {precision:8s} {layout:13s} batch {bs:5d}: {rate:9.0f} img/s ({ms:.2f} ms; "
                    f"first call {first:.2f} s)")
            del det, inputs
            torch.cuda.empty_cache()

    # The service's predict, from CPU tensors: uint8 pixels (pinned, normalised on the GPU) vs float.
    det = detector(checkpoint, "cuda", "auto")
    gen = torch.Generator().manual_seed(0)
    for bs in batches:
        pixels = [torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8, generator=gen) for _ in range(bs)]
        floats = [det.normalise(p[None])[0] for p in pixels]
        for kind, batch in (("uint8", pixels), ("float32", floats)):
            def call(batch=batch) -> None:  # type: ignore[no-untyped-def]
                det.predict(batch)

            rate, ms = cuda_rate(call, bs, min_s)
            out["predict"][f"{kind}/{bs}"] = {"img_s": rate, "ms": ms}
            LOG(f"  predict from CPU {kind:7s} batch {bs:5d}: {rate:9.0f} img/s ({ms:.2f} ms)")
    out["predict_precision"] = det.precision

    if compile_model:
        for precision in ("float32", "float16"):
            det = detector(checkpoint, "cuda", precision)
            for mode in ("default",):
                compiled = torch.compile(det.model, mode=mode, dynamic=False)
                for bs in batches[-2:]:
                    x = torch.randn(bs, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)

                    def crun(compiled=compiled, x=x, det=det) -> None:  # type: ignore[no-untyped-def]
                        amp = det._amp_dtype
                        with torch.inference_mode(), torch.autocast("cuda", dtype=amp, enabled=amp is not None):
                            compiled(x)

                    t0 = time.perf_counter()
                    try:
                        crun()
                        torch.cuda.synchronize()
                    except Exception as exc:  # noqa: BLE001 - a lever that fails is reported, not fatal
                        LOG(f"  compile {mode} {precision} failed: {type(exc).__name__}: {exc}")
                        break
                    warm = time.perf_counter() - t0
                    rate, ms = cuda_rate(crun, bs, min_s)
                    out["compiled"][f"{precision}/{mode}/{bs}"] = {"img_s": rate, "ms": ms, "compile_s": warm}
                    LOG(f"  compiled {mode} {precision} batch {bs}: {rate:9.0f} img/s (first call {warm:.0f}s)")
            torch._dynamo.reset()
    return out


# ------------------------------------------------------------------ 3: parity


def parity(checkpoint: Path, fixtures: Path | None, images: dict[str, list[bytes]]) -> dict:
    """Each precision's scores and logit margins on the GPU against the float32 CPU reference."""
    import torch

    from worker.imaging import decode_image

    samples: list[tuple[str, bytes]] = []
    if fixtures is not None:
        samples += [(f"{path.parent.name}/{path.name}", path.read_bytes()) for path in fixture_files(fixtures)]
    for name, blobs in images.items():
        samples += [(f"synthetic {name} #{i}", b) for i, b in enumerate(blobs)]

    def logits(det, pixels: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
        with torch.inference_mode():
            x = det.normalise(pixels.to(det.device))
            return det._forward(x).float().cpu()

    ref_det = detector(checkpoint, "cpu", frozen=False)
    pixels: list[torch.Tensor] = []
    names: list[str] = []
    for name, blob in samples:
        try:
            pixels.append(ref_det.preprocess(decode_image(blob, max_pixels=100_000_000).image))
            names.append(name)
        except Exception as exc:  # noqa: BLE001 - an undecodable fixture is listed, not fatal
            LOG(f"  skip {name}: {exc}")
    batch = torch.stack(pixels)
    ref = logits(ref_det, batch)
    ai = ref_det.ai_index
    ref_scores = ref.softmax(-1)[:, ai]
    ref_margin = ref[:, ai] - ref[:, 1 - ai]
    out: dict[str, Any] = {"images": len(names), "precisions": {}}
    for precision in PRECISIONS:
        det = detector(checkpoint, "cuda", precision)
        got = logits(det, batch)
        scores = got.softmax(-1)[:, ai]
        margin = got[:, ai] - got[:, 1 - ai]
        drift = (scores - ref_scores).abs()
        mdrift = (margin - ref_margin).abs()
        worst = int(drift.argmax())
        out["precisions"][precision] = {
            "score_max": float(drift.max()),
            "score_mean": float(drift.mean()),
            "margin_max": float(mdrift.max()),
            "margin_mean": float(mdrift.mean()),
            "worst": names[worst],
            "flips": int(((scores >= 0.5) != (ref_scores >= 0.5)).sum()),
        }
        LOG(f"  parity {precision}: {out['precisions'][precision]}")
    return out


# ------------------------------------------------------------------ 4: decoding


def _decode_worker(args: tuple[str, list[bytes], float, bool, str]) -> tuple[int, float]:
    """In a spawned process: decode(+provenance)+preprocess ``blobs`` round-robin for ``seconds``."""
    checkpoint, blobs, seconds, with_provenance, device = args
    import torch

    torch.set_num_threads(1)
    from worker.imaging import decode_image
    from worker.provenance import read_provenance

    det = detector(Path(checkpoint), device)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        blob = blobs[done % len(blobs)]
        decoded = decode_image(blob, max_pixels=100_000_000)
        if with_provenance:
            read_provenance(blob, decoded.format, decoded.image)
        det.preprocess(decoded.image)
        done += 1
    return done, time.perf_counter() - t0


def _round_robin(work: Any, blobs: list[bytes], threads: int, seconds: float) -> tuple[int, float]:
    """``threads`` threads call ``work`` on ``blobs`` round-robin for ``seconds``: (calls done, seconds)."""
    stop = time.perf_counter() + seconds
    counter = [0]
    lock = threading.Lock()

    def loop(offset: int) -> None:
        i = offset
        while time.perf_counter() < stop:
            work(blobs[i % len(blobs)])
            i += 1
            with lock:
                counter[0] += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(loop, range(threads)))
    return counter[0], time.perf_counter() - t0


def prepare_spec(det: Any) -> Any:
    """The worker's PrepareSpec for ``det`` at the service's default caps."""
    from worker.preparing import PrepareSpec
    from worker.settings import Settings

    return PrepareSpec.from_settings(Settings(), det)


def decoding(checkpoint: Path, images: dict[str, list[bytes]], seconds: float, cores: int) -> dict:
    """Images/s of the CPU stages alone: one process, threads in one process, one process per core, and
    one process whose threads hand the stages to ``cores`` preparing processes (SYNTHGUARD_PREPARE_PROCESSES)."""
    from worker.imaging import decode_image
    from worker.preparing import ProcessPreparer
    from worker.provenance import read_provenance

    det = detector(checkpoint, "cpu")
    out: dict[str, Any] = {}
    # One pool for every set: spawned processes import torch once; a short run warms them.
    procs = mp.get_context("spawn").Pool(cores)
    procs.map(_decode_worker, [(str(checkpoint), next(iter(images.values())), 0.5, True, "cpu")] * cores)
    preparer = ProcessPreparer(cores, prepare_spec(det), hard_timeout_s=60.0)
    for name, blobs in images.items():
        row: dict[str, float] = {}
        for with_prov in (False, True):
            tag = "+prov" if with_prov else ""

            def one(blob: bytes, with_prov: bool = with_prov) -> None:
                decoded = decode_image(blob, max_pixels=100_000_000)
                if with_prov:
                    read_provenance(blob, decoded.format, decoded.image)
                det.preprocess(decoded.image)

            for threads in (1, cores):
                done, elapsed = _round_robin(one, blobs, threads, seconds)
                row[f"threads{threads}{tag}"] = done / elapsed
            results = procs.map(_decode_worker, [(str(checkpoint), blobs, seconds, with_prov, "cpu")] * cores)
            row[f"procs{cores}{tag}"] = sum(n / s for n, s in results)
        # The worker's own path to all cores: its threads wait on preparing processes (provenance included).
        done, elapsed = _round_robin(lambda blob: preparer.prepare(blob), blobs, 2 * cores, seconds)
        row[f"preparing{cores}+prov"] = done / elapsed
        out[name] = row
        LOG(f"  {name}: " + ", ".join(f"{k} {v:.0f}" for k, v in row.items()))
    preparer.close()
    procs.close()
    procs.join()
    return out


# ------------------------------------------------------------------ 5: the worker's path


def _pipeline(args: tuple[str, list[bytes], float, int, int, float, bool, int]) -> tuple[int, float, list[int]]:
    """The worker's scoring path minus fetch and store, ``threads`` threads into one MicroBatcher.

    With ``prepare`` > 0 the threads hand decode, provenance and preprocess to that many
    preparing processes (worker.preparing), as SYNTHGUARD_PREPARE_PROCESSES does.
    Returns (images done, seconds, batch sizes seen).
    """
    checkpoint, blobs, seconds, threads, max_batch, wait_ms, with_prov, prepare = args
    import torch

    from worker.batching import MicroBatcher
    from worker.imaging import decode_image
    from worker.preparing import ProcessPreparer
    from worker.provenance import read_provenance

    det = detector(Path(checkpoint), pipeline_device(), batch_size=max_batch)
    sizes: list[int] = []
    batcher = MicroBatcher(
        det.predict, max_batch=max_batch, max_wait_s=wait_ms / 1000.0, on_batch=lambda s: sizes.append(s.size)
    )
    preparer = ProcessPreparer(prepare, prepare_spec(det), hard_timeout_s=60.0) if prepare else None

    def score(blob: bytes) -> None:
        if preparer is not None:
            batcher(torch.from_numpy(preparer.prepare(blob).pixels))
            return
        decoded = decode_image(blob, max_pixels=100_000_000)
        if with_prov:
            read_provenance(blob, decoded.format, decoded.image)
        batcher(det.preprocess(decoded.image))

    try:
        done, elapsed = _round_robin(score, blobs, threads, seconds)
    finally:
        batcher.close()
        if preparer is not None:
            preparer.close()
    return done, elapsed, sizes


def pipeline_device() -> str:
    """Where the pipeline section runs the model: BENCH_PIPELINE_DEVICE, else the GPU (the CPU without one)."""
    import torch

    return os.environ.get("BENCH_PIPELINE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def parse_layouts(text: str) -> list[tuple[int, int, bool, int]]:
    """'8x4,1x16-noprov,1x32-prep16' as [(processes, threads, with provenance, preparing processes)]."""
    out = []
    for item in text.split(","):
        shape, *flags = item.split("-")
        procs, threads = (int(n) for n in shape.split("x"))
        prepare = next((int(f[4:]) for f in flags if f.startswith("prep")), 0)
        if prepare and procs != 1:
            raise SystemExit(f"layout {item}: preparing processes need a single worker process (1xT-prepN)")
        out.append((procs, threads, "noprov" not in flags, prepare))
    return out


def pipeline(
    checkpoint: Path,
    images: dict[str, list[bytes]],
    seconds: float,
    layouts: list[tuple[int, int, bool]],
    out: dict[str, Any],
    save: Any,
) -> dict:
    """Fill ``out`` per image set (saving after each): img/s and mean batch per layout."""
    ctx = mp.get_context("spawn")
    for name, blobs in images.items():
        row: dict[str, Any] = {}
        for procs, threads, with_prov, prepare in layouts:
            job = (str(checkpoint), blobs, seconds, threads, 256, 5.0, with_prov, prepare)
            if prepare:
                # Here, not in a pool: a pool's daemonic processes may not start preparing processes.
                results = [_pipeline(job)]
            else:
                with ctx.Pool(procs) as pool:
                    results = pool.map(_pipeline, [job] * procs)
            rate = sum(n / s for n, s, _ in results)
            sizes = [b for _, _, s in results for b in s]
            key = f"{procs}x{threads}" + ("" if with_prov else " no provenance") + (
                f" + {prepare} preparing" if prepare else "")
            row[key] = {"img_s": rate, "mean_batch": statistics.fmean(sizes) if sizes else 0.0}
            LOG(f"  {name} {key}: {rate:.0f} img/s, mean batch {row[key]['mean_batch']:.1f}")
        out[name] = row
        save()
    return out


# ------------------------------------------------------------------ 6: GPU JPEG decoding


def gpu_jpeg(checkpoint: Path, images: dict[str, list[bytes]], fixtures: Path | None, min_s: float,
             device: str = "cuda") -> dict:
    """SYNTHGUARD_DEVICE_DECODE's batch function (worker.device_decode.DeviceBatch): JPEGs decoded on
    the GPU (torchvision's nvJPEG), their watermark bits read, resized and cropped there by the model's
    own timm transform, and scored; its rate, and its score drift against the service's CPU path.

    The rate counts decode + orientation + watermark + resize/crop + normalise + forward for a batch of
    64 bytes objects; the drift compares each image's score with the float32 CPU reference
    (decode_image + Detector.preprocess + the CPU model).
    """
    import torch

    from worker.device_decode import DeviceBatch, EncodedJpeg, Refused
    from worker.imaging import check_jpeg, decode_image

    det, ref = detector(checkpoint, device), detector(checkpoint, "cpu", frozen=False)
    on_device = DeviceBatch(det)

    def reference(blob: bytes) -> float:
        pixels = ref.preprocess(decode_image(blob, max_pixels=100_000_000).image).unsqueeze(0)
        with torch.inference_mode():
            return float(ref._forward(ref.normalise(pixels)).float().softmax(-1)[0, ref.ai_index])

    out: dict[str, Any] = {"rate": {}, "drift": {}, "refused": {}}
    for name, blobs in images.items():
        if not name.startswith("jpeg"):
            continue
        batch = [EncodedJpeg(b, 1) for b in (blobs * (64 // len(blobs) + 1))[:64]]

        def run(batch: list[EncodedJpeg] = batch) -> None:
            on_device(batch)

        if device.startswith("cuda"):
            out["rate"][name] = cuda_rate(run, len(batch), min_s)[0]
        else:
            run()
            t0 = time.perf_counter()
            run()
            out["rate"][name] = len(batch) / (time.perf_counter() - t0)
        LOG(f"  GPU JPEG {name}: {out['rate'][name]:.0f} img/s")
    samples = [(f"synthetic {n} #{i}", b) for n, blobs in images.items() if n.startswith("jpeg")
               for i, b in enumerate(blobs)]
    if fixtures is not None:
        samples += [(f"{p.parent.name}/{p.name}", p.read_bytes()) for folder in ("real", "c2pa", "generated")
                    for p in sorted((fixtures / folder).glob("*")) if p.suffix.lower() in (".jpg", ".jpeg")]
    for label, blob in samples:
        checked = check_jpeg(blob, max_pixels=100_000_000)
        if checked is None:
            out["refused"][label] = "not taken by the device path (CMYK)"
            continue
        (got,) = on_device([EncodedJpeg(blob, checked.orientation)])
        if isinstance(got, Refused):
            out["refused"][label] = got.reason
            continue
        out["drift"][label] = [reference(blob), float(got.score)]
    drifts = [abs(a - b) for a, b in out["drift"].values()]
    if drifts:
        LOG(f"  GPU JPEG drift over {len(drifts)} images: max {max(drifts):.2e}, mean {statistics.mean(drifts):.2e}")
    return out


# ------------------------------------------------------------------ report


def machine() -> dict[str, Any]:
    import PIL
    import timm
    import torch

    gpu = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if gpu else None
    return {
        "gpu": torch.cuda.get_device_name(0) if gpu else "no GPU",
        "sms": props.multi_processor_count if props else 0,
        "gpu_mem_gib": round(props.total_memory / 2**30, 1) if props else 0,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "pillow": PIL.__version__,
        "kernel": platform.release(),
    }


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"Run {res['started']} ({res['wall_s']:.0f} s). {m['gpu']} ({m['sms']} SMs, {m['gpu_mem_gib']} GiB), "
        f"{m['cpus']} CPU cores, Python {m['python']}, torch {m['torch']}, timm {m['timm']}, Pillow {m['pillow']}.",
        "",
        "### Model ceiling (ready normalised tensors on the GPU), img/s (first call at that batch size, s)",
        "",
    ]
    eager = res["model"]["eager"]
    batches = sorted({int(k.split("/")[2]) for k in eager})
    lines.append(table(["precision", "memory format"] + [f"batch {b}" for b in batches],
                       [[p, lay] + [f"{eager[f'{p}/{lay}/{b}']['img_s']:.0f} ({eager[f'{p}/{lay}/{b}']['first_s']:.2f})"
                                    for b in batches] for p in PRECISIONS for lay in LAYOUTS]))
    if res["model"]["compiled"]:
        lines += ["", "torch.compile (dynamic=False; first call includes compilation):", ""]
        lines.append(table(["precision / mode / batch", "img/s", "first call s"],
                           [[k, f"{v['img_s']:.0f}", f"{v['compile_s']:.0f}"] for k, v in res["model"]["compiled"].items()]))
    pred = res["model"]["predict"]
    lines += ["", f"### `Detector.predict` from CPU tensors (precision {res['model']['predict_precision']})", ""]
    lines.append(table(["input", *[f"batch {b} img/s" for b in batches]],
                       [[k] + [f"{pred[f'{k}/{b}']['img_s']:.0f}" for b in batches] for k in ("uint8", "float32")]))
    par = res["parity"]
    lines += ["", f"### Score parity against the float32 CPU reference ({par['images']} images)", ""]
    lines.append(table(
        ["precision", "max abs score drift", "mean abs score drift", "max logit-margin drift",
         "mean logit-margin drift", "worst image", "verdict flips at 0.5"],
        [[p, f"{v['score_max']:.2e}", f"{v['score_mean']:.2e}", f"{v['margin_max']:.2e}", f"{v['margin_mean']:.2e}",
          v["worst"], v["flips"]] for p, v in par["precisions"].items()]))
    dec = res["decoding"]
    cols = list(next(iter(dec.values())).keys())
    lines += ["", "### CPU stages alone, img/s (decode + preprocess; +prov adds read_provenance)", ""]
    lines.append(table(["set", *cols], [[n, *[f"{r[c]:.0f}" for c in cols]] for n, r in dec.items()]))
    pipe = res["pipeline"]
    cols = list(next(iter(pipe.values())).keys())
    lines += ["", "### Worker path without broker, database and S3 (processes x threads), img/s (mean batch)", ""]
    lines.append(table(["set", *cols],
                       [[n, *[f"{r[c]['img_s']:.0f} ({r[c]['mean_batch']:.0f})" for c in cols]] for n, r in pipe.items()]))
    jpeg = res.get("gpujpeg")
    if jpeg:
        lines += ["", "### SYNTHGUARD_DEVICE_DECODE: JPEG decoded, watermark-read and resized on the GPU (nvJPEG), batch 64", ""]
        if "error" in jpeg:
            lines.append(f"Not measured: {jpeg['error']}")
        else:
            lines.append(table(["set", "img/s (decode + resize + model)"],
                               [[n, f"{r:.0f}"] for n, r in jpeg["rate"].items()]))
            pairs, refused = list(jpeg["drift"].values()), list(jpeg["refused"])
            if pairs:
                drifts = [abs(a - b) for a, b in pairs]
                flips = sum((a >= 0.5) != (b >= 0.5) for a, b in pairs)
                lines += ["", f"Score drift against the CPU reference over {len(pairs)} JPEGs: max {max(drifts):.2e}, "
                          f"mean {statistics.mean(drifts):.2e}; {flips} verdicts flip at 0.5"
                          + (f"; refused: {', '.join(refused)}" if refused else "") + "."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timings, for a smoke run")
    parser.add_argument("--fixtures", type=Path, default=None, help="the shared fixtures folder, for parity")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (minutes)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per CPU-stage measurement")
    parser.add_argument(
        "--sections", default="model,parity,decoding,pipeline,gpujpeg", help="comma-separated subset to run"
    )
    parser.add_argument("--out", type=Path, default=None, help="write results.json and results.md here")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated image sets")
    parser.add_argument(
        "--layouts",
        default=None,
        help="worker-path layouts as PROCESSESxTHREADS, '-noprov' to skip provenance, '-prepN' for N "
        "preparing processes (default: 1xC-noprov,1xC,1x2C,C/2x4,Cx2,1x2C-prepC for C cores)",
    )
    args = parser.parse_args()

    import torch

    sections = set(args.sections.split(","))
    if not torch.cuda.is_available() and sections - {"decoding", "pipeline"}:
        print("bench/gpu.py needs a CUDA GPU (without one, only --sections decoding,pipeline run, on the CPU)",
              file=sys.stderr)
        return 2
    quick = args.quick
    min_s = 0.5 if quick else 2.0
    seconds = args.seconds or (3.0 if quick else 8.0)
    cores = os.cpu_count() or 1
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"started": started.isoformat(timespec="seconds"), "machine": machine()}
    LOG(json.dumps(res["machine"]))
    images = {name: make_set(name, 4 if quick else 8) for name in args.sets.split(",")}

    def save() -> None:  # after every section, so a run cut short keeps what it measured
        res["wall_s"] = time.perf_counter() - t0
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.json").write_text(json.dumps(res, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_checkpoint(Path(tmp))
        if "model" in sections:
            LOG("model ceiling")
            res["model"] = model_ceiling(checkpoint, [64, 256, 1024], min_s, args.compile)
            save()
        if "parity" in sections:
            LOG("parity")
            res["parity"] = parity(checkpoint, args.fixtures, images)
            save()
        if "decoding" in sections:
            LOG("decoding")
            res["decoding"] = decoding(checkpoint, images, seconds, cores)
            save()
        if "pipeline" in sections:
            LOG("pipeline")
            layouts = parse_layouts(args.layouts) if args.layouts else [
                (1, cores, False, 0), (1, cores, True, 0), (1, 2 * cores, True, 0), (max(1, cores // 2), 4, True, 0),
                (cores, 2, True, 0), (1, 2 * cores, True, cores),
            ]
            res["pipeline"] = {}
            pipeline(checkpoint, images, seconds, layouts, res["pipeline"], save)
        if "gpujpeg" in sections:
            LOG("GPU JPEG decoding")
            try:
                res["gpujpeg"] = gpu_jpeg(checkpoint, images, args.fixtures, min_s)
            except Exception as exc:  # noqa: BLE001 - e.g. no torchvision, or nvJPEG missing
                res["gpujpeg"] = {"error": f"{type(exc).__name__}: {exc}"}
                LOG(f"  not measured: {res['gpujpeg']['error']}")
            save()
    save()
    if {"model", "parity", "decoding", "pipeline"} <= set(res):
        text = render(res)
        if args.out:
            (args.out / "results.md").write_text(text + "\n")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
