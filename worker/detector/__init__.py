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

``checkpoint.py`` finds and reads checkpoints, ``runtime.py`` decides device, precision,
batch buckets and the CPU freeze, ``model.py`` holds the :class:`Detector`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .checkpoint import UNTRAINED_VERSION, checkpoint_version, resolve_checkpoint

if TYPE_CHECKING:
    from .model import Detector
    from .runtime import (
        CHANNELS_LAST_MIN_BATCH,
        CUDA_AUTO_PRECISION,
        batch_buckets,
        freeze_for_cpu,
        resolve_device,
        resolve_precision,
    )

# The model and its runtime need torch and timm, imported on first use: producers and the API
# import this package only for the checkpoint's version, and run without the model stack.
_LAZY = {
    "Detector": ".model",
    "CHANNELS_LAST_MIN_BATCH": ".runtime",
    "CUDA_AUTO_PRECISION": ".runtime",
    "batch_buckets": ".runtime",
    "freeze_for_cpu": ".runtime",
    "resolve_device": ".runtime",
    "resolve_precision": ".runtime",
}

__all__ = [
    "CHANNELS_LAST_MIN_BATCH",
    "CUDA_AUTO_PRECISION",
    "UNTRAINED_VERSION",
    "Detector",
    "batch_buckets",
    "checkpoint_version",
    "freeze_for_cpu",
    "resolve_checkpoint",
    "resolve_device",
    "resolve_precision",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
