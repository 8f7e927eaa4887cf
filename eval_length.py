"""The length-extrapolation lab: how loss and passkey retrieval hold up past the training length.

    python eval_length.py --ckpt=out/rope_shakespeare/ckpt.pt                # perplexity against length
    python eval_length.py --ckpt=out/a/ckpt.pt,out/b/ckpt.pt --multipliers="(1,4,16)"
    python eval_length.py --ckpt=out/passkey_rope/ckpt.pt                    # passkey accuracy
    python eval_length.py --lab=True                                         # train, evaluate, RESULTS.md

Context lengths are L = multiplier × the checkpoint's block_size (0.5× to 8× by default).

Perplexity. The same first eval_tokens tokens of the val split are scored at every length and for
every model, so the numbers compare fairly; every token is scored exactly once, under two protocols:
- non-overlapping: windows [0, L), [L, 2L), ...; the prediction at window position t reads the
  t + 1 tokens up to it, so the mean mixes every context size from 1 to L;
- sliding: windows start every stride = stride_fraction · L tokens; the first window scores all
  its tokens and each later one only those past the previous window's end (Hugging Face's
  perplexity recipe), so every prediction past the first window reads at least L − stride + 1
  tokens.
The two protocols give very different numbers (GPT-2: about 19.6 against 16.5, transformers#5449)
and papers mix them, so every table says which. The per-position curve is the loss at window
position t averaged over the non-overlapping windows of the longest length: where a model breaks
down, it shows where.

Passkey (checkpoints trained on data/passkey): for every length and depth, passkey_samples
examples from data/passkey/prepare.py (the same for every model). One full forward per example,
teacher-forced; a digit is right when its argmax is the key digit. "exact" is the share of
examples with all five digits right, which is exactly the accuracy of greedy decoding (greedy
reproduces the key if and only if every teacher-forced argmax is right); "digit" is the share
of digits right.

RoPE checkpoints are also evaluated with every rope_scalings variant applied at inference (the
model rebuilt with that rope_scaling, same weights). A learned position table cannot reach past
block_size: those lengths are reported as n/a (in results.json, {"status": "n/a", "reason": ...}).

Outputs in out_dir: results.md (also printed), results.json, and PNG plots. With --lab=True the
five encodings and the layouts are first trained on shakespeare_char, and lab_passkey_rows on passkey,
with one budget per task, by train.py in subprocesses; the report, its tables with the budget, goes
to lab_report (RESULTS.md), and results.json and the plots to lab_out_dir. Every setting below can be given as
--key=value or in a config file.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from configurator import ConfigError, check_device, configure
from data.dataset import data_paths
from data.passkey.prepare import KEY_DIGITS, OVERHEAD, make_example
from data.tokenizer import load_tokenizer, tokenizer_spec
from model import GPT, POS_ENCODINGS, GPTConfig
from rope import complete_rope_scaling
from train import DEFAULTS as TRAIN_DEFAULTS
from train import LAYOUT_KEYS, load_checkpoint
from train import setup as train_setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULTS = dict(
    ckpt="",  # comma-separated ckpt.pt paths
    task="auto",  # 'ppl', 'passkey', or 'auto': passkey for checkpoints trained on dataset 'passkey'
    dataset="",  # val text for perplexity; default each checkpoint's own dataset
    multipliers=(0.5, 1, 2, 4, 8),  # context lengths, in units of each checkpoint's block_size
    stride_fraction=0.5,  # sliding protocol: stride = this × length
    eval_tokens=16384,  # perplexity: tokens scored at every length (the CPU cap; at least the longest length)
    depths=(0.0, 0.5, 1.0),  # passkey: where the key sits in the filler
    passkey_samples=93,  # passkey: examples per (length, depth) cell; 93, the fewest whose 95% interval is ±10 points
    batch_tokens=16384,  # tokens per forward batch (memory, not results)
    rope_scalings=(
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "ntk", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 4.0},
        {"rope_type": "yarn", "factor": 4.0},
        {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    ),  # applied at inference to every RoPE checkpoint; () for none
    seed=1337,  # seeds the passkey examples (the same for every model)
    device="cpu",  # 'cpu', 'cuda', 'cuda:N' or 'mps'
    out_dir="out/eval",  # results.md, results.json, *.png
    # The lab: train the five encodings and the layouts on both tasks, extend RoPE's context by
    # fine-tuning, evaluate them all, write lab_report. The defaults are the small budget, sized for
    # 90 minutes on a 2-core CPU (RESULTS.md states the wall time of its run); config/lab_gpu.py is a
    # larger one. More: raise the iters, or any train.py setting through the *_args.
    lab=False,  # True: run the lab (train, evaluate, report) instead of evaluating --ckpt
    lab_report="RESULTS.md",  # the lab's report, in markdown
    lab_out_dir="results",  # the lab's results.json and plots (out_dir is not used by the lab)
    lab_train_dir="out/lab",  # checkpoints and training logs, one folder per run
    lab_train=True,  # False: evaluate the checkpoints already in lab_train_dir
    lab_jobs=2,  # training runs at a time, each on cores / lab_jobs threads (small models use 2 threads poorly)
    lab_text_iters=1200,  # steps of each text run (12 × 64 tokens each)
    lab_passkey_iters=1200,  # steps of each passkey run (16 × 128 tokens each)
    lab_text_args=(  # train.py arguments of the text runs; then --pos_encoding, --out_dir and the iteration counts
        "--dataset=shakespeare_char --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --dropout=0.0"
    ),
    lab_passkey_args="config/passkey_rope.py",  # the same for the passkey runs
    lab_train_args="--dtype=float32 --device=cpu",  # appended to every run's arguments
    lab_layouts=(  # train.py configs whose layout settings (LAYOUT_KEYS) make a lab row each, named by file
        "config/hybrid_shakespeare.py",
        "config/local_global_shakespeare.py",
        "config/prope_shakespeare.py",
    ),
    # passkey, the costlier task, trains RoPE, the encodings that read far back (ALiBi, none) and the
    # layouts that mix RoPE with local or position-free layers; text trains every row
    lab_passkey_rows=("rope", "alibi", "none", "hybrid", "local_global"),  # the rows also trained on passkey
    seeds=(1337, 1338, 1339),  # the lab: every training run once per seed; tables give mean ± sd over them
    # Context extension as the papers do it: the RoPE checkpoints fine-tuned at extend_factor × their
    # training length, with each extend_variants scaling and with none (plain RoPE, the papers'
    # baseline), by train.py's init_from. Scaled from the papers: they fine-tune LLaMA for a sliver of
    # its pretraining (PI 1,000 steps, YaRN 400, after some 250,000); that sliver of ours would be a
    # few steps, so we give a tenth of the text run's steps to every variant alike, at the runs' same
    # tokens per step (batch_size / extend_factor sequences; PI's 64 × 8,192 tokens are below LLaMA's
    # 4M). PI's and YaRN's lr, 2e-5 after 20 warmup steps, constant, no weight decay, is 1/15 of LLaMA's
    # peak: 1/15 of our 1e-3 is extend_lr, warmed up over the papers' share, 2%, of the steps.
    extend_factor=4,  # s: the fine-tuning length is s × the training length, and each variant's factor is s
    extend_iters=120,  # fine-tuning steps of every variant
    extend_lr=6.7e-5,  # fine-tuning learning rate, constant after warmup
    extend_variants=("linear", "yarn"),  # rope_type of each fine-tuned scaling (PI's and YaRN's); () for none
)
Z95 = 1.959964  # the standard normal's 97.5% quantile: two-sided 95% intervals
PROTOCOLS = ("nonoverlapping", "sliding")
PROTOCOL_NAMES = {"nonoverlapping": "non-overlapping", "sliding": "sliding"}  # in the reports
TASKS = ("auto", "ppl", "passkey")
PLOTS = {"ppl": ("ppl_vs_length.png", "position_loss.png"), "passkey": ("passkey_accuracy.png", "passkey_depth.png")}


# ---------------------------------------------------------------------------------------------
# Perplexity: two protocols, every token scored once


def window_plan(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (begin, end, scored) over n_tokens input positions; a window scores its last
    `scored` positions. Windows begin at 0, stride, 2·stride, ... and end at min(begin + window,
    n_tokens); each scores the positions past the previous window's end, so the first window
    scores all of its tokens and every position is scored exactly once. stride = window gives
    non-overlapping windows.
    """
    if not (isinstance(window, int) and window >= 1 and isinstance(stride, int) and 1 <= stride <= window):
        raise ValueError(
            f"window {window!r} and stride {stride!r} are not valid; valid: whole numbers with 1 <= stride <= window"
        )
    plan, begin, scored_to = [], 0, 0
    while scored_to < n_tokens:
        end = min(begin + window, n_tokens)
        plan.append((begin, end, end - scored_to))
        begin, scored_to = begin + stride, end
    return plan


