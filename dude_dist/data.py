"""Training data: records through ``datasets``, prompts by format, response-only labels.

    sources (JSON / JSONL / Parquet / folder / hub id) --load_records--> records
    records --format (gsm8k, metamathqa, commonsense, alpaca, chat)--> (prompt, response)
    (prompt, response) --tokenise--> input_ids, labels (-100 on the prompt), eos appended
    samples --pack (data.packing)--> rows of whole samples, seq_lens (best-fit decreasing)
    samples or rows --collate_batch--> padded tensors (+ per-sample position_ids for rows)

Tokenisation goes through ``Dataset.map`` with a fingerprint built from the source data,
the format, ``max_seq_len``, the tokenizer and this file's source, so a second run reads
the cached Arrow file instead of tokenising again. Everything is validated here (files,
fields, lengths) because :func:`build_datasets` runs before the model is loaded.

Try it on CPU::

    python -c "from transformers import AutoTokenizer; from dude_dist.config import DataConfig; \
from dude_dist.data import build_datasets; \
print(build_datasets(DataConfig(sources=('../shared/data/gsm8k/train.jsonl',), limit=100), \
AutoTokenizer.from_pretrained('../shared/models/stories260K')).stats)"
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets.table import InMemoryTable

from dude_dist.config import DataConfig
from dude_dist.errors import DataError
from dude_dist.loss import IGNORE_INDEX  # the loss owns the ignore label

logger = logging.getLogger(__name__)


_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}



# --------------------------------------------------------------------------- loading


def _looks_like_path(source: str) -> bool:
    """Whether ``source`` was meant as a local path (so it is never sent to the hub)."""
    return (
        Path(source).suffix in _FILE_BUILDERS
        or source.startswith(("/", ".", "~"))
        or source.count("/") > 1
    )


def _split_files(folder: Path, split: str) -> list[Path]:
    """The files of ``split`` inside ``folder``: ``<split>.jsonl|json|parquet`` or shards."""
    for suffix in _FILE_BUILDERS:
        if (folder / f"{split}{suffix}").is_file():
            return [folder / f"{split}{suffix}"]
    for pattern in (f"{split}-*", f"data/{split}-*", f"{split}/*"):
        shards = sorted(p for p in folder.glob(pattern) if p.suffix in _FILE_BUILDERS)
        if shards:
            return shards
    present = sorted(p.name for p in folder.iterdir())
    raise DataError(
        f"folder {str(folder)!r} has no file for split {split!r} (looked for {split}.jsonl, {split}.json, "
        f"{split}.parquet and {split}-*.parquet shards); it contains: {', '.join(present) or '(nothing)'}"
    )


def _utf8_problem(path: Path) -> str | None:
    """``file:line`` of the first bytes in ``path`` that are not UTF-8, or None."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = line[exc.start:exc.end]
                return (f"{path}:{lineno}: not UTF-8 text: byte(s) {bad.hex(' ')} at column {exc.start + 1} "
                        f"({exc.reason}); re-save the file as UTF-8")
    return None


