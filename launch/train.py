"""Fine-tune a causal LM with DuDe under DeepSpeed.

    python launch/train.py --config configs/tiny_cpu.yaml                       # 1 process
    deepspeed --num_gpus 8 launch/train.py --config configs/qwen32b.yaml        # one node
    torchrun --nproc_per_node 2 launch/train.py --config configs/tiny_cpu.yaml
    mpirun -np 2 -x MASTER_ADDR=127.0.0.1 python launch/train.py --config ...   # Open MPI
    sbatch launch/slurm/train.sbatch configs/llama70b.yaml                      # SLURM

Precedence: --set key=value > YAML > defaults. --resume auto continues from the newest
complete checkpoint under output_dir (the default); --resume none starts over.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from dude_dist.cli import base_parser, run_cli

    p = base_parser(__doc__)
    p.add_argument("--resume", default="auto", help="auto | none | a checkpoint directory (default: auto)")
    p.add_argument("--force-resume", action="store_true", help="resume even if model/adapter keys changed")
    args = p.parse_args(argv)

    def body() -> None:
        from dude_dist.config_loader import load_config
        from dude_dist.trainer import main as train

        train(load_config(args.config, args.overrides), resume=args.resume, force_resume=args.force_resume)

    return run_cli(body)


if __name__ == "__main__":
    from dude_dist.cli import exit_process

    exit_process(main())
