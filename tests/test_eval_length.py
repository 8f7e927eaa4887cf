"""eval_length.py: the two perplexity protocols against losses computed by hand, one forward
per window or per token; the learned-table case; RoPE scaling at inference; bad input; the outputs."""

import json
import math
import os
from dataclasses import asdict

import pytest
import torch
from conftest import REPO, assert_one_line_error, run_script
from torch.nn import functional as F

import eval_length
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
    out = evaluate_perplexity(model, tokens, [4, 8, 16], cfg, NoBar())
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
    out = evaluate_perplexity(model, tokens, [4, 8, 16, 32], dict(stride_fraction=0.5, batch_tokens=64), NoBar())
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
        (
            ["--lab=True", "--lab_train=False", "--lab_train_dir=/nonexistent"],
            "lab_train=False but /nonexistent/text_learned/ckpt.pt",
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


def test_lab_trains_every_encoding_with_one_budget():
    cfg = dict(eval_length.DEFAULTS)
    runs = eval_length.lab_runs(cfg)
    assert sorted((r["task"], r["encoding"]) for r in runs) == sorted(
        (t, e) for t in ("text", "passkey") for e in POS_ENCODINGS
    )
    for task in ("text", "passkey"):
        argvs = {
            tuple(a for a in r["argv"] if not a.startswith(("--pos_encoding=", "--out_dir=")))
            for r in runs
            if r["task"] == task
        }
        assert len(argvs) == 1  # identical but for the encoding and the folder
