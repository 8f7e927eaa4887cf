"""Tiny Shakespeare in GPT-2's byte-pair encoding (as nanoGPT's data/shakespeare), fully offline.

Writes train.bin and val.bin (uint16 token ids; the first 90% of the characters are train):
301,966 train and 36,059 val tokens. Run: python data/shakespeare/prepare.py
"""

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root, for data.tokenizer

from data.tokenizer import gpt2_encoding  # noqa: E402


def prepare(out_dir: str = HERE) -> dict:
    with open(os.path.join(HERE, "..", "shakespeare_char", "input.txt"), encoding="utf-8") as f:
        text = f.read()
    n = int(0.9 * len(text))
    enc = gpt2_encoding()
    train_ids = np.array(enc.encode_ordinary(text[:n]), dtype=np.uint16)
    val_ids = np.array(enc.encode_ordinary(text[n:]), dtype=np.uint16)
    train_ids.tofile(os.path.join(out_dir, "train.bin"))
    val_ids.tofile(os.path.join(out_dir, "val.bin"))
    return {"vocab_size": enc.n_vocab, "train_tokens": len(train_ids), "val_tokens": len(val_ids)}


if __name__ == "__main__":
    print(prepare())
