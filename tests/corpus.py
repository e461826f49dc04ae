"""The test corpus the suite makes itself, so that a clone of the repository alone runs every test.

It has the layout and the file names of ``../shared/fixtures`` (real files from public projects),
and each file declares what the tests read from its namesake there: the same ComfyUI loaders,
the same C2PA source types and claim generators, a remote manifest at the same URL, camera EXIF,
IPTC XMP, the same formats and the same hostile files. The pixels are drawn here (smooth fields,
shapes and noise, different per file) and the C2PA manifests are signed by ``c2pa-python``'s
Builder with a throwaway certificate chain made with ``cryptography``. Beyond the shared layout,
``c2pa-ai/`` holds manifests that must count as AI: ``trainedAlgorithmicMedia``, and
``compositeWithTrainedAlgorithmicMedia`` declared only by an ingredient.

``corpus_dir()`` builds it once per machine and version of this file, under the temp directory.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, PngImagePlugin

IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"
# The URL c2pa/cloud.jpg in the shared fixtures points at; tests move it to a loopback server.
REMOTE_MANIFEST_URL = "https://cai-manifests.adobe.com/manifests/adobe-urn-uuid-5f37e182-3687-462e-a7fb-573462780391"

# Each ComfyUI example: (width, height, [(node id, class, inputs)]) of its loader nodes, in the
# shared files' order; the prompt graph names the first loader's weights first.
COMFYUI = {
    "aura_flow_0.2_example.png": (1024, 1024, [("21", "CheckpointLoaderSimple", {"ckpt_name": "aura_flow_0.2.safetensors"})]),
    "flux_dev_example.png": (1024, 1024, [("12", "UNETLoader", {"unet_name": "flux1-dev.safetensors"})]),
    "hidream_dev_example.png": (1024, 1024, [("69", "UNETLoader", {"unet_name": "hidream_i1_dev_bf16.safetensors"})]),
    "lora.png": (
        2153,
        788,
        [
            ("4", "CheckpointLoaderSimple", {"ckpt_name": "v1-5-pruned-emaonly.ckpt"}),
            ("10", "LoraLoader", {"lora_name": "epiNoiseoffset_v2.safetensors", "strength_model": 1.0}),
        ],
    ),
    "qwen_image_basic_example.png": (1328, 1328, [("37", "UNETLoader", {"unet_name": "qwen_image_fp8_e4m3fn.safetensors"})]),
    "sd3.5_simple_example.png": (
        1024,
        1024,
        [("4", "CheckpointLoaderSimple", {"ckpt_name": "sd3.5_large_fp8_scaled.safetensors"})],
    ),
    "sdxl_simple_example.png": (
        1024,
        1024,
        [
            ("4", "CheckpointLoaderSimple", {"ckpt_name": "sd_xl_base_1.0.safetensors"}),
            ("12", "CheckpointLoaderSimple", {"ckpt_name": "sd_xl_refiner_1.0.safetensors"}),
        ],
    ),
    "sdxlturbo_example.png": (512, 512, [("20", "CheckpointLoaderSimple", {"ckpt_name": "sd_xl_turbo_1.0_fp16.safetensors"})]),
}


# ----------------------------------------------------------------------------- pixels


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: a smooth colour field, a few shapes and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    channels = []
    for _ in range(3):
        fx, fy = rng.uniform(0.5, 6.0, 2)
        phase = rng.uniform(0, 2 * np.pi)
        level, swing = rng.uniform(60, 190), rng.uniform(30, 65)
        channels.append(level + swing * np.sin(2 * np.pi * (fx * x + fy * y) + phase))
    pixels = np.stack(channels, axis=-1)
    for _ in range(int(rng.integers(3, 9))):
        cx, cy = rng.uniform(0, 1, 2) * (width, height) / max(width, height)
        r = rng.uniform(0.03, 0.25)
        inside = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        pixels[inside] = pixels[inside] * 0.4 + rng.uniform(0, 255, 3) * 0.6
    pixels += rng.normal(0, rng.uniform(2, 9), pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    """``image`` saved as ``fmt``, as bytes."""
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def jpeg_copy(image: Image.Image, quality: int) -> Image.Image:
    """``image`` re-encoded as a JPEG at ``quality`` and opened again: a re-upload's copy."""
    return Image.open(io.BytesIO(encode(image.convert("RGB"), "JPEG", quality=quality)))


