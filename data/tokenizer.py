"""Tokenizers, described by a small dict that checkpoints carry, so sampling decodes what training encoded.

- {"kind": "char", "chars": "..."}: one token per character, token i is chars[i];
- {"kind": "gpt2"}: GPT-2's byte-pair encoding, built offline from the shipped data/gpt2.tiktoken;
- {"kind": "hf", "json": "...", "eot": id or None}: an imported model's own tokenizer.json (convert.py),
  read through the `tokenizers` library.
"""

from __future__ import annotations

import os
import pickle
from typing import Callable

import data

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = 50256
GPT2_VOCAB = 50257  # tokens in GPT-2's encoding
PAD_VOCAB_TO = 64  # a model's vocabulary is padded up to a multiple of this (nanoGPT's 50304 for GPT-2)


def gpt2_encoding():
    """GPT-2's encoding (50,257 tokens) from the merge ranks shipped in the repository.

    tiktoken.get_encoding("gpt2") would download the same ranks; reading them from disk keeps
    every run offline and identical.
    """
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(os.path.join(data.DATA_DIR, "gpt2.tiktoken"))
    return tiktoken.Encoding(
        name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": GPT2_EOT}
    )


def tokenizer_spec(dataset: str) -> dict:
    """The tokenizer of data/<dataset>: its meta.pkl's character vocabulary, else GPT-2's BPE."""
    meta_path = os.path.join(data.DATA_DIR, dataset, "meta.pkl")
    if os.path.exists(meta_path):
        with open(meta_path, "rb") as f:
            meta = pickle.load(f)
        return {"kind": "char", "chars": "".join(meta["itos"][i] for i in range(meta["vocab_size"]))}
    return {"kind": "gpt2"}


def vocab_size(spec: dict) -> int:
    """The vocabulary size of a model trained with this tokenizer: one entry per character, or
    GPT-2's 50,257 tokens padded up to a multiple of 64 (50,304, as nanoGPT does)."""
    if spec["kind"] == "char":
        return len(spec["chars"])
    return -(-GPT2_VOCAB // PAD_VOCAB_TO) * PAD_VOCAB_TO


def load_tokenizer(spec: dict) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str], int | None]:
    """(encode, decode, end-of-text id or None) for a tokenizer spec.

    encode raises ValueError naming any characters outside a char-level vocabulary.
    """
    if spec["kind"] == "hf":
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(spec["json"])
        return (
            (lambda s: tokenizer.encode(s).ids),
            (lambda ids: tokenizer.decode(ids, skip_special_tokens=False)),
            spec["eot"],
        )
    if spec["kind"] == "gpt2":
        enc = gpt2_encoding()
        return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), enc.decode, GPT2_EOT
    chars = spec["chars"]
    stoi = {ch: i for i, ch in enumerate(chars)}

    def encode(s: str) -> list[int]:
        unknown = sorted(set(s) - set(stoi))
        if unknown:
            raise ValueError(
                f"prompt has characters outside the model's vocabulary: {''.join(unknown)!r}; valid: any of {chars!r}"
            )
        return [stoi[c] for c in s]

    return encode, (lambda ids: "".join(chars[i] for i in ids)), None
