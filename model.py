"""The whole GPT in one file: a decoder-only transformer whose positional encoding is one switch.

pos_encoding:
- "learned":    a trained table of block_size vectors added to the token embeddings (GPT-2, and
                nanoGPT's GPT parameter for parameter, so nanoGPT checkpoints load unchanged);
- "sinusoidal": the fixed sin/cos table of Vaswani et al. 2017, divided by √n_embd (their
                embeddings-to-table ratio), added to the token embeddings;
- "rope":       queries and keys rotated by position inside attention (rope.py);
- "alibi":      a per-head linear distance penalty on the attention scores, Press et al. 2021;
- "none":       no positional signal (NoPE); causal masking alone leaks some order.

Positions are always explicit: forward() takes optional `positions`, so a KV cache, left
padding or evaluation at an offset is only a matter of passing the right numbers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Iterator

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from rope import (ROPE_LAYOUTS, RotaryEmbedding, apply_rope, complete_rope_scaling, rope_frequencies,
                  rotary_dim, uses_fused_rope)

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
    rope_scaling: dict | None = None  # Hugging Face-style context extension (rope.py); its L defaults to block_size

    def __post_init__(self):
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"unknown pos_encoding {self.pos_encoding!r}; valid: {', '.join(POS_ENCODINGS)}")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} is not valid; valid: a whole number of at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout} is not valid; valid: a probability in [0, 1)")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}; valid: a multiple of n_head")
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"unknown rope_layout {self.rope_layout!r}; valid: {', '.join(ROPE_LAYOUTS)}")
        if self.pos_encoding == "rope":
            dim = rotary_dim(self.n_embd // self.n_head, self.rope_fraction)
            rope_frequencies(dim, self.rope_base, complete_rope_scaling(self.rope_scaling, self.block_size))  # validates
        elif self.rope_scaling is not None:
            raise ValueError(f"rope_scaling is set but pos_encoding is {self.pos_encoding!r}; valid: pos_encoding='rope', or rope_scaling=None")


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
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[..., :dim].to(torch.float32)  # odd dim: drop the last cos


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """True where the query at position m may attend to the key at position n: n ≤ m.

    Written out because SDPA's is_causal=True aligns its mask top-left (query i sees keys 0..i),
    which is wrong whenever there are fewer queries than keys, as in chunked prefill and decode
    against a KV cache (pytorch/pytorch#108108): there query i sits at position offset + i.
    Elementwise on broadcastable tensors, so it serves a dense mask (q_pos (..., Tq, 1) against
    k_pos (..., 1, Tk)) and a FlexAttention mask_mod (scalars) alike.
    """
    return k_pos <= q_pos


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Additive attention bias slope_h · (n − m) for query position m and key position n ≤ m,
    and −inf for keys ahead of the query (the causal mask). Zero on the diagonal, ≤ 0 elsewhere.

    slopes: (nh,); q_pos: (B, Tq) or (Tq,); k_pos: (B, Tk) or (Tk,). Returns float32 (B|1, nh, Tq, Tk).
    """
    q_pos, k_pos = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)  # (..., Tq, 1), (..., 1, Tk)
    distance = (k_pos - q_pos).to(torch.float32)  # (..., Tq, Tk)
    visible = causal_mask(q_pos, k_pos)
    if distance.dim() == 2:
        distance, visible = distance.unsqueeze(0), visible.unsqueeze(0)
    bias = slopes.to(torch.float32).view(1, -1, 1, 1) * distance.unsqueeze(1)
    return bias.masked_fill(~visible.unsqueeze(1), float("-inf"))


FLEX_ALIBI_DEVICES = ("cuda",)
# Where ALiBi runs on FlexAttention. Not the CPU: there FlexAttention has no backward (torch 2.13),
# and its compiled forward took 1.6-2.5x the time of SDPA with a dense bias at nanoGPT's CPU shape
# (batch 12, 4 heads of 32, 64 tokens), and 0.55-1.55x at 1,024 tokens depending on the heads,
# after seconds of compilation per new shape. bench.py attention measures both.


