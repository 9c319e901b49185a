#!/usr/bin/env bash
# The scale rehearsal on one GPU (benchmarks/scale.py --gpu), from a copy of the tree with
# .wheels/ and .device/ carried beside it (bash benchmarks/gpu_wheels.sh makes both):
#
#   bash benchmarks/gpu_scale.sh            # results in $OUT, else runs/gpu_scale/
#
# The carried wheels (DeepSpeed and what the image lacks) go into a private folder put first
# on PYTHONPATH; the tokenizer and GSM8K come from .device/shared.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-$(command -v python3)}"
OUT="${OUT:-runs/gpu_scale}"
mkdir -p "$OUT"
SITE="${TMPDIR:-/tmp}/dude_gpu_site"
if compgen -G ".wheels/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .wheels/*.whl \
    > "$OUT/pip.log" 2>&1 || { echo "error: installing .wheels failed; see $OUT/pip.log"; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export DUDE_SHARED="$PWD/.device/shared" PYTHONUNBUFFERED=1
"$PY" benchmarks/scale.py --gpu --work "${TMPDIR:-/tmp}/dude_gpu_scale" "$@" 2>&1 | tee "$OUT/gpu_scale.log"
rc=${PIPESTATUS[0]}
cp benchmarks/results/gpu_scale.* "$OUT/" 2>/dev/null
exit "$rc"
