"""Print what a run will need before it starts: parameters, per-GPU memory, SVD init plan, and
the step time at a stated GPU bf16 peak and MFU (``--peak-tflops``, ``--mfu``).

    python launch/plan.py --config configs/qwen32b.yaml --nodes 1 --gpus-per-node 8
    python launch/plan.py --config configs/llama70b.yaml --nodes 4 --gpus-per-node 8 --svd-gflops 20000 --json

No weights are read and no GPU is used: the model is built on the meta device from its
config.json (configs/models/<org>--<name>.json for a hub id). Formulas: dude_dist/planner.py.
"""

import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    from dude_dist.cli import base_parser

    p = base_parser(__doc__)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--svd-gflops", type=float, default=None,
                   help="SVD throughput of one GPU in Gflop/s (default: measure this machine's CPU)")
    p.add_argument("--model-config", default=None, help="a config.json (or its folder) to plan from")
    p.add_argument("--reserve-gb", type=float, default=2.0, help="CUDA context/NCCL/slack allowance in GiB")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="one GPU's dense bf16 peak in TFLOP/s, for the step time (default 989: H100/H200 SXM)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the step time")
    p.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeed's estimator comparison")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from dude_dist.cli import run_cli

    def body() -> None:
        from dude_dist.config_loader import load_config
        from dude_dist.planner import format_plan, plan_run

        cfg = load_config(args.config, args.overrides)
        # Libraries that log to stdout (DeepSpeed does) must not corrupt --json.
        with contextlib.redirect_stdout(sys.stderr):
            plan = plan_run(cfg, args.nodes, args.gpus_per_node, gpu_memory_gb=args.gpu_memory_gb,
                            svd_gflops=args.svd_gflops, model_config=args.model_config,
                            reserve_gb=args.reserve_gb, compare_deepspeed=not args.no_deepspeed,
                            peak_tflops=args.peak_tflops, mfu=args.mfu)
        print(json.dumps(plan.to_dict(), indent=1) if args.json else format_plan(plan))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
