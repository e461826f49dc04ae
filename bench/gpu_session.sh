#!/usr/bin/env bash
# The GPU checks in one run on a lent GPU machine (bench/RESULTS.md, "For the next session with a
# GPU"). Prepare here first (bash bench/gpu_prepare.sh), then, through the device tool:
#   carry [".service"]:            bash bench/gpu_session.sh service     (the whole service path, issue 20
#                                  step 5: about 4-6 minutes; bench/gpu_service.sh)
#   carry [".whl", ".fixtures"]:   bash bench/gpu_session.sh             (every other step, about 8-10 minutes)
# One call carries at most 64 MiB, so the service step's packages travel on their own. Steps by
# name: cuda-tests, model-decoding-pipeline, gpujpeg, provenance-cost, service; with none named,
# every step but `service`. Every step writes its output under $OUT (or ./gpu-session), and a step
# that fails or runs out of its time does not stop the next.
set -uo pipefail
out="${OUT:-gpu-session}"
mkdir -p "$out"
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(cuda-tests model-decoding-pipeline gpujpeg provenance-cost)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -f .service/site.tar.xz ]; then
  mkdir -p /tmp/site && tar -C /tmp/site -xJf .service/site.tar.xz \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" PATH="/tmp/site/bin:$PATH" \
    || { echo "the service's packages did not unpack" | tee "$out/steps.log"; exit 1; }
elif compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" || { echo "wheels did not install" | tee "$out/steps.log"; exit 1; }
fi
fixtures=.fixtures
[ -d "$fixtures" ] || fixtures=../shared/fixtures
export SYNTHGUARD_TEST_FIXTURES="$(cd "$fixtures" 2>/dev/null && pwd)"
step() {  # step NAME SECONDS COMMAND...: only the steps asked for
  local name=$1 limit=$2 wanted=""; shift 2
  for s in "${steps[@]}"; do [ "$s" = "$name" ] && wanted=1; done
  [ -n "$wanted" ] || return 0
  echo "== $name ($(date -u +%T), at most ${limit}s): $*" | tee -a "$out/steps.log"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "   exit $?" | tee -a "$out/steps.log"
  tail -n 40 "$out/$name.log"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; python3 -c \
  'import torch, timm, PIL; print("torch", torch.__version__, "timm", timm.__version__, "Pillow", PIL.__version__)'; } \
  > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
step service 480 bash bench/gpu_service.sh "$out"
step cuda-tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
step model-decoding-pipeline 300 python3 bench/gpu.py --sections model,decoding,pipeline --seconds 3 --out "$out/main"
step gpujpeg 120 python3 bench/gpu.py --sections gpujpeg --fixtures "$fixtures" --out "$out/gpujpeg"
# The host's per-core speed against the 2-core VMs' (bench/RESULTS.md, night section): decode and
# provenance of one image in one thread, to scale the worker's per-image Python to this host.
step provenance-cost 60 python3 bench/provenance_cost.py --runs 3
