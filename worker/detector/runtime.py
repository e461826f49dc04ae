"""Where and how the model runs: device, precision, batch-size buckets, the CPU freeze, and the
split of timm's eval transform into a CPU part (uint8 pixels) and a device part (scale, normalise)."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import timm.data
import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)


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
