"""Which generator made an image, from the provenance evidence it carries: ``images.generator``.

A pure function of the stored provenance findings (``images.provenance``), so
a reused result (``cached_from``) and an image stored before attribution
existed get the same answer from the same evidence. The strongest signal that
names something wins, in this order: a C2PA manifest that declares generative
AI (the action's ``softwareAgent``, else the claim generator: signed), the
generation parameters a tool wrote (ComfyUI's checkpoint, A1111's ``Model:``,
NovelAI's source; the tool itself when no model is named), IPTC/XMP
(``CreatorTool`` and the credit line of a file that declares generative AI, or
that names a known generator), the Stable Diffusion watermark's family, and
last the EXIF Software tag when it names a known generator.

Names are normalised to one vocabulary (:data:`MODELS`, :data:`TOOLS`) and the
raw value is kept beside them. No evidence means None: the neural score is
never turned into a name.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from .sanitise import clean_text

Vocabulary = tuple[tuple[re.Pattern[str], str], ...]


def _vocabulary(*entries: tuple[str, str]) -> Vocabulary:
    """(pattern, name) pairs, matched case-insensitively anywhere in a value."""
    return tuple((re.compile(pattern, re.IGNORECASE), name) for pattern, name in entries)


# Checkpoint and model names, as files and tools write them, to one name each. First match wins,
# so the more specific patterns come first (SDXL Turbo before SDXL, SD 3.5 before SD 3).
MODELS = _vocabulary(
    (r"sd_?xl[-_ ]?turbo|sdxl[-_ ]?turbo", "SDXL Turbo"),
    (r"sd_?xl[-_ ]?lightning|sdxl[-_ ]?lightning", "SDXL Lightning"),
    (r"sd_?xl|sdxl|stable[-_ ]?diffusion[-_ ]?xl", "Stable Diffusion XL"),
    (r"sd_?3[._]?5|stable[-_ ]?diffusion[-_ ]?3\.5", "Stable Diffusion 3.5"),
    (r"sd_?3(?!\d)|stable[-_ ]?diffusion[-_ ]?3", "Stable Diffusion 3"),
    (r"v2-1|v2-0|sd[-_ ]?2(?!\d)|768-v-ema|stable[-_ ]?diffusion[-_ ]?(v?2)(?!\d)", "Stable Diffusion 2.x"),
    (r"v1-5|sd[-_ ]?1[._]?5|sd15|stable[-_ ]?diffusion[-_ ]?v?1[._]5", "Stable Diffusion 1.5"),
    (r"v1-[1-4]|sd[-_ ]?1[._]?[1-4]|stable[-_ ]?diffusion[-_ ]?(v?1)(?!\d)", "Stable Diffusion 1.x"),
    (r"\bflux[-_. ]?1?[-_. \[]*dev", "FLUX.1 [dev]"),
    (r"\bflux[-_. ]?1?[-_. \[]*schnell", "FLUX.1 [schnell]"),
    (r"\bflux[-_. ]?1?[-_. \[]*(pro|ultra)", "FLUX.1 [pro]"),
    (r"\bflux", "FLUX.1"),
    (r"aura[-_ ]?flow", "AuraFlow"),
    (r"hi[-_ ]?dream", "HiDream-I1"),
    (r"qwen[-_ ]?image", "Qwen-Image"),
    (r"pix[-_ ]?art", "PixArt"),
    (r"playground[-_ ]?v?2", "Playground v2"),
    (r"kolors", "Kolors"),
    (r"hunyuan[-_ ]?dit", "Hunyuan-DiT"),
    (r"kandinsky", "Kandinsky"),
    (r"dall[-·_ ]?e|gpt[-_ ]?image", "DALL-E"),
    (r"\bimagen\b", "Imagen"),
    (r"novelai diffusion|nai[-_ ]?diffusion", "NovelAI Diffusion"),
)

# Applications and services, to one name each.
TOOLS = _vocabulary(
    (r"firefly", "Adobe Firefly"),
    (r"midjourney|niji ?journey", "Midjourney"),
    (r"dall[-·_ ]?e|openai|chatgpt|gpt[-_ ]?image", "OpenAI DALL-E"),
    (r"google ai|\bimagen\b|\bgemini\b", "Google Imagen"),
    (r"bing image creator|microsoft designer|image creator from microsoft", "Microsoft Designer"),
    (r"novelai", "NovelAI"),
    (r"comfy[-_ ]?ui", "ComfyUI"),
    (r"automatic1111|a1111|stable[-_ ]?diffusion[-_ ]?web[-_ ]?ui", "AUTOMATIC1111"),
    (r"invoke[-_ ]?ai", "InvokeAI"),
    (r"fooocus", "Fooocus"),
    (r"dreamstudio", "DreamStudio"),
    (r"leonardo\.?ai", "Leonardo.Ai"),
    (r"ideogram", "Ideogram"),
    (r"stable[-_ ]?diffusion|stability", "Stable Diffusion"),
)

# The SD watermark's payloads (worker.provenance.watermark) name a model family.
WATERMARK_FAMILIES = {
    "SDXL": "Stable Diffusion XL",
    "SDV2": "Stable Diffusion 2.x",
    "StableDiffusionV1": "Stable Diffusion 1.x",
}

# Signals in the order their evidence is trusted.
ORDER = ("c2pa", "generation_params", "iptc_xmp", "sd_watermark", "exif_software")
MAX_RAW = 200


@dataclass(frozen=True)
class Generator:
    """Who made an image: ``name`` for display, the ``tool`` and ``model`` when known, from ``signal``."""

    name: str
    tool: str | None  # the application or service (ComfyUI, Adobe Firefly, Midjourney)
    model: str | None  # the model or family (Stable Diffusion XL, FLUX.1 [dev])
    signal: str  # the provenance signal it came from
    raw: str  # the value as the file wrote it

    def to_json(self) -> dict[str, str | None]:
        return asdict(self)


def _match(table: Vocabulary, text: str | None) -> str | None:
    if not text:
        return None
    return next((name for pattern, name in table if pattern.search(text)), None)


def _text(value: Any) -> str | None:
    return clean_text(value.strip(), MAX_RAW) or None if isinstance(value, str) and value.strip() else None


def _named(signal: str, raw: str, *, tool: str | None = None, model: str | None = None) -> Generator:
    """A generator from a raw value: its tool and model normalised where the vocabulary knows them."""
    tool = tool or _match(TOOLS, raw)
    model = model or _match(MODELS, raw)
    return Generator(name=model or tool or raw, tool=tool, model=model, signal=signal, raw=raw)


def _from_c2pa(evidence: dict[str, Any]) -> Generator | None:
    raw = _text(evidence.get("tool"))  # the AI action's softwareAgent first, else its claim generator
    return None if raw is None else _named("c2pa", raw)


def _from_generation_params(evidence: dict[str, Any]) -> Generator | None:
    tool_raw, model_raw = _text(evidence.get("tool")), _text(evidence.get("model"))
    if tool_raw is None and model_raw is None:
        return None
    tool = _match(TOOLS, tool_raw) or tool_raw
    if model_raw is None:
        return _named("generation_params", tool_raw or "", tool=tool)
    return _named("generation_params", model_raw, tool=tool)


def _from_xmp(evidence: dict[str, Any], ai: bool) -> Generator | None:
    for field in ("creator_tool", "credit"):
        raw = _text(evidence.get(field))
        # A creator tool of a file that does not declare AI is any editor; it counts only when the
        # vocabulary knows it for a generator.
        if raw is not None and (ai or _match(TOOLS, raw) or _match(MODELS, raw)):
            return _named("iptc_xmp", raw)
    return None


def _from_watermark(evidence: dict[str, Any]) -> Generator | None:
    payload = _text(evidence.get("payload"))
    family = WATERMARK_FAMILIES.get(payload or "")
    if payload is None or family is None:
        return None
    return Generator(name=family, tool=None, model=family, signal="sd_watermark", raw=payload)


def attribute(provenance: dict[str, Any] | None) -> Generator | None:
    """The generator the stored provenance findings name, from the strongest signal that names one."""
    signals = (provenance or {}).get("signals")
    if not isinstance(signals, dict):
        return None
    for name in ORDER:
        signal = signals.get(name)
        if not isinstance(signal, dict):
            continue
        evidence = signal.get("evidence") if isinstance(signal.get("evidence"), dict) else {}
        ai = signal.get("ai") is True
        found: Generator | None = None
        if name == "c2pa" and ai:
            found = _from_c2pa(evidence)
        elif name == "generation_params" and ai:
            found = _from_generation_params(evidence)
        elif name == "iptc_xmp":
            found = _from_xmp(evidence, ai)
        elif name == "sd_watermark" and ai:
            found = _from_watermark(evidence)
        elif name == "exif_software" and ai:  # the Software tag names a known generator
            raw = _text(evidence.get("software"))
            found = None if raw is None else _named("exif_software", raw)
        if found is not None:
            return found
    return None
