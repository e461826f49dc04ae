"""Database models: ``api_clients`` and their ``client_grants``, ``scans``, ``images``,
``image_reviews``, ``hash_bank``, ``webhook_deliveries`` and ``webhook_endpoints``.

The schema changes only through Alembic migrations in ``migrations/``; a test
fails when these models and the migrations disagree.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Image states. ``done`` and ``failed`` are terminal.
QUEUED = "queued"
PROCESSING = "processing"
DONE = "done"
FAILED = "failed"
TERMINAL_STATES = (DONE, FAILED)

PRIORITIES = ("realtime", "bulk")

# Webhook delivery states. ``delivered`` and ``failed`` are terminal.
DELIVERY_PENDING = "pending"
DELIVERY_DELIVERED = "delivered"
DELIVERY_FAILED = "failed"

JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """``moment`` in UTC. Naive means UTC: every time synthguard writes is UTC, and SQLite
    hands back timezone-aware columns without their zone."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp column whose values always come back aware, in UTC, on any backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else as_utc(value)

    def coerce_compared_value(self, op: Any, value: Any) -> Any:
        # As the plain column type would: ``updated_at - timedelta(...)`` binds an interval.
        return self.impl.coerce_compared_value(op, value)


class Base(DeclarativeBase):
    # Named constraints keep migrations reproducible on PostgreSQL and SQLite alike.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UtcDateTime(),
        dict[str, Any]: JSONType,
        uuid.UUID: Uuid(),
    }


class ApiClient(Base):
    """A producer allowed to submit scans; its API key is stored only as a hash."""

    __tablename__ = "api_clients"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    api_key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    api_key_prefix: Mapped[str] = mapped_column(String(16))
    # Key rotation: the previous key still authenticates until this time.
    api_key_previous_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    api_key_previous_until: Mapped[datetime | None]
    # Every bucket, explicitly (single-tenant installs); otherwise only its grants.
    all_buckets: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    # Lanes it may queue on; NULL: every lane.
    lanes: Mapped[list[str] | None] = mapped_column(JSONType)
    # Images queued and not yet terminal, per lane; NULL: the SYNTHGUARD_CLIENT_MAX_PENDING_* default.
    max_pending_realtime: Mapped[int | None] = mapped_column(Integer)
    max_pending_bulk: Mapped[int | None] = mapped_column(Integer)
    # Images per minute through the API; NULL: SYNTHGUARD_API_IMAGE_RATE_LIMIT_PER_MINUTE.
    images_per_minute: Mapped[int | None] = mapped_column(Integer)
    # Hosts a scan's callback_url may name; NULL: any host the URL policy allows.
    callback_hosts: Mapped[list[str] | None] = mapped_column(JSONType)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    # Encrypted with SYNTHGUARD_SECRET_KEY (Fernet) where one is set; see worker.secretbox.
    webhook_secret: Mapped[str | None] = mapped_column(String(200))
    # Rotation: the previous secret still signs deliveries until this time.
    webhook_secret_previous: Mapped[str | None] = mapped_column(String(200))
    webhook_secret_previous_until: Mapped[datetime | None]
    # Set when the endpoint answered 410 Gone or kept failing; the client sees why.
    webhook_disabled_at: Mapped[datetime | None]
    webhook_disabled_reason: Mapped[str | None] = mapped_column(Text)
    default_threshold: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled_at: Mapped[datetime | None]

    grants: Mapped[list[ClientGrant]] = relationship(
        back_populates="client", order_by="[ClientGrant.bucket, ClientGrant.prefix]", cascade="all, delete-orphan"
    )


