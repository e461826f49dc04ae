"""Attribution: which generator made an image, named from the provenance evidence its file carries.

Every case reads a file through the real provenance readers (made here, or a
fixture of either layer) and names it with ``worker.attribution.attribute``;
the scorer stores the name in ``images.generator``, and the API, the
``image.flagged`` payload and ``synthguard results`` show it.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from corpus import COMFYUI, IPTC, _created, _Signer, encode, photo
from PIL import Image
from sqlalchemy import select
from test_provenance import A1111_TEXT, embed, gradient, png_with_text, read_bytes, read_file, with_xmp

from conftest import cli_env
from worker.attribution import Generator, attribute
from worker.cli import main
from worker.clients import create_client
from worker.db import get_sessionmaker
from worker.detector import Detector
from worker.intake import create_scan
from worker.models import DONE, WebhookDelivery
from worker.models import Image as ImageRow
from worker.scoring import Scorer
from worker.storage import ObjectRef

# The model each generated fixture's ComfyUI graph loads, in the vocabulary.
EXPECTED_MODELS = {
    "aura_flow_0.2_example.png": "AuraFlow",
    "flux_dev_example.png": "FLUX.1 [dev]",
    "hidream_dev_example.png": "HiDream-I1",
    "lora.png": "Stable Diffusion 1.5",
    "qwen_image_basic_example.png": "Qwen-Image",
    "sd3.5_simple_example.png": "Stable Diffusion 3.5",
    "sdxl_simple_example.png": "Stable Diffusion XL",
    "sdxlturbo_example.png": "SDXL Turbo",
}


def _named(data: bytes) -> Generator | None:
    return attribute(read_bytes(data).to_json())


def _xmp(*, creator_tool: str | None = None, credit: str | None = None, source_type: str | None = None) -> bytes:
    attributes = "".join(
        f' {name}="{value}"'
        for name, value in (
            ("xmp:CreatorTool", creator_tool),
            ("photoshop:Credit", credit),
            ("Iptc4xmpExt:DigitalSourceType", source_type and IPTC + source_type),
        )
        if value
    )
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
        'xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/" '
        f'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"{attributes}/>'
        '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()


def test_the_fixture_table_covers_every_generated_fixture() -> None:
    assert set(EXPECTED_MODELS) == set(COMFYUI)


@pytest.mark.parametrize("name", sorted(EXPECTED_MODELS))
def test_every_generated_fixture_names_its_model(fixtures_dir: Path, name: str) -> None:
    found = attribute(read_file(fixtures_dir / "generated" / name).to_json())
    loader = COMFYUI[name][2][0][2]  # the first loader's inputs: the weights the graph names first
    assert found == Generator(
        name=EXPECTED_MODELS[name],
        tool="ComfyUI",
        model=EXPECTED_MODELS[name],
        signal="generation_params",
        raw=next(iter(loader.values())),
    )


def test_real_format_and_c2pa_fixtures_name_no_generator(fixtures_dir: Path) -> None:
    files = [p for folder in ("real", "formats", "c2pa") for p in sorted((fixtures_dir / folder).iterdir())]
    files = [p for p in files if not p.name.startswith("LICENSE")]
    assert len(files) >= 16
    for path in files:
        assert attribute(read_file(path).to_json()) is None, path.name


def test_a_signed_ai_manifest_names_its_software_agent_first(corpus_dir: Path) -> None:
    trained = attribute(read_file(corpus_dir / "c2pa-ai" / "trained.jpg").to_json())
    assert trained == Generator("ImageGen 2", None, None, "c2pa", "ImageGen 2")  # not in the vocabulary: as written
    # Firefly in the manifest, something else in XMP: the signed manifest wins, normalised.
    jpeg = encode(photo(320, 240, 5), "JPEG", xmp=_xmp(creator_tool="Midjourney", source_type="trainedAlgorithmicMedia"))
    signed = _Signer().sign(jpeg, ("Adobe Firefly", "3"), _created("trainedAlgorithmicMedia", "Adobe Firefly Image 3"))
    found = _named(signed)
    assert found is not None and (found.name, found.tool, found.signal) == ("Adobe Firefly", "Adobe Firefly", "c2pa")
    assert found.raw == "Adobe Firefly Image 3"


def test_generation_parameters_name_tool_and_model() -> None:
    a1111 = _named(png_with_text(("parameters", A1111_TEXT.replace("Model: foo", "Model: sd_xl_base_1.0"))))
    assert a1111 == Generator(
        "Stable Diffusion XL", "AUTOMATIC1111", "Stable Diffusion XL", "generation_params", "sd_xl_base_1.0"
    )
    unknown = _named(png_with_text(("parameters", A1111_TEXT)))  # "Model: foo": a checkpoint nobody knows
    assert unknown == Generator("AUTOMATIC1111", "AUTOMATIC1111", None, "generation_params", "foo")
    novelai = _named(
        png_with_text(
            ("Software", "NovelAI"),
            ("Source", "NovelAI Diffusion V4.5 4BDE2A90"),
            ("Comment", json.dumps({"prompt": "a city", "steps": 28, "scale": 5.0, "seed": 42, "sampler": "k_euler"})),
        )
    )
    assert novelai is not None and (novelai.tool, novelai.model) == ("NovelAI", "NovelAI Diffusion")


def test_xmp_names_a_generator_only_where_it_declares_ai_or_names_a_known_one() -> None:
    google = _named(with_xmp("jpeg", _xmp(credit="Made with Google AI", source_type="trainedAlgorithmicMedia")))
    assert google == Generator("Google Imagen", "Google Imagen", None, "iptc_xmp", "Made with Google AI")
    named = _named(with_xmp("png", _xmp(creator_tool="Midjourney")))
    assert named is not None and (named.tool, named.signal) == ("Midjourney", "iptc_xmp")
    # An editor's name in a file that declares nothing says nothing about a generator.
    assert _named(with_xmp("jpeg", _xmp(creator_tool="Adobe Photoshop 25.0 (Windows)"))) is None
    assert _named(with_xmp("webp", _xmp(creator_tool="Camera App", source_type="digitalCapture"))) is None


def test_the_sd_watermark_names_its_family(corpus_dir: Path) -> None:
    pixels = np.asarray(Image.open(corpus_dir / "generated" / "sdxl_simple_example.png").convert("RGB"))
    marked = embed(pixels, np.unpackbits(np.frombuffer(b"SDV2", np.uint8)).tolist(), as_bgr=True)
    found = _named(encode(Image.fromarray(marked), "PNG"))  # re-encoded: the ComfyUI chunks are gone
    assert found == Generator("Stable Diffusion 2.x", None, "Stable Diffusion 2.x", "sd_watermark", "SDV2")


@pytest.mark.parametrize(
    ("written", "model", "tool"),
    [
        ("sd_xl_base_1.0.safetensors", "Stable Diffusion XL", None),
        ("sd_xl_turbo_1.0_fp16.safetensors", "SDXL Turbo", None),
        ("v1-5-pruned-emaonly.ckpt", "Stable Diffusion 1.5", None),
        ("sd-v1-4.ckpt", "Stable Diffusion 1.x", None),
        ("v2-1_768-ema-pruned.safetensors", "Stable Diffusion 2.x", None),
        ("sd3_medium_incl_clips.safetensors", "Stable Diffusion 3", None),
        ("FLUX.1 [schnell]", "FLUX.1 [schnell]", None),
        ("flux1-dev-fp8.safetensors", "FLUX.1 [dev]", None),
        ("Adobe Firefly Image 3", None, "Adobe Firefly"),
        ("Made with Google AI", None, "Google Imagen"),
        ("niji journey v6", None, "Midjourney"),
        ("juggernautXL_v9.safetensors", None, None),  # a fine-tune the vocabulary does not know
        ("Imagenomic Portraiture 3", None, None),  # an editor plug-in, not Imagen
        ("Influx Studio", None, None),
    ],
)
def test_names_are_normalised_to_one_vocabulary(written: str, model: str | None, tool: str | None) -> None:
    provenance = {"signals": {"c2pa": {"found": True, "ai": True, "strength": "strong", "evidence": {"tool": written}}}}
    found = attribute(provenance)
    assert found is not None and (found.model, found.tool, found.raw) == (model, tool, written)
    assert found.name == (model or tool or written)


def test_no_evidence_names_nothing() -> None:
    assert _named(encode(gradient(), "PNG")) is None
    assert attribute(None) is None and attribute({"signals": "garbled"}) is None


# ------------------------------------------------------------------- through the service


def test_the_generator_is_stored_shown_and_sent(
    settings_factory, pg_url, s3_endpoint, s3_client, bucket, corpus_dir, api, service_settings
) -> None:
    data = (corpus_dir / "generated" / "sdxl_simple_example.png").read_bytes()
    s3_client.put_object(Bucket=bucket, Key="gen/sdxl.png", Body=data)
    s3_client.put_object(Bucket=bucket, Key="gen/plain.jpg", Body=encode(photo(320, 240, 6), "JPEG"))
    sessions = get_sessionmaker(pg_url)
    with sessions.begin() as session:
        client = create_client(
            session, f"attrib-{uuid.uuid4().hex[:6]}", all_buckets=True, webhook_url="https://hooks.example/x"
        )
        refs = [ObjectRef(bucket, "gen/sdxl.png"), ObjectRef(bucket, "gen/plain.jpg")]
        _, (generated_id, plain_id) = create_scan(session, refs, origin="api", threshold=1.0, client_id=client.client.id)
    settings = settings_factory(database_url=pg_url, s3_endpoint_url=s3_endpoint)
    with Scorer(settings, Detector.from_settings(settings), sessions=sessions) as scorer:
        for image_id in (generated_id, plain_id):
            assert scorer.process_image(image_id).state == DONE

    headers = {"Authorization": f"Bearer {client.api_key}"}
    shown = api.get(f"/v1/images/{generated_id}", headers=headers).json()
    assert shown["generator"] == {
        "name": "Stable Diffusion XL",
        "tool": "ComfyUI",
        "model": "Stable Diffusion XL",
        "signal": "generation_params",
        "raw": "sd_xl_base_1.0.safetensors",
    }
    assert api.get(f"/v1/images/{plain_id}", headers=headers).json()["generator"] is None
    # Flagged by its provenance, whatever the threshold: the webhook names the generator too.
    with sessions() as session:
        delivery = session.scalar(select(WebhookDelivery).where(WebhookDelivery.image_id == generated_id))
        assert session.get(ImageRow, generated_id).flagged_by == ["provenance"]
    assert delivery is not None and delivery.payload["data"]["generator"] == shown["generator"]


def test_results_show_the_generator(tmp_path: Path, checkpoint: Path, corpus_dir: Path) -> None:
    env = cli_env(tmp_path, checkpoint, "attrib")
    source = corpus_dir / "generated" / "flux_dev_example.png"
    scanned = CliRunner().invoke(main, ["scan", str(source), "--json"], env=env)
    assert scanned.exit_code == 0, scanned.output
    (image,) = json.loads(scanned.stdout)["images"]
    assert (image["generator"]["name"], image["generator"]["raw"]) == ("FLUX.1 [dev]", "flux1-dev.safetensors")
    table = CliRunner().invoke(main, ["results"], env=env)
    assert "FLUX.1 [dev] (ComfyUI) [generation_params]" in table.output, table.output
