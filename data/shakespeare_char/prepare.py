"""Tiny Shakespeare, one token per character (as nanoGPT's shakespeare_char).

Writes train.bin and val.bin (uint16 token ids; the first 90% of the text is train) and
meta.pkl (vocab_size, itos, stoi) next to this file. Run: python data/shakespeare_char/prepare.py
"""

import os
import pickle

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def prepare(out_dir: str = HERE) -> dict:
    with open(os.path.join(HERE, "input.txt"), encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    ids[:n].tofile(os.path.join(out_dir, "train.bin"))
    ids[n:].tofile(os.path.join(out_dir, "val.bin"))
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    with open(os.path.join(out_dir, "meta.pkl"), "wb") as f:
        pickle.dump(meta, f)
    return {"vocab_size": len(chars), "train_tokens": n, "val_tokens": len(ids) - n}


if __name__ == "__main__":
    print(prepare())