def _json_problem(path: Path) -> str | None:
    """Re-read a JSON/JSONL file that ``datasets`` rejected and say where it is broken."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return _utf8_problem(path) or f"{path}: not UTF-8 text ({exc})"
    stripped = text.lstrip()
    if not stripped:
        return f"{path}: the file is empty"
    if stripped.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})"
        if not value:
            return f"{path}: the JSON array is empty"
        bad = next((i for i, item in enumerate(value) if not isinstance(item, dict)), None)
        if bad is not None:
            return f"{path}: item {bad} of the JSON array is a {type(value[bad]).__name__}, expected an object"
        return None
    if stripped.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None  # not one document; check it as JSON Lines below
        if isinstance(value, dict) and "\n" in text.strip():
            return f"{path}: the file is one JSON object; expected a JSON array of records or JSON Lines"
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})"
        if not isinstance(value, dict):
            return f"{path}:{lineno}: expected one JSON object per line, got a {type(value).__name__}"
    return None


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {exc}"


def _load_files(files: list[Path]) -> datasets.Dataset:
    suffixes = {f.suffix for f in files}
    builder = _FILE_BUILDERS.get(files[0].suffix)
    if builder is None or len({_FILE_BUILDERS.get(s) for s in suffixes}) > 1:
        raise DataError(
            f"{files[0]}: unsupported file type {sorted(suffixes)} (use .json, .jsonl or .parquet files of one kind)"
        )
    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as exc:  # datasets wraps parse errors without a line number; find it
        if builder == "json":
            for f in files:
                problem = _json_problem(f)
                if problem:
                    raise DataError(problem) from exc
        raise DataError(f"{', '.join(map(str, files))}: could not be read ({_root_cause(exc)})") from exc
    if len(ds) == 0:
        raise DataError(f"{', '.join(map(str, files))}: contains no records")
    try:
        # Arrow's JSON reader keeps invalid UTF-8 in string columns; reading such a record
        # later fails deep inside tokenisation. Arrow checks every string here, in C++.
        ds.data.table.validate(full=True)
    except pa.ArrowInvalid as exc:
        for f in files:
            problem = _utf8_problem(f)
            if problem:
                raise DataError(problem) from None
        raise DataError(f"{', '.join(map(str, files))}: invalid data ({exc})") from None
    return ds


def _load_hub(source: str, split: str) -> datasets.Dataset:
    """``owner/name`` or ``owner/name:config`` from the Hugging Face hub (or its local cache)."""
    name, _, config = source.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # offline, missing, or no such split: report and let the next source try
        raise DataError(
            f"not a local file or folder, and loading it as a hub dataset failed ({_root_cause(exc)})"
        ) from exc
    if len(ds) == 0:
        raise DataError(f"hub dataset split {split!r} contains no records")
    return ds


def _load_source(source: str, split: str) -> tuple[datasets.Dataset, str]:
    """One source, and a label naming what was read (the file, or the hub id and split)."""
    path = Path(source).expanduser()
    if path.is_dir() or path.is_file():
        files = _split_files(path, split) if path.is_dir() else [path]
        label = str(files[0]) if len(files) == 1 else f"{path} ({len(files)} {split} files)"
        return _load_files(files), label
    if _looks_like_path(source):
        raise DataError(f"no such file or folder: {str(path)!r} (relative paths start at {Path.cwd()})")
    return _load_hub(source, split), f"{source} (split {split})"


def load_first_source(
    sources: Sequence[str], split: str, key: str = "sources"
) -> tuple[datasets.Dataset, str]:
    """:func:`load_records`, also returning a label of what was read (file, or hub id and split).

    Args:
        key: the config key the sources came from, for messages (``data.sources``).
    """
    if not sources:
        raise DataError(f"{key} is empty: name a JSON/JSONL/Parquet file, a folder or a hub id")
    failures = []
    for source in sources:
        try:
            ds, label = _load_source(source, split)
        except DataError as exc:
            failures.append(f"  - {source}: {exc}")
            continue
        if failures:
            logger.warning("%s: skipped sources that did not load:\n%s", key, "\n".join(failures))
        logger.info("%s: loaded %d records from %s", key, len(ds), label)
        return ds, label
    raise DataError(f"none of {key} could be loaded (split {split!r}):\n" + "\n".join(failures))


def load_records(sources: Sequence[str], split: str) -> datasets.Dataset:
    """Load records from the first source that works.

    Args:
        sources: each a local ``.json`` (array or JSON Lines), ``.jsonl`` or ``.parquet``
            file, a folder holding ``<split>.jsonl|json|parquet`` (or ``<split>-*`` shards),
            or a hub id ``owner/name[:config]``, tried only when no such local path exists.
        split: split to read from a folder or hub id (a single file is used whole).

    Returns:
        The records as a ``datasets.Dataset`` (cached as Arrow by ``datasets``).

    Raises:
        DataError: no source loads; the message lists each source and why it failed
            (missing path, ``file:line`` of malformed JSON, no records, hub unreachable).
    """
    return load_first_source(tuple(sources), split)[0]


# --------------------------------------------------------------------------- prompt formats

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def gsm8k_prompt(question: str) -> str:
    """The GSM8K prompt; the response starts with a space after ``Answer:``."""
    return f"Question: {question}\nAnswer:"


def instruction_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca / LLM-Adapters prompt (with an ``### Input:`` block only when ``input`` is set)."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


def _text(record: dict, name: str, optional: bool = False) -> str:
    value = record.get(name)
    if value is None:
        if optional:
            return ""
        raise DataError(f"field {name!r} is null")
    if not isinstance(value, str):
        raise DataError(f"field {name!r} is a {type(value).__name__}, expected a string")
    return value


def format_gsm8k(record: dict, tokenizer: Any = None) -> tuple[str, str]:
    """``question`` / ``answer`` -> ``Question: ...\\nAnswer:`` and `` <answer>``."""
    return gsm8k_prompt(_text(record, "question")), " " + _text(record, "answer")


def format_metamathqa(record: dict, tokenizer: Any = None) -> tuple[str, str]:
    """``query`` / ``response`` in the Alpaca prompt (as MetaMath trains)."""
    return instruction_prompt(_text(record, "query")), _text(record, "response")


def format_commonsense(record: dict, tokenizer: Any = None) -> tuple[str, str]:
    """``instruction`` / ``input`` / ``output`` in the LLM-Adapters (Alpaca) prompt."""
    return instruction_prompt(_text(record, "instruction"), _text(record, "input", optional=True)), _text(
        record, "output"
    )


def format_alpaca(record: dict, tokenizer: Any = None) -> tuple[str, str]:
    """Alpaca records; the same prompt as ``commonsense`` but ``input`` may be absent."""
    return format_commonsense(record, tokenizer)


def format_chat(record: dict, tokenizer: Any = None) -> tuple[str, str]:
    """``messages`` (``role``/``content`` dicts); the last assistant message is the response.

    With a tokenizer that has a chat template, prompt and response are cut from the
    rendered conversation (the prompt ends with the generation prompt); otherwise they
    are plain ``role: content`` lines ending in ``assistant:``.
    """
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"field 'messages' must be a non-empty list, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or message.get("content") is None:
            raise DataError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r}")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(f"no assistant message among roles {[m['role'] for m in messages]}")
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: last + 1], tokenize=False)
        if not full.startswith(prompt):
            raise DataError("the chat template does not render the prompt as a prefix of the conversation")
        return prompt, full[len(prompt) :]
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:last]) + "assistant:"
    return prompt, " " + str(messages[last]["content"])


@dataclass(frozen=True)
class PromptFormat:
    """A record layout: the fields it needs and the template that renders it."""

    fields: tuple[str, ...]
    render: Callable[[dict, Any], tuple[str, str]]


PROMPT_FORMATS: dict[str, PromptFormat] = {
    "gsm8k": PromptFormat(("question", "answer"), format_gsm8k),
    "metamathqa": PromptFormat(("query", "response"), format_metamathqa),
    "commonsense": PromptFormat(("instruction", "input", "output"), format_commonsense),
    "alpaca": PromptFormat(("instruction", "output"), format_alpaca),
    "chat": PromptFormat(("messages",), format_chat),
}


def question_prompt(format_name: str, question: str) -> str:
    """The prompt that a model trained with ``format_name`` gets for a bare question (GSM8K eval)."""
    if format_name == "gsm8k":
        return gsm8k_prompt(question)
    if format_name in ("metamathqa", "commonsense", "alpaca"):
        return instruction_prompt(question)
    raise DataError(f"no question prompt for format {format_name!r}; use gsm8k, metamathqa, commonsense or alpaca")


def check_fields(ds: datasets.Dataset, format_name: str, source: str) -> None:
    """Raise if ``ds`` lacks a field that ``format_name`` needs.

    Raises:
        DataError: names the format, the fields it expects, the fields found and the source.
    """
    if format_name not in PROMPT_FORMATS:
        raise DataError(f"unknown format {format_name!r}; valid: {', '.join(PROMPT_FORMATS)}")
    expected = PROMPT_FORMATS[format_name].fields
    missing = [f for f in expected if f not in ds.column_names]
    if missing:
        raise DataError(
            f"format {format_name!r} expects fields {', '.join(expected)}, but {source} has fields "
            f"{', '.join(ds.column_names)} (missing: {', '.join(missing)})"
        )


# --------------------------------------------------------------------------- tokenisation


def ensure_pad_token(tokenizer: Any) -> int:
    """Give a tokenizer without a pad token one (``unk``, else ``eos``) and return the pad id.

    Padding positions are masked by length in :func:`collate_batch`, never by comparing
    ids, so reusing ``eos`` as pad does not hide the real ``eos`` labels.

    Raises:
        DataError: the tokenizer has neither a pad, an unk nor an eos token.
    """
    if tokenizer.pad_token_id is None:
        for name in ("unk_token", "eos_token"):
            token = getattr(tokenizer, name)
            if token is not None:
                tokenizer.pad_token = token
                logger.info("tokenizer has no pad token; using %s %r (id %d)", name, token, tokenizer.pad_token_id)
                break
        else:
            raise DataError("the tokenizer has no pad, unk or eos token to pad with")
    return int(tokenizer.pad_token_id)


def _adds_special_tokens(format_name: str, tokenizer: Any) -> bool:
    # A chat template writes bos & co. into the text; adding them again would double them.
    return not (format_name == "chat" and getattr(tokenizer, "chat_template", None))


def response_ids(tokenizer: Any, prompt_ids: list[int], full_ids: list[int], response: str) -> list[int]:
    """The ids of ``response`` after a prompt: cut from the ids of the whole text, so they are
    tokenised as in context; tokenised on their own if the tokenizer merges across the
    boundary (the prompt's ids are then not a prefix of the whole's)."""
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return full_ids[len(prompt_ids) :]
    return tokenizer(response, add_special_tokens=False)["input_ids"]


def _tokenize_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    tokenizer: Any,
    format_name: str,
    max_seq_len: int,
    source: str,
) -> dict[str, list]:
    """Tokenise prompt and prompt+response (:func:`response_ids`); the prompt's labels are
    -100, eos is appended."""
    render = PROMPT_FORMATS[format_name].render
    columns = list(batch)
    prompts, responses = [], []
    for row, index in enumerate(indices):
        record = {name: batch[name][row] for name in columns}
        try:
            prompt, response = render(record, tokenizer)
        except DataError as exc:
            raise DataError(f"{source}: record {index}: {exc}") from None
        prompts.append(prompt)
        responses.append(response)
    special = _adds_special_tokens(format_name, tokenizer)
    prompt_ids = tokenizer(prompts, add_special_tokens=special)["input_ids"]
    full_ids = tokenizer([p + r for p, r in zip(prompts, responses)], add_special_tokens=special)["input_ids"]
    eos = tokenizer.eos_token_id
    out: dict[str, list] = {"input_ids": [], "labels": [], "prompt_len": [], "full_len": []}
    for p_ids, f_ids, response in zip(prompt_ids, full_ids, responses):
        r_ids = response_ids(tokenizer, p_ids, f_ids, response)
        if eos is not None and eos not in r_ids:  # a chat template may already end the turn with eos
            r_ids = r_ids + [eos]
        ids = p_ids + r_ids
        labels = [IGNORE_INDEX] * len(p_ids) + r_ids
        out["input_ids"].append(ids[:max_seq_len])
        out["labels"].append(labels[:max_seq_len])
        out["prompt_len"].append(len(p_ids))
        out["full_len"].append(len(ids))
    return out


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides the token ids (not of padding state, which changes on use)."""
    hasher = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("padding", None)
        state.pop("truncation", None)
        hasher.update(json.dumps(state, sort_keys=True).encode())
    else:
        hasher.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    probe = tokenizer("Question: 1,234.5\n### Response:\nthe answer")["input_ids"]
    extra = [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
             getattr(tokenizer, "chat_template", None), probe]
    hasher.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return hasher.hexdigest()


