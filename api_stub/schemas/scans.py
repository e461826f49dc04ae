"""Bodies of ``POST /v1/scans``, ``GET /v1/scans/{id}`` and ``GET /v1/images/{id}``."""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.sanitise import first_unsafe
from worker.storage import (
    MAX_KEY_BYTES,
    MAX_VERSION_ID_LENGTH,
    check_bucket_name,
    check_object_key,
    check_version_id,
)

from .common import EXAMPLE_IMAGE_ID, EXAMPLE_SCAN_ID, UtcDatetime

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_METADATA_BYTES",
    "MAX_OBJECTS",
    "MAX_URL_LENGTH",
    "FrameScore",
    "FramesOut",
    "GeneratorOut",
    "ImageDetail",
    "ImageOut",
    "ImageRef",
    "KnownMatch",
    "ObjectIn",
    "QualityOut",
    "ReviewIn",
    "ReviewOut",
    "ReviewRecorded",
    "ScanAccepted",
    "ScanCounts",
    "ScanOut",
    "ScanRequest",
    "check_idempotency_key",
]

MAX_OBJECTS = 1000
MAX_METADATA_BYTES = 4096
# Deeper metadata is refused (422) before it is walked or stored.
MAX_JSON_DEPTH = 32
MAX_URL_LENGTH = 2048


class ObjectIn(BaseModel):
    """One S3 object to score."""

    model_config = ConfigDict(extra="forbid")

    bucket: str = Field(
        min_length=1,
        max_length=255,
        description="Bucket name, by S3's naming rules: 3 to 63 lowercase letters, digits, '.' and '-'. "
        "ARNs, access points and Object Lambda aliases are refused.",
        examples=["uploads"],
    )
    key: str = Field(
        min_length=1,
        description=f"Object key, not URL-encoded; at most {MAX_KEY_BYTES} bytes as UTF-8, no control "
        "characters, no '.' or '..' path segments, and not a 'folder' (ending in '/').",
        examples=["2026/05/avatar-123.jpg"],
    )
    version_id: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_VERSION_ID_LENGTH,
        description="A specific version of a versioned object; omitted: the latest version when fetched.",
        examples=["3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY"],
    )

    @field_validator("bucket")
    @classmethod
    def _check_bucket(cls, bucket: str) -> str:
        return check_bucket_name(bucket)

    @field_validator("key")
    @classmethod
    def _check_key(cls, key: str) -> str:
        return check_object_key(key)

    @field_validator("version_id")
    @classmethod
    def _check_version_id(cls, version_id: str | None) -> str | None:
        return None if version_id is None else check_version_id(version_id)


