"""Train a GPT: a plain loop in one file.

    python train.py config/rope_shakespeare.py                 # one process, device chosen for you
    python train.py config/rope_shakespeare.py --pos_encoding=alibi --max_iters=500
    torchrun --standalone --nproc_per_node=2 train.py config/rope_shakespeare.py   # DDP

Every setting below can be set by a config file (plain Python) or as --key=value.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import ConfigError, check_device, configure
from data.dataset import data_paths, get_batch, sample_starts
from data.tokenizer import tokenizer_spec, vocab_size
from model import GPT, GPTConfig

DEFAULTS = dict(
    # I/O
    out_dir="out",  # where ckpt.pt is written (and read by init_from='resume')
    eval_interval=250,  # iterations between evaluations (each may save a checkpoint)
    log_interval=10,  # iterations between loss and timing lines
    eval_iters=200,  # batches per split in each evaluation (the same batches every time)
    eval_only=False,  # True: evaluate once and exit, without training or saving
    always_save_checkpoint=True,  # False: save only when the val loss improves on the best so far
    init_from="scratch",  # 'scratch', 'resume' (from out_dir/ckpt.pt), or a ckpt.pt path to fine-tune (init_model)
    seed=1337,  # seeds the weights, the batches, and dropout (plus the process's rank)
    # logging
    wandb_log=False,  # log to Weights & Biases (an offline run in out_dir without WANDB_API_KEY)
    wandb_project="ropegpt",  # the wandb project
    wandb_run_name="run",  # the wandb run's name
    # data
    dataset="shakespeare_char",  # a folder of data/ holding train.bin and val.bin, or a prepare.py that writes them
    gradient_accumulation_steps=1,  # micro-batches per step, across all processes
    batch_size=12,  # sequences per micro-batch
    block_size=64,  # tokens per sequence: the training context length
    # model
    n_layer=4,  # transformer blocks
    n_head=4,  # attention heads per block
    n_embd=128,  # embedding width, a multiple of n_head
    n_kv_head=None,  # key/value heads, a divisor of n_head (grouped-query attention); None: n_head
    dropout=0.0,  # dropout probability, in [0, 1)
    bias=False,  # biases in Linear and LayerNorm layers, as GPT-2
    activation="gelu",  # the MLP's: 'gelu' (exact), 'gelu_tanh' (GPT-2's tanh approximation) or 'relu2'
    parallel_residual=False,  # GPT-NeoX's x + attn(ln_1(x)) + mlp(ln_2(x)) instead of one branch after the other
    tie_embeddings=True,  # the output head shares the token embedding matrix
    pos_encoding="rope",  # 'learned', 'sinusoidal', 'rope', 'alibi' or 'none'
    rope_base=10000.0,  # RoPE's base: pair i turns at base^(-2i/d) radians per position
    rope_fraction=1.0,  # share of each head's channels that RoPE rotates, in (0, 1]
    rope_layout="half",  # RoPE's channel pairs: 'half' (x_i, x_i+d/2, GPT-NeoX) or 'interleaved' (x_2i, x_2i+1)
    rope_scaling=None,  # context extension, e.g. {'rope_type': 'yarn', 'factor': 4.0} (rope.py); None: plain RoPE
    layer_types="full_attention",  # per layer, cycled: 'full_attention', 'sliding_attention', 'chunked_attention'
    sliding_window=None,  # the keys a sliding_attention layer's query sees, itself included
    attention_chunk_size=None,  # the block size of chunked_attention layers (Llama 4)
    attn_temperature_tuning=False,  # Llama 4's query scale at long positions on the layers without RoPE
    floor_scale=8192,  # Llama 4: the scale grows by one step every floor_scale positions
    attn_scale=0.1,  # Llama 4: the size of each step
    # optimizer
    optimizer="adamw",  # 'adamw', or 'muon': Muon (train.Muon) on the blocks' 2-D weights, AdamW on the rest
    learning_rate=1e-3,  # the peak learning rate (AdamW's; Muon's is muon_lr_scale times it)
    max_iters=2000,  # optimizer steps in all (a resumed run continues to this count)
    weight_decay=0.1,  # decoupled weight decay, on 2-D weights only (not biases or norms)
    beta1=0.9,  # AdamW's first-moment decay, in [0, 1)
    beta2=0.99,  # AdamW's second-moment decay, in [0, 1)
    muon_lr_scale=1.0,  # Muon's learning rate as a multiple of AdamW's, at every step of the schedule
    muon_momentum=0.95,  # Muon's (Nesterov) momentum, in [0, 1)
    muon_adjust_lr="match_rms_adamw",  # Muon's per-matrix lr: 'match_rms_adamw' (0.2*sqrt(max(A, B))) or 'original'
    grad_clip=1.0,  # the gradient-norm clip; 0 disables clipping
    # learning-rate schedule: linear warmup, then a decay to min_lr
    decay_lr=True,  # False: learning_rate throughout
    lr_schedule="cosine",  # the decay: 'cosine' (nanoGPT's) or 'linear' (Bergsma et al. 2025, "Straight to Zero")
    warmup_iters=100,  # steps of linear warmup
    lr_decay_iters=2000,  # the step where the decay reaches min_lr (then min_lr); usually max_iters
    min_lr=1e-4,  # the learning rate at the end of the decay
    # system
    device="auto",  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype="auto",  # 'auto' (see pick_dtype), 'float32', 'bfloat16', 'float16' (autocast; fp16 with a grad scaler)
    compile=False,  # torch.compile the model: compiles at the first step, then faster steps
)
MODEL_KEYS = [f.name for f in fields(GPTConfig) if f.name != "vocab_size"]
# A layout's settings (eval_length.py's lab rows, bench.py's layouts): positions and attention, not the size
LAYOUT_KEYS = (
    "pos_encoding",
    "rope_base",
    "rope_fraction",
    "rope_scaling",
    "layer_types",
    "sliding_window",
    "attention_chunk_size",
    "attn_temperature_tuning",
    "floor_scale",
    "attn_scale",
    "n_kv_head",
)
CHOICES = dict(
    dtype=("auto", "float32", "bfloat16", "float16"),
    optimizer=("adamw", "muon"),
    muon_adjust_lr=("match_rms_adamw", "original"),
    lr_schedule=("cosine", "linear"),
)


def check_choices(cfg: dict) -> None:
    if cfg["init_from"] not in ("scratch", "resume") and not cfg["init_from"].endswith(".pt"):
        raise ConfigError(
            f"init_from={cfg['init_from']!r} is not valid; valid: scratch, resume, or a path to a ckpt.pt"
        )
    for key, valid in CHOICES.items():
        if cfg[key] not in valid:
            raise ConfigError(f"{key}={cfg[key]!r} is not valid; valid: {', '.join(valid)}")
    check_device(cfg["device"], auto=True)
    for key in (
        "batch_size",
        "block_size",
        "gradient_accumulation_steps",
        "eval_iters",
        "log_interval",
        "eval_interval",
    ):
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} is not valid; valid: a whole number of at least 1")
    for key in (
        "max_iters",
        "warmup_iters",
        "lr_decay_iters",
        "learning_rate",
        "min_lr",
        "weight_decay",
        "grad_clip",
        "muon_lr_scale",
    ):
        if cfg[key] < 0:
            raise ConfigError(f"{key}={cfg[key]} is not valid; valid: a number of at least 0")
    for key in ("beta1", "beta2", "muon_momentum"):
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

    On an AMX CPU, bf16 pays from n_embd 256; below that the step is bound by per-op overhead, not
    matrix work, and float32 is faster (BENCHMARKS.md has the measurements).
    """
    if name != "auto":
        return name
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device_type == "cpu" and torch.cpu._is_amx_tile_supported() and n_embd >= 256:
        return "bfloat16"
    return "float32"


