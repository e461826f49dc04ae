"""Detector: every checkpoint form, the refusals, versions, labels, preprocessing and parity.

Checkpoints are built from the conftest test model in temporary directories;
the hub is offline for the whole session, so nothing here downloads weights.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import timm.data
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.models import save_for_hf

from conftest import good_fixture_files, make_test_model
from worker.detector import UNTRAINED_VERSION, Detector, batch_buckets, resolve_checkpoint
from worker.errors import CheckpointError, ConfigError
from worker.imaging import decode_image
from worker.settings import Settings

ARCH = "tf_mobilenetv3_large_100"

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*:FutureWarning")


# ----------------------------------------------------------------------------- helpers and fixtures


def _state(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _write_config(folder: Path, **fields: object) -> None:
    config: dict[str, object] = {"architecture": ARCH, "num_classes": 2}
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))


def _hub_dir(model: torch.nn.Module, folder: Path, **fields: object) -> Path:
    """A directory laid out as the hub serves it: config.json + model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_state(model), str(folder / "model.safetensors"))
    _write_config(folder, **fields)
    return folder


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """A few RGB images of different sizes and content, so scores differ."""
    gen = torch.Generator().manual_seed(7)
    noise = (torch.rand(240, 320, 3, generator=gen) * 255).to(torch.uint8)
    across = torch.linspace(0, 255, 200).to(torch.uint8).expand(300, 200)
    down = torch.linspace(255, 0, 300).to(torch.uint8)[:, None].expand(300, 200)
    gradient = torch.stack([across, down, torch.full((300, 200), 90, dtype=torch.uint8)], -1)
    blocks = ((torch.arange(224)[:, None] // 28 + torch.arange(224)[None, :] // 28) % 2 * 255).to(torch.uint8)
    checker = torch.stack([blocks, 255 - blocks, blocks // 2], -1)
    solid = torch.full((150, 97, 3), 180, dtype=torch.uint8)
    return [Image.fromarray(t.contiguous().numpy(), "RGB") for t in (noise, gradient, checker, solid)]


@pytest.fixture(scope="module")
def transform(test_model: torch.nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    return timm.data.create_transform(**timm.data.resolve_data_config(model=test_model), is_training=False)


@pytest.fixture(scope="module")
def tensors(
    images: list[Image.Image], transform: Callable[[Image.Image], torch.Tensor]
) -> list[torch.Tensor]:
    return [transform(image) for image in images]


@pytest.fixture(scope="module")
def reference(test_model: torch.nn.Module, tensors: list[torch.Tensor]) -> torch.Tensor:
    """p(by AI) from the test model run directly, output 0 as in the reference pipeline."""
    with torch.inference_mode():
        return test_model(torch.stack(tensors)).softmax(-1)[:, 0]


@pytest.fixture(scope="module")
def detector(checkpoint: Path) -> Detector:
    """The test checkpoint loaded once for the read-only tests."""
    return Detector.from_settings(Settings(model_checkpoint=str(checkpoint), device="cpu"))


def _scores(detector: Detector, tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.tensor(detector.predict(tensors), dtype=torch.float32)


# ----------------------------------------------------------------------------- checkpoint forms


def _safetensors(model: torch.nn.Module, folder: Path) -> Path:
    save_file(_state(model), str(folder / "weights.safetensors"))
    return folder / "weights.safetensors"


def _safetensors_named_pt(model: torch.nn.Module, folder: Path) -> Path:
    # The form is read from the bytes, not the name.
    save_file(_state(model), str(folder / "weights.pt"))
    return folder / "weights.pt"


def _pt_state_dict(model: torch.nn.Module, folder: Path) -> Path:
    torch.save(model.state_dict(), folder / "weights.pt")
    return folder / "weights.pt"


def _pth_state_dict_dataparallel(model: torch.nn.Module, folder: Path) -> Path:
    torch.save({"state_dict": _state(model, "module."), "epoch": 7, "best_acc": 0.9}, folder / "ckpt.pth")
    return folder / "ckpt.pth"


def _bin_under_model(model: torch.nn.Module, folder: Path) -> Path:
    torch.save({"model": _state(model), "optimizer": {"lr": 0.01}}, folder / "export.bin")
    return folder / "export.bin"


def _ckpt_compiled(model: torch.nn.Module, folder: Path) -> Path:
    torch.save({"model_state_dict": _state(model, "_orig_mod.")}, folder / "compiled.ckpt")
    return folder / "compiled.ckpt"


def _compiled_in_dataparallel(model: torch.nn.Module, folder: Path) -> Path:
    torch.save(_state(model, "module._orig_mod."), folder / "both.pt")
    return folder / "both.pt"


def _torchscript_traced(model: torch.nn.Module, folder: Path) -> Path:
    traced = torch.jit.trace(model, torch.zeros(1, 3, 224, 224))
    torch.jit.save(traced, str(folder / "traced.pt"))
    return folder / "traced.pt"


def _pickled_module(model: torch.nn.Module, folder: Path) -> Path:
    torch.save(model, folder / "whole.pt")
    return folder / "whole.pt"


def _hub_style_directory(model: torch.nn.Module, folder: Path) -> Path:
    # timm's own export: config.json in the hub format next to model.safetensors.
    save_for_hf(
        model, str(folder), model_config={"label_names": ["by AI", "by human"]}, safe_serialization=True
    )
    return folder


def _directory_with_bin(model: torch.nn.Module, folder: Path) -> Path:
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


FORMS = {
    "safetensors": _safetensors,
    "safetensors-named-pt": _safetensors_named_pt,
    "pt-state-dict": _pt_state_dict,
    "pth-state_dict-module-prefix": _pth_state_dict_dataparallel,
    "bin-under-model": _bin_under_model,
    "ckpt-model_state_dict-orig_mod": _ckpt_compiled,
    "module-and-orig_mod": _compiled_in_dataparallel,
    "torchscript-trace": _torchscript_traced,
    "pickled-module": _pickled_module,
    "hub-directory": _hub_style_directory,
    "directory-pytorch_model-bin": _directory_with_bin,
}


@pytest.mark.parametrize("form", FORMS)
def test_every_form_loads_and_scores_like_the_model(
    form: str, test_model, tmp_path: Path, settings_factory, tensors, reference
) -> None:
    spec = FORMS[form](test_model, tmp_path)
    settings = settings_factory(model_checkpoint=str(spec), model_allow_pickle=form == "pickled-module")
    detector = Detector.from_settings(settings)

    assert detector.name == ARCH and not detector.untrained
    assert detector.device == torch.device("cpu") and not detector.model.training
    assert detector.ai_index == 0
    # On a CPU every module runs frozen; a TorchScript archive runs as it was saved.
    assert detector.frozen == (form != "torchscript-trace")
    torch.testing.assert_close(_scores(detector, tensors), reference, atol=1e-6, rtol=0)


def test_hub_directory_reads_labels(test_model, tmp_path: Path, settings_factory) -> None:
    detector = Detector.from_settings(
        settings_factory(model_checkpoint=str(_hub_style_directory(test_model, tmp_path)))
    )
    assert detector.labels == ("by AI", "by human")
    assert detector.ai_index == 0


# ----------------------------------------------------------------------------- pickles


def test_pickled_module_needs_opt_in(test_model, tmp_path: Path, settings_factory) -> None:
    path = _pickled_module(test_model, tmp_path)
    with pytest.raises(CheckpointError) as info:
        Detector.from_settings(settings_factory(model_checkpoint=str(path)))
    message = info.value.message
    assert "SYNTHGUARD_MODEL_ALLOW_PICKLE" in message and "pickled" in message and "code" in message


class _Planted:
    """Unpickling this creates a directory: the stand-in for an attacker's code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.mkdir, (str(self.marker),))


def _save_torch(obj: object, path: Path) -> None:
    torch.save(obj, path)


def _save_plain_pickle(obj: object, path: Path) -> None:
    with path.open("wb") as handle:
        pickle.dump(obj, handle)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("write", [_save_torch, _save_plain_pickle], ids=["torch.save", "pickle.dump"])
def test_pickle_code_does_not_run_without_opt_in(write, tmp_path: Path, settings_factory) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "innocent.pt"
    write(_Planted(marker), path)

    with pytest.raises(CheckpointError, match="SYNTHGUARD_MODEL_ALLOW_PICKLE"):
        Detector.from_settings(settings_factory(model_checkpoint=str(path)))
    assert not marker.exists()

    # The control: with the opt-in the same file does run its code, so the check above means something.
    # (What it then yields is no model, so loading still fails.)
    with pytest.raises(CheckpointError):
        Detector.from_settings(settings_factory(model_checkpoint=str(path), model_allow_pickle=True))
    assert marker.exists()


# ----------------------------------------------------------------------------- locating checkpoints


def test_hub_offline_says_what_to_set() -> None:
    for spec in ("hf://some/repo", "hf://some/repo/model.safetensors"):
        with pytest.raises(CheckpointError) as info:
            resolve_checkpoint(spec)
        assert "SYNTHGUARD_MODEL_CHECKPOINT" in info.value.message
        assert "could not be reached" in info.value.message


def test_hub_offline_through_settings(settings_factory) -> None:
    with pytest.raises(CheckpointError, match="SYNTHGUARD_MODEL_CHECKPOINT"):
        Detector.from_settings(settings_factory(model_checkpoint="hf://some/repo"))


def test_default_checkpoint_is_the_published_one_and_offline_fails_cleanly(settings_factory) -> None:
    settings = settings_factory(model_checkpoint=None)
    assert settings.checkpoint_is_default
    with pytest.raises(CheckpointError, match=re.escape("Sumsub/Sumsub-ffs-synthetic-1.0_mj_5")):
        Detector.from_settings(settings)


def _fake_hub_cache(root: Path, repo: str, files: dict[str, Path | str]) -> Path:
    """A huggingface_hub cache holding one snapshot of ``repo``, as a download would leave it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for name, content in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        else:
            target.write_text(content)
    return snapshot


def test_hub_spec_served_from_the_cache_when_offline(checkpoint: Path, tmp_path: Path) -> None:
    config = json.dumps({"architecture": ARCH, "num_classes": 2})
    snapshot = _fake_hub_cache(
        tmp_path, "acme/ffs", {"config.json": config, "model.safetensors": checkpoint, "sub/w.pt": checkpoint}
    )
    assert resolve_checkpoint("hf://acme/ffs", cache_dir=tmp_path) == snapshot
    assert resolve_checkpoint("hf://acme/ffs/sub/w.pt", cache_dir=tmp_path) == snapshot / "sub" / "w.pt"


def test_hub_falls_back_to_pytorch_model_bin(checkpoint: Path, tmp_path: Path) -> None:
    # No config.json either: it is optional.
    snapshot = _fake_hub_cache(tmp_path, "acme/old", {"pytorch_model.bin": checkpoint})
    assert resolve_checkpoint("hf://acme/old", cache_dir=tmp_path) == snapshot


@pytest.mark.parametrize("spec", ["hf://only-owner", "hf://", "hf://bad owner/re po"])
def test_malformed_hub_spec(spec: str) -> None:
    with pytest.raises(CheckpointError, match="SYNTHGUARD_MODEL_CHECKPOINT"):
        resolve_checkpoint(spec)


def test_missing_local_path(tmp_path: Path, settings_factory) -> None:
    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(CheckpointError) as info:
        Detector.from_settings(settings_factory(model_checkpoint=str(missing)))
    assert str(missing) in info.value.message and "SYNTHGUARD_MODEL_CHECKPOINT" in info.value.message


def test_local_path_is_returned_as_is(checkpoint: Path) -> None:
    assert resolve_checkpoint(str(checkpoint)) == checkpoint
    assert resolve_checkpoint(str(checkpoint.parent)) == checkpoint.parent


def test_directory_with_several_weight_files(checkpoint: Path, tmp_path: Path, settings_factory) -> None:
    shutil.copyfile(checkpoint, tmp_path / "a.safetensors")
    shutil.copyfile(checkpoint, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match=r"a\.safetensors, b\.pt"):
        Detector.from_settings(settings_factory(model_checkpoint=str(tmp_path)))


def test_directory_prefers_model_safetensors(checkpoint: Path, tmp_path: Path, settings_factory) -> None:
    shutil.copyfile(checkpoint, tmp_path / "model.safetensors")
    (tmp_path / "notes.pt").write_bytes(b"not weights")
    detector = Detector.from_settings(settings_factory(model_checkpoint=str(tmp_path)))
    assert detector.version == Detector.from_settings(settings_factory()).version


def test_directory_without_weights(tmp_path: Path, settings_factory) -> None:
    _write_config(tmp_path)
    with pytest.raises(CheckpointError, match="no weight file"):
        Detector.from_settings(settings_factory(model_checkpoint=str(tmp_path)))


@pytest.mark.parametrize(
    "content", [b"", b"\x00garbage" * 100, b"PK\x03\x04 truncated zip"], ids=["empty", "junk", "zip"]
)
def test_unreadable_file(content: bytes, tmp_path: Path, settings_factory) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path)):
        Detector.from_settings(settings_factory(model_checkpoint=str(path)))


# ----------------------------------------------------------------------------- mismatches


def test_wrong_arch_is_summarised(settings_factory) -> None:
    with pytest.raises(CheckpointError) as info:
        Detector.from_settings(settings_factory(model_arch="resnet18"))
    message = info.value.message
    assert "SYNTHGUARD_MODEL_ARCH" in message and "missing keys" in message and "unexpected keys" in message
    assert len(message) < 2000  # a summary, not torch's list of every key


def test_wrong_class_count(test_model, tmp_path: Path, settings_factory) -> None:
    state = _state(test_model)
    state["classifier.weight"] = torch.zeros(3, state["classifier.weight"].shape[1])
    state["classifier.bias"] = torch.zeros(3)
    save_file(state, str(tmp_path / "three.safetensors"))
    with pytest.raises(CheckpointError, match=r"classifier\.weight \[3, 1280\] here, \[2, 1280\] expected"):
        Detector.from_settings(settings_factory(model_checkpoint=str(tmp_path / "three.safetensors")))


def test_config_architecture_mismatch(test_model, tmp_path: Path, settings_factory) -> None:
    folder = _hub_dir(test_model, tmp_path, architecture="resnet18")
    with pytest.raises(CheckpointError, match=r"resnet18.*SYNTHGUARD_MODEL_ARCH"):
        Detector.from_settings(settings_factory(model_checkpoint=str(folder)))


def test_unknown_arch_is_a_config_error(settings_factory) -> None:
    with pytest.raises(ConfigError, match="SYNTHGUARD_MODEL_ARCH") as info:
        Detector.from_settings(settings_factory(model_arch="no_such_net"))
    assert not isinstance(info.value, CheckpointError)


# ----------------------------------------------------------------------------- versions


def test_version_follows_the_bytes(
    detector: Detector, checkpoint: Path, tmp_path: Path, settings_factory
) -> None:
    assert detector.version.startswith("sha256:") and len(detector.version) == len("sha256:") + 12
    copy = tmp_path / "elsewhere" / "renamed.safetensors"
    copy.parent.mkdir()
    shutil.copyfile(checkpoint, copy)
    assert Detector.from_settings(settings_factory(model_checkpoint=str(copy))).version == detector.version

    other = _safetensors(make_test_model(seed=99), tmp_path)
    assert Detector.from_settings(settings_factory(model_checkpoint=str(other))).version != detector.version


def test_untrained_model(settings_factory, tensors) -> None:
    rng_before = torch.get_rng_state()
    detector = Detector.untrained_model(settings_factory(), seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert detector.version == UNTRAINED_VERSION and detector.untrained
    assert detector.name == ARCH and detector.labels is None
    scores = detector.predict(tensors)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores == Detector.untrained_model(settings_factory(), seed=3).predict(tensors)


# ----------------------------------------------------------------------------- which output is "by AI"


def test_ai_index_setting_flips_the_scores(settings_factory, tensors, reference) -> None:
    detector = Detector.from_settings(settings_factory(model_ai_index=1))
    assert detector.ai_index == 1
    torch.testing.assert_close(_scores(detector, tensors), 1 - reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"label_names": ["real", "fake"]}, 1),
        ({"label_names": ["By AI", "by human"]}, 0),
        ({"id2label": {"1": "AI_generated", "0": "Human"}}, 0),
        ({"id2label": {"0": "human", "1": "Synthetic"}}, 1),
        ({"pretrained_cfg": {"label_names": ["natural", "generated"]}}, 1),
        ({"label_names": ["fake", "synthetic"]}, 0),  # ambiguous: the reference order
        ({"label_names": ["cat", "dog"]}, 0),
    ],
)
def test_ai_index_from_label_names(
    fields, expected: int, test_model, tmp_path: Path, settings_factory
) -> None:
    folder = _hub_dir(test_model, tmp_path, **fields)
    detector = Detector.from_settings(settings_factory(model_checkpoint=str(folder)))
    assert detector.ai_index == expected


def test_labels_real_fake_give_index_one_scores(
    test_model, tmp_path: Path, settings_factory, tensors, reference
):
    folder = _hub_dir(test_model, tmp_path, label_names=["real", "fake"])
    detector = Detector.from_settings(settings_factory(model_checkpoint=str(folder)))
    assert detector.labels == ("real", "fake") and detector.ai_index == 1
    torch.testing.assert_close(_scores(detector, tensors), 1 - reference, atol=1e-6, rtol=0)


def test_setting_beats_labels(test_model, tmp_path: Path, settings_factory) -> None:
    folder = _hub_dir(test_model, tmp_path, label_names=["real", "fake"])
    assert (
        Detector.from_settings(settings_factory(model_checkpoint=str(folder), model_ai_index=0)).ai_index == 0
    )


def test_ai_index_out_of_range(settings_factory) -> None:
    with pytest.raises(CheckpointError, match="SYNTHGUARD_MODEL_AI_INDEX"):
        Detector.from_settings(settings_factory(model_ai_index=2))


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_is_timms_eval_transform(detector: Detector, images, tensors) -> None:
    """uint8 pixels on the CPU, normalised batched on the device: bit for bit timm's float transform."""
    assert detector.data_config["input_size"] == (3, 224, 224)
    pixels = [detector.preprocess(image) for image in images]
    for out in pixels:
        assert out.device.type == "cpu" and out.dtype == torch.uint8 and out.shape == (3, 224, 224)
    model_input = detector.normalise(torch.stack(pixels))
    assert model_input.dtype == torch.float32
    assert torch.equal(model_input, torch.stack(tensors))


def test_uint8_and_float_inputs_score_alike(detector: Detector, images, tensors) -> None:
    assert detector.predict([detector.preprocess(image) for image in images]) == detector.predict(tensors)
    with pytest.raises(ValueError, match="one dtype"):
        detector.predict([detector.preprocess(images[0]), tensors[0]])


def test_batch_buckets() -> None:
    assert batch_buckets(1) == (1,)
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert batch_buckets(20) == (1, 2, 4, 8, 16, 20)


def test_padded_batches_score_like_exact_ones(detector: Detector, test_model, images, tensors) -> None:
    """What a CUDA detector does: pad each batch to a few sizes; scores of the real rows do not change."""
    padded = Detector(
        name=ARCH,
        version=detector.version,
        model=test_model,
        data_config=detector.data_config,
        device=torch.device("cpu"),
        max_batch=8,
        pad_batches=True,
    )
    assert padded.buckets == (1, 2, 4, 8)
    forwards: list[int] = []
    hook = padded.model.register_forward_pre_hook(lambda _m, args: forwards.append(len(args[0])))
    try:
        padded.warm_up()
        assert forwards == [1, 2, 4, 8]
        pixels = [padded.preprocess(image) for image in images[:3]]
        expected = torch.tensor(detector.predict(pixels))
        got = torch.tensor(padded.predict(pixels))
        assert forwards[-1] == 4 and len(got) == 3
        assert torch.allclose(got, expected, atol=1e-6, rtol=0)
        # Larger than the largest size: run as it is.
        assert len(padded.predict(pixels * 4)) == 12 and forwards[-1] == 12
    finally:
        hook.remove()
    assert not Detector.from_settings(Settings(model_checkpoint=str(detector.source), device="cpu")).buckets


def test_frozen_cpu_model_scores_the_fixtures_like_the_eager_one(checkpoint: Path, settings_factory) -> None:
    frozen = Detector.from_settings(settings_factory(model_checkpoint=str(checkpoint)))
    eager = Detector.from_settings(settings_factory(model_checkpoint=str(checkpoint), model_freeze_cpu=False))
    assert frozen.frozen and not eager.frozen
    pixels = [
        frozen.preprocess(decode_image(path.read_bytes(), max_pixels=100_000_000).image)
        for path in good_fixture_files()
    ]
    assert len(pixels) >= 15
    want = torch.tensor(eager.predict(pixels))
    for size in (1, 5, len(pixels)):  # batch sizes it was not traced at, too
        got = torch.tensor([s for i in range(0, len(pixels), size) for s in frozen.predict(pixels[i : i + size])])
        assert float((got - want).abs().max()) <= 1e-5, size
    assert float(want.max() - want.min()) > 1e-2  # the fixtures really score differently


class _BatchSizeBranch(torch.nn.Module):
    """Answers differently for one image than for several: a trace at batch 1 keeps only that branch."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(x.mean((2, 3)))
        return logits if x.shape[0] == 1 else -logits


def test_a_model_its_trace_misrepresents_runs_eagerly(detector: Detector, tensors, caplog) -> None:
    model = _BatchSizeBranch().eval()
    with caplog.at_level("WARNING", logger="worker.detector"):
        guarded = Detector(
            name="branchy",
            version="v",
            model=model,
            data_config=detector.data_config,
            device=torch.device("cpu"),
            freeze_cpu=True,
        )
    assert not guarded.frozen
    assert "runs eagerly" in caplog.text and "moves probabilities" in caplog.text
    with torch.inference_mode():
        want = model(torch.stack(tensors)).softmax(-1)[:, 0]
    torch.testing.assert_close(_scores(guarded, tensors), want, atol=1e-6, rtol=0)


def test_float_precision_only_on_cpu(settings_factory) -> None:
    assert Detector.from_settings(settings_factory(precision="auto")).precision == "float32"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        Detector.from_settings(settings_factory(precision="float16"))


def test_preprocess_converts_to_rgb(detector: Detector, images) -> None:
    gray = images[0].convert("L")
    out = detector.preprocess(gray)
    assert out.shape == (3, 224, 224)
    assert torch.equal(out, detector.preprocess(gray.convert("RGB")))


def test_data_config_follows_the_checkpoint(test_model, tmp_path: Path, settings_factory, images) -> None:
    folder = _hub_dir(test_model, tmp_path, pretrained_cfg={"input_size": [3, 256, 256], "crop_pct": 1.0})
    detector = Detector.from_settings(settings_factory(model_checkpoint=str(folder)))
    assert detector.data_config["input_size"] == (3, 256, 256) and detector.data_config["crop_pct"] == 1.0
    assert detector.preprocess(images[0]).shape == (3, 256, 256)
    assert len(detector.predict([detector.preprocess(image) for image in images])) == len(images)


def test_data_config_for_torchscript_follows_config(
    test_model, tmp_path: Path, settings_factory, images
) -> None:
    _torchscript_traced(test_model, tmp_path)
    _write_config(tmp_path, pretrained_cfg={"input_size": [3, 256, 256], "crop_pct": 1.0})
    detector = Detector.from_settings(settings_factory(model_checkpoint=str(tmp_path / "traced.pt")))
    assert detector.preprocess(images[0]).shape == (3, 256, 256)


# ----------------------------------------------------------------------------- prediction


def test_batch_equals_one_by_one_and_the_plain_reference(detector: Detector, test_model, images, transform):
    batch = [detector.preprocess(image) for image in images]
    together = detector.predict(batch)
    alone = [detector.predict([t])[0] for t in batch]
    assert together == pytest.approx(alone, abs=1e-5)
    with torch.inference_mode():
        plain = [float(test_model(transform(img).unsqueeze(0)).softmax(-1)[0, 0]) for img in images]
    assert together == pytest.approx(plain, abs=1e-5)
    assert max(together) - min(together) > 1e-3  # the images really score differently


def test_predict_edge_cases(detector: Detector, tensors) -> None:
    assert detector.predict([]) == []
    scores = detector.predict(tuple(tensors[:1]))
    assert isinstance(scores, list) and isinstance(scores[0], float)
    with pytest.raises(ValueError, match="same-shaped"):
        detector.predict([tensors[0], torch.zeros(3, 256, 256)])


# ----------------------------------------------------------------------------- device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is missing")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_config_error(device: str, settings_factory) -> None:
    with pytest.raises(ConfigError, match="SYNTHGUARD_DEVICE"):
        Detector.from_settings(settings_factory(device=device))
    with pytest.raises(ConfigError, match="SYNTHGUARD_DEVICE"):
        Detector.untrained_model(settings_factory(device=device))


def test_auto_device(settings_factory) -> None:
    detector = Detector.untrained_model(settings_factory(device="auto"))
    assert detector.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
