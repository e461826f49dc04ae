"""The one settings object, read from ``SYNTHGUARD_*`` environment variables.

Production code calls :func:`get_settings`; tests build :class:`Settings`
explicitly with the values they need.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The published "For Fake's Sake" weights (Sumsub, CC-BY-SA-3.0).
PUBLISHED_CHECKPOINT = "hf://Sumsub/Sumsub-ffs-synthetic-1.0_mj_5"
DEFAULT_ARCH = "tf_mobilenetv3_large_100"
# URL schemes redis-py connects to.
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Settings(BaseSettings):
    """Every knob of synthguard. All optional; defaults suit one machine."""

    model_config = SettingsConfigDict(
        env_prefix="SYNTHGUARD_", extra="ignore", protected_namespaces=()
    )

    database_url: str = Field(
        "sqlite:///synthguard.db",
        description="SQLAlchemy URL. Embedded default: a SQLite file in the working directory; "
        "production: postgresql+psycopg://...",
    )
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker URL.")
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint; unset means AWS (credentials and region from AWS_*)."
    )

    model_arch: str = Field(DEFAULT_ARCH, description="timm architecture name.")
    model_checkpoint: str | None = Field(
        None,
        description="Local file or directory, or hf://OWNER/REPO[/FILE]. "
        f"Unset: the published weights, {PUBLISHED_CHECKPOINT}.",
    )
    model_allow_pickle: bool = Field(
        False,
        description="Allow checkpoints that are whole pickled Python objects. Unpickling runs code "
        "from the file: enable only for files you trust.",
    )
    model_ai_index: int | None = Field(
        None,
        ge=0,
        description="Output index of the 'by AI' class. Unset: from the checkpoint's label names "
        "when it has them, else 0 (the reference pipeline's order).",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    precision: Literal["auto", "float32", "tf32", "float16", "bfloat16"] = Field(
        "auto",
        description="Arithmetic of the forward pass. float32 is the reference (strict IEEE, TF32 off) and "
        "what auto means on every device; tf32, float16 and bfloat16 (autocast) are faster on a GPU but "
        "move scores by more than 1e-3 (see bench/RESULTS.md), so they are opt-in and need CUDA.",
    )

    model_freeze_cpu: bool = Field(
        True,
        description="On a CPU, run the model traced and frozen by TorchScript (batch norm folded into the "
        "convolutions) in channels_last: about twice the eager rate. Checked at load against the eager "
        "model, which runs instead when probabilities differ by more than 1e-5 or the model cannot be "
        "traced. No effect on CUDA.",
    )

    batch_size: int = Field(32, ge=1, description="Most images in one forward pass.")
    batch_wait_ms: float = Field(
        10.0, ge=0, description="Longest wait for a batch to fill after its first image arrives."
    )
    bulk_chunk: int = Field(
        32,
        ge=1,
        le=1000,
        description="Most image ids in one synthguard.bulk message. A worker thread claims a chunk in one "
        "statement, scores its images one after another and stores their results in one transaction, so "
        "the broker, claim and store costs are paid once per chunk. While realtime messages wait, a "
        "worker that also consumes the realtime lane hands the rest of a chunk back to the bulk queue "
        "after the image in hand. Realtime messages always carry one image.",
    )
    realtime_standby: int = Field(
        1,
        ge=0,
        description="Threads of a worker that consumes both synthguard.realtime and synthguard.bulk that "
        "score no bulk chunk: each holds a chunk unclaimed and gives it back to the bulk queue as soon as a "
        "realtime message waits, so that message finds a free thread at once. Bulk keeps the other "
        "threads (at least one). 0: every thread scores bulk, and realtime messages wait for a thread to "
        "end an image and hand its chunk back.",
    )
    concurrency: int = Field(
        8,
        ge=1,
        description="Threads fetching and decoding images for one model (scan and worker). Left unset "
        "beside preparing processes: two per process, at least 8.",
    )
    prepare_processes: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="Child processes that decode, read provenance and preprocess images for this worker's "
        "model, one image each at a time; 0 runs those stages in the worker's own threads. The provenance "
        "readers hold Python's GIL, so threads spread them over about one core; processes use them all. "
        "auto: one per usable core (affinity and cgroup CPU quota); a CPU model then runs on the cores "
        "they leave (at least one intra-op thread) unless OMP_NUM_THREADS is set. Children also isolate "
        "the decoders: a crash fails only the image it was reading (corrupt_image), and one that overruns "
        "twice SYNTHGUARD_DECODE_TIMEOUT_S is killed (decode_timeout).",
    )
    device_decode: bool = Field(
        False,
        description="Decode JPEGs on the model's device (nvJPEG through torchvision on CUDA), and there read "
        "their Stable Diffusion watermark and resize, crop and normalise them by timm's data config. The "
        "preparing processes still sniff the bytes, check the pixel cap from the header, check the "
        "entropy-coded data strictly (a decode at reduced DCT scale, which also feeds the PDQ hash) and read "
        "the metadata: a third to a fifth of their CPU per JPEG on the CPU path. Other formats, CMYK JPEGs and "
        "JPEGs the device refuses take the CPU path. Opt-in: scores move by up to 2e-4 against the CPU path "
        "(measured on the CPU device; not yet on a GPU, bench/RESULTS.md), past the 1e-5 the default keeps. "
        "On a CPU device it only moves decoding into the worker's own process.",
    )
    threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="Default flag threshold on p(synthetic)."
    )

    provenance_flags: bool = Field(
        True,
        description="Let a strong provenance signal (C2PA or IPTC generative-AI source type, generator "
        "parameters, Stable Diffusion watermark) flag an image even when its score is under the threshold.",
    )

    result_cache: bool = Field(
        True,
        description="Reuse a result for identical bytes: an image whose sha256 the same API client already "
        "had scored by the same model version takes that result (score, provenance, hash; its verdict under "
        "its own threshold) and names it in cached_from. Never across clients. The object is still fetched "
        "to hash it; decode, provenance and the forward pass are saved.",
    )
    pdq_hash: bool = Field(
        True,
        description="Compute every decoded image's PDQ perceptual hash (images.pdq), which the bank of known "
        "AI images matches and reviews bank. About 3.5 ms of CPU per 1024x1024 image. Off: no hash, no "
        "matching, and a review cannot bank the image (bank: no_hash); for installs that use no banks.",
    )
    bank_match_distance: int = Field(
        31,
        ge=0,
        le=255,
        description="Most bits (of 256) an image's PDQ hash, in any of its rotated or mirrored forms, may "
        "differ from a hash in its client's bank to match it. 31 is PDQ's published operating point.",
    )
    bank_min_quality: int = Field(
        50,
        ge=0,
        le=100,
        description="Least PDQ quality (0-100) a hash needs to be matched or banked: flat, featureless "
        "images hash alike and would match each other. 50 is PDQ's published operating point.",
    )
    bank_flags: bool = Field(
        True,
        description="Flag an image that matches its client's bank of known AI images, whatever its score "
        "(flagged_by names known_match). Off: the match is recorded in known_match and flags nothing.",
    )
    bank_crop: float = Field(
        0.05,
        ge=0,
        le=0.2,
        description="A review `ai` also banks hashes of crops of the image: this fraction and half of it "
        "cut from each side, this fraction from each corner's two sides, and half of it from every side at "
        "once (13 hashes), so that copies cropped by up to this much still match; PDQ alone matches trims "
        "of about 1% at each edge. A worker fetches the image again to hash them. 0: the image's own hash "
        "alone.",
    )
    bank_refresh_s: float = Field(
        5.0,
        ge=0,
        description="How often, at most, a worker reads a client's bank again for hashes added or removed "
        "since: a review reaches matching within this many seconds.",
    )

    max_frames: int = Field(
        8,
        ge=1,
        le=64,
        description="Frames of an animated GIF, WebP or PNG scored, spread evenly over it (the first and the "
        "last included); the image's score is their maximum and images.frames holds each. The pixel and time "
        "caps count every frame decoded. 1: the first frame alone, as for a still.",
    )
    min_jpeg_quality: int = Field(
        30,
        ge=0,
        le=100,
        description="A JPEG whose estimated quality (from its luminance quantisation table) is under this gets "
        "the quality hint low_jpeg_quality: its score means less. Hints never change the score. 0: never. "
        "Under 30, recompression moves the default model's input more than twice as far as a q75 re-encode "
        "(bench/quality_drift.py).",
    )

    max_image_bytes: int = Field(50 * 1024 * 1024, ge=1, description="Largest object fetched.")
    max_pixels: int = Field(
        100_000_000, ge=1, description="Largest width*height decoded, checked from the header."
    )
    decode_timeout_s: float = Field(
        15.0, gt=0, description="Time budget for decoding one image."
    )

    prepare_memory_mb: int | None = Field(
        None,
        ge=64,
        description="Address space (MiB) a preparing process may take for one image beyond what it holds "
        "once started; an image that needs more fails as too_large instead of an out-of-memory kill. "
        "Unset: 16 bytes per pixel of SYNTHGUARD_MAX_PIXELS plus 512 MiB (about 2 GiB at the default cap).",
    )

    max_attempts: int = Field(
        5, ge=1, description="Attempts per image before a transient error becomes final."
    )
    retry_backoff_s: float = Field(1.0, gt=0, description="Base of the exponential retry backoff.")
    retry_backoff_max_s: float = Field(300.0, gt=0, description="Cap of one retry backoff.")

    s3_client: Literal["botocore", "obstore"] = Field(
        "botocore",
        description="What fetches S3 objects: botocore, or obstore (Rust; a fraction of botocore's CPU "
        "per GET; needs the obstore package: pip install 'synthguard[obstore]'). HEAD and listing "
        "always use botocore.",
    )
    s3_connect_timeout_s: float = Field(5.0, gt=0, description="Seconds to open a connection to S3.")
    s3_read_timeout_s: float = Field(30.0, gt=0, description="Seconds to wait on a read from S3.")

    stale_after_s: float = Field(
        600.0, gt=0, description="When the sweeper re-publishes a queued or processing image."
    )
    sweep_interval_s: float = Field(60.0, gt=0, description="How often the sweeper runs.")

    webhook_allow_http: bool = Field(False, description="Allow plain-http callback URLs.")
    webhook_allowed_networks: Annotated[list[IPNetwork], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated CIDRs exempt from the SSRF block.",
    )

    webhook_timeout_s: float = Field(10.0, gt=0, description="Seconds one webhook attempt may take.")
    webhook_retry_schedule_s: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 28800.0],
        description="Comma-separated waits, in seconds, before each retry of a failed webhook (each with "
        "+-20% jitter); after the last, the delivery fails. Default: 5s, 30s, 2m, 10m, 30m, 1h, 2h, 4h, "
        "8h, 8h, about 24 hours in all.",
    )
    webhook_secret_overlap_s: float = Field(
        86400.0, ge=0, description="After a secret rotation, how long deliveries also carry the old signature."
    )

    @field_validator("webhook_allowed_networks", mode="before")
    @classmethod
    def _split_networks(cls, value: object) -> object:
        if isinstance(value, str):
            return [ipaddress.ip_network(part.strip(), strict=False) for part in value.split(",") if part.strip()]
        return value

    @field_validator("webhook_retry_schedule_s", mode="before")
    @classmethod
    def _split_schedule(cls, value: object) -> object:
        if isinstance(value, str):
            return [float(part) for part in value.split(",") if part.strip()]
        return value

    @field_validator("rate_limit_redis_url")
    @classmethod
    def _check_rate_limit_redis(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(REDIS_SCHEMES):
            raise ValueError("the rate limiter's counters live in Redis: a redis://, rediss:// or unix:// URL")
        return value

    @property
    def rate_limit_url(self) -> str:
        """Where the API's per-minute counters are kept: their own Redis, else the broker."""
        return self.rate_limit_redis_url or self.broker_url

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("device must be auto, cpu, cuda or cuda:N")

    @property
    def checkpoint_is_default(self) -> bool:
        """True when no checkpoint was configured and the published one is used."""
        return self.model_checkpoint is None

    @property
    def checkpoint(self) -> str:
        return self.model_checkpoint or PUBLISHED_CHECKPOINT

    api_rate_limit_per_minute: int = Field(
        600,
        ge=0,
        description="HTTP API: requests one client may make per minute (fixed window, counted in "
        "Redis: SYNTHGUARD_RATE_LIMIT_REDIS_URL, else the broker's); 0 turns rate limiting off.",
    )
    api_max_body_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="HTTP API: largest request body accepted; larger ones get 413.",
    )
    api_image_rate_limit_per_minute: int = Field(
        6000,
        ge=0,
        description="HTTP API: images one client may submit per minute (POST /v1/scans and /v1/s3-events, "
        "counted per object, in Redis); a client's own images_per_minute overrides it; 0 turns it off.",
    )
    api_address_rate_limit_per_minute: int = Field(
        1200,
        ge=0,
        description="HTTP API: requests one network address may make per minute to /v1, counted before the "
        "API key is looked up or the body read; 0 turns it off. Behind a proxy, let uvicorn trust its "
        "X-Forwarded-For (FORWARDED_ALLOW_IPS) or every caller shares the proxy's address.",
    )
    api_auth_failures_per_minute: int = Field(
        20,
        ge=0,
        description="HTTP API: failed authentications one address may make per minute; past it the address "
        "gets 429 without a database query until the minute ends; 0 turns it off.",
    )
    rate_limit_redis_url: str | None = Field(
        None,
        description="Redis that holds the HTTP API's per-minute counters (redis://, rediss:// or unix://). "
        "Unset: the broker's Redis. With a broker that is not Redis (RabbitMQ, SQS), set it, or every "
        "per-minute limit, the per-address ones in front of authentication included, is off.",
    )
    api_rate_limit_fail_open: bool = Field(
        False,
        description="When the rate limiter's Redis cannot be reached: false (the default) answers /v1 "
        "requests with 503, so no limit silently disappears; true lets them through unlimited.",
    )
    client_max_pending_realtime: int = Field(
        2000,
        ge=0,
        description="Images one client may have queued or processing on the realtime lane; past it intake "
        "answers 429. A client's max_pending_realtime overrides it; 0 turns the cap off.",
    )
    realtime_burst: int = Field(
        32,
        ge=0,
        description="Realtime images one client (or the operators' client-less intake) may have queued or "
        "processing before its next ones go to synthguard.overflow, served after every other client's "
        "realtime images, so one client's flood cannot delay the others'. 0 turns overflow off.",
    )
    client_max_pending_bulk: int = Field(
        1_000_000,
        ge=0,
        description="The same cap for the bulk lane (API and worker.enqueue; operators' backfills are not "
        "capped). 0 turns it off.",
    )
    secret_key: SecretStr | None = Field(
        None,
        description="Fernet key(s) that encrypt webhook secrets at rest, comma-separated: the first "
        "encrypts, every one decrypts, so a key can be rotated. Make one with "
        "`synthguard clients new-secret-key`. Required for the API and worker on PostgreSQL.",
    )
    allow_plaintext_secrets: bool = Field(
        False,
        description="Let the API and worker run on PostgreSQL without SYNTHGUARD_SECRET_KEY, storing "
        "webhook secrets in plain text. For trials only.",
    )
    log_format: Literal["json", "text"] | None = Field(
        None,
        description="Log lines as JSON objects or plain text. Unset: json for the service processes "
        "(worker, beat, api), text for interactive commands.",
    )
    log_object_keys: bool = Field(
        False,
        description="Let log lines carry S3 buckets and object keys (a field, bucket and object_key). "
        "Off: lines name images by id only, since keys can carry personal data (KYC uploads).",
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Worker: port of this process's Prometheus /metrics (all interfaces); unset or 0 "
        "serves none. One worker per GPU means one port per process.",
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return Settings()