def autocast_for(device_type: str, dtype: str):
    """The context that runs a forward in dtype: nothing for float32, else torch.autocast."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype={"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])


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
        elif torch.backends.cpu.get_cpu_capability() == "AVX512":
            per_cycle, unit = 64, "AVX-512 fp32 FMA"
        else:  # two 256-bit FMA units (AVX2)
            per_cycle, unit = 32, "256-bit fp32 FMA"
        return cores * ghz * 1e9 * per_cycle, f"{cores} thread(s) x {ghz:.1f} GHz x {per_cycle} FLOP/cycle ({unit})"
    return 10e12, f"{device}: 10 TFLOP/s assumed"


def _cpu_ghz() -> float:
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
        return max(mhz) / 1000 if mhz else 2.0
    except OSError:
        return 2.0


def orthogonalise(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """Muon's Newton-Schulz iteration (Jordan et al. 2024, kellerjordan.github.io/posts/muon), in float32:
    X_0 = G / ||G||_F, X_{k+1} = a X_k + (b A_k + c A_k^2) X_k with A_k = X_k X_k^T, on the wide orientation
    of G. Its result is about U S' V^T for G = U S V^T, S' within [0.5, 1.5] (not exactly orthogonal).
    G is one matrix or a stack of them (k, A, B), each its own."""
    a, b, c = coefficients
    tall = g.size(-2) > g.size(-1)
    x = g.float().reshape(-1, *g.shape[-2:])
    x = x.mT if tall else x
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).reshape(g.shape)


class Muon(torch.optim.Muon):
    """torch.optim.Muon's settings, state and update, with the Newton-Schulz iteration in float32
    (`orthogonalise`): torch's casts it to bf16, which on a CPU without bf16 matrix units makes the main
    job's step many times slower (BENCHMARKS.md). On CUDA the float32 products run as TF32. A matrix that
    fuses several (c_attn: q, k and v) is orthogonalised block by block, its rows split as `blocks` gives."""

    def __init__(self, params, blocks: dict[torch.Tensor, list[int]] | None = None, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.blocks = blocks or {}

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            by_shape = {}  # matrices of one shape go through Newton-Schulz as one stack: batched products
            for p in (p for p in group["params"] if p.grad is not None):
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                p.mul_(1 - lr * decay)
                rows = self.blocks.get(p, p.size(0))
                for block, part in zip(p.split(rows), update.split(rows)):
                    by_shape.setdefault(block.shape, []).append((block, part))
            for shape, pairs in by_shape.items():
                parts = torch.stack([part for _, part in pairs])
                parts = orthogonalise(parts, group["ns_coefficients"], group["ns_steps"], group["eps"])
                alpha = -lr * muon_lr_ratio(group["adjust_lr_fn"], *shape)
                for (block, _), part in zip(pairs, parts):
                    block.add_(part.to(block.dtype), alpha=alpha)


def muon_lr_ratio(adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """Muon's per-matrix learning-rate factor: 'match_rms_adamw' 0.2 sqrt(max(A, B)), an update of AdamW's RMS
    (Liu et al. 2025, "Muon is Scalable for LLM Training"); 'original' (Jordan's) sqrt(max(1, A / B))."""
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))


