"""eval.mode: loglik — multiple choice by the log-likelihood of each answer continuation."""

from __future__ import annotations

import math
import string
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dude_dist.config import EvalConfig
from dude_dist.errors import ConfigError
from dude_dist.evaluate import (
    answer_choices,
    continuation_logprobs,
    evaluate_commonsense_loglik,
    instruction_prompt,
)

VOCAB = "\0" + string.printable  # id 0 is the pad


class CharTokenizer:
    """One id per character; no special tokens."""

    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [VOCAB.index(ch) for ch in text]}


class Bigram(nn.Module):
    """logits[t] = table[token t]: p(next | previous) is a row of softmax(table), by hand."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def _bigram(pairs: dict[tuple[str, str], float]) -> Bigram:
    """A bigram model with p(b | a) = value for the listed pairs; the rest of each row uniform."""
    n = len(VOCAB)
    probs = torch.full((n, n), 1.0 / n, dtype=torch.float64)
    for a in {a for a, _ in pairs}:
        listed = {VOCAB.index(b): p for (a2, b), p in pairs.items() if a2 == a}
        rest = (1.0 - sum(listed.values())) / (n - len(listed))
        probs[VOCAB.index(a)] = rest
        for b, p in listed.items():
            probs[VOCAB.index(a), b] = p
    return Bigram(probs.log().float())


def test_two_options_scored_by_hand():
    model = _bigram({("b", "a"): 0.7, ("b", "b"): 0.2, ("a", "b"): 0.5})
    got = continuation_logprobs(model, CharTokenizer(), [("ab", "a"), ("ab", "b"), ("ab", "ab")], batch_size=2)
    # p(a | b) = 0.7; p(b | b) = 0.2; p(a | b) p(b | a) = 0.7 * 0.5
    assert got == pytest.approx([math.log(0.7), math.log(0.2), math.log(0.7 * 0.5)], abs=1e-5)


def test_the_highest_likelihood_choice_wins_and_ties_nothing_else():
    # the continuations differ only in the last character, after "r" of "answer": p(2 | r) > p(1 | r)
    model = _bigram({("r", "1"): 0.1, ("r", "2"): 0.6})
    items = [{"instruction": "Pick one.\n\nAnswer format: answer1/answer2", "input": "", "answer": "answer2"},
             {"instruction": "Again.\n\nAnswer format: answer1/answer2", "input": "", "answer": "answer1"}]
    out = evaluate_commonsense_loglik(model, CharTokenizer(), "ARC-Easy", items, batch_size=3)
    assert out["accuracy"] == 0.5 and out["correct"] == 1 and out["n"] == 2
    rec = out["records"][0]
    assert rec["choices"] == ["answer1", "answer2"] and rec["predicted"] == "answer2" and rec["correct"]
    assert rec["logprobs"][1] - rec["logprobs"][0] == pytest.approx(math.log(0.6 / 0.1), abs=1e-5)
    assert out["records"][1]["predicted"] == "answer2" and not out["records"][1]["correct"]


def test_choices_come_from_the_answer_format_line_else_the_task():
    assert answer_choices("social_i_qa", "Q?\n\nAnswer1: a Answer2: b Answer3: c\n\nAnswer format: answer1/answer2/answer3"
                          ) == ["answer1", "answer2", "answer3"]
    assert answer_choices("boolq", "Is it?") == ["true", "false"]
    assert answer_choices("winogrande", "x\nAnswer format: option1/option2\n") == ["option1", "option2"]


def test_batching_and_padding_do_not_change_the_scores(stories_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(stories_path)
    prompt = instruction_prompt("Once upon a time there was")
    pairs = [(prompt, " a little girl."), (prompt, " a dog"), ("Tom", " went home and slept.")]
    one = continuation_logprobs(model, tok, pairs, batch_size=1)
    three = continuation_logprobs(model, tok, pairs, batch_size=3)
    assert three == pytest.approx(one, abs=1e-4)
    # the first pair by a plain forward of the whole text
    ctx = tok(prompt)["input_ids"]
    full = tok(prompt + " a little girl.")["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([full])).logits[0].float().log_softmax(-1)
    want = sum(logp[t - 1, full[t]].item() for t in range(len(ctx), len(full)))
    assert one[0] == pytest.approx(want, abs=1e-4)


def test_loglik_mode_is_validated():
    assert EvalConfig(tasks=("boolq",), mode="loglik").mode == "loglik"
    with pytest.raises(ConfigError, match="eval.mode.*'sample'"):
        EvalConfig(mode="sample")
    with pytest.raises(ConfigError, match="gsm8k has no answer choices"):
        EvalConfig(tasks=("gsm8k", "boolq"), mode="loglik")


@pytest.mark.parametrize("choices", [["answer1", "answer2", "answer3"], ["true", "false"], ["solution1", "solution2"]])
def test_one_shared_sequence_scores_like_one_sequence_per_choice(stories_path, choices):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dude_dist.evaluate import LOGLIK_TEMPLATE, _choice_requests, _choice_scores, sequence_logprobs

    model = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(stories_path)
    prompt = instruction_prompt("Is the sky blue?\n\nAnswer format: " + "/".join(choices))
    requests = _choice_requests(tok, prompt, choices)
    got = _choice_scores(sequence_logprobs(model, tok.pad_token_id or 0, requests, batch_size=2), len(choices))
    want = continuation_logprobs(model, tok, [(prompt, LOGLIK_TEMPLATE.format(choice=c)) for c in choices],
                                 batch_size=1)
    assert got == pytest.approx(want, abs=1e-4)
    assert len(requests) in (1, len(choices))
