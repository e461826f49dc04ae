"""EXIF: the few fields provenance needs, and the ``exif_software`` signal.

The Software tag (or PNG's Software text) naming a generator is a weak hint:
it never flags an image alone.
"""

from __future__ import annotations

import re
import struct
from typing import Any

from PIL import Image

from ._base import MAX_TEXT_BYTES, WEAK, Signal, clip, join_errors, missing
from ._containers import EXIF_ERRORS, Metadata

_EXIF_IFD = 0x8769
_TAG_SOFTWARE = 0x0131
_TAG_USER_COMMENT = 0x9286
_TAG_IMAGE_DESCRIPTION = 0x010E
_TAG_MAKE = 0x010F
_TAG_MODEL = 0x0110


def _decode_user_comment(value: Any) -> str:
    """EXIF UserComment: an 8-byte charset prefix, then the text."""
    if isinstance(value, str):
        return value.strip("\x00 ")
    if not isinstance(value, bytes | bytearray):
        return ""
    prefix, body = bytes(value[:8]), bytes(value[8:])
    if prefix == b"UNICODE\x00":
        # UTF-16 in whichever byte order the writer chose (piexif: big-endian):
        # for mostly-ASCII text the zero bytes give it away.
        even_zeros = body[0::2].count(0)
        odd_zeros = body[1::2].count(0)
        text = body.decode("utf-16-be" if even_zeros >= odd_zeros else "utf-16-le", errors="replace")
    elif prefix.startswith(b"ASCII"):
        text = body.decode("latin-1")
    elif prefix == b"JIS\x00\x00\x00\x00\x00":
        text = body.decode("shift_jis", errors="replace")
    elif prefix == b"\x00" * 8:
        text = body.decode("utf-8", errors="replace")
    else:
        text = bytes(value).decode("utf-8", errors="replace")
    return text.strip("\x00 ")


def _exif_text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace").strip("\x00 ")
    return value.strip("\x00 ") if isinstance(value, str) else ""


def _check_tiff_header(raw: bytes) -> None:
    """Raise ValueError unless IFD0 lies inside the block: Pillow only warns, and reads nothing."""
    tiff = raw[6:] if raw.startswith(b"Exif\x00") else raw
    if tiff[:4] not in (b"II*\x00", b"MM\x00*"):
        raise ValueError("no TIFF header")
    order = "<" if tiff[:2] == b"II" else ">"
    (offset,) = struct.unpack(order + "I", tiff[4:8])
    if offset < 8 or offset + 2 > len(tiff):
        raise ValueError(f"IFD0 offset {offset} outside the {len(tiff)}-byte block")
    (entries,) = struct.unpack(order + "H", tiff[offset : offset + 2])
    if offset + 2 + 12 * entries > len(tiff):
        raise ValueError(f"IFD0 declares {entries} entries, more than the block holds")


def _parse_exif(raw: bytes) -> dict[str, str]:
    """The few EXIF fields provenance needs. Raises one of ``EXIF_ERRORS`` on a mangled block."""
    _check_tiff_header(raw)
    exif = Image.Exif()
    exif.load(raw)
    fields = {
        "Software": _exif_text(exif.get(_TAG_SOFTWARE)),
        "ImageDescription": _exif_text(exif.get(_TAG_IMAGE_DESCRIPTION)),
        "Make": _exif_text(exif.get(_TAG_MAKE)),
        "Model": _exif_text(exif.get(_TAG_MODEL)),
        "UserComment": _decode_user_comment(exif.get_ifd(_EXIF_IFD).get(_TAG_USER_COMMENT)),
    }
    return {k: v[:MAX_TEXT_BYTES] for k, v in fields.items() if v}


def read_fields(meta: Metadata) -> tuple[list[tuple[str, dict[str, str]]], list[str]]:
    """The EXIF fields of the first blocks found, and why any block could not be read."""
    parsed: list[tuple[str, dict[str, str]]] = []
    errors: list[str] = []
    for source, raw in meta.exif[:4]:
        try:
            parsed.append((source, _parse_exif(raw)))
        except EXIF_ERRORS as exc:
            errors.append(f"{source} EXIF unreadable: {type(exc).__name__}: {clip(exc, 120)}")
    return parsed, errors


# Names of generators that some tools write into Software; still only a hint.
_AI_SOFTWARE = re.compile(
    r"\b(novelai|midjourney|niji ?journey|dall[-\u00b7 ]?e|stable ?diffusion|comfyui|automatic1111|invokeai|fooocus|"
    r"firefly|imagen|leonardo\.ai|flux\.1)\b",
    re.IGNORECASE,
)


def read_software(meta: Metadata, exif: list[tuple[str, dict[str, str]]], exif_errors: list[str]) -> Signal:
    """The ``exif_software`` signal: EXIF Software, or PNG's Software text; a weak hint at most."""
    errors = [*meta.errors_for("exif_software"), *exif_errors]
    found: tuple[str, str] | None = None
    for source, fields in exif:
        if fields.get("Software"):
            found = (source, fields["Software"])
            break
    if found is None:
        # PNG has no EXIF by default; its Software text chunk means the same.
        found = next(((s, t) for s, k, t in meta.texts if k == "Software" and t.strip()), None)
    if found is None:
        return missing("exif_software", join_errors(errors))
    source, software = found
    known = bool(_AI_SOFTWARE.search(software))
    evidence: dict[str, Any] = {"software": clip(software, 200), "source": source, "known_generator": known}
    if known:
        evidence["tool"] = clip(software, 120)
    return Signal("exif_software", True, known, WEAK, evidence, join_errors(errors))
