"""Put DuDe layers into a model, read them out, and fold them back into plain Linears.

Pure torch: nothing here knows about processes. Filling the layers (the SVD initialisation,
shared out over ranks) is :func:`dude_dist.sharded_init.apply_dude`.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from dude_dist.config import DudeConfig
from dude_dist.dude import DudeLinear
from dude_dist.errors import ConfigError


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    return name == target or name.endswith("." + target)


def _linear_shape(linear: nn.Linear) -> tuple[int, int]:
    return linear.out_features, linear.in_features


def find_targets(model: nn.Module, cfg: DudeConfig) -> list[str]:
    """Names of the ``nn.Linear`` modules that ``cfg.targets`` selects, in model order.

    Raises:
        ValueError: nothing matches (the message lists the Linear names that exist), or
            ``cfg.rank`` exceeds ``min(out, in)`` of a matched layer (named).
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(_matches(name, t) for t in cfg.targets):
            names.append(name)
    if not names:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"adapter.targets {list(cfg.targets)} match no nn.Linear in {type(model).__name__}; "
            f"Linear module names there: {', '.join(suffixes) or '(none)'} "
            "(use a name suffix such as 'q_proj', or 're:<regex>' on the full module name)"
        )
    for name in names:
        out_features, in_features = _linear_shape(model.get_submodule(name))
        if cfg.rank > min(out_features, in_features):
            raise ConfigError(
                f"adapter.rank {cfg.rank} is larger than min(out, in) = {min(out_features, in_features)} "
                f"of layer {name!r} (shape [{out_features}, {in_features}]); use rank <= "
                f"{min(out_features, in_features)} or leave this layer out of adapter.targets"
            )
    return names


def inject_dude(model: nn.Module, cfg: DudeConfig, names: list[str]) -> dict[str, DudeLinear]:
    """Swap each named ``nn.Linear`` for an uninitialised ``DudeLinear``.

    The original ``weight``/``bias`` Parameter objects are moved into the new module as they
    are (so a ZeRO-3 partitioned weight stays partitioned); only ``lora_a``, ``lora_b`` and
    ``magnitude`` are new.
    """
    layers = {}
    for name in names:
        linear = model.get_submodule(name)
        device, dtype = linear.weight.device, linear.weight.dtype
        # Built on the meta device so no [out, in] tensor is allocated only to be replaced.
        dude = DudeLinear(linear.in_features, linear.out_features, cfg.rank,
                          bias=linear.bias is not None, norm_grad=cfg.norm_grad, recompute=cfg.recompute,
                          device="meta", dtype=dtype)
        dude.weight = linear.weight
        dude.weight.requires_grad_(False)
        if linear.bias is not None:
            dude.bias = linear.bias
            dude.bias.requires_grad_(False)
        for pname in dude.adapter_params():
            setattr(dude, pname, nn.Parameter(torch.zeros_like(getattr(dude, pname), device=device)))
        dude.weight_sq_norm = torch.zeros_like(dude.weight_sq_norm, device=device)
        model.set_submodule(name, dude)
        layers[name] = dude
    return layers


def set_trainable_params(model: nn.Module) -> int:
    """Freeze everything but the DuDe parameters; return the number of trainable elements."""
    for param in model.parameters():
        param.requires_grad_(False)
    count = 0
    for module in model.modules():
        if isinstance(module, DudeLinear):
            for pname in module.adapter_params():
                param = getattr(module, pname)
                param.requires_grad_(True)
                count += getattr(param, "ds_numel", param.numel())
    return count


def get_dude_layers(model: nn.Module) -> dict[str, DudeLinear]:
    """All ``DudeLinear`` modules of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DudeLinear)}


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every DuDe parameter by its name (``<layer>.lora_a``, ``.lora_b``, ``.magnitude``), in
    model order: the one list that state dicts, checkpoints and exports are keyed by."""
    return {f"{name}.{pname}": getattr(layer, pname) for name, layer in get_dude_layers(model).items()
            for pname in layer.adapter_params()}


def dude_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable DuDe tensors (``<layer>.lora_a``, ``.lora_b``, ``.magnitude``), detached copies."""
    return {key: param.detach().clone() for key, param in adapter_parameters(model).items()}


@torch.no_grad()
def load_dude_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy DuDe tensors saved by :func:`dude_state_dict` into ``model``.

    Raises:
        KeyError: a DuDe parameter of the model is missing from ``state`` (named).
        ValueError: a shape differs (named, with both shapes).
    """
    for key, param in adapter_parameters(model).items():
        if key not in state:
            raise KeyError(f"DuDe state has no {key!r}")
        if tuple(state[key].shape) != tuple(param.shape):
            raise ValueError(f"{key}: saved shape {tuple(state[key].shape)} != model shape {tuple(param.shape)}")
        param.copy_(state[key])


@torch.no_grad()
def merge_dude(model: nn.Module) -> nn.Module:
    """Fold every ``DudeLinear`` into a plain ``nn.Linear`` with weight ``W'``.

    The result is an ordinary Hugging Face model (same module names and state-dict keys
    as before :func:`apply_dude`), loadable without dude_dist.
    """
    for name, layer in get_dude_layers(model).items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=layer.weight.device, dtype=layer.weight.dtype)
        linear.weight.copy_(layer.merged_weight())
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
        linear.requires_grad_(False)
        model.set_submodule(name, linear)
    return model
