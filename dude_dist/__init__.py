"""dude_dist: DuDe fine-tuning (DoRA's magnitude/direction split on a PiSSA initialisation)
of Hugging Face causal LMs with DeepSpeed ZeRO-3 and a rank-aware sharded SVD initialiser.

The modules form three layers; a module imports only from its own layer or below
(``tests/unit/test_layout.py``):

* core, pure torch, no process group: the layer (``dude``), its SVD init (``svd_init``),
  injection (``adapters``), the loss, the config schema and loader, the sampler, the run
  directory, errors, logging, throughput, the training dynamics;
* distributed: the one module with collectives (``comm``), process-group start-up
  (``distributed``), DeepSpeed set-up (``zero``), the sharded init, fault handling;
* training: data, models, checkpoints, the planner, tracking, evaluation, export, the trainer.

Imports sit at the top of each module, except DeepSpeed, transformers, the hub client,
TensorBoard and the other libraries in :data:`LAZY_IMPORTS`, which are slow to import or
optional and are imported where used.
"""

from dude_dist.adapters import dude_state_dict, load_dude_state_dict, merge_dude
from dude_dist.config import DudeConfig, RunConfig
from dude_dist.config_loader import load_config
from dude_dist.dude import DudeLinear
from dude_dist.sharded_init import apply_dude

__all__ = [
    "DudeConfig",
    "DudeLinear",
    "RunConfig",
    "apply_dude",
    "dude_state_dict",
    "load_config",
    "load_dude_state_dict",
    "merge_dude",
]
__version__ = "0.1.0"

LAYERS = {
    "core": ("errors", "logs", "dude", "svd_init", "attention", "config", "config_loader", "adapters", "loss",
             "sampler", "throughput", "dynamics", "run_dir", "cli"),
    "distributed": ("comm", "zero", "failures", "distributed", "sharded_init", "layer_grads"),
    "training": ("data", "checkpoint", "models", "planner", "tracking", "export", "evaluate", "trainer"),
}
LAZY_IMPORTS = ("deepspeed", "transformers", "huggingface_hub", "mpi4py", "tensorboard", "torch.utils.tensorboard",
                "peft", "flash_attn")
