"""The CPU stages of one image: decode, read provenance, preprocess; in a thread or in child processes.

:func:`prepare_image` is the plain function. The worker's threads hand it to
child processes (:class:`ProcessPreparer`; ``SYNTHGUARD_PREPARE_PROCESSES=auto``
starts one per usable core), or call it themselves (:class:`InlinePreparer`,
``SYNTHGUARD_PREPARE_PROCESSES=0``). The provenance readers hold the GIL for
most of their time, so one process's threads cannot spread this work over more
than about one core; children can, while the model stays in the parent, where
its batches fill from every child's images.

Children also fence the parent off from its decoders. Each child handles one
image at a time, so when one dies the image it held is known: a crash
(segmentation fault, abort) fails that image with ``corrupt_image``, a child
that overruns its hard time limit is killed and the image fails with
``decode_timeout``, and any other death (the kernel's OOM killer, an operator)
is a transient error that retries. The worker and the other images go on; the
dead child is replaced.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import math
import mmap
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from . import errors
from .errors import ConfigError, PermanentError, SynthguardError, TransientError
from .imaging import check_jpeg, declared_size, decode_image
from .pdq import PdqHash, hash_image
from .provenance import Findings, read_provenance
from .quality import jpeg_quality

if TYPE_CHECKING:
    from .detector import Detector
    from .settings import Settings

log = logging.getLogger(__name__)

# Stage names, in order, as the worker's metrics label them.
STAGES = ("decode", "provenance", "hash", "preprocess")

# Signals that mean the child's own code crashed on its input, not that someone stopped it.
_CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE, signal.SIGILL})

# Seconds a starting child may take to import its modules and say it is ready.
START_TIMEOUT_S = 120.0


# What a preparing process may take per pixel of the cap (decoded pixels, conversions, the
# transform's resize), and beside that, when SYNTHGUARD_PREPARE_MEMORY_MB is unset.
MEMORY_BYTES_PER_PIXEL = 16
MEMORY_BASE_BYTES = 512 << 20


@dataclass(frozen=True)
class PrepareSpec:
    """What the CPU stages need; picklable, so that a child process gets its own copy."""

    max_pixels: int
    decode_timeout_s: float
    # The detector's per-image transform (PIL image to tensor), as :meth:`Detector.preprocess` runs it.
    transform: Callable[[Image.Image], Any]
    # Address space a preparing process may add to what it holds once started (not applied in threads).
    memory_bytes: int | None = None
    # Compute each image's PDQ hash (SYNTHGUARD_PDQ_HASH): what the bank of known images matches.
    pdq_hash: bool = True
    # Frames of an animation scored (SYNTHGUARD_MAX_FRAMES); 1: the first frame alone.
    max_frames: int = 1
    # Leave a JPEG's full decode, watermark and preprocessing to the model's device
    # (SYNTHGUARD_DEVICE_DECODE, worker.device_decode); only checked and its metadata read here.
    device_decode: bool = False

    @classmethod
    def from_settings(cls, settings: Settings, detector: Detector) -> PrepareSpec:
        """The caps of ``settings`` and the transform of ``detector``."""
        memory_mb = settings.prepare_memory_mb
        return cls(
            max_pixels=settings.max_pixels,
            decode_timeout_s=settings.decode_timeout_s,
            transform=detector.image_transform,
            pdq_hash=settings.pdq_hash,
            max_frames=settings.max_frames,
            device_decode=settings.device_decode,
            memory_bytes=(
                memory_mb << 20
                if memory_mb is not None
                else MEMORY_BYTES_PER_PIXEL * settings.max_pixels + MEMORY_BASE_BYTES
            ),
        )


@dataclass(frozen=True)
class Prepared:
    """One image, ready for the model's batch, with what the stages found on the way."""

    format: str
    width: int
    height: int
    pixels: np.ndarray  # the model's input for this image, as the transform made it (uint8 CxHxW, usually)
    provenance: dict[str, Any]
    provenance_ai: bool  # a strong signal says generative AI
    pdq: PdqHash | None  # the perceptual hash of the decoded pixels, for the bank (worker.hashbank)
    seconds: tuple[float, float, float, float]  # time in each of STAGES
    jpeg_quality: int | None = None  # estimated from a JPEG's quantisation table (worker.quality)
    # An animation's frames beyond the first, as the model's input, and every chosen frame's position
    # (frame 0 first); empty for a still image.
    frame_pixels: tuple[np.ndarray, ...] = ()
    frame_indices: tuple[int, ...] = ()
    frame_count: int = 1
    # A JPEG left to the model's device (PrepareSpec.device_decode): ``pixels`` is empty, the image goes
    # to the batcher as its bytes, and these findings still lack the watermark the device reads;
    # ``provenance`` stays empty until the worker completes them (scoring).
    device_findings: Findings | None = None
    orientation: int = 1  # its EXIF orientation, for the device to apply

    @property
    def on_device(self) -> bool:
        """True when the model's device decodes this image (worker.device_decode)."""
        return self.device_findings is not None


