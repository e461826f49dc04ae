"""Generator parameters: the text AUTOMATIC1111, ComfyUI, NovelAI, InvokeAI and Fooocus write.

Read from PNG text chunks, EXIF text tags and JPEG comments, with the model
(and LoRA) names when they are stated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._base import NONE, STRONG, Budget, Signal, clip, join_errors, unique
from ._containers import Metadata

# One "Key: value" item of A1111's settings line; values may be quoted JSON strings.
_A1111_ITEM = re.compile(r'\s*([A-Za-z][\w /\-]*?)\s*:\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_A1111_KEEP = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Seed",
    "Size",
    "Model hash",
    "Model",
    "VAE",
    "Version",
)
_MODEL_FILE = re.compile(r"\.(safetensors|ckpt|pt|pth|bin|gguf|sft)$", re.IGNORECASE)
_NOVELAI_FIELDS = ("steps", "sampler", "seed", "scale", "uc", "prompt", "n_samples")


@dataclass
class _Detection:
    tool: str
    source: str
    models: list[str] = field(default_factory=list)
    loras: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def _parse_a1111(text: str) -> dict[str, str] | None:
    """The settings line of AUTOMATIC1111-style parameters, or None if the text is not that."""
    lines = text.strip().splitlines()
    for line in reversed(lines[-8:]):
        if "Steps:" not in line:
            continue
        items = {k.strip(): v.strip() for k, v in _A1111_ITEM.findall(line) if k.strip()}
        if items.get("Steps", "").isdigit() and any(
            k in items for k in ("Sampler", "Seed", "CFG scale", "Size")
        ):
            return items
    return None


def _a1111_detection(text: str, source: str) -> _Detection | None:
    items = _parse_a1111(text)
    if items is None:
        return None
    settings = {k: clip(items[k].strip('"'), 120) for k in _A1111_KEEP if k in items}
    model = settings.get("Model")
    # Forge and SD.Next write the same text; their Version says so ("f2.0.1...", "app=...").
    return _Detection("AUTOMATIC1111", source, [model] if model else [], settings=settings)


def _json_object(text: str) -> dict[str, Any]:
    """Parse a JSON object; ValueError (with a short reason) for anything else."""
    try:
        value = json.loads(text)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc
    if not isinstance(value, dict):
        raise ValueError(f"JSON is a {type(value).__name__}, not an object")
    return value


def _node_order(key: str) -> tuple[int, str]:
    return (int(key), key) if key.isdigit() else (1 << 30, key)


def _comfy_prompt(text: str, source: str) -> _Detection:
    graph = _json_object(text)
    nodes = [graph[k] for k in sorted(graph, key=_node_order) if isinstance(graph[k], dict)]
    if not any("class_type" in n for n in nodes):
        raise ValueError("no ComfyUI nodes (class_type) in it")
    detection = _Detection("ComfyUI", source)
    for node in nodes:
        inputs = node.get("inputs") if isinstance(node.get("inputs"), dict) else {}
        # Any loader, stock or custom, names its weights in these inputs.
        for key in ("ckpt_name", "unet_name"):
            if isinstance(inputs.get(key), str):
                detection.models.append(clip(inputs[key], 200))
        if isinstance(inputs.get("lora_name"), str):
            detection.loras.append(clip(inputs["lora_name"], 200))
    return detection


def _comfy_workflow(text: str, source: str) -> _Detection:
    graph = _json_object(text)
    nodes = graph.get("nodes")
    if not isinstance(nodes, list):
        raise ValueError("no ComfyUI node list in it")
    detection = _Detection("ComfyUI", source)
    for node in nodes[:5000]:
        if not isinstance(node, dict):
            continue
        kind = str(node.get("type", ""))
        widgets = node.get("widgets_values") if isinstance(node.get("widgets_values"), list) else []
        files = [w for w in widgets[:8] if isinstance(w, str) and _MODEL_FILE.search(w)]
        if not files:
            continue
        lowered = kind.lower()
        if "checkpointloader" in lowered or "unetloader" in lowered:
            detection.models.append(clip(files[0], 200))
        elif "lora" in lowered:
            detection.loras.append(clip(files[0], 200))
    return detection


def _novelai(comment: str, source_text: str | None, source: str) -> _Detection:
    fields = _json_object(comment)
    if not any(k in fields for k in _NOVELAI_FIELDS):
        raise ValueError("no generation fields in it")
    settings = {k: clip(fields[k], 120) for k in ("steps", "sampler", "seed", "scale") if k in fields}
    model = clip(source_text, 120) if source_text else None
    return _Detection("NovelAI", source, [model] if model else [], settings=settings)


def _invokeai(key: str, text: str, source: str) -> _Detection:
    if key == "Dream":
        return _Detection("InvokeAI", source)
    fields = _json_object(text)
    model = fields.get("model")
    name = (
        model.get("model_name") or model.get("name")
        if isinstance(model, dict)
        else fields.get("model_weights")
    )
    return _Detection("InvokeAI", source, [clip(name, 200)] if isinstance(name, str) else [])


def _fooocus(text: str, source: str) -> _Detection | None:
    try:
        fields = _json_object(text)
    except ValueError:
        return None
    model = fields.get("base_model") or fields.get("Base Model")
    if not isinstance(model, str) and "full_prompt" not in fields:
        return None
    return _Detection("Fooocus", source, [clip(model, 200)] if isinstance(model, str) else [])


def _comfy_from_exif(value: str) -> tuple[str, str] | None:
    """ComfyUI's WebP/animated savers put "prompt:{...}" and "workflow:{...}" into EXIF text tags."""
    head = value[:12].lower()
    for key in ("prompt", "workflow"):
        if head.startswith(key + ":"):
            return key, value[len(key) + 1 :]
    return None


