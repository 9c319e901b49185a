#!/usr/bin/env bash
# Entrypoint of the dude_dist GPU image: runs its arguments from the project folder.
#
#   docker run ... dude_dist deepspeed --num_gpus 8 launch/train.py --config configs/qwen32b.yaml
#   docker run ... dude_dist torchrun --nproc_per_node 8 launch/train.py --config configs/qwen32b.yaml
#   docker run ... dude_dist python launch/plan.py --config configs/llama70b.yaml --nodes 4
#   docker run ... dude_dist configs/qwen32b.yaml          # shorthand: deepspeed on all local GPUs
#   docker run -it ... dude_dist                            # a shell
set -euo pipefail

if [[ $# -eq 0 ]]; then
    exec bash
fi
if [[ "$1" == *.yaml ]]; then
    exec deepspeed launch/train.py --config "$@"
fi
exec "$@"
