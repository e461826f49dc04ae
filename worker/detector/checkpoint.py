"""Finding and reading a checkpoint: a local file or folder or ``hf://OWNER/REPO[/FILE]``, its
config.json (labels, preprocessing) and its weights, decided by content; unsafe pickle only on opt-in."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pickle
import socket
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import CheckpointError
from ..settings import Settings

if TYPE_CHECKING:  # torch and timm are imported where weights are read: producers only hash the file
    import torch

log = logging.getLogger(__name__)

UNTRAINED_VERSION = "untrained"

HF_SCHEME = "hf://"
CONFIG_NAME = "config.json"
# In order of preference, as the hub serves them.
PREFERRED_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
NUM_CLASSES = 2

# Training scripts nest the state dict under one of these keys.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
# DataParallel / DistributedDataParallel and torch.compile add these.
_KEY_PREFIXES = ("module.", "_orig_mod.")
_AI_LABELS = frozenset({"by ai", "ai", "fake", "synthetic", "generated"})
# pretrained_cfg entries that name where timm would fetch weights from; with
# pretrained=False they never matter, and dropping them keeps it that way.
_CFG_SOURCE_KEYS = frozenset(
    {"url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "custom_load"}
)


@cache
def _cfg_fields() -> frozenset[str]:
    from timm.models import PretrainedCfg

    return frozenset(f.name for f in dataclasses.fields(PretrainedCfg)) - _CFG_SOURCE_KEYS - {"architecture"}

# model_args from config.json that synthguard decides itself, or that could make timm fetch something.
_RESERVED_MODEL_ARGS = frozenset(
    {
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "checkpoint_path",
        "cache_dir",
        "num_classes",
        "device",
        "dtype",
    }
)

_HOW_TO_GET_LOCAL = (
    "Set SYNTHGUARD_MODEL_CHECKPOINT to a local file or directory instead. To get published weights, "
    "on a machine with network run `hf download {repo} --local-dir DIR` (older huggingface_hub: "
    "`huggingface-cli download {repo} --local-dir DIR`), copy DIR here and set SYNTHGUARD_MODEL_CHECKPOINT=DIR."
)


# --------------------------------------------------------------------------- checkpoint location


def resolve_checkpoint(spec: str, *, cache_dir: str | Path | None = None) -> Path:
    """The local path of checkpoint ``spec``: a file, or a directory holding one.

    ``hf://OWNER/REPO[@REVISION][/FILE]`` is fetched into the huggingface_hub cache
    (``cache_dir`` overrides its location); with FILE, that file and the
    ``config.json`` beside it if the repository has one; without, ``config.json``
    if present and ``model.safetensors`` or else ``pytorch_model.bin``, and the
    snapshot directory is returned.
    """
    spec = spec.strip()
    if spec.startswith(HF_SCHEME):
        return _fetch_from_hub(spec, cache_dir)
    path = Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"model checkpoint {path} does not exist. Set SYNTHGUARD_MODEL_CHECKPOINT to an existing "
            "file or directory, or to hf://OWNER/REPO[/FILE]."
        )
    return path


def _parse_hub_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``hf://OWNER/REPO[@REV][/FILE]`` -> (repo id, revision, file)."""
    parts = spec[len(HF_SCHEME) :].strip("/").split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise CheckpointError(
            f"checkpoint {spec!r} is not of the form hf://OWNER/REPO[/FILE]; fix SYNTHGUARD_MODEL_CHECKPOINT."
        )
    name, _, revision = parts[1].partition("@")
    filename = "/".join(p for p in parts[2:] if p) or None
    return f"{parts[0]}/{name}", revision or None, filename


