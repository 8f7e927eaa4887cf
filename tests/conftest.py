"""Shared fixtures: the repository on sys.path, a tiny training setup, and one tiny trained run
(a character-level checkpoint made once per test session)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

if not torch.cuda.is_available():  # the Triton kernel's tests run under its interpreter on CPU-only machines
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when rope_triton is imported, so before any test module

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Tests run tiny models, where a second thread buys nothing and, on busy shared cores, OpenMP's
# spinning threads make a step 100x slower; one thread, here and in subprocesses (run_script).
torch.set_num_threads(1)

# A model small enough that a train.py subprocess takes a few seconds on two busy cores.
TINY_MODEL = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--bias=False"]
TINY_TRAIN = TINY_MODEL + [
    "--device=cpu",
    "--dtype=float32",
    "--compile=False",
    "--dataset=shakespeare_char",
    "--batch_size=4",
    "--eval_iters=2",
    "--log_interval=1",
    "--warmup_iters=2",
    "--lr_decay_iters=8",
]


def run_script(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`python *args` in a fresh interpreter from the repository root, with one thread
    (args: a script such as train.py and its arguments, or -m and a module); env: variables to
    set, or to remove where the value is None."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(f"python {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def logged_losses(stdout: str) -> dict[int, str]:
    """{iteration: loss as logged} from train.py's `iter N: loss X, ...` lines."""
    return {int(m[1]): m[2] for m in re.finditer(r"^iter (\d+): loss ([0-9.]+)", stdout, re.M)}


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A script stopped by bad input: exit status 1, stderr one `error: ...` line naming each fragment."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# A damaged checkpoint of each kind, and a fragment of the one-line error it must give (train.load_checkpoint)
BAD_CHECKPOINTS = [
    ("truncated", "not a readable checkpoint"),
    ("text", "not a readable checkpoint"),
    ("foreign", "holds no 'model' and 'model_args'"),
    ("missing", "does not exist"),
]


def spy_on_attention(monkeypatch) -> list[dict]:
    """Record every F.scaled_dot_product_attention call: its attn_mask and the dtypes of q, k, v."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append(dict(mask=attn_mask, dtypes=(q.dtype, k.dtype, v.dtype)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


@pytest.fixture(scope="session")
def char_data():
    """data/shakespeare_char prepared (train.py prepares it on first use; a fresh clone has no .bin)."""
    from data.dataset import data_paths

    return data_paths("shakespeare_char")


@pytest.fixture(scope="session")
def trained(tmp_path_factory, char_data):
    """8 steps of a tiny RoPE model with dropout, checkpointed at steps 4 and 8 (the last kept)."""
    out_dir = tmp_path_factory.mktemp("trained")
    result = run_script(
        "train.py", *TINY_TRAIN, "--dropout=0.1", "--max_iters=8", "--eval_interval=4", f"--out_dir={out_dir}"
    )
    return {"out_dir": out_dir, "ckpt": out_dir / "ckpt.pt", "stdout": result.stdout}


@pytest.fixture(scope="session")
def nanogpt_ckpt(tmp_path_factory):
    """A ckpt.pt in nanoGPT's format, built by hand from its documented key names with random
    values: model_args without pos_encoding, keys prefixed `_orig_mod.` as a compiled nanoGPT
    saves them, and the causal-mask buffers (`attn.bias`) of its non-flash attention."""
    n_layer, n_head, n_embd, block_size, vocab_size = 2, 2, 32, 16, 65
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, std=0.2, mean=0.0):
        return mean + std * torch.randn(*shape, generator=generator)

    sd = {
        "transformer.wte.weight": rand(vocab_size, n_embd, std=0.5),
        "transformer.wpe.weight": rand(block_size, n_embd, std=0.5),
    }
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        sd.update(
            {
                p + "ln_1.weight": rand(n_embd, std=0.1, mean=1.0),
                p + "ln_1.bias": rand(n_embd, std=0.1),
                p + "attn.c_attn.weight": rand(3 * n_embd, n_embd),
                p + "attn.c_attn.bias": rand(3 * n_embd, std=0.1),
                p + "attn.c_proj.weight": rand(n_embd, n_embd),
                p + "attn.c_proj.bias": rand(n_embd, std=0.1),
                p + "attn.bias": torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size),
                p + "ln_2.weight": rand(n_embd, std=0.1, mean=1.0),
                p + "ln_2.bias": rand(n_embd, std=0.1),
                p + "mlp.c_fc.weight": rand(4 * n_embd, n_embd),
                p + "mlp.c_fc.bias": rand(4 * n_embd, std=0.1),
                p + "mlp.c_proj.weight": rand(n_embd, 4 * n_embd),
                p + "mlp.c_proj.bias": rand(n_embd, std=0.1),
            }
        )
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = rand(n_embd, std=0.1, mean=1.0), rand(n_embd, std=0.1)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # tied: nanoGPT's state_dict holds both names
    model_args = dict(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        block_size=block_size,
        bias=True,
        vocab_size=vocab_size,
        dropout=0.0,
    )
    checkpoint = {
        "model": {"_orig_mod." + k: v for k, v in sd.items()},
        "optimizer": {},
        "model_args": model_args,
        "iter_num": 5000,
        "best_val_loss": torch.tensor(1.47),
        "config": {"dataset": "shakespeare_char", "n_layer": n_layer, "compile": True},
    }
    path = tmp_path_factory.mktemp("nanogpt") / "ckpt.pt"
    torch.save(checkpoint, path)
    return {
        "path": path,
        "state_dict": {k: v for k, v in sd.items() if not k.endswith(".attn.bias")},
        "model_args": model_args,
    }
