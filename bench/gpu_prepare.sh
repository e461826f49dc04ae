#!/usr/bin/env bash
# What bench/gpu_session.sh needs on a lent GPU machine (Python 3.12, nothing reachable there), made
# here in the repository root: `.whl`, wheels of what bench/gpu.py and tests/test_cuda.py import
# beyond the packages that machine already has (torch, timm, numpy, Pillow, httpx, pytest,
# prometheus-client; /work/.library/device/KINDS.md lists them), and `.fixtures`, the shared
# fixtures under 2 MB each (the ../shared beside this checkout does not travel). Both are ignored
# by git (.git/info/exclude); carry both. Everything that travels must stay under 64 MiB.
set -euo pipefail
for folder in /.whl/ /.fixtures/; do
  grep -qx "$folder" .git/info/exclude 2>/dev/null || echo "$folder" >> .git/info/exclude
done
# The versions this checkout runs with, so that the GPU runs the same code paths.
version() { python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
wanted=()
for name in SQLAlchemy boto3 botocore s3transfer jmespath pydantic pydantic-core pydantic-settings \
            python-dotenv typing-inspection annotated-types simplejpeg pillow-heif c2pa-python toml cryptography cffi pycparser redis; do
  wanted+=("$name==$(version "$name")")
done
platforms=()
for n in 1 2014 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do
  case $n in 1) platforms+=(--platform manylinux1_x86_64);; 2014) platforms+=(--platform manylinux2014_x86_64);;
    *) platforms+=(--platform "manylinux_${n}_x86_64");; esac
done
mkdir -p .whl
for spec in "${wanted[@]}"; do
  # One at a time: pure-Python wheels (py3-none-any) match any platform, and one failure names itself.
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$spec"
done
rm -rf .fixtures && mkdir .fixtures
(cd "${FIXTURES:-../shared/fixtures}" && find . -type f -size -2048k -exec cp --parents -t "$OLDPWD/.fixtures" {} +)
du -sh .whl .fixtures
echo "all that travels: $(du -sm --exclude=.git . | cut -f1) MiB of 64"
