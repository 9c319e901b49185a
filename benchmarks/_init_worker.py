"""One sharded DuDe initialisation under ZeRO-3, timed (run by benchmarks/init.py).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node P benchmarks/_init_worker.py MODEL_DIR OUT_JSON \
        [--svd exact|randomized] [--rank R] [--targets q_proj v_proj]

Loads the model inside ``deepspeed.zero.Init`` (as the trainer does, so every rank holds
a 1/P shard of each weight), swaps the targets for ``DudeLinear``, waits for every rank at
a barrier, then runs :func:`dude_dist.sharded_init.init_dude_layers` and has rank 0 write
its :class:`InitStats` (plus the per-rank load seconds) to OUT_JSON.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dude_dist.adapters import find_targets, inject_dude  # noqa: E402
from dude_dist.config import DudeConfig, ModelConfig, RunConfig, TrainConfig, batch_layout  # noqa: E402
from dude_dist.distributed import init_distributed  # noqa: E402
from dude_dist.models import load_model  # noqa: E402
from dude_dist.sharded_init import Comm, init_dude_layers  # noqa: E402
from dude_dist.zero import build_ds_config, model_init_context  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("out_json")
    p.add_argument("--svd", default="exact", choices=("exact", "randomized"))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    args = p.parse_args()
    torch.set_num_threads(1)
    env = init_distributed("gloo", 600)
    cfg = RunConfig(model=ModelConfig(name_or_path=args.model_dir, dtype="float32"),
                    adapter=DudeConfig(targets=tuple(args.targets), rank=args.rank, svd=args.svd),
                    train=TrainConfig(micro_batch_size=1))
    ds_config = build_ds_config(cfg, batch_layout(cfg.train, env.world_size))
    t0 = time.perf_counter()
    with model_init_context(ds_config):
        model = load_model(cfg.model)
    load_seconds = time.perf_counter() - t0
    layers = inject_dude(model, cfg.adapter, find_targets(model, cfg.adapter))
    partitioned = all(hasattr(layer.weight, "ds_id") for layer in layers.values())
    dist.barrier()  # every rank has loaded: init's wall time does not include another rank's load
    stats = init_dude_layers(layers, cfg.adapter, comm=Comm())
    if env.rank == 0:
        record = {**stats.to_dict(), "world_size": env.world_size, "partitioned": partitioned,
                  "load_seconds_rank0": load_seconds,
                  "shapes": {name: [layer.out_features, layer.in_features] for name, layer in layers.items()}}
        record.pop("energy")
        record["energy_mean"] = sum(stats.energy.values()) / max(len(stats.energy), 1)
        Path(args.out_json).write_text(json.dumps(record, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    from dude_dist.cli import exit_process

    main()
    exit_process(0)  # as launch/train.py: gloo's threads could abort a finished rank at interpreter exit
