"""dude_dist: DuDe fine-tuning (DoRA's magnitude/direction split on a PiSSA initialisation)
of Hugging Face causal LMs with DeepSpeed ZeRO-3 and a rank-aware sharded SVD initialiser."""

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
