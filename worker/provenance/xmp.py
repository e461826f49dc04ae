"""IPTC ``DigitalSourceType`` (and ``xmp:CreatorTool``, the credit line) in XMP packets: JPEG APP1, PNG iTXt, WebP.

Packets are parsed with expat, with DOCTYPE and entity declarations refused
(the way to an entity bomb); a generator's marker in a malformed packet still
counts, as a weak hint.
"""

from __future__ import annotations

import re
from typing import Any
from xml.parsers import expat

from ._base import (
    MAX_XMP_BYTES,
    NONE,
    STRONG,
    WEAK,
    Budget,
    Signal,
    clip,
    is_ai_source_type,
    join_errors,
    unique,
)
from ._containers import Metadata


class _XmpRejected(Exception):
    """A DOCTYPE or entity declaration: not XMP, and the way to an entity bomb."""


def _refuse_dtd(*_args: Any) -> None:
    raise _XmpRejected("XMP packet declares a DOCTYPE or entities")


def _parse_xmp(packet: bytes) -> tuple[list[str], str | None, str | None]:
    """DigitalSourceType values, xmp:CreatorTool and the credit line (``photoshop:Credit``, where
    generators such as Google's write "Made with Google AI") from one packet. Raises on malformed XML."""
    try:
        return _parse_xml(packet, namespaces=True)
    except expat.ExpatError as exc:
        if exc.code != expat.errors.codes[expat.errors.XML_ERROR_UNBOUND_PREFIX]:
            raise
    # Well-formed XML with a prefix its writer forgot to declare: match on names as written.
    return _parse_xml(packet, namespaces=False)


def _local_name(name: str) -> str:
    """``"ns-uri local"`` (namespace-aware parse) or ``"prefix:local"`` (plain) -> ``"local"``, lowercased."""
    return re.split(r"[ :]", name)[-1].lower()


def _parse_xml(packet: bytes, *, namespaces: bool) -> tuple[list[str], str | None, str | None]:
    parser = expat.ParserCreate(namespace_separator=" ") if namespaces else expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _refuse_dtd
    parser.EntityDeclHandler = _refuse_dtd
    values: list[str] = []
    creator: list[str] = []
    credit: list[str] = []
    into = {"digitalsourcetype": values, "creatortool": creator, "credit": credit}
    capture: list[tuple[int, str, list[str]]] = []  # (depth, property, text parts)
    depth = 0

    def prop(name: str) -> str | None:
        local = _local_name(name)
        return local if local in into else None

    def start(name: str, attrs: dict[str, str]) -> None:
        nonlocal depth
        depth += 1
        for key, value in attrs.items():
            which = prop(key)
            if which:
                into[which].append(value.strip())
        which = prop(name)
        if which:
            resource = next((v for k, v in attrs.items() if _local_name(k) == "resource"), None)
            if resource and which == "digitalsourcetype":
                values.append(resource.strip())
            else:
                capture.append((depth, which, []))

    def end(_name: str) -> None:
        nonlocal depth
        if capture and capture[-1][0] == depth:
            _, which, parts = capture.pop()
            text = "".join(parts).strip()
            if text:
                into[which].append(text)
        depth -= 1

    def chars(text: str) -> None:
        if capture and sum(len(p) for p in capture[-1][2]) < 4096:
            capture[-1][2].append(text)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    parser.Parse(packet.strip(b"\x00 \t\r\n"), True)
    return values, (creator[0] if creator else None), (credit[0] if credit else None)


_XMP_DST_FALLBACK = re.compile(
    rb"DigitalSourceType\s*=\s*[\"']([^\"'<>]{1,200})[\"']|DigitalSourceType>([^<]{1,200})<"
)


def read(meta: Metadata, budget: Budget) -> Signal:
    """The ``iptc_xmp`` signal from the XMP packets the container walk found."""
    errors = meta.errors_for("iptc_xmp")
    values: list[tuple[str, str, bool]] = []  # (value, source, well-formed)
    creator_tools: list[str] = []
    credits: list[str] = []
    for source, packet in meta.xmp[:8]:
        budget.check()
        if len(packet) > MAX_XMP_BYTES:
            errors.append(f"{source} XMP packet of {len(packet)} bytes over the cap of {MAX_XMP_BYTES}")
            continue
        try:
            found, creator, credit = _parse_xmp(packet)
        except (expat.ExpatError, _XmpRejected, ValueError, RecursionError) as exc:
            errors.append(f"{source} XMP malformed: {clip(exc, 160)}")
            # A generator's marker in a broken packet is still worth recording, as a weak hint.
            for match in _XMP_DST_FALLBACK.finditer(packet[:MAX_XMP_BYTES]):
                raw = match.group(1) or match.group(2)
                values.append((raw.decode("utf-8", errors="replace").strip(), source, False))
            continue
        values += [(v, source, True) for v in found if v]
        if creator:
            creator_tools.append(clip(creator))
        if credit:
            credits.append(clip(credit))
    evidence: dict[str, Any] = {
        "digital_source_types": unique(v for v, _, _ in values),
        "ai_source_types": unique(v for v, _, _ in values if is_ai_source_type(v)),
        "sources": unique(s for _, s, _ in values),
        "xmp_packets": len(meta.xmp),
    }
    if creator_tools:
        evidence["creator_tool"] = creator_tools[0]
    if credits:
        evidence["credit"] = credits[0]
    ai_values = [(v, ok) for v, _, ok in values if is_ai_source_type(v)]
    ai = bool(ai_values)
    strength = (STRONG if any(ok for _, ok in ai_values) else WEAK) if ai else NONE
    if ai and creator_tools:
        evidence["tool"] = creator_tools[0]
    return Signal("iptc_xmp", bool(values), ai, strength, evidence, join_errors(errors))