class ClientGrant(Base):
    """One bucket, or one key prefix in it, that a client may have scored."""

    __tablename__ = "client_grants"
    __table_args__ = (UniqueConstraint("client_id", "bucket", "prefix", name="uq_client_grants_client_id_bucket_prefix"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    client_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_clients.id", ondelete="CASCADE"), index=True)
    bucket: Mapped[str] = mapped_column(String(63))
    # "" grants the whole bucket; otherwise keys that start with it (a plain string prefix, as S3 lists).
    prefix: Mapped[str] = mapped_column(String(1024), default="", server_default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    client: Mapped[ApiClient] = relationship(back_populates="grants")


class Scan(Base):
    """One request to score a set of images (an API call, an S3 event, a CLI run)."""

    __tablename__ = "scans"
    __table_args__ = (
        CheckConstraint("priority IN ('realtime', 'bulk')", name="priority"),
        UniqueConstraint("client_id", "idempotency_key", name="uq_scans_client_id_idempotency_key"),
        # Intake sums a client's open scans on a lane (tenancy.pending_images); finished ones stay out.
        Index(
            "ix_scans_open_client_id_priority",
            "client_id",
            "priority",
            postgresql_where=text("completed_at IS NULL"),
            sqlite_where=text("completed_at IS NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    client_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_clients.id"), index=True)
    origin: Mapped[str] = mapped_column(String(32))
    source: Mapped[str | None] = mapped_column(Text)
    priority: Mapped[str] = mapped_column(String(16), default="realtime")
    threshold: Mapped[float | None] = mapped_column(Float)
    callback_url: Mapped[str | None] = mapped_column(Text)
    # "metadata" is reserved on declarative classes; the column keeps the contract name.
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    # Webhook event types this scan asked for; NULL means the default, image.flagged only.
    webhook_events: Mapped[list[str] | None] = mapped_column(JSONType)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    image_count: Mapped[int] = mapped_column(Integer, default=0)
    # Images not yet terminal. Decremented in the transaction that makes one
    # terminal, so exactly one writer sees it reach zero and completes the scan.
    pending_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None]

    images: Mapped[list[Image]] = relationship(back_populates="scan", order_by="Image.created_at")


class Image(Base):
    """One object to score, and its result: the unit of work and of audit."""

    __tablename__ = "images"
    __table_args__ = (
        CheckConstraint("state IN ('queued', 'processing', 'done', 'failed')", name="state"),
        Index("ix_images_state_updated_at", "state", "updated_at"),
        Index("ix_images_bucket_key", "bucket", "key"),
        # The same S3 event delivered twice must not create a second image.
        UniqueConstraint("client_id", "dedupe_key", name="uq_images_client_id_dedupe_key"),
        # The result cache: a client's earlier result for the same bytes (worker.result_cache).
        Index("ix_images_client_id_sha256", "client_id", "sha256"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    scan_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("scans.id"), index=True)
    client_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_clients.id"), index=True)
    # A NULL bucket is a local file from a CLI scan; ``key`` is then its path.
    bucket: Mapped[str | None] = mapped_column(String(255))
    key: Mapped[str] = mapped_column(Text)
    version_id: Mapped[str | None] = mapped_column(String(1024))
    etag: Mapped[str | None] = mapped_column(String(200))
    dedupe_key: Mapped[str | None] = mapped_column(String(128))
    sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    format: Mapped[str | None] = mapped_column(String(16))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=QUEUED)
    score: Mapped[float | None] = mapped_column(Float)
    flagged: Mapped[bool | None]
    threshold: Mapped[float] = mapped_column(Float)
    model_name: Mapped[str | None] = mapped_column(String(200))
    model_version: Mapped[str | None] = mapped_column(String(100))
    provenance: Mapped[dict[str, Any] | None]
    # Why it is flagged: "score", "provenance", "known_match" (null unless flagged).
    flagged_by: Mapped[list[str] | None] = mapped_column(JSONType)
    # The image whose result was reused: same client, same bytes, same model (Scorer._reused).
    cached_from: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("images.id"))
    # PDQ perceptual hash (64 hex digits) and its quality (0-100), of the decoded pixels.
    pdq: Mapped[str | None] = mapped_column(String(64))
    pdq_quality: Mapped[int | None] = mapped_column(Integer)
    # All eight rotated and mirrored forms (32 bytes each, pdq first): a reuse of this result
    # (cached_from) matches the bank as a fresh decode would, mirrored copies included.
    pdq_forms: Mapped[bytes | None] = mapped_column(LargeBinary(256))
    # The banked image it matched: {"image_id": ..., "distance": ...} (worker.hashbank).
    known_match: Mapped[dict[str, Any] | None]
    # Who made it, from its provenance evidence: {"name", "tool", "model", "signal", "raw"}
    # (worker.attribution); null without evidence, never from the score.
    generator: Mapped[dict[str, Any] | None]
    # What the model may not judge well: {"hints": [...], "short_side", "input_side", "jpeg_quality",
    # "min_jpeg_quality"} (worker.quality); never changes the score.
    quality: Mapped[dict[str, Any] | None]
    # An animation's frames: {"count": in the file, "scored": [{"index", "score"}, ...]}; the score is
    # their maximum. Null for a still image.
    frames: Mapped[dict[str, Any] | None]
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When the state last changed: the sweeper's measure of "left too long".
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None]

    scan: Mapped[Scan] = relationship(back_populates="images")

    @property
    def uri(self) -> str:
        if self.bucket is None:
            return self.key
        suffix = f"?versionId={self.version_id}" if self.version_id else ""
        return f"s3://{self.bucket}/{self.key}{suffix}"


class ImageReview(Base):
    """A person's decision on one image: ``ai`` or ``human``, by whom and when. The latest one counts."""

    __tablename__ = "image_reviews"
    __table_args__ = (
        CheckConstraint("verdict IN ('ai', 'human')", name="verdict"),
        Index("ix_image_reviews_image_id_created_at", "image_id", "created_at"),
        # eval --from-reviews reads a client's reviews since a moment.
        Index("ix_image_reviews_client_id_created_at", "client_id", "created_at"),
        # The sweeper looks for crops left pending by a lost message; few rows are ever pending.
        Index(
            "ix_image_reviews_crops_pending",
            "crops_at",
            postgresql_where=text("crops = 'pending'"),
            sqlite_where=text("crops = 'pending'"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    image_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    client_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_clients.id", ondelete="CASCADE"))
    verdict: Mapped[str] = mapped_column(String(8))
    note: Mapped[str | None] = mapped_column(Text)
    # Who decided: the API client's name and, when the request said, its reviewer; or the operator.
    reviewer: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The hashes of the image's crops (worker.cropbank), for a review `ai`: `pending` until a worker
    # banks them, then `banked`, `superseded` (a later review decides) or why not (an error code).
    # NULL: no crops to bank (a review `human`, SYNTHGUARD_BANK_CROP=0, or no hash banked).
    crops: Mapped[str | None] = mapped_column(String(32))
    crops_at: Mapped[datetime | None]  # when crops last changed or were last sent to a worker


class HashBankEntry(Base):
    """One PDQ hash in a client's bank of known AI images (NULL client: the operator's, for ``scan``).

    Removal keeps the row (``removed_at``): workers refresh their in-memory
    index from rows changed since they last looked, removals included.
    """

    __tablename__ = "hash_bank"
    __table_args__ = (
        CheckConstraint("source IN ('review', 'review_crop', 'import')", name="source"),
        UniqueConstraint("client_id", "hash", name="uq_hash_bank_client_id_hash"),
        # Workers read a bank's changes by version (worker.hashbank.Banks).
        Index("ix_hash_bank_client_id_version", "client_id", "version"),
        # A review `human` removes an image's crops by its id; deleting an image nulls its rows.
        Index("ix_hash_bank_image_id", "image_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    client_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_clients.id", ondelete="CASCADE"))
    hash: Mapped[str] = mapped_column(String(64))
    quality: Mapped[int | None] = mapped_column(Integer)
    # The reviewed image that put it here (source review, or review_crop: a crop of it); NULL for an import.
    image_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"))
    source: Mapped[str] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    removed_at: Mapped[datetime | None]
    # The bank's version (bank_versions) of the transaction that last changed the row; NULL for
    # rows last changed before versions were kept, which only a whole load reads.
    version: Mapped[int | None] = mapped_column(BigInteger)


class BankVersion(Base):
    """How many times a bank has changed: the counter that orders its changes.

    A transaction that changes a bank first increments its row here (worker.hashbank),
    which holds the row until it commits, so a later one's version is always the
    higher: workers read ``hash_bank`` rows with a version above the last they
    saw, and no change that commits late is passed over.
    """

    __tablename__ = "bank_versions"

    # The client's id; the nil UUID for the operator's bank (client NULL in hash_bank).
    bank: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, default=0)


class WebhookDelivery(Base):
    """Transactional outbox: one event for one client endpoint, and its attempts."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        # One logical event per image and type: a redelivered task cannot add a second.
        UniqueConstraint("image_id", "event_type", name="uq_webhook_deliveries_image_id_event_type"),
        Index("ix_webhook_deliveries_state_next_attempt_at", "state", "next_attempt_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    client_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("api_clients.id"), index=True)
    scan_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("scans.id"), index=True)
    image_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("images.id"))
    event_type: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(16), default=DELIVERY_PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    # A message for this delivery is in flight (or an attempt running) until then;
    # after it, the sweeper publishes again.
    sending_until: Mapped[datetime | None]
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    # One entry per attempt: time, HTTP status, latency, error.
    attempt_log: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]


class WebhookEndpoint(Base):
    """A scan's callback URL that synthguard stopped sending to (410 Gone, or it kept failing).

    The client's own ``webhook_url`` keeps its state on ``api_clients``; a failing
    callback URL disables only itself, never the client's endpoint.
    """

    __tablename__ = "webhook_endpoints"
    __table_args__ = (UniqueConstraint("client_id", "url", name="uq_webhook_endpoints_client_id_url"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    client_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_clients.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    disabled_at: Mapped[datetime | None]
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
