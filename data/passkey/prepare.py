"""Passkey retrieval, the synthetic long-range task of Mohtashami & Jaggi 2023 ("Landmark
Attention", arXiv:2305.16300): a key of five distinct digits hidden in filler text at a chosen
depth, which the model must repeat after a cue. One token per character.

    the sun is yellow. here we go. key:40318. the sky is blue. there and back agkey:40318

An example of length L is exactly L characters: filler with the key statement "key:40318. "
inserted at character round(depth · F) of the F filler characters (depth 0: first, depth 1:
right before the cue), then the cue "key:" and the key. As in the paper, whose prompt ends by
repeating "The pass key is", the cue repeats what leads the key in the statement, so the answer
is a copy from far back, what induction heads do: ":" appears nowhere else. The filler holds no
digits, no ":" and no "key", so the key can only come from the statement; the model reads the
first L − 5 characters and is scored on the five digits.

The digits of a key are distinct: a model that finds each next digit by matching the one before
it (an induction head) is misled by a repeated digit: with repeats allowed, our small models did
not learn the task at all, with distinct digits config/passkey_rope.py learns it well within its
steps (BENCHMARKS.md, "Levers measured").

Writes train.bin and val.bin (uint16 token ids) and meta.pkl (vocab_size, itos, stoi) next to
this file, as data/shakespeare_char does, so train.py trains on it with dataset="passkey". The
stream is examples of random length (MIN_LENGTH to MAX_LENGTH, uniform) and depth (uniform),
each followed by a newline. train.py reads random windows of block_size = MAX_LENGTH: most hold
one or more whole examples, and the key-to-cue distance covers the whole training length.
Deterministic: the same seed gives the same bytes. Run: python data/passkey/prepare.py
"""

from __future__ import annotations

import os
import pickle
import random

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FILLER = ("the grass is green. ", "the sky is blue. ", "the sun is yellow. ", "here we go. ", "there and back again. ")
STATEMENT = "key:{key}. "
CUE = "key:"
KEY_DIGITS = 5
OVERHEAD = len(STATEMENT.format(key="0" * KEY_DIGITS)) + len(CUE) + KEY_DIGITS  # characters that are not filler
CHARS = "".join(sorted(set("".join(FILLER) + STATEMENT.format(key="") + CUE + "0123456789\n")))
MIN_LENGTH, MAX_LENGTH = 32, 128  # training example lengths; train with block_size = MAX_LENGTH
TRAIN_EXAMPLES, VAL_EXAMPLES = 12_000, 1_000


def filler(n: int, rng: random.Random) -> str:
    """n characters of filler sentences drawn at random (the last one cut)."""
    text = ""
    while len(text) < n:
        text += rng.choice(FILLER)
    return text[:n]


def make_example(length: int, depth: float, rng: random.Random) -> tuple[str, str]:
    """(text, key): an example of exactly `length` characters ending with its key, the key
    statement at character round(depth · F) of its F = length − OVERHEAD filler characters."""
    if not isinstance(length, int) or length < OVERHEAD:
        raise ValueError(
            f"passkey example length {length!r} is too short; valid: a whole number of at least {OVERHEAD}"
        )
    if not 0.0 <= depth <= 1.0:
        raise ValueError(
            f"passkey depth {depth!r} is not valid; valid: a fraction from 0.0 (first) to 1.0 (right before the cue)"
        )
    key = "".join(rng.sample("0123456789", KEY_DIGITS))
    fill = filler(length - OVERHEAD, rng)
    at = round(depth * len(fill))
    return fill[:at] + STATEMENT.format(key=key) + fill[at:] + CUE + key, key


def examples_stream(n: int, rng: random.Random, min_length: int = MIN_LENGTH, max_length: int = MAX_LENGTH) -> str:
    """n examples of uniform random length and depth, each followed by a newline."""
    return "".join(make_example(rng.randint(min_length, max_length), rng.random(), rng)[0] + "\n" for _ in range(n))


def prepare(out_dir: str = HERE, seed: int = 1337) -> dict:
    stoi = {ch: i for i, ch in enumerate(CHARS)}
    sizes = {}
    for split, n in (("train", TRAIN_EXAMPLES), ("val", VAL_EXAMPLES)):
        text = examples_stream(n, random.Random(f"passkey-{split}-{seed}"))
        np.array([stoi[c] for c in text], dtype=np.uint16).tofile(os.path.join(out_dir, f"{split}.bin"))
        sizes[f"{split}_tokens"] = len(text)
    meta = {"vocab_size": len(CHARS), "itos": dict(enumerate(CHARS)), "stoi": stoi}
    with open(os.path.join(out_dir, "meta.pkl"), "wb") as f:
        pickle.dump(meta, f)
    return {"vocab_size": len(CHARS), **sizes}


if __name__ == "__main__":
    print(prepare())
