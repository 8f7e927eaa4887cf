"""Benchmarks in sections, each a table of ratios measured in the same run on the same machine.

    python bench.py generate                      # KV-cache generation on the CPU
    python bench.py all --device=cuda --json out/bench.json

SECTION is one of train, attention, rope, generate, layouts, or all (every section in turn); or nanogpt PATH:
nanoGPT itself (a copy made by ../shared/peers/nanogpt.sh PATH) against ours, side by side, on its CPU recipe
or, with --device=cuda, its GPU recipe (.ci/gpu runs every GPU check in one script). --json
writes the rows of every section run, with the machine, torch version and date, to PATH.
One function per section, bench_<section>(device) -> {"setup": str, "rows": [...]}, listed in SECTIONS.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from attention import KVCache
from model import GPT, POS_ENCODINGS, ALiBi, GPTConfig, RoPE
from rope import uses_fused_rope
from sample import generate

# ---------------------------------------------------------------------------------------------
# generate: the KV cache against recomputing the context, long against short contexts, and
# against Hugging Face transformers' generate.

GENERATE_MODEL = dict(
    n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, bias=False, dropout=0.0, pos_encoding="rope"
)  # nanoGPT's Shakespeare-char shape, 10.6M parameters
# GPT-2 small's shape (124M, GPT-2's BPE vocabulary padded as nanoGPT does): weights outweigh the cache
GPT2_SMALL = dict(GENERATE_MODEL, n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)


def generation_times(model: GPT, prompt: list[int], new_tokens: int, **kw) -> list[float]:
    """Seconds from the call until each greedy token is out (the first includes the prefill)."""
    start = time.perf_counter()
    times = []
    for _ in generate(model, [prompt], new_tokens, temperature=0.0, cache_policy="full", **kw):
        times.append(time.perf_counter() - start)
    return times


def memory_bound_ratio(model: GPT) -> str:
    """What the latency rows would be if a float32 decode step only streamed memory, in words:
    every weight once, and the keys and values of every cached token."""
    cfg = model.config
    weights = 4 * model.get_num_params(non_embedding=False) / 1e6
    long, short = (4 * 2 * cfg.n_layer * cfg.n_embd * context / 1e6 for context in (4096, 256))
    return (
        f"{weights:.0f} MB of weights and {long:.0f} MB of float32 cache at 4,096 tokens ({short:.1f} MB at "
        f"256) predict {(weights + long) / (weights + short):.2f}x"
    )


def decode_latency(model: GPT, context: int, new_tokens: int = 64, **kw) -> float:
    """Seconds per decode step after a prefill of `context` tokens: the prefill and the first two
    steps excluded (with compile=True on CUDA, a new cache's first steps warm up and record the graph)."""
    prompt = torch.randint(0, model.config.vocab_size, (context,), generator=torch.Generator().manual_seed(0)).tolist()
    times = generation_times(model, prompt, new_tokens, **kw)
    return (times[-1] - times[2]) / (new_tokens - 3)


def hf_neox_tokens_per_second(cfg: GPTConfig, prompt: list[int], new_tokens: int, device: str) -> tuple[float, int]:
    """Hugging Face GPT-NeoX of our shape, random weights, greedy generate with its KV cache:
    (tokens per second, parameters)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hf_config = GPTNeoXConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        intermediate_size=4 * cfg.n_embd,
        max_position_embeddings=4 * 4096,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base, "partial_rotary_factor": 1.0},
    )
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(hf_config).to(device).eval()
    ids = torch.tensor([prompt], device=device)

    def run(n: int) -> float:
        start = time.perf_counter()
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
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
    # compiled: the cache's slots are part of the graph's shapes, so each length compiles once, untimed
    generation_times(model, prompt, new_tokens, compile=True)
    compiled = new_tokens / generation_times(model, prompt, new_tokens, compile=True)[-1]
    short, long = decode_latency(model, 256), decode_latency(model, 4096)
    bf16 = dict(cache_dtype=torch.bfloat16)
    short_bf16, long_bf16 = decode_latency(model, 256, **bf16), decode_latency(model, 4096, **bf16)
    for context in (256, 4096):  # each cache length compiles once
        decode_latency(model, context, compile=True)
    short_compiled, long_compiled = decode_latency(model, 256, compile=True), decode_latency(model, 4096, compile=True)
    gpt2 = GPT(GPTConfig(**GPT2_SMALL)).to(device).eval()
    gpt2_short, gpt2_long = decode_latency(gpt2, 256), decode_latency(gpt2, 4096)
    gpt2_short_bf16, gpt2_long_bf16 = decode_latency(gpt2, 256, **bf16), decode_latency(gpt2, 4096, **bf16)
    gpt2_prediction = memory_bound_ratio(gpt2)
    del gpt2
    hf, hf_params = hf_neox_tokens_per_second(model.config, prompt, new_tokens, device)
    step = "CUDA-graph" if device == "cuda" else "compiled"
    rows = [
        row(
            "tokens/s generating 1,024 tokens: KV cache / recomputing the context",
            cached,
            recomputed,
            "≥ 10×",
            cached / recomputed >= 10,
        ),
        row("ms per token: 4,096 tokens of context / 256", 1e3 * long, 1e3 * short, "≤ 1.5×", long / short <= 1.5),
        row(
            "the same with a bfloat16 cache (cache_dtype)",
            1e3 * long_bf16,
            1e3 * short_bf16,
            "≤ 1.5×",
            long_bf16 / short_bf16 <= 1.5,
        ),
        row(
            f"the same with the {step} decode step (compile=True)",
            1e3 * long_compiled,
            1e3 * short_compiled,
            "≤ 1.5×",
            long_compiled / short_compiled <= 1.5,
        ),
        row(
            "the same at GPT-2 small's shape (124M), float32 cache",
            1e3 * gpt2_long,
            1e3 * gpt2_short,
            "≤ 1.5×",
            gpt2_long / gpt2_short <= 1.5,
        ),
        row(
            "the same at GPT-2 small's shape, bfloat16 cache",
            1e3 * gpt2_long_bf16,
            1e3 * gpt2_short_bf16,
            "≤ 1.5×",
            gpt2_long_bf16 / gpt2_short_bf16 <= 1.5,
        ),
        row("tokens/s generating 1,024 tokens: ours / HF GPT-NeoX generate", cached, hf, "≥ 2×", cached / hf >= 2),
        row(f"the same, ours with the {step} decode step", compiled, hf, "≥ 2×", compiled / hf >= 2),
        row(f"tokens/s generating 1,024 tokens: {step} decode step / eager", compiled, cached),
    ]
    n_params = model.get_num_params(non_embedding=False)
    cfg = model.config
    setup = (
        f"rope, {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, "
        f"vocab {cfg.vocab_size}, {n_params / 1e6:.1f}M parameters "
        f"(HF GPT-NeoX: {hf_params / 1e6:.1f}M), "
        f"float32 (the cache too, unless bfloat16 is said), batch 1, greedy, prompt of {len(prompt)} tokens; "
        f"compiled: torch.compile(model, fullgraph=True"
        f"{', mode=reduce-overhead' if device == 'cuda' else ''}) for decode steps, which then read every "
        "slot of the cache (shapes fixed from step to step), prefills eager, compilation not timed; "
        f"latency, if a step only streams memory: {memory_bound_ratio(model)}; at GPT-2 small's shape "
        f"({GPT2_SMALL['n_layer']} layers, {GPT2_SMALL['n_embd']} wide, vocab {GPT2_SMALL['vocab_size']}) "
        f"{gpt2_prediction}"
    )
    return dict(setup=setup, rows=rows)


# ---------------------------------------------------------------------------------------------
# train, attention, rope: the training step of every encoding against nanoGPT's, each
# encoding's attention path, and the RoPE apply against a copy and against Hugging Face's.

NANOGPT_CPU_RECIPE = dict(
    n_layer=4,
    n_head=4,
    n_embd=128,
    block_size=64,
    batch_size=12,
    dropout=0.0,
    bias=False,
    dtype="float32",
    compile=False,
)
NANOGPT_CPU_STEP_MS = 33.0  # nanoGPT's CPU recipe on a 2-core AMX Xeon, as quoted in issue 5 (not measured here)
NANOGPT_CPU_TOKENS = NANOGPT_CPU_RECIPE["batch_size"] * NANOGPT_CPU_RECIPE["block_size"]  # per step of that recipe
MAIN_JOB = {"cpu": "config/rope_shakespeare.py", "cuda": "config/rope_shakespeare_gpu.py"}


def row(measure: str, ours: float, reference: float, target: str = "", met: bool | None = None) -> dict:
    """One line of a section's table: ours against the reference, their ratio, the target and whether it is met."""
    return dict(measure=measure, ours=ours, reference=reference, ratio=ours / reference, target=target, met=met)


def attention_backend(model: GPT) -> str:
    """The kernels attention (and RoPE) run on at the model's device and mode, in words."""
    device, encoding = model.lm_head.weight.device, model.transformer.wpe
    if isinstance(encoding, ALiBi):
        on_flex = encoding.on_flex(device)
        return "FlexAttention, compiled: ALiBi score_mod and causal block mask" if on_flex else "SDPA, dense ALiBi bias"
    if isinstance(encoding, RoPE):
        return "SDPA is_causal; RoPE " + ("fused Triton kernel" if uses_fused_rope(device) else "in PyTorch")
    return "SDPA is_causal"


def median_seconds(fn, device: str, repeats: int) -> float:
    """Median wall time of fn() over `repeats` calls, after one warm-up call (CUDA: events)."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_settings(device: str) -> dict[str, dict]:
    """The shapes the train section measures: nanoGPT's CPU recipe, and the main job as its config
    file sets it (train.py's defaults, then the file), unless the two are the same."""
    import train
    from configurator import configure

    def as_run(cfg: dict) -> tuple:  # what decides the step's speed, with dtype="auto" resolved
        shape = [cfg[k] for k in (*NANOGPT_CPU_RECIPE, "dataset") if k != "dtype"]
        return (*shape, train.pick_dtype(cfg["dtype"], device, cfg["n_embd"]))

    recipe = dict(train.DEFAULTS, **NANOGPT_CPU_RECIPE)
    main_job = configure(train.DEFAULTS, [MAIN_JOB[device]])
    shapes = {"nanoGPT's CPU recipe": recipe}
    if as_run(main_job) != as_run(recipe):
        shapes[f"main job ({MAIN_JOB[device]})"] = main_job
    return shapes


def time_train_steps(cfg: dict, variants: dict[str, dict], device: str, rounds: int = 5, steps: int = 10) -> dict:
    """ms per training step of each variant (model settings over cfg's) at cfg's shape, as train.py runs it
    (batch drawn from train.bin, autocast, backward, clipping, the optimizer step, loss.item()): the median step,
    variants taken in turn for `rounds` rounds so that they share the machine's load alike."""
    import train
    from data.dataset import data_paths, sample_starts
    from data.tokenizer import tokenizer_spec, vocab_size

    dtype = train.pick_dtype(cfg["dtype"], device, cfg["n_embd"])
    autocast = train.autocast_for(device, dtype)
    path = data_paths(cfg["dataset"], cfg["block_size"])["train"]
    vocab = vocab_size(tokenizer_spec(cfg["dataset"]))
    runs = {}
    for name, overrides in variants.items():
        torch.manual_seed(0)
        settings = dict({k: cfg[k] for k in train.MODEL_KEYS}, vocab_size=vocab)
        if "rope" not in overrides.get("pos_encoding", settings["pos_encoding"]):
            settings["rope_scaling"] = None
        model = GPT(GPTConfig(**{**settings, **overrides})).to(device).train()
        optimizers = train.configure_optimizers(model, cfg, device)
        scaler = torch.amp.GradScaler(device, enabled=dtype == "float16")
        runs[name] = dict(
            model=model,
            step_model=torch.compile(model) if cfg["compile"] else model,
            optimizers=optimizers,
            scaler=scaler,
            times=[],
        )
    generator = torch.Generator().manual_seed(0)

    def step(run):  # train.py's step, one micro-batch
        ix = sample_starts(path, cfg["batch_size"], cfg["block_size"], generator)
        loss = train.train_step(
            run["step_model"], run["optimizers"], run["scaler"], path, ix[None], cfg, device, autocast
        )
        return loss.item()

    for run in runs.values():
        for _ in range(3):  # warm-up (and compilation)
            step(run)
    for _ in range(rounds):
        for run in runs.values():
            for _ in range(steps):
                start = time.perf_counter()
                step(run)
                run["times"].append(time.perf_counter() - start)
    peak, peak_note = train.peak_flops(device, dtype)
    out = {}
    for name, run in runs.items():
        seconds = statistics.median(run["times"])
        tokens_per_second = cfg["batch_size"] * cfg["block_size"] / seconds
        out[name] = dict(
            ms=1e3 * seconds,
            tokens_per_second=tokens_per_second,
            mfu=train.estimate_mfu(run["model"], tokens_per_second, peak),
            backend=attention_backend(run["model"]),
        )
    return dict(steps=out, dtype=dtype, peak_note=peak_note)


def bench_train(device: str) -> dict:
    rows, details, setups = [], [], []
    shapes = train_settings(device)
    for name, cfg in shapes.items():
        result = time_train_steps(cfg, {e: dict(pos_encoding=e) for e in POS_ENCODINGS}, device)
        steps = result["steps"]
        setups.append(
            f"{name}: {cfg['n_layer']} layers, {cfg['n_head']} heads, {cfg['n_embd']} wide, "
            f"block {cfg['block_size']}, batch {cfg['batch_size']}, {result['dtype']}, "
            f"compile {cfg['compile']}, "
            f"MFU against {result['peak_note']}"
        )
        for encoding, s in steps.items():
            details.append(
                {
                    "shape": name,
                    "encoding": encoding,
                    "ms/step": f"{s['ms']:.2f}",
                    "tokens/s": f"{s['tokens_per_second']:,.0f}",
                    "MFU": f"{100 * s['mfu']:.2f}%",
                    "attention": s["backend"],
                }
            )
        learned = steps["learned"]["ms"]
        if device == "cpu":  # per token, so that a shape with another batch compares fairly
            tokens = cfg["batch_size"] * cfg["block_size"]
            ours, quoted = learned * 1e3 / tokens, NANOGPT_CPU_STEP_MS * 1e3 / NANOGPT_CPU_TOKENS
            rows.append(
                row(
                    f"learned µs/token / nanoGPT's quoted {NANOGPT_CPU_STEP_MS:g} ms "
                    f"per {NANOGPT_CPU_TOKENS} tokens ({name})",
                    ours,
                    quoted,
                    "≤ 1.0×",
                    ours <= quoted,
                )
            )
        on_cpu = device == "cpu"
        for encoding in ("rope", "alibi"):
            ratio = steps[encoding]["ms"] / learned
            rows.append(
                row(
                    f"{encoding} ms/step / learned ({name})",
                    steps[encoding]["ms"],
                    learned,
                    "≤ 1.15×" if on_cpu else "",
                    ratio <= 1.15 if on_cpu else None,
                )
            )
        if not on_cpu:
            ratio = steps["alibi"]["ms"] / steps["rope"]["ms"]
            rows.append(
                row(
                    f"alibi ms/step / rope ({name})",
                    steps["alibi"]["ms"],
                    steps["rope"]["ms"],
                    "≤ 1.15×",
                    ratio <= 1.15,
                )
            )
    if len(shapes) == 1:
        setups.append(f"the main job ({MAIN_JOB[device]}) runs this same shape and dtype")
    setup = (
        "; ".join(setups) + ". Median of 50 steps per encoding, taken in turns. "
        f"nanoGPT's {NANOGPT_CPU_STEP_MS:g} ms is quoted for its CPU recipe on this kind of machine, "
        "not measured here; "
        "our learned encoding is nanoGPT's architecture"
    )
    return dict(setup=setup, rows=rows, details=details)


def attention_inputs(B: int, nh: int, T: int, hs: int, device: str, dtype: torch.dtype):
    """As the model makes them, views of one (B, T, 3C) projection output: qkv, then qk
    (B, 2nh, T, hs), the queries and keys that its RoPE turns in one call, then q, k, v (B, nh, T, hs)."""
    qkv = torch.randn(B, T, 3 * nh * hs, device=device, dtype=dtype, requires_grad=True)
    qk, v = qkv.split([2 * nh * hs, nh * hs], dim=-1)
    qk = qk.view(B, T, 2 * nh, hs).transpose(1, 2)
    return qkv, qk, *qk.split(nh, dim=1), v.view(B, T, nh, hs).transpose(1, 2)


def bench_attention(device: str) -> dict:
    from attention import alibi_bias, alibi_slopes, attention, flex_alibi
    from rope import apply_rope, rope_cos_sin, rope_frequencies

    B, nh, T, hs = (12, 4, 64, 32) if device == "cpu" else (64, 6, 256, 64)  # nanoGPT's CPU recipe / its GPU config
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    qkv, qk, q, k, v = attention_inputs(B, nh, T, hs, device, dtype)
    positions = torch.arange(T, device=device)
    cos_sin = rope_cos_sin(positions, rope_frequencies(hs, 10000.0)[0].to(device))
    slopes = alibi_slopes(nh).to(device)
    dense = alibi_bias(slopes, positions, positions)
    flex = flex_alibi(slopes, T, T) if device == "cuda" else None  # no FlexAttention backward on the CPU
    grad = torch.randn(B, nh, T, hs, device=device, dtype=dtype)
    paths = {  # each encoding's attention after the q/k/v projection; masks built once per forward, outside
        "learned, sinusoidal, none: SDPA is_causal": lambda: attention(q, k, v),
        "rope: apply_rope + SDPA is_causal": lambda: attention(*apply_rope(qk, *cos_sin).split(nh, dim=1), v),
        "alibi: SDPA + dense bias": lambda: attention(q, k, v, dense),
    }
    if flex is not None:
        paths["alibi: FlexAttention, compiled"] = lambda: attention(q, k, v, flex)
    repeats = 50 if device == "cpu" else 100
    ms = {
        name: 1e3 * median_seconds(lambda: torch.autograd.grad(path(), qkv, grad), device, repeats)
        for name, path in paths.items()
    }
    causal, *others = paths
    rows = [row(f"ms fwd+bwd, {name} / SDPA is_causal", ms[name], ms[causal]) for name in others]
    if flex is not None:
        ratio = ms["alibi: FlexAttention, compiled"] / ms["alibi: SDPA + dense bias"]
        rows.append(
            row(
                "ms fwd+bwd, alibi: FlexAttention / dense bias",
                ms["alibi: FlexAttention, compiled"],
                ms["alibi: SDPA + dense bias"],
                "< 1×",
                ratio < 1,
            )
        )
    else:  # the CPU's choice: FlexAttention has no CPU backward, so compare forwards
        for Tf in (T, 1024):
            qf, kf, vf = (t.detach() for t in attention_inputs(B if Tf == T else 1, nh, Tf, hs, device, dtype)[2:])
            pf = torch.arange(Tf)
            masks = dict(flex=flex_alibi(slopes, Tf, Tf), dense=alibi_bias(slopes, pf, pf))
            with torch.no_grad():
                fwd = {
                    name: 1e3 * median_seconds(lambda: attention(qf, kf, vf, mask), device, 20)
                    for name, mask in masks.items()
                }
            rows.append(
                row(f"ms forward only, {Tf:,} tokens, alibi: FlexAttention / dense bias", fwd["flex"], fwd["dense"])
            )
    backend = "FlexAttention" if device in ALiBi.flex_devices else "SDPA with a dense bias"
    setup = (
        f"batch {B}, {nh} heads of {hs}, {T} tokens, {str(dtype).removeprefix('torch.')}, {device}; "
        f"the model's ALiBi here: {backend}; RoPE tables and ALiBi masks built outside the timing "
        "(once per forward, shared by every layer)"
    )
    if flex is None:
        setup += "; FlexAttention has no backward on the CPU, so its rows are forward only (batch 1 at 1,024 tokens)"
    return dict(setup=setup, rows=rows)


def hf_apply_rotary_pos_emb():
    """Hugging Face's eager RoPE, rotate_half style (transformers.models.llama.modeling_llama)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb


def bench_rope(device: str) -> dict:
    from rope import apply_rope, rope_cos_sin, rope_frequencies

    nh, hs = 6, 64  # nanoGPT's GPU Shakespeare heads
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    hf_apply = hf_apply_rotary_pos_emb()
    inv_freq = rope_frequencies(hs, 10000.0)[0].to(device)
    rows = []
    for T in (1024, 16384, 65536):
        qk = torch.randn(1, 2 * nh, T, hs, device=device, dtype=dtype)  # queries and keys, as the model passes them
        q, k = qk.split(nh, dim=1)
        cos, sin = rope_cos_sin(torch.arange(T, device=device), inv_freq)
        hf_cos, hf_sin = (
            torch.cat((t, t), dim=-1).to(dtype)[None] for t in (cos, sin)
        )  # HF's: (1, T, hs), model dtype
        copy = torch.empty_like(qk)
        repeats = 20 if T < 65536 or device == "cuda" else 5
        with torch.no_grad():
            fused = median_seconds(lambda: apply_rope(qk, cos, sin), device, repeats)
            copied = median_seconds(lambda: copy.copy_(qk), device, repeats)
            hf = median_seconds(lambda: hf_apply(q, k, hf_cos, hf_sin), device, repeats)
        gigabytes = 2 * qk.numel() * qk.element_size() / 1e9  # q and k read and written
        rows.append(
            row(
                f"{T:,} tokens: RoPE GB/s / a copy of the same bytes",
                gigabytes / fused,
                gigabytes / copied,
                "≥ 0.8×" if T >= 16384 and device == "cuda" else "",
                copied / fused >= 0.8 if T >= 16384 and device == "cuda" else None,
            )
        )
        rows.append(
            row(
                f"{T:,} tokens: speed-up over HF eager apply_rotary_pos_emb (calls/s)",
                1 / fused,
                1 / hf,
                "≥ 5×" if device == "cuda" else "",
                hf / fused >= 5 if device == "cuda" else None,
            )
        )
    kernel = (
        "the fused Triton kernel"
        if uses_fused_rope(torch.device(device))
        else "PyTorch (rope.rotate_pairs: no fused kernel on the CPU; GPU numbers unmeasured here)"
    )
    setup = (
        f"apply_rope on q and k as one tensor, batch 1, {nh} heads of {hs}, {str(dtype).removeprefix('torch.')}, "
        f"{device}, forward; RoPE runs {kernel}. The copy is one copy_ of q and k together; HF's cos/sin are "
        "its full-width tables in the model dtype. Tables built once per forward, outside the timing"
    )
    return dict(setup=setup, rows=rows)


# ---------------------------------------------------------------------------------------------
# layouts: grouped-query and sliding-window decoding at long contexts, the layouts' training step,
# and window attention against full attention at 4,096 tokens.

LAYOUT_CONFIGS = ("config/hybrid_shakespeare.py", "config/local_global_shakespeare.py")


def cache_megabytes(model: GPT, context: int) -> float:
    """The size of the float32 KVCache that generate makes for one row of `context` tokens."""
    cache = KVCache(model.config, 1, context)
    return sum(t.numel() * t.element_size() for t in cache.k + cache.v) / 1e6


def alternating_latencies(model: GPT, contexts: tuple[int, ...], rounds: int = 3) -> list[float]:
    """decode_latency at each context, the contexts taken in turn for `rounds` rounds (so that they share the
    machine's load alike): the median of each."""
    times = {context: [] for context in contexts}
    for _ in range(rounds):
        for context in contexts:
            times[context].append(decode_latency(model, context))
    return [statistics.median(times[context]) for context in contexts]


def bench_layouts(device: str) -> dict:
    import train
    from attention import LocalWindow, attention, local_block_mask
    from configurator import configure

    rows, notes = [], []
    main_job = configure(train.DEFAULTS, [MAIN_JOB[device]])
    main_shape = dict(GENERATE_MODEL, **{k: main_job[k] for k in ("n_layer", "n_head", "n_embd", "block_size")})
    for name, shape, target in (
        ("main job's shape, n_kv_head 1", dict(main_shape, n_kv_head=1), 1.3),
        ("10.6M shape, n_kv_head 1", dict(GENERATE_MODEL, n_kv_head=1), 1.3),
        (
            "10.6M shape, a 256-token window in every layer",
            dict(GENERATE_MODEL, layer_types="sliding_attention", sliding_window=256),
            1.1,
        ),
    ):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**shape)).to(device).eval()
        decode_latency(model, 256)  # warm-up
        short, long = alternating_latencies(model, (256, 4096))
        ratio = long / short
        rows.append(
            row(
                f"ms per token, {name}: 4,096 tokens of context / 256",
                1e3 * long,
                1e3 * short,
                f"≤ {target}×",
                ratio <= target,
            )
        )
        weights = 4 * model.get_num_params(non_embedding=False) / 1e6
        notes.append(
            f"{name}: {cache_megabytes(model, 4096):.1f} MB of cache at 4,096 tokens, {weights:.0f} MB of weights"
        )
    variants = {"rope": {}}
    for path in LAYOUT_CONFIGS:
        layout = configure(train.DEFAULTS, [path])
        variants[os.path.basename(path)] = {k: layout[k] for k in train.LAYOUT_KEYS}
    steps = time_train_steps(main_job, variants, device)["steps"]
    for name in variants:
        if name != "rope":
            ratio = steps[name]["ms"] / steps["rope"]["ms"]
            rows.append(
                row(
                    f"ms per train step, {name} / rope (main job)",
                    steps[name]["ms"],
                    steps["rope"]["ms"],
                    "≤ 1.05×",
                    ratio <= 1.05,
                )
            )
    B, nh, T, hs, window = 1, 6, 4096, 64, 256
    qkv, qk, q, k, v = attention_inputs(B, nh, T, hs, device, torch.float32)
    grad = torch.randn(B, nh, T, hs, device=device)
    mask = (None, local_block_mask(window, None, T, device)) if device == "cuda" else LocalWindow(window, None)
    ms = {
        kind: 1e3 * median_seconds(lambda: torch.autograd.grad(attention(q, k, v, m), qkv, grad), device, 10)
        for kind, m in (("window", mask), ("full", None))
    }
    rows.append(
        row(
            f"ms fwd+bwd at {T:,} tokens, a {window}-token window / full causal attention",
            ms["window"],
            ms["full"],
            "< 1×",
            ms["window"] < ms["full"],
        )
    )
    setup = (
        f"decode: the main job's shape and nanoGPT's Shakespeare-char shape (10.6M: 6 layers, 6 heads, 384 wide), "
        "float32, batch 1, greedy "
        f"({'; '.join(notes)}); train: the main job's shape ({MAIN_JOB[device]}) with each config's layout; "
        f"attention: batch {B}, {nh} heads of {hs}, float32, "
        + ("FlexAttention's block mask" if device == "cuda" else "blocks of queries (LocalWindow)")
        + " against SDPA is_causal"
    )
    return dict(setup=setup, rows=rows, details=[{"variant": n, "ms/step": f"{s['ms']:.2f}"} for n, s in steps.items()])


SECTIONS = {
    "train": bench_train,
    "attention": bench_attention,
    "rope": bench_rope,
    "generate": bench_generate,
    "layouts": bench_layouts,
}


# ---------------------------------------------------------------------------------------------
# nanogpt: nanoGPT itself against ours, side by side. Each project's own train.py runs in a
# subprocess, one at a time, in turns; both are timed the same way, from the moment each log line
# arrives, so a step costs what that project's loop costs (batch, forward, backward, clip, step,
# loss.item()) and evaluations are left out of both.

NANOGPT_RECIPE_ARGS = [  # nanoGPT's CPU recipe (../shared/peers/README.md); ours takes the same flags
    "--device=cpu",
    "--compile=False",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--dropout=0.0",
]
NANOGPT_ITERS = 2000  # the recipe's length
EVAL_LINE = re.compile(r"^step (\d+): train loss [0-9.]+, val loss ([0-9.]+)")  # both projects print this
MFU = re.compile(r"mfu (-?[0-9.]+)%")  # on both projects' iter lines, a running average
NANOGPT_GPU_TARGET = 1.47  # about the val loss nanoGPT's README reports for its GPU recipe (5,000 steps)
NANOGPT_MFU_PEAK = 312e12  # the peak nanoGPT's estimate_mfu divides by on any GPU: an A100's dense bf16


def check_nanogpt_path(path: str | None) -> str:
    """PATH as an absolute path, or a one-line SystemExit when it is not a prepared nanoGPT copy."""
    if path is None:
        sys.exit(
            "error: the nanogpt section needs PATH, a copy made by ../shared/peers/nanogpt.sh DIR; valid: "
            "python bench.py nanogpt DIR"
        )
    needed = ("train.py", "model.py", "config/train_shakespeare_char.py", "data/shakespeare_char/train.bin")
    missing = [name for name in needed if not os.path.isfile(os.path.join(path, name))]
    if missing:
        sys.exit(
            f"error: {path!r} is not a prepared nanoGPT copy (no {missing[0]}); valid: a DIR made by "
            "../shared/peers/nanogpt.sh DIR"
        )
    return os.path.abspath(path)


def timed_run(command: list[str], cwd: str, stop_below: float | None = None) -> dict:
    """Run a train.py that logs every iteration and time it from its log: each `iter` line's gap from the line
    before is one step. Returns the steps' seconds and every evaluation as (iteration, val loss, seconds of
    training before it) and the last MFU logged (%); with stop_below, stops at the first val loss at or below it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    steps, evals, log, mfu = [], [], [], 0.0
    last = time.perf_counter()
    for line in process.stdout:
        now = time.perf_counter()
        log.append(line)
        if line.startswith("iter "):
            steps.append(now - last)
            mfu = float(match[1]) if (match := MFU.search(line)) else mfu
        elif match := EVAL_LINE.match(line):
            evals.append((int(match[1]), float(match[2]), sum(steps)))
            if stop_below is not None and evals[-1][1] <= stop_below:
                process.kill()
                break
        last = now
    if process.wait() not in (0, -9) or not evals:
        sys.exit(f"error: {' '.join(command[1:3])} in {cwd} failed; its log ends: {''.join(log[-3:])!r}")
    iteration, val, seconds = evals[-1]
    name = os.path.basename(cwd)
    # progress, since the section's runs take minutes
    print(f"  {name}: {len(steps)} steps, {seconds:.1f} s of training to val {val:.4f} at step {iteration}", flush=True)
    return dict(steps=steps, evals=evals, mfu=mfu)


def nanogpt_command(path: str, iters: int, eval_interval: int, eval_iters: int, out_dir: str) -> list[str]:
    """nanoGPT's train.py on its Shakespeare-char config and its CPU recipe, `iters` steps (a short run keeps
    the recipe's schedule: nanoGPT divides by lr_decay_iters - warmup_iters)."""
    return [
        sys.executable, "train.py", "config/train_shakespeare_char.py", f"--out_dir={out_dir}", *NANOGPT_RECIPE_ARGS,
        f"--max_iters={iters}", f"--lr_decay_iters={max(iters, NANOGPT_ITERS)}", f"--eval_interval={eval_interval}",
        f"--eval_iters={eval_iters}", "--log_interval=1",
    ]  # fmt: skip


def ours_command(args: list[str], eval_interval: int, eval_iters: int, out_dir: str) -> list[str]:
    """Our train.py with args, logging every step, keeping the best checkpoint only (as nanoGPT's config)."""
    return [
        sys.executable, "train.py", *args, f"--out_dir={out_dir}", f"--eval_interval={eval_interval}",
        f"--eval_iters={eval_iters}", "--log_interval=1", "--always_save_checkpoint=False",
    ]  # fmt: skip


def median_step_ms(runs: list[dict]) -> float:
    """The median step over runs, each run's first 5 steps (warm-up) left out."""
    return 1e3 * statistics.median(s for run in runs for s in run["steps"][5:])


def bench_nanogpt_gpu(path: str) -> dict:
    """nanoGPT's GPU recipe (its config/train_shakespeare_char.py unchanged) against our GPU config, on CUDA:
    time to val 1.47, both evaluated as that config does (every 250 steps, 200 batches, as ours), and MFU."""
    import train

    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        theirs = timed_run(
            [sys.executable, "train.py", "config/train_shakespeare_char.py", f"--out_dir={tmp}/n"], path,
            NANOGPT_GPU_TARGET,
        )  # fmt: skip
        ours = timed_run([sys.executable, "train.py", MAIN_JOB["cuda"], f"--out_dir={tmp}/o"], here, NANOGPT_GPU_TARGET)
    (their_iter, their_val, their_time), (our_iter, our_val, our_time) = theirs["evals"][-1], ours["evals"][-1]
    rows = [
        row(f"s of training to val {NANOGPT_GPU_TARGET} (compiling included): ours (step {our_iter}, {our_val:.4f}) / "
            f"nanoGPT (step {their_iter}, {their_val:.4f})", our_time, their_time, "≤ 0.5×",
            our_time <= 0.5 * their_time and our_val <= NANOGPT_GPU_TARGET),
        row("MFU (%), the last logged; nanoGPT's, against an A100's 312 TFLOP/s, restated against this GPU's",
            ours["mfu"], theirs["mfu"] * NANOGPT_MFU_PEAK / train.peak_flops("cuda", "bfloat16")[0]),
    ]  # fmt: skip
    setup = (
        f"nanoGPT from {path}, its train.py and config/train_shakespeare_char.py unchanged, against our "
        f"train.py {MAIN_JOB['cuda']}, one after the other; time is the sum of the gaps between log lines, "
        "evaluations excluded, each run stopped at its first val loss at or below the target"
    )
    return dict(setup=setup, rows=rows)


def bench_nanogpt(device: str, path: str, quick: bool = False) -> dict:
    """nanoGPT at PATH (checked by check_nanogpt_path) against ours: on the CPU its CPU recipe, on CUDA
    bench_nanogpt_gpu."""
    if device == "cuda":
        return bench_nanogpt_gpu(path)
    here = os.path.dirname(os.path.abspath(__file__))
    main_job = MAIN_JOB["cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        recipe = [*NANOGPT_RECIPE_ARGS, "--pos_encoding=learned", "--dtype=float32"]
        theirs, ours = [], []
        for _ in range(3):  # short runs in turns, so both see the same load
            theirs.append(timed_run(nanogpt_command(path, 100, 1000, 1, f"{tmp}/n"), path))
            ours.append(timed_run(ours_command([*recipe, "--max_iters=100"], 1000, 1, f"{tmp}/o"), here))
        their_ms, our_ms = median_step_ms(theirs), median_step_ms(ours)
        # time to nanoGPT's best val loss: both evaluated every 100 steps on 20 val batches
        recipe_run = timed_run(nanogpt_command(path, NANOGPT_ITERS, 100, 20, f"{tmp}/n"), path)
        best_iter, target, their_time = min(recipe_run["evals"], key=lambda e: e[1])
        recipe_time = sum(recipe_run["steps"])
        our_iter, our_val, our_time = timed_run(ours_command([main_job], 100, 20, f"{tmp}/o"), here, target)["evals"][
            -1
        ]
        rows = [
            row("ms per step, nanoGPT's CPU recipe: ours (learned) / nanoGPT", our_ms, their_ms, "≤ 0.8×",
                our_ms <= 0.8 * their_ms),
            row(f"s of training to val {target:.4f} (nanoGPT's best, step {best_iter}): main job (step {our_iter}) / "
                "nanoGPT", our_time, their_time, "≤ 0.33×", our_time <= 0.33 * their_time and our_val <= target),
        ]  # fmt: skip
        if not quick:  # the main job in full, and nanoGPT's recipe for 4x its steps: the same budget
            full = timed_run(ours_command([main_job], 500, 100, f"{tmp}/o"), here)
            long = timed_run(nanogpt_command(path, 4 * NANOGPT_ITERS, 500, 100, f"{tmp}/n"), path)
            our_best, their_best = min(e[1] for e in full["evals"]), min(e[1] for e in long["evals"])
            rows += [
                row(f"s of training: main job in full / nanoGPT's {NANOGPT_ITERS:,}-step recipe", sum(full["steps"]),
                    recipe_time, "≤ 4×", sum(full["steps"]) <= 4 * recipe_time),
                row(f"best val loss, 100 batches: main job / nanoGPT, {4 * NANOGPT_ITERS:,} steps "
                    f"({sum(long['steps']):.0f} s)", our_best, their_best, "ours ≤ 1.50", our_best <= 1.50),
            ]  # fmt: skip
    setup = (
        f"nanoGPT from {path}, its train.py and config/train_shakespeare_char.py with its CPU recipe "
        f"({' '.join(NANOGPT_RECIPE_ARGS)}), against our train.py, each in its own process, one at a time, "
        f"{torch.get_num_threads()} threads each (OMP_NUM_THREADS); a step is the gap between two log lines, "
        f"evaluations excluded. Steps: 3 x 100 steps each, in turns; nanoGPT's {NANOGPT_ITERS:,}-step recipe took "
        f"{recipe_time:.1f} s of training; time to its best val: both evaluated every 100 steps on 20 batches; "
        f"the main job is {main_job}"
    )
    return dict(setup=setup, rows=rows)


def print_table(section: str, result: dict) -> None:
    print(f"\n## {section}: {result['setup']}\n")
    if result.get("details"):  # the measurements behind the ratios
        print("| " + " | ".join(result["details"][0]) + " |")
        print("|" + "---|" * len(result["details"][0]))
        for detail in result["details"]:
            print("| " + " | ".join(map(str, detail.values())) + " |")
        print()
    print(f"| {'measure':<70} | {'ours':>10} | {'reference':>10} | {'ratio':>8} | target |")
    print(f"|{'-' * 72}|{'-' * 12}|{'-' * 12}|{'-' * 10}|--------|")
    for row in result["rows"]:
        mark = " (missed)" if row["met"] is False else ""  # None: no target
        print(
            f"| {row['measure']:<70} | {row['ours']:>10.2f} | {row['reference']:>10.2f} | {row['ratio']:>7.2f}× | "
            f"{row['target']}{mark} |"
        )


class Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.exit(f"error: {message}")


def main(argv: list[str]) -> None:
    parser = Parser(description="ropegpt benchmarks: tables of ratios measured in one run.")
    parser.add_argument("section", choices=[*SECTIONS, "nanogpt", "all"])
    parser.add_argument("path", nargs="?", help="nanogpt: a nanoGPT copy made by ../shared/peers/nanogpt.sh PATH")
    parser.add_argument("--quick", action="store_true", help="nanogpt: without the two longest runs (budget rows)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", metavar="PATH", help="write the results to PATH as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device=cuda but no CUDA device is available; valid: --device=cpu")
    if args.section == "nanogpt":
        args.path = check_nanogpt_path(args.path)
    elif args.path is not None:
        sys.exit(f"error: PATH ({args.path!r}) is for the nanogpt section only; valid: python bench.py nanogpt PATH")
    sections = list(SECTIONS) if args.section == "all" else [args.section]
    cpu = platform.processor() or platform.machine()
    machine = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if args.device == "cuda" else cpu,
        cpu_threads=torch.get_num_threads(),
        load_average_before=os.getloadavg(),
    )
    print(
        f"{machine['date']}, torch {machine['torch']}, {args.device} ({machine['device']}), "
        f"{machine['cpu_threads']} threads, load average {machine['load_average_before'][0]:.1f} at start"
    )
    results = {}
    for section in sections:
        if section == "nanogpt":
            results[section] = bench_nanogpt(args.device, args.path, args.quick)
        else:
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
