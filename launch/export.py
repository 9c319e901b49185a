"""Export a trained DuDe run as a plain Hugging Face model (W' folded into Linear weights).

    python launch/export.py --config configs/tiny_cpu.yaml --checkpoint auto --out exported/
    deepspeed --num_gpus 8 launch/export.py --config configs/llama70b.yaml --checkpoint auto --out DIR

--checkpoint auto takes the newest complete checkpoint under output_dir. With several
ranks and ZeRO-3 the base model stays partitioned and is gathered one layer at a time.
The result loads with plain `transformers`, no dude_dist needed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from dude_dist.cli import base_parser, run_cli

    p = base_parser(__doc__)
    p.add_argument("--checkpoint", default="auto", help="checkpoint directory, or auto (newest under output_dir)")
    p.add_argument("--out", required=True, help="folder for the merged model")
    args = p.parse_args(argv)

    def body() -> None:
        from dude_dist.checkpoint import find_resume
        from dude_dist.config import load_config
        from dude_dist.distributed import init_distributed
        from dude_dist.export import export_merged, rebuild_model
        from dude_dist.models import load_tokenizer
        from dude_dist.tracking import setup_logging

        cfg = load_config(args.config, args.overrides)
        root = Path(cfg.output_dir) / "checkpoints"
        ckpt = find_resume(root) if args.checkpoint == "auto" else Path(args.checkpoint)
        if ckpt is None:
            raise FileNotFoundError(f"no complete checkpoint under {root}")
        env = init_distributed(cfg.deepspeed.backend, cfg.deepspeed.timeout_s)
        setup_logging(env.rank)
        export_merged(rebuild_model(cfg, ckpt, env.world_size), load_tokenizer(cfg.model), args.out, env.rank)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
