"""Fine-tune a causal LM with DuDe under DeepSpeed.

    python launch/train.py --config configs/tiny_cpu.yaml                       # 1 process
    deepspeed --num_gpus 8 launch/train.py --config configs/qwen32b.yaml        # one node
    torchrun --nproc_per_node 2 launch/train.py --config configs/tiny_cpu.yaml
    mpirun -np 2 -x MASTER_ADDR=127.0.0.1 python launch/train.py --config ...   # Open MPI
    sbatch launch/slurm/train.sbatch configs/llama70b.yaml                      # SLURM

Precedence: --set key=value > YAML > defaults. --resume auto continues from the newest
complete checkpoint under output_dir (the default); --resume none starts over.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=10 (repeatable)")
    p.add_argument("--resume", default="auto", help="auto | none | a checkpoint directory (default: auto)")
    p.add_argument("--force-resume", action="store_true", help="resume even if model/adapter keys changed")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from dude_dist.config import DudeError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        from dude_dist.trainer import main as train

        train(cfg, resume=args.resume, force_resume=args.force_resume)
    except (DudeError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
