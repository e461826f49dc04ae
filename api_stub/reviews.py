"""``POST /v1/images/{id}/review``: a person's decision on an image, and its effect on the client's bank."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request

from worker.models import Image
from worker.queueing import publish_crops
from worker.reviews import NotScoredYet, record

from .auth import AuthenticatedClient
from .problems import ProblemError, owned, problem_responses
from .schemas import EXAMPLE_IMAGE_ID, ReviewIn, ReviewOut, ReviewRecorded
from .state import get_state

router = APIRouter(prefix="/v1")


@router.post(
    "/images/{image_id}/review",
    status_code=201,
    response_model=ReviewRecorded,
    tags=["images"],
    summary="Record a person's decision on an image",
    description="Stores the decision with who made it and when; `GET /v1/images/{id}` shows the latest. "
    "`ai` puts the image's PDQ hash in this client's bank of known AI images: later images of this client "
    "within the match distance (re-encoded, resized, rotated, mirrored or lightly trimmed copies) carry "
    "`known_match` and are flagged with `flagged_by` naming it, whatever their score. A worker then fetches "
    "the image again and banks the hashes of crops of it too (`crops`: `pending`, then `banked`), so that "
    "copies cropped by up to SYNTHGUARD_BANK_CROP (5%) match as well. `human` takes the image's hashes out "
    "again. Banks are per client: one client's reviews never affect another's images. Workers "
    "pick up the change within SYNTHGUARD_BANK_REFRESH_S. `synthguard eval --from-reviews` measures the "
    "detector against these decisions. An image still queued or processing answers 409; images of other "
    "API clients answer 404, as unknown ids do.",
    responses={201: {"description": "The review was recorded."}, **problem_responses(401, 404, 409, 422, 429, 503)},
)
def review_image(
    image_id: Annotated[str, Path(description="The image's id.", examples=[EXAMPLE_IMAGE_ID])],
    body: ReviewIn,
    request: Request,
    client: AuthenticatedClient,
) -> ReviewRecorded:
    state = get_state(request)
    with state.sessions.begin() as session:
        image = owned(session, Image, image_id, client.id, "image")
        try:
            recorded = record(
                session,
                image,
                body.verdict,
                reviewer=body.reviewer or client.name,
                note=body.note,
                min_quality=state.settings.bank_min_quality,
                crop_fraction=state.settings.bank_crop,
            )
        except NotScoredYet as exc:
            raise ProblemError(409, str(exc), slug="not-scored-yet") from None
        out = ReviewRecorded(**ReviewOut.model_validate(recorded.review).model_dump(), bank=recorded.bank)
    if recorded.crops_pending:
        # After the commit, so that the worker finds the review; a message lost here is the sweeper's.
        publish_crops(state.celery, [out.id])
    return out
