"""Sharded DuDe initialisation of stories260K under ZeRO-3, for tests.

    torchrun --nproc_per_node N tests/distributed/init_worker.py MODEL_DIR OUT_DIR [exact|randomized]

Rank 0 writes OUT_DIR/init.safetensors (full weights gathered after init, DuDe tensors,
logits on a fixed input) and OUT_DIR/stats.json.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from dude_dist.adapters import find_targets, inject_dude  # noqa: E402
from dude_dist.config import DudeConfig, ModelConfig, RunConfig, TrainConfig, batch_layout  # noqa: E402
from dude_dist.distributed import init_distributed  # noqa: E402
from dude_dist.models import load_model  # noqa: E402
from dude_dist.sharded_init import Comm, init_dude_layers  # noqa: E402
from dude_dist.zero import build_ds_config, gathered, model_init_context  # noqa: E402


def main() -> None:
    model_dir, out_dir, svd = sys.argv[1], Path(sys.argv[2]), (sys.argv[3] if len(sys.argv) > 3 else "exact")
    env = init_distributed("gloo", 120)
    cfg = RunConfig(model=ModelConfig(name_or_path=model_dir, dtype="float32"),
                    adapter=DudeConfig(rank=4, svd=svd), train=TrainConfig(micro_batch_size=1))
    ds_config = build_ds_config(cfg, batch_layout(cfg.train, env.world_size))
    with model_init_context(ds_config):
        model = load_model(cfg.model)
    layers = inject_dude(model, cfg.adapter, find_targets(model, cfg.adapter))
    stats = init_dude_layers(layers, cfg.adapter, comm=Comm())
    tensors = {}
    with gathered(list(model.parameters()), modifier_rank=None):
        for name, layer in layers.items():
            for key in ("weight", "lora_a", "lora_b", "magnitude", "weight_sq_norm"):
                tensors[f"{name}.{key}"] = getattr(layer, key).detach().clone()
        ids = torch.arange(24).remainder(500).view(2, 12) + 3
        with torch.no_grad():
            tensors["logits"] = model(input_ids=ids).logits.detach().clone()
        partitioned = all(hasattr(layer.weight, "ds_id") for layer in layers.values())
    if env.rank == 0:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "init.safetensors"))
        (out_dir / "stats.json").write_text(json.dumps({**stats.to_dict(), "partitioned": partitioned,
                                                         "world_size": env.world_size}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    from dude_dist.cli import exit_process

    main()
    exit_process(0)  # as launch/train.py: gloo's threads could abort a finished rank at interpreter exit
