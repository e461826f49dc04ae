#!/usr/bin/env bash
# Build both images and run, in containers, what docker/compose.yaml runs: the
# migration, `clients create` with a grant, the API, a worker and beat. Then post
# a scan and receive its signed `image.flagged` webhook, verified with the
# `standardwebhooks` package; review that image `ai` and post its mirrored copy,
# which comes back flagged by the client's bank (`known_match`). Everything it
# starts, it stops.
#
# Around the containers, on this host (host networking throughout):
#   - PostgreSQL and Redis: SMOKE_POSTGRES_URL (an admin URL; a database of the
#     smoke's own is created and dropped) and SMOKE_REDIS_URL;
#   - an S3 server: moto's, started here (python -m moto.server);
#   - a checkpoint built with timm (random weights), mounted at /models;
#   - the webhook receiver, a few lines of Python with standardwebhooks.
# So it needs this repository installed with its test extra on the host
# (`pip install -e '.[test]'`), and a Docker daemon (../shared/tools/local-docker.sh
# starts one where no registry can be reached).
#
# Build arguments, so that the same Dockerfiles build from the real registries elsewhere:
#   BASE_IMAGE       (default python:3.11-slim-bookworm)
#   TORCH_INDEX_URL  (default https://pypi.org/simple: whichever torch build it serves)
# SMOKE_KEEP_IMAGES=1 keeps the two images afterwards; by default they are removed.
#
# Not part of .ci/run (building the worker image takes minutes); tests/test_deployment.py
# runs it when SYNTHGUARD_TEST_DOCKER=1.
set -euo pipefail

cd "$(dirname "$0")/.."
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}
SMOKE_POSTGRES_URL=${SMOKE_POSTGRES_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/postgres}
SMOKE_REDIS_URL=${SMOKE_REDIS_URL:-redis://127.0.0.1:6379/13}
TAG=smoke-$$
API_IMAGE=synthguard-api:$TAG
WORKER_IMAGE=synthguard-worker:$TAG
WORK=$(mktemp -d)
PY=${PYTHON:-python3}
started=()

say() { printf '\n== %s\n' "$*"; }
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

cleanup() {
  status=$?
  say "stopping what the smoke started"
  for name in "${started[@]}"; do
    if [ "$status" -ne 0 ]; then
      echo "--- last lines of $name"
      docker logs --tail 40 "$name" 2>&1 || true
    fi
    docker rm -f "$name" >/dev/null 2>&1 || true
  done
  [ -f "$WORK/moto.pid" ] && kill "$(cat "$WORK/moto.pid")" 2>/dev/null || true
  [ -f "$WORK/receiver.pid" ] && kill "$(cat "$WORK/receiver.pid")" 2>/dev/null || true
  [ -n "${DB_NAME:-}" ] && "$PY" - "$SMOKE_POSTGRES_URL" "$DB_NAME" <<'PY' || true
import sys
from sqlalchemy import create_engine
admin = create_engine(sys.argv[1], isolation_level="AUTOCOMMIT")
with admin.connect() as conn:
    conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{sys.argv[2]}" WITH (FORCE)')
PY
  "$PY" -c 'import redis, sys; redis.Redis.from_url(sys.argv[1]).flushdb()' "$SMOKE_REDIS_URL" || true
  if [ "${SMOKE_KEEP_IMAGES:-0}" != 1 ]; then
    docker rmi -f "$API_IMAGE" "$WORKER_IMAGE" >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
  if [ "$status" -eq 0 ]; then say "smoke passed"; else say "smoke FAILED (exit $status)"; fi
}
trap cleanup EXIT

say "building $API_IMAGE and $WORKER_IMAGE (base $BASE_IMAGE, torch from $TORCH_INDEX_URL)"
docker build --network host --build-arg BASE_IMAGE="$BASE_IMAGE" \
  -f docker/Dockerfile.api -t "$API_IMAGE" .
docker build --network host --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" \
  -f docker/Dockerfile.worker -t "$WORKER_IMAGE" .
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep ":$TAG "

say "a database, an S3 server with one upload, a checkpoint and a webhook receiver"
DB_NAME=synthguard_smoke_$$
DATABASE_URL=$("$PY" - "$SMOKE_POSTGRES_URL" "$DB_NAME" <<'PY'
import sys
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
admin = create_engine(sys.argv[1], isolation_level="AUTOCOMMIT")
with admin.connect() as conn:
    conn.exec_driver_sql(f'CREATE DATABASE "{sys.argv[2]}"')
print(make_url(sys.argv[1]).set(database=sys.argv[2]).render_as_string(hide_password=False))
PY
)
"$PY" -c 'import redis, sys; redis.Redis.from_url(sys.argv[1]).flushdb()' "$SMOKE_REDIS_URL"

export AWS_ACCESS_KEY_ID=smoke AWS_SECRET_ACCESS_KEY=smoke AWS_DEFAULT_REGION=us-east-1
S3_PORT=$(free_port)
"$PY" -m moto.server -H 127.0.0.1 -p "$S3_PORT" >"$WORK/moto.log" 2>&1 &
echo $! >"$WORK/moto.pid"
S3_URL=http://127.0.0.1:$S3_PORT

mkdir -p "$WORK/models"
"$PY" - "$S3_URL" "$WORK/models/smoke.safetensors" <<'PY'
import io, sys, time
import boto3, timm
from PIL import Image, ImageDraw, ImageOps
from safetensors.torch import save_file
from worker.settings import DEFAULT_ARCH

model = timm.create_model(DEFAULT_ARCH, num_classes=2, pretrained=False)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[2])
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
for _ in range(100):
    try:
        s3.create_bucket(Bucket="uploads")
        break
    except Exception:  # the server is still starting
        time.sleep(0.1)
