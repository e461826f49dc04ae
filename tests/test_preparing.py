"""Preparing processes (``SYNTHGUARD_PREPARE_PROCESSES``): the same results as the worker's own
threads, and a decoder that crashes or hangs costs only its own image. Real child processes,
crashed and killed for real."""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BAD_FIXTURES, good_fixture_files, wait_until
from worker import errors
from worker.detector import Detector
from worker.errors import PermanentError, SynthguardError, TransientError
from worker.preparing import (
    InlinePreparer,
    Prepared,
    PrepareSpec,
    ProcessPreparer,
    cpu_model_threads,
    feeding_threads,
    prepare_image,
    resolve_processes,
    usable_cores,
)
from worker.scoring import Scorer
from worker.settings import Settings


def misbehaving_job(data: bytes, spec: PrepareSpec) -> Prepared:
    """The service's job, except for payloads that make the child crash, die, hang, or wait.

    ``wait:PATH\0IMAGE`` opens the named pipe PATH, which blocks until the test opens its other
    end, then prepares IMAGE.
    """
    if data == b"segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    if data == b"sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if data == b"hang":
        threading.Event().wait()
    if data.startswith(b"wait:"):
        path, _, data = data[5:].partition(b"\0")
        with open(path, "rb") as gate:
            gate.read()
    return prepare_image(data, spec)


@pytest.fixture
def spec(settings_factory) -> PrepareSpec:  # type: ignore[no-untyped-def]
    settings = settings_factory(model_freeze_cpu=False)
    return PrepareSpec.from_settings(settings, Detector.from_settings(settings))


def _outcome(preparer, data: bytes) -> Prepared | tuple[str, str]:  # type: ignore[no-untyped-def]
    try:
        return preparer.prepare(data)
    except SynthguardError as exc:
        return (type(exc).__name__, exc.code)


def _assert_same(got: Prepared, want: Prepared, what: object) -> None:
    assert (got.format, got.width, got.height) == (want.format, want.width, want.height), what
    assert got.pixels.dtype == want.pixels.dtype and np.array_equal(got.pixels, want.pixels), what
    assert got.provenance == want.provenance and got.provenance_ai == want.provenance_ai, what


def test_children_prepare_every_fixture_as_the_worker_threads_do(
    fixtures_dir: Path, spec: PrepareSpec
) -> None:
    files = [*good_fixture_files(fixtures_dir), *(fixtures_dir / "bad" / name for name in BAD_FIXTURES)]
    blobs = [path.read_bytes() for path in files]
    inline = InlinePreparer(spec)
    want = [_outcome(inline, data) for data in blobs]
    pool = ProcessPreparer(2, spec, hard_timeout_s=60.0)
    try:
        with ThreadPoolExecutor(6) as threads:
            got = list(threads.map(lambda data: _outcome(pool, data), blobs))
    finally:
        pool.close()
    for path, g, w in zip(files, got, want, strict=True):
        if path.name in BAD_FIXTURES:
            assert g == w == (PermanentError.__name__, BAD_FIXTURES[path.name]), path.name
        else:
            assert isinstance(g, Prepared) and isinstance(w, Prepared), (path.name, g, w)
            _assert_same(g, w, path.name)
    # Some fixture carries a strong provenance signal, so the comparison above covers one.
    assert any(isinstance(w, Prepared) and w.provenance_ai for w in want)


@pytest.mark.parametrize(
    ("payload", "error", "code", "reason", "says"),
    [
        (b"segfault", PermanentError, errors.CORRUPT_IMAGE, "crashed", "SIGSEGV"),
        (b"hang", PermanentError, errors.DECODE_TIMEOUT, "timeout", "longer than 1s"),
        (b"sigkill", TransientError, errors.INTERNAL_ERROR, "died", "SIGKILL"),
    ],
)
def test_a_child_that_crashes_hangs_or_is_killed_costs_only_its_image(
    corpus_dir: Path,
    spec: PrepareSpec,
    payload: bytes,
    error: type[SynthguardError],
    code: str,
    reason: str,
    says: str,
) -> None:
    good = (corpus_dir / "real" / "earth_apollo17.jpg").read_bytes()
    want = prepare_image(good, spec)
    lost: list[str] = []
    # One child: every image after the bad one must go through its replacement.
    pool = ProcessPreparer(1, spec, hard_timeout_s=1.0, job=misbehaving_job, on_replace=lost.append)
    try:
        _assert_same(pool.prepare(good), want, "before")
        with pytest.raises(error) as raised:
            pool.prepare(payload)
        assert raised.value.code == code and says in raised.value.message
        assert lost == [reason]
        _assert_same(pool.prepare(good), want, "after")
    finally:
        pool.close()
    with pytest.raises(TransientError, match="shutting down"):
        pool.prepare(good)