def cut(image: Image.Image, left: float = 0, top: float = 0, right: float = 0, bottom: float = 0) -> Image.Image:
    """``image`` with these fractions of its width and height cut from each side: a cropped copy."""
    w, h = image.size
    return image.crop((round(w * left), round(h * top), w - round(w * right), h - round(h * bottom)))


# ----------------------------------------------------------------------------- metadata


def camera_exif(make: str, model: str, software: str, taken: str) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0131], exif[0x0132] = make, model, software, taken
    exif[0x0112] = 1  # orientation: as stored
    exif.get_ifd(0x8769)[0x9003] = taken  # DateTimeOriginal
    return exif


def xmp_packet(creator_tool: str, source_type: str | None = None) -> bytes:
    source = f' Iptc4xmpExt:DigitalSourceType="{IPTC}{source_type}"' if source_type else ""
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
        'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
        f'xmp:CreatorTool="{creator_tool}"{source}/></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()


def comfyui_chunks(loaders: list[tuple[str, str, dict[str, object]]]) -> PngImagePlugin.PngInfo:
    """ComfyUI's two tEXt chunks: the prompt graph (API form) and the editor's workflow."""
    prompt: dict[str, object] = {node: {"class_type": kind, "inputs": inputs} for node, kind, inputs in loaders}
    prompt["3"] = {"class_type": "KSampler", "inputs": {"seed": 1234, "steps": 20, "cfg": 7.0, "model": [loaders[0][0], 0]}}
    prompt["6"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a glass bottle with a galaxy inside"}}
    workflow = {
        "last_node_id": 30,
        "nodes": [
            {"id": int(node), "type": kind, "widgets_values": [next(iter(inputs.values()))]}
            for node, kind, inputs in loaders
        ],
        "links": [],
        "version": 0.4,
    }
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(prompt))
    info.add_text("workflow", json.dumps(workflow))
    return info


# ----------------------------------------------------------------------------- C2PA


class _Signer:
    """A throwaway ES256 chain: a root and a signing certificate named as C2PA's own test ones."""

    def __init__(self) -> None:
        import c2pa
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = datetime.datetime.now(datetime.UTC)

        def name(common: str) -> x509.Name:
            return x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, common),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "C2PA Test Signing Cert"),
                ]
            )

        def usage(*, sign: bool) -> x509.KeyUsage:
            return x509.KeyUsage(
                digital_signature=not sign, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=sign, crl_sign=sign,
                encipher_only=False, decipher_only=False,
            )  # fmt: skip

        def certificate(subject: x509.Name, issuer: x509.Name, public, signing_key, *, ca: bool):  # type: ignore[no-untyped-def]
            builder = (
                x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(issuer)
                .public_key(public)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .add_extension(usage(sign=ca), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            )
            if not ca:
                builder = builder.add_extension(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
                ).add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False
                )
            return builder.sign(signing_key, hashes.SHA256())

        root_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        root = certificate(name("C2PA Test Root"), name("C2PA Test Root"), root_key.public_key(), root_key, ca=True)
        leaf = certificate(name("C2PA Signer"), root.subject, key.public_key(), root_key, ca=False)
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, root))
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self._c2pa = c2pa
        self._signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain, private, None))

    def sign(
        self,
        jpeg: bytes,
        generator: tuple[str, str],
        actions: list[dict[str, object]],
        *,
        parent: bytes | None = None,
        remote_url: str | None = None,
    ) -> bytes:
        """``jpeg`` with a manifest (claim generator, actions, optionally a parent ingredient) embedded,
        or, with ``remote_url``, only pointed at from XMP."""
        manifest = {
            "claim_generator_info": [{"name": generator[0], "version": generator[1]}],
            "assertions": [{"label": "c2pa.actions", "data": {"actions": actions}}],
        }
        builder = self._c2pa.Builder(json.dumps(manifest))
        if parent is not None:
            ingredient = {"title": "A.jpg", "relationship": "parentOf", "label": "parent"}
            builder.add_ingredient(json.dumps(ingredient), "image/jpeg", io.BytesIO(parent))
        if remote_url is not None:
            builder.set_no_embed()
            builder.set_remote_url(remote_url)
        out = io.BytesIO()
        builder.sign(self._signer, "image/jpeg", io.BytesIO(jpeg), out)
        return out.getvalue()


