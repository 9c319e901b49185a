#!/usr/bin/env bash
# End-to-end throughput and the step profile on one GPU, from a copy of the tree with .wheels/
# and .device/ carried beside it (bash benchmarks/gpu_wheels.sh makes both):
#
#   bash benchmarks/gpu_step.sh             # results in $OUT, else runs/gpu_step/
#
# 1. benchmarks/train.py: dude_dist vs HF Trainer + PEFT DoRA+PiSSA and LoRA on the
#    Qwen2.5-0.5B-shaped model, 1 GPU, bf16, ZeRO-3, all seven projections adapted
#    (results gpu_train_all7.{json,md}).
# 2. benchmarks/step_profile.py: where dude_dist's and PEFT LoRA's steps spend their time
#    under py-spy, same configuration (results gpu_step_profile.{json,md}; the raw stacks
#    too). PROFILE_SYSTEMS="dude_dist" profiles one system only.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT="${OUT:-runs/gpu_step}"
# shellcheck source=benchmarks/gpu_env.sh
source benchmarks/gpu_env.sh
WORK="${TMPDIR:-/tmp}/dude_gpu_step"
ALL7=(q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)
read -r -a PROFILED <<< "${PROFILE_SYSTEMS:-dude_dist peft_lora}"
rc=0
"$PY" benchmarks/train.py --nproc 1 --dtype bfloat16 --sizes qwen0.5b-v32k --steps-large 12 --targets "${ALL7[@]}" \
  --name gpu_train_all7 --work-dir "$WORK" --timeout 240 2>&1 | tee "$OUT/gpu_train_all7.log"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
cp benchmarks/results/gpu_train_all7.* "$OUT/" 2>/dev/null
"$PY" benchmarks/step_profile.py --nproc 1 --dtype bfloat16 --sizes qwen0.5b-v32k --steps 12 --targets "${ALL7[@]}" \
  --systems "${PROFILED[@]}" --name gpu_step_profile --work-dir "$WORK" --timeout 240 2>&1 \
  | tee "$OUT/gpu_step_profile.log"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
cp benchmarks/results/gpu_step_profile.* "$OUT/" 2>/dev/null
cp "$WORK"/*.log "$WORK"/*.pyspy.txt "$OUT/" 2>/dev/null
exit "$rc"
