"""``POST /v1/scans``, ``GET /v1/scans/{id}`` and ``GET /v1/images/{id}``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from sqlalchemy import case, func, select

from worker.errors import UnsafeURL
from worker.intake import unique_refs
from worker.models import DONE, FAILED, PROCESSING, QUEUED, Image, Scan
from worker.netguard import URLPolicy
from worker.queueing import IdempotencyConflict, enqueue
from worker.reviews import latest as latest_reviews
from worker.settings import Settings
from worker.storage import ObjectRef

from .auth import AuthenticatedClient, Caller, refuse_unless_allowed
from .metrics import IMAGES_ENQUEUED, SCANS_CREATED
from .problems import ProblemError, owned, problem_responses
from .schemas import (
    EXAMPLE_IMAGE_ID,
    EXAMPLE_SCAN_ID,
    ImageDetail,
    ImageOut,
    ImageRef,
    ReviewOut,
    ScanAccepted,
    ScanCounts,
    ScanOut,
    ScanRequest,
    check_idempotency_key,
)
from .state import get_state

router = APIRouter(prefix="/v1")

MAX_PAGE = 1000

def _check_callback_url(request_body: ScanRequest, settings: Settings, client: Caller) -> None:
    """Refuse what the sender would refuse anyway (scheme, port, blocked IP literals), while the caller is here.

    Host names are resolved only at send time, where the address is pinned. A
    client limited to registered callback hosts may name only those.
    """
    url = request_body.callback_url
    if not url:
        return
    try:
        host = URLPolicy.from_settings(settings).parse_url(url).host.lower().rstrip(".")
    except UnsafeURL as exc:
        raise RequestValidationError(
            [{"type": "unsafe_url", "loc": ("body", "callback_url"), "msg": f"callback_url is refused: {exc}"}]
        ) from None
    if client.callback_hosts is not None and host not in client.callback_hosts:
        raise RequestValidationError(
            [
                {
                    "type": "callback_host_not_registered",
                    "loc": ("body", "callback_url"),
                    "msg": f"callback_url host {host!r} is not one this API client registered "
                    f"({', '.join(client.callback_hosts)})",
                }
            ]
        )


def _idempotency_key(body_key: str | None, header_key: str | None) -> str | None:
    if header_key is not None:
        try:
            check_idempotency_key(header_key)
        except ValueError as exc:
            raise ProblemError(422, f"Idempotency-Key header: {exc}", slug="invalid-idempotency-key") from None
    if body_key and header_key and body_key != header_key:
        raise ProblemError(
            422,
            "The Idempotency-Key header and the idempotency_key field differ; send one of them.",
            slug="idempotency-key-mismatch",
        )
    return body_key or header_key


@router.post(
    "/scans",
    status_code=202,
    response_model=ScanAccepted,
    tags=["scans"],
    summary="Queue S3 objects for scoring",
    description="Writes one scan and one `queued` image per object, then queues them on the chosen lane. "
    "Answers as soon as the rows are stored: a broker that cannot take the messages does not fail the "
    "request (the sweeper queues the images once it is back). When the broker is the rate limits' "
    "Redis and that is down, the request is 503 and nothing is stored, unless the operator set "
    "SYNTHGUARD_API_RATE_LIMIT_FAIL_OPEN. Follow `status_url` (also the `Location` header) for results, "
    "or receive webhooks at `callback_url`.\n\n"
    "**Idempotency**: with `idempotency_key` (or the `Idempotency-Key` header), repeating the same "
    "request answers with the first scan and the same ids (header `Idempotent-Replayed: true`) and "
    "queues nothing new; reusing the key for a different request is refused with 422.\n\n"
    "**Tenancy**: every object must lie inside this client's grants, else the whole request is 403 "
    "`not-granted` (naming the bucket) and nothing is queued; `priority` must be one of its lanes "
    "(403 `lane-not-allowed`). Each object counts against the client's images per minute, and the "
    "lane's images queued and not yet done must stay under the client's cap (429 `rate-limited` or "
    "`quota-exceeded`, with `Retry-After`).",
    responses={
        202: {"description": "The scan was accepted (or, for a replay, accepted earlier)."},
        **problem_responses(401, 403, 413, 422, 429, 503),
    },
)
def create_scan(
    body: ScanRequest,
    request: Request,
    response: Response,
    client: AuthenticatedClient,
    idempotency_key_header: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=200,
            description="Alternative to the `idempotency_key` field (IETF Idempotency-Key header).",
        ),
    ] = None,
) -> ScanAccepted:
    state = get_state(request)
    _check_callback_url(body, state.settings, client)
    key = _idempotency_key(body.idempotency_key, idempotency_key_header)
    refs = [ObjectRef(o.bucket, o.key, o.version_id) for o in body.objects]
    refuse_unless_allowed(
        state.rate_limiter.hit_images(client.id, len(unique_refs(refs)), client.images_per_minute), "images"
    )
    try:
        enqueued = enqueue(
            refs,
            priority=body.priority,
            threshold=body.threshold,
            client_id=client.id,
            callback_url=body.callback_url,
            metadata=body.metadata,
            webhook_events=body.webhook_events,
            idempotency_key=key,
            origin="api",
            settings=state.settings,
            sessions=state.sessions,
            app=state.celery,
        )
    except IdempotencyConflict:
        # Wording and status from the IETF Idempotency-Key header draft.
        raise ProblemError(
            422,
            f"The idempotency key {key!r} was already used for a different request. "
            "Reuse a key only to retry the same request; use a new key for a new one.",
            slug="idempotency-key-reused",
            title="Idempotency-Key is already used",
            idempotency_key=key,
        ) from None
    if enqueued.created:
        SCANS_CREATED.labels(enqueued.priority).inc()
        IMAGES_ENQUEUED.labels(enqueued.priority).inc(len(enqueued.image_ids))
    else:
        response.headers["Idempotent-Replayed"] = "true"
    # Repeated objects were queued once; each request entry still gets its image's id.
    ids = dict(zip(unique_refs(enqueued.refs), enqueued.image_ids, strict=True))
    status_url = str(request.url_for("get_scan", scan_id=str(enqueued.scan_id)))
    response.headers["Location"] = status_url
    return ScanAccepted(
        id=enqueued.scan_id,
        status_url=status_url,
        priority=enqueued.priority,  # type: ignore[arg-type]
        images=[
            ImageRef(id=ids[ref], bucket=ref.bucket or "", key=ref.key, version_id=ref.version_id)
            for ref in refs
        ],
    )


def _scan_state(counts: dict[str, int]) -> str:
    # Derived from the images, the source of truth, rather than from the scan's bookkeeping.
    total = sum(counts.get(s, 0) for s in (QUEUED, PROCESSING, DONE, FAILED))
    if counts.get(QUEUED, 0) + counts.get(PROCESSING, 0) == 0:
        return "completed"
    if counts.get(QUEUED, 0) == total:
        return "queued"
    return "processing"


@router.get(
    "/scans/{scan_id}",
    name="get_scan",
    response_model=ScanOut,
    tags=["scans"],
    summary="Read a scan: its progress and results",
    description="The scan's state, counts of its images per state, and its images with their scores "
    "or errors. `images` holds up to `limit` images from `offset` (ordered by bucket, key and "
    "version); `counts` and `image_count` always cover the whole scan. Scans of other API clients "
    "answer 404, as unknown ids do.",
    responses={200: {"description": "The scan."}, **problem_responses(401, 404, 422, 429, 503)},
)
def get_scan(
    scan_id: Annotated[
        str, Path(description="The scan's id, as `POST /v1/scans` returned it.", examples=[EXAMPLE_SCAN_ID])
    ],
    request: Request,
    client: AuthenticatedClient,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Most images to list.")] = MAX_PAGE,
    offset: Annotated[int, Query(ge=0, description="Images to skip before listing.")] = 0,
) -> ScanOut:
    with get_state(request).sessions() as session:
        scan = owned(session, Scan, scan_id, client.id, "scan")
        sid = scan.id
        rows = session.execute(
            select(
                Image.state,
                func.count(),
                func.coalesce(func.sum(case((Image.flagged.is_(True), 1), else_=0)), 0),
            )
            .where(Image.scan_id == sid)
            .group_by(Image.state)
        ).all()
        by_state = {row[0]: int(row[1]) for row in rows}
        images = session.scalars(
            select(Image)
            .where(Image.scan_id == sid)
            .order_by(Image.bucket, Image.key, Image.version_id, Image.id)
            .limit(limit)
            .offset(offset)
        ).all()
        return ScanOut(
            id=scan.id,
            state=_scan_state(by_state),  # type: ignore[arg-type]
            priority=scan.priority,  # type: ignore[arg-type]
            threshold=scan.threshold,
            callback_url=scan.callback_url,
            metadata=scan.meta,
            created_at=scan.created_at,
            completed_at=scan.completed_at,
            image_count=sum(by_state.values()),
            counts=ScanCounts(
                queued=by_state.get(QUEUED, 0),
                processing=by_state.get(PROCESSING, 0),
                done=by_state.get(DONE, 0),
                failed=by_state.get(FAILED, 0),
                flagged=sum(int(row[2]) for row in rows),
            ),
            images=[ImageOut.model_validate(image) for image in images],
        )


@router.get(
    "/images/{image_id}",
    response_model=ImageDetail,
    tags=["images"],
    summary="Read one image's state and result",
    description="The image's state, score (p(synthetic)), flag and what flagged it, the model that scored "
    "it, provenance signals, its PDQ hash and any match in this client's bank of known AI images, the "
    "image whose result it reused (`cached_from`, same bytes), its latest review, or the error that stopped "
    "it. Images of other API clients answer 404, as unknown ids do.",
    responses={200: {"description": "The image."}, **problem_responses(401, 404, 429, 503)},
)
def get_image(
    image_id: Annotated[str, Path(description="The image's id.", examples=[EXAMPLE_IMAGE_ID])],
    request: Request,
    client: AuthenticatedClient,
) -> ImageDetail:
    with get_state(request).sessions() as session:
        image = owned(session, Image, image_id, client.id, "image")
        review = latest_reviews(session, [image.id]).get(image.id)
        detail = ImageDetail.model_validate(image)
        return detail.model_copy(update={"review": None if review is None else ReviewOut.model_validate(review)})
