"""data/passkey/prepare.py and eval_length's passkey scorer: deterministic examples of the
requested length with the key at the requested depth, files train.py can read, and a scorer
that counts right and wrong answers right (checked with hand-written oracle models)."""

import pickle
import random
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import REPO

from configurator import configure
from data.passkey.prepare import (
    CHARS,
    CUE,
    FILLER,
    MAX_LENGTH,
    MIN_LENGTH,
    OVERHEAD,
    examples_stream,
    make_example,
    prepare,
)
from eval_length import evaluate_passkey, passkey_examples, score_passkey
from model import GPT, GPTConfig
from train import DEFAULTS as TRAIN_DEFAULTS

STOI = {c: i for i, c in enumerate(CHARS)}
EXAMPLE = re.compile(r"([a-z. ]*)key:(\d{5})\. ([a-z. ]*)key:(\d{5})")


def encode(text: str) -> list[int]:
    return [STOI[c] for c in text]


@pytest.mark.parametrize("length", [OVERHEAD, OVERHEAD + 1, 64, 129, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_example_has_its_length_and_the_key_at_its_depth(length, depth):
    text, key = make_example(length, depth, random.Random(7))
    assert len(text) == length
    before, key_in_statement, after, answer = EXAMPLE.fullmatch(text).groups()
    assert key_in_statement == answer == key and key.isdigit() and len(set(key)) == len(key)  # distinct digits
    filler = length - OVERHEAD
    assert len(before) == round(depth * filler) and len(before) + len(after) == filler
    assert text.endswith(CUE + key) and text.count(key) >= 2


def test_filler_gives_the_key_away_nowhere():
    filler = "".join(FILLER)
    assert not any(c.isdigit() for c in filler) and ":" not in filler and "key" not in filler


def test_examples_are_deterministic_by_seed():
    a = examples_stream(50, random.Random("s1"))
    assert a == examples_stream(50, random.Random("s1"))
    assert a != examples_stream(50, random.Random("s2"))
    assert passkey_examples(64, 0.5, 5, seed=3) == passkey_examples(64, 0.5, 5, seed=3)
    assert passkey_examples(64, 0.5, 5, seed=3) != passkey_examples(64, 0.5, 5, seed=4)


@pytest.mark.parametrize(
    "length,depth,message", [(OVERHEAD - 1, 0.5, "too short"), (64, 1.5, "depth 1.5"), (64, -0.1, "depth -0.1")]
)
def test_bad_example_request_is_an_error(length, depth, message):
    with pytest.raises(ValueError, match=message):
        make_example(length, depth, random.Random(0))


def test_prepare_writes_what_train_reads(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    sizes = prepare(str(first), seed=5)
    prepare(str(second), seed=5)
    for name in ("train.bin", "val.bin", "meta.pkl"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    with open(first / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    assert meta["vocab_size"] == len(CHARS) == sizes["vocab_size"]
    ids = np.fromfile(first / "val.bin", dtype=np.uint16)
    assert len(ids) == sizes["val_tokens"] and ids.max() < meta["vocab_size"]
    lines = "".join(meta["itos"][int(i)] for i in ids).split("\n")
    assert lines[-1] == "" and len(lines) > 100
    for line in lines[:-1]:
        match = EXAMPLE.fullmatch(line)
        assert match and match.group(2) == match.group(4) and MIN_LENGTH <= len(line) <= MAX_LENGTH
        assert len(set(match.group(2))) == len(match.group(2))  # distinct digits


class Oracle(nn.Module):
    """Reads each row, finds the key statement and the cue, and puts all its logit on the key
    digit due at each position after the cue; wrong_digit(key) names a digit to get wrong."""

    def __init__(self, wrong_digit=lambda key: None):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # a device for the scorer to read
        self.wrong_digit = wrong_digit

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, len(CHARS))
        for row, ids in enumerate(idx.tolist()):
            text = "".join(CHARS[i] for i in ids)
            key = re.search(r"key:(\d{5})\. ", text).group(1)  # the statement's
            first = text.rindex(CUE) + len(CUE) - 1  # the cue's last character predicts the first digit
            for t in range(first, min(first + len(key), len(ids))):
                digit = int(key[t - first])
                if self.wrong_digit(key) == t - first:
                    digit = (digit + 1) % 10
                logits[row, t, STOI[str(digit)]] = 1.0
        return logits, None


def greedy_key(model, text: str) -> str:
    """The key decoded greedily, one full forward per digit."""
    ids = torch.tensor([encode(text[:-5])])
    for _ in range(5):
        ids = torch.cat((ids, model(ids)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
    return "".join(CHARS[i] for i in ids[0, -5:].tolist())


def test_scorer_counts_right_and_wrong_answers():
    examples = passkey_examples(96, 0.5, 12, seed=0)
    assert score_passkey(Oracle(), encode, examples) == (1.0, 1.0)
    assert score_passkey(Oracle(lambda key: 2), encode, examples) == (0.0, 0.8)
    wrong_if_odd = Oracle(lambda key: 0 if int(key[0]) % 2 else None)
    share_even = sum(int(key[0]) % 2 == 0 for _, key in examples) / len(examples)
    assert 0 < share_even < 1
    exact, digit = score_passkey(wrong_if_odd, encode, examples, batch_tokens=200)  # in batches of two
    assert exact == pytest.approx(share_even) and digit == pytest.approx(1 - (1 - share_even) / 5)
    assert exact == pytest.approx(sum(greedy_key(wrong_if_odd, t) == k for t, k in examples) / len(examples))


def test_scorer_on_a_model_that_always_says_zero():
    class Zeros(Oracle):
        def forward(self, idx):
            logits = torch.zeros(*idx.shape, len(CHARS))
            logits[..., STOI["0"]] = 1.0
            return logits, None

    examples = [
        (text[:-5] + key, key)
        for key in ("00000", "01000", "12345")
        for text, _ in passkey_examples(40, 0.0, 1, seed=1)
    ]
    assert score_passkey(Zeros(), encode, examples) == (pytest.approx(1 / 3), pytest.approx((5 + 4 + 0) / 15))


def test_learned_table_past_block_size_is_not_applicable():
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(block_size=40, vocab_size=len(CHARS), n_layer=1, n_head=2, n_embd=16, pos_encoding="learned")
    ).eval()

    class NoBar:
        def update(self, n=1):
            pass

    cfg = dict(depths=(0.0, 1.0), passkey_samples=2, seed=0, batch_tokens=1024)
    out = evaluate_passkey(model, encode, [32, 41, 64], 40, cfg, NoBar())  # forwards of 31, 40 and 63 tokens
    assert [c.get("status") for c in out["cells"]] == [None, None, None, None, "n/a", "n/a"]
    assert [r.get("status") for r in out["by_length"]] == [None, None, "n/a"]
    assert all(0.0 <= r["exact"] <= r["digit"] <= 1.0 for r in out["by_length"][:2])


def test_config_trains_at_the_longest_example():
    cfg = configure(TRAIN_DEFAULTS, [str(REPO / "config" / "passkey_rope.py")])
    assert cfg["dataset"] == "passkey" and cfg["block_size"] == MAX_LENGTH
