"""Benchmarks in sections, each a table of ratios measured in the same run on the same machine.

    python bench.py generate                      # KV-cache generation on the CPU
    python bench.py all --device=cuda --json out/bench.json

SECTION is one of train, attention, rope, generate, or all (every section in turn). --json
writes the rows of every section run, with the machine, torch version and date, to PATH.
One function per section, bench_<section>(device) -> {"setup": str, "rows": [...]}, listed in SECTIONS.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

from model import GPT, GPTConfig


# ---------------------------------------------------------------------------------------------
# generate: the KV cache against recomputing the context, long against short contexts, and
# against Hugging Face transformers' generate.

GENERATE_MODEL = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, bias=False, dropout=0.0,
                      pos_encoding="rope")  # nanoGPT's Shakespeare-char shape, 10.6M parameters


def generation_times(model: GPT, prompt: list[int], new_tokens: int, **kw) -> list[float]:
    """Seconds from the call until each greedy token is out (the first includes the prefill)."""
    start = time.perf_counter()
    times = []
    for _ in model.generate([prompt], new_tokens, temperature=0.0, cache_policy="full", **kw):
        times.append(time.perf_counter() - start)
    return times


def decode_latency(model: GPT, context: int, new_tokens: int = 64) -> float:
    """Seconds per generated token after a prefill of `context` tokens (the prefill excluded)."""
    prompt = torch.randint(0, model.config.vocab_size, (context,), generator=torch.Generator().manual_seed(0)).tolist()
    times = generation_times(model, prompt, new_tokens)
    return (times[-1] - times[0]) / (new_tokens - 1)


def hf_neox_tokens_per_second(cfg: GPTConfig, prompt: list[int], new_tokens: int, device: str) -> tuple[float, int]:
    """Hugging Face GPT-NeoX of our shape, random weights, greedy generate with its KV cache:
    (tokens per second, parameters)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hf_config = GPTNeoXConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, intermediate_size=4 * cfg.n_embd, max_position_embeddings=4 * 4096,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base, "partial_rotary_factor": 1.0},
    )
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(hf_config).to(device).eval()
    ids = torch.tensor([prompt], device=device)

    def run(n: int) -> float:
        start = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
        assert out.size(1) == len(prompt) + n
        return time.perf_counter() - start

    run(8)  # warm-up
    return new_tokens / run(new_tokens), sum(p.numel() for p in hf.parameters())


def bench_generate(device: str) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**GENERATE_MODEL)).to(device).eval()
    prompt = list(range(16))
    new_tokens = 1024
    generation_times(model, prompt, 16)  # warm-up
    generation_times(model, prompt, 16, cache=False)
    cached = new_tokens / generation_times(model, prompt, new_tokens)[-1]
    recomputed = new_tokens / generation_times(model, prompt, new_tokens, cache=False)[-1]
    short, long = decode_latency(model, 256), decode_latency(model, 4096)
    hf, hf_params = hf_neox_tokens_per_second(model.config, prompt, new_tokens, device)
    rows = [
        dict(measure="tokens/s generating 1,024 tokens: KV cache / recomputing the context", ours=cached,
             reference=recomputed, ratio=cached / recomputed, target="≥ 10×", met=cached / recomputed >= 10),
        dict(measure="ms per token: 4,096 tokens of context / 256", ours=1e3 * long, reference=1e3 * short,
             ratio=long / short, target="≤ 1.5×", met=long / short <= 1.5),
        dict(measure="tokens/s generating 1,024 tokens: ours / HF GPT-NeoX generate", ours=cached, reference=hf,
             ratio=cached / hf, target="≥ 2×", met=cached / hf >= 2),
    ]
    n_params = sum(p.numel() for p in model.parameters())
    setup = (f"rope, {model.config.n_layer} layers, {model.config.n_head} heads, {model.config.n_embd} wide, "
             f"vocab {model.config.vocab_size}, {n_params / 1e6:.1f}M parameters "
             f"(HF GPT-NeoX: {hf_params / 1e6:.1f}M), "
             f"float32, batch 1, greedy, prompt of {len(prompt)} tokens")
    return dict(setup=setup, rows=rows)


SECTIONS = {  # None: not implemented yet
    "train": None,
    "attention": None,
    "rope": None,
    "generate": bench_generate,
}


def print_table(section: str, result: dict) -> None:
    print(f"\n## {section}: {result['setup']}\n")
    print(f"| {'measure':<70} | {'ours':>10} | {'reference':>10} | {'ratio':>8} | target |")
    print(f"|{'-' * 72}|{'-' * 12}|{'-' * 12}|{'-' * 10}|--------|")
    for row in result["rows"]:
        mark = "" if row["met"] else " (missed)"
        print(f"| {row['measure']:<70} | {row['ours']:>10.2f} | {row['reference']:>10.2f} | {row['ratio']:>7.2f}× | "
              f"{row['target']}{mark} |")


class Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.exit(f"error: {message}")


def main(argv: list[str]) -> None:
    parser = Parser(description="ropegpt benchmarks: tables of ratios measured in one run.")
    parser.add_argument("section", choices=[*SECTIONS, "all"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", metavar="PATH", help="write the results to PATH as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device=cuda but no CUDA device is available; valid: --device=cpu")
    if args.section != "all" and SECTIONS[args.section] is None:
        implemented = [name for name, bench in SECTIONS.items() if bench is not None]
        sys.exit(f"error: bench.py section {args.section!r} is not implemented yet; "
                 f"valid: {', '.join(implemented)}, all")
    sections = list(SECTIONS) if args.section == "all" else [args.section]
    cpu = platform.processor() or platform.machine()
    machine = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
                   device=torch.cuda.get_device_name() if args.device == "cuda" else cpu,
                   cpu_threads=torch.get_num_threads(), load_average_before=os.getloadavg())
    print(f"{machine['date']}, torch {machine['torch']}, {args.device} ({machine['device']}), "
          f"{machine['cpu_threads']} threads, load average {machine['load_average_before'][0]:.1f} at start")
    results = {}
    for section in sections:
        if SECTIONS[section] is None:
            print(f"\n## {section}: not implemented yet")
            continue
        results[section] = SECTIONS[section](args.device)
        print_table(section, results[section])
    machine["load_average_after"] = os.getloadavg()
    print(f"\nload average {machine['load_average_after'][0]:.1f} at the end (other processes share these cores)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, sections=results), f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
