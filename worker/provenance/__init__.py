"""Provenance signals: the evidence generators leave in an image file.

Beside the neural score, an upload can say outright where it came from. Five
readers look at the bytes already downloaded (and, for the watermark, at the
decoded pixels):

* ``c2pa``: C2PA Content Credentials, every manifest in the store (not only the
  active one): claim generator, signer, validation state, and each action's
  ``digitalSourceType``.
* ``iptc_xmp``: IPTC ``DigitalSourceType`` in XMP (JPEG APP1, PNG iTXt, WebP).
* ``generation_params``: the text that AUTOMATIC1111, ComfyUI, NovelAI (and
  InvokeAI, Fooocus) write into PNG text chunks or EXIF, with the model name
  when it is stated.
* ``sd_watermark``: Stable Diffusion's invisible ``dwtDct`` watermark (SD 1.x,
  SD 2.x and SDXL payloads), decoded with numpy alone.
* ``exif_software``: the EXIF Software tag, a weak hint that never flags alone.

Only ``trainedAlgorithmicMedia`` and ``compositeWithTrainedAlgorithmicMedia``
count as generative AI; ``algorithmicMedia`` (procedural, not trained) does
not. A strong AI signal lets the pipeline flag an image whatever its score;
the absence of every signal proves nothing, since metadata is trivially
stripped.

Reading is bounded like decoding: containers are walked chunk by chunk with
caps on counts and sizes, compressed text is inflated with a size limit, and a
time budget is checked between steps. A malformed manifest or chunk becomes
the ``error`` of its signal, never an exception. Nothing here opens a network
connection: the c2pa context has remote manifest fetching and OCSP switched
off and an empty network allow-list.

One module per signal (``c2pa``, ``xmp``, ``generation_params``,
``watermark``, ``exif``); ``_containers`` walks the file once for all of them,
``_base`` holds the results, the bounds and the time budget.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from PIL import Image

from . import _containers, c2pa, exif, generation_params, watermark, xmp
from ._base import (
    AI_SOURCE_TYPES,
    CLEANED,
    NONE,
    SIGNAL_NAMES,
    STRONG,
    WEAK,
    Budget,
    BudgetExceeded,
    Findings,
    Signal,
    clip,
    missing,
)
from ._containers import Metadata

__all__ = [
    "AI_SOURCE_TYPES",
    "NONE",
    "SIGNAL_NAMES",
    "STRONG",
    "WEAK",
    "Findings",
    "Signal",
    "read_provenance",
]

log = logging.getLogger(__name__)


def _guarded(name: str, budget: Budget, reader: Callable[[], Signal]) -> Signal:
    """Run one reader; a bug or a spent budget costs that signal, never the image."""
    if budget.expired:
        return missing(name, f"time budget of {budget.seconds:g}s exceeded before this signal was read")
    try:
        return reader()
    except BudgetExceeded as exc:
        return missing(name, str(exc))
    except Exception as exc:  # best-effort evidence must never fail the image
        log.exception("provenance reader %s failed", name)
        return missing(name, f"internal error: {type(exc).__name__}: {clip(exc, 200)}")


def _collect_guarded(
    data: bytes, fmt: str, budget: Budget
) -> tuple[Metadata, list[tuple[str, dict[str, str]]], list[str]]:
    try:
        meta = _containers.collect(data, fmt, budget)
        fields, field_errors = exif.read_fields(meta)
    except Exception as exc:  # best-effort evidence must never fail the image
        log.exception("provenance: reading the %s container failed", fmt)
        meta = Metadata()
        meta.error("*", f"internal error reading the metadata: {type(exc).__name__}: {clip(exc, 200)}")
        fields, field_errors = [], []
    return meta, fields, field_errors


def read_provenance(
    data: bytes, fmt: str, image: Image.Image | None = None, *, budget_s: float = 2.0
) -> Findings:
    """Read every provenance signal from an image's bytes (and decoded pixels, for the watermark).

    ``fmt`` is the format :func:`worker.imaging.sniff_format` found; ``image``
    the decoded RGB image, or None to skip the watermark. Never raises for
    anything in the data: malformed parts are the ``error`` of their signal.
    ``budget_s`` bounds the whole read; the C2PA SDK's single call cannot be
    interrupted and is bounded by the file size instead.
    """
    budget = Budget(budget_s)
    cleaned: Counter[str] = Counter()
    token = CLEANED.set(cleaned)
    try:
        return _read_all(data, fmt, image, budget, cleaned)
    finally:
        CLEANED.reset(token)


def _read_all(
    data: bytes, fmt: str, image: Image.Image | None, budget: Budget, cleaned: Counter[str]
) -> Findings:
    meta, fields, field_errors = _collect_guarded(data, fmt, budget)
    # Cheap readers first, so that the watermark (the costly one) is what a tight budget cuts.
    read = {
        "c2pa": _guarded("c2pa", budget, lambda: c2pa.read(data, fmt, meta, budget)),
        "iptc_xmp": _guarded("iptc_xmp", budget, lambda: xmp.read(meta, budget)),
        "generation_params": _guarded(
            "generation_params", budget, lambda: generation_params.read(meta, fields, budget)
        ),
        "exif_software": _guarded(
            "exif_software", budget, lambda: exif.read_software(meta, fields, field_errors)
        ),
        "sd_watermark": _guarded("sd_watermark", budget, lambda: watermark.read(image, budget)),
    }
    return Findings(tuple(read[name] for name in SIGNAL_NAMES), dict(cleaned))
