"""Provenance signals: real generator and C2PA files, and files the tests make.

Nothing here needs PostgreSQL, Redis or S3. The watermark tests embed with the
invisible-watermark package itself (test-only dependency), so that the reader
is checked against the encoder Stable Diffusion uses, not against a copy.
"""

from __future__ import annotations

import io
import json
import math
import socket
import struct
import threading
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from corpus import encode, png_chunk
from PIL import Image, PngImagePlugin

from conftest import CORPUS, LAYERS, fixture_id
from worker import provenance
from worker.imaging import decode_image, sniff_format
from worker.provenance import (
    Findings,
    c2pa,
    read_provenance,
    watermark,
)
from worker.provenance._base import MAX_TEXT_BYTES, Budget

MAX_PIXELS = 100_000_000
IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"

# The model each ComfyUI example's prompt graph loads (first checkpoint or UNet loader).
GENERATED_MODELS = {
    "aura_flow_0.2_example.png": "aura_flow_0.2.safetensors",
    "flux_dev_example.png": "flux1-dev.safetensors",
    "hidream_dev_example.png": "hidream_i1_dev_bf16.safetensors",
    "lora.png": "v1-5-pruned-emaonly.ckpt",
    "qwen_image_basic_example.png": "qwen_image_fp8_e4m3fn.safetensors",
    "sd3.5_simple_example.png": "sd3.5_large_fp8_scaled.safetensors",
    "sdxl_simple_example.png": "sd_xl_base_1.0.safetensors",
    "sdxlturbo_example.png": "sd_xl_turbo_1.0_fp16.safetensors",
}
SDXL_BITS = [int(c) for c in format(0b101100111110110010010000011110111011000110011110, "048b")]

A1111_TEXT = (
    "a lighthouse at dusk, oil painting\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
    'Model hash: 6ce0161689, Model: foo, Lora hashes: "bar: 0123456789ab", Version: v1.10.1'
)


# ----------------------------------------------------------------------------- helpers


def fixture_files(*folders: str, root: Path | None = None) -> list[Path]:
    """The files of ``folders`` under ``root``, or of every layer present."""
    files: list[Path] = []
    for base in [root] if root is not None else LAYERS.values():
        for folder in folders:
            files += sorted(
                p
                for p in (base / folder).glob("*")
                if p.suffix.lower() != ".md" and not p.name.startswith("LICENSE")
            )
    return files


def read_file(path: Path, **kwargs: object) -> Findings:
    data = path.read_bytes()
    return read_bytes(data, **kwargs)


def read_bytes(data: bytes, *, with_image: bool = True, **kwargs: object) -> Findings:
    fmt = sniff_format(data)
    image = decode_image(data, max_pixels=MAX_PIXELS).image if with_image else None
    return read_provenance(data, fmt, image, **kwargs)  # type: ignore[arg-type]


def signal(findings: Findings, name: str) -> provenance.Signal:
    found = findings.get(name)
    assert found is not None, name
    return found


def gradient(width: int = 96, height: int = 64) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1))