def _opened(extra: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{"action": "c2pa.opened", "parameters": {"ingredientIds": ["parent"]}}, *extra]


def _created(source_type: str, agent: str | None = None) -> list[dict[str, object]]:
    action: dict[str, object] = {"action": "c2pa.created", "digitalSourceType": IPTC + source_type}
    if agent:
        action["softwareAgent"] = {"name": agent}
    return [action]


# ----------------------------------------------------------------------------- hostile files


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body and CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def pixel_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """A 2.5 KB PNG whose header declares ``width`` x ``height`` grey pixels."""
    rows = zlib.compress(bytes((width + 1) * 64), 9)  # 64 scanlines of zeros; the rest never comes
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def corrupt_scan(jpeg: bytes) -> bytes:
    """``jpeg`` with a restart marker in the middle of entropy-coded data that has no restart
    interval: Pillow still decodes it (libjpeg only warns), a strict decoder does not."""
    start = jpeg.index(b"\xff\xda")
    start += 2 + int.from_bytes(jpeg[start + 2 : start + 4], "big")
    middle = (start + len(jpeg)) // 2
    while jpeg[middle - 1] == 0xFF:  # not between a 0xFF and its stuffed zero
        middle += 1
    return jpeg[:middle] + b"\xff\xd3" + jpeg[middle:]


# ----------------------------------------------------------------------------- the corpus


