"""What every provenance reader shares: results, bounds, the time budget, evidence text."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any

from ..sanitise import clean_json, clean_text

SIGNAL_NAMES: tuple[str, ...] = ("c2pa", "iptc_xmp", "generation_params", "sd_watermark", "exif_software")

STRONG = "strong"
WEAK = "weak"
NONE = "none"

# IPTC digital source types that mean generative AI. "algorithmicMedia" is
# deliberately absent: it is procedural output (fractals, test gradients).
AI_SOURCE_TYPES: frozenset[str] = frozenset(
    {"trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia"}
)
_AI_SOURCE_TYPES_LOWER = frozenset(t.lower() for t in AI_SOURCE_TYPES)

# --- bounds -----------------------------------------------------------------
MAX_SCAN_BYTES = 64 * 1024 * 1024  # container structure walked at most this far
MAX_CHUNKS = 20_000  # PNG chunks, JPEG segments, RIFF chunks
MAX_TEXT_BYTES = 8 * 1024 * 1024  # one text value, after decompression
MAX_TOTAL_TEXT_BYTES = 32 * 1024 * 1024  # all text values of one file together
MAX_XMP_BYTES = 4 * 1024 * 1024  # one XMP packet
MAX_EVIDENCE_STR = 300
MAX_EVIDENCE_LIST = 32
# Any string of the stored findings (error messages included) is at most this long.
MAX_FINDINGS_STR = 2000


# ============================================================================ results


@dataclass(frozen=True)
class Signal:
    """One kind of provenance evidence, found in the file or not."""

    name: str
    found: bool  # the file carries this kind of evidence at all
    ai: bool  # the evidence says generative AI
    strength: str  # "strong" | "weak" | "none"
    evidence: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable
    error: str | None = None  # malformed data, time budget exceeded...

    def to_json(self) -> dict[str, Any]:
        return {
            "found": self.found,
            "ai": self.ai,
            "strength": self.strength,
            "evidence": self.evidence,
            "error": self.error,
        }


@dataclass(frozen=True)
class Findings:
    """Every signal read from one image."""

    signals: tuple[Signal, ...]

    @property
    def ai_strong(self) -> bool:
        """True when any signal says generative AI with strong evidence: enough to flag."""
        return any(s.ai and s.strength == STRONG for s in self.signals)

    @property
    def tools(self) -> list[str]:
        """Generator tools named by the signals that say AI, for display."""
        names: list[str] = []
        for signal in self.signals:
            if not signal.ai:
                continue
            for tool in (signal.evidence.get("tool"), *signal.evidence.get("tools", ())):
                if isinstance(tool, str) and tool and tool not in names:
                    names.append(tool)
        return names

    def get(self, name: str) -> Signal | None:
        return next((s for s in self.signals if s.name == name), None)

    def with_signal(self, signal: Signal) -> Findings:
        """These findings with ``signal`` in place of the one of its name (read later, elsewhere)."""
        return replace(self, signals=tuple(signal if s.name == signal.name else s for s in self.signals))

    # What the sanitising boundary changed in the file's text (worker.sanitise), by kind.
    text_cleaned: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """What ``images.provenance`` stores: every string through worker.sanitise, changes counted."""
        changes = Counter(self.text_cleaned)
        signals = clean_json({s.name: s.to_json() for s in self.signals}, MAX_FINDINGS_STR, changes)
        out: dict[str, Any] = {"ai": self.ai_strong, "signals": signals}
        if changes:
            out["text_cleaned"] = dict(sorted(changes.items()))
        return out


# ============================================================================ plumbing


class BudgetExceeded(Exception):
    """The time budget ran out in the middle of a reader."""


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def check(self) -> None:
        if self.expired:
            raise BudgetExceeded(f"time budget of {self.seconds:g}s exceeded")


# Changes the sanitising boundary made during the current read_provenance call.
CLEANED: ContextVar[Counter[str] | None] = ContextVar("provenance_text_cleaned", default=None)


def clip(value: Any, limit: int = MAX_EVIDENCE_STR) -> str:
    """A value from the file as evidence text: through worker.sanitise, clipped to ``limit``."""
    text = value if isinstance(value, str | bytes) else str(value)
    return clean_text(text.strip(), limit, CLEANED.get())


def unique(items: Iterable[str], limit: int = MAX_EVIDENCE_LIST) -> list[str]:
    out: list[str] = []
    for item in items:
        if item and item not in out:
            out.append(item)
            if len(out) >= limit:
                break
    return out


def join_errors(errors: list[str]) -> str | None:
    return "; ".join(unique(errors, 8)) or None


def missing(name: str, error: str | None = None, **evidence: Any) -> Signal:
    return Signal(name, False, False, NONE, evidence, error)


def source_type_name(value: Any) -> str:
    """The term of a digital source type, from a full IPTC URI or a bare value."""
    if not isinstance(value, str):
        return ""
    match = re.search(r"([A-Za-z]+)\s*$", value.strip())
    return match.group(1) if match else ""


def is_ai_source_type(value: Any) -> bool:
    """True for the IPTC digital source types that mean generative AI."""
    return source_type_name(value).lower() in _AI_SOURCE_TYPES_LOWER
