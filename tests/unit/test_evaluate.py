"""Answer extraction on real GSM8K / commonsense strings, generation and loss with the real
tiny model stories260K (dude_dist/evaluate.py).

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_evaluate.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dude_dist.config import DataConfig, EvalConfig
from dude_dist.data import DataError, build_datasets, ensure_pad_token
from dude_dist.evaluate import (
    COMMONSENSE_PATTERNS,
    eval_loss,
    evaluate_commonsense,
    evaluate_gsm8k,
    extract_commonsense_answer,
    extract_gsm8k_answer,
    generate,
    gsm8k_reference,
    load_commonsense_items,
    load_gsm8k_items,
    run_eval,
)

datasets.disable_progress_bars()
COMMONSENSE_TASKS = ("ARC-Challenge", "ARC-Easy", "boolq", "openbookqa", "piqa", "social_i_qa", "winogrande")


@pytest.fixture(scope="module")
def model(stories_path: Path):
    return AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32).eval()


@pytest.fixture()
def tokenizer(stories_path: Path):
    return AutoTokenizer.from_pretrained(stories_path)


# --------------------------------------------------------------------------- GSM8K answers


def test_reference_is_the_number_after_hashes_on_real_test_answers(data_dir):
    lines = (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()[:200]
    for line in lines:
        answer = json.loads(line)["answer"]
        expected = answer.split("####")[-1].strip().replace(",", "")
        assert gsm8k_reference(answer) == expected
        # The worked solution itself, read as a completion, yields the same number.
        assert extract_gsm8k_answer(answer) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Natalia sold 48+24 = 72 clips.\n#### 72", "72"),
        ("She makes 9 * 2 = $18 every day.", "18"),
        ("The total is $1,234.50 dollars.", "1234.5"),
        ("The answer is 72.0", "72"),
        ("The answer is 72.", "72"),
        ("The temperature fell to -3 degrees.", "-3"),
        ("From 10-15 people came, so 15", "15"),
        ("#### 5\n\nQuestion: How many are 7 and 8?\nAnswer: 15", "5"),
        ("He pays 16-3-4=<<16-3-4=9>>9", "9"),
        ("I do not know.", None),
    ],
)
def test_extract_gsm8k_answer(completion, expected):
    assert extract_gsm8k_answer(completion) == expected


def test_reference_without_hashes_is_an_error():
    with pytest.raises(DataError, match="####"):
        gsm8k_reference("The answer is 5")


# --------------------------------------------------------------------------- commonsense answers


@pytest.mark.parametrize("task", COMMONSENSE_TASKS)
def test_commonsense_output_field_gives_the_answer_field(data_dir, task):
    items = json.loads((data_dir / "commonsense" / task / "test.json").read_text())[:100]
    for item in items:
        assert item["output"] == f"the correct answer is {item['answer']}"
        assert extract_commonsense_answer(task, item["output"]) == item["answer"]


def test_commonsense_first_match_and_case():
    assert extract_commonsense_answer("ARC-Easy", "answer3, not answer1") == "answer3"
    assert extract_commonsense_answer("boolq", "It is false that it is true") == "false"
    assert extract_commonsense_answer("boolq", "True") is None  # case-sensitive, as LLM-Adapters
    assert extract_commonsense_answer("winogrande", "option2") == "option2"
    assert extract_commonsense_answer("piqa", "solution3") is None
    with pytest.raises(DataError, match="unknown commonsense task 'siqa'"):
        extract_commonsense_answer("siqa", "answer1")
    assert set(COMMONSENSE_TASKS) < set(COMMONSENSE_PATTERNS)


def test_load_items(data_dir):
    items = load_gsm8k_items((str(data_dir / "gsm8k" / "test.jsonl"),), limit=8)
    assert len(items) == 8 and items[0]["reference"] == "18"
    items = load_commonsense_items(data_dir / "commonsense", "piqa", limit=5)
    assert len(items) == 5 and items[0]["answer"] == "solution1"
    with pytest.raises(DataError, match="no such file"):
        load_commonsense_items(data_dir / "nowhere", "boolq")


# --------------------------------------------------------------------------- generation


def test_generate_returns_only_new_text_and_restores_state(model, tokenizer):
    model.train()
    [completion] = generate(model, tokenizer, ["Once upon a time"], batch_size=1, max_new_tokens=12)
    # stories260K's greedy continuation (shared/models/stories260K/SOURCE.md).
    assert completion.startswith(", there was a little girl named Lily.")
    assert model.training and tokenizer.padding_side == "right"
    model.eval()


def test_left_padding_does_not_change_completions(model, tokenizer):
    prompts = ["Once upon a time", "Lily had a big red ball and she", "Tom"]
    one_by_one = generate(model, tokenizer, prompts, batch_size=1, max_new_tokens=12)
    batched = generate(model, tokenizer, prompts, batch_size=3, max_new_tokens=12)
    assert batched == one_by_one


def test_gsm8k_end_to_end_is_deterministic(model, tokenizer, data_dir):
    items = load_gsm8k_items((str(data_dir / "gsm8k" / "test.jsonl"),), limit=8)
    first = evaluate_gsm8k(model, tokenizer, items, batch_size=4, max_new_tokens=16)
    second = evaluate_gsm8k(model, tokenizer, items, batch_size=4, max_new_tokens=16)
    assert first["n"] == 8 and 0.0 <= first["accuracy"] <= 1.0
    assert first["accuracy"] == first["correct"] / 8
    assert [r["completion"] for r in first["records"]] == [r["completion"] for r in second["records"]]
    assert all(r["completion"] for r in first["records"])
    assert [r["reference"] for r in first["records"]] == [i["reference"] for i in items]


class ScriptedGenerate:
    """Stands in for :func:`dude_dist.evaluate.generate`: records the prompts, returns ``completions``."""

    def __init__(self, completions: list[str]) -> None:
        self.completions = completions
        self.prompts: list[str] = []

    def __call__(self, model, tokenizer, prompts, batch_size, max_new_tokens, synced_gpus=False):
        self.prompts += list(prompts)
        assert len(prompts) == len(self.completions)
        return list(self.completions)


def _wrong(number: str) -> str:
    return str(int(float(number)) + 1)


@pytest.mark.parametrize("right", [[1] * 8, [0] * 8, [1, 0, 0, 1, 1, 0, 1, 0]])
def test_gsm8k_scores_the_reference_answers_right_and_others_wrong(monkeypatch, data_dir, right):
    from dude_dist.data import question_prompt

    items = load_gsm8k_items((str(data_dir / "gsm8k" / "test.jsonl"),), limit=8)
    forms = ["She has {} apples left.\n#### {}", "So the answer is ${}.", "{} + 0 = {}"]
    completions = []
    for i, (item, ok) in enumerate(zip(items, right)):
        answer = item["reference"] if ok else _wrong(item["reference"])
        form = forms[i % len(forms)]
        completions.append(form.format(*([answer] * form.count("{}"))))
    fake = ScriptedGenerate(completions)
    monkeypatch.setattr("dude_dist.evaluate.generate", fake)
    result = evaluate_gsm8k(None, None, items, batch_size=4, max_new_tokens=16)
    assert fake.prompts == [question_prompt("gsm8k", item["question"]) for item in items]
    assert result["n"] == 8 and result["correct"] == sum(right)
    assert result["accuracy"] == sum(right) / 8
    assert [r["correct"] for r in result["records"]] == [bool(ok) for ok in right]
    assert [r["predicted"] for r in result["records"]] == [
        item["reference"] if ok else _wrong(item["reference"]) for item, ok in zip(items, right)]


@pytest.mark.parametrize("right", [[1] * 6, [0] * 6, [0, 1, 1, 0, 0, 1]])
def test_commonsense_scores_the_reference_answers_right_and_others_wrong(monkeypatch, data_dir, right):
    items = load_commonsense_items(data_dir / "commonsense", "boolq", limit=6)
    flip = {"true": "false", "false": "true"}
    completions = [f"the correct answer is {item['answer'] if ok else flip[item['answer']]}"
                   for item, ok in zip(items, right)]
    monkeypatch.setattr("dude_dist.evaluate.generate", ScriptedGenerate(completions))
    result = evaluate_commonsense(None, None, "boolq", items, batch_size=4, max_new_tokens=8)
    assert result["correct"] == sum(right) and result["accuracy"] == sum(right) / 6
    assert [r["correct"] for r in result["records"]] == [bool(ok) for ok in right]


def test_run_eval_reports_each_tasks_accuracy(monkeypatch, data_dir):
    gsm8k = load_gsm8k_items((str(data_dir / "gsm8k" / "test.jsonl"),), limit=3)
    piqa = load_commonsense_items(data_dir / "commonsense", "piqa", limit=3)
    answers = iter([[f"#### {i['reference']}" for i in gsm8k],
                    [i["answer"] if k else "none" for k, i in enumerate(piqa)]])
    monkeypatch.setattr("dude_dist.evaluate.generate", lambda *args, **kwargs: next(answers))
    cfg = EvalConfig(tasks=("gsm8k", "piqa"), gsm8k_sources=(str(data_dir / "gsm8k"),),
                     commonsense_dir=str(data_dir / "commonsense"), limit=3)
    results = run_eval(None, None, cfg)
    assert (results["gsm8k"]["accuracy"], results["piqa"]["accuracy"]) == (1.0, 2 / 3)


def test_commonsense_end_to_end(model, tokenizer, data_dir):
    items = load_commonsense_items(data_dir / "commonsense", "boolq", limit=4)
    result = evaluate_commonsense(model, tokenizer, "boolq", items, batch_size=4, max_new_tokens=8)
    assert result["n"] == 4 and 0.0 <= result["accuracy"] <= 1.0
    assert [r["reference"] for r in result["records"]] == [i["answer"] for i in items]


def test_run_eval_tasks(model, tokenizer, data_dir):
    cfg = EvalConfig(tasks=("gsm8k", "piqa"), gsm8k_sources=(str(data_dir / "gsm8k"),),
                     commonsense_dir=str(data_dir / "commonsense"), gsm8k_format="metamathqa",
                     limit=2, batch_size=2, max_new_tokens=4)
    results = run_eval(model, tokenizer, cfg)
    assert list(results) == ["gsm8k", "piqa"] and all(r["n"] == 2 for r in results.values())
    with pytest.raises(DataError, match=r"unknown task\(s\) \['hellaswagg'\]"):
        run_eval(model, tokenizer, EvalConfig(tasks=("gsm8k", "hellaswagg")))


# --------------------------------------------------------------------------- loss


def test_eval_loss_is_token_weighted_and_matches_the_model(model, tokenizer, data_dir):
    cfg = DataConfig(sources=(str(data_dir / "gsm8k"),), limit=5, max_seq_len=200)
    dataset = build_datasets(cfg, tokenizer).train
    pad = ensure_pad_token(tokenizer)
    whole = eval_loss(model, dataset, pad, batch_size=3)
    per_sample = []
    with torch.no_grad():
        for sample in dataset:
            out = model(input_ids=torch.tensor([sample["input_ids"]]), labels=torch.tensor([sample["labels"]]))
            per_sample.append((out.loss.item(), sum(x != -100 for x in sample["labels"][1:])))
    expected = sum(loss * n for loss, n in per_sample) / sum(n for _, n in per_sample)
    assert whole["tokens"] == sum(n for _, n in per_sample)
    assert whole["loss"] == pytest.approx(expected, rel=1e-5)
    assert whole["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert eval_loss(model, dataset, pad, batch_size=1)["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    grad_modes = []  # held-out loss builds no autograd graph
    handle = model.register_forward_hook(lambda module, args, out: grad_modes.append(torch.is_grad_enabled()))
    try:
        eval_loss(model, [dataset[0]], pad, batch_size=1)
    finally:
        handle.remove()
    assert grad_modes == [False]