@pytest.mark.parametrize(
    ("cpu_max", "cap"), [("max 100000", None), ("150000 100000", 2), ("50000 100000", 1)]
)
def test_usable_cores_honours_a_container_cpu_quota(tmp_path: Path, cpu_max: str, cap: int | None) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max + "\n")
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(path) == (affinity if cap is None else min(affinity, cap))
    assert usable_cores(tmp_path / "absent") == affinity


def test_auto_starts_one_preparing_process_per_usable_core() -> None:
    assert resolve_processes("auto") == usable_cores() >= 1
    assert resolve_processes(3) == 3 and resolve_processes(0) == 0
    # A CPU model gets the cores the children leave, never none.
    assert cpu_model_threads(usable_cores()) == 1
    assert cpu_model_threads(0) == usable_cores()


@pytest.mark.parametrize("omp_num_threads", [None, "2"])
def test_a_cpu_model_runs_on_the_cores_the_children_leave(
    settings_factory, monkeypatch: pytest.MonkeyPatch, omp_num_threads: str | None
) -> None:
    if omp_num_threads is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp_num_threads)
    before = torch.get_num_threads()  # conftest puts it back after the test
    settings = settings_factory(prepare_processes=1)
    with Scorer(settings, Detector.from_settings(settings)) as scorer:
        assert scorer.preparer.processes == 1
        # An operator's OMP_NUM_THREADS is theirs to keep.
        want = before if omp_num_threads else cpu_model_threads(1)
        assert torch.get_num_threads() == want


def test_unset_concurrency_gives_two_threads_per_preparing_process() -> None:
    # Each thread also fetches and stores its image: one per child would leave children idle.
    assert feeding_threads(Settings(), 16) == 32
    assert feeding_threads(Settings(), 2) == 8  # never fewer than the default
    assert feeding_threads(Settings(), 0) == 8
    assert feeding_threads(Settings(concurrency=6), 16) == 6  # a value the operator set is kept


def test_a_realtime_image_gets_the_next_free_child_before_waiting_bulk_ones(
    corpus_dir: Path, spec: PrepareSpec, tmp_path: Path
) -> None:
    good = (corpus_dir / "real" / "earth_apollo17.jpg").read_bytes()
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    finished: list[str] = []
    pool = ProcessPreparer(1, spec, hard_timeout_s=60.0, job=misbehaving_job)

    def prepare(name: str, data: bytes, urgent: bool = False) -> None:
        pool.prepare(data, urgent=urgent)
        finished.append(name)

    try:
        with ThreadPoolExecutor(3) as threads:
            # The only child is held until the gate opens; then two images wait for it, bulk first.
            held = threads.submit(prepare, "held", b"wait:" + str(gate).encode() + b"\0" + good)
            wait_until(lambda: pool.busy == 1, timeout=60, message="the child held")
            bulk = threads.submit(prepare, "bulk", good)
            wait_until(lambda: pool.waiting == 1, timeout=60, message="the bulk image waiting")
            realtime = threads.submit(prepare, "realtime", good, True)
            wait_until(lambda: pool.waiting == 2, timeout=60, message="both images waiting")
            with open(gate, "wb"):
                pass  # opening the write end releases the child; closing it ends its read
            for future in (held, bulk, realtime):
                future.result(timeout=60)
    finally:
        pool.close()
    assert finished == ["held", "realtime", "bulk"]
