# Sourced by the GPU scripts (gpu_scale.sh, gpu_step.sh) from the project root with OUT set:
# PY is $PYTHON or python3; OUT is created; the carried .wheels/ (made by gpu_wheels.sh) go
# into a private folder put first on PYTHONPATH and PATH; DUDE_SHARED points at the carried
# .device/shared.
# shellcheck shell=bash
PY="${PYTHON:-$(command -v python3)}"
mkdir -p "$OUT"
SITE="${TMPDIR:-/tmp}/dude_gpu_site"
if compgen -G ".wheels/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .wheels/*.whl \
    > "$OUT/pip.log" 2>&1 || { echo "error: installing .wheels failed; see $OUT/pip.log"; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
fi
export DUDE_SHARED="$PWD/.device/shared" PYTHONUNBUFFERED=1