def configure_optimizers(model: GPT, cfg: dict, device_type: str) -> dict[str, torch.optim.Optimizer]:
    """{'adamw': AdamW on every parameter}, or with optimizer='muon' {'muon': Muon on the blocks' 2-D weights,
    c_attn per q, k and v block, 'adamw': AdamW on the embeddings, the head, the norms and the biases}: Muon
    orthogonalises the update of a hidden matrix, which an embedding or the head is not (torch.optim.Muon's
    docs). Weight decay on 2-D weights only; AdamW fused: one kernel a step (BENCHMARKS.md)."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    muon = cfg["optimizer"] == "muon"
    hidden = [p for name, p in params if muon and name.startswith("transformer.h.") and p.dim() == 2]
    rest = [p for _, p in params if not any(p is h for h in hidden)]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    betas, fused = (cfg["beta1"], cfg["beta2"]), device_type in ("cuda", "cpu")
    optimizers = {"adamw": torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=betas, fused=fused)}
    if muon:
        attns = [block.attn for block in model.transformer.h]  # c_attn's rows: q, k, v heads, as forward splits them
        qkv = {a.c_attn.weight: [a.n_head * a.hs, a.n_kv_head * a.hs, a.n_kv_head * a.hs] for a in attns}
        optimizers["muon"] = Muon(
            hidden,
            blocks=qkv,
            lr=cfg["learning_rate"] * cfg["muon_lr_scale"],
            weight_decay=cfg["weight_decay"],
            momentum=cfg["muon_momentum"],
            adjust_lr_fn=cfg["muon_adjust_lr"],
        )
    return optimizers


def set_lr(optimizers: dict[str, torch.optim.Optimizer], lr: float, cfg: dict) -> None:
    """The schedule's learning rate on every group, Muon's times muon_lr_scale."""
    for name, optimizer in optimizers.items():
        for group in optimizer.param_groups:
            group["lr"] = lr * cfg["muon_lr_scale"] if name == "muon" else lr


def load_optimizer_state(optimizers: dict[str, torch.optim.Optimizer], saved: dict, cfg: dict) -> None:
    """Each optimizer's state from a checkpoint's; a checkpoint of the other `optimizer` is a one-line ValueError."""
    if "state" in saved:  # a checkpoint from before the optimizer setting holds one AdamW's state
        saved = {"adamw": saved}
    was = "muon" if "muon" in saved else "adamw"
    if saved.keys() != optimizers.keys():
        raise ValueError(
            f"the checkpoint was trained with optimizer={was!r}, not {cfg['optimizer']!r}; valid: --optimizer={was}"
        )
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(saved[name])


def estimate_mfu(model: GPT, tokens_per_second: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: 6N + 12·L·H·Q·T FLOPs per token (PaLM appendix B) over the peak."""
    cfg = model.config
    flops_per_token = 6 * model.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    return flops_per_token * tokens_per_second / peak_flops