@torch.no_grad()
def score_windows(
    model: GPT, tokens: torch.Tensor, window: int, stride: int, batch_tokens: int = 16384
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses of tokens[1:] under window_plan(len(tokens) − 1, window, stride).

    tokens: (N + 1,) long. Returns (loss, position), each (N,): loss[i] is the cross-entropy of
    predicting tokens[i + 1] (float64), position[i] the index t in the window that scored it
    (the prediction read that window's t + 1 tokens up to tokens[i]).
    """
    n = tokens.numel() - 1
    loss = torch.full((n,), float("nan"), dtype=torch.float64)
    position = torch.full((n,), -1, dtype=torch.long)
    plan = window_plan(n, window, stride)
    device = next(model.parameters()).device
    by_length: dict[int, list[tuple[int, int, int]]] = {}
    for begin, end, scored in plan:
        by_length.setdefault(end - begin, []).append((begin, end, scored))
    for length, windows in by_length.items():
        rows = max(1, batch_tokens // length)
        for k in range(0, len(windows), rows):
            chunk = windows[k : k + rows]
            x = torch.stack([tokens[b:e] for b, e, _ in chunk]).to(device)  # (B, T)
            y = torch.stack([tokens[b + 1 : e + 1] for b, e, _ in chunk]).to(device)
            logits, _ = model(x)  # (B, T, V)
            ce = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").double().cpu()  # (B, T)
            for row, (b, e, scored) in enumerate(chunk):
                loss[e - scored : e] = ce[row, length - scored :]
                position[e - scored : e] = torch.arange(length - scored, length)
    return loss, position


def fits(config: GPTConfig, n_positions: int) -> bool:
    """Whether a forward over n_positions tokens is defined: a learned table stops at block_size."""
    return config.pos_encoding != "learned" or n_positions <= config.block_size


def not_applicable(config: GPTConfig) -> dict:
    return {"status": "n/a", "reason": f"past the learned position table ({config.block_size} positions)"}


def evaluate_perplexity(model: GPT, tokens: torch.Tensor, lengths: list[int], unit: int, cfg: dict, bar) -> dict:
    """Both protocols at every length (its multiplier: length / unit, the training length), and the
    per-position curve of the longest length that fits."""
    out = {protocol: [] for protocol in PROTOCOLS}
    curve = None
    for length in lengths:
        strides = {"nonoverlapping": length, "sliding": max(1, round(cfg["stride_fraction"] * length))}
        for protocol, stride in strides.items():
            row = {"length": length, "multiplier": length / unit, "stride": stride}
            if not fits(model.config, length):
                out[protocol].append({**row, **not_applicable(model.config)})
            else:
                loss, position = score_windows(model, tokens, length, stride, cfg["batch_tokens"])
                mean = loss.mean().item()
                row.update(
                    loss=mean,
                    ppl=math.exp(mean),
                    tokens=loss.numel(),
                    windows=len(window_plan(loss.numel(), length, stride)),
                )
                out[protocol].append(row)
                if protocol == "nonoverlapping":
                    sums = torch.bincount(position, weights=loss, minlength=length)
                    curve = {"length": length, "loss": (sums / torch.bincount(position, minlength=length)).tolist()}
            bar.update(1)
    out["position_loss"] = curve
    return out


# ---------------------------------------------------------------------------------------------
# Passkey retrieval


def passkey_examples(length: int, depth: float, n: int, seed: int) -> list[tuple[str, str]]:
    """n (text, key) examples of the given length and depth; the same for every model."""
    rng = random.Random(f"passkey-eval-{seed}-{length}-{depth}")
    return [make_example(length, depth, rng) for _ in range(n)]


@torch.no_grad()
def score_passkey(
    model: GPT, encode, examples: list[tuple[str, str]], batch_tokens: int = 16384
) -> tuple[float, float]:
    """(exact, digit): the share of examples whose key digits are all the argmax of a
    teacher-forced full forward (= greedy decoding's accuracy), and the share of digits that are.

    The model reads each text but its last character; the logits at the last KEY_DIGITS
    positions predict the key.
    """
    ids = torch.tensor([encode(text) for text, _ in examples], dtype=torch.long)  # (n, L)
    device = next(model.parameters()).device
    rows = max(1, batch_tokens // ids.size(1))
    correct = []
    for k in range(0, ids.size(0), rows):
        batch = ids[k : k + rows].to(device)
        logits, _ = model(batch[:, :-1])  # (B, L − 1, V)
        correct.append((logits[:, -KEY_DIGITS:].argmax(-1) == batch[:, -KEY_DIGITS:]).cpu())  # (B, digits)
    correct = torch.cat(correct)
    return correct.all(dim=1).double().mean().item(), correct.double().mean().item()


def evaluate_passkey(model: GPT, encode, lengths: list[int], unit: int, cfg: dict, bar) -> dict:
    """Accuracy per (length, depth) with its Wilson 95% interval (lo, hi), and per length averaged
    over depths; multipliers are length / unit, the training length."""
    cells, by_length = [], []
    for length in lengths:
        row = {"length": length, "multiplier": length / unit}
        if not fits(model.config, length - 1):
            cells += [{**row, "depth": d, **not_applicable(model.config)} for d in cfg["depths"]]
            by_length.append({**row, **not_applicable(model.config)})
            bar.update(len(cfg["depths"]))
            continue
        scores = []
        for depth in cfg["depths"]:
            exact, digit = score_passkey(
                model, encode, passkey_examples(length, depth, cfg["passkey_samples"], cfg["seed"]), cfg["batch_tokens"]
            )
            n = cfg["passkey_samples"]
            lo, hi = wilson_interval(round(exact * n), n)
            cells.append({**row, "depth": depth, "exact": exact, "digit": digit, "n": n, "lo": lo, "hi": hi})
            scores.append((exact, digit))
            bar.update(1)
        by_length.append(
            {**row, "exact": float(np.mean([s[0] for s in scores])), "digit": float(np.mean([s[1] for s in scores]))}
        )
    return {"cells": cells, "by_length": by_length}


# ---------------------------------------------------------------------------------------------
# Intervals: 95%, Wilson's for a share of examples, Student's t for a mean over seeds


def wilson_interval(k: int, n: int) -> tuple[float, float]:
    """The Wilson score 95% interval of a share k/n; unlike the normal approximation's it stays
    inside [0, 1] and does not shrink to a point at 0% or 100%."""
    p, z2 = k / n, Z95**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return centre - half, centre + half


def wilson_half_width(n: int) -> float:
    """The widest half-width of the Wilson interval over n examples, at a share of 50%."""
    lo, hi = wilson_interval(n / 2, n)
    return (hi - lo) / 2


def t_quantile(df: int) -> float:
    """Student's t 97.5% quantile with df degrees of freedom, from its density integrated numerically
    (4.303 for 2, 12.706 for 1)."""
    x = np.linspace(0.0, 200.0, 400_001)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(x))])  # from 0: half of 1
    return float(np.interp(0.475, cdf, x))


def mean_interval(values: list[float]) -> dict:
    """Mean, sample standard deviation and the 95% t interval of the mean over seeds; one value has
    no interval (lo and hi are None)."""
    n, mean = len(values), float(np.mean(values))
    if n == 1:
        return {"mean": mean, "sd": 0.0, "lo": None, "hi": None, "seeds": 1}
    sd = float(np.std(values, ddof=1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half, "seeds": n}


def separated(a: dict, b: dict) -> bool:
    """Whether two intervals are known and do not overlap."""
    return None not in (a["lo"], b["lo"]) and (a["hi"] < b["lo"] or b["hi"] < a["lo"])


# ---------------------------------------------------------------------------------------------
# Models and settings


def scaling_label(rope_scaling: dict) -> str:
    return f"rope+{rope_scaling.get('rope_type', rope_scaling.get('type'))}×{rope_scaling.get('factor', 1.0):g}"


def context_lengths(multipliers, block_size: int) -> list[int]:
    return sorted({max(1, round(m * block_size)) for m in multipliers})


def check_settings(cfg: dict) -> None:
    """One-line errors for bad settings, before any work starts."""
    if cfg["task"] not in TASKS:
        raise ConfigError(f"task={cfg['task']!r} is not valid; valid: {', '.join(TASKS)}")
    if not cfg["lab"] and not cfg["ckpt"]:
        raise ConfigError("no checkpoint given; valid: --ckpt=PATH[,PATH...] or --lab=True")
    for key in ("multipliers", "depths", "rope_scalings"):
        if not isinstance(cfg[key], (tuple, list)) or (key != "rope_scalings" and not cfg[key]):
            raise ConfigError(f"{key}={cfg[key]!r} is not valid; valid: a non-empty tuple such as {DEFAULTS[key]!r}")
    if not all(isinstance(m, (int, float)) and not isinstance(m, bool) and 0 < m < 1e6 for m in cfg["multipliers"]):
        raise ConfigError(
            f"multipliers={cfg['multipliers']!r} is not valid; valid: positive numbers such as (0.5, 1, 2, 4, 8, 16)"
        )
    if not all(isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d <= 1 for d in cfg["depths"]):
        raise ConfigError(
            f"depths={cfg['depths']!r} is not valid; valid: fractions from 0.0 (key first) to 1.0 (key last)"
        )
    if not 0 < cfg["stride_fraction"] <= 1:
        raise ConfigError(f"stride_fraction={cfg['stride_fraction']!r} is not valid; valid: a number in (0, 1]")
    rows = [*POS_ENCODINGS, *map(layout_name, cfg["lab_layouts"])]
    if "rope" not in cfg["lab_passkey_rows"] or not set(cfg["lab_passkey_rows"]) <= set(rows):
        raise ConfigError(
            f"lab_passkey_rows={cfg['lab_passkey_rows']!r} is not valid; valid: 'rope' (extended) and any of {rows}"
        )
    for key in ("eval_tokens", "passkey_samples", "batch_tokens", "lab_text_iters", "lab_passkey_iters", "lab_jobs"):
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} is not valid; valid: a whole number of at least 1")
    check_device(cfg["device"])
    for scaling in cfg["rope_scalings"]:
        if not isinstance(scaling, dict):
            raise ConfigError(
                f"rope_scalings holds {scaling!r}; valid: dicts such as {{'rope_type': 'yarn', 'factor': 4.0}}"
            )
        GPTConfig(pos_encoding="rope", block_size=64, n_embd=128, n_head=4, rope_scaling=scaling)  # validates its keys


def load_models(cfg: dict, paths: list[str]) -> list[dict]:
    """Every checkpoint (load_model), checked before any evaluation starts."""
    entries = [e for path in paths for e in load_model(cfg, path)]
    keys = [(e["task"], e["dataset"], e["label"]) for e in entries]
    for e, key in zip(entries, keys):  # two checkpoints of one encoding in one table: tell them apart by their folder
        if keys.count(key) > 1:
            e["label"] += f" [{os.path.basename(os.path.dirname(os.path.abspath(e['ckpt'])))}]"
    return entries


def load_model(cfg: dict, path: str, label: str = "", unit: int = 0) -> list[dict]:
    """A checkpoint, and a plain RoPE one also with each rope_scalings variant, with what its task
    needs (val tokens or an encoder). label: the row's name (default its pos_encoding); unit: the
    training length that multipliers count in (default its block_size; the lab gives a fine-tuned
    checkpoint its base's)."""
    model, checkpoint = load_checkpoint(path, cfg["device"])
    dataset = cfg["dataset"] or checkpoint.get("config", {}).get("dataset", "")
    task = cfg["task"] if cfg["task"] != "auto" else ("passkey" if dataset == "passkey" else "ppl")
    spec = checkpoint.get("tokenizer") or tokenizer_spec(dataset)
    unit = unit or model.config.block_size
    lengths = context_lengths(cfg["multipliers"], unit)
    entry = {
        "ckpt": path,
        "task": task,
        "dataset": dataset,
        "iter_num": checkpoint.get("iter_num"),
        "seed": checkpoint.get("config", {}).get("seed"),
        "lengths": lengths,
        "unit": unit,
    }
    if task == "ppl":
        entry["tokens"] = val_tokens(dataset, spec, cfg["eval_tokens"], lengths[-1], model.config.vocab_size)
    else:
        entry["encode"] = load_tokenizer(spec)[0]
        try:
            entry["encode"](make_example(OVERHEAD, 0.0, random.Random(0))[0])
        except ValueError:
            raise ConfigError(
                f"checkpoint {path!r} does not know the passkey characters; "
                "valid: a checkpoint trained on dataset 'passkey'"
            ) from None
        if lengths[0] < OVERHEAD:
            raise ConfigError(
                f"passkey length {lengths[0]} (multiplier {min(cfg['multipliers'])} × block_size "
                f"{unit}) is too short; valid: lengths of at least {OVERHEAD} characters"
            )
    entries = [{**entry, "model": model, "label": label or model.config.pos_encoding, "rope_scaling": None}]
    if model.config.pos_encoding == "rope" and model.config.rope_scaling is None:
        for scaling in cfg["rope_scalings"]:  # the same weights, rebuilt with the variant
            scaled, _ = load_checkpoint(path, cfg["device"], scaling)
            entries.append({**entry, "model": scaled, "label": scaling_label(scaling), "rope_scaling": scaling})
    return entries


def val_tokens(dataset: str, spec: dict, eval_tokens: int, longest: int, vocab_size: int) -> torch.Tensor:
    """The first eval_tokens + 1 tokens of data/<dataset>/val.bin: eval_tokens predictions."""
    if not dataset:
        raise ConfigError("the checkpoint names no dataset; valid: --dataset=NAME, e.g. shakespeare_char")
    if spec != tokenizer_spec(dataset):
        raise ConfigError(
            f"dataset {dataset!r} has another tokenizer than the checkpoint; valid: the dataset it was trained on"
        )
    if eval_tokens < longest:
        raise ConfigError(
            f"eval_tokens={eval_tokens} is shorter than the longest context length {longest}; valid: at least {longest}"
        )
    data = np.memmap(data_paths(dataset)["val"], dtype=np.uint16, mode="r")
    if len(data) < eval_tokens + 1:
        raise ConfigError(
            f"eval_tokens={eval_tokens} needs {eval_tokens + 1} tokens but {dataset} val has {len(data)}; "
            f"valid: at most {len(data) - 1}"
        )
    tokens = torch.from_numpy(data[: eval_tokens + 1].astype(np.int64))
    if int(tokens.max()) >= vocab_size:
        raise ConfigError(
            f"dataset {dataset!r} has token ids past the checkpoint's vocab_size {vocab_size}; "
            "valid: the dataset it was trained on"
        )
    return tokens


def evaluate(cfg: dict, entries: list[dict]) -> dict:
    """Run every entry's task, with one progress bar over all (length, protocol or depth) cells."""
    units = sum(len(e["lengths"]) * (len(PROTOCOLS) if e["task"] == "ppl" else len(cfg["depths"])) for e in entries)
    results = {"ppl": [], "passkey": []}
    with tqdm(total=units, desc="evaluating", unit="cell", file=sys.stderr, dynamic_ncols=True) as bar:
        for e in entries:
            bar.set_postfix_str(e["label"])
            cfg_model = e["model"].config
            row = {
                "label": e["label"],
                "ckpt": e["ckpt"],
                "pos_encoding": cfg_model.pos_encoding,
                "rope_scaling": cfg_model.rope_scaling,
                "block_size": cfg_model.block_size,
                "unit": e["unit"],
                "dataset": e["dataset"],
                "iter_num": e["iter_num"],
                "seed": e["seed"],
                "lengths": e["lengths"],
            }
            args = (e["model"], e["tokens"] if e["task"] == "ppl" else e["encode"], e["lengths"], e["unit"], cfg, bar)
            if e["task"] == "ppl":
                results["ppl"].append({**row, **evaluate_perplexity(*args)})
            else:
                results["passkey"].append({**row, **evaluate_passkey(*args)})
    results["summary"] = {task: over_seeds(models) for task, models in results.items()}
    return results


def over_seeds(models: list[dict]) -> list[dict]:
    """One model per (dataset, training length, label), its seeds combined: every cell's mean, sd and
    95% interval over them (mean_interval). Passkey intervals are widened to at least the Wilson
    interval of all the cell's examples, as every seed reads the same ones."""
    groups: dict[tuple, list[dict]] = {}
    for m in models:
        groups.setdefault((m["dataset"], m["unit"], m["label"]), []).append(m)
    summary = []
    for ms in groups.values():
        out = {k: ms[0][k] for k in ("label", "pos_encoding", "rope_scaling", "block_size", "unit", "dataset")}
        out.update(lengths=ms[0]["lengths"], seeds=[m["seed"] for m in ms])
        if "cells" in ms[0]:
            for key in ("cells", "by_length"):
                out[key] = [passkey_cell(rows, ms, key) for rows in zip(*(m[key] for m in ms))]
        else:
            for protocol in PROTOCOLS:
                out[protocol] = [combined(rows, "ppl") for rows in zip(*(m[protocol] for m in ms))]
            curves = np.array([m["position_loss"]["loss"] for m in ms])
            out["position_loss"] = {
                "length": ms[0]["position_loss"]["length"],
                "loss": curves.mean(axis=0).tolist(),
                "sd": (curves.std(axis=0, ddof=1) if len(ms) > 1 else 0 * curves[0]).tolist(),
            }
        summary.append(out)
    return summary


def combined(rows: list[dict], key: str) -> dict:
    """One cell of several seeds' rows: key's mean_interval, or n/a."""
    if rows[0].get("status") == "n/a":
        return rows[0]
    stats = mean_interval([r[key] for r in rows])
    return {"length": rows[0]["length"], "multiplier": rows[0]["multiplier"], key: stats.pop("mean"), **stats}


def passkey_cell(rows: list[dict], models: list[dict], key: str) -> dict:
    """A passkey cell (key 'cells') or length (key 'by_length') over seeds; its interval covers the
    Wilson interval of the examples of every seed (and depth) pooled."""
    cell = combined(rows, "exact")
    if cell.get("status") == "n/a":
        return cell
    same = [
        c
        for m in models
        for c in m["cells"]
        if c["length"] == cell["length"] and (key == "by_length" or c["depth"] == rows[0]["depth"])
    ]
    lo, hi = wilson_interval(sum(round(c["exact"] * c["n"]) for c in same), sum(c["n"] for c in same))
    if cell["lo"] is not None:  # with two seeds or more, the wider of the two, within [0, 1] as a share is
        lo, hi = max(0.0, min(lo, cell["lo"])), min(1.0, max(hi, cell["hi"]))
    cell.update(lo=lo, hi=hi)
    return {**cell, "depth": rows[0]["depth"]} if key == "cells" else cell


# ---------------------------------------------------------------------------------------------
# Report: markdown tables, JSON, plots


def fmt_ppl(row: dict) -> str:
    """A perplexity cell: the mean, ± the sd over seeds where there are several."""
    if row.get("status") == "n/a":
        return "n/a"
    number = "{:.2f}" if row["ppl"] < 100 else "{:,.0f}"
    return number.format(row["ppl"]) + (" ± " + number.format(row["sd"]) if row.get("seeds", 1) > 1 else "")


def fmt_pct(row: dict) -> str:
    """A passkey cell in %: the mean exact-match share, ± the sd over seeds where there are several."""
    if row.get("status") == "n/a":
        return "n/a"
    return f"{100 * row['exact']:.0f}" + (f" ± {100 * row['sd']:.0f}" if row.get("seeds", 1) > 1 else "")


def length_header(rows: list[dict]) -> str:
    return " | ".join(f"{r['length']} ({r['multiplier']:g}×)" for r in rows)


def table(title_col: str, models: list[dict], key: str, cell) -> list[str]:
    """A markdown table, one row per model, one column per length (the first model's lengths)."""
    lines = [f"| {title_col} | {length_header(models[0][key])} |", "|---" * (1 + len(models[0][key])) + "|"]
    for m in models:
        lines.append(f"| {m['label']} | " + " | ".join(cell(r) for r in m[key]) + " |")
    return lines


def markdown(results: dict, cfg: dict, image_dir: str) -> str:
    """The results as markdown tables (n/a: past a learned table), each task followed by its
    plots, linked from image_dir."""
    lines, summary = [], results["summary"]
    seeds = "" if max(len(m["seeds"]) for m in summary["ppl"] + summary["passkey"]) == 1 else " Mean ± sd over seeds."
    groups: dict[tuple, list[dict]] = {}
    for m in summary["ppl"]:
        groups.setdefault((m["dataset"], m["unit"]), []).append(m)
    for (dataset, block_size), models in groups.items():
        for protocol in PROTOCOLS:
            how = (
                "non-overlapping windows"
                if protocol == "nonoverlapping"
                else f"sliding windows, stride {cfg['stride_fraction']:g} × length"
            )
            lines += [
                f"Perplexity on {dataset} val, {how}: the first {cfg['eval_tokens']:,} tokens scored once at every "
                f"context length (trained at {block_size}).{seeds}",
                "",
            ]
            lines += table("model", models, protocol, fmt_ppl) + [""]
    if summary["ppl"]:
        lines += [f"![{name}]({image_dir}/{name})\n" for name in PLOTS["ppl"]]
    groups = {}
    for m in summary["passkey"]:
        groups.setdefault(m["unit"], []).append(m)
    for block_size, models in groups.items():
        n = cfg["passkey_samples"]
        lines += [
            f"Passkey retrieval, exact-match accuracy (%) by context length: the mean over depths "
            f"({', '.join(f'{d:g}' for d in cfg['depths'])}), {n} examples per depth "
            f"(trained at {block_size}); each cell's Wilson 95% interval is at most "
            f"±{100 * wilson_half_width(n):.1f} points.{seeds}",
            "",
        ]
        lines += table("model", models, "by_length", fmt_pct) + [""]
        lines += ["<details><summary>Accuracy (%) by depth (rows) and length (columns), per model</summary>", ""]
        for m in models:
            lines += [
                f"**{m['label']}**",
                "",
                f"| depth | {length_header(m['by_length'])} |",
                "|---" * (1 + len(m["by_length"])) + "|",
            ]
            for depth in cfg["depths"]:
                cells = [c for c in m["cells"] if c["depth"] == depth]
                lines.append(f"| {depth:g} | " + " | ".join(fmt_pct(c) for c in cells) + " |")
            lines.append("")
        lines += ["</details>", ""]
    if summary["passkey"]:
        lines += [f"![{name}]({image_dir}/{name})\n" for name in PLOTS["passkey"]]
    return "\n".join(lines)


def plot(results: dict, out_dir: str) -> list[str]:
    """PNG plots in out_dir of results' summary over seeds, error bars and bands ± 1 sd; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def plain_log_ticks(ax, xticks):
        ax.set_xticks(xticks)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if ax.get_yscale() == "log":
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.grid(alpha=0.3, which="both")

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)

    summary = results["summary"]
    if summary["ppl"]:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True, constrained_layout=True)
        for ax, protocol in zip(axes, PROTOCOLS):
            for m in summary["ppl"]:
                rows = [r for r in m[protocol] if r.get("status") != "n/a"]
                ax.errorbar(
                    [r["multiplier"] for r in rows],
                    [r["ppl"] for r in rows],
                    yerr=[r["sd"] for r in rows],
                    capsize=2,
                    marker="o",
                    lw=1.3,
                    ls="--" if m["rope_scaling"] else "-",
                    label=m["label"],
                )
            ax.axvline(1.0, color="gray", lw=0.8, ls=":")
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="context length (× training length)",
                title=f"{PROTOCOL_NAMES[protocol]} windows",
            )
            plain_log_ticks(ax, sorted({r["multiplier"] for m in summary["ppl"] for r in m[protocol]}))
        axes[0].set_ylabel("perplexity")
        axes[1].legend(fontsize=8)
        save(fig, PLOTS["ppl"][0])

        fig, ax = plt.subplots(figsize=(9, 4.8), constrained_layout=True)
        width = max(1, max(len(m["position_loss"]["loss"]) for m in summary["ppl"]) // 64)  # one bin width for all

        def binned(curve):  # mean over bins of positions: a single position is noisy
            curve = np.array(curve)
            return curve[: len(curve) // width * width].reshape(-1, width).mean(axis=1)

        for m in summary["ppl"]:
            mean, sd = binned(m["position_loss"]["loss"]), binned(m["position_loss"]["sd"])
            x = (np.arange(len(mean)) + 0.5) * width / m["unit"]
            (line,) = ax.plot(x, mean, lw=1.2, ls="--" if m["rope_scaling"] else "-", label=m["label"])
            ax.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=0.2, lw=0)
        ax.axvline(1.0, color="gray", lw=0.8, ls=":")
        ax.set(
            xlabel="position in the window (× training length)",
            ylabel="loss (nats)",
            title="loss by position, non-overlapping windows of the longest length",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, PLOTS["ppl"][1])

    if summary["passkey"]:
        fig, ax = plt.subplots(figsize=(9, 4.8), constrained_layout=True)
        for m in summary["passkey"]:
            rows = [r for r in m["by_length"] if r.get("status") != "n/a"]
            ax.errorbar(
                [r["multiplier"] for r in rows],
                [100 * r["exact"] for r in rows],
                yerr=[100 * r["sd"] for r in rows],
                capsize=2,
                marker="o",
                lw=1.3,
                ls="--" if m["rope_scaling"] else "-",
                label=m["label"],
            )
        ax.axvline(1.0, color="gray", lw=0.8, ls=":")
        ax.set(
            xscale="log",
            xlabel="context length (× training length)",
            ylabel="exact-match accuracy (%)",
            ylim=(-3, 103),
            title="passkey retrieval, mean over depths",
        )
        plain_log_ticks(ax, sorted({r["multiplier"] for m in summary["passkey"] for r in m["by_length"]}))
        ax.legend(fontsize=8)
        save(fig, PLOTS["passkey"][0])

        n = len(summary["passkey"])
        cols = min(5, n)
        fig, axes = plt.subplots(
            (n + cols - 1) // cols,
            cols,
            figsize=(3 * cols, 2.6 * ((n + cols - 1) // cols)),
            squeeze=False,
            constrained_layout=True,
        )
        for ax in axes.flat[n:]:
            ax.axis("off")
        for ax, m in zip(axes.flat, summary["passkey"]):
            depths = sorted({c["depth"] for c in m["cells"]})
            grid = np.array([[c.get("exact", np.nan) for c in m["cells"] if c["depth"] == d] for d in depths])
            image = ax.imshow(100 * grid, vmin=0, vmax=100, cmap="viridis", aspect="auto", origin="lower")
            ax.set_xticks(range(len(m["lengths"])), [f"{r['multiplier']:g}" for r in m["by_length"]], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_title(m["label"], fontsize=9)
        fig.colorbar(image, ax=axes, label="exact-match accuracy (%)", shrink=0.8)
        fig.supxlabel("context length (× training length); blank: n/a")
        fig.supylabel("depth of the key")
        save(fig, PLOTS["passkey"][1])
    return paths


def write_outputs(results: dict, cfg: dict, out_dir: str) -> list[str]:
    """results.json and the plots in out_dir; returns the plots' paths."""
    os.makedirs(out_dir, exist_ok=True)
    settings = {
        k: cfg[k]
        for k in ("multipliers", "stride_fraction", "eval_tokens", "depths", "passkey_samples", "seed", "rope_scalings")
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"settings": settings, **results}, f, indent=1)
    return plot(results, out_dir)


# ---------------------------------------------------------------------------------------------
# The lab: every encoding and layout on both tasks with one budget, once per seed; RoPE extended by
# fine-tuning; evaluate, write RESULTS.md


class TrainingFailed(Exception):
    """A train.py run of the lab exited with an error."""


def layout_name(path: str) -> str:
    """A layout config's row name: config/hybrid_shakespeare.py is 'hybrid'."""
    return os.path.basename(path).removesuffix(".py").removesuffix("_shakespeare")


def layout_args(path: str) -> list[str]:
    """A layout config's LAYOUT_KEYS settings that differ from train.py's defaults, as train.py arguments."""
    cfg = configure(TRAIN_DEFAULTS, [path])
    return [f"--{k}={cfg[k]!r}" for k in LAYOUT_KEYS if cfg[k] != TRAIN_DEFAULTS[k]]


def run_args(out_dir: str, iters: int, seed: int) -> list[str]:
    """The train.py arguments every lab run shares, but for its folder, step count and seed."""
    return [
        f"--out_dir={out_dir}",
        f"--max_iters={iters}",
        f"--lr_decay_iters={iters}",
        f"--eval_interval={iters}",
        "--eval_iters=20",
        "--log_interval=10",
        "--wandb_log=False",
        f"--seed={seed}",
    ]


def extension_label(scaling: dict | None, factor: int) -> str:
    return f"rope, fine-tuned at {factor}×" if scaling is None else f"{scaling_label(scaling)}, fine-tuned"


def extension_scalings(cfg: dict, length: int) -> list[dict | None]:
    """None (plain RoPE, the papers' baseline) and each extend_variants scaling with factor
    extend_factor and, where the variant reads it, the training length it extends."""
    scalings = ({"rope_type": v, "factor": float(cfg["extend_factor"])} for v in cfg["extend_variants"])
    return [None] + [complete_rope_scaling(scaling, length) for scaling in scalings]


def extension_runs(cfg: dict, base: dict) -> list[dict]:
    """RoPE's context extension from the base run's checkpoint: train.py with init_from it, at
    extend_factor × its block_size and the same tokens per step, once per extension_scalings."""
    trained, factor, iters = train_setup(base["argv"]), cfg["extend_factor"], cfg["extend_iters"]
    runs = []
    for scaling in extension_scalings(cfg, trained["block_size"]):
        kind = scaling["rope_type"] if scaling else "none"
        out_dir = os.path.join(cfg["lab_train_dir"], f"{base['task']}_extend_{kind}_seed{base['seed']}")
        argv = base["argv"] + [
            f"--init_from={os.path.join(base['out_dir'], 'ckpt.pt')}",
            f"--block_size={factor * trained['block_size']}",
            f"--batch_size={max(1, trained['batch_size'] // factor)}",
            f"--rope_scaling={scaling!r}",
            f"--learning_rate={cfg['extend_lr']}",
            f"--min_lr={cfg['extend_lr']}",  # = learning_rate: constant after the warmup
            f"--warmup_iters={max(1, iters // 50)}",
            "--weight_decay=0.0",
            *run_args(out_dir, iters, base["seed"]),
        ]
        runs.append(
            {
                **base,
                "kind": "extend",
                "name": extension_label(scaling, factor),
                "out_dir": out_dir,
                "argv": argv,
                "iters": iters,
                "rope_scaling": scaling,
                "unit": trained["block_size"],
            }
        )
    return runs


def lab_runs(cfg: dict) -> list[dict]:
    """Every training run of the lab, once per seed: every encoding and every layout on text, the
    lab_passkey_rows on passkey (kind 'train'), then RoPE's context extension from the same seed's
    RoPE run (kind 'extend')."""
    runs = []
    for task, args, iters in (
        ("text", cfg["lab_text_args"], cfg["lab_text_iters"]),
        ("passkey", cfg["lab_passkey_args"], cfg["lab_passkey_iters"]),
    ):
        rows = [(e, [f"--pos_encoding={e}"]) for e in POS_ENCODINGS]
        rows += [(layout_name(path), layout_args(path)) for path in cfg["lab_layouts"]]
        if task == "passkey":
            rows = [row for row in rows if row[0] in cfg["lab_passkey_rows"]]
        for seed in cfg["seeds"]:
            for name, row_args in rows:
                out_dir = os.path.join(cfg["lab_train_dir"], f"{task}_{name}_seed{seed}")
                argv = (
                    shlex.split(args) + row_args + run_args(out_dir, iters, seed) + shlex.split(cfg["lab_train_args"])
                )
                runs.append(
                    {"task": task, "kind": "train", "name": name, "seed": seed, "out_dir": out_dir, "argv": argv}
                    | {"iters": iters, "rope_scaling": None, "unit": 0}
                )
            runs += extension_runs(
                cfg, next(r for r in runs if (r["task"], r["name"], r["seed"]) == (task, "rope", seed))
            )
    return runs


def train_run(run: dict, threads: int, bar) -> dict:
    """train.py in a subprocess on `threads` threads, its output in out_dir/train.log; returns its wall time
    and final losses. bar counts its steps."""
    os.makedirs(run["out_dir"], exist_ok=True)
    log_path = os.path.join(run["out_dir"], "train.log")
    t0, last, losses, done = time.time(), "", {}, 0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "train.py"), *run["argv"]],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
        for line in proc.stdout:
            log.write(line)
            last = line.strip() or last
            if m := re.match(r"iter (\d+):", line):
                bar.update(int(m.group(1)) + 1 - done)
                done = int(m.group(1)) + 1
            if m := re.match(r"step \d+: train loss ([\d.]+), val loss ([\d.]+)", line):
                losses = {"train_loss": float(m.group(1)), "val_loss": float(m.group(2))}
        proc.wait()
    bar.update(run["iters"] - done)
    if proc.returncode:
        raise TrainingFailed(
            f"training {os.path.basename(run['out_dir'])} failed (exit {proc.returncode}): {last}; log: {log_path}"
        )
    return {"wall_s": time.time() - t0, **losses}


def train_all(runs: list[dict], jobs: int) -> dict:
    """Every run by train_run, `jobs` at a time on an equal share of the cores; the extension runs
    after the runs whose checkpoints they start from. Returns each run's train_run result by folder."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    training = {}
    for kind in ("train", "extend"):
        batch = [r for r in runs if r["kind"] == kind]
        total = sum(r["iters"] for r in batch)
        with tqdm(total=total, desc=f"training ({kind}, {len(batch)} runs)", unit="iter", file=sys.stderr) as bar:
            with ThreadPoolExecutor(jobs) as pool:
                results = pool.map(lambda run: train_run(run, threads, bar), batch)
                training.update(zip((os.path.basename(r["out_dir"]) for r in batch), results))
    return training


def inference_scalings(cfg: dict) -> list[dict]:
    """rope_scalings, and each fine-tuned variant that it lacks: every extension is evaluated beside
    the same scaling applied at inference only."""
    extra = [{"rope_type": v, "factor": float(cfg["extend_factor"])} for v in cfg["extend_variants"]]
    return list(cfg["rope_scalings"]) + [s for s in extra if s not in cfg["rope_scalings"]]


def lab_models(cfg: dict, runs: list[dict]) -> list[dict]:
    """Every lab checkpoint loaded for evaluation: the plain RoPE ones also with inference_scalings,
    the extended ones as they were fine-tuned, their lengths in units of the base's training length."""
    eval_cfg = dict(cfg, task="auto", dataset="", rope_scalings=inference_scalings(cfg))
    entries = []
    for run in runs:
        run_cfg = eval_cfg if run["kind"] == "train" else dict(eval_cfg, rope_scalings=())
        entries += load_model(run_cfg, os.path.join(run["out_dir"], "ckpt.pt"), run["name"], run["unit"])
    return entries


def run_lab(cfg: dict, command: str) -> None:
    runs = lab_runs(cfg)
    for run in runs:  # every run's settings, checked before the first one starts
        train_setup(run["argv"])
    for ckpt in (os.path.join(run["out_dir"], "ckpt.pt") for run in runs):
        if not cfg["lab_train"] and not os.path.exists(ckpt):
            raise ConfigError(f"lab_train=False but {ckpt} does not exist; valid: --lab_train=True to train it")
    t_start = time.time()
    training = train_all(runs, cfg["lab_jobs"]) if cfg["lab_train"] else {}
    results = evaluate(cfg, lab_models(cfg, runs))
    results["training"] = training
    write_outputs(results, cfg, cfg["lab_out_dir"])
    report = lab_report(cfg, command, runs, training, results, time.time() - t_start)
    os.makedirs(os.path.dirname(os.path.abspath(cfg["lab_report"])), exist_ok=True)
    with open(cfg["lab_report"], "w") as f:
        f.write(report)
    print(f"wrote {cfg['lab_report']}, and results.json and plots in {cfg['lab_out_dir']}")


ANCHORS = """Published anchors, for the reader:
- ALiBi paper (Press et al. 2021, arXiv:2108.12409; trained on 512 tokens of WikiText-103, non-overlapping windows),
  perplexity from 512 to 15,512 tokens as reported: sinusoidal 20.05 → 406 (×20), rotary 20.07 → 79.25 (×3.9),
  ALiBi 19.73 → 18.31 (×0.93).
- PI paper (Chen et al. 2023, arXiv:2306.15595): LLaMA extended by position interpolation and fine-tuned for 1,000
  steps holds its perplexity out to the new length; without fine-tuning, interpolation alone is worse there.
- YaRN paper (Peng et al. 2023, arXiv:2309.00071): after fine-tuning (400 steps), YaRN beats position interpolation
  (PI, our `linear`) at long context in perplexity, and NTK-aware scaling beats PI without fine-tuning."""


def comparisons(cfg: dict) -> list[tuple[str, str]]:
    """The pairs of rows the findings test: each fine-tuned variant against the same scaling at
    inference only and against plain RoPE fine-tuned; each layout against RoPE; the YaRN paper's
    orders (yarn against linear fine-tuned, yarn against ntk against linear at inference)."""
    factor = cfg["extend_factor"]
    tuned = {v: extension_label({"rope_type": v, "factor": float(factor)}, factor) for v in cfg["extend_variants"]}
    pairs = []
    for variant, label in tuned.items():
        pairs += [
            (label, scaling_label({"rope_type": variant, "factor": factor})),
            (label, extension_label(None, factor)),
        ]
    if {"yarn", "linear"} <= set(tuned):
        pairs.append((tuned["yarn"], tuned["linear"]))
    inference = [scaling_label({"rope_type": v, "factor": factor}) for v in ("yarn", "ntk", "linear")]
    pairs += [(inference[0], inference[1]), (inference[1], inference[2])]
    return pairs + [(layout_name(path), "rope") for path in cfg["lab_layouts"]]


def fmt_interval(row: dict, scale: float = 1.0) -> str:
    if row["lo"] is None:
        return f"{scale * row['mean']:.2f} (one seed: no interval)"
    return f"{scale * row['mean']:.2f} [{scale * row['lo']:.2f}, {scale * row['hi']:.2f}]"


def claim(a: str, row_a: dict, b: str, row_b: dict, lower_is_better: bool, scale: float = 1.0) -> str:
    """'A < B' (or >) with both 95% intervals where they separate, else 'no difference measured'."""
    text = f"{a} {fmt_interval(row_a, scale)} against {b} {fmt_interval(row_b, scale)}"
    if not separated(row_a, row_b):
        return f"no difference measured: {text}"
    better = (row_a["mean"] < row_b["mean"]) == lower_is_better
    return f"{a if better else b} is better: {text}"


def findings(results: dict, cfg: dict) -> list[str]:
    """Statements read off the summary: for each perplexity protocol and for passkey, at extend_factor ×
    and at the longest length, each comparisons pair, a claim only where the 95% intervals separate."""
    metrics = [(PROTOCOL_NAMES[p] + " perplexity", "ppl", p, True, 1.0) for p in PROTOCOLS]
    metrics.append(("passkey exact match (%)", "passkey", "by_length", False, 100.0))
    lines = []
    for title, task, key, lower_is_better, scale in metrics:
        rows = {m["label"]: {r["multiplier"]: r for r in m[key]} for m in results["summary"][task]}
        if not rows:
            continue
        longest = max(max(by_mult) for by_mult in rows.values())
        for mult in sorted({float(cfg["extend_factor"]), longest}):
            for a, b in comparisons(cfg):
                row_a, row_b = rows.get(a, {}).get(mult), rows.get(b, {}).get(mult)
                if row_a and row_b and "status" not in row_a and "status" not in row_b:
                    value = "ppl" if task == "ppl" else "exact"
                    stats_a, stats_b = ({**r, "mean": r[value]} for r in (row_a, row_b))
                    lines.append(f"- {title} at {mult:g}×: {claim(a, stats_a, b, stats_b, lower_is_better, scale)}.")
    return lines


def training_table(runs: list[dict], training: dict) -> list[str]:
    """Wall time and final losses per row, over its seeds."""
    lines = ["| run | seeds | wall time per seed (s) | final train / val loss |", "|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["task"], run["name"]), []).append(training.get(os.path.basename(run["out_dir"])))
    for (task, name), ts in groups.items():
        if None in ts:
            lines.append(f"| {task}: {name} | {len(ts)} | not retrained (lab_train=False) | |")
            continue
        train, val = (mean_interval([t.get(k, float("nan")) for t in ts]) for k in ("train_loss", "val_loss"))
        loss = f"{train['mean']:.3f} ± {train['sd']:.3f} / {val['mean']:.3f} ± {val['sd']:.3f}"
        lines.append(f"| {task}: {name} | {len(ts)} | {np.mean([t['wall_s'] for t in ts]):.0f} | {loss} |")
    return lines


def lab_report(cfg: dict, command: str, runs: list[dict], training: dict, results: dict, wall_s: float) -> str:
    """RESULTS.md: the budget, the tables and plots, and the measured statements beside the anchors."""
    here = os.path.dirname(os.path.abspath(cfg["lab_report"]))
    image_dir = os.path.relpath(os.path.abspath(cfg["lab_out_dir"]), here)
    budget = []
    for task in ("text", "passkey"):
        first = [r for r in runs if r["task"] == task and r["seed"] == cfg["seeds"][0]]
        for run in first[:1] + [r for r in first if r["kind"] == "extend"][:1]:
            skip = ("--pos_encoding=", "--out_dir=", "--seed=", "--init_from=", "--rope_scaling=")
            shared = " ".join(shlex.quote(a) for a in run["argv"] if not a.startswith(skip))
            what = "--pos_encoding=ENCODING" if run["kind"] == "train" else "--init_from=RUN/ckpt.pt --rope_scaling=S"
            budget.append(f"- {task}, {run['kind']}: `python train.py {shared} {what} --seed=SEED`")
    budget += [f"- layout {layout_name(p)}: {' '.join(layout_args(p))}" for p in cfg["lab_layouts"]]
    return "\n".join(
        [
            "# Length extrapolation: results",
            "",
            f"Written by `{command}` in {wall_s / 60:.1f} minutes on {platform.machine()} "
            f"{platform.processor() or ''} ({os.cpu_count()} cores, torch {torch.__version__}). "
            "The protocols: eval_length.py's docstring.",
            "",
            f"Evaluation: context lengths {', '.join(f'{m:g}' for m in cfg['multipliers'])} × the training length; "
            f"perplexity on the first {cfg['eval_tokens']:,} val tokens at every length, sliding stride "
            f"{cfg['stride_fraction']:g} × length; passkey depths ({', '.join(f'{d:g}' for d in cfg['depths'])}), "
            f"{cfg['passkey_samples']} examples per depth and length; "
            f"RoPE scaling at inference: {', '.join(repr(s) for s in inference_scalings(cfg)) or 'none'}; "
            f"seeds {', '.join(map(str, cfg['seeds']))}.",
            "",
            "## Training budget",
            "",
            "Every row is trained with the same budget per task: same model size, data, batch, steps and seeds. "
            f"Context extension: each seed's RoPE checkpoint fine-tuned at {cfg['extend_factor']}× its training "
            f"length for {cfg['extend_iters']} steps at lr {cfg['extend_lr']:g}, with "
            f"{', '.join(cfg['extend_variants']) or 'no scaling variant'} and with plain RoPE.",
            "",
            *budget,
            "",
            *training_table(runs, training),
            "",
            "## Results",
            "",
            markdown(results, cfg, image_dir),
            "",
            "## Measured, beside the published anchors",
            "",
            "A claim stands only where the two 95% intervals do not overlap: perplexity, Student's t over seeds; "
            "passkey, the same widened to at least the Wilson interval of all the examples. Otherwise: no "
            "difference measured.",
            "",
            *findings(results, cfg),
            "",
            ANCHORS,
            "",
        ]
    )


def main(argv: list[str]) -> None:
    try:
        cfg = configure(DEFAULTS, argv, script=__file__)
        check_settings(cfg)
        if cfg["lab"]:
            run_lab(cfg, " ".join(["python eval_length.py", *map(shlex.quote, argv)]))
            return
        entries = load_models(cfg, cfg["ckpt"].split(","))
    except (ValueError, TrainingFailed) as e:
        sys.exit(f"error: {e}")
    results = evaluate(cfg, entries)
    plots = write_outputs(results, cfg, cfg["out_dir"])
    text = markdown(results, cfg, ".")
    with open(os.path.join(cfg["out_dir"], "results.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"wrote results.md, results.json and {len(plots)} plots in {cfg['out_dir']}")


if __name__ == "__main__":
    main(sys.argv[1:])
