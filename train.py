"""Train a GPT: a plain loop in one file.

    python train.py config/rope_shakespeare.py                 # one process, device chosen for you
    python train.py config/rope_shakespeare.py --pos_encoding=alibi --max_iters=500
    torchrun --standalone --nproc_per_node=2 train.py config/rope_shakespeare.py   # DDP

Every setting below can be set by a config file (plain Python) or as --key=value.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import ConfigError, check_device, configure
from data.tokenizer import tokenizer_spec
from model import GPT, GPTConfig, load_checkpoint

DEFAULTS = dict(
    # I/O
    out_dir="out",
    eval_interval=250,
    log_interval=10,
    eval_iters=200,
    eval_only=False,
    always_save_checkpoint=True,
    init_from="scratch",  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
    seed=1337,
    # logging
    wandb_log=False,
    wandb_project="ropegpt",
    wandb_run_name="run",
    # data
    dataset="shakespeare_char",
    gradient_accumulation_steps=1,  # micro-batches per step, across all processes
    batch_size=12,
    block_size=64,
    # model
    n_layer=4,
    n_head=4,
    n_embd=128,
    dropout=0.0,
    bias=False,
    pos_encoding="rope",
    rope_base=10000.0,
    rope_fraction=1.0,
    rope_layout="half",
    rope_scaling=None,
    # AdamW
    learning_rate=1e-3,
    max_iters=2000,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.99,
    grad_clip=1.0,  # 0 disables clipping
    # learning-rate schedule: linear warmup, then cosine decay to min_lr
    decay_lr=True,
    warmup_iters=100,
    lr_decay_iters=2000,
    min_lr=1e-4,
    # system
    device="auto",  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype="auto",  # 'auto', 'float32', 'bfloat16', 'float16'
    compile=False,
)
MODEL_KEYS = [f.name for f in fields(GPTConfig) if f.name != "vocab_size"]
CHOICES = dict(init_from=("scratch", "resume"), dtype=("auto", "float32", "bfloat16", "float16"))
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def check_choices(cfg: dict) -> None:
    for key, valid in CHOICES.items():
        if cfg[key] not in valid:
            raise ConfigError(f"{key}={cfg[key]!r} is not valid; valid: {', '.join(valid)}")
    check_device(cfg["device"], auto=True)
    for key in ("batch_size", "block_size", "gradient_accumulation_steps", "eval_iters", "log_interval", "eval_interval"):
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} is not valid; valid: a whole number of at least 1")
    for key in ("max_iters", "warmup_iters", "lr_decay_iters", "learning_rate", "min_lr", "weight_decay", "grad_clip"):
        if cfg[key] < 0:
            raise ConfigError(f"{key}={cfg[key]} is not valid; valid: a number of at least 0")
    for key in ("beta1", "beta2"):
        if not 0 <= cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} is not valid; valid: a number in [0, 1)")


def pick_device(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(name: str, device_type: str, n_embd: int) -> str:
    """bf16 autocast where it pays: CUDA with bf16 support, and AMX CPUs once matrices are wide.

    On a 2-core AMX Xeon, bf16 made the training step 1.6x faster at n_embd 256 but 1.3x slower
    at 128, where the step is bound by per-op overhead, not matrix work (BENCHMARKS.md).
    """
    if name != "auto":
        return name
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device_type == "cpu" and torch.cpu._is_amx_tile_supported() and n_embd >= 256:
        return "bfloat16"
    return "float32"


def peak_flops(device: str, dtype: str) -> tuple[float, str]:
    """The peak FLOP/s that MFU is measured against, with how it was reckoned."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("4090", 165e12)):
            if key in name:
                return flops, f"{name} dense bf16 datasheet"
        return 100e12, f"{name}: not in the table, 100 TFLOP/s assumed"
    if device.startswith("cpu"):
        cores = torch.get_num_threads()
        ghz = _cpu_ghz()
        if dtype == "bfloat16" and torch.cpu._is_amx_tile_supported():
            per_cycle, unit = 1024, "AMX bf16"
        else:
            per_cycle, unit = 64, "AVX-512 fp32 FMA"
        return cores * ghz * 1e9 * per_cycle, f"{cores} thread(s) x {ghz:.1f} GHz x {per_cycle} FLOP/cycle ({unit})"
    return 10e12, f"{device}: 10 TFLOP/s assumed"


def _cpu_ghz() -> float:
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
        return max(mhz) / 1000 if mhz else 2.0
    except OSError:
        return 2.0