def build(root: Path) -> None:
    """Write the whole corpus under ``root``."""
    for folder in ("real", "generated", "c2pa", "c2pa-ai", "formats", "bad"):
        (root / folder).mkdir(parents=True)

    canon = photo(1024, 683, 1)
    panasonic = photo(1024, 759, 2)
    earth = photo(375, 375, 3)
    lightroom = "Adobe Lightroom 5.3 (Macintosh)"
    real = {
        "IMG_0003.jpg": (canon, camera_exif("Canon", "Canon EOS REBEL T3", lightroom, "2011:07:30 15:41:25"),
                         xmp_packet(lightroom)),
        "P1000827.jpg": (panasonic, camera_exif("Panasonic", "DMC-ZS60", lightroom, "2019:06:07 14:56:19"),
                         xmp_packet(lightroom, "digitalCapture")),
        "earth_apollo17.jpg": (earth, camera_exif("", "", "Adobe Photoshop 21.1 (Macintosh)", "2020:03:26 10:30:06"),
                               xmp_packet("Adobe Photoshop CS Windows")),
    }  # fmt: skip
    for name, (image, exif, xmp) in real.items():
        (root / "real" / name).write_bytes(encode(image, "JPEG", quality=90, exif=exif, xmp=xmp))

    for seed, (name, (width, height, loaders)) in enumerate(sorted(COMFYUI.items()), start=10):
        png = encode(photo(width, height, seed), "PNG", pnginfo=comfyui_chunks(loaders), compress_level=1)
        (root / "generated" / name).write_bytes(png)

    signer = _Signer()
    plain = {seed: encode(photo(640, 427, seed), "JPEG", quality=88) for seed in range(30, 36)}
    c2pa_files = {
        "C.jpg": signer.sign(plain[30], ("make_test_images", "0.33.1"), _created("algorithmicMedia", "Make Test Images 0.33.1")),
        "CA.jpg": signer.sign(plain[31], ("make_test_images", "0.33.1"),
                              _opened([{"action": "c2pa.color_adjustments", "parameters": {"name": "brightnesscontrast"}}]),
                              parent=plain[32]),
        "C_with_CAWG_data.jpg": signer.sign(plain[33], ("c2pa cawg test", "0.58.0"), _created("digitalCapture")),
        "cloud.jpg": signer.sign(encode(earth, "JPEG", quality=90, exif=real["earth_apollo17.jpg"][1]),
                                 ("synthguard corpus", "1"), _created("digitalCapture"), remote_url=REMOTE_MANIFEST_URL),
        "no_manifest.jpg": encode(photo(700, 500, 34), "JPEG", quality=85, progressive=True,
                                   exif=camera_exif("", "", "Adobe Photoshop 24.1 (Macintosh)", "2022:11:07 14:20:44")),
    }  # fmt: skip
    for name, data in c2pa_files.items():
        (root / "c2pa" / name).write_bytes(data)
    made_by_ai = signer.sign(plain[35], ("Image Model", "3"), _created("compositeWithTrainedAlgorithmicMedia", "ImageGen"))
    ai_files = {
        "trained.jpg": signer.sign(plain[34], ("Image Model", "3"), _created("trainedAlgorithmicMedia", "ImageGen 2")),
        # Only the ingredient says AI; the active manifest opened and adjusted it.
        "composite_ingredient.jpg": signer.sign(
            plain[31], ("Editor", "1.0"), _opened([{"action": "c2pa.color_adjustments"}]), parent=made_by_ai
        ),
    }
    for name, data in ai_files.items():
        (root / "c2pa-ai" / name).write_bytes(data)

    formats = root / "formats"
    from pillow_heif import register_heif_opener

    register_heif_opener()
    photo(1200, 800, 40).save(formats / "sample1.heic", "HEIF", quality=80, xmp=xmp_packet("Camera App"))
    photo(600, 400, 41).save(formats / "sample1.avif", "AVIF", quality=70)
    frames = [photo(135, 135, 42 + n).quantize(64) for n in range(6)]
    frames[0].save(formats / "sample1.gif", save_all=True, append_images=frames[1:], duration=60, loop=0)
    png_text = PngImagePlugin.PngInfo()
    png_text.add_text("date:create", "2024-01-20T18:08:41+00:00")
    png_text.add_text("exif:Make", "Canon")
    canon.save(formats / "sample1.png", "PNG", pnginfo=png_text, exif=real["IMG_0003.jpg"][1])
    photo(1050, 700, 43).save(formats / "sample1.webp", "WEBP", quality=80)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    photo(1053, 600, 44).save(formats / "mars.webp", "WEBP", quality=80, icc_profile=srgb)
    earth.save(formats / "test.tiff", "TIFF", tiffinfo={700: xmp_packet("Adobe Photoshop CS Windows")})
    pages = [photo(848, 1088, 45 + n).convert("1") for n in range(3)]
    pages[0].save(formats / "MultiPage.tif", "TIFF", save_all=True, append_images=pages[1:], compression="group4",
                  software="PIXTIFF Version 0.92 (Pixel Translations Inc)")  # fmt: skip

    bad = root / "bad"
    whole = (root / "real" / "P1000827.jpg").read_bytes()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (bad / "corrupt_scan.jpg").write_bytes(corrupt_scan(whole))
    (bad / "not_an_image.jpg").write_bytes(b"Hello, this is plain text pretending to be a JPEG.\n" * 20)
    (bad / "image.svg").write_bytes(
        b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"><rect width="100" height="100" fill="red"/></svg>'
    )
    (bad / "bomb_40000x40000.png").write_bytes(pixel_bomb())
    (root / "README.md").write_text(
        "# The test corpus\n\nWritten by tests/corpus.py: not images, and not to be scanned as one.\n", encoding="utf-8"
    )


def corpus_dir() -> Path:
    """The corpus, built on first use on this machine for this version of this file."""
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    target = Path(tempfile.gettempdir()) / f"synthguard-test-corpus-{digest}"
    if target.is_dir():
        return target
    scratch = Path(tempfile.mkdtemp(prefix=f"{target.name}-", dir=target.parent))
    try:
        build(scratch / "corpus")
        try:
            os.replace(scratch / "corpus", target)
        except OSError:
            if not target.is_dir():  # not another session's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