# Not a flat colour: its PDQ hash must have the quality to be banked.
gradients = [Image.radial_gradient("L"), Image.linear_gradient("L"), Image.linear_gradient("L").rotate(90)]
picture = Image.merge("RGB", gradients).resize((320, 240))
draw = ImageDraw.Draw(picture)
for i in range(12):
    draw.ellipse((i * 25, i * 37 % 200, i * 25 + 40, i * 37 % 200 + 40), fill=(i * 53 % 256, i * 91 % 256, i * 29 % 256))
for key, image in (("incoming/smoke.jpg", picture), ("incoming/smoke-mirrored.jpg", ImageOps.mirror(picture))):
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    s3.put_object(Bucket="uploads", Key=key, Body=out.getvalue())
PY
chmod -R a+rX "$WORK/models"

HOOK_PORT=$(free_port)
HOOK_URL=http://127.0.0.1:$HOOK_PORT/hook

say "db upgrade, clients create (in containers)"
ENV=(-e SYNTHGUARD_DATABASE_URL="$DATABASE_URL" -e SYNTHGUARD_BROKER_URL="$SMOKE_REDIS_URL"
     -e SYNTHGUARD_S3_ENDPOINT_URL="$S3_URL" -e SYNTHGUARD_MODEL_CHECKPOINT=/models/smoke.safetensors
     -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY -e AWS_DEFAULT_REGION -e HF_HUB_OFFLINE=1
     -e SYNTHGUARD_THRESHOLD=0.0
     -e SYNTHGUARD_WEBHOOK_ALLOW_HTTP=true -e SYNTHGUARD_WEBHOOK_ALLOWED_NETWORKS=127.0.0.0/8
     -e SYNTHGUARD_SECRET_KEY="$("$PY" -c 'import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())')")
docker run --rm --network host "${ENV[@]}" "$API_IMAGE" db upgrade
CLIENT=$(docker run --rm --network host "${ENV[@]}" "$API_IMAGE" \
  clients create smoke --bucket uploads/incoming/ --webhook-url "$HOOK_URL" --json)
API_KEY=$("$PY" -c 'import json, sys; print(json.loads(sys.argv[1])["api_key"])' "$CLIENT")
HOOK_SECRET=$("$PY" -c 'import json, sys; print(json.loads(sys.argv[1])["webhook_secret"])' "$CLIENT")

"$PY" - "$HOOK_PORT" "$HOOK_SECRET" "$WORK/received.json" <<'PY' >"$WORK/receiver.log" 2>&1 &
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from standardwebhooks import Webhook