def flex_alibi(slopes: torch.Tensor, q_pos: torch.Tensor | int, k_pos: torch.Tensor | int) -> tuple:
    """ALiBi for FlexAttention: (score_mod, block_mask), alibi_bias without the dense tensor.

    score_mod adds slope_h · (n − m) for the query at position m and the key at position n: ≤ 0,
    zero on the diagonal (attention-gym#86 once had the sign flipped, rewarding distance). The
    block mask is causal_mask, so FlexAttention skips blocks of keys wholly in the future.
    slopes: (nh,); q_pos: (Tq,) or (B, Tq) integer positions, or a length Tq for positions
    0..Tq−1 (the kernel then reads no positions); k_pos likewise.
    """
    slopes = slopes.to(torch.float32)

    def at(pos, b, i):  # the position of token i of row b
        if not torch.is_tensor(pos):
            return i
        return pos[b, i] if pos.dim() == 2 else pos[i]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (at(k_pos, b, kv_idx) - at(q_pos, b, q_idx))

    def mask_mod(b, h, q_idx, kv_idx):
        return causal_mask(at(q_pos, b, q_idx), at(k_pos, b, kv_idx))

    rows = next((pos.size(0) for pos in (q_pos, k_pos) if torch.is_tensor(pos) and pos.dim() == 2), None)  # None: alike
    Tq, Tk = (pos.size(-1) if torch.is_tensor(pos) else pos for pos in (q_pos, k_pos))
    return score_mod, create_block_mask(mask_mod, rows, None, Tq, Tk, device=slopes.device)


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled once: uncompiled it runs an unfused reference implementation."""
    return torch.compile(flex_attention)


def attention(q, k, v, mask=None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q·kᵀ/√hs + mask)·v on a fused kernel, (B, nh, Tq, hs). mask is one of:
    - None: causal over q and k alone: SDPA with is_causal (flash kernels on CUDA and the CPU);
    - a tensor (B|1, nh|1, Tq, Tk): a bool mask or an additive bias such as alibi_bias: SDPA;
    - (score_mod, block_mask), as flex_alibi returns: FlexAttention, compiled (no dropout).
    """
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if isinstance(mask, tuple):
        if dropout_p > 0:
            raise ValueError(f"FlexAttention has no dropout, got dropout_p={dropout_p}; "
                             "valid: 0, or a dense mask (alibi_bias)")
        score_mod, block_mask = mask
        flex = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention()  # a compiled model compiles it
        return flex(q, k, v, score_mod=score_mod, block_mask=block_mask)
    mask = mask if mask.dtype == torch.bool else mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


CACHE_POLICIES = ("full", "window", "sinks")  # what rope and alibi keep past block_size (GPT.generate)
CACHE_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)  # what a KVCache may hold


