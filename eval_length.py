"""The length-extrapolation lab: how loss and passkey retrieval hold up past the training length.

    python eval_length.py --ckpt=out/rope_shakespeare/ckpt.pt                # perplexity against length
    python eval_length.py --ckpt=out/a/ckpt.pt,out/b/ckpt.pt --multipliers="(1,4,16)"
    python eval_length.py --ckpt=out/passkey_rope/ckpt.pt                    # passkey accuracy
    python eval_length.py --lab=True                                         # train, evaluate, RESULTS.md

Context lengths are L = multiplier × the checkpoint's block_size (0.5× to 16× by default).

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
five encodings are first trained on shakespeare_char and on passkey with the same budget, by
train.py in subprocesses; the report, its tables with the budget, goes to lab_report (RESULTS.md),
and results.json and the plots to lab_out_dir. Every setting below can be given as
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

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from configurator import ConfigError, check_device, configure
from data.dataset import data_paths
from data.passkey.prepare import KEY_DIGITS, OVERHEAD, make_example
from data.tokenizer import load_tokenizer, tokenizer_spec
from model import GPT, POS_ENCODINGS, GPTConfig
from train import load_checkpoint
from train import setup as train_setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULTS = dict(
    ckpt="",  # comma-separated ckpt.pt paths
    task="auto",  # 'ppl', 'passkey', or 'auto': passkey for checkpoints trained on dataset 'passkey'
    dataset="",  # val text for perplexity; default each checkpoint's own dataset
    multipliers=(0.5, 1, 2, 4, 8, 16),  # context lengths, in units of each checkpoint's block_size
    stride_fraction=0.5,  # sliding protocol: stride = this × length
    eval_tokens=32768,  # perplexity: tokens scored at every length (the CPU cap; at least the longest length)
    depths=(0.0, 0.25, 0.5, 0.75, 1.0),  # passkey: where the key sits in the filler
    passkey_samples=20,  # passkey: examples per (length, depth) cell
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
    # The lab: train the five encodings on both tasks, evaluate them all, write lab_report. The
    # defaults are the small budget, sized for a 2-core CPU (RESULTS.md has the measured wall time).
    # More: raise the iters, or any train.py setting through the *_args.
    lab=False,  # True: run the lab (train, evaluate, report) instead of evaluating --ckpt
    lab_report="RESULTS.md",  # the lab's report, in markdown
    lab_out_dir="results",  # the lab's results.json and plots (out_dir is not used by the lab)
    lab_train_dir="out/lab",  # checkpoints and training logs, one folder per run
    lab_train=True,  # False: evaluate the checkpoints already in lab_train_dir
    lab_text_iters=3000,  # steps of each text run (12 × 64 tokens each)
    lab_passkey_iters=2000,  # steps of each passkey run (16 × 128 tokens each)
    lab_text_args=(  # train.py arguments of the text runs; then --pos_encoding, --out_dir and the iteration counts
        "--dataset=shakespeare_char --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --dropout=0.0"
    ),
    lab_passkey_args="config/passkey_rope.py",  # the same for the passkey runs
    lab_train_args="--dtype=float32 --device=cpu",  # appended to every run's arguments
)
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


def evaluate_perplexity(model: GPT, tokens: torch.Tensor, lengths: list[int], cfg: dict, bar) -> dict:
    """Both protocols at every length, and the per-position curve of the longest length that fits."""
    out = {protocol: [] for protocol in PROTOCOLS}
    curve = None
    for length in lengths:
        strides = {"nonoverlapping": length, "sliding": max(1, round(cfg["stride_fraction"] * length))}
        for protocol, stride in strides.items():
            row = {"length": length, "multiplier": length / model.config.block_size, "stride": stride}
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


def evaluate_passkey(model: GPT, encode, lengths: list[int], cfg: dict, bar) -> dict:
    """Accuracy per (length, depth), and per length averaged over depths."""
    cells, by_length = [], []
    for length in lengths:
        row = {"length": length, "multiplier": length / model.config.block_size}
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
            cells.append({**row, "depth": depth, "exact": exact, "digit": digit, "n": cfg["passkey_samples"]})
            scores.append((exact, digit))
            bar.update(1)
        by_length.append(
            {**row, "exact": float(np.mean([s[0] for s in scores])), "digit": float(np.mean([s[1] for s in scores]))}
        )
    return {"cells": cells, "by_length": by_length}


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
    for key in ("eval_tokens", "passkey_samples", "batch_tokens", "lab_text_iters", "lab_passkey_iters"):
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
    """Every checkpoint, and every RoPE one with each rope_scalings variant, with what its task
    needs (val tokens or an encoder), all checked before any evaluation starts."""
    entries = []
    for path in paths:
        model, checkpoint = load_checkpoint(path, cfg["device"])
        dataset = cfg["dataset"] or checkpoint.get("config", {}).get("dataset", "")
        task = cfg["task"] if cfg["task"] != "auto" else ("passkey" if dataset == "passkey" else "ppl")
        spec = checkpoint.get("tokenizer") or tokenizer_spec(dataset)
        lengths = context_lengths(cfg["multipliers"], model.config.block_size)
        entry = {
            "ckpt": path,
            "task": task,
            "dataset": dataset,
            "iter_num": checkpoint.get("iter_num"),
            "lengths": lengths,
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
                    f"{model.config.block_size}) is too short; valid: lengths of at least {OVERHEAD} characters"
                )
        entries.append({**entry, "model": model, "label": model.config.pos_encoding, "rope_scaling": None})
        if model.config.pos_encoding == "rope":
            for scaling in cfg["rope_scalings"]:  # the same weights, rebuilt with the variant
                scaled, _ = load_checkpoint(path, cfg["device"], scaling)
                entries.append({**entry, "model": scaled, "label": scaling_label(scaling), "rope_scaling": scaling})
    keys = [(e["task"], e["dataset"], e["label"]) for e in entries]
    for e, key in zip(entries, keys):  # two checkpoints of one encoding in one table: tell them apart by their folder
        if keys.count(key) > 1:
            e["label"] += f" [{os.path.basename(os.path.dirname(os.path.abspath(e['ckpt'])))}]"
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
                "rope_scaling": e["rope_scaling"],
                "block_size": cfg_model.block_size,
                "dataset": e["dataset"],
                "iter_num": e["iter_num"],
                "lengths": e["lengths"],
            }
            if e["task"] == "ppl":
                results["ppl"].append({**row, **evaluate_perplexity(e["model"], e["tokens"], e["lengths"], cfg, bar)})
            else:
                results["passkey"].append({**row, **evaluate_passkey(e["model"], e["encode"], e["lengths"], cfg, bar)})
    return results


# ---------------------------------------------------------------------------------------------
# Report: markdown tables, JSON, plots


def fmt_ppl(row: dict) -> str:
    if row.get("status") == "n/a":
        return "n/a"
    return f"{row['ppl']:.2f}" if row["ppl"] < 100 else f"{row['ppl']:,.0f}"


def fmt_pct(row: dict, key: str = "exact") -> str:
    return "n/a" if row.get("status") == "n/a" else f"{100 * row[key]:.0f}"


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
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for m in results["ppl"]:
        groups.setdefault((m["dataset"], m["block_size"]), []).append(m)
    for (dataset, block_size), models in groups.items():
        for protocol in PROTOCOLS:
            how = (
                "non-overlapping windows"
                if protocol == "nonoverlapping"
                else f"sliding windows, stride {cfg['stride_fraction']:g} × length"
            )
            lines += [
                f"Perplexity on {dataset} val, {how}: the first {cfg['eval_tokens']:,} tokens scored once at every "
                f"context length (trained at {block_size}).",
                "",
            ]
            lines += table("model", models, protocol, fmt_ppl) + [""]
    if results["ppl"]:
        lines += [f"![{name}]({image_dir}/{name})\n" for name in PLOTS["ppl"]]
    groups = {}
    for m in results["passkey"]:
        groups.setdefault(m["block_size"], []).append(m)
    for block_size, models in groups.items():
        lines += [
            f"Passkey retrieval, exact-match accuracy (%) by context length: the mean over depths "
            f"({', '.join(f'{d:g}' for d in cfg['depths'])}), {cfg['passkey_samples']} examples per depth "
            f"(trained at {block_size}).",
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
    if results["passkey"]:
        lines += [f"![{name}]({image_dir}/{name})\n" for name in PLOTS["passkey"]]
    return "\n".join(lines)


def plot(results: dict, out_dir: str) -> list[str]:
    """PNG plots in out_dir; returns their paths."""
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

    if results["ppl"]:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True, constrained_layout=True)
        for ax, protocol in zip(axes, PROTOCOLS):
            for m in results["ppl"]:
                rows = [r for r in m[protocol] if r.get("status") != "n/a"]
                ax.plot(
                    [r["multiplier"] for r in rows],
                    [r["ppl"] for r in rows],
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
            plain_log_ticks(ax, sorted({r["multiplier"] for m in results["ppl"] for r in m[protocol]}))
        axes[0].set_ylabel("perplexity")
        axes[1].legend(fontsize=8)
        save(fig, PLOTS["ppl"][0])

        fig, ax = plt.subplots(figsize=(9, 4.8), constrained_layout=True)
        width = max(1, max(len(m["position_loss"]["loss"]) for m in results["ppl"]) // 64)  # one bin width for all
        for m in results["ppl"]:
            curve = np.array(m["position_loss"]["loss"])  # mean over bins of positions: a single position is noisy
            binned = curve[: len(curve) // width * width].reshape(-1, width).mean(axis=1)
            ax.plot(
                (np.arange(len(binned)) + 0.5) * width / m["block_size"],
                binned,
                lw=1.2,
                ls="--" if m["rope_scaling"] else "-",
                label=m["label"],
            )
        ax.axvline(1.0, color="gray", lw=0.8, ls=":")
        ax.set(
            xlabel="position in the window (× training length)",
            ylabel="loss (nats)",
            title="loss by position, non-overlapping windows of the longest length",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, PLOTS["ppl"][1])

    if results["passkey"]:
        fig, ax = plt.subplots(figsize=(9, 4.8), constrained_layout=True)
        for m in results["passkey"]:
            rows = [r for r in m["by_length"] if r.get("status") != "n/a"]
            ax.plot(
                [r["multiplier"] for r in rows],
                [100 * r["exact"] for r in rows],
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
        plain_log_ticks(ax, sorted({r["multiplier"] for m in results["passkey"] for r in m["by_length"]}))
        ax.legend(fontsize=8)
        save(fig, PLOTS["passkey"][0])

        n = len(results["passkey"])
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
        for ax, m in zip(axes.flat, results["passkey"]):
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
# The lab: train every encoding on both tasks with one budget, evaluate, write RESULTS.md


class TrainingFailed(Exception):
    """A train.py run of the lab exited with an error."""


def lab_runs(cfg: dict) -> list[dict]:
    """The ten training runs: (task, encoding, out_dir, train.py arguments)."""
    runs = []
    for task, args, iters in (
        ("text", cfg["lab_text_args"], cfg["lab_text_iters"]),
        ("passkey", cfg["lab_passkey_args"], cfg["lab_passkey_iters"]),
    ):
        for encoding in POS_ENCODINGS:
            out_dir = os.path.join(cfg["lab_train_dir"], f"{task}_{encoding}")
            argv = (
                shlex.split(args)
                + [
                    f"--pos_encoding={encoding}",
                    f"--out_dir={out_dir}",
                    f"--max_iters={iters}",
                    f"--lr_decay_iters={iters}",
                    f"--eval_interval={iters}",
                    "--eval_iters=20",
                    "--log_interval=10",
                    "--wandb_log=False",
                ]
                + shlex.split(cfg["lab_train_args"])
            )
            runs.append({"task": task, "encoding": encoding, "out_dir": out_dir, "argv": argv, "iters": iters})
    return runs


def train_run(run: dict, bar) -> dict:
    """train.py in a subprocess, its output in out_dir/train.log; returns its wall time and final losses."""
    os.makedirs(run["out_dir"], exist_ok=True)
    log_path = os.path.join(run["out_dir"], "train.log")
    t0, last, losses = time.time(), "", {}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "train.py"), *run["argv"]],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in proc.stdout:
            log.write(line)
            last = line.strip() or last
            if m := re.match(r"iter (\d+):", line):
                bar.update(int(m.group(1)) + 1 - bar.n)
            if m := re.match(r"step \d+: train loss ([\d.]+), val loss ([\d.]+)", line):
                losses = {"train_loss": float(m.group(1)), "val_loss": float(m.group(2))}
        proc.wait()
    bar.update(bar.total - bar.n)
    if proc.returncode:
        raise TrainingFailed(
            f"training {run['task']}_{run['encoding']} failed (exit {proc.returncode}): {last}; log: {log_path}"
        )
    return {"wall_s": time.time() - t0, **losses}


def run_lab(cfg: dict, command: str) -> None:
    runs = lab_runs(cfg)
    for run in runs:  # every run's settings, checked before the first one starts
        train_setup(run["argv"])
    t_start = time.time()
    training = {}
    for run in runs:
        name = f"{run['task']}_{run['encoding']}"
        ckpt = os.path.join(run["out_dir"], "ckpt.pt")
        if cfg["lab_train"]:
            with tqdm(
                total=run["iters"], desc=f"training {name}", unit="iter", file=sys.stderr, dynamic_ncols=True
            ) as bar:
                training[name] = train_run(run, bar)
        elif not os.path.exists(ckpt):
            raise ConfigError(f"lab_train=False but {ckpt} does not exist; valid: --lab_train=True to train it")
    eval_cfg = dict(cfg, task="auto", dataset="")
    entries = load_models(eval_cfg, [os.path.join(r["out_dir"], "ckpt.pt") for r in runs])
    results = evaluate(eval_cfg, entries)
    results["training"] = training
    write_outputs(results, eval_cfg, cfg["lab_out_dir"])
    report = lab_report(cfg, command, runs, training, results, time.time() - t_start)
    os.makedirs(os.path.dirname(os.path.abspath(cfg["lab_report"])), exist_ok=True)
    with open(cfg["lab_report"], "w") as f:
        f.write(report)
    print(f"wrote {cfg['lab_report']}, and results.json and plots in {cfg['lab_out_dir']}")


ANCHORS = """Published anchors, for the reader:
- ALiBi paper (Press et al. 2021, arXiv:2108.12409; trained on 512 tokens of WikiText-103, non-overlapping windows),
  perplexity from 512 to 15,512 tokens as reported: sinusoidal 20.05 → 406 (×20), rotary 20.07 → 79.25 (×3.9),
  ALiBi 19.73 → 18.31 (×0.93).
