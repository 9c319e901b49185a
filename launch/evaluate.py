"""Evaluate a trained DuDe run (checkpoint + factor cache) or a merged export.

    python launch/evaluate.py --config configs/tiny_cpu.yaml --checkpoint auto
    python launch/evaluate.py --config configs/tiny_cpu.yaml --merged exported/ --set eval.limit=50
    deepspeed --num_gpus 8 launch/evaluate.py --config configs/qwen32b.yaml --checkpoint auto

Runs the tasks of the config's eval section (GSM8K accuracy, commonsense accuracy) and the
held-out loss of data.eval_sources; writes JSON (default <output_dir>/eval_cli.json) and
eval/* scalars to <output_dir>/tensorboard (an events.*.eval_cli file), and nothing else:
the run's factor cache, checkpoints and metrics.jsonl are only read. --checkpoint auto
takes the newest checkpoint that passes verification (a damaged newer one is skipped with
a warning); the model is rebuilt with the checkpoint's own adapter settings, and a --set
or YAML value that disagrees with them is refused.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from dude_dist.cli import base_parser, run_cli

    p = base_parser(__doc__)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default="auto", help="checkpoint directory, or auto (newest under output_dir)")
    source.add_argument("--merged", help="a merged Hugging Face folder written by launch/export.py")
    p.add_argument("--out", help="results JSON (default: <output_dir>/eval_cli.json)")
    args = p.parse_args(argv)

    def body() -> None:
        from dude_dist.config_loader import load_config
        from dude_dist.evaluate import evaluate_run

        cfg = load_config(args.config, args.overrides)
        out = Path(args.out) if args.out else None  # evaluate_run: <output_dir>/eval_cli.json
        evaluate_run(cfg, checkpoint=None if args.merged else args.checkpoint, merged=args.merged, out=out)

    return run_cli(body)


if __name__ == "__main__":
    from dude_dist.cli import exit_process

    exit_process(main())
