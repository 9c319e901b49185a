"""Accuracy by greedy generation (GSM8K, LLM-Adapters commonsense) and held-out loss.

Prompts come from :mod:`dude_dist.data`, so a model is asked exactly the way it was
trained. Answers are read from the completion as LLM-Adapters does: the last number for
GSM8K (or the one after ``####``), the first task keyword (``true``, ``answer2``, ...)
for the commonsense tasks.

Try it on CPU::

    python -c "from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; \
from dude_dist.config import EvalConfig; from dude_dist.evaluate import run_eval; \
p='../shared/models/stories260K'; \
print(run_eval(M.from_pretrained(p), T.from_pretrained(p), EvalConfig(limit=8, max_new_tokens=16))['gsm8k']['accuracy'])"
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from dude_dist import comm
from dude_dist.checkpoint import read_meta, write_text_atomic
from dude_dist.config import EvalConfig, batch_layout
from dude_dist.data import (
    DataError,
    build_datasets,
    collate_batch,
    ensure_pad_token,
    instruction_prompt,
    load_first_source,
    question_prompt,
    response_ids,
)
from dude_dist.distributed import init_distributed
from dude_dist.errors import ConfigError
from dude_dist.export import config_for_checkpoint, merged_copy, rebuild_model, resolve_checkpoint
from dude_dist.loss import (  # noqa: F401  (accepts_logits_to_keep, token_loss_sum re-exported)
    IGNORE_INDEX,
    accepts_logits_to_keep,
    logits_to_keep_support,
    loss_inputs,
    summed_loss,
    token_loss_sum,
)
from dude_dist.models import load_tokenizer
from dude_dist.run_dir import RunDir
from dude_dist.zero import build_ds_config, model_init_context

logger = logging.getLogger(__name__)

# LLM-Adapters `commonsense_evaluate.py::extract_answer`: the first match wins, case-sensitive.
COMMONSENSE_PATTERNS: dict[str, re.Pattern[str]] = {
    "boolq": re.compile(r"true|false"),
    "piqa": re.compile(r"solution1|solution2"),
    "social_i_qa": re.compile(r"answer1|answer2|answer3|answer4|answer5"),
    "ARC-Challenge": re.compile(r"answer1|answer2|answer3|answer4|answer5"),
    "ARC-Easy": re.compile(r"answer1|answer2|answer3|answer4|answer5"),
    "openbookqa": re.compile(r"answer1|answer2|answer3|answer4|answer5"),
    "hellaswag": re.compile(r"ending1|ending2|ending3|ending4"),
    "winogrande": re.compile(r"option1|option2"),
}
TASKS = ("gsm8k", *COMMONSENSE_PATTERNS)

# A minus only where it cannot be a hyphen or subtraction ("10-15", "16-3"); thousands
# separators only in groups of three, so a list "2,3,4" stays three numbers.
_NUMBER_BODY = r"\$?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER = re.compile(r"(?:(?<![\w.])-)?" + _NUMBER_BODY)
_MARKED = re.compile(r"####\s*(-?" + _NUMBER_BODY + ")")


# --------------------------------------------------------------------------- answers


def normalize_number(text: str) -> str | None:
    """``"$1,234.50"`` -> ``"1234.5"``, ``"72.0"`` -> ``"72"``; None if not a number."""
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_gsm8k_answer(text: str) -> str | None:
    """The answer in a GSM8K completion: the number after the first ``####``, else the last number.

    The ``####`` marker wins because a model trained on GSM8K answers may keep writing
    (a next "Question: ...") after it when generation is cut by length, not eos.

    Returns:
        The normalised number (commas, ``$`` stripped; ``72.0`` == ``72``), or None.
    """
    marked = _MARKED.search(text)
    if marked:
        return normalize_number(marked.group(1))
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def gsm8k_reference(answer_field: str) -> str:
    """The reference number of a GSM8K ``answer`` field (the text after ``####``).

    Raises:
        DataError: the field has no ``#### <number>``.
    """
    _, marker, tail = answer_field.rpartition("####")
    number = normalize_number(tail.strip()) if marker else None
    if number is None:
        raise DataError(f"GSM8K answer has no '#### <number>' at the end: {answer_field[-80:]!r}")
    return number


def extract_commonsense_answer(task: str, text: str) -> str | None:
    """The first answer keyword of ``task`` in ``text`` (LLM-Adapters' rule), or None.

    Raises:
        DataError: ``task`` is not a known commonsense task.
    """
    if task not in COMMONSENSE_PATTERNS:
        raise DataError(f"unknown commonsense task {task!r}; valid: {', '.join(COMMONSENSE_PATTERNS)}")
    match = COMMONSENSE_PATTERNS[task].search(text.strip())
    return match.group(0) if match else None


# --------------------------------------------------------------------------- items


def _first(ds: Any, limit: int) -> list[dict]:
    return ds.select(range(min(limit, len(ds)))).to_list() if limit else ds.to_list()


def _require(ds: Any, fields: tuple[str, ...], label: str) -> None:
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        raise DataError(
            f"{label}: evaluation expects fields {', '.join(fields)}, found {', '.join(ds.column_names)}"
        )


def load_gsm8k_items(sources: Sequence[str], limit: int = 0) -> list[dict]:
    """GSM8K test items ``{question, answer, reference}``, the first ``limit`` (0 = all).

    Raises:
        DataError: no source loads, fields are missing, or an answer has no ``####``.
    """
    ds, label = load_first_source(tuple(sources), "test", "eval.gsm8k_sources")
    _require(ds, ("question", "answer"), label)
    items = _first(ds, limit)
    for item in items:
        item["reference"] = gsm8k_reference(item["answer"])
    return items


def load_commonsense_items(commonsense_dir: str | Path, task: str, limit: int = 0) -> list[dict]:
    """Test items ``{instruction, input, answer, ...}`` of ``<commonsense_dir>/<task>``.

    Raises:
        DataError: unknown task, no ``test`` file, or missing fields.
    """
    if task not in COMMONSENSE_PATTERNS:
        raise DataError(f"unknown commonsense task {task!r}; valid: {', '.join(COMMONSENSE_PATTERNS)}")
    ds, label = load_first_source((str(Path(commonsense_dir) / task),), "test", "eval.commonsense_dir")
    _require(ds, ("instruction", "answer"), label)
    return _first(ds, limit)


# --------------------------------------------------------------------------- generation


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    batch_size: int,
    max_new_tokens: int,
    synced_gpus: bool = False,
) -> list[str]:
    """Greedy completions of ``prompts``, batched with left padding; only the new text.

    Args:
        model: a causal LM (in eval mode for the call; its mode is restored).
        tokenizer: its tokenizer (a pad token is set if missing; padding side restored).
        prompts: texts, tokenised with the tokenizer's special tokens as in training.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: tokens generated per prompt at most.
        synced_gpus: keep ranks stepping together until all finish (ZeRO-3, where every
            forward gathers parameters from all ranks); then every rank must call this
            with the same number of batches.

    Returns:
        One decoded completion per prompt, special tokens removed.
    """
    pad_id = ensure_pad_token(tokenizer)
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              pad_token_id=pad_id, eos_token_id=eos)
    device = next(model.parameters()).device
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation appends on the right, so pads go left
    completions: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            output = model.generate(**batch, generation_config=config, synced_gpus=synced_gpus)
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            completions.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return completions


def _shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Rank ``rank``'s share of ``items`` (every ``world_size``-th, starting at ``rank``)."""
    return list(items[rank::world_size])


def _score(model: Any, tokenizer: Any, items: Sequence[dict], prompts: Sequence[str], extract, reference: str,
           keep: str, *, batch_size: int, max_new_tokens: int, synced_gpus: bool, rank: int,
           world_size: int) -> dict:
    """Generate for this rank's share of the prompts, compare ``extract(completion)`` with
    ``item[reference]``, and gather every rank's records on every rank in item order.

    With ``synced_gpus`` (ZeRO-3: every forward gathers from all ranks) each rank makes the
    same number of ``generate`` calls: a rank with fewer prompts pads its share with the
    first prompt and drops those completions.
    """
    mine = _shard(list(range(len(items))), rank, world_size)
    share = [prompts[i] for i in mine]
    if synced_gpus and world_size > 1 and prompts:
        longest = math.ceil(len(prompts) / world_size)
        share = share + [prompts[0]] * (longest - len(share))
    completions = generate(model, tokenizer, share, batch_size, max_new_tokens, synced_gpus)[: len(mine)]
    records = {}
    for i, completion in zip(mine, completions):
        item = items[i]
        predicted = extract(completion)
        records[i] = {keep: item[keep], "reference": item[reference], "completion": completion,
                      "predicted": predicted, "correct": predicted == item[reference]}
    return _gathered_summary(records, world_size)


def evaluate_gsm8k(
    model: Any,
    tokenizer: Any,
    items: Sequence[dict],
    *,
    batch_size: int,
    max_new_tokens: int,
    synced_gpus: bool = False,
    prompt_format: str = "gsm8k",
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """GSM8K accuracy: exact match of the normalised final number.

    Args:
        items: from :func:`load_gsm8k_items`.
        prompt_format: training format whose prompt holds the question (``eval.gsm8k_format``).
        rank, world_size: share the prompts out over the ranks (collective when > 1).

    Returns:
        ``accuracy``, ``n``, ``correct`` and ``records`` (question, reference,
        completion, predicted, correct per item).
    """
    prompts = [question_prompt(prompt_format, item["question"]) for item in items]
    return _score(model, tokenizer, items, prompts, extract_gsm8k_answer, "reference", "question",
                  batch_size=batch_size, max_new_tokens=max_new_tokens, synced_gpus=synced_gpus, rank=rank,
                  world_size=world_size)


def evaluate_commonsense(
    model: Any,
    tokenizer: Any,
    task: str,
    items: Sequence[dict],
    *,
    batch_size: int,
    max_new_tokens: int,
    synced_gpus: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Accuracy on one LLM-Adapters commonsense task (first answer keyword == ``answer``).

    Returns:
        ``accuracy``, ``n``, ``correct`` and ``records`` (instruction, reference,
        completion, predicted, correct per item).
    """
    prompts = [instruction_prompt(item["instruction"], item.get("input") or "") for item in items]
    return _score(model, tokenizer, items, prompts, lambda text: extract_commonsense_answer(task, text), "answer",
                  "instruction", batch_size=batch_size, max_new_tokens=max_new_tokens, synced_gpus=synced_gpus,
                  rank=rank, world_size=world_size)


# --------------------------------------------------------------------------- log-likelihood

_ANSWER_FORMAT = re.compile(r"Answer format:\s*(\w+(?:/\w+)+)\s*$")
# The LLM-Adapters instruction: a lead-in, the question (or sentence), the options, the answer format.
_ITEM = re.compile(r"^Please [^:]*?(?:question|sentence)(?:, question)?: (?P<question>.*?)\n\n(?P<options>.*?)\s*"
                   r"Answer format: (?P<labels>\w+(?:/\w+)+)\s*$", re.S)
_OPTION = re.compile(r"(?:Answer|Solution|Option)\d+: ")


def answer_choices(task: str, instruction: str) -> list[str]:
    """The answer labels of one item: its ``Answer format: a/b/c`` line, else the task's keywords.

    Raises:
        DataError: ``task`` is not a known commonsense task.
    """
    if task not in COMMONSENSE_PATTERNS:
        raise DataError(f"unknown commonsense task {task!r}; valid: {', '.join(COMMONSENSE_PATTERNS)}")
    found = _ANSWER_FORMAT.search(instruction.strip())
    return found.group(1).split("/") if found else COMMONSENSE_PATTERNS[task].pattern.split("|")


def multiple_choice(task: str, instruction: str) -> tuple[list[str], list[tuple[str, str]]]:
    """An LLM-Adapters item as lm-eval poses it: the answer labels and, per label, the
    ``(context, continuation)`` whose log-likelihood scores it.

    * questions with options (ARC, OpenBookQA, PIQA, SIQA): ``Question: <q>\\nAnswer:``
      continued by `` <option text>``;
    * BoolQ: the same context continued by `` true`` / `` false``;
    * WinoGrande: the sentence up to the blank with each option filled in, continued by the
      rest of the sentence (the same continuation for every option).

    Raises:
        DataError: the instruction does not have that shape (the message shows its start).
    """
    labels = answer_choices(task, instruction)
    found = _ITEM.match(instruction.strip())
    if found is None:
        raise DataError(f"{task}: cannot read the question and options of {instruction[:120]!r}")
    question = found.group("question").strip()
    if task == "boolq":
        return labels, [(f"Question: {question}\nAnswer:", f" {label}") for label in labels]
    options = [text.strip() for text in _OPTION.split(found.group("options"))[1:]]
    if len(options) != len(labels) or not all(options):
        raise DataError(f"{task}: {len(options)} options for the labels {'/'.join(labels)} in "
                        f"{instruction[:120]!r}")
    if task == "winogrande":
        before, blank, after = question.partition("_")
        if not blank or not after.strip():
            raise DataError(f"{task}: no blank (_) to fill in {question[:120]!r}")
        return labels, [(before + option, " " + after.strip()) for option in options]
    return labels, [(f"Question: {question}\nAnswer:", f" {option}") for option in options]


def pair_ids(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids, the continuation tokenised as in training
    (:func:`dude_dist.data.response_ids`), and on its own if it merges away entirely."""
    ctx = tokenizer(context)["input_ids"]
    full = tokenizer(context + continuation)["input_ids"]
    if len(full) == len(ctx):
        return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return ctx, response_ids(tokenizer, ctx, full, continuation)


@torch.no_grad()
def sequence_logprobs(model: Any, pad_id: int, requests: Sequence[tuple[list[int], list[tuple[int, list[int]]]]],
                      batch_size: int, forwards: int | None = None) -> list[list[list[float]]]:
    """Log-probabilities read from one forward per sequence, in float32.

    Args:
        requests: ``(ids, queries)`` per sequence; a query ``(t, tokens)`` asks for
            ``log p(token | ids[:t])`` of each token (``t >= 1``).
        forwards: run exactly this many batches (ZeRO-3 with several ranks, where every
            forward gathers from all ranks): extra batches repeat the first and are discarded.

    Returns:
        Per sequence, per query, the tokens' log-probabilities.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = [list(requests[i:i + batch_size]) for i in range(0, len(requests), batch_size)]
    real = len(batches)
    if forwards is not None:
        batches += [[requests[0] if requests else ([pad_id, pad_id], [])]] * (forwards - real)
    out: list[list[list[float]]] = []
    try:
        for b, batch in enumerate(batches):
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (seq, _) in enumerate(batch):
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            if b >= real:
                continue
            for row, (_, queries) in enumerate(batch):
                rows = logits[row, [t - 1 for t, _ in queries]].float().log_softmax(-1).cpu()
                out.append([rows[q, toks].tolist() for q, (_, toks) in enumerate(queries)])
    finally:
        model.train(was_training)
    return out


def _choice_requests(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list]]:
    """The sequences that score every ``(context, continuation)`` of one item. When the
    contexts are equal and the continuations differ only in their last token (`` true`` /
    `` false``), one sequence does: the shared tokens are read once, the last position for
    every choice."""
    encoded = [pair_ids(tokenizer, c, x) for c, x in pairs]
    ctx, first = encoded[0]
    lasts = [cont[-1] for _, cont in encoded]
    if (len(encoded) > 1 and all(c == ctx and len(x) == len(first) and x[:-1] == first[:-1] for c, x in encoded)
            and len(set(lasts)) == len(lasts)):
        shared = [(len(ctx) + i, [tok]) for i, tok in enumerate(first[:-1])]
        return [(ctx + first, [*shared, (len(ctx) + len(first) - 1, lasts)])]
    return [(c + x, [(len(c) + i, [tok]) for i, tok in enumerate(x)]) for c, x in encoded]


def _choice_scores(answers: list[list[list[float]]], n_choices: int) -> list[float]:
    """Summed log-likelihood of each choice from :func:`_choice_requests`' answers."""
    if len(answers) == 1 and n_choices > 1:  # the shared sequence
        shared = sum(q[0] for q in answers[0][:-1])
        return [shared + last for last in answers[0][-1]]
    return [sum(q[0] for q in res) for res in answers]


def evaluate_commonsense_loglik(model: Any, tokenizer: Any, task: str, items: Sequence[dict], *, batch_size: int,
                                synced_gpus: bool = False, rank: int = 0, world_size: int = 1, **_: Any) -> dict:
    """Multiple-choice accuracy on one commonsense task, as lm-eval scores it: each item posed
    by :func:`multiple_choice`, the choice with the highest log-likelihood per character of
    its continuation wins (lm-eval's ``acc_norm``; WinoGrande's choices share the
    continuation, so there it is plain log-likelihood). Items are shared out over the ranks
    as for generation.

    Returns:
        ``accuracy``, ``n``, ``correct`` and ``records`` (instruction, reference, choices,
        logprobs, predicted, correct per item).
    """
    pad_id = ensure_pad_token(tokenizer)
    mine = _shard(list(range(len(items))), rank, world_size)
    requests, spans = [], []
    for i in mine:
        labels, pairs = multiple_choice(task, items[i]["instruction"])
        reqs = _choice_requests(tokenizer, pairs)
        spans.append((i, labels, [len(x) for _, x in pairs], len(requests), len(reqs)))
        requests += reqs
    forwards = None
    if synced_gpus and world_size > 1:
        forwards = max(comm.all_gather_object(math.ceil(len(requests) / batch_size)))
    answers = sequence_logprobs(model, pad_id, requests, batch_size, forwards)
    records: dict[int, dict] = {}
    for i, labels, chars, start, count in spans:
        scores = _choice_scores(answers[start:start + count], len(labels))
        best = max(range(len(labels)), key=lambda k: scores[k] / chars[k])
        records[i] = {"instruction": items[i]["instruction"], "reference": items[i]["answer"], "choices": labels,
                      "logprobs": scores, "predicted": labels[best], "correct": labels[best] == items[i]["answer"]}
    return _gathered_summary(records, world_size)


def _gathered_summary(records: dict[int, dict], world_size: int) -> dict:
    """Every rank's item records (index -> record), gathered on every rank, in item order,
    summarised (collective when ``world_size`` > 1)."""
    if world_size > 1:
        merged: dict[int, dict] = {}
        for part in comm.all_gather_object(records):
            merged.update(part)
        records = merged
    return _summary([records[i] for i in sorted(records)])


def _summary(records: list[dict]) -> dict:
    correct = sum(r["correct"] for r in records)
    return {"accuracy": correct / len(records) if records else 0.0, "n": len(records), "correct": correct,
            "records": records}


def run_eval(model: Any, tokenizer: Any, cfg: EvalConfig, *, synced_gpus: bool = False, rank: int = 0,
             world_size: int = 1) -> dict[str, dict]:
    """Evaluate every task of ``cfg.tasks`` (``cfg.limit`` items each).

    Args:
        synced_gpus: the model is ZeRO-3 partitioned over the ranks (generation steps together).
        rank, world_size: share the prompts out over the ranks; every rank gets all results.

    Returns:
        Task name -> the dict of :func:`evaluate_gsm8k` / :func:`evaluate_commonsense`.

    Raises:
        DataError: an unknown task (checked before any generation) or unloadable data.
    """
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise DataError(f"eval.tasks: unknown task(s) {unknown}; valid: {', '.join(TASKS)}")
    options = {"batch_size": cfg.batch_size, "max_new_tokens": cfg.max_new_tokens, "synced_gpus": synced_gpus,
               "rank": rank, "world_size": world_size}
    results = {}
    for task in cfg.tasks:
        if task == "gsm8k":
            items = load_gsm8k_items(cfg.gsm8k_sources, cfg.limit)
            results[task] = evaluate_gsm8k(model, tokenizer, items, prompt_format=cfg.gsm8k_format, **options)
        else:
            items = load_commonsense_items(cfg.commonsense_dir, task, cfg.limit)
            score = evaluate_commonsense_loglik if cfg.mode == "loglik" else evaluate_commonsense
            results[task] = score(model, tokenizer, task, items, **options)
        logger.info("eval %s: accuracy %.4f (%d/%d)", task, results[task]["accuracy"],
                    results[task]["correct"], results[task]["n"])
    return results


# --------------------------------------------------------------------------- loss


@torch.no_grad()
def eval_loss(model: Any, dataset: Sequence[dict], pad_token_id: int, batch_size: int) -> dict[str, float]:
    """Mean next-token cross-entropy over labelled tokens (token-weighted, not per batch).

    A plain forward on this process, no collectives: the trainer has its own
    distributed version.

    Args:
        model: a causal LM.
        dataset: samples with ``input_ids`` and ``labels`` (e.g. ``TokenizedData.eval``).
        pad_token_id: for :func:`~dude_dist.data.collate_batch`.
        batch_size: samples per forward.

    Returns:
        ``loss`` (nats per token), ``perplexity`` and ``tokens`` (the number of targets).

    Raises:
        ValueError: the dataset has no labelled token.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    keep = logits_to_keep_support(model)
    total, tokens = 0.0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in collate_batch(samples, pad_token_id).items()}
            loss, count = token_loss_sum(model, batch, keep)
            total += loss.item()
            tokens += count
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("eval_loss: the dataset has no labelled tokens")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}


def check_fits_one_device(folder: str | Path, device: torch.device) -> None:
    """Refuse to put a merged model on one GPU that cannot hold its weights.

    Raises:
        ConfigError: the safetensors weights are larger than the GPU's memory (the message
            says how to run it partitioned instead).
    """
    if device.type != "cuda":
        return
    weights = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    memory = torch.cuda.get_device_properties(device).total_memory
    if weights > 0.9 * memory:
        raise ConfigError(
            f"--merged {folder}: its weights ({weights / 2**30:.1f} GiB) do not fit one GPU ({memory / 2**30:.1f} "
            "GiB); run it partitioned over several GPUs with ZeRO-3, e.g. deepspeed --num_gpus 8 "
            "launch/evaluate.py --config ... --merged ...")


def evaluate_run(cfg: Any, *, checkpoint: str | None = "auto", merged: str | None = None,
                 out: Path | None = None) -> dict:
    """Evaluate a checkpoint (base + factor cache + DuDe tensors) or a merged export.

    Every rank runs the same items (under ZeRO-3 with several ranks generation is kept in
    step with ``synced_gpus``). A checkpoint is verified first (``auto``: the newest one
    that passes; a damaged newer one is skipped with a warning) and rebuilt with its own
    adapter settings (:func:`dude_dist.export.rebuild_model`).

    What it writes (rank 0), and nothing else: ``out`` (default
    ``<output_dir>/eval_cli.json``) and one TensorBoard event file of ``eval/*`` scalars
    (``<output_dir>/tensorboard/events.*.eval_cli``, shown beside the training curves). The
    factor cache, checkpoints and the training run's ``metrics.jsonl`` are never written.

    Raises:
        CheckpointError: no complete checkpoint, or a damaged one.
        ConfigError: the config conflicts with the checkpoint's adapter settings.
        FileNotFoundError: the merged folder is missing.
    """
    ckpt = None
    if not merged:  # a missing or damaged checkpoint, or conflicting settings: one line, before any work

        ckpt = resolve_checkpoint(cfg, checkpoint)
        config_for_checkpoint(cfg, ckpt)
    env = init_distributed(cfg.deepspeed.backend, cfg.deepspeed.timeout_s)
    step = 0
    synced = False
    if merged:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(merged, "config.json").is_file():
            raise FileNotFoundError(f"--merged {merged}: no config.json there (a folder from launch/export.py)")
        if env.world_size > 1 and cfg.deepspeed.zero_stage == 3:
            # Loaded partitioned over the ranks, as in training: a 70B model never sits whole on a GPU.
            import deepspeed

            ds_config = build_ds_config(cfg, batch_layout(cfg.train, env.world_size))
            with model_init_context(ds_config):
                model = AutoModelForCausalLM.from_pretrained(merged, dtype=getattr(torch, cfg.model.dtype))
            model = deepspeed.initialize(model=model, config=ds_config)[0].module
            synced = True
        else:
            check_fits_one_device(merged, env.device)
            model = AutoModelForCausalLM.from_pretrained(merged, dtype=getattr(torch, cfg.model.dtype))
        tokenizer = AutoTokenizer.from_pretrained(merged)
        ensure_pad_token(tokenizer)
        source = str(merged)
    else:
        step = int(read_meta(ckpt)["step"])
        model = rebuild_model(cfg, ckpt, env.world_size, verified=True)
        tokenizer = load_tokenizer(cfg.model)
        if env.world_size > 1 and cfg.deepspeed.zero_stage == 3:
            import deepspeed

            ds_config = build_ds_config(cfg, batch_layout(cfg.train, env.world_size))
            model = deepspeed.initialize(model=model, config=ds_config)[0].module
            synced = True
        source = str(ckpt)
    if not synced:
        model.to(env.device)
    results: dict = {"source": source, "tasks": run_eval(model, tokenizer, cfg.eval, synced_gpus=synced, rank=env.rank,
                                                              world_size=env.world_size)}
    if cfg.data.eval_sources:
        data = build_datasets(cfg.data, tokenizer)
        if data.eval is not None:
            results["loss"] = eval_loss(model, data.eval, tokenizer.pad_token_id, cfg.eval.batch_size)
    if env.rank == 0:
        out = out or RunDir(cfg.output_dir).eval_file("cli")
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(results, indent=1))
        from torch.utils.tensorboard import SummaryWriter

        scalars = {f"eval/{task}_accuracy": res["accuracy"] for task, res in results["tasks"].items()}
        if "loss" in results:
            scalars["eval/loss"] = results["loss"]["loss"]
        writer = SummaryWriter(log_dir=str(RunDir(cfg.output_dir).tensorboard), filename_suffix=".eval_cli")
        for name, value in scalars.items():
            writer.add_scalar(name, value, step)
        writer.close()
        for task, res in results["tasks"].items():
            logger.info("%s: accuracy %.4f (%d/%d) from %s", task, res["accuracy"], res["correct"], res["n"], source)
        if "loss" in results:
            logger.info("held-out loss %.4f (perplexity %.3f)", results["loss"]["loss"], results["loss"]["perplexity"])
    comm.destroy()
    return results


class TrainingEvaluator:
    """Held-out loss and generation accuracy of a model while it trains (every rank calls).

    Args:
        engine: the DeepSpeed engine.
        eval_set: held-out samples (None: no held-out loss).
        tokenizer: the run's tokenizer.
        cfg: the run config (``eval``, ``train.micro_batch_size``).
        ds_config: the engine's DeepSpeed config (is the model ZeRO-3 partitioned?).
        env: this rank's :class:`dude_dist.distributed.DistEnv`.
        run_dir: where ``eval_<when>.json`` goes (rank 0).
        keep_logits: how the model takes ``logits_to_keep`` (:func:`dude_dist.loss.logits_to_keep_support`).
    """

    def __init__(self, engine: Any, eval_set: Any, tokenizer: Any, cfg: Any, ds_config: dict, env: Any, run_dir: Any,
                 keep_logits: str) -> None:
        self.engine, self.eval_set, self.tokenizer, self.cfg = engine, eval_set, tokenizer, cfg
        self.zero3 = ds_config["zero_optimization"]["stage"] == 3
        self.rank, self.world, self.device = env.rank, env.world_size, env.device
        self.run_dir, self.keep_logits = run_dir, keep_logits

    @torch.no_grad()
    def loss(self) -> dict[str, float]:
        """Token-weighted loss on the held-out set, sharded over ranks (every rank runs the same
        number of forwards, padding with label-free batches, as ZeRO-3 requires); one all-reduce."""
        if self.eval_set is None or len(self.eval_set) == 0:
            return {}
        self.engine.eval()
        micro, n = self.cfg.train.micro_batch_size, len(self.eval_set)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        targets = 0
        for b in range(math.ceil(n / (micro * self.world))):
            start = (b * self.world + self.rank) * micro
            idx = list(range(start, min(start + micro, n)))
            batch = collate_batch([self.eval_set[i] for i in idx] or [self.eval_set[0]], self.tokenizer.pad_token_id)
            if not idx:
                batch["labels"].fill_(IGNORE_INDEX)
            inputs = loss_inputs(batch, self.device, self.keep_logits)
            loss_sum += summed_loss(self.engine, inputs).double()
            targets += inputs.targets
        self.engine.train()
        total, count = comm.all_reduce(torch.stack([loss_sum, loss_sum.new_tensor(float(targets))])).tolist()
        mean = total / max(count, 1.0)
        return {"eval/loss": mean, "eval/perplexity": math.exp(min(mean, 50.0))}

    def at_start(self, summary: dict, tracker: Any) -> None:
        """Before the first step of a fresh run: accuracy (``eval.at_start``) and held-out loss,
        into ``summary`` and the tracker at step 0."""
        if self.cfg.eval.at_start:
            summary["eval_start"] = self.accuracy("start")
            tracker.log(0, summary["eval_start"])
        if self.eval_set is not None:
            first = self.loss()
            summary["eval_loss_start"] = first.get("eval/loss")
            tracker.log(0, first)

    def at_end(self, step: int, summary: dict, tracker: Any) -> None:
        """After the last step: held-out loss and accuracy (``eval.at_end``)."""
        final = self.loss()
        if final:
            tracker.log(step, final)
            summary["eval_loss_end"] = final["eval/loss"]
        if self.cfg.eval.at_end:
            summary["eval_end"] = self.accuracy("end")
            tracker.log(step, summary["eval_end"])

    def accuracy(self, when: str) -> dict[str, float]:
        """Generation accuracy on the configured tasks, prompts shared out over the ranks; rank 0
        writes ``eval_<when>.json``. A small partitioned model is merged into a plain copy first
        (no gather per generated token)."""
        self.engine.eval()
        model = self.engine.module
        synced = self.world > 1 and self.zero3
        weight_bytes = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())
        if synced and weight_bytes <= self.cfg.eval.gather_below_gb * 2**30:
            model, synced = merged_copy(model).to(self.device), False
        results = run_eval(model, self.tokenizer, self.cfg.eval, synced_gpus=synced, rank=self.rank,
                           world_size=self.world)
        del model
        self.engine.train()
        if self.rank == 0:
            write_text_atomic(self.run_dir.eval_file(when), json.dumps(results, indent=1))
            for task, res in results.items():
                logger.info("eval (%s) %s: accuracy %.3f on %d items", when, task, res["accuracy"], res["n"])
        return {f"eval/{task}_accuracy": res["accuracy"] for task, res in results.items()}
