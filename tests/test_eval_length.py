"""eval_length.py: the two perplexity protocols against losses computed by hand, one forward
per window or per token; the learned-table case; RoPE scaling at inference; bad input; the outputs;
the lab's seeds, its context extension by fine-tuning, and its interval arithmetic."""

import json
import math
import os
import time
from dataclasses import asdict

import pytest
import torch
from conftest import REPO, assert_one_line_error, logged_losses, run_script
from torch.nn import functional as F

import eval_length
import train
from data.passkey.prepare import CHARS
from eval_length import evaluate_perplexity, score_windows, window_plan
from model import GPT, POS_ENCODINGS, GPTConfig

VOCAB = 65  # shakespeare_char's, so the checkpoints below can be scored on its val text


def tiny(pos_encoding: str, block_size: int = 8, vocab_size: int = VOCAB, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(
        block_size=block_size,
        vocab_size=vocab_size,
        n_layer=2,
        n_head=2,
        n_embd=16,
        bias=False,
        pos_encoding=pos_encoding,
        **kw,
    )
    return GPT(config).eval()


def last_token_loss(model: GPT, context: torch.Tensor, target: torch.Tensor) -> float:
    """The loss of target after context, from one full forward over the context alone."""
    logits, _ = model(context[None])
    return F.cross_entropy(logits[0, -1].double(), target.view(())).item()


class NoBar:
    def update(self, n=1):
        pass


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(VOCAB, (32,), generator=torch.Generator().manual_seed(1))  # 31 predictions


@pytest.mark.parametrize("n,window,stride", [(31, 8, 8), (31, 8, 3), (31, 8, 1), (5, 8, 4), (64, 16, 16), (17, 4, 2)])
def test_window_plan_scores_every_token_exactly_once(n, window, stride):
    plan = window_plan(n, window, stride)
    counts = [0] * n
    for begin, end, scored in plan:
        assert 0 <= begin < end <= n and end - begin <= window and 1 <= scored <= end - begin
        for p in range(end - scored, end):
            counts[p] += 1
            assert p - begin >= min(p, window - stride)  # at least window − stride tokens of context
    assert counts == [1] * n
    assert plan[0][0] == 0 and plan[0][2] == plan[0][1]  # the first window is full and scores all its tokens


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_stride_equal_to_window_is_non_overlapping(pos_encoding, tokens):
    model, window = tiny(pos_encoding), 8
    loss, position = score_windows(model, tokens, window, window, batch_tokens=16)
    reference = []
    for begin in range(0, 31, window):  # windows [0, 8), [8, 16), [16, 24), [24, 31): a short last one
        x, y = tokens[begin : min(begin + window, 31)], tokens[begin + 1 : min(begin + window, 31) + 1]
        logits, _ = model(x[None])
        reference.append(F.cross_entropy(logits[0].double(), y, reduction="none"))
    torch.testing.assert_close(loss, torch.cat(reference), rtol=0, atol=1e-5)
    assert position.tolist() == [i % window for i in range(31)]


@pytest.mark.parametrize("pos_encoding", ["rope", "alibi", "learned"])
def test_stride_one_is_a_full_forward_per_token(pos_encoding, tokens):
    """Past the first window, each token's loss equals a forward over exactly its `window`
    predecessors; inside the first window, over all of them."""
    model, window = tiny(pos_encoding), 8
    loss, position = score_windows(model, tokens, window, 1, batch_tokens=24)
    reference = [last_token_loss(model, tokens[max(0, i + 1 - window) : i + 1], tokens[i + 1]) for i in range(31)]
    torch.testing.assert_close(loss, torch.tensor(reference, dtype=torch.float64), rtol=0, atol=1e-5)
    assert position.tolist() == [min(i, window - 1) for i in range(31)]


def test_sliding_windows_score_each_token_with_its_window(tokens):
    """Stride 3, window 8: token i is scored by the first window (starting at a multiple of 3)
    that reaches it, with that window's tokens before it as context."""
    model, window, stride = tiny("rope"), 8, 3
    loss, _ = score_windows(model, tokens, window, stride)
    reference = []
    for i in range(31):
        begin = stride * max(0, math.ceil((i + 1 - window) / stride))
        reference.append(last_token_loss(model, tokens[begin : i + 1], tokens[i + 1]))
    torch.testing.assert_close(loss, torch.tensor(reference, dtype=torch.float64), rtol=0, atol=1e-5)


def test_perplexity_rows_and_per_position_curve(tokens):
    model = tiny("rope")
    cfg = dict(stride_fraction=0.5, batch_tokens=64)
    out = evaluate_perplexity(model, tokens, [4, 8, 16], 8, cfg, NoBar())
    for protocol in ("nonoverlapping", "sliding"):
        for row, length in zip(out[protocol], [4, 8, 16]):
            stride = length if protocol == "nonoverlapping" else length // 2
            loss, _ = score_windows(model, tokens, length, stride)
            assert row["tokens"] == 31 and row["stride"] == stride and row["multiplier"] == length / 8
            assert row["loss"] == pytest.approx(loss.mean().item(), abs=1e-12)
            assert row["ppl"] == pytest.approx(math.exp(row["loss"]), rel=1e-12)
    # the curve: loss at window position t over the non-overlapping windows of length 16
    windows = [tokens[0:17], tokens[16:32]]  # windows [0, 16) and [16, 31) (15 predictions)
    per_window = [F.cross_entropy(model(w[None, :-1])[0][0].double(), w[1:], reduction="none") for w in windows]
    expected = [(per_window[0][t] + per_window[1][t]) / 2 if t < 15 else per_window[0][t] for t in range(16)]
    assert out["position_loss"]["length"] == 16
    torch.testing.assert_close(
        torch.tensor(out["position_loss"]["loss"], dtype=torch.float64), torch.stack(expected), rtol=0, atol=1e-5
    )


def test_learned_table_is_not_applicable_past_block_size(tokens):
    model = tiny("learned")
    out = evaluate_perplexity(model, tokens, [4, 8, 16, 32], 8, dict(stride_fraction=0.5, batch_tokens=64), NoBar())
    for protocol in ("nonoverlapping", "sliding"):
        assert [r.get("status") for r in out[protocol]] == [None, None, "n/a", "n/a"]
        assert all(math.isfinite(r["ppl"]) for r in out[protocol][:2])
    assert out["position_loss"]["length"] == 8  # the longest length the table reaches


def test_rope_scaling_applied_at_inference(tmp_path):
    """Every RoPE checkpoint is also evaluated with each variant. Position interpolation by 2 at
    positions 0, 2, 4, ... is plain RoPE at 0, 1, 2, ...: the rebuilt model has the same weights
    and really uses the variant."""
    model = tiny("rope")
    with torch.no_grad():  # sharper attention, so that positions move the logits visibly
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(10)
    path = save_checkpoint(tmp_path / "ckpt.pt", model, "shakespeare_char")
    cfg = dict(
        eval_length.DEFAULTS, multipliers=(1,), eval_tokens=64, rope_scalings=({"rope_type": "linear", "factor": 2.0},)
    )
    plain, scaled = eval_length.load_models(cfg, [path])
    assert (plain["label"], scaled["label"]) == ("rope", "rope+linear×2") and scaled["rope_scaling"]["factor"] == 2.0
    x = torch.randint(VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(scaled["model"](x, positions=2 * torch.arange(12))[0], model(x)[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(plain["model"](x)[0], model(x)[0], rtol=0, atol=1e-6)
    assert (scaled["model"](x)[0] - model(x)[0]).abs().max() > 1e-2


def char_vocabulary(dataset: str) -> dict:
    """The char tokenizer spec of a dataset, from its text, not from a prepared meta.pkl (a fresh
    clone has none until prepare.py runs)."""
    if dataset == "passkey":
        return {"kind": "char", "chars": CHARS}
    with open(os.path.join(REPO, "data", dataset, "input.txt"), encoding="utf-8") as f:
        return {"kind": "char", "chars": "".join(sorted(set(f.read())))}


def save_checkpoint(path, model: GPT, dataset: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(
        {
            "model": model.state_dict(),
            "model_args": asdict(model.config),
            "iter_num": 0,
            "config": {"dataset": dataset},
            "tokenizer": char_vocabulary(dataset),
        },
        path,
    )
    return str(path)


def run_main(argv):
    with pytest.raises(SystemExit) as exc:
        eval_length.main(argv)
    return str(exc.value.code)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "rope": save_checkpoint(root / "rope" / "ckpt.pt", tiny("rope"), "shakespeare_char"),
        "learned": save_checkpoint(root / "learned" / "ckpt.pt", tiny("learned"), "shakespeare_char"),
        "passkey": save_checkpoint(
            root / "passkey" / "ckpt.pt", tiny("learned", block_size=64, vocab_size=len(CHARS)), "passkey"
        ),
    }


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "no checkpoint given"),
        (["--task=both"], "task='both' is not valid"),
        (["--stride_fraction=0"], "stride_fraction=0.0 is not valid"),
        (["--multipliers=(1,-2)"], "multipliers=(1, -2) is not valid"),
        (["--depths=(0.5,1.5)"], "depths=(0.5, 1.5) is not valid"),
        (
            ["--eval_tokens=100", "--multipliers=(1,16)"],
            "eval_tokens=100 is shorter than the longest context length 128",
        ),
        (["--eval_tokens=10000000"], "val has"),
        (["--rope_scalings=({'rope_type':'bogus'},)"], "rope_type 'bogus' is not supported"),
        (["--rope_scalings=({'rope_type':'linear','factor':0.5},)"], "factor=0.5 is not valid"),
        (["--strid=2"], "unknown setting 'strid'"),
        (["--ckpt=/nonexistent/ckpt.pt"], "does not exist"),
        (["--task=passkey"], "does not know the passkey characters"),
        (["--ckpt=PASSKEY", "--multipliers=(0.25,1)"], "passkey length 16"),
        (["--lab=True", "--lab_passkey_rows=('alibi',)"], "lab_passkey_rows=('alibi',) is not valid; valid: 'rope'"),
        (["--lab=True", "--lab_passkey_rows=('rope','nope')"], "lab_passkey_rows=('rope', 'nope') is not valid"),
        (["--lab=True", "--lab_jobs=0"], "lab_jobs=0 is not valid"),
        (
            ["--lab=True", "--lab_train=False", "--lab_train_dir=/nonexistent"],
            "lab_train=False but /nonexistent/text_learned_seed1337/ckpt.pt",
        ),
    ],
)
def test_bad_input_is_a_one_line_error(args, message, checkpoints, tmp_path):
    if not any(a.startswith(("--ckpt", "--lab")) for a in args) and args:
        args = [f"--ckpt={checkpoints['rope']}"] + args
    args = [a.replace("PASSKEY", checkpoints["passkey"]) for a in args]
    text = run_main(args + lab_outputs(tmp_path))
    assert text.startswith("error: ") and "\n" not in text and message in text


def lab_outputs(tmp_path) -> list[str]:
    """Every output of eval_length.py into tmp_path: nothing lands in the repository, even when
    the code under test is broken and goes on to work that it should have refused."""
    return [
        f"--out_dir={tmp_path / 'eval'}",
        f"--lab_out_dir={tmp_path / 'results'}",
        f"--lab_report={tmp_path / 'RESULTS.md'}",
    ]


def test_lab_checks_every_run_before_the_first_starts(tmp_path):
    text = run_main(
        [
            "--lab=True",
            f"--lab_train_dir={tmp_path / 'lab'}",
            "--lab_text_iters=1",  # 1: quick, should it start
            "--lab_passkey_args=config/passkey_rope.py --n_head=3",
            *lab_outputs(tmp_path),
        ]
    )
    assert text.startswith("error: ") and "a multiple of n_head 3" in text
    assert not (tmp_path / "lab").exists()  # the text runs, whose settings are fine, never started


def test_script_exits_with_the_error_line():
    assert_one_line_error(
        run_script("eval_length.py", "--ckpt=x.pt", "--stride_fraction=1.5", check=False), "stride_fraction=1.5"
    )


def test_main_writes_table_json_and_plots(checkpoints, tmp_path, capsys):
    out = tmp_path / "eval"
    eval_length.main(
        [
            f"--ckpt={checkpoints['rope']},{checkpoints['learned']},{checkpoints['passkey']}",
            f"--out_dir={out}",
            "--multipliers=(0.5,1,2)",
            "--eval_tokens=64",
            "--depths=(0.0,1.0)",
            "--passkey_samples=3",
            "--rope_scalings=({'rope_type':'linear','factor':2.0},)",
        ]
    )
    results = json.loads((out / "results.json").read_text())
    assert [m["label"] for m in results["ppl"]] == ["rope", "rope+linear×2", "learned"]
    assert [m["label"] for m in results["passkey"]] == ["learned"]
    learned = results["ppl"][2]
    assert [r.get("status") for r in learned["sliding"]] == [None, None, "n/a"]
    assert [r["length"] for r in learned["nonoverlapping"]] == [4, 8, 16]
    assert [c.get("status") for c in results["passkey"][0]["cells"]] == [None, None, None, None, "n/a", "n/a"]
    for name in ("ppl_vs_length.png", "position_loss.png", "passkey_accuracy.png", "passkey_depth.png"):
        assert (out / name).stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| rope+linear×2 |" in printed and "| learned |" in printed and "n/a" in printed
    assert printed.startswith((out / "results.md").read_text())


def test_lab_trains_every_encoding_and_layout_with_one_budget_per_seed():
    cfg = dict(eval_length.DEFAULTS)
    runs = eval_length.lab_runs(cfg)
    rows = [*POS_ENCODINGS, "hybrid", "local_global", "prope"]
    extended = ["rope, fine-tuned at 4×", "rope+linear×4, fine-tuned", "rope+yarn×4, fine-tuned"]
    passkey_rows = ["rope", "alibi", "none", "hybrid", "local_global"]
    assert sorted((r["task"], r["name"], r["seed"]) for r in runs) == sorted(
        (t, name, seed)
        for t, names in (("text", rows), ("passkey", passkey_rows))
        for name in names + extended
        for seed in cfg["seeds"]
    )
    assert len({r["out_dir"] for r in runs}) == len(runs)
    layout = ("--pos_encoding=", "--out_dir=", "--seed=", "--layer_types=", "--rope_scaling=", "--att", "--floor")
    for task in ("text", "passkey"):
        for kind in ("train", "extend"):
            argvs = {
                tuple(a for a in r["argv"] if not a.startswith((*layout, "--sliding", "--init_from=")))
                for r in runs
                if (r["task"], r["kind"]) == (task, kind)
            }
            assert len(argvs) == 1  # identical but for the encoding or layout, the seed and the folder


TINY_LAB = [
    "--lab_text_args=--dataset=shakespeare_char --block_size=8 --batch_size=4 --n_layer=2 --n_head=2 --n_embd=16 "
    "--bias=False",
    "--lab_layouts=()",
    "--seeds=(1, 2)",
    "--extend_variants=('yarn',)",
    "--extend_iters=2",
    "--lab_text_iters=3",
]


def tiny_lab(tmp_path) -> list[dict]:
    cfg = eval_length.configure(eval_length.DEFAULTS, [*TINY_LAB, f"--lab_train_dir={tmp_path}"])
    return cfg, [r for r in eval_length.lab_runs(cfg) if r["task"] == "text"]


def test_seeds_differ_and_the_same_seed_repeats(tmp_path, char_data):
    _, runs = tiny_lab(tmp_path)
    one, two = (next(r for r in runs if (r["name"], r["seed"]) == ("rope", seed)) for seed in (1, 2))
    again = {**one, "out_dir": str(tmp_path / "again"), "argv": one["argv"] + [f"--out_dir={tmp_path / 'again'}"]}
    losses = []
    for run in (one, two, again):
        eval_length.train_run({**run, "argv": run["argv"] + ["--log_interval=1"]}, 1, NoBar())
        losses.append(logged_losses((tmp_path / run["out_dir"] / "train.log").read_text()))
    assert len(losses[0]) == 3 and losses[0] == losses[2]
    assert all(losses[0][i] != losses[1][i] for i in losses[0])


def test_extension_fine_tunes_its_seeds_checkpoint_and_is_evaluated_as_tuned(tmp_path, char_data):
    """Each extension run starts from the RoPE checkpoint of its own seed, at 4× its block_size with
    the scaling it names; the lab evaluates the fine-tuned checkpoint with that same scaling, its
    lengths counted in the base's training length."""
    cfg, runs = tiny_lab(tmp_path)
    bases = {seed: tiny("rope", seed=seed) for seed in (1, 2)}
    for seed, model in bases.items():
        save_checkpoint(tmp_path / f"text_rope_seed{seed}" / "ckpt.pt", model, "shakespeare_char")
    extensions = [r for r in runs if r["kind"] == "extend"]
    assert [(r["name"], r["seed"]) for r in extensions] == [
        ("rope, fine-tuned at 4×", 1),
        ("rope+yarn×4, fine-tuned", 1),
        ("rope, fine-tuned at 4×", 2),
        ("rope+yarn×4, fine-tuned", 2),
    ]
    yarn = {"original_max_position_embeddings": 8, "rope_type": "yarn", "factor": 4.0}
    assert [r["rope_scaling"] for r in extensions] == [None, yarn, None, yarn]
    for run in extensions:
        run_cfg = train.setup(run["argv"])
        model, checkpoint = train.init_model(run_cfg, VOCAB, "unused")
        assert checkpoint is None and (model.config.block_size, model.config.rope_scaling) == (32, run["rope_scaling"])
        for name, weight in bases[run["seed"]].state_dict().items():
            torch.testing.assert_close(model.state_dict()[name], weight, rtol=0, atol=0)
    eval_length.train_run(extensions[1], 1, NoBar())
    (entry,) = eval_length.lab_models(cfg, extensions[1:2])
    assert entry["model"].config.rope_scaling == yarn and entry["model"].config.block_size == 32
    assert entry["label"] == "rope+yarn×4, fine-tuned" and entry["unit"] == 8
    assert entry["lengths"] == [8 * m for m in (0.5, 1, 2, 4, 8)]


def test_runs_share_the_cores_and_extensions_wait_for_their_bases(tmp_path, monkeypatch):
    _, runs = tiny_lab(tmp_path)
    events = []

    def fake_run(run, threads, bar):
        events.append(("start", run["kind"], threads))
        time.sleep(0.01)
        events.append(("end", run["kind"], threads))
        return {"wall_s": 0.0}

    monkeypatch.setattr(eval_length, "train_run", fake_run)
    monkeypatch.setattr(eval_length.os, "cpu_count", lambda: 4)
    training = eval_length.train_all(runs, jobs=2)
    assert sorted(training) == sorted(os.path.basename(r["out_dir"]) for r in runs)
    first_extension = events.index(("start", "extend", 2))
    assert [e[1] for e in events[:first_extension]].count("train") == 2 * sum(r["kind"] == "train" for r in runs)
    assert {e[2] for e in events} == {2}  # 4 cores over 2 jobs


def test_interval_arithmetic_by_hand():
    # Wilson, 8 of 10: p = 0.8, z² = 3.8415; centre (0.8 + 0.19207) / 1.38415 = 0.71674, half-width
    # 1.96 · sqrt(0.016 + 0.0096037) / 1.38415 = 0.22658
    assert eval_length.wilson_interval(8, 10) == pytest.approx((0.49016, 0.94332), abs=1e-5)
    assert eval_length.wilson_half_width(93) <= 0.10 < eval_length.wilson_half_width(92)
    # t: 1, 2, 3 have mean 2 and sd 1; t(97.5%, 2 df) = 4.3027, so 2 ± 4.3027 / sqrt(3) = 2 ± 2.4841
    stats = eval_length.mean_interval([1.0, 2.0, 3.0])
    assert stats == pytest.approx({"mean": 2.0, "sd": 1.0, "lo": -0.48414, "hi": 4.48414, "seeds": 3}, abs=1e-4)
    assert eval_length.t_quantile(1) == pytest.approx(12.7062, abs=1e-3)
    assert eval_length.mean_interval([5.0])["lo"] is None
    assert eval_length.separated({"lo": 0.0, "hi": 1.0}, {"lo": 1.1, "hi": 2.0})
    assert not eval_length.separated({"lo": 0.0, "hi": 1.2}, {"lo": 1.1, "hi": 2.0})
    assert not eval_length.separated({"lo": None, "hi": None}, {"lo": 1.1, "hi": 2.0})


def test_passkey_intervals_cover_wilson_and_seeds_within_0_and_1():
    """Three seeds at 0, 0 and 50% of 10 examples: mean 1/6, sd 0.2887, so the t-interval is
    1/6 ± 4.3027 · 0.2887 / sqrt(3) = [-0.5505, 0.8838], kept within [0, 1]; all 30 examples
    pooled (5 right), Wilson [0.0734, 0.3356], which the wider t-interval covers."""
    shares = (0.0, 0.0, 0.5)
    models = [{"cells": [{"length": 8, "multiplier": 1.0, "depth": 0.5, "exact": e, "n": 10}]} for e in shares]
    rows = [m["cells"][0] for m in models]
    cell = eval_length.passkey_cell(rows, models, "cells")
    assert (cell["exact"], cell["lo"], cell["hi"]) == pytest.approx((1 / 6, 0.0, 0.88376), abs=1e-4)
    assert eval_length.wilson_interval(5, 30) == pytest.approx((0.07337, 0.33564), abs=1e-4)
    one = eval_length.passkey_cell(rows[2:], models[2:], "cells")  # one seed: Wilson's alone, 5 of 10
    assert (one["lo"], one["hi"]) == pytest.approx(eval_length.wilson_interval(5, 10))


def test_findings_claim_only_where_the_intervals_separate():
    cfg = dict(eval_length.DEFAULTS, extend_variants=(), lab_layouts=("config/hybrid_shakespeare.py",))
    rope = [{"multiplier": m, "length": m, "ppl": 5.0, "lo": 4.9, "hi": 5.1, "sd": 0.05, "seeds": 3} for m in (4, 16)]
    hybrid = [dict(rope[0]), {**rope[1], "ppl": 6.0, "lo": 5.9, "hi": 6.1}]
    summary = {"ppl": [{"label": "rope", "nonoverlapping": rope, "sliding": rope}], "passkey": []}
    summary["ppl"].append({"label": "hybrid", "nonoverlapping": hybrid, "sliding": hybrid})
    lines = eval_length.findings({"summary": summary}, cfg)
    assert len(lines) == 4
    assert all("at 4×: no difference measured: hybrid 5.00 [4.90, 5.10]" in line for line in lines[0::2])
    assert all("at 16×: rope is better: hybrid 6.00 [5.90, 6.10] against rope 5.00" in line for line in lines[1::2])
