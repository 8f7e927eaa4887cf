"""The whole GPT in one file: a decoder-only transformer whose positional encoding is one switch.

pos_encoding:
- "learned":    a trained table of block_size vectors added to the token embeddings (GPT-2, and
                nanoGPT's GPT parameter for parameter, so nanoGPT checkpoints load unchanged);
- "sinusoidal": the fixed sin/cos table of Vaswani et al. 2017 added to the token embeddings;
- "rope":       queries and keys rotated by position inside attention (rope.py);
- "alibi":      a per-head linear distance penalty on the attention scores, Press et al. 2021;
- "none":       no positional signal (NoPE); causal masking alone leaks some order.

Positions are always explicit: forward() takes optional `positions`, so a KV cache, left
padding or evaluation at an offset is only a matter of passing the right numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

from rope import ROPE_LAYOUTS, RotaryEmbedding, apply_rope, rope_frequencies, rotary_dim

POS_ENCODINGS = ("learned", "sinusoidal", "rope", "alibi", "none")


@dataclass
class GPTConfig:
    block_size: int = 1024  # training context; the learned table's length
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2
    pos_encoding: str = "rope"
    rope_base: float = 10000.0
    rope_fraction: float = 1.0  # share of each head's channels that RoPE rotates
    rope_layout: str = "half"
    rope_scaling: dict | None = None  # Hugging Face-style context-extension settings

    def __post_init__(self):
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"unknown pos_encoding {self.pos_encoding!r}; valid: {', '.join(POS_ENCODINGS)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"unknown rope_layout {self.rope_layout!r}; valid: {', '.join(ROPE_LAYOUTS)}")
        if self.pos_encoding == "rope":
            rotary_dim(self.n_embd // self.n_head, self.rope_fraction)
            rope_frequencies(2, self.rope_base, self.rope_scaling)  # validates rope_scaling


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's head slopes (Press et al. 2021, arXiv:2108.12409), float64, shape (n_head,).

    For n a power of two the slopes are the geometric sequence 2^(−8/n), 2^(−16/n), ..., 2^(−8).
    Otherwise, with k the largest power of two below n, the paper's recipe takes the k slopes for
    k heads and then every other slope of the 2k recipe, until there are n.
    """

    def power_of_two_slopes(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    k = 2 ** math.floor(math.log2(n_head))
    slopes = power_of_two_slopes(k) + power_of_two_slopes(2 * k)[0::2][: n_head - k]
    return torch.tensor(slopes, dtype=torch.float64)


def sinusoidal_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al.'s table: PE(m, 2i) = sin(m / 10000^(2i/dim)), PE(m, 2i+1) = cos(same).

    positions: integer tensor (...,); returns float32 (..., dim), computed in float64.
    """
    angles = positions.to(torch.float64).unsqueeze(-1) / 10000.0 ** (
        torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim
    )
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2).to(torch.float32)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Additive attention bias slope_h · (n − m) for query position m and key position n ≤ m,
    and −inf for keys ahead of the query (the causal mask). Zero on the diagonal, ≤ 0 elsewhere.

    slopes: (nh,); q_pos: (B, Tq) or (Tq,); k_pos: (B, Tk) or (Tk,). Returns float32 (B|1, nh, Tq, Tk).
    """
    distance = (k_pos.unsqueeze(-2) - q_pos.unsqueeze(-1)).to(torch.float32)  # (..., Tq, Tk)
    if distance.dim() == 2:
        distance = distance.unsqueeze(0)
    bias = slopes.to(torch.float32).view(1, -1, 1, 1) * distance.unsqueeze(1)
    return bias.masked_fill(distance.unsqueeze(1) > 0, float("-inf"))


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.rope_layout = config.rope_layout

    def forward(self, x, rope_cos_sin=None, attn_bias=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if rope_cos_sin is not None:
            q = apply_rope(q, *rope_cos_sin, self.rope_layout)
            k = apply_rope(k, *rope_cos_sin, self.rope_layout)
        dropout_p = self.dropout if self.training else 0.0
        if attn_bias is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype), dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope_cos_sin=None, attn_bias=None):
        x = x + self.attn(self.ln_1(x), rope_cos_sin, attn_bias)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        )
        if config.pos_encoding == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017)
        if config.pos_encoding == "rope":
            head_dim = config.n_embd // config.n_head
            self.rotary = RotaryEmbedding(
                rotary_dim(head_dim, config.rope_fraction), config.rope_base, config.rope_scaling
            )
        if config.pos_encoding == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(config.n_head), persistent=False)

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameters, less the position table by default (token embeddings count: they are tied)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, positions: torch.Tensor | None = None):
        """idx: (B, T) token ids; targets: (B, T) or None; positions: (T,) or (B, T), default 0..T−1.

        Returns (logits (B, T, vocab), loss or None); targets equal to −1 are ignored.
        """
        B, T = idx.size()
        cfg = self.config
        if positions is None:
            if cfg.pos_encoding == "learned" and T > cfg.block_size:
                raise ValueError(
                    f"sequence length {T} exceeds the learned position table (block_size {cfg.block_size}); "
                    f"valid: at most {cfg.block_size} tokens"
                )
            positions = torch.arange(T, device=idx.device)
        elif cfg.pos_encoding == "learned" and not torch.compiler.is_compiling() and int(positions.max()) >= cfg.block_size:
            raise ValueError(
                f"position {int(positions.max())} is past the learned position table (block_size {cfg.block_size}); "
                f"valid: positions below {cfg.block_size}"
            )
        x = self.transformer.wte(idx)  # (B, T, C)
        if cfg.pos_encoding == "learned":
            x = x + self.transformer.wpe(positions)
        elif cfg.pos_encoding == "sinusoidal":
            x = x + sinusoidal_embedding(positions, cfg.n_embd).to(x.dtype)
        rope_cos_sin = self.rotary(positions, T) if cfg.pos_encoding == "rope" else None
        attn_bias = alibi_bias(self.alibi_slopes, positions, positions) if cfg.pos_encoding == "alibi" else None
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope_cos_sin, attn_bias)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None):
        """Yield (B, 1) next tokens one at a time, recomputing the whole context at each step.

        A learned table cannot reach past block_size, so its context is cropped to the last
        block_size tokens (nanoGPT's behaviour); the other encodings keep the whole context.
        """
        for _ in range(max_new_tokens):
            if self.config.pos_encoding == "learned" and idx.size(1) > self.config.block_size:
                idx = idx[:, -self.config.block_size :]
            logits, _ = self(idx)
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)
            idx = torch.cat((idx, next_token), dim=1)
            yield next_token

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on 2-D weights (matmuls, embeddings) only, not biases or norms."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type == "cuda"
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float) -> float:
        """Model FLOPs utilisation: 6N + 12·L·H·Q·T FLOPs per token (PaLM appendix B) over the peak."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * self.get_num_params() + 12 * L * H * Q * T
        return flops_per_token * tokens_per_second / peak_flops


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from (B, vocab) logits; temperature 0 is greedy (argmax).

    top_k keeps the k most likely tokens; top_p keeps the smallest set whose probability
    reaches p (nucleus sampling, Holtzman et al. 2019), always at least the most likely token.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already reaches p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


NANOGPT_POS_ENCODING = "learned"  # nanoGPT checkpoints carry no pos_encoding: they are GPT-2


def clean_state_dict(state_dict: dict) -> dict:
    """Strip torch.compile's `_orig_mod.` and DDP's `module.` prefixes, and nanoGPT's causal-mask
    buffers (`attn.bias`, saved only by its non-flash attention), so any such dict loads here."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        if not key.endswith(".attn.bias"):
            out[key] = value
    return out