def optimizer_step(
    model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer], scaler, grad_clip: float
) -> None:
    """After the backward passes: clip the gradient norm over all parameters (unscaled first, for fp16), step
    each optimizer, zero."""
    if grad_clip > 0.0:
        for optimizer in optimizers.values():
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for optimizer in optimizers.values():
        scaler.step(optimizer)
    scaler.update()
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)


def get_lr(it: int, cfg: dict) -> float:
    """Linear warmup for warmup_iters, a cosine or linear decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    if it > cfg["lr_decay_iters"]:
        return cfg["min_lr"]
    ratio = (it - cfg["warmup_iters"]) / max(1, cfg["lr_decay_iters"] - cfg["warmup_iters"])
    share = 1.0 - ratio if cfg["lr_schedule"] == "linear" else 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg["min_lr"] + share * (cfg["learning_rate"] - cfg["min_lr"])


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


def load_checkpoint(path: str, device: str = "cpu", rope_scaling: dict | None = None) -> tuple[GPT, dict]:
    """(model in eval mode on `device`, checkpoint dict) of a ropegpt or nanoGPT ckpt.pt; rope_scaling, if
    given, replaces the checkpoint's. A missing, unreadable or foreign file is a one-line ValueError."""
    valid = "valid: a ckpt.pt from train.py or nanoGPT"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path!r} does not exist; {valid} (train.py writes out_dir/ckpt.pt)") from None
    except Exception as e:  # torch raises many kinds for a truncated or foreign file
        raise ValueError(f"checkpoint {path!r} is not a readable checkpoint ({type(e).__name__}); {valid}") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_args" not in checkpoint:
        raise ValueError(f"checkpoint {path!r} holds no 'model' and 'model_args'; {valid}")
    model_args = {"pos_encoding": "learned", **checkpoint["model_args"]}  # nanoGPT's carry none: they are GPT-2
    if rope_scaling is not None:
        model_args["rope_scaling"] = rope_scaling
    unknown = sorted(set(model_args) - {f.name for f in fields(GPTConfig)})
    if unknown:
        raise ValueError(f"checkpoint {path!r} has unknown model_args {unknown}; valid: those of GPTConfig")
    model = GPT(GPTConfig(**model_args))
    try:
        # torch.compile's `_orig_mod.` and DDP's `module.` prefixes off, and nanoGPT's causal-mask buffers
        state = {re.sub(r"^((_orig_mod|module)\.)+", "", k): v for k, v in checkpoint["model"].items()}
        model.load_state_dict({k: v for k, v in state.items() if not k.endswith(".attn.bias")})
    except RuntimeError as e:
        first = str(e).strip().splitlines()[:2]
        raise ValueError(f"checkpoint {path!r} does not match its model_args: {' '.join(first)}") from None
    return model.to(device).eval(), checkpoint


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
    cfg = configure(DEFAULTS, argv, script=__file__)
    check_choices(cfg)
    GPTConfig(**{k: cfg[k] for k in MODEL_KEYS}, vocab_size=1)  # validates the model settings
    return cfg