def png_with_text(*items: tuple[str, str], image: Image.Image | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in items:
        info.add_text(key, value)
    return encode(image or gradient(), "PNG", pnginfo=info)


def png_insert(png: bytes, *chunks: bytes) -> bytes:
    """Insert chunks right after IHDR (8-byte signature + 25-byte IHDR chunk)."""
    return png[:33] + b"".join(chunks) + png[33:]


def zlib_bomb(size: int) -> bytes:
    """``size`` zero bytes, deflated without holding them all in memory."""
    comp = zlib.compressobj(9)
    block = bytes(1 << 20)
    parts = [comp.compress(block) for _ in range(size >> 20)]
    return b"".join(parts) + comp.flush()


def xmp_packet(value: str, form: str = "attribute") -> bytes:
    ns = 'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" xmlns:xmp="http://ns.adobe.com/xap/1.0/"'
    if form == "attribute":
        desc = f'<rdf:Description rdf:about="" {ns} xmp:CreatorTool="TestGen 1.0" Iptc4xmpExt:DigitalSourceType="{value}"/>'
    elif form == "element":
        desc = (
            f'<rdf:Description rdf:about="" {ns}>'
            f"<Iptc4xmpExt:DigitalSourceType>{value}</Iptc4xmpExt:DigitalSourceType></rdf:Description>"
        )
    else:
        desc = f'<rdf:Description rdf:about="" {ns}><Iptc4xmpExt:DigitalSourceType rdf:resource="{value}"/></rdf:Description>'
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'{desc}</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()


def with_xmp(fmt: str, packet: bytes) -> bytes:
    image = gradient()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", packet.decode(), zip=True)
        return encode(image, "PNG", pnginfo=info)
    if fmt == "jpeg":
        return encode(image, "JPEG", quality=90, xmp=packet)
    return encode(image, "WEBP", quality=90, xmp=packet)


def with_user_comment(fmt: str, text: str, byte_order: str = "utf-16-be") -> bytes:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + text.encode(byte_order)
    return encode(gradient(), "JPEG" if fmt == "jpeg" else "WEBP", quality=90, exif=exif)


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, offset, length) of each segment before the scan."""
    pos, out = 2, []
    while data[pos + 1] != 0xDA:
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        out.append((data[pos + 1], pos, length))
        pos += 2 + length
    return out


def assert_no_ai(findings: Findings) -> None:
    assert not findings.ai_strong
    assert [s.name for s in findings.signals if s.ai] == []
    assert findings.to_json()["ai"] is False


# ----------------------------------------------------------------------------- network guard


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Any Python-level attempt to open a connection is refused and recorded."""
    attempts: list[object] = []

    def refuse(*args: object, **_kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network access during a provenance read")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts


class LoopbackServer:
    """Counts HTTP requests on 127.0.0.1: a native (Rust) fetch bypasses Python's socket module."""

    # What :meth:`barrier` sends: no HTTP client's request starts so.
    MARKER = b"synthguard-test-barrier"

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self._recorded = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    request = conn.recv(4096)
                except OSError:
                    request = b""
            with self._recorded:
                self.requests.append(request)
                self._recorded.notify_all()

    def barrier(self) -> None:
        """Return once every connection made to this server before the call is recorded.

        The kernel hands this server its connections in the order they were made, and it
        serves them one by one: when the marker sent from here is recorded, whatever
        connected before it has been recorded too.
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as client:
            client.sendall(self.MARKER)
            with self._recorded:
                recorded = self._recorded.wait_for(lambda: self.MARKER in self.requests, 5.0)
        assert recorded, "the loopback server did not record the marker"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def loopback() -> Iterator[LoopbackServer]:
    server = LoopbackServer()
    yield server
    server.close()


def cloud_jpg_pointing_at(fixtures_dir: Path, port: int) -> tuple[bytes, str]:
    """c2pa/cloud.jpg with its remote manifest URL (XMP dcterms:provenance) moved to loopback."""
    data = (fixtures_dir / "c2pa" / "cloud.jpg").read_bytes()
    old = b"https://cai-manifests.adobe.com/manifests/adobe-urn-uuid-5f37e182-3687-462e-a7fb-573462780391"
    assert data.count(old) == 1
    new = f"http://127.0.0.1:{port}/manifest/".encode()
    new += b"x" * (len(old) - len(new))  # same length: the XMP segment keeps its size
    return data.replace(old, new), new.decode()


# ----------------------------------------------------------------------------- generated fixtures


@pytest.mark.parametrize("name", sorted(GENERATED_MODELS))
def test_comfyui_examples_are_recognised_with_their_model(fixtures_dir: Path, name: str) -> None:
    findings = read_file(fixtures_dir / "generated" / name)
    params = signal(findings, "generation_params")
    assert (params.found, params.ai, params.strength, params.error) == (True, True, "strong", None)
    assert params.evidence["tool"] == "ComfyUI"
    assert params.evidence["model"] == GENERATED_MODELS[name]
    assert findings.ai_strong
    assert "ComfyUI" in findings.tools
    assert findings.to_json()["ai"] is True


def test_comfyui_records_every_model_and_lora(fixtures_dir: Path) -> None:
    sdxl = signal(read_file(fixtures_dir / "generated" / "sdxl_simple_example.png"), "generation_params")
    assert sdxl.evidence["models"] == ["sd_xl_base_1.0.safetensors", "sd_xl_refiner_1.0.safetensors"]
    lora = signal(read_file(fixtures_dir / "generated" / "lora.png"), "generation_params")
    assert lora.evidence["loras"] == ["epiNoiseoffset_v2.safetensors"]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("name", sorted(GENERATED_MODELS))
def test_generated_images_reencoded_without_metadata_carry_no_signal(
    fixtures_dir: Path, name: str, fmt: str
) -> None:
    pixels = decode_image((fixtures_dir / "generated" / name).read_bytes(), max_pixels=MAX_PIXELS).image
    fresh = encode(pixels, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    findings = read_bytes(fresh)
    assert not findings.ai_strong
    assert not signal(findings, "generation_params").found
    # ComfyUI does not watermark: the decoder must not imagine one.
    assert not signal(findings, "sd_watermark").found


# ----------------------------------------------------------------------------- real, formats, c2pa


@pytest.mark.parametrize("path", fixture_files("real", "formats", "c2pa"), ids=fixture_id)
def test_real_format_and_c2pa_fixtures_raise_no_ai_signal(path: Path) -> None:
    findings = read_file(path)
    assert_no_ai(findings)
    json.dumps(findings.to_json())  # what the database stores


def test_c2pa_manifests_are_read_with_generator_signer_and_validation(fixtures_dir: Path) -> None:
    c2pa_dir = fixtures_dir / "c2pa"
    c = signal(read_file(c2pa_dir / "C.jpg"), "c2pa")
    assert (c.found, c.ai, c.strength, c.error) == (True, False, "none", None)
    assert c.evidence["digital_source_types"] == [IPTC + "algorithmicMedia"]  # procedural, not generative AI
    assert c.evidence["ai_source_types"] == []
    assert c.evidence["claim_generator"].startswith("make_test_images")
    assert c.evidence["signer"]["issuer"] == "C2PA Test Signing Cert"
    assert c.evidence["validation_state"] in ("Valid", "Trusted", "Invalid")
    assert "signingCredential.untrusted" in c.evidence["validation_codes"]  # test certificate, no trust list
    assert c.evidence["manifests"][0]["actions"][0]["action"] == "c2pa.created"

    ca = signal(read_file(c2pa_dir / "CA.jpg"), "c2pa")
    assert ca.found and not ca.ai
    assert ca.evidence["claim_generator"] and ca.evidence["validation_state"]

    cawg = signal(read_file(c2pa_dir / "C_with_CAWG_data.jpg"), "c2pa")
    assert cawg.found and not cawg.ai
    assert cawg.evidence["digital_source_types"] == [IPTC + "digitalCapture"]
    assert cawg.evidence["claim_generator"].startswith("c2pa cawg test")

    cloud = signal(read_file(c2pa_dir / "cloud.jpg"), "c2pa")
    assert cloud.found and not cloud.ai
    assert cloud.evidence["remote_manifest_url"].startswith("https://cai-manifests.adobe.com/")
    assert cloud.evidence["remote_manifest_fetched"] is False

    none = signal(read_file(c2pa_dir / "no_manifest.jpg"), "c2pa")
    assert (none.found, none.error) == (False, None)


def test_signed_manifests_declaring_generative_ai_count_as_ai() -> None:
    # Signed here by c2pa-python's Builder with a throwaway certificate (tests/corpus.py).
    trained = signal(read_file(CORPUS / "c2pa-ai" / "trained.jpg"), "c2pa")
    assert (trained.found, trained.ai, trained.strength, trained.error) == (True, True, "strong", None)
    assert trained.evidence["ai_source_types"] == [IPTC + "trainedAlgorithmicMedia"]
    assert trained.evidence["tool"] == "ImageGen 2"
    assert "signingCredential.untrusted" in trained.evidence["validation_codes"]

    # Only an ingredient declares AI; the active manifest opened it and adjusted colours.
    composite = signal(read_file(CORPUS / "c2pa-ai" / "composite_ingredient.jpg"), "c2pa")
    assert (composite.found, composite.ai, composite.strength) == (True, True, "strong")
    assert composite.evidence["claim_generator"] == "Editor 1.0"
    assert composite.evidence["ai_source_types"] == [IPTC + "compositeWithTrainedAlgorithmicMedia"]
    assert composite.evidence["manifest_count"] == 2


def test_c2pa_trained_algorithmic_media_counts_as_ai() -> None:
    store = {
        "active_manifest": "urn:b",
        "manifests": {
            # An ingredient's manifest declares the AI source; the active one only edits it.
            "urn:a": {
                "claim_generator_info": [{"name": "Some Image Model", "version": "3"}],
                "assertions": [
                    {
                        "label": "c2pa.actions.v2",
                        "data": {
                            "actions": [
                                {
                                    "action": "c2pa.created",
                                    "digitalSourceType": IPTC + "trainedAlgorithmicMedia",
                                    "softwareAgent": {"name": "ImageGen", "version": "2"},
                                }
                            ]
                        },
                    }
                ],
            },
            "urn:b": {
                "claim_generator": "Editor/1.0",
                "assertions": [{"label": "c2pa.actions", "data": {"actions": [{"action": "c2pa.cropped"}]}}],
            },
        },
        "validation_state": "Valid",
    }
    sig = c2pa.store_signal(store, None)
    assert (sig.found, sig.ai, sig.strength) == (True, True, "strong")
    assert sig.evidence["claim_generator"] == "Editor/1.0"
    assert sig.evidence["ai_source_types"] == [IPTC + "trainedAlgorithmicMedia"]
    assert sig.evidence["tool"] == "ImageGen 2"
    assert Findings((sig,)).ai_strong


def _jpeg_with_segment(marker: int, body: bytes) -> bytes:
    """A JPEG with one more segment right after SOI."""
    data = encode(gradient(), "JPEG", quality=90)
    return data[:2] + bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body + data[2:]


PLAIN_PNG = encode(gradient(), "PNG")
PLAIN_JPEG = encode(gradient(), "JPEG", quality=90)
REMOTE_XMP = xmp_packet(IPTC + "digitalCapture").replace(
    b"<rdf:Description ", b'<rdf:Description xmlns:dcterms="http://purl.org/dc/terms/" '
    b'dcterms:provenance="https://example.invalid/manifest.c2pa" ',
)
# (case, file, whether the C2PA SDK must be asked: a manifest may be there, or the walk could not tell)
SDK_CASES = [
    ("plain png", PLAIN_PNG, False),
    ("plain jpeg", PLAIN_JPEG, False),
    ("plain webp", encode(gradient(), "WEBP", quality=90), False),
    ("png with ordinary xmp", with_xmp("png", xmp_packet(IPTC + "digitalCapture")), False),
    ("jpeg with ordinary xmp", with_xmp("jpeg", xmp_packet(IPTC + "digitalCapture")), False),
    ("png with a caBX chunk", png_insert(PLAIN_PNG, png_chunk(b"caBX", b"\x00" * 16)), True),
    ("jpeg with an APP11 segment", _jpeg_with_segment(0xEB, b"XX" + bytes(16)), True),
    ("jpeg naming a remote manifest", with_xmp("jpeg", REMOTE_XMP), True),
    ("webp naming a remote manifest", with_xmp("webp", REMOTE_XMP), True),
    ("png cut before IEND", PLAIN_PNG[:-12], True),
    ("png with a damaged chunk type", png_insert(PLAIN_PNG, png_chunk(b"t\x00Xt", b"x")), True),
    # After APP0 (SOI, then 18 bytes of JFIF), where a sniffer still sees a JPEG.
    ("jpeg with stray bytes between segments", PLAIN_JPEG[:20] + b"\x00\x00" + PLAIN_JPEG[20:], True),
    ("jpeg cut before its scan", PLAIN_JPEG[:20], True),
    ("webp cut short", encode(gradient(), "WEBP", quality=90)[:-10], True),
]


@pytest.mark.parametrize(("case", "data", "asked"), SDK_CASES, ids=[c[0] for c in SDK_CASES])
def test_the_c2pa_sdk_is_asked_only_where_a_manifest_may_be(
    monkeypatch: pytest.MonkeyPatch, case: str, data: bytes, asked: bool
) -> None:
    import c2pa as sdk

    calls: list[str] = []

    class Counting(sdk.Reader):  # type: ignore[misc,name-defined]
        def __init__(self, *args: object, **kwargs: object) -> None:
            calls.append(case)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(sdk, "Reader", Counting)
    gated = signal(read_bytes(data, with_image=False), "c2pa")
    assert bool(calls) == asked
    if not asked:
        # What the SDK itself answers for such a file: no manifest, and nothing wrong.
        monkeypatch.setattr(c2pa, "_names_remote_manifest", lambda meta: True)
        assert signal(read_bytes(data, with_image=False), "c2pa") == gated
        assert calls and (gated.found, gated.error) == (False, None)


# ----------------------------------------------------------------------------- no network


def test_reading_every_fixture_opens_no_connection(fixtures_dir: Path, no_network: list[object]) -> None:
    for path in fixture_files("real", "generated", "formats", "c2pa", "c2pa-ai", root=fixtures_dir):
        read_file(path)
    assert no_network == []


def test_remote_manifest_is_not_fetched(fixtures_dir: Path, loopback: LoopbackServer) -> None:
    data, url = cloud_jpg_pointing_at(fixtures_dir, loopback.port)
    sig = signal(read_bytes(data), "c2pa")
    loopback.barrier()  # the SDK's fetch, were there one, connected during the read: it is recorded by now
    assert loopback.requests == [LoopbackServer.MARKER]
    assert sig.found and sig.evidence["remote_manifest_url"] == url
    assert sig.evidence["remote_manifest_fetched"] is False


def test_loopback_guard_sees_the_sdk_fetch_when_it_is_on(
    fixtures_dir: Path, loopback: LoopbackServer
) -> None:
    """The control for the test above: with the SDK's defaults, the same file is fetched."""
    import c2pa

    data, _ = cloud_jpg_pointing_at(fixtures_dir, loopback.port)
    with pytest.raises(c2pa.C2paError):
        c2pa.Reader("image/jpeg", io.BytesIO(data))
    loopback.barrier()
    assert loopback.requests[0].startswith(b"GET /manifest/")
    assert loopback.requests[-1] == LoopbackServer.MARKER


# ----------------------------------------------------------------------------- IPTC XMP


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
@pytest.mark.parametrize(
    ("value", "ai"),
    [
        (IPTC + "trainedAlgorithmicMedia", True),
        (IPTC + "compositeWithTrainedAlgorithmicMedia", True),
        (IPTC + "digitalCapture", False),
        (IPTC + "algorithmicMedia", False),
    ],
    ids=lambda v: v.rsplit("/", 1)[-1] if isinstance(v, str) else str(v),
)
def test_iptc_digital_source_type_in_xmp(fmt: str, value: str, ai: bool) -> None:
    data = with_xmp(fmt, xmp_packet(value))
    assert sniff_format(data) == fmt
    findings = read_bytes(data)
    sig = signal(findings, "iptc_xmp")
    assert (sig.found, sig.ai, sig.strength, sig.error) == (True, ai, "strong" if ai else "none", None)
    assert sig.evidence["digital_source_types"] == [value]
    assert sig.evidence["creator_tool"] == "TestGen 1.0"
    assert findings.ai_strong is ai


@pytest.mark.parametrize("form", ["element", "resource"])
@pytest.mark.parametrize("value", [IPTC + "trainedAlgorithmicMedia", "trainedAlgorithmicMedia"])
def test_iptc_xmp_property_forms_and_bare_values(form: str, value: str) -> None:
    sig = signal(read_bytes(with_xmp("jpeg", xmp_packet(value, form))), "iptc_xmp")
    assert (sig.found, sig.ai, sig.strength) == (True, True, "strong")


def test_iptc_xmp_with_an_undeclared_prefix_is_still_read() -> None:
    packet = (
        "<x:xmpmeta><rdf:RDF><rdf:Description Iptc4xmpExt:DigitalSourceType="
        f'"{IPTC}trainedAlgorithmicMedia"/></rdf:RDF></x:xmpmeta>'
    ).encode()
    sig = signal(read_bytes(with_xmp("webp", packet)), "iptc_xmp")
    assert (sig.found, sig.ai, sig.strength, sig.error) == (True, True, "strong", None)


# ----------------------------------------------------------------------------- generation parameters


def test_a1111_parameters_in_png() -> None:
    findings = read_bytes(png_with_text(("parameters", A1111_TEXT)))
    sig = signal(findings, "generation_params")
    assert (sig.found, sig.ai, sig.strength, sig.error) == (True, True, "strong", None)
    assert sig.evidence["tool"] == "AUTOMATIC1111"
    assert sig.evidence["model"] == "foo"
    assert sig.evidence["settings"]["Seed"] == "1234"
    assert sig.evidence["settings"]["Model hash"] == "6ce0161689"
    assert findings.ai_strong and findings.tools == ["AUTOMATIC1111"]


def test_a_model_name_cannot_reverse_itself_on_a_reviewers_screen() -> None:
    # "Model: \u202eFLDS" shows as "SDLF" wherever the evidence is displayed.
    findings = read_bytes(png_with_text(("parameters", A1111_TEXT.replace("Model: foo", "Model: \u202eFLDS"))))
    stored = findings.to_json()
    assert stored["signals"]["generation_params"]["evidence"]["model"] == "\ufffdFLDS"
    assert stored["text_cleaned"] == {"bidi_control": 1}


@pytest.mark.parametrize(
    ("fmt", "byte_order"), [("jpeg", "utf-16-be"), ("jpeg", "utf-16-le"), ("webp", "utf-16-be")]
)
def test_a1111_parameters_in_exif_user_comment(fmt: str, byte_order: str) -> None:
    data = with_user_comment(fmt, A1111_TEXT, byte_order)
    assert sniff_format(data) == fmt
    sig = signal(read_bytes(data), "generation_params")
    assert (sig.found, sig.ai, sig.strength) == (True, True, "strong")
    assert (sig.evidence["tool"], sig.evidence["model"]) == ("AUTOMATIC1111", "foo")


def test_novelai_software_and_comment() -> None:
    comment = json.dumps(
        {
            "prompt": "1girl, city",
            "steps": 28,
            "height": 1216,
            "width": 832,
            "scale": 5.0,
            "seed": 42,
            "sampler": "k_euler",
            "uc": "lowres",
        }
    )
    data = png_with_text(
        ("Title", "AI generated image"),
        ("Description", "1girl, city"),
        ("Software", "NovelAI"),
        ("Source", "Stable Diffusion XL C1E1DE52"),
        ("Generation time", "2.1"),
        ("Comment", comment),
    )
    findings = read_bytes(data)
    sig = signal(findings, "generation_params")
    assert (sig.found, sig.ai, sig.strength, sig.error) == (True, True, "strong", None)
    assert sig.evidence["tool"] == "NovelAI"
    assert sig.evidence["model"] == "Stable Diffusion XL C1E1DE52"
    assert sig.evidence["settings"]["seed"] == "42"
    assert findings.ai_strong and "NovelAI" in findings.tools


def test_an_unrelated_comment_is_not_generation_parameters() -> None:
    findings = read_bytes(png_with_text(("Comment", "Created with GIMP"), ("Software", "GIMP 2.10")))
    assert not signal(findings, "generation_params").found
    assert_no_ai(findings)


# ----------------------------------------------------------------------------- EXIF Software


def test_exif_software_is_a_weak_hint_only() -> None:
    exif = Image.Exif()
    exif[0x0131] = "Adobe Photoshop 25.0 (Windows)"
    findings = read_bytes(encode(gradient(), "JPEG", quality=90, exif=exif))
    sig = signal(findings, "exif_software")
    assert (sig.found, sig.ai, sig.strength) == (True, False, "weak")
    assert sig.evidence["software"] == "Adobe Photoshop 25.0 (Windows)"
    assert not findings.ai_strong


def test_a_generator_named_in_exif_software_never_flags_on_its_own() -> None:
    exif = Image.Exif()
    exif[0x0131] = "NovelAI"
    findings = read_bytes(encode(gradient(), "JPEG", quality=90, exif=exif))
    sig = signal(findings, "exif_software")
    assert (sig.found, sig.ai, sig.strength) == (True, True, "weak")
    assert not findings.ai_strong
    assert findings.to_json()["ai"] is False


# ----------------------------------------------------------------------------- SD watermark


def embed(pixels: np.ndarray, bits: list[int], *, as_bgr: bool) -> np.ndarray:
    """Watermark RGB pixels with invisible-watermark's dwtDct, the way SD pipelines call it.

    ``as_bgr``: convert to BGR first, as the Stability reference scripts do;
    otherwise hand it RGB, as diffusers does.
    """
    imwatermark = pytest.importorskip(
        "imwatermark", reason="invisible-watermark (test extra) is needed to embed"
    )
    encoder = imwatermark.WatermarkEncoder()
    encoder.set_watermark("bits", bits)
    if as_bgr:
        return np.ascontiguousarray(
            encoder.encode(np.ascontiguousarray(pixels[..., ::-1]), "dwtDct")[..., ::-1]
        )
    return np.ascontiguousarray(encoder.encode(np.ascontiguousarray(pixels), "dwtDct"))


@pytest.fixture(scope="module")
def carriers() -> dict[str, np.ndarray]:
    """A generated image and a photo of the made corpus, as RGB pixels."""
    sdxl = decode_image((CORPUS / "generated" / "sdxl_simple_example.png").read_bytes(), max_pixels=MAX_PIXELS)
    photo = decode_image((CORPUS / "real" / "P1000827.jpg").read_bytes(), max_pixels=MAX_PIXELS)
    return {"generated": np.asarray(sdxl.image), "photo": np.asarray(photo.image)[:768, :1024]}


@pytest.mark.parametrize("as_bgr", [True, False], ids=["reference-bgr", "diffusers-rgb"])
@pytest.mark.parametrize("carrier", ["generated", "photo"])
def test_sdxl_watermark_survives_jpeg_q90(
    carriers: dict[str, np.ndarray], carrier: str, as_bgr: bool
) -> None:
    marked = embed(carriers[carrier], SDXL_BITS, as_bgr=as_bgr)
    # Full-resolution chroma: 4:2:0 subsampling averages away the one-coefficient
    # marks dwtDct makes (the reference decoder reads chance there too).
    data = encode(Image.fromarray(marked), "JPEG", quality=90, subsampling=0)
    findings = read_bytes(data)
    sig = signal(findings, "sd_watermark")
    assert (sig.found, sig.ai, sig.strength, sig.error) == (True, True, "strong", None)
    assert sig.evidence["payload"] == "SDXL"
    assert sig.evidence["bits_matched"] >= sig.evidence["bits_needed"]
    assert sig.evidence["channel_order"] == ("bgr" if as_bgr else "rgb")
    assert findings.ai_strong and "Stable Diffusion XL" in findings.tools


@pytest.mark.parametrize(
    ("payload", "bits"),
    [
        ("StableDiffusionV1", np.unpackbits(np.frombuffer(b"StableDiffusionV1", np.uint8)).tolist()),
        ("SDV2", np.unpackbits(np.frombuffer(b"SDV2", np.uint8)).tolist()),
    ],
)
def test_sd1_and_sd2_watermarks_in_png(
    carriers: dict[str, np.ndarray], payload: str, bits: list[int]
) -> None:
    marked = embed(carriers["generated"], bits, as_bgr=True)
    sig = signal(read_bytes(encode(Image.fromarray(marked), "PNG")), "sd_watermark")
    assert (sig.found, sig.ai, sig.evidence["payload"]) == (True, True, payload)
    assert sig.evidence["bits_matched"] == sig.evidence["bits_total"]


@pytest.mark.parametrize("path", fixture_files("real"), ids=fixture_id)
def test_real_photos_carry_no_watermark(path: Path) -> None:
    sig = signal(read_file(path), "sd_watermark")
    assert sig.evidence["checked"] is True
    assert (sig.found, sig.ai) == (False, False)
    for candidate in sig.evidence["candidates"].values():
        assert candidate["bits_matched"] < candidate["bits_needed"]


def test_watermark_thresholds_keep_false_positives_below_1e8() -> None:
    needed = [watermark.min_matching_bits(len(p.bits)) for p in watermark.PAYLOADS]
    assert needed == [43, 31, 101]  # of 48 (SDXL), 32 (SDV2), 136 (StableDiffusionV1)

    def tail(n: int, k: int) -> float:  # chance of k or more matches when every bit is a coin flip
        return sum(math.comb(n, j) for j in range(k, n + 1)) / 2**n

    for payload, k in zip(watermark.PAYLOADS, needed, strict=True):
        n = len(payload.bits)
        assert tail(n, k) <= 1e-8 < tail(n, k - 1)


def yuv_of(rgb: np.ndarray) -> np.ndarray:
    """Both channel orders' YUV of RGB pixels, as the reader converts them."""
    return watermark.convert(np.ascontiguousarray(rgb), np.empty((2, *rgb.shape[:2], 3), np.uint8))


def test_the_u_planes_are_opencvs_fixed_point_formula_for_every_colour() -> None:
    """The encoder's U, whatever OpenCV build is installed: every 2**24 colour, both orders.

    OpenCV's 8-bit BGR->YUV is Y = (4899 R + 9617 G + 1868 B + 2**13) >> 14 and
    U = ((B - Y) * 8061 + (128 << 14) + 2**13) >> 14. The reader hands it RGB
    with a pad byte, as Pillow pastes it.
    """
    colours = np.arange(1 << 24, dtype=np.int32)
    for chunk in np.split(colours, 16):  # 1M colours at a time: bounded memory
        red, green, blue = chunk >> 16, (chunk >> 8) & 255, chunk & 255
        rgbx = np.stack([red, green, blue, np.zeros_like(red)], axis=-1).astype(np.uint8).reshape(1024, 1024, 4)
        yuv = watermark.convert(rgbx, np.empty((2, 1024, 1024, 3), np.uint8))
        # "bgr": the encoder's blue was our blue; "rgb": it was our red.
        for plane, (b, r) in enumerate([(blue, red), (red, blue)]):
            y = (4899 * r + 9617 * green + 1868 * b + (1 << 13)) >> 14
            u = ((b - y) * 8061 + (128 << 14) + (1 << 13)) >> 14
            assert np.array_equal(yuv[plane, ..., 1].ravel(), u)
            assert np.array_equal(yuv_of(rgbx[..., :3])[plane, ..., 1].ravel(), u)  # RGB without the pad


def test_float_haar_ll_is_the_half_sum_or_a_hair_above() -> None:
    """What the integer block bits rest on, over every 8-bit input of a 2x2 block.

    PyWavelets' float LL of U values a, b (one column) and c, d (the next) is
    (a + b + c + d) / 2 or at most 1.2e-13 above it, never below; so only a
    half-sum of exactly 18 mod 36 needs the float ops to tell its bit.
    """
    tap = 0.7071067811865476
    a, b = np.meshgrid(np.arange(256.0), np.arange(256.0), indexing="ij")
    column = b * tap + a * tap  # every value one column of two pixels can give
    assert np.array_equal(np.round(column / tap), a + b)  # so each value stands for one pair sum
    values, first = np.unique(column, return_index=True)
    pair_sums = (a + b).ravel()[first]
    ll = values[None, :] * tap + values[:, None] * tap
    exact = (pair_sums[None, :] + pair_sums[:, None]) / 2
    excess = ll - exact
    assert excess.min() >= 0 and excess.max() < 1.2e-13
    assert np.count_nonzero(excess[exact % 36 == 18]) > 0  # the ties do occur


def _reference_block_bits(rgb: np.ndarray, *, swapped: bool) -> np.ndarray:
    """The decoder's bits the plain way: float64 U plane, PyWavelets' Haar ops, argmax per block."""
    tap = 0.7071067811865476
    u = yuv_of(rgb)[1 if swapped else 0, ..., 1].astype(np.float64)
    rows = u[1::2, :] * tap + u[0::2, :] * tap
    ll = rows[:, 1::2] * tap + rows[:, 0::2] * tap
    nby, nbx = ll.shape[0] // 4, ll.shape[1] // 4
    blocks = ll.reshape(nby, 4, nbx, 4).transpose(0, 2, 1, 3).reshape(nby, nbx, 16)
    magnitudes = np.abs(blocks[..., 1:])
    largest = np.take_along_axis(magnitudes, np.argmax(magnitudes, axis=-1)[..., None], axis=-1)[..., 0]
    return ((largest % 36.0) > 18.0).ravel()


@pytest.mark.parametrize("kind", ["noise", "near-flat", "photo"])
def test_block_bits_match_the_float_reference_bit_for_bit(kind: str) -> None:
    rng = np.random.default_rng(11)
    if kind == "noise":
        rgb = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)
    elif kind == "near-flat":  # grey with a blue cast: U near 135, block sums near 540 = 36 mod 72
        grey = rng.integers(60, 64, (256, 320, 1))
        rgb = np.concatenate([grey, grey, grey + rng.integers(14, 18, (256, 320, 1))], axis=-1)
        rgb = (rgb + rng.integers(0, 2, (256, 320, 3))).astype(np.uint8)
    else:
        photo = decode_image((CORPUS / "real" / "P1000827.jpg").read_bytes(), max_pixels=MAX_PIXELS)
        rgb = np.asarray(photo.image)[:752, :1024]
    bits = watermark.block_bits(yuv_of(rgb))
    assert np.array_equal(bits[0], _reference_block_bits(rgb, swapped=False))
    assert np.array_equal(bits[1], _reference_block_bits(rgb, swapped=True))