def _map_fingerprint(ds: datasets.Dataset, format_name: str, tokenizer: Any, max_seq_len: int) -> str:
    # Explicit, so the cache key covers this file's code: datasets hashes functions of an
    # installed module by name only, and would serve stale tokens after an edit here.
    parts = [ds._fingerprint, format_name, max_seq_len, _tokenizer_fingerprint(tokenizer),
             hashlib.sha256(Path(__file__).read_bytes()).hexdigest()]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def tokenize_records(
    ds: datasets.Dataset, format_name: str, tokenizer: Any, max_seq_len: int, source: str = "data"
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Render and tokenise records; truncate to ``max_seq_len``; drop samples with no labels left.

    Args:
        ds: records with the fields of ``format_name``.
        format_name: a key of :data:`PROMPT_FORMATS`.
        tokenizer: a Hugging Face tokenizer.
        max_seq_len: samples are cut to this many tokens (from the right).
        source: name used in messages.

    Returns:
        The dataset with columns ``input_ids`` and ``labels`` and the counts ``samples``,
        ``truncated`` (kept but cut), ``dropped`` (prompt alone fills ``max_seq_len``),
        ``tokens`` and ``label_tokens``.

    Raises:
        DataError: a missing field, a bad record (named by index), or every sample's
            prompt is at least ``max_seq_len`` tokens.
    """
    check_fields(ds, format_name, source)
    if tokenizer.eos_token_id is None:
        logger.warning("tokenizer has no eos token; responses are not terminated")
    tokenized = ds.map(
        _tokenize_batch,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        fn_kwargs={"tokenizer": tokenizer, "format_name": format_name, "max_seq_len": max_seq_len, "source": source},
        new_fingerprint=_map_fingerprint(ds, format_name, tokenizer, max_seq_len),
        desc=f"Tokenising {Path(source).name}",
    )
    table = tokenized.with_format("arrow")[:]
    prompt_len = table.column("prompt_len").to_numpy()
    full_len = table.column("full_len").to_numpy()
    keep = prompt_len < max_seq_len
    if not keep.any():
        raise DataError(
            f"{source}: every one of the {len(prompt_len)} samples has a prompt of at least "
            f"max_seq_len={max_seq_len} tokens (shortest prompt: {int(prompt_len.min())} tokens), so no "
            f"response token is left to learn; raise data.max_seq_len above {int(prompt_len.min())}"
        )
    kept_len = np.minimum(full_len[keep], max_seq_len)
    stats = {
        "samples": int(keep.sum()),
        "truncated": int((full_len[keep] > max_seq_len).sum()),
        "dropped": int((~keep).sum()),
        "tokens": int(kept_len.sum()),
        "label_tokens": int((kept_len - prompt_len[keep]).sum()),
    }
    if stats["truncated"]:
        logger.warning("%s: %d of %d samples were cut to max_seq_len=%d tokens (longest: %d)",
                       source, stats["truncated"], len(full_len), max_seq_len, int(full_len.max()))
    if stats["dropped"]:
        logger.warning("%s: dropped %d samples whose prompt alone fills max_seq_len=%d tokens",
                       source, stats["dropped"], max_seq_len)
    if stats["dropped"]:
        tokenized = tokenized.select(np.flatnonzero(keep))
    return tokenized.remove_columns(["prompt_len", "full_len"]), stats


def pack_lengths(lengths: Sequence[int], max_seq_len: int, seed: int = 0) -> list[list[int]]:
    """Bin-pack whole samples into rows of at most ``max_seq_len`` tokens (best-fit decreasing).

    Samples are taken longest first (ties in a seeded random order) and each goes into the
    row whose free space fits it most tightly, or a new row. No sample is split. The result
    depends only on ``lengths``, ``max_seq_len`` and ``seed``, so every rank computes the
    same rows.

    Args:
        lengths: tokens of each sample (each ``<= max_seq_len``).
        max_seq_len: capacity of a row.
        seed: orders samples of equal length.

    Returns:
        The sample indices of each row, in the order they sit in the row.

    Raises:
        ValueError: a sample is longer than ``max_seq_len`` or empty.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > max_seq_len or lengths.min() < 1):
        bad = int(np.flatnonzero((lengths > max_seq_len) | (lengths < 1))[0])
        raise ValueError(f"sample {bad} has {int(lengths[bad])} tokens; rows hold 1 to {max_seq_len}")
    shuffled = np.random.default_rng(seed).permutation(len(lengths))
    order = shuffled[np.argsort(-lengths[shuffled], kind="stable")]
    rows: list[list[int]] = []
    by_space: list[list[int]] = [[] for _ in range(max_seq_len + 1)]  # free space -> rows with it
    nonempty = 0  # bit s is set when some row has exactly s tokens free
    for index in order.tolist():
        n = int(lengths[index])
        fits = nonempty >> n
        if fits:
            space = n + (fits & -fits).bit_length() - 1  # the smallest free space >= n
            row = by_space[space].pop()
            if not by_space[space]:
                nonempty &= ~(1 << space)
        else:
            space, row = max_seq_len, len(rows)
            rows.append([])
        rows[row].append(index)
        left = space - n
        if left:
            by_space[left].append(row)
            nonempty |= 1 << left
    return rows