def setup_ddp(cfg: dict) -> tuple[bool, int, int, str]:
    """(ddp, rank, world size, device). Under torchrun (RANK set): join the process group, one
    device per process (cuda:LOCAL_RANK, else the CPU, with gloo); else one process on cfg's device."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1, pick_device(cfg["device"])
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = f"cuda:{local_rank}" if torch.cuda.is_available() and cfg["device"] in ("auto", "cuda") else "cpu"
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    steps = cfg["gradient_accumulation_steps"]
    if steps % world:
        raise ConfigError(
            f"gradient_accumulation_steps={steps} is not divisible by the {world} processes; "
            f"valid: a multiple of {world}"
        )
    return True, rank, world, device


def init_model(cfg: dict, vocab: int, ckpt_path: str) -> tuple[GPT, dict | None]:
    """(model, checkpoint): a new model of cfg's settings, or with init_from='resume' the one in
    ckpt_path and the checkpoint itself, whose model settings then replace cfg's. With init_from a
    ckpt.pt path: fine-tuning, as context extension does it (PI, YaRN): that checkpoint's weights and
    model settings but this run's block_size and rope_scaling, and no checkpoint returned, so the
    optimizer and the step count start afresh."""
    if cfg["init_from"] == "scratch":
        return GPT(GPTConfig(**{k: cfg[k] for k in MODEL_KEYS}, vocab_size=vocab)), None
    if cfg["init_from"] == "resume":
        # a rope_scaling given here applies a context-extension variant to the trained model
        model, checkpoint = load_checkpoint(ckpt_path, "cpu", cfg["rope_scaling"])
        cfg.update({k: getattr(model.config, k) for k in MODEL_KEYS})  # the checkpoint's model wins
        return model, checkpoint
    trained, _ = load_checkpoint(cfg["init_from"], "cpu")
    extended = {k: cfg[k] for k in ("block_size", "rope_scaling")}
    cfg.update({k: getattr(trained.config, k) for k in MODEL_KEYS}, **extended)
    model = GPT(GPTConfig(**{k: cfg[k] for k in MODEL_KEYS}, vocab_size=trained.config.vocab_size))
    try:
        model.load_state_dict(trained.state_dict())
    except RuntimeError:  # a learned position table has block_size rows
        raise ValueError(
            f"init_from={cfg['init_from']!r} has a {trained.config.pos_encoding} position table of "
            f"{trained.config.block_size} positions; valid: its block_size, or an encoding without a table"
        ) from None
    return model, None


def train_step(model, optimizers, scaler, path: str, starts: torch.Tensor, cfg: dict, device: str, autocast):
    """One optimizer step over micro-batches, one per row of starts (micro_steps, batch_size):
    forward, backward, then clip and step. Returns the last micro-batch's loss / micro_steps."""
    micro_steps = len(starts)
    for micro_step in range(micro_steps):
        X, Y = get_batch(path, starts[micro_step], cfg["block_size"], device)
        if isinstance(model, DDP):  # all-reduce gradients on the last micro-step only
            model.require_backward_grad_sync = micro_step == micro_steps - 1
        with autocast:
            _, loss = model(X, Y)
            loss = loss / micro_steps  # the mean over this process's micro-batches; DDP averages processes
        scaler.scale(loss).backward()
    optimizer_step(model, optimizers, scaler, cfg["grad_clip"])
    return loss


def evaluate_and_checkpoint(
    raw_model: GPT,
    optimizers: dict,
    data_generator: torch.Generator,
    tokenizer: dict,
    cfg: dict,
    paths: dict,
    device: str,
    autocast,
    iter_num: int,
    best_val_loss: float,
    train_time: float,
    running_mfu: float,
    wandb=None,
) -> float:
    """Print (and log to wandb) both splits' losses, then save out_dir/ckpt.pt when the val loss
    improved or always_save_checkpoint (never at iteration 0 or with eval_only). Returns the best
    val loss."""
    losses = estimate_loss(raw_model, cfg, paths, device, autocast)
    train_loss, val_loss = losses["train"], losses["val"]
    print(f"step {iter_num}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, {train_time:.1f}s of training")
    if wandb is not None:
        wandb.log({"iter": iter_num, "train/loss": train_loss, "val/loss": val_loss, "mfu": running_mfu * 100})
    if val_loss < best_val_loss or cfg["always_save_checkpoint"]:
        best_val_loss = min(best_val_loss, val_loss)
        if iter_num > 0 and not cfg["eval_only"]:
            ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
            checkpoint = {
                "model": raw_model.state_dict(),
                "optimizer": {name: o.state_dict() for name, o in optimizers.items()},
                "model_args": asdict(raw_model.config),
                "iter_num": iter_num,
                "best_val_loss": best_val_loss,
                "config": cfg,
                "rng": rng_state(data_generator, device),
                "tokenizer": tokenizer,
            }
            save_checkpoint(ckpt_path, checkpoint)
            print(f"saved checkpoint to {ckpt_path}")
    return best_val_loss