# The pixels of an image the device decodes: none here.
_NO_PIXELS = np.empty((0,), np.uint8)

# The least side of the reduced decode that checks a JPEG for the device and that its PDQ hash is
# taken from. On the fixtures and synthetic photos, hashes of quality 50 or more came within 8 bits of
# the full image's at 128 (6 at 320, 22 at 1/8 scale whatever the size), and checking and hashing a
# 1024x1024 JPEG took 2.9 ms of CPU against 3.8 at 320 (bench/RESULTS.md, "Decoding on the device").
PREVIEW_SIDE = 128


def prepare_image(
    data: bytes, spec: PrepareSpec, *, checkpoint: Callable[[], None] | None = None
) -> Prepared:
    """Decode ``data``, read its provenance and preprocess it; raises what :func:`decode_image` raises.

    ``checkpoint`` runs between stages (the worker's realtime-first yield point).
    """
    try:
        return _prepare(data, spec, checkpoint)
    except MemoryError:
        # In a preparing process, its address-space cap; in a thread, the machine's memory.
        raise PermanentError(_OVER_THE_CAP, code=errors.TOO_LARGE) from None
    except PermanentError as exc:
        # libwebp, libheif and libavif report a failed allocation as a failed decode.
        if exc.code == errors.CORRUPT_IMAGE and _capped and not _room_to_decode(data):
            raise PermanentError(
                f"{_OVER_THE_CAP}; its decoder reported: {exc.message}", code=errors.TOO_LARGE
            ) from None
        raise


_OVER_THE_CAP = (
    "preparing this image needed more memory than a preparing process may take (SYNTHGUARD_PREPARE_MEMORY_MB)"
)
# Set in a preparing process once its address space is capped (_cap_address_space).
_capped = False


def _room_to_decode(data: bytes) -> bool:
    """Whether this process could still map 8 bytes per pixel its header declares (twice RGBA).

    Asked after a decoder failed in a process under the address-space cap: one
    that could not have held its own output failed for want of memory, not on
    corrupt data. The mapping is never touched, so it costs address space only.
    """
    size = declared_size(data)
    if size is None:
        return True
    try:
        probe = mmap.mmap(-1, max(1, 8 * size[0] * size[1]))
    except (OSError, MemoryError, OverflowError, ValueError):
        return False
    probe.close()
    return True


def _hash(image: Image.Image, fmt: str, spec: PrepareSpec) -> PdqHash | None:
    if not spec.pdq_hash:
        return None
    try:
        return hash_image(image)
    except Exception:  # a hash is one signal: the image is still scored without it
        log.exception("hashing a decoded %s image failed; it is scored without a PDQ hash", fmt)
        return None


def _prepare_for_device(data: bytes, spec: PrepareSpec, checkpoint: Callable[[], None] | None) -> Prepared | None:
    """A JPEG checked and its metadata read, for the model's device to decode; None for any other image."""
    started = time.perf_counter()
    # The reduced decode that checks the data also feeds the hash (which resizes to HASH_SIDE).
    checked = check_jpeg(
        data,
        max_pixels=spec.max_pixels,
        timeout_s=spec.decode_timeout_s,
        min_side=PREVIEW_SIDE if spec.pdq_hash else 1,
    )
    if checked is None:
        return None
    checked_at = time.perf_counter()
    if checkpoint is not None:
        checkpoint()
        checked_at = time.perf_counter()
    findings = read_provenance(data, "jpeg")  # the watermark is read on the device, from the full pixels
    read_at = time.perf_counter()
    pdq = _hash(checked.preview, "jpeg", spec)
    return Prepared(
        format="jpeg",
        width=checked.width,
        height=checked.height,
        pixels=_NO_PIXELS,
        # Made once the device has read the watermark (device_findings, completed in scoring).
        provenance={},
        provenance_ai=False,
        pdq=pdq,
        seconds=(checked_at - started, read_at - checked_at, time.perf_counter() - read_at, 0.0),
        jpeg_quality=jpeg_quality(data),
        device_findings=findings,
        orientation=checked.orientation,
    )


