#!/usr/bin/env bash
# The throughput figures of one GPU in one call of under 10 minutes, from a copy of the tree
# with .wheels/ and .device/ carried beside it (bash benchmarks/gpu_wheels.sh makes both):
#
#   bash benchmarks/gpu_step.sh             # results in $OUT, else runs/gpu_step/
#
# A device run returns at most 8 files, so $OUT receives gpu_step.tar.gz (every record, log
# and raw stack, rewritten after each stage so that a run cut short keeps what it measured),
# each stage's Markdown table and skipped.txt; the stages write into $WORK/results.
#
# In order of importance, each stage only if the time left allows it (STEP_BUDGET seconds
# in all, default 560):
# 1. benchmarks/gpu_check.py, stages setup, layer_bench and bf16_sync: the DuDe layer
#    against LoRA and PEFT DoRA in bf16, and the host syncs of a bf16 training step under
#    sync-debug mode (results in $OUT/check/).
# 2. benchmarks/loss_memory.py on the GPU: the chunked loss against F.cross_entropy of a
#    float32 copy at 2048 tokens x 152k, bf16 (gpu_loss_memory.{json,md}).
# 3. benchmarks/train.py: dude_dist vs HF Trainer + PEFT DoRA+PiSSA and LoRA on the
#    Qwen2.5-0.5B-shaped model, 1 GPU, bf16, ZeRO-3, all seven projections adapted
#    (gpu_train_all7.{json,md}).
# 4. benchmarks/train.py --packing: dude_dist on GSM8K at max_seq_len 1024, padded
#    micro-batches against packed rows, same model, bf16, flash_attention_2 where flash_attn
#    is installed, else sdpa (gpu_train_packing.{json,md}).
# 5. benchmarks/step_profile.py: where dude_dist's and PEFT LoRA's steps spend their time
#    under py-spy, same configuration (gpu_step_profile.{json,md}; the raw stacks too).
#    PROFILE_SYSTEMS="dude_dist" profiles one system only.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT="${OUT:-runs/gpu_step}"
# shellcheck source=benchmarks/gpu_env.sh
source benchmarks/gpu_env.sh
BUDGET="${STEP_BUDGET:-560}"
WORK="${TMPDIR:-/tmp}/dude_gpu_step"
RES="$WORK/results"
rm -rf "$RES" "$OUT/skipped.txt" "$WORK"/*.log "$WORK"/*.pyspy.txt && mkdir -p "$RES" || exit 1
ALL7=(q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)
read -r -a PROFILED <<< "${PROFILE_SYSTEMS:-dude_dist peft_lora}"
rc=0
left() { echo $((BUDGET - SECONDS)); }
# stage NAME NEEDED_SECONDS: true if NEEDED_SECONDS are left, else says it is skipped
stage() {
  if [ "$(left)" -lt "$2" ]; then
    echo "[gpu_step] $1 skipped: $(left) s left of $BUDGET, it needs about $2" | tee -a "$OUT/skipped.txt"
    rc=1
    return 1
  fi
  echo "[gpu_step] $1 ($(left) s left)"
  touch "$RES/.started"
}
# fresh NAME: this stage's benchmarks/results/NAME.* into $RES, not the committed ones of an earlier run
fresh() {
  find benchmarks/results -maxdepth 1 -name "$1.*" -newer "$RES/.started" -exec cp {} "$RES/" \;
}
# bundle MARKDOWN...: the stage's tables into $OUT, everything so far into $OUT/gpu_step.tar.gz
bundle() {
  for md in "$@"; do cp "$RES/$md" "$OUT/" 2>/dev/null; done
  cp "$WORK"/*.log "$WORK"/*.pyspy.txt "$RES/" 2>/dev/null
  if ! tar -czf "$OUT/gpu_step.tar.gz.part" -C "$RES" . || ! mv "$OUT/gpu_step.tar.gz.part" "$OUT/gpu_step.tar.gz"; then
    echo "[gpu_step] could not write $OUT/gpu_step.tar.gz"
    rm -f "$OUT/gpu_step.tar.gz.part"
    rc=1
  fi
}

if stage "layer and sync check" 150; then
  "$PY" benchmarks/gpu_check.py --stages setup layer_bench bf16_sync --out "$RES/check" --budget 170 \
    2>&1 | tee "$RES/gpu_check_run.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  cp "$RES/check/gpu_check.md" "$RES/" 2>/dev/null
  bundle gpu_check.md
fi
if stage "loss memory" 40; then
  "$PY" benchmarks/loss_memory.py --device cuda --name gpu_loss_memory 2>&1 | tee "$RES/gpu_loss_memory.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  fresh gpu_loss_memory
  bundle gpu_loss_memory.md
fi
if stage "end-to-end throughput" 200; then
  "$PY" benchmarks/train.py --nproc 1 --dtype bfloat16 --sizes qwen0.5b-v32k --steps-large 12 --targets "${ALL7[@]}" \
    --name gpu_train_all7 --work-dir "$WORK" --timeout 200 2>&1 | tee "$RES/gpu_train_all7.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  fresh gpu_train_all7
  bundle gpu_train_all7.md
fi
if stage "packed vs padded" 160; then
  "$PY" benchmarks/train.py --packing --nproc 1 --dtype bfloat16 --sizes qwen0.5b-v32k --modes padded packed \
    --steps 12 --skip-large 4 --attn auto --name gpu_train_packing --work-dir "$WORK" \
    --timeout "$(( ($(left) - 40) / 2 ))" \
    2>&1 | tee "$RES/gpu_train_packing.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  fresh gpu_train_packing
  bundle gpu_train_packing.md
fi
if stage "step profile" 120; then
  "$PY" benchmarks/step_profile.py --nproc 1 --dtype bfloat16 --sizes qwen0.5b-v32k --steps 12 \
    --targets "${ALL7[@]}" --systems "${PROFILED[@]}" --name gpu_step_profile --work-dir "$WORK" \
    --timeout "$(( $(left) / ${#PROFILED[@]} ))" 2>&1 | tee "$RES/gpu_step_profile.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  fresh gpu_step_profile
  bundle gpu_step_profile.md
fi
cp "$OUT/skipped.txt" "$RES/" 2>/dev/null
bundle
echo "[gpu_step] done in ${SECONDS} s, exit $rc; $OUT: $(cd "$OUT" && echo *)"
exit "$rc"