def init_wandb(cfg: dict):
    """The wandb module, its run started: online with WANDB_API_KEY set, else offline in out_dir."""
    import wandb

    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"], config=cfg, mode=mode, dir=cfg["out_dir"])
    return wandb


def main(argv: list[str]) -> None:
    try:
        cfg = setup(argv)
        paths = data_paths(cfg["dataset"], cfg["block_size"])
        ddp, rank, world, device = setup_ddp(cfg)
    except ValueError as e:
        sys.exit(f"error: {e}")
    master, device_type = rank == 0, device.split(":")[0]
    dtype = pick_dtype(cfg["dtype"], device_type, cfg["n_embd"])
    micro_steps = cfg["gradient_accumulation_steps"] // world
    tokens_per_iter = cfg["gradient_accumulation_steps"] * cfg["batch_size"] * cfg["block_size"]

    torch.manual_seed(cfg["seed"] + rank)  # dropout differs per process; data does not
    data_generator = torch.Generator().manual_seed(cfg["seed"])
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = autocast_for(device_type, dtype)

    tokenizer = tokenizer_spec(cfg["dataset"])
    try:
        model, checkpoint = init_model(cfg, vocab_size(tokenizer), os.path.join(cfg["out_dir"], "ckpt.pt"))
    except ValueError as e:
        sys.exit(f"error: {e}")
    iter_num, best_val_loss = (0, 1e9) if checkpoint is None else (checkpoint["iter_num"], checkpoint["best_val_loss"])
    model.to(device).train()
    optimizers = configure_optimizers(model, cfg, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    if checkpoint is not None:
        try:
            load_optimizer_state(optimizers, checkpoint["optimizer"], cfg)
        except ValueError as e:
            sys.exit(f"error: {e}")
        set_rng_state(checkpoint["rng"], data_generator, device)
        checkpoint = None  # free memory
    if master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        print(f"device {device}, dtype {dtype}, {world} process(es), {tokens_per_iter:,} tokens per iteration")
        print(f"model: {model.get_num_params() / 1e6:.2f}M parameters, pos_encoding={model.config.pos_encoding}")

    raw_model = model
    if cfg["compile"]:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)

    peak, peak_note = peak_flops(device, dtype)
    if master:
        print(f"MFU is measured against {peak / 1e12:.2f} TFLOP/s: {peak_note}")
    wandb = init_wandb(cfg) if cfg["wandb_log"] and master else None

    t0, iters_timed = time.time(), 0
    train_time, running_mfu = 0.0, -1.0  # seconds spent training this run, evaluations excluded
    t_step = time.time()
    while True:
        if iter_num % cfg["eval_interval"] == 0 or iter_num == cfg["max_iters"]:
            train_time += time.time() - t_step
            if master:
                best_val_loss = evaluate_and_checkpoint(
                    raw_model, optimizers, data_generator, tokenizer, cfg, paths, device, autocast,
                    iter_num, best_val_loss, train_time, running_mfu, wandb,
                )  # fmt: skip
            t_step = t0 = time.time()  # evaluation is not training time
            iters_timed = 0
        if iter_num >= cfg["max_iters"] or cfg["eval_only"]:
            break

        lr = get_lr(iter_num, cfg)
        set_lr(optimizers, lr, cfg)
        n = cfg["gradient_accumulation_steps"] * cfg["batch_size"]
        starts = sample_starts(paths["train"], n, cfg["block_size"], data_generator)
        mine = starts.view(world, micro_steps, cfg["batch_size"])[rank]
        loss = train_step(model, optimizers, scaler, paths["train"], mine, cfg, device, autocast)

        iters_timed += 1
        if iter_num % cfg["log_interval"] == 0 and master:
            lossf = loss.item() * micro_steps  # .item() waits for the device, so the time below is real
            t1 = time.time()
            dt = (t1 - t0) / iters_timed
            t0, iters_timed = t1, 0
            tok_s = tokens_per_iter / dt
            if iter_num >= 5 * cfg["log_interval"]:  # skip warm-up iterations
                mfu = estimate_mfu(raw_model, tok_s / world, peak)  # peak is one device's; tok_s is all processes'
                running_mfu = mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
            mfu_text = f"{running_mfu * 100:.2f}%" if running_mfu >= 0 else "n/a"
            print(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, {tok_s:,.0f} tok/s, mfu {mfu_text}")
        iter_num += 1

    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