def data_paths(dataset: str, block_size: int = 0) -> dict:
    """train.bin and val.bin of data/<dataset>, prepared on first use, each longer than block_size;
    a one-line error if impossible."""
    folder = os.path.join(DATA_DIR, dataset)
    paths = {split: os.path.join(folder, f"{split}.bin") for split in ("train", "val")}
    if not all(os.path.exists(p) for p in paths.values()):
        prepare = os.path.join(folder, "prepare.py")
        if not os.path.exists(prepare):
            valid = sorted(d for d in os.listdir(DATA_DIR) if os.path.exists(os.path.join(DATA_DIR, d, "prepare.py")))
            raise ConfigError(f"dataset {dataset!r} has no train.bin/val.bin nor prepare.py in {folder}; valid: {', '.join(valid)}")
        import runpy

        runpy.run_path(prepare, run_name="__main__")
        missing = [p for p in paths.values() if not os.path.exists(p)]
        if missing:
            raise ConfigError(f"{prepare} did not write {', '.join(missing)}")
    for path in paths.values():
        tokens = os.path.getsize(path) // 2
        if tokens <= block_size:
            raise ConfigError(f"{path} has {tokens} tokens, too few for block_size={block_size}; valid: block_size below {tokens}")
    return paths


def get_batch(path: str, ix: torch.Tensor, block_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for the windows starting at ix, each (len(ix), block_size)."""
    data = np.memmap(path, dtype=np.uint16, mode="r")  # reopened per batch: a kept memmap grows memory
    x = torch.stack([torch.from_numpy(data[i : i + block_size].astype(np.int64)) for i in ix.tolist()])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block_size].astype(np.int64)) for i in ix.tolist()])
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def sample_starts(path: str, n: int, block_size: int, generator: torch.Generator) -> torch.Tensor:
    """n random window starts. Every process draws the same global batch and takes its own rows,
    so the data seen does not depend on how many processes share the work."""
    length = os.path.getsize(path) // 2
    return torch.randint(length - block_size, (n,), generator=generator)


def optimizer_step(model: torch.nn.Module, optimizer, scaler, grad_clip: float) -> None:
    """After the backward passes: clip the gradient norm (unscaled first, for fp16), step, zero."""
    if grad_clip > 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def get_lr(it: int, cfg: dict) -> float:
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    if it > cfg["lr_decay_iters"]:
        return cfg["min_lr"]
    ratio = (it - cfg["warmup_iters"]) / max(1, cfg["lr_decay_iters"] - cfg["warmup_iters"])
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg["learning_rate"] - cfg["min_lr"])


@torch.no_grad()
def estimate_loss(model, cfg: dict, paths: dict, device: str, autocast) -> dict:
    """Mean loss over eval_iters batches per split; the same batches at every evaluation."""
    model.eval()
    out = {}
    for split, path in paths.items():
        generator = torch.Generator().manual_seed(cfg["seed"] + (1 if split == "val" else 2))
        losses = torch.zeros(cfg["eval_iters"])
        for k in range(cfg["eval_iters"]):
            ix = sample_starts(path, cfg["batch_size"], cfg["block_size"], generator)
            X, Y = get_batch(path, ix, cfg["block_size"], device)
            with autocast:
                _, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def save_checkpoint(path: str, checkpoint: dict) -> None:
    """Write to a temporary file, then rename: a crash mid-write never leaves a broken ckpt.pt."""
    tmp = path + ".tmp"
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # only after a failed write: leave no partial file behind
            os.remove(tmp)


def rng_state(data_generator: torch.Generator, device: str) -> dict:
    state = {"torch": torch.get_rng_state(), "data": data_generator.get_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, data_generator: torch.Generator, device: str) -> None:
    torch.set_rng_state(state["torch"])
    data_generator.set_state(state["data"])
    if "cuda" in state and device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)


def setup(argv: list[str]) -> dict:
    """Parse and check every setting before any work starts (one-line errors)."""
    cfg = configure(DEFAULTS, argv)
    check_choices(cfg)
    GPTConfig(**{k: cfg[k] for k in MODEL_KEYS}, vocab_size=1)  # validates the model settings
    return cfg


def main(argv: list[str]) -> None:
    try:
        cfg = setup(argv)
        paths = data_paths(cfg["dataset"], cfg["block_size"])
    except ValueError as e:
        sys.exit(f"error: {e}")

    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        device = f"cuda:{local_rank}" if torch.cuda.is_available() and cfg["device"] in ("auto", "cuda") else "cpu"
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        if cfg["gradient_accumulation_steps"] % world:
            sys.exit(f"error: gradient_accumulation_steps={cfg['gradient_accumulation_steps']} is not divisible by the {world} processes")
    else:
        rank, world, device = 0, 1, pick_device(cfg["device"])
    master = rank == 0
    device_type = device.split(":")[0]
    dtype = pick_dtype(cfg["dtype"], device_type, cfg["n_embd"])
    micro_steps = cfg["gradient_accumulation_steps"] // world
    tokens_per_iter = cfg["gradient_accumulation_steps"] * cfg["batch_size"] * cfg["block_size"]

    torch.manual_seed(cfg["seed"] + rank)  # dropout differs per process; data does not
    data_generator = torch.Generator().manual_seed(cfg["seed"])
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (
        nullcontext()
        if dtype == "float32"
        else torch.autocast(device_type=device_type, dtype={"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])
    )

    iter_num, best_val_loss, checkpoint = 0, 1e9, None
    tokenizer = tokenizer_spec(cfg["dataset"])
    vocab_size = len(tokenizer["chars"]) if tokenizer["kind"] == "char" else 50304
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    try:
        if cfg["init_from"] == "resume":
            # a rope_scaling given here applies a context-extension variant to the trained model
            model, checkpoint = load_checkpoint(ckpt_path, "cpu", cfg["rope_scaling"])
            cfg.update({k: getattr(model.config, k) for k in MODEL_KEYS})  # the checkpoint's model wins
            iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        else:
            model = GPT(GPTConfig(**{k: cfg[k] for k in MODEL_KEYS}, vocab_size=vocab_size))
    except ValueError as e:
        sys.exit(f"error: {e}")
    model.to(device).train()
    model_args = asdict(model.config)
    if master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        print(f"device {device}, dtype {dtype}, {world} process(es), {tokens_per_iter:,} tokens per iteration")
        print(f"model: {model.get_num_params() / 1e6:.2f}M parameters, pos_encoding={model.config.pos_encoding}")

    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        set_rng_state(checkpoint["rng"], data_generator, device)
        checkpoint = None  # free memory

    raw_model = model
    if cfg["compile"]:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)

    peak, peak_note = peak_flops(device, dtype)
    if master:
        print(f"MFU is measured against {peak / 1e12:.2f} TFLOP/s: {peak_note}")
    if cfg["wandb_log"] and master:
        import wandb

        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"], config=cfg, mode=mode, dir=cfg["out_dir"])

    t0, iters_timed = time.time(), 0
    train_time, running_mfu = 0.0, -1.0  # seconds spent training this run, evaluations excluded
    t_step = time.time()
    while True:
        if iter_num % cfg["eval_interval"] == 0 or iter_num == cfg["max_iters"]:
            train_time += time.time() - t_step
            if master:
                losses = estimate_loss(raw_model, cfg, paths, device, autocast)
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                      f"{train_time:.1f}s of training")
                if cfg["wandb_log"]:
                    wandb.log({"iter": iter_num, "train/loss": losses["train"], "val/loss": losses["val"], "mfu": running_mfu * 100})
                if losses["val"] < best_val_loss or cfg["always_save_checkpoint"]:
                    best_val_loss = min(best_val_loss, losses["val"])
                    if iter_num > 0 and not cfg["eval_only"]:
                        save_checkpoint(
                            ckpt_path,
                            {
                                "model": raw_model.state_dict(),
                                "optimizer": optimizer.state_dict(),
                                "model_args": model_args,
                                "iter_num": iter_num,
                                "best_val_loss": best_val_loss,
                                "config": cfg,
                                "rng": rng_state(data_generator, device),
                                "tokenizer": tokenizer,
                            },
                        )
                        print(f"saved checkpoint to {ckpt_path}")
            t_step = t0 = time.time()  # evaluation is not training time
            iters_timed = 0
        if iter_num >= cfg["max_iters"] or cfg["eval_only"]:
            break

        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = sample_starts(paths["train"], cfg["gradient_accumulation_steps"] * cfg["batch_size"], cfg["block_size"], data_generator)
        mine = starts.view(world, micro_steps, cfg["batch_size"])[rank]
        for micro_step in range(micro_steps):
            X, Y = get_batch(paths["train"], mine[micro_step], cfg["block_size"], device)
            if ddp:  # all-reduce gradients on the last micro-step only
                model.require_backward_grad_sync = micro_step == micro_steps - 1
            with autocast:
                _, loss = model(X, Y)
                loss = loss / micro_steps  # the mean over this process's micro-batches; DDP averages processes
            scaler.scale(loss).backward()
        optimizer_step(model, optimizer, scaler, cfg["grad_clip"])

        iters_timed += 1
        if iter_num % cfg["log_interval"] == 0 and master:
            lossf = loss.item() * micro_steps  # .item() waits for the device, so the time below is real
            t1 = time.time()
            dt = (t1 - t0) / iters_timed
            t0, iters_timed = t1, 0
            tok_s = tokens_per_iter / dt
            if iter_num >= 5 * cfg["log_interval"]:  # skip warm-up iterations
                mfu = raw_model.estimate_mfu(tok_s / world, peak)  # peak is one device's; tok_s is all processes'
                running_mfu = mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
            mfu_text = f"{running_mfu * 100:.2f}%" if running_mfu >= 0 else "n/a"
            print(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, {tok_s:,.0f} tok/s, mfu {mfu_text}")
        iter_num += 1

    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