- YaRN paper (Peng et al. 2023, arXiv:2309.00071): at long context, YaRN beats NTK-aware scaling, which beats
  position interpolation (PI, our `linear`), in perplexity (there after fine-tuning for PI and YaRN; here all are
  applied at inference only)."""


def findings(results: dict) -> list[str]:
    """Plain statements read off the measured tables, to set beside the anchors."""
    lines = []
    for protocol in PROTOCOLS:
        models = [m for m in results["ppl"] if not m["rope_scaling"]]
        scaled = [m for m in results["ppl"] if m["rope_scaling"]]
        if not models:
            break
        longest = models[0][protocol][-1]["multiplier"]

        def at(m, mult):
            rows = [r for r in m[protocol] if r["multiplier"] == mult and r.get("status") != "n/a"]
            return rows[0]["ppl"] if rows else None

        ratios = [
            f"{m['label']} {at(m, 1):.2f} → {at(m, longest):.2f} (×{at(m, longest) / at(m, 1):.2f})"
            for m in models
            if at(m, 1) and at(m, longest)
        ]
        lines.append(
            f"- {PROTOCOL_NAMES[protocol]}, perplexity from 1× to {longest:g}× the training length: "
            + "; ".join(ratios)
            + "."
        )
        ranked = sorted((m for m in models + scaled if at(m, longest)), key=lambda m: at(m, longest))
        lines.append(
            f"- {PROTOCOL_NAMES[protocol]}, best to worst at {longest:g}×: "
            + ", ".join(f"{m['label']} ({at(m, longest):.2f})" for m in ranked)
            + "."
        )
        variants = [
            m for m in ranked if m["rope_scaling"] and m["rope_scaling"].get("rope_type") in ("yarn", "ntk", "linear")
        ]
        if variants:
            lines.append(
                f"- {PROTOCOL_NAMES[protocol]}, the YaRN paper's three at {longest:g}×, best first: "
                + ", ".join(f"{m['label']} ({at(m, longest):.2f})" for m in variants)
                + " (the paper: yarn < ntk < linear)."
            )
    for m in results["passkey"]:
        if m["rope_scaling"]:
            continue
        rows = [r for r in m["by_length"] if r.get("status") != "n/a"]
        lines.append(
            f"- passkey, {m['label']}: "
            + ", ".join(f"{100 * r['exact']:.0f}% at {r['multiplier']:g}×" for r in rows)
            + "."
        )
    return lines


def lab_report(cfg: dict, command: str, runs: list[dict], training: dict, results: dict, wall_s: float) -> str:
    """RESULTS.md: the budget, the tables and plots, and the measured statements beside the anchors."""
    here = os.path.dirname(os.path.abspath(cfg["lab_report"]))
    image_dir = os.path.relpath(os.path.abspath(cfg["lab_out_dir"]), here)
    budget = []
    for task in ("text", "passkey"):
        argv = next(r["argv"] for r in runs if r["task"] == task)
        shared = " ".join(shlex.quote(a) for a in argv if not a.startswith(("--pos_encoding=", "--out_dir=")))
        budget.append(f"- {task}: `python train.py {shared} --pos_encoding=ENCODING`")
    budget += ["", "| run | wall time (s) | final train / val loss |", "|---|---|---|"]
    for run in runs:
        name = f"{run['task']}_{run['encoding']}"
        t = training.get(name)
        if t:
            losses = f"{t.get('train_loss', float('nan')):.3f} / {t.get('val_loss', float('nan')):.3f}"
            budget.append(f"| {name} | {t['wall_s']:.0f} | {losses} |")
        else:
            budget.append(f"| {name} | not retrained (lab_train=False) | |")
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
            f"RoPE scaling at inference: {', '.join(repr(s) for s in cfg['rope_scalings']) or 'none'}.",
            "",
            "## Training budget",
            "",
            "Every encoding is trained with the same budget per task: same model size, data, batch, steps and seed.",
            "",
            *budget,
            "",
            "## Results",
            "",
            markdown(results, cfg, image_dir),
            "",
            "## Measured, beside the published anchors",
            "",
            *findings(results),
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