def _prepare(data: bytes, spec: PrepareSpec, checkpoint: Callable[[], None] | None) -> Prepared:
    if spec.device_decode and (prepared := _prepare_for_device(data, spec, checkpoint)) is not None:
        return prepared
    started = time.perf_counter()
    decoded = decode_image(
        data, max_pixels=spec.max_pixels, timeout_s=spec.decode_timeout_s, max_frames=spec.max_frames
    )
    decoded_at = time.perf_counter()
    if checkpoint is not None:
        checkpoint()
        decoded_at = time.perf_counter()
    # Read from the bytes and pixels already in hand.
    findings = read_provenance(data, decoded.format, decoded.image)
    read_at = time.perf_counter()
    if checkpoint is not None:
        checkpoint()
        read_at = time.perf_counter()
    image = decoded.image if decoded.image.mode == "RGB" else decoded.image.convert("RGB")
    pdq = _hash(image, decoded.format, spec)
    hashed_at = time.perf_counter()
    pixels = np.asarray(spec.transform(image))
    frame_pixels = tuple(np.asarray(spec.transform(frame)) for frame in decoded.frames[1:])
    done_at = time.perf_counter()
    return Prepared(
        format=decoded.format,
        width=decoded.width,
        height=decoded.height,
        pixels=pixels,
        provenance=findings.to_json(),
        provenance_ai=findings.ai_strong,
        pdq=pdq,
        seconds=(decoded_at - started, read_at - decoded_at, hashed_at - read_at, done_at - hashed_at),
        jpeg_quality=jpeg_quality(data) if decoded.format == "jpeg" else None,
        frame_pixels=frame_pixels,
        frame_indices=decoded.frame_indices,
        frame_count=decoded.frame_count,
    )


# A job for a child: bytes and the spec in, a Prepared out. Module-level, so that it pickles by name.
Job = Callable[[bytes, PrepareSpec], Prepared]

# What a child is asked to do with the image that follows: leave a JPEG to the device where its spec
# says so, or decode it here whatever the spec says (a JPEG the device refused).
_AS_SPECIFIED, _ON_CPU = b"spec", b"cpu"


def _on_cpu(spec: PrepareSpec) -> PrepareSpec:
    return replace(spec, device_decode=False) if spec.device_decode else spec


class Preparer(Protocol):
    """Runs :func:`prepare_image` for the worker's threads, somewhere."""

    processes: int

    def prepare(
        self,
        data: bytes,
        *,
        urgent: bool = False,
        checkpoint: Callable[[], None] | None = None,
        on_device: bool = True,
    ) -> Prepared:
        """``on_device=False``: the CPU path (full decode, preprocess) even under ``PrepareSpec.device_decode``."""
        ...

    def close(self) -> None: ...


