#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.py needs on a GPU machine that has no network:
#
#   bash benchmarks/gpu_wheels.sh              # fills .wheels/ and .device/ (both git-ignored)
#   bash benchmarks/gpu_wheels.sh --pyarrow    # also carry pyarrow (~45 MiB) for an image without pyarrow>=24
#
# .wheels/  wheels for Python 3.12 / x86-64 of the packages a CUDA image with torch,
#           transformers and peft lacks (deepspeed and its pure-Python deps, datasets, dill,
#           multiprocess, pydantic, and py-spy for benchmarks/step_profile.py), plus transformers and peft at this environment's
#           versions, so the GPU run exercises the versions CI tests. Every version is
#           read from this project's environment (.venv, or the python on PATH), never
#           resolved anew. deepspeed is built here without compiled ops (a py3-none-any
#           wheel; training uses torch.optim.AdamW, so no op is ever built).
# .device/shared/  the tiny real model and data the GPU run trains on, in the layout of
#           ../shared (gpu_check.py points DUDE_SHARED at it): stories260K and the first
#           512 GSM8K train / 64 test records.
#
# Then, on the GPU machine, with .wheels and .device carried beside the tree:
#   bash benchmarks/gpu_check.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
SHARED="${DUDE_SHARED:-$ROOT/../shared}"
WHEELS="$ROOT/.wheels"
DEVICE="$ROOT/.device"
LIMIT_MIB="${DUDE_WHEELS_LIMIT_MIB:-60}"
WITH_PYARROW=0
for arg in "$@"; do
  case "$arg" in
    --pyarrow) WITH_PYARROW=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

# Packages missing from the GPU image (deepspeed's and datasets' requirements that it
# lacks) and the ones pinned to this environment's version.
PACKAGES=(hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions
          datasets dill multiprocess transformers peft py-spy)
[ "$WITH_PYARROW" = 1 ] && PACKAGES+=(pyarrow)

version_of() {
  "$PY" -c "import sys; from importlib.metadata import version; print(version(sys.argv[1]))" "$1"
}

rm -rf "$WHEELS"
mkdir -p "$WHEELS"

DS_VERSION="$(version_of deepspeed)"
echo "deepspeed $DS_VERSION: building a wheel without compiled ops"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$DS_VERSION" -w "$WHEELS"

PINS=()
for name in "${PACKAGES[@]}"; do
  PINS+=("$name==$(version_of "$name")")
done
echo "downloading: ${PINS[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$WHEELS" "${PINS[@]}"

# What was carried, for gpu_check.py's report (versions it expects to find there).
"$PY" - "$WHEELS" <<'EOF'
import json, sys
from importlib.metadata import version
from pathlib import Path

wheels = Path(sys.argv[1])
names = sorted(p.name for p in wheels.glob("*.whl"))
env = {n: version(n) for n in ("torch", "transformers", "peft", "deepspeed", "datasets", "accelerate")}
(wheels / "manifest.json").write_text(json.dumps({"wheels": names, "environment": env}, indent=1) + "\n")
EOF

# The data and model the GPU run trains on.
for need in "$SHARED/models/stories260K/config.json" "$SHARED/data/gsm8k/train.jsonl" "$SHARED/data/gsm8k/test.jsonl"; do
  [ -f "$need" ] || { echo "missing $need (set DUDE_SHARED to the shared/ folder)" >&2; exit 1; }
done
rm -rf "$DEVICE/shared"
mkdir -p "$DEVICE/shared/models/stories260K" "$DEVICE/shared/data/gsm8k"
cp "$SHARED"/models/stories260K/{config.json,generation_config.json,model.safetensors,special_tokens_map.json,tokenizer.json,tokenizer.model,tokenizer_config.json,SOURCE.md} \
  "$DEVICE/shared/models/stories260K/"
head -n 512 "$SHARED/data/gsm8k/train.jsonl" > "$DEVICE/shared/data/gsm8k/train.jsonl"
head -n 64 "$SHARED/data/gsm8k/test.jsonl" > "$DEVICE/shared/data/gsm8k/test.jsonl"
cp "$SHARED/data/gsm8k/LICENSE" "$DEVICE/shared/data/gsm8k/"

echo
ls -l "$WHEELS"
wheels_kib=$(du -sk "$WHEELS" | cut -f1)
device_kib=$(du -sk "$DEVICE" | cut -f1)
total_mib=$(( (wheels_kib + device_kib + 1023) / 1024 ))
echo ".wheels: $(( (wheels_kib + 1023) / 1024 )) MiB, .device: $(( (device_kib + 1023) / 1024 )) MiB, together $total_mib MiB (limit $LIMIT_MIB MiB)"
if [ "$total_mib" -gt "$LIMIT_MIB" ]; then
  echo "too large to carry: the tree and carried folders must stay under 64 MiB" >&2
  exit 1
fi