def _fetch_from_hub(spec: str, cache_dir: str | Path | None) -> Path:
    # Imported here: only hub checkpoints need it, and it reads HF_* variables once, at import.
    from huggingface_hub import constants, hf_hub_download

    try:
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError:  # huggingface_hub < 0.24 kept them in utils
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id, revision, filename = _parse_hub_spec(spec)

    # The hub client retries a dead network for half a minute; a quick probe
    # first turns "no network" into a cache lookup and a clear error instead.
    online = not constants.HF_HUB_OFFLINE and _hub_reachable(constants.ENDPOINT)

    def fetch(name: str, *, local_only: bool = False) -> Path:
        return Path(
            hf_hub_download(
                repo_id,
                name,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_only or not online,
            )
        )

    def fetch_config(name: str) -> bool:
        """Fetch an optional config.json; False when the hub could not be reached."""
        try:
            fetch(name)
        except LocalEntryNotFoundError:
            return False
        except EntryNotFoundError:
            pass  # the repository has none: fine
        return True

    def failure(reason: str) -> CheckpointError:
        return CheckpointError(
            f"could not get checkpoint {spec}: {reason}. " + _HOW_TO_GET_LOCAL.format(repo=repo_id)
        )

    try:
        if filename is not None:
            weights = fetch(filename)
            folder = filename.rpartition("/")[0]
            fetch_config(f"{folder}/{CONFIG_NAME}" if folder else CONFIG_NAME)
            return weights
        # Unreachable for config.json means unreachable for the weights too: look only in the
        # cache then, instead of sitting through the client's network retries a second time.
        reachable = fetch_config(CONFIG_NAME)
        last: Exception | None = None
        for name in PREFERRED_WEIGHTS:
            try:
                return fetch(name, local_only=not reachable).parent
            except EntryNotFoundError as exc:
                last = exc
        if isinstance(last, LocalEntryNotFoundError):
            raise last
        raise CheckpointError(
            f"hub repository {repo_id} has neither {' nor '.join(PREFERRED_WEIGHTS)}; name the weight file "
            f"in SYNTHGUARD_MODEL_CHECKPOINT as hf://{repo_id}/FILE, or set it to a local file or directory."
        )
    except LocalEntryNotFoundError:
        where = (
            "HF_HUB_OFFLINE is set"
            if constants.HF_HUB_OFFLINE
            else f"no connection to {constants.ENDPOINT}"
        )
        raise failure(
            f"the Hugging Face hub could not be reached ({where}) and the files are not in the local cache"
        ) from None
    except RepositoryNotFoundError:
        raise failure(
            f"the hub has no repository {repo_id}, or it is private or gated (a token in HF_TOKEN may give access)"
        ) from None
    except EntryNotFoundError:
        raise failure(f"the repository has no file {filename}") from None
    except ValueError as exc:  # HFValidationError: a malformed repo id or file name
        raise failure(f"invalid hub reference ({exc})") from None
    except OSError as exc:  # HTTP errors of either HTTP client huggingface_hub may use
        raise failure(f"the Hugging Face hub request failed ({exc})") from None


def _hub_reachable(endpoint: str, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's host can be opened at all."""
    parsed = urlsplit(endpoint)
    if not parsed.hostname:
        return True  # let the client report what is wrong with the endpoint
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _locate(path: Path) -> tuple[Path, Path | None]:
    """(weight file, config.json or None) for a checkpoint file or directory."""
    if path.is_dir():
        folder = path
        weights = _pick_weight_file(path)
    else:
        folder, weights = path.parent, path
    config = folder / CONFIG_NAME
    return weights, (config if config.is_file() else None)


def _pick_weight_file(folder: Path) -> Path:
    for name in PREFERRED_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CheckpointError(
            f"checkpoint directory {folder} holds no weight file ({', '.join(PREFERRED_WEIGHTS)} or one "
            f"*{', *'.join(WEIGHT_SUFFIXES)}); point SYNTHGUARD_MODEL_CHECKPOINT at the file itself."
        )
    raise CheckpointError(
        f"checkpoint directory {folder} holds several weight files ({', '.join(p.name for p in candidates)}); "
        "point SYNTHGUARD_MODEL_CHECKPOINT at the one to use."
    )


# --------------------------------------------------------------------------- config.json


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint config {path} cannot be read as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint config {path} is not a JSON object")
    return data


def _labels_from_config(config: Mapping[str, Any], where: Path) -> tuple[str, ...] | None:
    pretrained_cfg = config.get("pretrained_cfg")
    names = config.get("label_names")
    if names is None and isinstance(pretrained_cfg, Mapping):
        names = pretrained_cfg.get("label_names")
    if names is None:
        names = config.get("id2label")
    if names is None:
        return None
    if isinstance(names, Mapping):  # {"0": "by AI", "1": "by human"}, possibly with gaps in theory
        try:
            items = sorted((int(k), v) for k, v in names.items())
        except (TypeError, ValueError):
            raise CheckpointError(f"label ids in {where} are not integers: {list(names)}") from None
        if [i for i, _ in items] != list(range(len(items))):
            raise CheckpointError(
                f"label ids in {where} are not 0..{len(items) - 1}: {[i for i, _ in items]}"
            )
        names = [v for _, v in items]
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"label names in {where} are not a list of strings: {names!r}")
    return tuple(names)


def _cfg_overlay(config: Mapping[str, Any], where: Path) -> dict[str, Any]:
    """config.json's pretrained_cfg, reduced to what timm's PretrainedCfg knows."""
    pretrained_cfg = config.get("pretrained_cfg")
    if pretrained_cfg is None:
        return {}
    if not isinstance(pretrained_cfg, Mapping):
        raise CheckpointError(f"pretrained_cfg in {where} is not a JSON object")
    fields = _cfg_fields()
    ignored = sorted(set(pretrained_cfg) - fields - _CFG_SOURCE_KEYS - {"architecture"})
    if ignored:
        log.debug("ignoring pretrained_cfg entries unknown to timm in %s: %s", where, ignored)
    # JSON has no tuples; timm's own configs use them (mean, std, input_size).
    return {k: tuple(v) if isinstance(v, list) else v for k, v in pretrained_cfg.items() if k in fields}


def _model_args(config: Mapping[str, Any], where: Path) -> dict[str, Any]:
    """config.json's model_args (timm's hub format), minus what synthguard decides itself."""
    args = config.get("model_args") or {}
    if not isinstance(args, Mapping):
        raise CheckpointError(f"model_args in {where} is not a JSON object")
    return {k: v for k, v in args.items() if k not in _RESERVED_MODEL_ARGS}


