"""Sample from a trained GPT, printing text as it is generated.

    python sample.py --ckpt out/rope_shakespeare/ckpt.pt --start="ROMEO:" --num_samples=2
    python sample.py --out_dir=out/rope_shakespeare --start=FILE:prompt.txt --temperature=0.8

Works with nanoGPT checkpoints too. Every setting below can be given as --key=value.
"""

from __future__ import annotations

import os
import sys

import torch

from configurator import configure
from data.tokenizer import load_tokenizer, tokenizer_spec
from model import GPT, GPTConfig, clean_state_dict, load_checkpoint

DEFAULTS = dict(
    ckpt="",  # path to a ckpt.pt; default out_dir/ckpt.pt
    out_dir="out",
    start="\n",  # prompt text, or FILE:path to read it from a file
    num_samples=1,
    max_new_tokens=500,
    temperature=0.8,  # 0 is greedy
    top_k=200,  # 0 disables
    top_p=1.0,  # 1.0 disables
    seed=1337,
    device="cpu",
    rope_scaling=None,  # e.g. {'rope_type': 'linear', 'factor': 2.0}: applied at inference
)


def main(argv: list[str]) -> None:
    try:
        cfg = configure(DEFAULTS, argv)
        path = cfg["ckpt"] or os.path.join(cfg["out_dir"], "ckpt.pt")
        model, checkpoint = load_checkpoint(path, cfg["device"])
        if cfg["rope_scaling"] is not None:
            model = GPT(GPTConfig(**dict(checkpoint["model_args"], rope_scaling=cfg["rope_scaling"])))
            model.load_state_dict(clean_state_dict(checkpoint["model"]))
            model = model.to(cfg["device"]).eval()
        spec = checkpoint.get("tokenizer") or tokenizer_spec(checkpoint.get("config", {}).get("dataset", ""))
        encode, decode, eot = load_tokenizer(spec)
        start = cfg["start"]
        if start.startswith("FILE:"):
            with open(start[5:], encoding="utf-8") as f:
                start = f.read()
        prompt = encode(start)
        if not prompt:
            raise ValueError("the prompt is empty; valid: at least one character")
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")

    generator = torch.Generator(device=cfg["device"]).manual_seed(cfg["seed"])
    for _ in range(cfg["num_samples"]):
        idx = torch.tensor([prompt], dtype=torch.long, device=cfg["device"])
        tokens, printed = list(prompt), decode(prompt)
        print(printed, end="", flush=True)
        for token in model.generate(idx, cfg["max_new_tokens"], cfg["temperature"], cfg["top_k"] or None,
                                    cfg["top_p"], generator):
            tokens.append(token.item())
            if token.item() == eot:
                break
            text = decode(tokens)
            print(text[len(printed):], end="", flush=True)  # whole-text decode: BPE tokens can split a character
            printed = text
        print("\n---------------")


if __name__ == "__main__":
    main(sys.argv[1:])
