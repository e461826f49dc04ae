"""The one boundary for text that comes from image files.

Every string read from a file's metadata (C2PA manifests, XMP, PNG text
chunks, EXIF, generator parameters) and every error message that may quote
one passes through :func:`clean_text` or :func:`clean_json` before it is
stored or sent in a webhook. What comes out is text PostgreSQL stores in
``text`` and ``jsonb`` columns and any JSON reader accepts: valid UTF-8, no
lone surrogates, no NUL or other control characters (tab, newline and
carriage return are kept), no bidirectional embeddings, overrides or
isolates, no non-finite numbers, and no longer than its limit. What was changed is counted, so a reader can tell a clipped value from
the file's own.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

REPLACEMENT = "\ufffd"
ELLIPSIS = "\u2026"
# Lone surrogates (UTF-8 cannot encode them; PostgreSQL refuses them), C0 controls but
# tab, newline and carriage return, DEL and the C1 controls (NUL included: text and
# jsonb refuse it).
_UNSAFE = re.compile("[\ud800-\udfff\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Bidirectional embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069): in a file's text
# they make a reviewer's screen show other text than the one stored, e.g. a generator or signer name
# reversed ("Trojan Source"). The marks (U+200E, U+200F, U+061C) that right-to-left text needs stay.
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069]")
# How deep clean_json follows nested containers; deeper ones become a marker string.
MAX_DEPTH = 32

# The kinds of change clean_text and clean_json count.
INVALID_UTF8 = "invalid_utf8"
SURROGATE = "surrogate"
CONTROL = "control"
BIDI = "bidi_control"
CLIPPED = "clipped"
NON_FINITE = "non_finite"
TOO_DEEP = "too_deep"


def first_unsafe(text: str) -> str | None:
    """The first character :func:`clean_text` would replace, described for an error message; None if none."""
    found = _UNSAFE.search(text)
    if found is None:
        return None
    char = found.group()
    kind = "a lone surrogate" if _SURROGATE.fullmatch(char) else "NUL" if char == "\x00" else "a control character"
    return f"{kind} (U+{ord(char):04X}) at position {found.start()}"


def clean_text(value: str | bytes, limit: int, changes: Counter[str] | None = None) -> str:
    """``value`` as safe text of at most ``limit`` characters; what was changed is added to ``changes``.

    Bytes are read as UTF-8 with invalid sequences replaced. Lone surrogates,
    control characters and bidirectional embeddings, overrides and isolates
    become U+FFFD. A value over ``limit`` keeps its
    first ``limit - 1`` characters and ends with an ellipsis.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            _count(changes, INVALID_UTF8)
    else:
        text = value
    if _UNSAFE.search(text):
        surrogates = len(_SURROGATE.findall(text))
        replaced, unsafe = _UNSAFE.subn(REPLACEMENT, text)
        if surrogates:
            _count(changes, SURROGATE, surrogates)
        if unsafe > surrogates:
            _count(changes, CONTROL, unsafe - surrogates)
        text = replaced
    if _BIDI.search(text):
        text, bidi = _BIDI.subn(REPLACEMENT, text)
        _count(changes, BIDI, bidi)
    if len(text) > limit:
        text = text[: limit - 1] + ELLIPSIS
        _count(changes, CLIPPED)
    return text


def clean_json(value: Any, limit: int, changes: Counter[str] | None = None, *, _depth: int = 0) -> Any:
    """A copy of a JSON-like value with every string (keys too) through :func:`clean_text`.

    Non-finite floats become None; containers nested deeper than
    :data:`MAX_DEPTH` become a marker string; tuples become lists and any
    other object its ``str``. Two keys that clean to the same text keep the last.
    """
    if isinstance(value, str):
        return clean_text(value, limit, changes)
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        _count(changes, NON_FINITE)
        return None
    if _depth >= MAX_DEPTH and isinstance(value, Mapping | list | tuple):
        _count(changes, TOO_DEEP)
        return "(nested too deep)"
    if isinstance(value, Mapping):
        return {
            clean_text(str(key), limit, changes): clean_json(item, limit, changes, _depth=_depth + 1)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [clean_json(item, limit, changes, _depth=_depth + 1) for item in value]
    if isinstance(value, bytes | bytearray):
        return clean_text(value, limit, changes)
    return clean_text(str(value), limit, changes)


def _count(changes: Counter[str] | None, kind: str, n: int = 1) -> None:
    if changes is not None:
        changes[kind] += n