def _check_json_text(value: Any, path: str, depth: int = 0) -> None:
    """Every key and string of a JSON value is text the database stores: no NUL, control
    characters (but tab and newlines) or lone surrogates; the error names where."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{path} is nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        if (found := first_unsafe(value)) is not None:
            raise ValueError(f"{path} contains {found}")
    elif isinstance(value, dict):
        for key, item in value.items():
            if (found := first_unsafe(str(key))) is not None:
                raise ValueError(f"a key of {path} contains {found}")
            _check_json_text(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_text(item, f"{path}[{index}]", depth + 1)


def check_idempotency_key(key: str) -> str:
    """``key``, unless it holds text the database must not store; shared by the field and the header."""
    if (found := first_unsafe(key)) is not None:
        raise ValueError(f"idempotency_key contains {found}")
    return key


class ScanRequest(BaseModel):
    """A request to score S3 objects."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "objects": [
                        {"bucket": "uploads", "key": "2026/05/avatar-123.jpg"},
                        {
                            "bucket": "uploads",
                            "key": "2026/05/id-front.png",
                            "version_id": "3HL4kqtJlcpXroDTD",
                        },
                    ],
                    "priority": "realtime",
                    "threshold": 0.8,
                    "callback_url": "https://hooks.example.com/synthguard",
                    "metadata": {"user_id": "u_42", "flow": "kyc"},
                    "idempotency_key": "upload-7f3a9",
                }
            ]
        },
    )

    objects: list[ObjectIn] = Field(
        min_length=1,
        max_length=MAX_OBJECTS,
        description=f"The objects to score, 1 to {MAX_OBJECTS} (more: 413). The same object listed twice "
        "is scored once; both entries of the answer carry its id.",
    )
    priority: Literal["realtime", "bulk"] = Field(
        "realtime",
        description="`realtime` (uploads, KYC: served first) or `bulk` (backfills: served when realtime "
        "work is idle). Realtime images past the client's burst (SYNTHGUARD_REALTIME_BURST queued or "
        "processing, 32 by default) wait behind other clients' realtime images.",
    )
    threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Flag an image when p(synthetic) >= threshold. Omitted: the client's default, else the "
        "server's (SYNTHGUARD_THRESHOLD).",
        examples=[0.8],
    )
    callback_url: str | None = Field(
        None,
        max_length=MAX_URL_LENGTH,
        description="Where to POST signed webhooks (`image.flagged`, `scan.completed`) for this scan. "
        "Must be https (plain http only where the operator allows it), on port 443 (80 for http) unless "
        "the operator allows the network, with no credentials and no blocked address; one rule "
        "(worker.netguard.URLPolicy) checks it here and again at every send.",
        examples=["https://hooks.example.com/synthguard"],
    )
    webhook_events: list[Literal["image.flagged", "scan.completed"]] | None = Field(
        None,
        description="Webhook events this scan sends to `callback_url` (or the client's webhook URL): "
        "`image.flagged` for each flagged image, `scan.completed` once every image is terminal. "
        "Omitted: `image.flagged` only.",
        examples=[["image.flagged", "scan.completed"]],
    )
    metadata: dict[str, Any] | None = Field(
        None,
        description=f"Your own JSON object, stored with the scan and sent back in webhooks; at most "
        f"{MAX_METADATA_BYTES} bytes as compact JSON.",
        examples=[{"user_id": "u_42", "flow": "kyc"}],
    )
    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Makes retries safe: the same key with the same request answers with the first scan "
        "(no new images); the same key with a different request is refused (422). May also be sent as "
        "the `Idempotency-Key` header.",
        examples=["upload-7f3a9"],
    )

    @field_validator("idempotency_key")
    @classmethod
    def _check_idempotency_key(cls, key: str | None) -> str | None:
        return None if key is None else check_idempotency_key(key)

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, metadata: dict[str, Any] | None) -> dict[str, Any] | None:
        if metadata is not None:
            _check_json_text(metadata, "metadata")
            try:
                text = json.dumps(metadata, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
            except ValueError:
                raise ValueError("metadata must be plain JSON: NaN and Infinity are not allowed") from None
            size = len(text.encode())
            if size > MAX_METADATA_BYTES:
                raise ValueError(
                    f"metadata is {size} bytes as JSON; at most {MAX_METADATA_BYTES} are allowed"
                )
        return metadata


class ImageRef(BaseModel):
    """An image queued for scoring."""

    id: uuid.UUID = Field(description="The image's id: `GET /v1/images/{id}`.", examples=[EXAMPLE_IMAGE_ID])
    bucket: str = Field(description="Bucket name.", examples=["uploads"])
    key: str = Field(description="Object key.", examples=["2026/05/avatar-123.jpg"])
    version_id: str | None = Field(None, description="Object version, when one was given.", examples=[None])


class ScanAccepted(BaseModel):
    """A scan was accepted: its images are queued."""

    id: uuid.UUID = Field(description="The scan's id.", examples=[EXAMPLE_SCAN_ID])
    status_url: str = Field(
        description="Where to read the scan's progress and results.",
        examples=[f"https://synthguard.example.com/v1/scans/{EXAMPLE_SCAN_ID}"],
    )
    priority: Literal["realtime", "bulk"] = Field(description="The lane the images were queued on.")
    images: list[ImageRef] = Field(description="One entry per requested object, in request order.")


class ScanCounts(BaseModel):
    """How many of a scan's images are in each state."""

    queued: int = Field(description="Waiting for a worker.", examples=[3])
    processing: int = Field(description="Being fetched, decoded or scored.", examples=[1])
    done: int = Field(description="Scored.", examples=[6])
    failed: int = Field(description="Could not be scored; see each image's `error_code`.", examples=[0])
    flagged: int = Field(description="Scored and at or over their threshold.", examples=[2])


class KnownMatch(BaseModel):
    """The bank entry an image matched."""

    image_id: uuid.UUID | None = Field(
        description="The reviewed image that put the hash in the bank; null for an imported hash.",
        examples=[EXAMPLE_IMAGE_ID],
    )
    distance: int = Field(description="Bits (of 256) the hashes differ by.", examples=[6])
    hash: str | None = Field(None, description="The banked hash, 64 hex digits.")
    source: Literal["review", "review_crop", "import"] | None = Field(
        None,
        description="How the hash entered the bank: `review` (the reviewed image's own hash), `review_crop` "
        "(the hash of a crop of it, banked so that cropped copies match), `import`.",
    )
    label: str | None = Field(None, description="The label an imported hash came with.", examples=[None])


class GeneratorOut(BaseModel):
    """Who made an image, as its provenance evidence names it."""

    name: str = Field(
        description="The model when known, else the tool, else the value as written.", examples=["Stable Diffusion XL"]
    )
    tool: str | None = Field(
        description="The application or service, normalised (`ComfyUI`, `Adobe Firefly`, `Midjourney`, ...).",
        examples=["ComfyUI"],
    )
    model: str | None = Field(
        description="The model or model family, normalised (`Stable Diffusion XL`, `FLUX.1 [dev]`, ...).",
        examples=["Stable Diffusion XL"],
    )
    signal: Literal["c2pa", "generation_params", "iptc_xmp", "sd_watermark", "exif_software"] = Field(
        description="The provenance signal it came from, the strongest that names one: a C2PA manifest "
        "declaring generative AI, the generation parameters a tool wrote, IPTC/XMP, the Stable Diffusion "
        "watermark's family, the EXIF Software tag.",
        examples=["generation_params"],
    )
    raw: str = Field(description="The value as the file wrote it.", examples=["sd_xl_base_1.0.safetensors"])


class FrameScore(BaseModel):
    """One scored frame of an animation."""

    index: int = Field(description="The frame's position in the file, from 0.", examples=[0])
    score: float = Field(description="Its p(synthetic).", examples=[0.91])


class FramesOut(BaseModel):
    """The frames of an animation that were scored."""

    count: int = Field(description="Frames in the file.", examples=[48])
    scored: list[FrameScore] = Field(
        description="Up to SYNTHGUARD_MAX_FRAMES frames spread evenly over the animation, first and last "
        "included, each with its score; the image's `score` is their maximum."
    )


class QualityOut(BaseModel):
    """What the model may not judge well in this input; the score is unchanged by it."""

    hints: list[Literal["below_input_size", "low_jpeg_quality"]] = Field(
        description="`below_input_size`: the short side is under the model's input (it was enlarged to be "
        "scored); `low_jpeg_quality`: the JPEG's estimated quality is under SYNTHGUARD_MIN_JPEG_QUALITY. "
        "Empty: none. A threshold policy may treat a hinted image as unsure.",
        examples=[["below_input_size"]],
    )
    short_side: int = Field(description="The image's short side, in pixels.", examples=[64])
    input_side: int = Field(description="The model's input, short side (its data config).", examples=[224])
    jpeg_quality: int | None = Field(
        description="A JPEG's quality (1-100), estimated from its luminance quantisation table as libjpeg "
        "scales it; null for other formats.",
        examples=[None],
    )
    min_jpeg_quality: int = Field(description="The setting the JPEG quality was held to.", examples=[30])


class ReviewIn(BaseModel):
    """A person's decision on an image."""

    model_config = ConfigDict(extra="forbid")

    verdict: Literal["ai", "human"] = Field(
        description="`ai`: the image is AI-generated; its hash enters this client's bank, so re-uploads of it "
        "(re-encoded, resized, lightly cropped, rotated or mirrored) are flagged. `human`: it is not; its "
        "hash leaves the bank."
    )
    note: str | None = Field(None, max_length=2000, description="Free text kept with the decision.")
    reviewer: str | None = Field(
        None,
        max_length=200,
        description="Who decided, in your terms (a moderator's id). Omitted: the API client's name.",
        examples=["moderator-17"],
    )


class ReviewOut(BaseModel):
    """A recorded review."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID = Field(description="The review's id.")
    image_id: uuid.UUID = Field(description="The image reviewed.", examples=[EXAMPLE_IMAGE_ID])
    verdict: Literal["ai", "human"] = Field(description="The decision.")
    note: str | None = Field(description="The note, if one was given.")
    reviewer: str = Field(description="Who decided.", examples=["moderator-17"])
    created_at: UtcDatetime = Field(description="When (UTC).")
    crops: str | None = Field(
        None,
        description="For `ai`: the hashes of crops of the image, which make copies cropped by up to "
        "SYNTHGUARD_BANK_CROP (5%) match. `pending` until a worker has fetched the image again and banked "
        "them (seconds), then `banked`, `superseded` (a later review of the image decided first), `off`, or "
        "the error code that stopped it (`object_changed`: the object's bytes are not the ones scored; "
        "`object_not_found`, `access_denied`, ...). Null: no crops to bank (`human`, crops off, or the "
        "image's own hash was not banked).",
        examples=["pending"],
    )


class ReviewRecorded(ReviewOut):
    """A review, and what it did to the client's bank of known AI images."""

    bank: Literal["added", "already_banked", "removed", "not_banked", "no_hash", "low_quality"] = Field(
        description="`added` / `already_banked` (ai), `removed` / `not_banked` (human), `no_hash` (the image "
        "was never decoded), `low_quality` (its hash is too featureless to match on, so it was not banked)."
    )


class ImageOut(BaseModel):
    """One image: where it is, its state and, once done, its score."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID = Field(description="The image's id.", examples=[EXAMPLE_IMAGE_ID])
    bucket: str | None = Field(description="Bucket name.", examples=["uploads"])
    key: str = Field(description="Object key.", examples=["2026/05/avatar-123.jpg"])
    version_id: str | None = Field(
        description="Object version: as requested, or as fetched.", examples=[None]
    )
    etag: str | None = Field(
        description="ETag of the bytes scored (set when fetched).",
        examples=["9b2cf535f27731c974343645a3985328"],
    )
    state: Literal["queued", "processing", "done", "failed"] = Field(
        description="`queued`, `processing`, `done` (scored) or `failed` (see `error_code`)."
    )
    score: float | None = Field(
        description="p(synthetic) from 0 to 1: how likely the image was AI-generated; for an animation, the "
        "highest of its scored frames (`frames`). Null unless done.",
        examples=[0.93],
    )
    flagged: bool | None = Field(
        description="Whether the image is flagged: its score reached the threshold, a strong provenance signal "
        "says AI, or it matches its client's bank of known AI images (`flagged_by` says which). Null unless "
        "done, and when an untrained model gave no verdict.",
        examples=[True],
    )
    flagged_by: list[Literal["score", "provenance", "known_match"]] | None = Field(
        None,
        description="What flagged it: `score`, `provenance`, `known_match`; null unless flagged.",
        examples=[["score"]],
    )
    threshold: float = Field(description="The flag threshold this image was judged by.", examples=[0.8])
    model_name: str | None = Field(
        description="Model architecture that scored it.", examples=["tf_mobilenetv3_large_100"]
    )
    model_version: str | None = Field(
        description="`sha256:` and the first 12 hex digits of the weights' hash.",
        examples=["sha256:1a2b3c4d5e6f"],
    )
    provenance: dict[str, Any] | None = Field(
        description="Provenance signals read from the file (C2PA, EXIF, generator tags).", examples=[None]
    )
    cached_from: uuid.UUID | None = Field(
        None,
        description="When this client had the same bytes scored by the same model before: that image, whose "
        "score, provenance and hash were reused (the verdict is this image's own, under its threshold).",
        examples=[None],
    )
    pdq: str | None = Field(
        None,
        description="PDQ perceptual hash of the decoded pixels, 64 hex digits; null until decoded.",
        examples=["f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22"],
    )
    pdq_quality: int | None = Field(
        None,
        description="PDQ's quality of that hash, 0-100: under the bank's minimum (50 by default), the image "
        "is neither matched nor banked.",
        examples=[100],
    )
    known_match: KnownMatch | None = Field(
        None,
        description="The hash in this client's bank that the image (or a rotated or mirrored form) is within "
        "the match distance of; null when none.",
    )
    generator: GeneratorOut | None = Field(
        None,
        description="Which generator made the image, when its provenance names one (C2PA, generation "
        "parameters, IPTC/XMP, the SD watermark); null without such evidence: never a guess from the score.",
    )
    frames: FramesOut | None = Field(
        None,
        description="For an animated GIF, WebP or PNG: the frames scored and each one's score (the image's "
        "score is their maximum); null for a still image.",
    )
    quality: QualityOut | None = Field(
        None,
        description="Quality hints: whether the input is below the model's input size or a heavily "
        "compressed JPEG, so that its score means less. Never changes the score; null until scored.",
    )
    error_code: str | None = Field(
        description="Why the image could not be scored (`object_not_found`, `corrupt_image`, ...); null "
        "unless failed or retrying.",
        examples=[None],
    )
    error_message: str | None = Field(description="The error in words.", examples=[None])
    attempts: int = Field(description="How many times scoring was attempted.", examples=[1])
    created_at: UtcDatetime = Field(description="When the image was queued (UTC).")
    completed_at: UtcDatetime | None = Field(description="When it reached `done` or `failed` (UTC).")


class ImageDetail(ImageOut):
    """One image, with the scan it belongs to and its latest review."""

    scan_id: uuid.UUID = Field(description="The scan this image belongs to.", examples=[EXAMPLE_SCAN_ID])
    review: ReviewOut | None = Field(
        None, description="The latest review of this image (`POST /v1/images/{id}/review`); null when none."
    )


class ScanOut(BaseModel):
    """A scan: its progress, and each image's state and result."""

    id: uuid.UUID = Field(description="The scan's id.", examples=[EXAMPLE_SCAN_ID])
    state: Literal["queued", "processing", "completed"] = Field(
        description="`queued` (no image started), `processing` (some started, some not yet final) or "
        "`completed` (every image done or failed)."
    )
    priority: Literal["realtime", "bulk"] = Field(description="The lane its images were queued on.")
    threshold: float | None = Field(
        description="The threshold the request asked for, if any.", examples=[0.8]
    )
    callback_url: str | None = Field(description="Where webhooks for this scan go, if set.", examples=[None])
    metadata: dict[str, Any] | None = Field(
        description="The metadata sent with the request.", examples=[{"flow": "kyc"}]
    )
    created_at: UtcDatetime = Field(description="When the scan was accepted (UTC).")
    completed_at: UtcDatetime | None = Field(description="When its last image became final (UTC).")
    image_count: int = Field(
        description="How many images the scan has (`images` may be one page of them).", examples=[10]
    )
    counts: ScanCounts = Field(description="Images per state, over the whole scan.")
    images: list[ImageOut] = Field(
        description="The scan's images, ordered by bucket, key and version; paged by `limit` and `offset`."
    )
