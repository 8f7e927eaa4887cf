"""train.py: determinism, the checkpoint's contents and atomic write, exact resume, the learning
rate schedule, one-line errors for every bad setting, DDP gradients equal to one process's on the
same global batch, and wandb's offline run."""

import contextlib
import dataclasses
import math
import os
import sys
import time

import pytest
import torch
from conftest import BAD_CHECKPOINTS, TINY_TRAIN, assert_one_line_error, logged_losses, run_script
from grad_worker import recording

import train
from model import GPT, GPTConfig

CHECKPOINT_KEYS = {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config", "rng", "tokenizer"}


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain Python types only


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- determinism, checkpoint, resume -------------------------------------------------------------

WANDB_OFFLINE = {"WANDB_API_KEY": None, "WANDB_MODE": None, "WANDB_DIR": None, "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def rerun(tmp_path_factory):
    """`trained` again in a new process, with wandb logging on and no wandb credentials."""
    tmp = tmp_path_factory.mktemp("rerun")
    env = {**WANDB_OFFLINE, **{f"WANDB_{d.upper()}_DIR": str(tmp / d) for d in ("config", "cache", "data")}}
    result = run_script(
        "train.py",
        *TINY_TRAIN,
        "--dropout=0.1",
        "--max_iters=8",
        "--eval_interval=4",
        f"--out_dir={tmp / 'out'}",
        "--wandb_log=True",
        env=env,
    )
    return {"out_dir": tmp / "out", "stdout": result.stdout}


def train_here(capsys, *argv: str) -> str:
    """train.main in this process; returns what it printed."""
    train.main([*TINY_TRAIN, *argv])
    return capsys.readouterr().out


def test_same_seed_and_config_give_the_same_run(trained, rerun):
    losses = logged_losses(trained["stdout"])
    assert sorted(losses) == list(range(8)) and logged_losses(rerun["stdout"]) == losses
    assert_same_state(load(rerun["out_dir"] / "ckpt.pt")["model"], load(trained["ckpt"])["model"])


def test_wandb_logs_offline_without_credentials(rerun):
    runs = [p for p in (rerun["out_dir"] / "wandb").iterdir() if p.name.startswith("offline-run-")]
    assert len(runs) == 1 and [f for f in os.listdir(runs[0]) if f.endswith(".wandb")]


def test_checkpoint_contents(trained):
    checkpoint = load(trained["ckpt"])
    assert set(checkpoint) == CHECKPOINT_KEYS
    assert checkpoint["iter_num"] == 8 and isinstance(checkpoint["best_val_loss"], float)
    assert not [k for k in checkpoint["model"] if k.startswith(("_orig_mod.", "module."))]
    expected = dict(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32, dropout=0.1, bias=False)
    expected |= dict(pos_encoding="rope", rope_base=10000.0, rope_fraction=1.0, rope_scaling=None)
    assert {k: checkpoint["model_args"][k] for k in expected} == expected
    assert checkpoint["config"]["max_iters"] == 8 and checkpoint["config"]["dataset"] == "shakespeare_char"
    assert set(checkpoint["rng"]) >= {"torch", "data"} and checkpoint["optimizer"]["adamw"]["state"]
    assert checkpoint["tokenizer"]["kind"] == "char" and len(checkpoint["tokenizer"]["chars"]) == 65
    assert os.listdir(trained["out_dir"]) == ["ckpt.pt"]  # no ckpt.pt.tmp left behind


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint(path, {"iter_num": 1, "model": {"w": torch.ones(3)}})
    before = open(path, "rb").read()
    real_save = torch.save

    def save_half_then_fail(obj, f):
        real_save(obj, f)
        with open(f, "r+b") as handle:
            handle.truncate(os.path.getsize(f) // 2)
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError):
        train.save_checkpoint(path, {"iter_num": 2, "model": {"w": torch.zeros(3)}})
    assert open(path, "rb").read() == before and load(path)["iter_num"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the partial temporary file is gone too


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly(optimizer, tmp_path, char_data, capsys):
    """4 steps, then --init_from=resume for 4 more, equals 8 uninterrupted steps: the same loss
    at every iteration and bitwise the same weights and optimizer states (dropout 0.1, so the
    RNG state must come back too)."""
    common = ["--dropout=0.1", "--eval_interval=4", f"--optimizer={optimizer}"]
    straight = logged_losses(train_here(capsys, *common, "--max_iters=8", f"--out_dir={tmp_path / 'straight'}"))
    assert sorted(straight) == list(range(8))
    first = train_here(capsys, *common, "--max_iters=4", f"--out_dir={tmp_path / 'split'}")
    assert load(tmp_path / "split" / "ckpt.pt")["iter_num"] == 4
    second = train_here(capsys, *common, "--max_iters=8", "--init_from=resume", f"--out_dir={tmp_path / 'split'}")
    assert logged_losses(first) == {i: straight[i] for i in range(4)}
    assert logged_losses(second) == {i: straight[i] for i in range(4, 8)}
    resumed, uninterrupted = load(tmp_path / "split" / "ckpt.pt"), load(tmp_path / "straight" / "ckpt.pt")
    assert resumed["iter_num"] == 8
    assert_same_state(resumed["model"], uninterrupted["model"])
    assert resumed["optimizer"].keys() == uninterrupted["optimizer"].keys() == {"adamw", optimizer}
    for name, state in resumed["optimizer"].items():
        pairs = zip(state["state"].values(), uninterrupted["optimizer"][name]["state"].values(), strict=True)
        for a, b in pairs:
            assert_same_state(a, b)


def test_resume_with_the_other_optimizer_is_one_line(tmp_path, char_data, capsys):
    train_here(capsys, "--max_iters=4", "--eval_interval=4", "--optimizer=muon", f"--out_dir={tmp_path}")
    with pytest.raises(SystemExit) as e:
        train.main([*TINY_TRAIN, "--max_iters=8", "--init_from=resume", f"--out_dir={tmp_path}"])
    assert (
        e.value.code == "error: the checkpoint was trained with optimizer='muon', not 'adamw'; valid: --optimizer=muon"
    )
    assert capsys.readouterr().out == ""


def test_learning_rate_schedule():
    cfg = dict(train.DEFAULTS, learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110, decay_lr=True)
    for it in range(10):
        assert train.get_lr(it, cfg) == pytest.approx(1e-3 * (it + 1) / 11)  # linear warmup
    for it in (10, 35, 60, 85, 110):
        cosine = 0.5 * (1 + math.cos(math.pi * (it - 10) / 100))
        assert train.get_lr(it, cfg) == pytest.approx(1e-4 + cosine * 9e-4)
    assert train.get_lr(60, cfg) == pytest.approx(5.5e-4) and train.get_lr(500, cfg) == 1e-4
    linear = dict(cfg, lr_schedule="linear")
    for it in (10, 35, 60, 85, 110):
        assert train.get_lr(it, linear) == pytest.approx(1e-4 + (110 - it) / 100 * 9e-4)
    assert train.get_lr(3, dict(cfg, decay_lr=False)) == 1e-3


def test_autocast_and_single_process_setup(monkeypatch):
    assert isinstance(train.autocast_for("cpu", "float32"), contextlib.nullcontext)
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        autocast = train.autocast_for("cpu", name)
        assert isinstance(autocast, torch.autocast) and autocast.fast_dtype == dtype
        with autocast:
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype
    monkeypatch.delenv("RANK", raising=False)
    assert train.setup_ddp(dict(train.DEFAULTS, device="cpu")) == (False, 0, 1, "cpu")


@pytest.mark.parametrize("capability, per_cycle", [("AVX512", 64), ("AVX2", 32)])
def test_the_cpu_peak_counts_the_vector_width_torch_runs_at(monkeypatch, capability, per_cycle):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(train, "_cpu_ghz", lambda: 2.0)
    assert train.peak_flops("cpu", "float32")[0] == torch.get_num_threads() * 2.0e9 * per_cycle


# --- one-line errors -----------------------------------------------------------------------------


def bad_checkpoint(tmp_path, kind: str) -> str:
    """out_dir holding a ckpt.pt that is truncated, not a checkpoint, or absent."""
    out_dir = tmp_path / kind
    out_dir.mkdir()
    if kind == "truncated":
        torch.save({"model": {"w": torch.randn(1000)}, "model_args": {}}, out_dir / "ckpt.pt")
        data = (out_dir / "ckpt.pt").read_bytes()
        (out_dir / "ckpt.pt").write_bytes(data[: len(data) // 2])
    elif kind == "text":
        (out_dir / "ckpt.pt").write_text("not a checkpoint\n")
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, out_dir / "ckpt.pt")
    return str(out_dir)


BAD_SETTINGS = [
    (["--batchsize=8"], ["'batchsize'", "did you mean 'batch_size'?", "valid: activation, always_save_checkpoint"]),
    (["--max_iters=1.5"], ["max_iters=1.5", "float", "int"]),
    (["--compile=yes"], ["compile='yes'", "bool"]),
    (["--dtype=fp16"], ["dtype='fp16'", "valid: auto, float32, bfloat16, float16"]),
    (["--init_from=gpt2"], ["init_from='gpt2'", "valid: scratch, resume"]),
    (["--optimizer=sgd"], ["optimizer='sgd'", "valid: adamw, muon"]),
    (["--muon_adjust_lr=rms"], ["muon_adjust_lr='rms'", "valid: match_rms_adamw, original"]),
    (["--muon_momentum=1.0"], ["muon_momentum=1.0", "valid: a number in [0, 1)"]),
    (["--lr_schedule=step"], ["lr_schedule='step'", "valid: cosine, linear"]),
    (["--muon_lr_scale=-1.0"], ["muon_lr_scale=-1.0", "at least 0"]),
    (["--device=gpu"], ["device='gpu'", "valid: auto, cpu, cuda, cuda:N, mps"]),
    (["--pos_encoding=rotary"], ["'rotary'", "valid: learned, sinusoidal, rope, alibi, none"]),
    (["--rope_fraction=0.5625"], ["head size 16", "9 rotary channels", "valid: an even number"]),
    (["--rope_fraction=1.5"], ["rope_fraction 1.5", "valid:", "(0, 1]"]),
    (["--n_head=3"], ["n_embd 32", "n_head 3", "valid"]),
    (["--batch_size=0"], ["batch_size=0", "at least 1"]),
    (["--learning_rate=-0.1"], ["learning_rate=-0.1", "at least 0"]),
    (["--dataset=shakespear"], ["'shakespear'", "valid:", "shakespeare_char"]),
    (["--block_size=200000"], ["val.bin has", "block_size=200000", "valid: block_size below"]),
]


@pytest.mark.parametrize("argv,fragments", BAD_SETTINGS, ids=[a[0] for a, _ in BAD_SETTINGS])
def test_bad_setting_stops_before_any_work_with_one_line(argv, fragments, tmp_path, char_data, capsys):
    with pytest.raises(SystemExit) as e:
        train.main([*TINY_TRAIN, f"--out_dir={tmp_path / 'out'}", *argv])
    message = e.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert capsys.readouterr().out == "" and not (tmp_path / "out").exists()  # nothing ran


def test_unknown_setting_in_a_config_file(tmp_path, char_data):
    path = tmp_path / "my_config.py"
    path.write_text("n_layer = 2\nlearning_rte = 1e-3\n")
    with pytest.raises(SystemExit) as e:
        train.main([str(path), *TINY_TRAIN])
    assert e.value.code.startswith("error: unknown setting 'learning_rte' (did you mean 'learning_rate'?); valid: ")


@pytest.mark.parametrize("kind,fragment", BAD_CHECKPOINTS)
def test_resume_from_a_bad_checkpoint_is_one_line(kind, fragment, tmp_path, char_data):
    out_dir = bad_checkpoint(tmp_path, kind)
    with pytest.raises(SystemExit) as e:
        train.main([*TINY_TRAIN, "--init_from=resume", f"--out_dir={out_dir}"])
    message = e.value.code
    assert (
        message.startswith("error: checkpoint ")
        and "ckpt.pt" in message
        and fragment in message
        and "\n" not in message
    )
    assert "valid: " in message


@pytest.mark.parametrize("argv,fragment", [(["--n_layers=2"], "'n_layers'"), (["--init_from=resume"], "ckpt.pt")])
def test_the_script_prints_one_error_line_and_no_traceback(argv, fragment, tmp_path, char_data):
    out_dir = bad_checkpoint(tmp_path, "truncated")
    result = run_script("train.py", *TINY_TRAIN, f"--out_dir={out_dir}", *argv, check=False)
    assert_one_line_error(result, fragment)
    assert result.stdout == ""


# --- DDP ----------------------------------------------------------------------------------------


def test_two_processes_compute_the_gradients_of_one(tmp_path, char_data, capsys, monkeypatch):
    """torchrun --nproc_per_node=2 (gloo, CPU) with 4 micro-batches, 2 per process, against one
    process doing all 4: the same global batch, so the same (averaged, unclipped) gradients."""
    settings = ["--gradient_accumulation_steps=4", "--max_iters=1", "--eval_iters=1", "--grad_clip=0.0"]
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
    monkeypatch.setattr(train, "configure_optimizers", recording(train.configure_optimizers, str(one)))
    train_here(capsys, *settings, f"--out_dir={one}")
    ddp = run_script(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "tests/grad_worker.py",
        str(two),
        *TINY_TRAIN,
        *settings,
        f"--out_dir={two}",
    )
    assert "2 process(es)" in ddp.stdout
    single, rank0, rank1 = (
        load(path) for path in (one / "grads_rank0.pt", two / "grads_rank0.pt", two / "grads_rank1.pt")
    )
    assert_same_state(rank0, rank1)  # all-reduced
    assert single.keys() == rank0.keys()
    for name in single:
        assert single[name].abs().max() > 0, name
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-4, atol=1e-7, msg=name)
    saved = load(two / "ckpt.pt")["model"]  # written by rank 0 from the unwrapped model
    assert not [k for k in saved if k.startswith(("module.", "_orig_mod."))]


def tiny_model(pos_encoding: str, tie_embeddings: bool = True) -> GPT:
    torch.manual_seed(0)  # test_model.py's tiny(): vocab 65, block 16, 2 layers, 2 heads, 32 wide
    config = GPTConfig(
        vocab_size=65,
        block_size=16,
        n_layer=2,
        n_head=2,
        n_embd=32,
        pos_encoding=pos_encoding,
        bias=True,
        tie_embeddings=tie_embeddings,
    )
    return GPT(config)


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_weight_decay_only_on_2d_weights_and_each_parameter_once(pos_encoding):
    model = tiny_model(pos_encoding)
    optimizers = train.configure_optimizers(model, train.DEFAULTS, "cpu")
    assert list(optimizers) == ["adamw"] and isinstance(optimizers["adamw"], torch.optim.AdamW)
    decay, no_decay = optimizers["adamw"].param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    ids = [id(p) for g in optimizers["adamw"].param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # the tied embedding once


@pytest.mark.parametrize("pos_encoding,tie_embeddings", [("learned", True), ("rope", False)])
def test_muon_takes_the_blocks_2d_weights_and_adamw_the_rest(pos_encoding, tie_embeddings):
    model = tiny_model(pos_encoding, tie_embeddings)
    cfg = dict(train.DEFAULTS, optimizer="muon", muon_adjust_lr="original", muon_momentum=0.9)
    optimizers = train.configure_optimizers(model, cfg, "cpu")
    assert isinstance(optimizers["muon"], train.Muon) and isinstance(optimizers["adamw"], torch.optim.AdamW)
    (muon,) = optimizers["muon"].param_groups
    assert (muon["momentum"], muon["adjust_lr_fn"], muon["weight_decay"]) == (0.9, "original", 0.1)
    names = {id(p): name for name, p in model.named_parameters()}
    by_muon = {names[id(p)] for p in muon["params"]}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in optimizers["adamw"].param_groups)
    matrices = {
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert by_muon == matrices
    blocks = {names[id(p)]: rows for p, rows in optimizers["muon"].blocks.items()}
    assert blocks == {f"transformer.h.{i}.attn.c_attn.weight": [32, 32, 32] for i in range(2)}  # q, k, v
    gqa = GPT(dataclasses.replace(model.config, n_kv_head=1))  # one kv head of 16: q 32 rows, k and v 16 each
    assert list(train.configure_optimizers(gqa, cfg, "cpu")["muon"].blocks.values()) == [[32, 16, 16]] * 2
    assert decay == {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"} & set(names.values())
    assert no_decay == {name for name, p in model.named_parameters() if p.dim() == 1}
    assert len(by_muon) + len(decay) + len(no_decay) == len(list(model.parameters()))  # each once


def polar(m: torch.Tensor) -> torch.Tensor:
    """U V^T of m = U S V^T, in float64."""
    u, _, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return u @ vh


@pytest.mark.parametrize("shape", [(48, 96), (96, 24)])
def test_orthogonalise_keeps_the_singular_vectors_and_flattens_the_values(shape):
    """Newton-Schulz applies an odd polynomial to the singular values: its result has G's polar factor
    U V^T, and values within Jordan's [0.5, 1.5] for a G whose values span 1 to 0.05 of the largest."""
    torch.manual_seed(0)
    u, _, vh = torch.linalg.svd(torch.randn(shape, dtype=torch.float64), full_matrices=False)
    g = (u @ torch.diag(torch.logspace(0, -1.3, min(shape), dtype=torch.float64)) @ vh).float()
    out = train.orthogonalise(g, (3.4445, -4.7750, 2.0315), 5, 1e-7)
    assert out.shape == g.shape and out.dtype == torch.float32
    assert torch.allclose(polar(out), polar(g), atol=1e-4)
    values = torch.linalg.svdvals(out.double())
    assert values.min() > 0.5 and values.max() < 1.5


@pytest.mark.parametrize("nesterov,adjust_lr_fn", [(True, "match_rms_adamw"), (False, "original")])
def test_muon_steps_as_torch_optim_muon(monkeypatch, nesterov, adjust_lr_fn):
    """Three steps of ours equal torch.optim.Muon's on the same gradients, once torch's Newton-Schulz runs in
    float32 as ours does: the momentum, Nesterov's look-ahead, weight decay and the per-matrix lr are its."""
    torch.manual_seed(0)
    params = [torch.randn(24, 40), torch.randn(40, 24), torch.randn(24, 40)]  # two of one shape: one stack
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    ours, theirs = [p.clone().requires_grad_() for p in params], [p.clone().requires_grad_() for p in params]
    kwargs = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    our_muon, their_muon = train.Muon(ours, **kwargs), torch.optim.Muon(theirs, **kwargs)
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", train.orthogonalise)
    for step_grads in grads:
        for optimizer, tensors in ((our_muon, ours), (their_muon, theirs)):
            for p, g in zip(tensors, step_grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(ours[0], params[0], atol=1e-2)  # the steps moved the weights


def test_muon_steps_a_fused_matrix_as_torch_optim_muon_steps_its_blocks(monkeypatch):
    """A c_attn of GQA's shape (q of 16 rows, k and v of 8) given as blocks steps as torch.optim.Muon steps the
    three matrices apart: each block orthogonalised, with its own per-matrix lr."""
    torch.manual_seed(0)
    fused, rows = torch.randn(32, 16), [16, 8, 8]
    grads = [torch.randn_like(fused) for _ in range(3)]
    ours, theirs = fused.clone().requires_grad_(), [b.clone().requires_grad_() for b in fused.split(rows)]
    kwargs = dict(lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    our_muon, their_muon = train.Muon([ours], blocks={ours: rows}, **kwargs), torch.optim.Muon(theirs, **kwargs)
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", train.orthogonalise)
    for g in grads:
        ours.grad = g.clone()
        for p, block in zip(theirs, g.split(rows)):
            p.grad = block.clone()
        our_muon.step()
        their_muon.step()
    assert torch.allclose(ours, torch.cat(theirs), atol=1e-6)


def test_muon_loads_a_torch_optim_muon_state():
    """A torch.optim.Muon state dict loads into ours (the same state keys), so its checkpoints resume."""
    p = torch.randn(8, 16, requires_grad=True)
    p.grad = torch.randn_like(p)
    theirs = torch.optim.Muon([p], lr=0.02, adjust_lr_fn="match_rms_adamw")
    theirs.step()
    ours = train.Muon([p], lr=0.02, adjust_lr_fn="match_rms_adamw")
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.state[p]["momentum_buffer"], theirs.state[p]["momentum_buffer"])
    assert ours.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"


def test_the_schedule_sets_muon_lr_scale_times_adamw_lr():
    cfg = dict(train.DEFAULTS, optimizer="muon", muon_lr_scale=10.0)
    optimizers = train.configure_optimizers(tiny_model("rope"), cfg, "cpu")
    assert optimizers["muon"].param_groups[0]["lr"] == pytest.approx(1e-2)
    train.set_lr(optimizers, 3e-4, cfg)
    assert [g["lr"] for g in optimizers["adamw"].param_groups] == [3e-4, 3e-4]
    assert optimizers["muon"].param_groups[0]["lr"] == pytest.approx(3e-3)


# --- load_checkpoint: prefixes and damaged files ---------------------------------------------------


def test_load_checkpoint_strips_compile_and_ddp_prefixes(tmp_path):
    """Keys saved by a compiled model (`_orig_mod.`), a DDP one (`module.`) or both, in either order,
    and nanoGPT's causal-mask buffers (`attn.bias`), load into the model they came from."""
    model = GPT(GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=16, bias=True))
    state = model.state_dict()
    prefixes = ["", "_orig_mod.", "module.", "module._orig_mod.", "_orig_mod.module."]
    saved = {prefixes[i % len(prefixes)] + k: v for i, (k, v) in enumerate(state.items())}
    assert set(prefixes[1:]) <= {k[: len(k) - len(name)] for k, name in zip(saved, state)}  # every prefix used
    saved["_orig_mod.transformer.h.0.attn.bias"] = torch.ones(1, 1, 16, 16).tril()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": saved, "model_args": dataclasses.asdict(model.config)}, path)
    loaded, _ = train.load_checkpoint(str(path))
    assert loaded.state_dict().keys() == state.keys()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, state[name]), name


# --- checkpoint loading errors -------------------------------------------------------------------


def bad_checkpoints(tmp_path, good: str) -> dict:
    data = open(good, "rb").read()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("step 0: train loss 4.17\n")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    return {
        "truncated.pt": "not a readable checkpoint",
        "text.pt": "not a readable checkpoint",
        "foreign.pt": "holds no 'model' and 'model_args'",
        "missing.pt": "does not exist",
    }


def test_bad_checkpoint_files_are_one_line_errors(tmp_path, nanogpt_ckpt):
    for name, fragment in bad_checkpoints(tmp_path, str(nanogpt_ckpt["path"])).items():
        path = str(tmp_path / name)
        with pytest.raises(ValueError) as e:
            train.load_checkpoint(path)
        message = str(e.value)
        assert "\n" not in message and path in message and fragment in message and "valid: " in message, message


# --- bench.py nanogpt: its arguments, and timing a run from its log ---------------------------------


@pytest.mark.parametrize("argv,fragment", [([], "needs PATH"), (["{tmp}"], "is not a prepared nanoGPT copy")])
def test_bench_nanogpt_without_a_prepared_copy_is_one_line(argv, fragment, tmp_path):
    result = run_script("bench.py", "nanogpt", *(a.format(tmp=tmp_path) for a in argv), check=False)
    assert_one_line_error(result, fragment, "nanogpt.sh")
    assert result.stdout == ""


def test_bench_timed_run_counts_steps_and_stops_at_the_target():
    import bench

    script = (
        "import time\n"
        "for i in range(4):\n"
        "    if i % 2 == 0: time.sleep(0.3); print(f'step {i}: train loss 2.0, val loss {2.0 - i / 4:.4f}')\n"
        "    time.sleep(0.05); print(f'iter {i}: loss 2.0, time 50ms')\n"
        "time.sleep(30)\n"
    )
    start = time.perf_counter()
    run = bench.timed_run([sys.executable, "-c", script], cwd=".", stop_below=1.6)
    assert time.perf_counter() - start < 10  # killed at val 1.5, not left to sleep
    assert len(run["steps"]) == 2 and all(0.04 < s < 0.25 for s in run["steps"])  # evaluations left out
    assert [(i, v) for i, v, _ in run["evals"]] == [(0, 2.0), (2, 1.5)]
    assert run["evals"][0][2] == 0 and run["evals"][1][2] == pytest.approx(sum(run["steps"]))