class InlinePreparer:
    """The stages in the calling thread (``SYNTHGUARD_PREPARE_PROCESSES=0``)."""

    processes = 0

    def __init__(self, spec: PrepareSpec) -> None:
        self.spec = spec
        self._on_cpu = _on_cpu(spec)

    def prepare(
        self,
        data: bytes,
        *,
        urgent: bool = False,
        checkpoint: Callable[[], None] | None = None,
        on_device: bool = True,
    ) -> Prepared:
        return prepare_image(data, self.spec if on_device else self._on_cpu, checkpoint=checkpoint)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------- child


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _keep_freed_memory() -> None:
    """Keep freed image buffers in this process's heap rather than giving them back after every image.

    In a fresh process glibc returns each multi-megabyte buffer to the kernel when it is freed, and
    the next image faults the pages in again: about 2,300 page faults and a third more time per
    1024x1024 JPEG, measured. Buffers over 32 MiB (the most glibc allows here) are still mapped
    and returned one by one; up to 256 MiB of freed heap is kept.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: its allocator has its own policy
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 256 << 20)


def _cap_address_space(extra_bytes: int) -> None:
    """Let this process map at most ``extra_bytes`` more than it has now, for good (soft and hard limit).

    Past it allocations fail (MemoryError in Python, NULL in C decoders) instead of the
    kernel's OOM killer taking this process, or the worker beside it.
    """
    import resource

    try:
        status = Path("/proc/self/status").read_text()
        now = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        log.warning("cannot read this process's address space size; preparing without a memory cap")
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = now + extra_bytes if hard == resource.RLIM_INFINITY else min(hard, now + extra_bytes)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    global _capped
    _capped = True


# A child's exit status when an image's bytes alone do not fit under its address-space cap.
_EXIT_NO_ROOM = 86


def _child_main(conn: Connection, spec: PrepareSpec, job: Job) -> None:
    """A child's loop: one image in, one reply out, until the parent closes the pipe."""
    _keep_freed_memory()
    # Ctrl-C, and a service manager's SIGTERM, reach the whole process group, but the parent decides
    # when children stop: it finishes its images in flight (warm shutdown), then closes their pipes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import torch

        # One image at a time per child: an OpenMP team each would fight the other children.
        torch.set_num_threads(1)
    except ImportError:
        pass
    if spec.memory_bytes is not None:
        _cap_address_space(spec.memory_bytes)
    conn.send("ready")
    on_cpu = _on_cpu(spec)
    while True:
        try:
            mode = conn.recv_bytes()
            data = conn.recv_bytes()
        except MemoryError:
            # The rest of the image is still in the pipe: this child cannot go on. Its exit status
            # tells the parent to fail the image as too_large rather than retry it.
            os._exit(_EXIT_NO_ROOM)
        except (EOFError, OSError):
            return
        try:
            reply: tuple[Any, ...] = ("ok", job(data, spec if mode == _AS_SPECIFIED else on_cpu))
        except SynthguardError as exc:
            # Rebuilt by the parent from these fields: an exception's pickle would lose its code.
            reply = ("error", exc.transient, exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001 - a bug, reported to the parent as one
            reply = ("bug", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


# -------------------------------------------------------------------- parent

# What a preparing process keeps of the worker's environment. The rest (AWS credentials, the
# database and broker URLs, SYNTHGUARD_SECRET_KEY, whatever else a deployment puts there) stays
# out of the process that parses untrusted files.
_CHILD_ENV_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "TEMP",
        "TMP",
        "LD_LIBRARY_PATH",
        "VIRTUAL_ENV",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONHASHSEED",
    }
)
_CHILD_ENV_PREFIXES = ("LC_", "OMP_", "MKL_", "OPENBLAS_", "KMP_")
_FORK_SERVER_LOCK = threading.Lock()


def fenced_environ(environ: dict[str, str]) -> dict[str, str]:
    """The part of ``environ`` a preparing process may see: locale, paths, thread counts."""
    return {
        name: value
        for name, value in environ.items()
        if name in _CHILD_ENV_NAMES or name.startswith(_CHILD_ENV_PREFIXES)
    }


def _fork_server_running() -> bool:
    from multiprocessing import forkserver

    # No public accessor: the fork server's pid is private to multiprocessing.forkserver.
    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if pid is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _ensure_fenced_fork_server() -> None:
    """Start the fork server, if it is not running, with :func:`fenced_environ` as its environment.

    Children are forked from it and inherit its environment, /proc/PID/environ
    included; the multiprocessing API takes no environment, so the process's
    own is swapped for the moment of the start.
    """
    from multiprocessing import forkserver

    with _FORK_SERVER_LOCK:
        if _fork_server_running():
            return
        saved = os.environ.copy()
        try:
            os.environ.clear()
            os.environ.update(fenced_environ(saved))
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)


class _ChildGone(Exception):
    """The child died or stopped answering; ``reason`` says how."""

    def __init__(self, reason: str, how: str, error: SynthguardError) -> None:
        super().__init__(how)
        self.reason = reason  # crashed, timeout or died: the replacement metric's label
        self.error = error


