"""The detector: find a checkpoint, load it into a timm model, score image tensors.

A checkpoint is a local file or directory, or ``hf://OWNER/REPO[/FILE]`` on the
Hugging Face hub. Its form is decided by content, not by file name: safetensors,
a ``torch.save`` state dict (optionally wrapped, optionally with ``module.`` or
``_orig_mod.`` prefixes), a TorchScript archive, or (only when explicitly
allowed) a whole pickled ``nn.Module``. A ``config.json`` beside the weights, in
timm's hub format or transformers' ``id2label`` style, supplies the label names
and the preprocessing (``pretrained_cfg``).

Preprocessing always comes from timm's data config for the model, so the tensor
a worker builds is the one the reference pipeline builds. The resize and crop
run on the CPU and give uint8 pixels; scaling and normalising run batched on the
model's device, in the reference's order, so the model input is bit for bit the
reference's while a quarter of the bytes cross to the GPU.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import pickle
import re
import socket
import threading
import time
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import timm
import timm.data
import torch
from PIL import Image
from timm.models import PretrainedCfg, get_arch_name

from .errors import CheckpointError, ConfigError
from .settings import Settings

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
_CFG_FIELDS = (
    frozenset(f.name for f in dataclasses.fields(PretrainedCfg)) - _CFG_SOURCE_KEYS - {"architecture"}
)
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
    ignored = sorted(set(pretrained_cfg) - _CFG_FIELDS - _CFG_SOURCE_KEYS - {"architecture"})
    if ignored:
        log.debug("ignoring pretrained_cfg entries unknown to timm in %s: %s", where, ignored)
    # JSON has no tuples; timm's own configs use them (mean, std, input_size).
    return {k: tuple(v) if isinstance(v, list) else v for k, v in pretrained_cfg.items() if k in _CFG_FIELDS}


def _model_args(config: Mapping[str, Any], where: Path) -> dict[str, Any]:
    """config.json's model_args (timm's hub format), minus what synthguard decides itself."""
    args = config.get("model_args") or {}
    if not isinstance(args, Mapping):
        raise CheckpointError(f"model_args in {where} is not a JSON object")
    return {k: v for k, v in args.items() if k not in _RESERVED_MODEL_ARGS}


def _check_config(config: Mapping[str, Any], arch: str, where: Path) -> None:
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


# --------------------------------------------------------------------------- device and model


def resolve_device(name: str) -> torch.device:
    """The torch device for SYNTHGUARD_DEVICE (auto, cpu, cuda, cuda:N)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"SYNTHGUARD_DEVICE={name!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"SYNTHGUARD_DEVICE={name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"SYNTHGUARD_DEVICE={name} but CUDA is not available to this process (no GPU, no driver, or a "
            "CPU-only torch build); set SYNTHGUARD_DEVICE=cpu or auto."
        )
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"SYNTHGUARD_DEVICE={name} but only {torch.cuda.device_count()} CUDA device(s) are visible."
        )
    return torch.device("cuda", index)


# What precision="auto" means on a GPU: the float32 reference. On an H100 it already runs the
# model at over 12,000 images/s, while float16 autocast moved a fixture's score by 1.6e-2, past the
# 1e-3 bar a default must meet (bench/RESULTS.md, GPU section): the faster precisions are opt-in.
CUDA_AUTO_PRECISION = "float32"
_AUTOCAST = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# The smallest batch at which channels_last measured faster than the default layout on an H100
# (tf32, float16, bfloat16; never float32); at batch 32 it was slower in every precision.
CHANNELS_LAST_MIN_BATCH = 256


def resolve_precision(name: str, device: torch.device) -> str:
    """The forward pass's arithmetic for SYNTHGUARD_PRECISION on ``device``."""
    if name == "auto":
        return CUDA_AUTO_PRECISION if device.type == "cuda" else "float32"
    if name != "float32" and device.type != "cuda":
        raise ConfigError(
            f"SYNTHGUARD_PRECISION={name} needs a CUDA device; on {device} only float32 (or auto) is supported"
        )
    return name


