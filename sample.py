"""Sample from a trained GPT with a KV cache, printing text as it is generated.

    python sample.py --ckpt out/rope_shakespeare/ckpt.pt --start="ROMEO:" --num_samples=2
    python sample.py --out_dir=out/rope_shakespeare --start=FILE:prompts.txt --temperature=0.8
    python sample.py --ckpt out/rope_shakespeare/ckpt.pt --max_new_tokens=2000 --cache_policy=window

--start=FILE:path reads several prompts, one per line (blank lines are skipped, and \\n inside
a line stands for a newline); they are generated together as one left-padded batch, and each
prompt gets num_samples samples. A single sample is printed as it is generated, several once
they are done.

The KV cache is on by default: the prompts are prefilled, then each new token is fed at its
position. --cache=False recomputes the whole context at every step (nanoGPT's way), for
comparison and debugging; it draws the same tokens. Past block_size, learned crops to the last
block_size tokens, sinusoidal and none run on, and rope and alibi follow --cache_policy: full
(every token; for context extension with --rope_scaling), window (the last --window tokens) or
sinks (the first --n_sink tokens plus the most recent ones, StreamingLLM). --cache_dtype=bfloat16
keeps the cache in bf16: half the memory and faster steps at long contexts, at bf16 precision in
attention (the tokens drawn can differ). --compile=True runs each decode step as one compiled
graph (torch.compile; CUDA graphs on CUDA): seconds to compile, then faster steps. Works with
nanoGPT checkpoints too. Every setting below can be given as --key=value.
"""

from __future__ import annotations

import os
import sys

import torch

from configurator import ConfigError, check_device, configure
from data.tokenizer import load_tokenizer, tokenizer_spec
from model import CACHE_DTYPES, load_checkpoint

DEFAULTS = dict(
    ckpt="",  # path to a ckpt.pt; default out_dir/ckpt.pt
    out_dir="out",
    start="\n",  # prompt text, or FILE:path with one prompt per line
    num_samples=1,  # samples per prompt
    max_new_tokens=500,
    temperature=0.8,  # 0 is greedy
    top_k=200,  # 0 disables
    top_p=1.0,  # 1.0 disables
    seed=1337,
    device="cpu",
    rope_scaling=None,  # e.g. {'rope_type': 'linear', 'factor': 2.0}: applied at inference
    cache=True,  # KV cache; False recomputes the whole context at every step
    cache_policy="sinks",  # rope and alibi past the window: full, window or sinks
    window=0,  # tokens the window and sinks policies keep; 0 means block_size
    n_sink=4,  # first tokens the sinks policy keeps
    cache_dtype="",  # the KV cache's dtype: "" is the model's (exact); bfloat16 halves it
    compile=False,  # torch.compile the decode step (CUDA graphs on CUDA); the first step compiles
)
SEPARATOR = "\n---------------\n"


def read_prompts(start: str) -> list[str]:
    """The prompts of --start: the text itself, or each non-blank line of FILE:path."""
    if not start.startswith("FILE:"):
        return [start]
    with open(start[5:], encoding="utf-8") as f:
        prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"{start[5:]!r} holds no prompt; valid: a file with one prompt per line")
    return prompts


def parse_cache_dtype(name: str) -> torch.dtype | None:
    """--cache_dtype: "" for the model's dtype (None), else a dtype name such as bfloat16."""
    names = {str(dtype).removeprefix("torch."): dtype for dtype in CACHE_DTYPES}
    if name and name not in names:
        raise ConfigError(f"cache_dtype={name!r} is not valid; valid: '' (the model's) or one of {', '.join(names)}")
    return names.get(name)


def main(argv: list[str]) -> None:
    try:
        cfg = configure(DEFAULTS, argv)
        check_device(cfg["device"])
        if cfg["num_samples"] < 1:
            raise ConfigError(f"num_samples={cfg['num_samples']} is not valid; valid: a whole number of at least 1")
        cache_dtype = parse_cache_dtype(cfg["cache_dtype"])
        path = cfg["ckpt"] or os.path.join(cfg["out_dir"], "ckpt.pt")
        model, checkpoint = load_checkpoint(path, cfg["device"], cfg["rope_scaling"])
        spec = checkpoint.get("tokenizer") or tokenizer_spec(checkpoint.get("config", {}).get("dataset", ""))
        encode, decode, eot = load_tokenizer(spec)
        prompts = [encode(text) for text in read_prompts(cfg["start"])]
        if not all(prompts):
            raise ValueError("a prompt is empty; valid: at least one character")
        rows = [prompt for prompt in prompts for _ in range(cfg["num_samples"])]
        generator = torch.Generator(device=cfg["device"]).manual_seed(cfg["seed"])
        steps = model.generate(rows, cfg["max_new_tokens"], cfg["temperature"], cfg["top_k"] or None, cfg["top_p"],
                               generator, stop_token=eot, cache=cfg["cache"], cache_policy=cfg["cache_policy"],
                               window=cfg["window"] or None, n_sink=cfg["n_sink"], cache_dtype=cache_dtype,
                               compile=cfg["compile"])
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")

    texts = [list(row) for row in rows]
    live = len(rows) == 1  # a single sample is printed as it grows
    shown = decode(texts[0]) if live else ""
    print(shown, end="", flush=True)
    for step in steps:
        for tokens, token in zip(texts, step.flatten().tolist()):
            if token != eot:  # once a row has ended, generate yields eot for it
                tokens.append(token)
        if live:
            text = decode(texts[0])
            print(text[len(shown) :], end="", flush=True)  # whole-text decode: BPE tokens can split a character
            shown = text
    if live:
        print(end=SEPARATOR)
    else:
        for tokens in texts:
            print(decode(tokens), end=SEPARATOR)

if __name__ == "__main__":
    main(sys.argv[1:])