class KVCache:
    """Static keys and values of every layer, preallocated and indexed by position (as gpt-fast).

    The token at position m of row b lives in slot m of row b: a step writes its tokens' slots
    and attends to every slot at or below its own position (causal_mask), so slots not yet
    written are never read and the shapes never change. Rows of a batch each have their own
    positions (left padding). Slot max_len is spare: it takes the keys of padding tokens
    (negative positions), which no real token sees, while a padding query sees every slot, so
    no attention row is ever fully masked (no NaN).

    keys_rotated: RoPE keys are stored rotated (a key keeps its position: the fast path), or as
    computed and rotated at every read, when evict() moves keys to new positions.

    dtype: the model's for exact decoding; bfloat16 under a float32 model halves the cache and
    the bytes a decode step reads at long contexts, and attention over it then runs in bf16.

    k, v: one tensor per layer, (B, nh, max_len + 1, hs) each. Separate tensors, not views of
    one (n_layer, ...) buffer: a compiled decode step then writes its graph inputs in place,
    where writes into views of one buffer made inductor copy the whole buffer at every step.
    They are marked static addresses so that CUDA graphs (compile on CUDA) keep them.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, keys_rotated: bool = True,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        shape = (batch_size, config.n_head, max_len + 1, config.n_embd // config.n_head)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        for buf in self.k + self.v:
            torch._dynamo.mark_static_address(buf)
        self.rows = torch.arange(batch_size, device=device)[:, None]  # (B, 1)
        self.max_len, self.keys_rotated = max_len, keys_rotated
        self.dtype, self.device = dtype, self.rows.device

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_keys: int):
        """Write k, v (B, nh, T, hs) at slots (B, T), in the cache's dtype; return the layer's first
        n_keys slots of keys and values (B, nh, n_keys, hs)."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        # indexing, not scatter_: on the CPU a bf16 scatter_ copies the whole buffer at every call
        k_cache[self.rows, :, slots] = k.transpose(1, 2).to(self.dtype)  # (B, T, nh, hs) at [b, :, slot]
        v_cache[self.rows, :, slots] = v.transpose(1, 2).to(self.dtype)
        return k_cache[:, :, :n_keys], v_cache[:, :, :n_keys]

    def evict(self, rows: torch.Tensor, n_sink: int) -> None:
        """StreamingLLM's step once a row is full: drop its oldest key after the n_sink sinks and
        move the later ones down a slot, which frees slot max_len − 1. rows: (R,) long."""
        for buf in self.k + self.v:
            # buf[rows] is a copy (advanced indexing), so the overlapping move needs no clone
            buf[rows, :, n_sink : self.max_len - 1] = buf[rows, :, n_sink + 1 : self.max_len]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.rope_layout = config.rope_layout
        self.layer_idx = layer_idx  # which of a KVCache's layers is this one's

    def forward(self, x, rope_cos_sin=None, attn_bias=None, cache: KVCache | None = None, slots=None,
                n_keys: int = 0, key_cos_sin=None):
        """Without a cache, causal attention over x alone (attn_bias: ALiBi's, or None for is_causal).

        With a cache, the new keys and values are written at slots (B, T) and the queries attend
        to the first n_keys slots under attn_bias, an explicit mask by position (a bool mask, or
        ALiBi's bias with −inf): never is_causal, which would align it top-left. key_cos_sin:
        RoPE's cos/sin for the n_keys slots when the cache keeps keys unrotated (keys_rotated False).
        attn_bias may also be ALiBi for FlexAttention (flex_alibi); see attention().
        """
        B, T, C = x.size()
        qk, v = self.c_attn(x).split([2 * C, C], dim=2)
        qk = qk.view(B, T, 2 * self.n_head, C // self.n_head).transpose(1, 2)  # (B, 2nh, T, hs): queries, then keys
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if rope_cos_sin is not None and key_cos_sin is None:
            # queries and keys turned as one tensor of 2·nh heads: half the small ops of two calls
            # (what a CPU decode step pays for RoPE), one kernel on CUDA
            qk = apply_rope(qk, *rope_cos_sin, self.rope_layout)
        q, k = qk.split(self.n_head, dim=1)  # (B, nh, T, hs) each
        if key_cos_sin is not None:
            q = apply_rope(q, *rope_cos_sin, self.rope_layout)
        if cache is not None:
            k, v = cache.update(self.layer_idx, slots, k, v, n_keys)  # (B, nh, S, hs)
            if key_cos_sin is not None:
                k = apply_rope(k, *key_cos_sin, self.rope_layout)
        # a cache may keep another dtype than the queries (generate's cache_dtype): attention runs
        # in it, and y returns to the queries' dtype (not x's: under autocast x is float32)
        y = attention(q.to(k.dtype), k, v, attn_bias, self.dropout if self.training else 0.0).to(q.dtype)
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
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope_cos_sin=None, attn_bias=None, cache=None, slots=None, n_keys=0, key_cos_sin=None):
        x = x + self.attn(self.ln_1(x), rope_cos_sin, attn_bias, cache, slots, n_keys, key_cos_sin)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
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
                rotary_dim(head_dim, config.rope_fraction), config.rope_base, config.rope_scaling, config.block_size
            )
        if config.pos_encoding == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(config.n_head), persistent=False)

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.config.pos_encoding == "alibi":  # fn may have cast the slopes (model.half()): rebuild them exactly
            self.alibi_slopes = alibi_slopes(self.config.n_head).to(self.alibi_slopes.device)
        return self

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

    def alibi_on_flex(self, device: torch.device) -> bool:
        """Whether ALiBi runs on FlexAttention: on FLEX_ALIBI_DEVICES, unless training with dropout,
        which FlexAttention lacks (SDPA with the dense bias then)."""
        return device.type in FLEX_ALIBI_DEVICES and not (self.training and self.config.dropout > 0)

    def attention_backend(self) -> str:
        """The kernels attention (and RoPE) run on at the model's device and mode, in words."""
        device, cfg = self.lm_head.weight.device, self.config
        if cfg.pos_encoding == "alibi" and self.alibi_on_flex(device):
            return "FlexAttention, compiled: ALiBi score_mod and causal block mask"
        if cfg.pos_encoding == "alibi":
            return "SDPA with a dense ALiBi bias"
        if cfg.pos_encoding == "rope":
            return "SDPA is_causal; RoPE " + ("fused Triton kernel" if uses_fused_rope(device) else "in PyTorch")
        return "SDPA is_causal"

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cache: KVCache | None = None):
        """idx: (B, T) token ids; targets: (B, T) or None; positions: (T,) or (B, T), default 0..T−1.

        Returns (logits (B, T, vocab), loss or None); targets equal to −1 are ignored.

        cache: a KVCache to extend and attend to (generation). Each token's keys and values go to
        the slot equal to its position, and it attends to the slots at or below its position, so
        a prefill, a chunk of any length after it, and a one-token decode step are the same call.
        A negative position marks a left-padding token: it goes to the spare slot and no real
        token sees it. A length-dependent RoPE (dynamic NTK) takes the length after this call,
        max(positions) + 1, for every row and every cached key.
        """
        B, T = idx.size()
        cfg = self.config
        given_positions = positions is not None
        if positions is None:
            positions = torch.arange(T, device=idx.device)
        # the last position, read from the device once for the checks and shapes below; not when
        # compiled with given positions, where the checks are skipped and shapes stay static
        last = T - 1 if not given_positions else None if torch.compiler.is_compiling() else int(positions.max())
        if cfg.pos_encoding == "learned" and last is not None and last >= cfg.block_size:
            if not given_positions:
                raise ValueError(f"sequence length {T} exceeds the learned position table (block_size "
                                 f"{cfg.block_size}); valid: at most {cfg.block_size} tokens")
            raise ValueError(f"position {last} is past the learned position table (block_size {cfg.block_size}); "
                             f"valid: positions below {cfg.block_size}")
        slots = key_slots = None
        n_keys = 0
        if cache is not None:
            # the slots that can be seen: those up to the last position (eager reads no empty
            # slots), or every slot when the last position is not read, so shapes stay static (gpt-fast)
            if last is not None and last >= cache.max_len:
                raise ValueError(f"position {last} is past the KV cache's {cache.max_len} slots; "
                                 f"valid: positions below {cache.max_len}")
            n_keys = cache.max_len + 1 if last is None else max(last + 1, 1)  # at least one: a chunk of padding alone
            positions = positions.expand(B, T)
            slots = torch.where(positions < 0, cache.max_len, positions)  # (B, T); padding to the spare slot
            positions = positions.clamp(min=0)
            key_slots = torch.arange(n_keys, device=idx.device)  # (S,): a key's slot is its position
        x = self.transformer.wte(idx)  # (B, T, C)
        if cfg.pos_encoding == "learned":
            x = x + self.transformer.wpe(positions)
        elif cfg.pos_encoding == "sinusoidal":
            # Vaswani et al. multiply the token embeddings by √d before adding the table; with
            # embeddings tied to lm_head we keep that ratio by dividing the table instead. Added
            # at full scale (amplitude 1 against GPT-2's 0.02 init) it drowns the tokens: val
            # 2.17 against 1.78 after 3,000 steps of the lab's text run, worse than no encoding
            x = x + (sinusoidal_embedding(positions, cfg.n_embd) / math.sqrt(cfg.n_embd)).to(x.dtype)
        rope_cos_sin = key_cos_sin = attn_bias = None
        if cfg.pos_encoding == "rope":
            # the length a length-dependent variant (dynamic NTK) scales to: the sequence's so far
            # (None when compiled: the rotary reads it from the positions then)
            seq_len = None if last is None else last + 1
            if cache is not None and not cache.keys_rotated:
                key_cos_sin = self.rotary(key_slots, seq_len)  # (S, d/2)
            rope_cos_sin = self.rotary(positions, seq_len)
            if positions.dim() == 2:  # (B, T, d/2) -> (B, 1, T, d/2), to broadcast over heads
                rope_cos_sin = tuple(t.unsqueeze(1) for t in rope_cos_sin)
        if cfg.pos_encoding == "alibi" and self.alibi_on_flex(idx.device):
            # a length n stands for positions 0..n−1 (default positions, a cache's slots): no lookups in the kernel
            q_pos = slots if cache is not None else positions if given_positions else T
            k_pos = key_slots.numel() if cache is not None else positions if given_positions else T
            attn_bias = flex_alibi(self.alibi_slopes, q_pos, k_pos)
        elif cfg.pos_encoding == "alibi":  # by slot with a cache: a padding query sees every slot
            q_pos, k_pos = (slots, key_slots) if cache is not None else (positions, positions)
            attn_bias = alibi_bias(self.alibi_slopes, q_pos, k_pos)  # (B|1, nh, T, S)
        elif cache is not None:
            attn_bias = causal_mask(slots[:, None, :, None], key_slots)  # (B, 1, T, S)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope_cos_sin, attn_bias, cache, slots, n_keys, key_cos_sin)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
        return logits, loss

    def generate(self, prompts: torch.Tensor | list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                 stop_token: int | None = None, cache: bool = True, cache_policy: str = "sinks",
                 window: int | None = None, n_sink: int = 4, cache_dtype: torch.dtype | None = None,
                 compile: bool = False, with_logits: bool = False) -> Iterator[torch.Tensor]:
        """Sample up to max_new_tokens tokens after each prompt, yielding every row's next token, (B, 1),
        or (token, the logits (B, V) it was drawn from) with_logits.

        prompts: a (B, T) tensor, or B lists of token ids of any lengths (left-padded together,
        each row then equal to generating its prompt alone). temperature (0: greedy), top_k,
        top_p and generator as in sample_next_token. A row ends at stop_token (end of text):
        it yields stop_token from then on, and generation ends once every row has ended.

        cache=True prefills a KVCache with the prompts, then feeds one token per step at its
        position; cache=False runs a full forward over each row's context at every step
        (nanoGPT's way), and draws the same tokens. Once a row has outgrown a window or sinks
        context the two part: cache=False recomputes the kept tokens alone (StreamingLLM's
        "sliding window with re-computation"), while the cache keeps each token's states as
        they were computed when it arrived, so its deeper layers still carry evicted tokens.
        cache_dtype: the cache's (KVCache), by default the model's; torch.bfloat16 under a
        float32 model trades exactness for half the cache's memory and bytes read per step.
        compile: decode steps run through torch.compile (gpt-fast's way: one graph whose shapes
        do not change from step to step, so each step attends to all of the cache's slots under
        the mask; on CUDA mode="reduce-overhead", which replays the step as a CUDA graph). The
        first step compiles (seconds), and a second cache length once more (compiled_decode_step);
        prefills stay eager. Not for a length-dependent RoPE, which reads the length at every step.
        It runs under torch.inference_mode: what it yields are inference tensors (clone() them
        outside it to use them in autograd).

        A row's context past block_size, by encoding:
        - learned: its table ends there, so the last block_size tokens at positions
          0..block_size−1, prefilled again at every step (nanoGPT's crop);
        - sinusoidal, none: no table, no limit: every token;
        - rope, alibi: by cache_policy. "full": every token. "window": the last `window`
          tokens (default block_size). "sinks": the first n_sink tokens and the last
          window − n_sink (StreamingLLM's attention sinks, Xiao et al. 2023, arXiv:2309.17453).
          Positions are taken within the window (the sinks keep 0..n_sink−1), so RoPE keys are
          cached unrotated and rotated when read. Nothing changes until a row outgrows the window.
        A prompt longer than its context starts from the context's tokens. A length-dependent
        RoPE (dynamic NTK) whose frequencies change with the length prefills the context again
        whenever they do: every layer's state of every earlier token depends on them, so only
        that keeps cached decoding equal to a full forward (in a batch, the longest row's
        length sets them for every row).
        """
        rows = prompts.tolist() if torch.is_tensor(prompts) else [list(map(int, p)) for p in prompts]
        if not rows or not all(rows):
            raise ValueError("generate got an empty prompt; valid: one or more prompts of at least one token each")
        outside = next((t for row in rows for t in row if not 0 <= t < self.config.vocab_size), None)
        if outside is not None:
            raise ValueError(f"prompt token {outside} is outside the vocabulary; "
                             f"valid: ids from 0 to {self.config.vocab_size - 1}")
        if (max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1)
                or not (top_p is None or 0 < top_p <= 1)):
            raise ValueError(f"max_new_tokens={max_new_tokens}, temperature={temperature}, top_k={top_k}, "
                             f"top_p={top_p}; valid: max_new_tokens ≥ 0, temperature ≥ 0, top_k ≥ 1 or None, "
                             "0 < top_p ≤ 1 or None")
        longest = max(map(len, rows)) + max_new_tokens
        capacity, n_sink, on_full = self.context_limits(longest, cache_policy, window, n_sink)
        cache_dtype = self.lm_head.weight.dtype if cache_dtype is None else cache_dtype
        if cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype {cache_dtype} is not valid; valid: None (the model's) or one of "
                             f"{', '.join(map(str, CACHE_DTYPES))}")
        if compile and not cache:
            raise ValueError("compile=True compiles the cached decode step, but cache=False; valid: cache=True")
        if compile and self.config.pos_encoding == "rope" and self.rotary.length_dependent:
            raise ValueError(f"compile=True with rope_scaling {self.config.rope_scaling}, whose frequencies "
                             "depend on the length; valid: compile=False, or a variant that does not (linear, "
                             "ntk, yarn, llama3)")
        return self._generate(rows, max_new_tokens, (temperature, top_k, top_p, generator), stop_token, cache,
                              capacity, n_sink, on_full, cache_dtype, compile, with_logits)

    def context_limits(self, longest: int, cache_policy: str = "sinks", window: int | None = None,
                       n_sink: int = 4) -> tuple[int, int, str | None]:
        """(capacity, n_sink, on_full) of generate's context for rows of at most `longest` tokens:
        how many tokens it holds, how many first tokens are kept as sinks, and what happens when a
        row has filled it: "evict" (window, sinks), "recompute" (learned's crop) or None (never full).
        """
        cfg = self.config
        if cache_policy not in CACHE_POLICIES:
            raise ValueError(f"unknown cache_policy {cache_policy!r}; valid: {', '.join(CACHE_POLICIES)}")
        window = cfg.block_size if window is None else window
        n_sink = n_sink if cache_policy == "sinks" else 0
        if not 0 <= n_sink < window:
            raise ValueError(f"window={window} with n_sink={n_sink}; valid: 0 ≤ n_sink < window")
        if cfg.pos_encoding == "learned":
            return cfg.block_size, 0, "recompute"
        if cfg.pos_encoding in ("rope", "alibi") and cache_policy != "full" and longest > window:
            return window, n_sink, "evict"
        return longest, 0, None

    @torch.inference_mode()  # no_grad that also skips version counters and view tracking: 6-8% of a CPU decode step
    def _generate(self, rows, max_new_tokens, sampling, stop_token, cache, capacity, n_sink, on_full, cache_dtype,
                  compile, with_logits):
        device = self.lm_head.weight.device
        done = torch.zeros(len(rows), 1, dtype=torch.bool, device=device)
        if cache:
            kv = KVCache(self.config, len(rows), capacity, on_full != "evict", cache_dtype, device)
            logits, lengths = self._prefill(kv, rows, capacity, n_sink)
            decode_step = self.compiled_decode_step() if compile else self
        for step in range(max_new_tokens):
            if not cache:
                contexts = (torch.tensor([kept_context(row, capacity, n_sink)], device=device) for row in rows)
                logits = torch.cat([self(idx)[0][:, -1] for idx in contexts])
            token = sample_next_token(logits, *sampling)  # (B, 1)
            if stop_token is not None:
                token = token.masked_fill(done, stop_token)
                done |= token == stop_token
            yield (token, logits) if with_logits else token
            if step == max_new_tokens - 1 or (stop_token is not None and bool(done.all())):  # a host read only when rows can end
                return
            for row, t in zip(rows, token.flatten().tolist()):
                row.append(t)
            if cache:
                logits, lengths = self._decode(kv, rows, lengths, token, capacity, n_sink, on_full, decode_step)

    def _prefill(self, kv: KVCache, rows: list[list[int]], capacity: int, n_sink: int):
        """Fill kv with every row's context, left-padded: returns (last logits (B, V), context lengths)."""
        contexts = [kept_context(row, capacity, n_sink) for row in rows]
        T = max(map(len, contexts))
        device = kv.device
        idx = torch.tensor([[0] * (T - len(c)) + c for c in contexts], device=device)
        positions = torch.tensor([list(range(len(c) - T, len(c))) for c in contexts], device=device)  # < 0: padding
        return self(idx, positions=positions, cache=kv)[0][:, -1], [len(c) for c in contexts]

    def _decode(self, kv: KVCache, rows, lengths, token, capacity, n_sink, on_full, step):
        """Feed every row's newest token (B, 1) at its position through step (self, or
        compiled_decode_step()): returns (logits (B, V), context lengths)."""
        new_lengths = [min(n + 1, capacity) for n in lengths]
        cropped = on_full == "recompute" and max(lengths) == capacity
        if cropped or self.rope_changes_with_length(max(lengths), max(new_lengths)):
            return self._prefill(kv, rows, capacity, n_sink)
        full = [b for b, n in enumerate(lengths) if n == capacity]
        if full:
            kv.evict(torch.tensor(full, device=token.device), n_sink)
        positions = torch.tensor(new_lengths, device=token.device).unsqueeze(1) - 1  # (B, 1)
        logits = step(token, positions=positions, cache=kv)[0][:, -1]
        # a CUDA graph's outputs are overwritten by its next replay: keep a copy of what is yielded
        return (logits if step is self else logits.clone()), new_lengths

    def compiled_decode_step(self) -> nn.Module:
        """This model under torch.compile for one-token decode steps against a KVCache: the whole
        step as one graph (fullgraph); on CUDA with mode="reduce-overhead" (CUDA graphs: one
        launch per step). The compiled code is cached with the forward's code, so later generate
        calls reuse it. Shapes are static at first; a call with another cache length or batch
        compiles once more with those sizes symbolic (torch.compile's automatic dynamic shapes),
        and that graph serves every size after it. dynamic=False would compile every new cache
        length anew and fail outright past torch._dynamo's recompile limit (8)."""
        mode = "reduce-overhead" if self.lm_head.weight.device.type == "cuda" else None
        return torch.compile(self, fullgraph=True, mode=mode)

    def rope_changes_with_length(self, old_len: int, new_len: int) -> bool:
        """Whether a length-dependent RoPE (dynamic NTK, LongRoPE) has other frequencies at new_len than at old_len."""
        if self.config.pos_encoding != "rope" or not self.rotary.length_dependent or old_len == new_len:
            return False
        r = self.rotary
        old, old_factor = rope_frequencies(r.dim, r.base, r.rope_scaling, old_len)
        new, new_factor = rope_frequencies(r.dim, r.base, r.rope_scaling, new_len)
        return old_factor != new_factor or not torch.equal(old, new)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on 2-D weights (matmuls, embeddings) only, not biases or norms."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # fused: one kernel per step; on the 2-core CPU it saves ~2 ms of a 30 ms step (BENCHMARKS.md)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))

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