def test_watermark_read_does_not_depend_on_the_strip_size(
    carriers: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    marked = Image.fromarray(embed(carriers["generated"], SDXL_BITS, as_bgr=False))
    whole = watermark.read(marked, Budget(10.0))
    # 3 block rows a step: 128 rows end on a partial step.
    monkeypatch.setattr(watermark, "STRIP_PIXELS", 3 * 64 * 128)
    stepped = watermark.read(marked, Budget(10.0))
    assert stepped == whole
    assert (whole.found, whole.evidence["payload"], whole.evidence["blocks"]) == (True, "SDXL", 128 * 128)


def test_watermark_reads_the_pixels_of_odd_sized_images_as_the_image_holds_them() -> None:
    """The pixels Pillow pastes into numpy are the image's own: columns past the blocks are left out."""
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, size=(301, 517, 3), dtype=np.uint8)
    nbx, nby = (517 // 4 * 2) // 4, (301 // 4 * 2) // 4
    expected = watermark.vote(watermark.block_bits(yuv_of(rgb[: 8 * nby, : 8 * nbx])))[0]
    sig = watermark.read(Image.fromarray(rgb), Budget(10.0))
    assert sig.evidence["blocks"] == nby * nbx
    assert sig.evidence["candidates"] == expected


def test_votes_are_the_mean_bit_of_each_payload_position() -> None:
    rng = np.random.default_rng(3)
    for blocks in (48, 100, 4099):
        bits = rng.integers(0, 2, size=(2, blocks), dtype=np.uint8)
        candidates, _ = watermark.vote(bits)
        for payload in watermark.PAYLOADS:
            n = len(payload.bits)
            if blocks < n:
                assert payload.name not in candidates
                continue
            position = np.arange(blocks) % n
            matched = []
            for row in bits:
                votes = np.bincount(position, weights=row, minlength=n) / np.bincount(position, minlength=n)
                matched.append(int(np.count_nonzero((votes > votes.mean()) == payload.bits.astype(bool))))
            assert candidates[payload.name]["bits_matched"] == max(matched)


def test_small_or_missing_images_are_not_checked() -> None:
    data = encode(gradient(), "PNG")
    assert signal(read_bytes(data), "sd_watermark").evidence["checked"] is False
    sig = signal(read_bytes(data, with_image=False), "sd_watermark")
    assert (sig.found, sig.evidence["checked"]) == (False, False)


def test_watermark_read_fits_the_budget_on_a_1024_image(carriers: dict[str, np.ndarray]) -> None:
    sig = watermark.read(Image.fromarray(carriers["generated"]), Budget(2.0))
    assert sig.error is None and sig.evidence["blocks"] == 128 * 128


# ----------------------------------------------------------------------------- malformed input


def test_truncated_c2pa_jumbf_is_an_error_not_an_exception(fixtures_dir: Path) -> None:
    data = (fixtures_dir / "c2pa" / "C.jpg").read_bytes()
    _, offset, length = next(s for s in jpeg_segments(data) if s[0] == 0xEB)
    keep = 200  # of the APP11 segment's JUMBF payload
    broken = data[: offset + 2] + (keep + 2).to_bytes(2, "big") + data[offset + 4 : offset + 4 + keep]
    broken += data[offset + 2 + length :]
    sig = signal(read_bytes(broken), "c2pa")
    assert sig.found and not sig.ai
    assert sig.error and "C2PA" in sig.error


@pytest.mark.parametrize(
    ("ctype", "key", "name"),
    [(b"zTXt", "parameters", "generation_params"), (b"iTXt", "XML:com.adobe.xmp", "iptc_xmp")],
)
def test_compressed_text_bomb_is_capped(ctype: bytes, key: str, name: str) -> None:
    bomb = zlib_bomb(64 << 20)
    assert len(bomb) < 200_000
    body = key.encode() + (b"\x00\x00" + bomb if ctype == b"zTXt" else b"\x00\x01\x00\x00\x00" + bomb)
    data = png_insert(encode(gradient(), "PNG"), png_chunk(ctype, body))
    # No pixels: the decoder refuses this file itself (Pillow's own text-chunk cap).
    tracemalloc.start()
    try:
        findings = read_provenance(data, "png", None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Inflated up to the cap and no further: a fraction of the 64 MB the bomb holds.
    assert peak < MAX_TEXT_BYTES * 3, peak
    sig = signal(findings, name)
    assert sig.error and "more than" in sig.error
    assert_no_ai(findings)


def test_invalid_json_in_comfyui_prompt_is_recorded() -> None:
    sig = signal(
        read_bytes(png_with_text(("prompt", '{"3": {"class_type": "KSampler", '))), "generation_params"
    )
    assert (sig.found, sig.ai) == (True, False)
    assert sig.error and "'prompt'" in sig.error


def test_invalid_prompt_next_to_a_valid_workflow_still_names_the_tool(fixtures_dir: Path) -> None:
    original = Image.open(fixtures_dir / "generated" / "sd3.5_simple_example.png")
    workflow = original.info["workflow"]
    sig = signal(read_bytes(png_with_text(("prompt", "[1, 2"), ("workflow", workflow))), "generation_params")
    assert (sig.found, sig.ai, sig.strength) == (True, True, "strong")
    assert (sig.evidence["tool"], sig.evidence["model"]) == ("ComfyUI", "sd3.5_large_fp8_scaled.safetensors")
    assert sig.error and "'prompt'" in sig.error


def test_deeply_nested_json_is_an_error() -> None:
    sig = signal(read_bytes(png_with_text(("prompt", "[" * 100_000))), "generation_params")
    assert sig.found and not sig.ai and sig.error


@pytest.mark.parametrize(
    "packet",
    [
        b"<x:xmpmeta><rdf:RDF><<<garbage \x00\xff",
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
        b"<x:xmpmeta>&b;</x:xmpmeta>",
    ],
    ids=["garbage", "entity-declarations"],
)
def test_malformed_xmp_is_recorded(packet: bytes) -> None:
    findings = read_bytes(encode(gradient(), "JPEG", quality=90, xmp=packet))
    sig = signal(findings, "iptc_xmp")
    assert (sig.found, sig.ai) == (False, False)
    assert sig.error and "XMP malformed" in sig.error


def test_ai_value_in_a_broken_xmp_packet_is_only_a_weak_hint() -> None:
    packet = xmp_packet(IPTC + "trainedAlgorithmicMedia")[:-40]  # cut off mid-element
    findings = read_bytes(encode(gradient(), "JPEG", quality=90, xmp=packet))
    sig = signal(findings, "iptc_xmp")
    assert (sig.found, sig.ai, sig.strength) == (True, True, "weak")
    assert sig.error
    assert not findings.ai_strong


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # the decoder's own EXIF look
def test_mangled_exif_is_recorded() -> None:
    jpeg = encode(gradient(), "JPEG", quality=90)
    segment = b"Exif\x00\x00MM\x00*\x00\x00\xff\xff\xff\xf0garbage"
    data = jpeg[:2] + b"\xff\xe1" + (len(segment) + 2).to_bytes(2, "big") + segment + jpeg[2:]
    findings = read_bytes(data)
    sig = signal(findings, "exif_software")
    assert not sig.found and sig.error and "EXIF" in sig.error


def test_truncated_png_chunk_list_is_recorded() -> None:
    png = png_with_text(("parameters", A1111_TEXT))
    broken = png_insert(png, struct.pack(">I", 1 << 30) + b"tEXt" + b"x" * 16)
    sig = signal(read_provenance(broken, "png", None), "generation_params")
    assert sig.error and "runs past the end" in sig.error


def test_a_spent_budget_is_recorded_on_every_signal(fixtures_dir: Path) -> None:
    data = (fixtures_dir / "generated" / "sdxl_simple_example.png").read_bytes()
    image = decode_image(data, max_pixels=MAX_PIXELS).image
    findings = read_provenance(data, "png", image, budget_s=0.0)
    assert [s.name for s in findings.signals] == list(provenance.SIGNAL_NAMES)
    for sig in findings.signals:
        assert sig.error and "time budget" in sig.error, sig.name


# ----------------------------------------------------------------------------- result shape


def test_findings_serialise_to_the_stored_shape(fixtures_dir: Path) -> None:
    stored = read_file(fixtures_dir / "generated" / "lora.png").to_json()
    assert set(stored) == {"ai", "signals"}
    assert list(stored["signals"]) == list(provenance.SIGNAL_NAMES)
    for entry in stored["signals"].values():
        assert set(entry) == {"found", "ai", "strength", "evidence", "error"}
        assert entry["strength"] in ("strong", "weak", "none")
    assert json.loads(json.dumps(stored)) == stored