class _Child:
    """One child process and the parent's end of its pipe."""

    def __init__(self, context: Any, spec: PrepareSpec, job: Job, name: str) -> None:
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(
            target=_child_main, args=(child_conn, spec, job), name=name, daemon=True
        )
        self.process.start()
        child_conn.close()
        if not self.conn.poll(START_TIMEOUT_S):
            self.kill()
            raise ConfigError(f"the preparing process {name} did not start within {START_TIMEOUT_S:g}s")
        try:
            self.conn.recv()
        except (EOFError, OSError) as exc:
            self.kill()
            raise ConfigError(
                f"the preparing process {name} died while starting (exit code {self.exitcode()}; a script "
                "that starts preparing processes needs the `if __name__ == '__main__':` guard)"
            ) from exc

    def exitcode(self) -> int | None:
        self.process.join(timeout=1.0)
        return self.process.exitcode

    def run(self, data: bytes, hard_timeout_s: float, on_device: bool = True) -> tuple[Any, ...]:
        """Send one image and wait for its reply; :class:`_ChildGone` when the child did not give one."""
        try:
            self.conn.send_bytes(_AS_SPECIFIED if on_device else _ON_CPU)
            self.conn.send_bytes(data)
            if self.conn.poll(hard_timeout_s):
                return self.conn.recv()  # type: ignore[no-any-return]
        except (EOFError, OSError):
            raise self._gone() from None
        self.kill()
        raise _ChildGone(
            "timeout",
            "overran its time limit and was killed",
            PermanentError(
                f"preparing the image (decode, provenance, preprocess) took longer than {hard_timeout_s:g}s; "
                "the process working on it was stopped",
                code=errors.DECODE_TIMEOUT,
            ),
        )

    def _gone(self) -> _ChildGone:
        code = self.exitcode()
        if code == _EXIT_NO_ROOM:
            return _ChildGone(
                "memory",
                "could not take the image's bytes under its memory cap",
                PermanentError(
                    "the image's bytes alone do not fit under a preparing process's memory cap "
                    "(SYNTHGUARD_PREPARE_MEMORY_MB)",
                    code=errors.TOO_LARGE,
                ),
            )
        if code is not None and code < 0 and -code in _CRASH_SIGNALS:
            name = signal.Signals(-code).name
            return _ChildGone(
                "crashed",
                f"crashed ({name})",
                PermanentError(
                    f"the decoder crashed ({name}) on this image's data", code=errors.CORRUPT_IMAGE
                ),
            )
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        return _ChildGone(
            "died",
            f"died ({how})",
            TransientError(
                f"the process preparing this image died ({how}); retrying", code=errors.INTERNAL_ERROR
            ),
        )

    def kill(self) -> None:
        self.conn.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5.0)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close the pipe (the child's loop ends) and wait for it; kill it if it lingers."""
        self.conn.close()
        self.process.join(timeout=timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=timeout_s)


class ProcessPreparer:
    """``processes`` child processes, one image each at a time; the calling thread waits for its reply.

    Children start at construction (a bad environment fails the worker's start,
    not its first image) from a fork server that has already imported the
    stages' modules, so a replacement starts in a fraction of a second.
    ``urgent`` callers (realtime images) are handed the next free child before
    any other waiting caller; ``checkpoint`` is not called, since a child runs
    its image's stages without pausing.
    """

    def __init__(
        self,
        processes: int,
        spec: PrepareSpec,
        *,
        hard_timeout_s: float,
        job: Job = prepare_image,
        on_replace: Callable[[str], None] | None = None,
    ) -> None:
        if processes < 1:
            raise ValueError("processes must be at least 1")
        self.processes = processes
        self.spec = spec
        self.job = job
        self.hard_timeout_s = hard_timeout_s
        self.on_replace = on_replace
        self._context = multiprocessing.get_context("forkserver")
        # The fork server imports these once; every child forked from it starts with them loaded.
        self._context.set_forkserver_preload(["worker.preparing", "torch", "timm"])
        self._cond = threading.Condition()
        self._idle: list[_Child | None] = []  # None: a slot whose child must be (re)started
        self._urgent_waiting = 0
        self._waiting = 0
        self._closed = False
        self._numbers = itertools.count(1)  # names children; next() is atomic under the GIL
        try:
            for _ in range(processes):
                self._idle.append(self._start())
        except BaseException:
            self.close()
            raise
        log.info("decoding, provenance and preprocessing run in %d preparing processes", processes)

    def _start(self) -> _Child:
        _ensure_fenced_fork_server()
        return _Child(self._context, self.spec, self.job, name=f"synthguard-prepare-{next(self._numbers)}")

    def prepare(
        self,
        data: bytes,
        *,
        urgent: bool = False,
        checkpoint: Callable[[], None] | None = None,
        on_device: bool = True,
    ) -> Prepared:
        """Run the job for ``data`` in a free child; re-raises the job's error, or the child's death as one."""
        child = self._take(urgent)
        try:
            if child is None:
                try:
                    child = self._start()
                except ConfigError as exc:
                    raise TransientError(
                        f"no preparing process: {exc.message}", code=errors.INTERNAL_ERROR
                    ) from exc
            try:
                reply = child.run(data, self.hard_timeout_s, on_device)
            except _ChildGone as gone:
                log.warning("preparing process %s %s", child.process.name, gone)
                child = None
                if self.on_replace is not None:
                    self.on_replace(gone.reason)
                raise gone.error from None
            except BaseException:
                # Interrupted between request and reply: its late reply must never answer another image.
                child.kill()
                child = None
                raise
        finally:
            self._give_back(child)
        return _unpack(reply)

    @property
    def busy(self) -> int:
        """Children working on an image right now."""
        return self.processes - len(self._idle)

    @property
    def waiting(self) -> int:
        """Callers waiting for a child right now: more than zero means every child is busy."""
        return self._waiting

    def _take(self, urgent: bool) -> _Child | None:
        with self._cond:
            self._waiting += 1
            if urgent:
                self._urgent_waiting += 1
            try:
                while not self._closed and not (self._idle and (urgent or self._urgent_waiting == 0)):
                    self._cond.wait()
                if self._closed:
                    raise TransientError("the worker is shutting down", code=errors.INTERNAL_ERROR)
                return self._idle.pop()
            finally:
                self._waiting -= 1
                if urgent:
                    self._urgent_waiting -= 1
                    self._cond.notify_all()

    def _give_back(self, child: _Child | None) -> None:
        with self._cond:
            if not self._closed:
                self._idle.append(child)
                self._cond.notify_all()
                return
        if child is not None:
            child.stop()

    def close(self) -> None:
        """Stop the idle children now and each busy one when its image is done."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for child in idle:
            if child is not None:
                child.stop()


def _unpack(reply: tuple[Any, ...]) -> Prepared:
    kind = reply[0]
    if kind == "ok":
        return reply[1]  # type: ignore[no-any-return]
    if kind == "error":
        _, transient, code, message = reply
        raise (TransientError if transient else PermanentError)(message, code=code)
    raise RuntimeError(f"preparing process: {reply[1]}")


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity, capped by its cgroup v2 CPU quota (a container's limit)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to honour
    return cores


def resolve_processes(setting: int | str) -> int:
    """``SYNTHGUARD_PREPARE_PROCESSES`` as a number: ``auto`` is one per usable core."""
    return usable_cores() if setting == "auto" else int(setting)


def cpu_model_threads(processes: int) -> int:
    """Intra-op threads for a CPU model beside ``processes`` preparing processes: the cores they leave, at least 1.

    torch's default (one per core) would have its threads spin against the children for the same
    cores; on 2 cores, 2 children and 1 model thread stored 1.2-1.4x the images/s of the model's
    default beside them (bench/RESULTS.md, levers).
    """
    return max(1, usable_cores() - processes)


def feeding_threads(settings: Settings, processes: int) -> int:
    """Threads to run beside ``processes`` preparing processes: ``SYNTHGUARD_CONCURRENCY`` when it is set,
    else two per process (at least its default), since each thread also fetches and stores its image
    and one per process would leave children idle."""
    if processes <= 0 or "concurrency" in settings.model_fields_set:
        return settings.concurrency
    return max(settings.concurrency, 2 * processes)


def make_preparer(settings: Settings, spec: PrepareSpec, **kwargs: Any) -> Preparer:
    """In-thread, or child processes (:func:`resolve_processes`) with a hard limit of twice the decode timeout."""
    processes = resolve_processes(settings.prepare_processes)
    if processes <= 0:
        return InlinePreparer(spec)
    # Decoding has its own soft deadline; the hard one also covers provenance, preprocessing and C
    # decoders that cannot be interrupted.
    return ProcessPreparer(processes, spec, hard_timeout_s=2 * settings.decode_timeout_s, **kwargs)
