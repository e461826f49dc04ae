"""The :class:`Detector`: a timm model built from a checkpoint, its labels, and batched scoring."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import timm.data
import torch
from PIL import Image
from timm.models import get_arch_name

from ..errors import CheckpointError, ConfigError
from ..settings import Settings
from .checkpoint import (
    _AI_LABELS,
    NUM_CLASSES,
    UNTRAINED_VERSION,
    _cfg_overlay,
    _check_config,
    _checkpoint_files,
    _file_version,
    _labels_from_config,
    _load_state_dict,
    _model_args,
    _read_config,
    _read_weights,
    _sniff,
    _strip_prefixes,
    _unwrap,
)
from .runtime import (
    _AUTOCAST,
    CHANNELS_LAST_MIN_BATCH,
    _set_tf32,
    _split_transform,
    batch_buckets,
    freeze_for_cpu,
    resolve_device,
    resolve_precision,
)

log = logging.getLogger(__name__)


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
        if self._cuda and any(t.device.type == "cuda" for t in batch):
            # JPEGs decoded on the device (worker.device_decode) are there already; the rest follow them.
            staged = torch.zeros(shape, dtype=dtype, device=self.device)
            torch.stack([t.to(self.device) for t in batch], out=staged[:count])
            return staged
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