def read(meta: Metadata, exif: list[tuple[str, dict[str, str]]], budget: Budget) -> Signal:
    """The ``generation_params`` signal from text chunks, EXIF text and JPEG comments."""
    errors = meta.errors_for("generation_params")
    texts: dict[str, tuple[str, str]] = {}
    for source, key, text in meta.texts:
        texts.setdefault(key, (source, text))
    # EXIF carries the same texts in JPEG and WebP.
    exif_candidates: list[tuple[str, str, str]] = []
    for source, fields in exif:
        for tag in ("UserComment", "ImageDescription", "Make", "Model"):
            value = fields.get(tag)
            if not value:
                continue
            comfy = _comfy_from_exif(value)
            if comfy:
                texts.setdefault(comfy[0], (f"{source} {tag}", comfy[1]))
            elif tag in ("UserComment", "ImageDescription"):
                exif_candidates.append((f"{source} {tag}", tag, value))

    detections: list[_Detection] = []
    present: list[str] = []

    def attempt(source: str, key: str, parse: Callable[[], _Detection | None]) -> None:
        budget.check()
        present.append(f"{source} {key}")
        try:
            detection = parse()
        except ValueError as exc:
            errors.append(f"{source} {key!r} unreadable: {clip(exc, 160)}")
            return
        if detection is None:
            errors.append(f"{source} {key!r} is not in a known generator format")
        else:
            detections.append(detection)

    if "parameters" in texts:
        src, text = texts["parameters"]
        attempt(src, "parameters", lambda: _a1111_detection(text, src) or _fooocus(text, src))
    if "prompt" in texts:
        src, text = texts["prompt"]
        attempt(src, "prompt", lambda: _comfy_prompt(text, src))
    if "workflow" in texts:
        src, text = texts["workflow"]
        attempt(src, "workflow", lambda: _comfy_workflow(text, src))
    software = texts.get("Software", ("", ""))[1]
    if "Comment" in texts and software.strip().lower().startswith("novelai"):
        src, text = texts["Comment"]
        source_text = texts.get("Source", ("", ""))[1] or None
        attempt(src, "Comment", lambda: _novelai(text, source_text, src))
    for key in ("invokeai_metadata", "sd-metadata", "Dream"):
        if key in texts:
            src, text = texts[key]
            attempt(src, key, lambda key=key, src=src, text=text: _invokeai(key, text, src))
    # EXIF text and JPEG comments hold all sorts of things: only A1111's shape counts.
    for source, tag, text in [*exif_candidates, *((s, k, t) for s, k, t in meta.texts if s == "jpeg:COM")]:
        detection = _a1111_detection(text, source)
        if detection is not None:
            present.append(f"{source}")
            detections.append(detection)
        elif tag == "UserComment" and "Steps:" in text:
            errors.append(f"{source} looks like generation parameters but does not parse")

    evidence: dict[str, Any] = {"sources": unique(present)}
    if detections:
        tools = unique(d.tool for d in detections)
        models = unique(m for d in detections for m in d.models)
        evidence.update(
            tool=tools[0],
            tools=tools,
            model=models[0] if models else None,
            models=models,
            loras=unique(lora for d in detections for lora in d.loras),
        )
        settings = next((d.settings for d in detections if d.settings), None)
        if settings:
            evidence["settings"] = settings
    ai = bool(detections)
    return Signal(
        "generation_params", bool(present), ai, STRONG if ai else NONE, evidence, join_errors(errors)
    )
