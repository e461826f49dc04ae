"""C2PA Content Credentials: every manifest in the store, not only the active one.

Claim generator, signer, validation state, and each action's
``digitalSourceType``. The SDK reads with remote manifest fetching and OCSP
switched off and an empty network allow-list: nothing here opens a connection.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

from ._base import (
    MAX_EVIDENCE_LIST,
    NONE,
    STRONG,
    Budget,
    Signal,
    clip,
    is_ai_source_type,
    missing,
    unique,
)
from ._containers import Metadata

MAX_C2PA_MANIFESTS = 64
MAX_C2PA_ACTIONS = 256

# --- C2PA reader settings ----------------------------------------------------
# remote_manifest_fetch and ocsp_fetch are the two switches that make the SDK
# reach out while reading; the empty allow-list refuses any host should a
# future SDK version find a third reason. Unknown keys are silently ignored by
# the SDK, so tests check the behaviour (no connection), not this dict.
C2PA_SETTINGS: dict[str, Any] = {
    "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False},
    "core": {"allowed_network_hosts": [], "max_decompressed_manifest_size_in_mb": 16},
}
_C2PA_MIME = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "tiff": "image/tiff",
    "heif": "image/heif",
    "avif": "image/avif",
}


def _agent_name(agent: Any) -> str | None:
    if isinstance(agent, str):
        return clip(agent)
    if isinstance(agent, dict) and isinstance(agent.get("name"), str):
        version = agent.get("version")
        return clip(f"{agent['name']} {version}" if isinstance(version, str) else agent["name"])
    return None


def _claim_generator(manifest: dict[str, Any]) -> str | None:
    generator = manifest.get("claim_generator")
    if isinstance(generator, str) and generator:
        return clip(generator)
    info = manifest.get("claim_generator_info")
    if isinstance(info, list):
        names = [n for n in (_agent_name(i) for i in info) if n]
        if names:
            return clip(" / ".join(names))
    return None


def _find_source_types(node: Any, out: list[str], depth: int = 0) -> None:
    """Every digitalSourceType anywhere in an assertion (actions v1/v2, templates, custom ones)."""
    if depth > 12 or len(out) >= MAX_EVIDENCE_LIST:
        return
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "digitalSourceType" and isinstance(value, str):
                out.append(value.strip())
            else:
                _find_source_types(value, out, depth + 1)
    elif isinstance(node, list):
        for item in node[:MAX_C2PA_ACTIONS]:
            _find_source_types(item, out, depth + 1)


def _summarise_manifest(label: str, manifest: dict[str, Any], active: bool) -> dict[str, Any]:
    signature = manifest.get("signature_info") if isinstance(manifest.get("signature_info"), dict) else {}
    actions: list[dict[str, Any]] = []
    source_types: list[str] = []
    assertions = manifest.get("assertions") if isinstance(manifest.get("assertions"), list) else []
    for assertion in assertions[:MAX_C2PA_ACTIONS]:
        if not isinstance(assertion, dict):
            continue
        data = assertion.get("data")
        label_ = assertion.get("label")
        if isinstance(label_, str) and label_.startswith("c2pa.actions") and isinstance(data, dict):
            for action in (data.get("actions") or [])[:MAX_C2PA_ACTIONS]:
                if not isinstance(action, dict):
                    continue
                entry: dict[str, Any] = {"action": clip(action.get("action", ""))}
                if isinstance(action.get("digitalSourceType"), str):
                    entry["digitalSourceType"] = action["digitalSourceType"].strip()
                agent = _agent_name(action.get("softwareAgent"))
                if agent:
                    entry["softwareAgent"] = agent
                if len(actions) < MAX_EVIDENCE_LIST:
                    actions.append(entry)
        _find_source_types(data, source_types)
    ai_agents = [
        a["softwareAgent"]
        for a in actions
        if "softwareAgent" in a and is_ai_source_type(a.get("digitalSourceType"))
    ]
    return {
        "label": clip(label),
        "active": active,
        "claim_generator": _claim_generator(manifest),
        "title": clip(manifest["title"]) if isinstance(manifest.get("title"), str) else None,
        "signer": {
            k: clip(signature[k])
            for k in ("issuer", "common_name", "time", "alg")
            if isinstance(signature.get(k), str)
        },
        "actions": actions,
        "digital_source_types": unique(source_types),
        "ai": any(is_ai_source_type(t) for t in source_types),
        "ai_agents": unique(ai_agents),
    }


def _validation_codes(store: dict[str, Any]) -> list[str]:
    codes: list[str] = []
    status = store.get("validation_status")
    if isinstance(status, list):
        codes += [s["code"] for s in status if isinstance(s, dict) and isinstance(s.get("code"), str)]
    results = store.get("validation_results")
    if isinstance(results, dict):
        # Failures only: successes are many and say nothing a reviewer needs.
        active = results.get("activeManifest")
        if isinstance(active, dict) and isinstance(active.get("failure"), list):
            codes += [
                s["code"] for s in active["failure"] if isinstance(s, dict) and isinstance(s.get("code"), str)
            ]
        for delta in results.get("ingredientDeltas") or []:
            failures = (
                (delta.get("validationDeltas") or {}).get("failure") if isinstance(delta, dict) else None
            )
            if isinstance(failures, list):
                codes += [
                    s["code"] for s in failures if isinstance(s, dict) and isinstance(s.get("code"), str)
                ]
    return unique(codes)


def store_signal(store: dict[str, Any], remote_url: str | None) -> Signal:
    manifests = store.get("manifests") if isinstance(store.get("manifests"), dict) else {}
    active = store.get("active_manifest")
    summaries = [
        _summarise_manifest(label, manifest, label == active)
        for label, manifest in list(manifests.items())[:MAX_C2PA_MANIFESTS]
        if isinstance(manifest, dict)
    ]
    ai_manifests = [m for m in summaries if m["ai"]]
    source_types = unique(t for m in summaries for t in m["digital_source_types"])
    tools = unique(
        [*(a for m in ai_manifests for a in m["ai_agents"]), *(m["claim_generator"] for m in ai_manifests)]
    )
    active_summary = next((m for m in summaries if m["active"]), None)
    evidence: dict[str, Any] = {
        "active_manifest": clip(active) if isinstance(active, str) else None,
        "claim_generator": active_summary["claim_generator"] if active_summary else None,
        "signer": active_summary["signer"] if active_summary else {},
        "validation_state": store.get("validation_state")
        if isinstance(store.get("validation_state"), str)
        else None,
        "validation_codes": _validation_codes(store),
        "digital_source_types": source_types,
        "ai_source_types": unique(t for t in source_types if is_ai_source_type(t)),
        "manifest_count": len(manifests),
        "manifests": summaries,
    }
    if remote_url:
        evidence["remote_manifest_url"] = clip(remote_url)
    if tools:
        evidence["tool"] = tools[0]
        evidence["tools"] = tools
    ai = bool(ai_manifests)
    return Signal("c2pa", True, ai, STRONG if ai else NONE, evidence)


def read(data: bytes, fmt: str, meta: Metadata, budget: Budget) -> Signal:
    """The ``c2pa`` signal: the manifest store the SDK reads from the file, summarised."""
    mime = _C2PA_MIME.get(fmt)
    if mime is None:
        return missing("c2pa", supported=False)
    try:
        import c2pa  # the native library loads on first use, not at worker import
    except ImportError as exc:
        return missing("c2pa", f"c2pa-python is not installed ({exc})")
    if meta.complete and not (meta.c2pa_box or meta.app11) and not _names_remote_manifest(meta):
        # The walk saw the whole container and no manifest, embedded or referenced: the SDK
        # would find none either, and asking it costs several ms on a large PNG.
        return missing("c2pa")
    budget.check()
    try:
        context = c2pa.Context.from_dict(C2PA_SETTINGS)
    except c2pa.C2paError as exc:
        return missing("c2pa", f"C2PA reader could not be configured: {clip(exc, 200)}")
    try:
        try:
            with c2pa.Reader(mime, io.BytesIO(data), context=context) as reader:
                store = json.loads(reader.json())
                remote_url = reader.get_remote_url()
        except c2pa.C2paError as exc:
            return _c2pa_failure(exc, c2pa, meta)
        except (ValueError, RecursionError) as exc:  # the SDK's JSON did not parse
            return Signal("c2pa", True, False, NONE, {}, f"C2PA manifest store unreadable: {clip(exc, 200)}")
    finally:
        context.close()
    if not isinstance(store, dict):
        return Signal("c2pa", True, False, NONE, {}, "C2PA manifest store is not a JSON object")
    return store_signal(store, remote_url)


def _names_remote_manifest(meta: Metadata) -> bool:
    """An XMP packet that may point at a manifest elsewhere (``dcterms:provenance``)."""
    return any(b"provenance" in packet for _, packet in meta.xmp)


def _c2pa_failure(exc: Exception, c2pa: Any, meta: Metadata) -> Signal:
    message = clip(str(exc), 300)
    if isinstance(exc, c2pa.C2paError.ManifestNotFound):
        return missing("c2pa")
    if isinstance(exc, c2pa.C2paError.RemoteManifest) or message.startswith("Remote"):
        # The file points at a manifest on a server; fetching it is switched off on purpose.
        url = re.search(r"https?://\S+", message)
        evidence = {"remote_manifest_url": url.group(0) if url else None, "remote_manifest_fetched": False}
        return Signal("c2pa", True, False, NONE, evidence)
    if isinstance(exc, c2pa.C2paError.NotSupported):
        return missing("c2pa", supported=False)
    # Malformed JUMBF, bad CBOR, a broken signature structure...: found when a
    # C2PA container is in the file (or the SDK got far enough to complain about one).
    found = meta.c2pa_box or not isinstance(exc, c2pa.C2paError.Other | c2pa.C2paError.Io)
    return Signal("c2pa", found, False, NONE, {}, f"C2PA data unreadable: {message}")