def _set_tf32(enabled: bool) -> None:
    """TF32 for float32 convolutions and matrix products (process-wide: torch has no per-model switch)."""
    mode = "tf32" if enabled else "ieee"
    try:
        torch.backends.cudnn.conv.fp32_precision = mode  # type: ignore[attr-defined]
        torch.backends.cuda.matmul.fp32_precision = mode  # type: ignore[attr-defined]
    except AttributeError:  # torch before 2.9
        torch.backends.cudnn.allow_tf32 = enabled
        torch.backends.cuda.matmul.allow_tf32 = enabled


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a padded detector runs: powers of two under ``max_batch``, then ``max_batch``."""
    sizes = []
    size = 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch)


# Largest difference in any class probability between the eager model and its frozen CPU form
# that still counts as the same model (measured on tf_mobilenetv3_large_100: at most 1.1e-6 over
# the fixtures, bench/RESULTS.md).
CPU_FREEZE_TOLERANCE = 1e-5


def freeze_for_cpu(model: torch.nn.Module, input_size: Sequence[int]) -> tuple[torch.nn.Module | None, str]:
    """``model`` traced by TorchScript, frozen and in channels_last, or None and why not.

    Freezing folds each batch norm into the convolution before it, and the graph
    runs without Python between layers: with channels_last, about 2x the eager
    rate on a 2-core CPU (bench/RESULTS.md). Tracing records one path through
    ``forward``, so the frozen form must match the eager model's probabilities
    within ``CPU_FREEZE_TOLERANCE`` on a batch of another size than it was traced
    with; a model that branches on its input or batch size thus stays eager.
    """
    if isinstance(model, torch.jit.ScriptModule):
        return None, "a TorchScript checkpoint runs as it was saved"
    example = torch.zeros((1, *input_size)).contiguous(memory_format=torch.channels_last)
    check = torch.randn((3, *input_size), generator=torch.Generator().manual_seed(0))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # torch marks TorchScript deprecated, and the tracer warns about numbers computed from
            # shapes (timm's "same" padding); the comparison below is what decides.
            warnings.simplefilter("ignore")
            layout = copy.deepcopy(model).to(memory_format=torch.channels_last)
            frozen = torch.jit.freeze(torch.jit.trace(layout, example, check_trace=False))
            want = model(check)
            got = frozen(check.contiguous(memory_format=torch.channels_last))
    except Exception as exc:  # noqa: BLE001 - tracing a foreign model may raise anything
        return None, f"it cannot be traced ({type(exc).__name__}: {exc})"
    if not (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)) or want.shape != got.shape:
        return None, "its traced form returns something else than the model"
    drift = float((want.float().softmax(-1) - got.float().softmax(-1)).abs().max())
    if not drift <= CPU_FREEZE_TOLERANCE:
        return None, f"its traced form moves probabilities by {drift:.2g} (over {CPU_FREEZE_TOLERANCE:g})"
    return frozen, f"probabilities within {drift:.1g} of the eager model"


def _split_transform(
    data_config: Mapping[str, Any],
) -> tuple[Any, Any, tuple[torch.Tensor, torch.Tensor] | None]:
    """timm's eval transform, and its pixel part (resize, crop: uint8 out) with the normalisation after it.

    The pixel part is timm's own prefetcher form of the same transform. When the
    two do not line up as ``pixels + [to-tensor, Normalize]`` (an unusual data
    config), the third item is None and the whole float transform runs per image.
    """
    full = timm.data.create_transform(**data_config, is_training=False)
    pixels = timm.data.create_transform(**data_config, is_training=False, use_prefetcher=True)
    steps = list(getattr(full, "transforms", []))
    pixel_steps = list(getattr(pixels, "transforms", []))
    names = [type(t).__name__ for t in steps]
    if (
        len(steps) >= 2
        and names[-2:] in (["MaybeToTensor", "Normalize"], ["ToTensor", "Normalize"])
        and pixel_steps
        and type(pixel_steps[-1]).__name__ in ("MaybePILToTensor", "PILToTensor")
        and [repr(t) for t in pixel_steps[:-1]] == [repr(t) for t in steps[:-2]]
    ):
        normalize = steps[-1]
        mean = torch.as_tensor(normalize.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.as_tensor(normalize.std, dtype=torch.float32).view(1, -1, 1, 1)
        return full, pixels, (mean, std)
    return full, None, None


def _check_arch(arch: str) -> str:
    # Prefixed names (hf-hub:, local-dir:) would make timm read or fetch configs itself.
    if ":" in arch or not timm.is_model(arch):
        raise ConfigError(
            f"SYNTHGUARD_MODEL_ARCH={arch!r} is not a timm architecture (see timm.list_models()); "
            "the published detector is tf_mobilenetv3_large_100."
        )
    return arch


def _create_timm(arch: str, overlay: Mapping[str, Any], model_args: Mapping[str, Any]) -> torch.nn.Module:
    try:
        return timm.create_model(
            arch,
            pretrained=False,
            num_classes=NUM_CLASSES,
            pretrained_cfg_overlay=dict(overlay) or None,
            **model_args,
        )
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
        raise CheckpointError(
            f"cannot build timm {arch} with the checkpoint's config (pretrained_cfg={dict(overlay)}, "
            f"model_args={dict(model_args)}): {exc}"
        ) from None


def _check_module_arch(module: torch.nn.Module, arch: str, path: Path) -> None:
    cfg = getattr(module, "pretrained_cfg", None)
    declared = cfg.get("architecture") if isinstance(cfg, Mapping) else None
    if isinstance(declared, str) and get_arch_name(declared) != get_arch_name(arch):
        raise CheckpointError(
            f"checkpoint {path} holds a {declared} model, but SYNTHGUARD_MODEL_ARCH is {arch}; "
            f"set SYNTHGUARD_MODEL_ARCH={declared}."
        )


def _normalise_label(label: str) -> str:
    return " ".join(re.split(r"[\s_\-]+", label.strip().lower()))


def _pick_ai_index(settings: Settings, labels: tuple[str, ...] | None) -> int:
    if settings.model_ai_index is not None:
        index = settings.model_ai_index
    elif labels:
        matches = [i for i, label in enumerate(labels) if _normalise_label(label) in _AI_LABELS]
        if len(matches) == 1:
            index = matches[0]
        else:
            index = 0
            log.warning(
                "cannot tell the 'by AI' output from labels %s; using 0 (set SYNTHGUARD_MODEL_AI_INDEX)",
                list(labels),
            )
    else:
        index = 0
    if index >= NUM_CLASSES:
        raise CheckpointError(
            f"SYNTHGUARD_MODEL_AI_INDEX={index} is out of range: the model has {NUM_CLASSES} outputs (0, 1)."
        )
    return index


# --------------------------------------------------------------------------- the detector


class Detector:
    """A loaded model and its preprocessing; ``predict`` gives p(synthetic) per image."""

    def __init__(
        self,
        *,
        name: str,
        version: str,
        model: torch.nn.Module,
        data_config: dict[str, Any],
        device: torch.device,
        ai_index: int = 0,
        labels: tuple[str, ...] | None = None,
        untrained: bool = False,
        source: str | None = None,
        precision: str = "auto",
        max_batch: int | None = None,
        pad_batches: bool | None = None,
        freeze_cpu: bool = False,
    ) -> None:
        self.name = name
        self.version = version
        self.untrained = untrained
        self.device = device
        self.ai_index = ai_index
        self.labels = labels
        self.data_config = data_config
        self.source = source
        self.precision = resolve_precision(precision, device)
        # ``transform`` is the reference (float out); ``pixel_transform`` its uint8 part.
        self.transform, self.pixel_transform, norm = _split_transform(data_config)
        self._mean_std = None if norm is None else (norm[0].to(device), norm[1].to(device))
        # On CUDA a Python-number divisor becomes a multiplication by its reciprocal, one ulp off
        # the reference; a 0-d tensor divisor keeps true division there (see normalise).
        self._scale = torch.tensor(255.0, device=device)
        self._cuda = device.type == "cuda"
        self._amp_dtype = _AUTOCAST.get(self.precision)
        # On CUDA the first forward pass at each new batch size costs extra (cuDNN plan selection:
        # 0.12 s per size in contiguous float32 on an H100, 3.4 s in channels_last). Padding every
        # batch up to one of a few sizes, all run once at load (warm_up), keeps that out of latency.
        pad = self._cuda if pad_batches is None else pad_batches
        self.buckets: tuple[int, ...] = batch_buckets(max_batch) if pad and max_batch else ()
        # One pinned staging buffer for host-to-device copies, reused under this lock.
        self._staging: torch.Tensor | None = None
        self._staging_lock = threading.Lock()
        model = model.eval().to(device)
        if self._cuda:
            _set_tf32(self.precision == "tf32")
            # The CPU only stacks and copies here; an OpenMP team per process would spin against
            # the worker's decoding threads for the same cores (measured on a 16-core GPU host).
            torch.set_num_threads(1)
        # channels_last, with its slow first passes (above), paid back only in tf32/half precision
        # at large batches (bench/RESULTS.md, "Memory format").
        self.channels_last = (
            self._cuda and self.precision != "float32" and (max_batch or 0) >= CHANNELS_LAST_MIN_BATCH
        )
        if self.channels_last:
            try:
                model = model.to(memory_format=torch.channels_last)
            except (RuntimeError, AttributeError, TypeError) as exc:  # some TorchScript modules refuse
                log.info("model stays in contiguous memory format: %s", exc)
                self.channels_last = False
        # ``model`` stays the eager module; on a CPU the forward pass may run its frozen form instead.
        self.model = model
        self._frozen: torch.nn.Module | None = None
        if freeze_cpu:
            self._freeze()

    def _freeze(self) -> None:
        """On a CPU, run forward passes through the model's frozen form, where it matches the eager model."""
        if self.device.type != "cpu":
            return
        self._frozen, why = freeze_for_cpu(self.model, self.data_config["input_size"])
        if self._frozen is None:
            log.warning("the model runs eagerly on the CPU (slower): %s", why)
        else:
            log.info("the model runs frozen by TorchScript in channels_last on the CPU: %s", why)

    @property
    def frozen(self) -> bool:
        """True when forward passes run the TorchScript-frozen form of the model (CPU only)."""
        return self._frozen is not None

    def __repr__(self) -> str:
        return (
            f"Detector({self.name} {self.version} on {self.device}, {self.precision}"
            f"{', frozen' if self.frozen else ''}, ai_index={self.ai_index})"
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Detector:
        """Load the configured checkpoint; raises CheckpointError (or ConfigError) saying what to fix."""
        device = resolve_device(settings.device)
        arch = _check_arch(settings.model_arch)
        spec = settings.checkpoint
        weights, config_path = _checkpoint_files(settings)
        config = _read_config(config_path) if config_path else {}
        where = config_path or weights
        _check_config(config, arch, where)
        labels = _labels_from_config(config, where)
        timm_model = _create_timm(arch, _cfg_overlay(config, where), _model_args(config, where))
        data_config = timm.data.resolve_data_config(model=timm_model)

        kind = _sniff(weights)
        loaded = _unwrap(
            _read_weights(weights, kind, allow_pickle=settings.model_allow_pickle, device=device), weights
        )
        if isinstance(loaded, torch.nn.Module):
            if kind != "torchscript":
                _check_module_arch(loaded, arch, weights)
            model = loaded  # timm_model served only to resolve the data config
        else:
            _load_state_dict(timm_model, _strip_prefixes(loaded), arch, weights)
            model = timm_model
        del loaded
        if labels is not None and len(labels) != NUM_CLASSES:
            raise CheckpointError(
                f"{where} names {len(labels)} labels; a detector has {NUM_CLASSES}: {labels}"
            )

        detector = cls(
            name=arch,
            version=_file_version(weights),
            model=model,
            data_config=data_config,
            device=device,
            ai_index=_pick_ai_index(settings, labels),
            labels=labels,
            source=spec,
            precision=settings.precision,
            max_batch=settings.batch_size,
        )
        detector._probe(weights)
        # After the probe: a model that cannot run at all fails with the probe's error, not a freezing warning.
        if settings.model_freeze_cpu:
            detector._freeze()
        detector.warm_up()
        log.info(
            "loaded %s %s from %s (%s) on %s; 'by AI' is output %d%s",
            arch,
            detector.version,
            spec,
            kind,
            device,
            detector.ai_index,
            f" ({labels[detector.ai_index]})" if labels else "",
        )
        return detector

    @classmethod
    def untrained_model(cls, settings: Settings, *, seed: int = 0) -> Detector:
        """Random weights, for the demo when no checkpoint can be had; its scores mean nothing."""
        device = resolve_device(settings.device)
        arch = _check_arch(settings.model_arch)
        # A private RNG stream: the caller's global seed state stays as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _create_timm(arch, {}, {})
        log.warning("using an UNTRAINED %s: random weights, scores mean nothing", arch)
        return cls(
            name=arch,
            version=UNTRAINED_VERSION,
            model=model,
            data_config=timm.data.resolve_data_config(model=model),
            device=device,
            ai_index=_pick_ai_index(settings, None),
            untrained=True,
            precision=settings.precision,
            freeze_cpu=settings.model_freeze_cpu,
        )

    def _probe(self, path: Path) -> None:
        """One forward pass on a blank image: a model that cannot score fails at start-up, not per image."""
        blank = torch.zeros(self.data_config["input_size"], device=self.device)
        try:
            with torch.inference_mode():
                logits = self._forward(blank.unsqueeze(0))
        except Exception as exc:  # noqa: BLE001 - a foreign module's forward may raise anything
            raise CheckpointError(f"model from {path} fails on a {list(blank.shape)} input: {exc}") from None
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape != (1, NUM_CLASSES):
            shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise CheckpointError(
                f"model from {path} returns {shape}; a detector must return [batch, {NUM_CLASSES}] logits."
            )

    def warm_up(self) -> None:
        """Run every padded batch size once, so that no image waits for a size's first pass."""
        if not self.buckets:
            return
        started = time.monotonic()
        blank = torch.zeros(self.data_config["input_size"], dtype=torch.uint8 if self.pixel_transform else torch.float32)
        for size in self.buckets:
            self.predict([blank] * size)
        log.info("ran batch sizes %s once in %.1fs", ",".join(map(str, self.buckets)), time.monotonic() - started)

    def _forward(self, x: torch.Tensor) -> Any:
        """The model on a float batch already on the device and normalised."""
        if self._frozen is not None:
            return self._frozen(x.contiguous(memory_format=torch.channels_last))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._amp_dtype is None:
            return self.model(x)
        with torch.autocast("cuda", dtype=self._amp_dtype):
            return self.model(x)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """``image`` as the model's CPU input: uint8 CxHxW pixels after timm's resize and crop.

        :meth:`normalise` (run by :meth:`predict`, batched, on the model's device)
        turns them into exactly what timm's eval transform gives. Where the data
        config cannot be split that way, this is the float tensor of the whole transform.
        """
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self.image_transform(image)  # type: ignore[no-any-return]

    @property
    def image_transform(self) -> Any:
        """What :meth:`preprocess` runs on an RGB image; picklable, for preparing processes."""
        return self.transform if self.pixel_transform is None else self.pixel_transform

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NxCxHxW pixels to the model's float input, in the reference transform's order of operations."""
        if x.dtype != torch.uint8:
            return x.float()
        if self._mean_std is None:
            raise ValueError("this detector's data config has no separate normalisation; pass float tensors")
        mean, std = (t.to(x.device) for t in self._mean_std)
        # On the CPU, the reference's own division; elsewhere a 0-d tensor built once (see __init__).
        scale = 255 if x.device.type == "cpu" else self._scale.to(x.device)
        return x.float().div_(scale).sub_(mean).div_(std)

    def predict(self, batch: Sequence[torch.Tensor]) -> list[float]:
        """p(synthetic) for each preprocessed image, in one forward pass."""
        if len(batch) == 0:
            return []
        shapes = {tuple(t.shape) for t in batch}
        dtypes = {t.dtype for t in batch}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3 or len(dtypes) != 1:
            raise ValueError(
                f"predict needs same-shaped CxHxW tensors of one dtype, got shapes {sorted(shapes)} "
                f"and dtypes {sorted(map(str, dtypes))}"
            )
        count = len(batch)
        size = next((b for b in self.buckets if b >= count), count)
        with torch.inference_mode(), self._staging_lock:
            x = self.normalise(self._to_device(batch, size))
            probs = self._forward(x).float().softmax(dim=-1)[:count, self.ai_index]
            return probs.cpu().tolist()

    def _to_device(self, batch: Sequence[torch.Tensor], size: int) -> torch.Tensor:
        """Stack the batch into ``size`` rows (zeros after it); on CUDA through a reused pinned buffer."""
        count = len(batch)
        shape = (size, *batch[0].shape)
        numel = size * batch[0].numel()
        dtype = batch[0].dtype
        if not self._cuda:
            staged = torch.empty(shape, dtype=dtype)
        else:
            if self._staging is None or self._staging.dtype != dtype or self._staging.numel() < numel:
                self._staging = torch.empty(numel, dtype=dtype, pin_memory=True)
            staged = self._staging[:numel].view(shape)
        torch.stack(list(batch), out=staged[:count])
        staged[count:].zero_()
        if not self._cuda:
            return staged
        # One asynchronous DMA. The caller holds the lock until the result is back on the host,
        # so the buffer is free again then.
        return staged.to(self.device, non_blocking=True)