def _check_config(config: Mapping[str, Any], arch: str, where: Path) -> None:
    from timm.models import get_arch_name

    declared = config.get("architecture")
    if isinstance(declared, str) and get_arch_name(declared) != get_arch_name(arch):
        raise CheckpointError(
            f"{where} says the checkpoint is a {declared} model, but SYNTHGUARD_MODEL_ARCH is {arch}. "
            f"Set SYNTHGUARD_MODEL_ARCH={declared}, or use a {arch} checkpoint."
        )
    classes = config.get("num_classes")
    if isinstance(classes, int) and classes != NUM_CLASSES:
        raise CheckpointError(
            f"{where} says the model has {classes} classes; synthguard needs a two-class detector "
            "(by AI / by human)."
        )


# --------------------------------------------------------------------------- weight files


def _checkpoint_files(settings: Settings) -> tuple[Path, Path | None]:
    """(weight file, config.json or None) of the configured checkpoint, fetched if need be."""
    return _locate(resolve_checkpoint(settings.checkpoint))


def checkpoint_version(settings: Settings) -> str:
    """The ``model_version`` the configured checkpoint gets, without building the model.

    Producers use it to tell results of the current model from older ones; it
    goes through the same resolution and hashing as :meth:`Detector.from_settings`,
    so the two cannot disagree. Raises CheckpointError when the checkpoint cannot be had.
    """
    weights, _ = _checkpoint_files(settings)
    return _file_version(weights)


def _file_version(path: Path) -> str:
    """The version: "sha256:" and 12 hex digits of the weight file, read in chunks."""
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return f"sha256:{digest[:12]}"


def _sniff(path: Path) -> str:
    """The file's form from its bytes: safetensors, torchscript or torch (torch.save, zip or legacy)."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint file {path} is empty")
    with path.open("rb") as handle:
        head = handle.read(9)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "torch"  # let torch.load report it
        # torch.jit.save writes the model's code and constants; torch.save never does.
        if any("/code/" in n or n.endswith("constants.pkl") for n in names):
            return "torchscript"
        return "torch"
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size:
        return "safetensors"
    return "torch"


def _pickle_refused(path: Path) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is a pickled Python object (e.g. a whole model saved with torch.save(model)), "
        "not plain weights. Loading it runs code stored in the file, so synthguard refuses by default. "
        "Set SYNTHGUARD_MODEL_ALLOW_PICKLE=true only if you trust the file and where it came from; better, "
        "re-save it as a state dict: torch.save(model.state_dict(), 'model.pt') or safetensors."
    )


def _read_weights(path: Path, kind: str, *, allow_pickle: bool, device: torch.device) -> Any:
    """Whatever the file holds: a state dict, a wrapper dict or a module."""
    import torch

    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {exc}") from None
    if kind == "torchscript":
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated upstream; the operator chose this file, no need to nag per start.
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(str(path), map_location=device)
        except (RuntimeError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint {path} looks like TorchScript but cannot be loaded: {exc}"
            ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refused a global: it is an arbitrary pickle, and nothing of it has run.
        if not allow_pickle:
            raise _pickle_refused(path) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:  # a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be read as a PyTorch checkpoint: {exc}") from None
    log.warning("unpickling %s with code execution allowed (SYNTHGUARD_MODEL_ALLOW_PICKLE=true)", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - the file's own code runs here and may raise anything
        raise CheckpointError(f"pickled checkpoint {path} cannot be loaded: {exc}") from None


def _unwrap(obj: Any, path: Path) -> torch.nn.Module | dict[str, torch.Tensor]:
    """The module or the flat state dict inside what a checkpoint file held."""
    import torch

    for _ in range(len(_WRAPPER_KEYS) + 1):
        if isinstance(obj, torch.nn.Module):
            return obj
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
        inner = next(
            (obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping | torch.nn.Module)), None
        )
        if inner is None:
            break
        obj = inner
    what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(
        f"checkpoint {path} holds {what}, not a state dict of tensors (nor one under "
        f"{', '.join(repr(k) for k in _WRAPPER_KEYS)}) or a model."
    )


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Only when every key has the prefix: then it is a wrapper's, not a layer's name.
    changed = True
    while changed:
        changed = False
        for prefix in _KEY_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def _names(keys: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _load_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], arch: str, path: Path) -> None:
    """Strict loading, with a summary of what does not fit instead of torch's wall of text."""
    expected = model.state_dict()
    # BatchNorm's counter is training bookkeeping; converted checkpoints often lack it.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {list(state[k].shape)} here, {list(expected[k].shape)} expected"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or misshaped:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys ({_names(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_names(unexpected)})")
        if misshaped:
            problems.append(f"{len(misshaped)} keys with other shapes ({_names(misshaped, 2)})")
        raise CheckpointError(
            f"checkpoint {path} does not fit a two-class timm {arch}: {'; '.join(problems)}. "
            f"Is it a {arch} checkpoint with two classes? Set SYNTHGUARD_MODEL_ARCH to the timm architecture "
            "it was trained with."
        )
    for key, value in expected.items():
        state.setdefault(key, value)
    model.load_state_dict(state, strict=True)