def pack_dataset(ds: datasets.Dataset, max_seq_len: int, seed: int = 0) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Rows of whole samples (:func:`pack_lengths`), each sample attending only to itself.

    A row keeps its samples' tokens back to back (no padding is stored) and their lengths
    in ``seq_lens``; :func:`collate_batch` turns those into ``position_ids`` that restart
    at 0 for every sample, from which the attention (transformers' packed-sequence
    support: a block-diagonal causal mask for ``sdpa``/``eager``, varlen kernels for flash
    attention) confines every token to its own sample. Each sample's first label is set
    to -100: in a padded batch the first token is never a target either, so a packed row
    has exactly the targets, and (in exact arithmetic) the loss, of its samples padded.

    Returns:
        Columns ``input_ids``, ``labels``, ``seq_lens`` and ``sample_ids`` (each sample's index
        in ``ds``, for messages); and ``rows``, ``fill`` (real tokens over ``rows * max_seq_len``).
    """
    table = ds.with_format("arrow")[:]
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy().astype(np.int64)
    rows = pack_lengths(lengths, max_seq_len, seed)
    order = np.fromiter((i for row in rows for i in row), dtype=np.int64, count=len(lengths))
    taken = table.take(pa.array(order))
    input_ids = pc.list_flatten(taken.column("input_ids")).to_numpy()
    labels = pc.list_flatten(taken.column("labels")).to_numpy().copy()
    seq_lens = lengths[order]
    labels[np.cumsum(seq_lens) - seq_lens] = IGNORE_INDEX  # each sample's first token is no target
    samples_per_row = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
    row_samples = np.concatenate([[0], np.cumsum(samples_per_row)])
    row_tokens = np.concatenate([[0], np.cumsum(seq_lens)])[row_samples]
    packed = pa.table({
        "input_ids": pa.ListArray.from_arrays(pa.array(row_tokens, pa.int32()), pa.array(input_ids)),
        "labels": pa.ListArray.from_arrays(pa.array(row_tokens, pa.int32()), pa.array(labels)),
        "seq_lens": pa.ListArray.from_arrays(pa.array(row_samples, pa.int32()), pa.array(seq_lens)),
        "sample_ids": pa.ListArray.from_arrays(pa.array(row_samples, pa.int32()), pa.array(order)),
    })
    fill = float(lengths.sum()) / (len(rows) * max_seq_len)
    logger.info("packing: %d samples into %d rows of %d tokens, %.1f%% filled", len(lengths), len(rows),
                max_seq_len, 100 * fill)
    return datasets.Dataset(InMemoryTable(packed)), {"rows": len(rows), "fill": fill}


@dataclass(frozen=True)
class RowCounts:
    """Host-side counts of every training row (a sample, or a packed row of samples).

    Attributes:
        tokens: real tokens of each row ``[rows]``.
        targets: labelled next-token targets of each row (labels after its first position).
        square_lengths: sum over the row's samples of ``length**2`` (attention's cost).
    """

    tokens: np.ndarray
    targets: np.ndarray
    square_lengths: np.ndarray

    def shape(self, micro_batches: Sequence[Sequence[int]]) -> tuple[int, int, int, int]:
        """Real tokens, token slots (each micro-batch padded to its longest row), summed
        squared sample lengths and labelled targets of the rows ``micro_batches`` name."""
        tokens = slots = square = targets = 0
        for rows in micro_batches:
            index = list(rows)
            lengths = self.tokens[index]
            tokens += int(lengths.sum())
            slots += len(index) * int(lengths.max(initial=0))
            square += int(self.square_lengths[index].sum())
            targets += int(self.targets[index].sum())
        return tokens, slots, square, targets


def row_counts(ds: datasets.Dataset) -> RowCounts:
    """:class:`RowCounts` of a tokenised or packed dataset, from its Arrow columns at once."""
    table = ds.with_format("arrow")[:]
    tokens = pc.list_value_length(table.column("input_ids")).to_numpy().astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(tokens)[:-1]])
    labelled = (pc.list_flatten(table.column("labels")).to_numpy() != IGNORE_INDEX).astype(np.int64)
    labelled[starts[tokens > 0]] = 0  # a row's first label is never a target
    targets = np.add.reduceat(labelled, starts) if len(labelled) else np.zeros(len(tokens), np.int64)
    targets[tokens == 0] = 0
    if "seq_lens" in table.column_names:
        seq_lens = pc.list_flatten(table.column("seq_lens")).to_numpy().astype(np.int64)
        per_row = pc.list_value_length(table.column("seq_lens")).to_numpy()
        square = np.add.reduceat(seq_lens**2, np.concatenate([[0], np.cumsum(per_row)[:-1]]))
    else:
        square = tokens**2
    return RowCounts(tokens=tokens, targets=targets, square_lengths=square)


@dataclass(frozen=True)
class TokenizedData:
    """What the trainer consumes.

    Attributes:
        train: columns ``input_ids`` and ``labels`` (lists of ints), and ``seq_lens`` (the
            lengths of the samples in each row) when packed.
        eval: the held-out set for ``eval/loss`` (never packed), or None.
        stats: ``samples``, ``truncated``, ``dropped``, ``tokens``, ``label_tokens`` of the
            training set, ``rows`` (equal to ``samples`` unless packed) and, packed,
            ``fill`` (real tokens over ``rows * max_seq_len``).
        counts: :class:`RowCounts` of ``train``.
    """

    train: datasets.Dataset
    eval: datasets.Dataset | None
    stats: dict[str, Any]
    counts: RowCounts


def build_datasets(cfg: DataConfig, tokenizer: Any, seed: int = 0) -> TokenizedData:
    """Load, validate and tokenise the training and held-out data of ``cfg``.

    Args:
        cfg: the ``data`` section.
        tokenizer: the model's tokenizer.
        seed: orders equally long samples when packing (``train.seed``).

    Returns:
        The tokenised training set (``cfg.limit`` first samples; bin-packed into rows with
        ``cfg.packing``), the first ``cfg.eval_size`` held-out samples (None without
        ``cfg.eval_sources``) and counts.

    Raises:
        DataError: no source loads, a field is missing, a record is malformed, or no
            sample fits in ``cfg.max_seq_len``.
    """
    raw, source = load_first_source(cfg.sources, cfg.split, "data.sources")
    if cfg.limit:
        raw = raw.select(range(min(cfg.limit, len(raw))))
    train, stats = tokenize_records(raw, cfg.format, tokenizer, cfg.max_seq_len, source)
    stats["rows"] = stats["samples"]
    if cfg.packing:
        train, packed = pack_dataset(train, cfg.max_seq_len, seed)
        stats.update(packed)
    logger.info("data: %s", ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in stats.items()))
    held_out = None
    if cfg.eval_sources and cfg.eval_size:
        raw_eval, eval_source = load_first_source(cfg.eval_sources, cfg.eval_split, "data.eval_sources")
        raw_eval = raw_eval.select(range(min(cfg.eval_size, len(raw_eval))))
        held_out, eval_stats = tokenize_records(raw_eval, cfg.format, tokenizer, cfg.max_seq_len, eval_source)
        logger.info("eval data: %s", ", ".join(f"{k}={v}" for k, v in eval_stats.items()))
    return TokenizedData(train=train, eval=held_out, stats=stats, counts=row_counts(train))


def position_ids_of(seq_lens: Sequence[int], length: int) -> np.ndarray:
    """Positions that restart at 0 for each sample of a packed row; the padding after the
    last sample (up to ``length``) counts as one more sequence, so it attends only to itself."""
    lens = np.asarray(list(seq_lens) + [length - int(np.sum(seq_lens))], dtype=np.int64)
    lens = lens[lens > 0]
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    return np.arange(length, dtype=np.int64) - np.repeat(starts, lens)


def collate_batch(samples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad samples (or packed rows) into ``input_ids``, ``attention_mask`` and ``labels``.

    Labels are -100 at padded positions; ``attention_mask`` marks the real tokens. Packed
    rows (they carry ``seq_lens``) also get ``position_ids`` that restart at 0 for every
    sample (:func:`position_ids_of`): the model is then called with those and no
    ``attention_mask`` (:func:`dude_dist.loss.summed_loss`), which confines attention to
    each sample.

    Args:
        samples: dicts with ``input_ids`` and ``labels`` (lists or 1-D tensors), and
            ``seq_lens`` for packed rows.
        pad_token_id: id written at padded positions of ``input_ids``.

    Returns:
        Long tensors of shape ``[batch, longest]``.
    """
    if not samples:
        raise ValueError("collate_batch needs at least one sample")
    packed = "seq_lens" in samples[0]
    longest = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
    position_ids = torch.zeros((len(samples), longest), dtype=torch.long) if packed else None
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[row, :n] = torch.as_tensor(sample["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(sample["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
        if packed:
            position_ids[row] = torch.from_numpy(position_ids_of(sample["seq_lens"], longest))
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if packed:
        batch["position_ids"] = position_ids
    return batch