def kept_context(tokens: list[int], capacity: int, n_sink: int = 0) -> list[int]:
    """The tokens a context of `capacity` tokens keeps: all of them while they fit, else the
    first n_sink and the most recent capacity − n_sink (n_sink = 0: a sliding window)."""
    if len(tokens) <= capacity:
        return tokens
    return tokens[:n_sink] + tokens[len(tokens) - capacity + n_sink :]


NANOGPT_POS_ENCODING = "learned"  # nanoGPT checkpoints carry no pos_encoding: they are GPT-2


def clean_state_dict(state_dict: dict) -> dict:
    """Strip torch.compile's `_orig_mod.` and DDP's `module.` prefixes, and nanoGPT's causal-mask
    buffers (`attn.bias`, saved only by its non-flash attention), so any such dict loads here."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(("_orig_mod.", "module.")):  # in any order: DDP(compile(m)) saves module._orig_mod.
            key = key.split(".", 1)[1]
        if not key.endswith(".attn.bias"):
            out[key] = value
    return out


def load_checkpoint(path: str, device: str = "cpu", rope_scaling: dict | None = None) -> tuple[GPT, dict]:
    """Load a ropegpt or nanoGPT ckpt.pt onto `device`; returns (model in eval mode, checkpoint dict).

    rope_scaling, if given, replaces the checkpoint's: a context-extension variant applied to a
    trained model (the frequencies are not weights, so nothing else changes). Raises ValueError
    with a one-line message when the file is missing, unreadable or not a GPT checkpoint.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path!r} does not exist; valid: the path of a ckpt.pt (train.py writes out_dir/ckpt.pt)") from None
    except Exception as e:  # torch raises many kinds for a truncated or foreign file
        raise ValueError(f"checkpoint {path!r} is not a readable torch checkpoint ({type(e).__name__}); "
                         "valid: a ckpt.pt from train.py or nanoGPT") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_args" not in checkpoint:
        raise ValueError(f"checkpoint {path!r} holds no 'model' and 'model_args'; valid: a ckpt.pt from train.py or nanoGPT")
    model_args = dict(checkpoint["model_args"])
    model_args.setdefault("pos_encoding", NANOGPT_POS_ENCODING)
    if rope_scaling is not None:
        model_args["rope_scaling"] = rope_scaling
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