port, secret, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]

class Hook(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        try:
            payload = Webhook(secret).verify(body, dict(self.headers))
        except Exception as exc:
            print("refused:", exc, flush=True)
            self.send_response(400)
            self.end_headers()
            return
        print("verified:", payload.get("type"), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(payload) + "\n")
        self.send_response(204)
        self.end_headers()

HTTPServer(("127.0.0.1", port), Hook).serve_forever()
PY
echo $! >"$WORK/receiver.pid"

say "api, worker and beat (detached)"
run() {
  local name=$1
  shift
  started+=("$name")
  docker run -d --name "$name" --network host "${ENV[@]}" "$@" >/dev/null
}
run "smoke-api-$$" "$API_IMAGE"
# SYNTHGUARD_BANK_REFRESH_S=0: the review below reaches the worker's bank before the copy is scored.
run "smoke-worker-$$" -v "$WORK/models:/models:ro" -e SYNTHGUARD_DEVICE=cpu -e SYNTHGUARD_PREPARE_PROCESSES=0 \
  -e SYNTHGUARD_BANK_REFRESH_S=0 "$WORKER_IMAGE"
# As in compose: beat serves nothing, so the API image's HTTP health check is off for it.
run "smoke-beat-$$" --no-healthcheck "$API_IMAGE" beat

wait_healthy() {
  local name=$1 deadline=$((SECONDS + ${2:-300})) state
  while :; do
    state=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$name")
    [ "$state" = healthy ] && { echo "$name: healthy"; return 0; }
    if [ "$(docker inspect -f '{{.State.Running}}' "$name")" != true ] || [ $SECONDS -ge $deadline ]; then
      echo "$name: $state" >&2
      return 1
    fi
    sleep 2
  done
}
wait_healthy "smoke-api-$$" 120
wait_healthy "smoke-worker-$$" 300
[ "$(docker inspect -f '{{.State.Running}}' "smoke-beat-$$")" = true ] || { echo "beat exited" >&2; exit 1; }
echo "smoke-beat-$$: running (no health check, as in compose)"

say "a scan through the API, and its signed image.flagged"
"$PY" - "$API_KEY" "$WORK/received.json" <<'PY'
import json, sys, time
from pathlib import Path
import httpx

api_key, received = sys.argv[1], Path(sys.argv[2])
auth = {"Authorization": f"Bearer {api_key}"}


def flagged(key: str, **scan: object) -> dict:
    """Post a scan of KEY and wait for its verified image.flagged; its data."""
    reply = httpx.post(
        "http://127.0.0.1:8000/v1/scans",
        json={"objects": [{"bucket": "uploads", "key": key}], **scan},
        headers=auth,
        timeout=10,
    )
    assert reply.status_code == 202, reply.text
    image_id = reply.json()["images"][0]["id"]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        events = [json.loads(line) for line in received.read_text().splitlines()] if received.exists() else []
        hits = [e for e in events if e.get("type") == "image.flagged" and e["data"]["image_id"] == image_id]
        if hits:
            return hits[0]["data"]
        time.sleep(0.5)
    sys.exit(f"no verified image.flagged for {key} within 180 s")


data = flagged("incoming/smoke.jpg")
assert data["key"] == "incoming/smoke.jpg" and "score" in data["flagged_by"], data
print(f"image.flagged for {data['image_id']}, score {data['score']:.3f}, signature verified")
status = httpx.get(f"http://127.0.0.1:8000/v1/images/{data['image_id']}", headers=auth)
assert status.status_code == 200 and status.json()["state"] == "done" and status.json()["pdq"], status.text

review = httpx.post(f"http://127.0.0.1:8000/v1/images/{data['image_id']}/review", json={"verdict": "ai"}, headers=auth)
assert review.status_code == 201 and review.json()["bank"] == "added", review.text
# Threshold 1: no score flags it, only the bank can.
copy = flagged("incoming/smoke-mirrored.jpg", threshold=1.0)
assert copy["flagged_by"] == ["known_match"] and copy["known_match"]["image_id"] == data["image_id"], copy
print(f"its mirrored copy flagged by the bank, {copy['known_match']['distance']} bits away, signature verified")
PY
