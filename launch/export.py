"""Export a trained DuDe run as a plain Hugging Face model (W' folded into Linear weights).

    python launch/export.py --config configs/tiny_cpu.yaml --checkpoint auto --out exported/
    deepspeed --num_gpus 8 launch/export.py --config configs/llama70b.yaml --checkpoint auto --out DIR
    python launch/export.py --config configs/llama70b.yaml --format peft --out adapter/   # PEFT DoRA, rank 2r

--checkpoint auto takes the newest complete checkpoint under output_dir that passes
verification (a damaged newer one is skipped with a warning). The model is rebuilt with
the checkpoint's own adapter settings; a --set or YAML value that disagrees with them is
refused. The run directory is only read (the factor cache too). The export is written
into a temporary folder beside --out and renamed into place when complete; an existing
non-empty --out is refused unless --overwrite (then it is replaced whole, never mixed).
With several ranks and ZeRO-3 the base model stays partitioned and is gathered one layer
at a time. The result loads with plain `transformers`, no dude_dist needed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from dude_dist.cli import base_parser, run_cli

    p = base_parser(__doc__)
    p.add_argument("--checkpoint", default="auto", help="checkpoint directory, or auto (newest under output_dir)")
    p.add_argument("--out", required=True, help="folder for the merged model (new or empty, or see --overwrite)")
    p.add_argument("--format", choices=("merged", "peft"), default="merged",
                   help="merged: a plain Hugging Face model with W' folded in (default); peft: a PEFT DoRA adapter "
                        "of rank 2r on the original base model (small; no process group needed)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out: the new model is written beside it and swapped in when complete")
    args = p.parse_args(argv)

    def body() -> None:
        from dude_dist.config_loader import load_config
        from dude_dist.distributed import init_distributed
        from dude_dist.export import (
            check_export_target,
            export_merged,
            export_peft,
            rebuild_model,
            resolve_checkpoint,
        )
        from dude_dist.models import load_tokenizer

        cfg = load_config(args.config, args.overrides)
        check_export_target(args.out, args.overwrite)  # before any model is built
        ckpt = resolve_checkpoint(cfg, args.checkpoint)
        if args.format == "peft":
            export_peft(cfg, ckpt, args.out, overwrite=args.overwrite)
            return
        env = init_distributed(cfg.deepspeed.backend, cfg.deepspeed.timeout_s)
        model = rebuild_model(cfg, ckpt, env.world_size, verified=True)
        export_merged(model, load_tokenizer(cfg.model), args.out, env.rank, overwrite=args.overwrite)

    return run_cli(body)


if __name__ == "__main__":
    from dude_dist.cli import exit_process

    exit_process(main())