def load_checkpoint(path: str, device: str = "cpu") -> tuple[GPT, dict]:
    """Load a ropegpt or nanoGPT ckpt.pt onto `device`; returns (model in eval mode, checkpoint dict).

    Raises ValueError with a one-line message when the file is missing, unreadable or not a GPT
    checkpoint.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path!r} does not exist") from None
    except Exception as e:  # torch raises many kinds for a truncated or foreign file
        raise ValueError(f"checkpoint {path!r} is not a readable torch checkpoint ({type(e).__name__})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_args" not in checkpoint:
        raise ValueError(f"checkpoint {path!r} holds no 'model' and 'model_args'; valid: a ckpt.pt from train.py or nanoGPT")
    model_args = dict(checkpoint["model_args"])
    model_args.setdefault("pos_encoding", NANOGPT_POS_ENCODING)
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(model_args) - known)
    if unknown:
        raise ValueError(f"checkpoint {path!r} has unknown model_args {unknown}; valid: {', '.join(sorted(known))}")
    model = GPT(GPTConfig(**model_args))
    try:
        model.load_state_dict(clean_state_dict(checkpoint["model"]))
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ValueError(f"checkpoint {path!r} does not match its model_args: {' '.join(first[:2])}") from None
    return model.to(device).eval(), checkpoint
