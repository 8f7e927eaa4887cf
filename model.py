"""The whole GPT in one file: a decoder-only transformer whose positional encoding is one switch.

pos_encoding names a positional module: "learned" (GPT-2's table: nanoGPT checkpoints load as
they are), "sinusoidal" (Vaswani et al. 2017), "rope" (rope.py), "alibi" (Press et al. 2021) or
"none" (NoPE). Each keeps one contract, PositionalEncoding: handed the tokens' Positions, it adds
its signal to the embeddings and fills in what attention needs (rotations, a bias or mask).
Adding an encoding is one subclass and one entry in POS_ENCODINGS.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn import functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from rope import ROPE_LAYOUTS, RotaryEmbedding, apply_rope, rot_dim_for

compiled_flex_attention = torch.compile(flex_attention)  # uncompiled, it runs an unfused reference
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}  # F.gelu's approximate= for each


@dataclass
class GPTConfig:
    block_size: int = 1024  # training context; the learned table's length
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # key/value heads, shared by groups of queries (GQA); None: n_head
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2
    activation: str = "gelu"  # the MLP's: "gelu" (exact) or "gelu_tanh" (GPT-2's approximation)
    parallel_residual: bool = False  # GPT-NeoX's x + attn(ln_1(x)) + mlp(ln_2(x))
    tie_embeddings: bool = True  # the output head shares the token embeddings (Press & Wolf 2017)
    pos_encoding: str = "rope"
    rope_base: float = 10000.0
    rope_fraction: float = 1.0  # share of each head's channels that RoPE rotates
    rope_layout: str = "half"
    rope_scaling: dict | None = None  # Hugging Face-style context extension (rope.py); its L defaults to block_size
    layer_types: str = "full_attention"  # per layer, cycled: full_attention, sliding_attention or chunked_attention
    sliding_window: int | None = None  # keys a sliding_attention layer's query sees, itself included
    attention_chunk_size: int | None = None  # the blocks a chunked_attention layer attends within
    attn_temperature_tuning: bool = False  # Llama 4's query scale at long positions, on the layers without RoPE
    floor_scale: int = 8192
    attn_scale: float = 0.1

    def __post_init__(self):
        self.n_kv_head = self.n_head if self.n_kv_head is None else self.n_kv_head
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_kv_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)!r} is not valid; valid: a whole number of at least 1")
        pe = repr(self.pos_encoding)
        for name, ok, valid in (
            ("pos_encoding", self.pos_encoding in POS_ENCODINGS, ", ".join(POS_ENCODINGS)),
            ("dropout", 0.0 <= self.dropout < 1.0, "a probability in [0, 1)"),
            ("n_embd", self.n_embd % self.n_head == 0, f"a multiple of n_head {self.n_head}"),
            ("n_kv_head", self.n_head % self.n_kv_head == 0, f"a divisor of n_head {self.n_head}"),
            ("activation", self.activation in ACTIVATIONS, ", ".join(ACTIVATIONS)),
            ("rope_layout", self.rope_layout in ROPE_LAYOUTS, ", ".join(ROPE_LAYOUTS)),
            ("rope_fraction", 0.0 < self.rope_fraction <= 1.0, "the share of each head that RoPE turns, in (0, 1]"),
            ("rope_scaling", self.rope_scaling is None or self.pos_encoding == "rope", f"None (pos_encoding is {pe})"),
        ):
            if not ok:
                raise ValueError(f"{name} {getattr(self, name)!r} is not valid; valid: {valid}")
        POS_ENCODINGS[self.pos_encoding](self)  # each encoding checks its own settings (RoPE's: rope.py)


def alibi_slopes(n_head: int) -> Tensor:
    """ALiBi's head slopes (Press et al. 2021, arXiv:2108.12409), float64, (n_head,). For n a power
    of two, the geometric sequence 2^(−8/n), 2^(−16/n), ..., 2^(−8). Otherwise, with k the largest
    power of two below n, the k slopes for k heads, then every other slope of the 2k recipe."""
    k = 2 ** math.floor(math.log2(n_head))
    slopes = [2.0 ** (-8.0 * (i + 1) / k) for i in range(k)] + [2.0 ** (-4.0 * (i + 1) / k) for i in range(0, 2 * k, 2)]
    return torch.tensor(slopes[:n_head], dtype=torch.float64)


def alibi_bias(slopes: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """The bias slope_h · (n − m) for the query at m and the key at n ≤ m, −inf for later keys: 0 on the
    diagonal, ≤ 0 elsewhere. q_pos (B, Tq) or (Tq,), k_pos likewise; float32 (B|1, nh, Tq, Tk)."""
    distance = (k_pos.unsqueeze(-2) - q_pos.unsqueeze(-1)).to(torch.float32).unsqueeze(-3)  # (..., 1, Tq, Tk), n − m
    bias = (slopes.to(torch.float32).view(-1, 1, 1) * distance).masked_fill(distance > 0, float("-inf"))
    return bias if bias.dim() == 4 else bias.unsqueeze(0)


def flex_alibi(slopes: Tensor, q_pos: Tensor | int, k_pos: Tensor | int) -> tuple:
    """alibi_bias for FlexAttention: (score_mod, block_mask), the score penalising distance (attention-gym#86
    had the sign flipped), the block mask causal, so blocks of future keys are skipped. q_pos: (Tq,) or
    (B, Tq) positions, or a length Tq for positions 0..Tq−1 (the kernel then reads none); k_pos likewise."""
    slopes = slopes.to(torch.float32)

    def at(pos, b, i):  # the position of token i of row b
        return i if not torch.is_tensor(pos) else pos[b, i] if pos.dim() == 2 else pos[i]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (at(k_pos, b, kv_idx) - at(q_pos, b, q_idx))

    def mask_mod(b, h, q_idx, kv_idx):
        return at(k_pos, b, kv_idx) <= at(q_pos, b, q_idx)

    rows = next((pos.size(0) for pos in (q_pos, k_pos) if torch.is_tensor(pos) and pos.dim() == 2), None)
    Tq, Tk = (pos.size(-1) if torch.is_tensor(pos) else pos for pos in (q_pos, k_pos))
    return score_mod, create_block_mask(mask_mod, rows, None, Tq, Tk, device=slopes.device)


def attention(q, k, v, mask=None, dropout_p: float = 0.0) -> Tensor:
    """softmax(q·kᵀ/√hs + mask)·v, (B, nh, Tq, hs). mask: None, causal over q and k alone (SDPA is_causal); a
    bool mask or bias (B|1, nh|1, Tq, Tk) (SDPA); or flex_alibi's pair (FlexAttention, compiled, no dropout)."""
    gqa = q.size(1) != k.size(1)  # k, v with fewer heads, each shared by a group of queries
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    if isinstance(mask, tuple):
        flex = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention
        return flex(q, k, v, score_mod=mask[0], block_mask=mask[1], enable_gqa=gqa)
    mask = mask if mask.dtype == torch.bool else mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)


@dataclass
class Positions:
    """Where a forward's tokens sit (GPT.locate), then what attention needs (the positional module)."""

    query: Tensor  # the tokens' positions, (T,) or (B, T); against a cache (B, T), padding at 0
    last: int | None  # the largest; None under torch.compile, which never reads it, so shapes stay static
    given: bool  # whether the caller gave them (else 0..T−1)
    slots: Tensor | None = None  # against a cache: the slots the tokens' keys go to, (B, T)
    keys: Tensor | None = None  # against a cache: the positions of the keys attention reads, (S,)
    keys_rotated: bool = True  # whether the cache keeps RoPE keys rotated (else they are turned as read)
    mask: Tensor | tuple | None = None  # as attention() takes it
    rotation: tuple[Tensor, Tensor] | None = None  # RoPE's (cos, sin) at the queries' positions
    key_rotation: tuple[Tensor, Tensor] | None = None  # and at the keys', when the cache keeps them unrotated
    layout: str = "half"

    def rotate(self, qk: Tensor, n_query: int) -> tuple[Tensor, Tensor]:
        """Queries and new keys as one (B, heads, T, hs) tensor, turned at their positions: (q, k)."""
        if self.rotation is None:
            return qk.split(n_query, dim=1)
        if self.key_rotation is None:  # queries and keys in one apply: half the small ops of two
            return apply_rope(qk, *self.rotation, self.layout).split(n_query, dim=1)
        q, k = qk.split(n_query, dim=1)
        return apply_rope(q, *self.rotation, self.layout), k

    def rotate_keys(self, k: Tensor) -> Tensor:
        return k if self.key_rotation is None else apply_rope(k, *self.key_rotation, self.layout)


class PositionalEncoding(nn.Module):
    """The contract: forward(x, pos) is the embeddings x (B, T, C) with the encoding added, attend(pos) is pos
    with what attention needs; for sample.py, max_positions, relative (distances only: a window keeps its
    meaning), length_dependent and changes_between (RoPE variants that follow the length). As it is: NoPE."""

    max_positions: int | None = None
    relative: bool = False
    length_dependent: bool = False

    def __init__(self, config: GPTConfig | None = None):
        super().__init__()

    def forward(self, x: Tensor, pos: Positions) -> Tensor:
        return x

    def attend(self, pos: Positions) -> Positions:
        # against a cache, causal by slot (is_causal aligns top-left: pytorch/pytorch#108108); padding sees all: no NaN
        return pos if pos.slots is None else replace(pos, mask=pos.keys <= pos.slots[:, None, :, None])  # (B,1,T,S)

    def changes_between(self, old_len: int, new_len: int) -> bool:
        return False


class Learned(PositionalEncoding):
    """A trained table of block_size position vectors (GPT-2), saved as transformer.wpe.weight."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.block_size, config.n_embd))
        self.max_positions = config.block_size

    def forward(self, x: Tensor, pos: Positions) -> Tensor:
        if pos.last is not None and pos.last >= self.max_positions:  # a one-line error, not an IndexError
            raise ValueError(
                f"position {pos.last} is past the learned table; valid: below block_size {self.max_positions}"
            )
        return x + F.embedding(pos.query, self.weight)


class Sinusoidal(PositionalEncoding):
    """Vaswani et al.'s table over √n_embd (they scale tied embeddings by √d instead; BENCHMARKS.md)."""

    @staticmethod
    def table(positions: Tensor, dim: int) -> Tensor:
        """PE(m, 2i) = sin(m / 10000^(2i/dim)), PE(m, 2i+1) = cos(same), in float64: float32 (..., dim)."""
        exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim
        angles = positions.to(torch.float64).unsqueeze(-1) / 10000.0**exponents
        return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[..., :dim].to(torch.float32)

    def forward(self, x: Tensor, pos: Positions) -> Tensor:
        return x + (self.table(pos.query, x.size(-1)) / math.sqrt(x.size(-1))).to(x.dtype)


class RoPE(PositionalEncoding):
    """Queries and keys rotated by their positions (rope.py); cos/sin built per forward."""

    relative = True

    def __init__(self, config: GPTConfig):
        super().__init__()
        rot_dim = rot_dim_for(config.n_embd // config.n_head, config.rope_fraction)
        self.rotary = RotaryEmbedding(rot_dim, config.rope_base, config.rope_scaling, config.block_size)
        self.layout, self.length_dependent = config.rope_layout, self.rotary.length_dependent
        self.changes_between = self.rotary.changes_between

    def attend(self, pos: Positions) -> Positions:
        seq_len = None if pos.last is None else pos.last + 1  # a length-dependent variant's, for every row and key
        cos, sin = self.rotary(pos.query, seq_len)  # (..., T, d/2)
        if pos.query.dim() == 2:  # (B, T, d/2) -> (B, 1, T, d/2), to broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        keys = None if pos.slots is None or pos.keys_rotated else self.rotary(pos.keys, seq_len)  # (S, d/2)
        return replace(super().attend(pos), rotation=(cos, sin), key_rotation=keys, layout=self.layout)


class ALiBi(PositionalEncoding):
    """A per-head linear distance penalty on the scores: a dense bias, or FlexAttention on CUDA."""

    relative = True
    flex_devices = ("cuda",)  # not the CPU: no FlexAttention backward there, and SDPA is faster (BENCHMARKS.md)

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.register_buffer("slopes", alibi_slopes(config.n_head), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.slopes = alibi_slopes(self.n_head).to(self.slopes.device)  # exact again after model.half()
        return self

    def on_flex(self, device: torch.device) -> bool:
        """On flex_devices, unless training with dropout, which FlexAttention lacks."""
        return device.type in self.flex_devices and not (self.training and self.dropout > 0)

    def attend(self, pos: Positions) -> Positions:
        cached = pos.slots is not None  # then by slot: a padding query sees every slot
        q_pos, k_pos = (pos.slots, pos.keys) if cached else (pos.query, pos.query)
        if not self.on_flex(q_pos.device):
            return replace(pos, mask=alibi_bias(self.slopes, q_pos, k_pos))  # (B|1, nh, T, S)
        if cached or not pos.given:  # a length n stands for positions 0..n−1: no lookups in the kernel
            q_pos, k_pos = q_pos if cached else q_pos.numel(), k_pos.numel()
        return replace(pos, mask=flex_alibi(self.slopes, q_pos, k_pos))


POS_ENCODINGS = {"learned": Learned, "sinusoidal": Sinusoidal, "rope": RoPE, "alibi": ALiBi, "none": PositionalEncoding}


class KVCache:
    """Static keys and values of every layer (gpt-fast's): the token at position m of row b lives in slot m,
    padding in the spare slot max_len. keys_rotated: RoPE keys kept rotated, or turned as read (sample.py's
    sinks move keys). One tensor a layer, marked static for compiled steps and CUDA graphs."""

    def __init__(self, config, batch_size: int, max_len: int, dtype=torch.float32, device=None, keys_rotated=True):
        shape = (batch_size, config.n_kv_head, max_len + 1, config.n_embd // config.n_head)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        for buf in self.k + self.v:
            torch._dynamo.mark_static_address(buf)
        self.rows = torch.arange(batch_size, device=device)[:, None]  # (B, 1)
        self.max_len, self.keys_rotated, self.dtype = max_len, keys_rotated, dtype

    def update(self, layer: int, slots: Tensor, k: Tensor, v: Tensor, n_keys: int):
        """Write k, v (B, n_kv, T, hs) at slots (B, T); return the layer's first n_keys slots of each."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        k_cache[self.rows, :, slots] = k.transpose(1, 2).to(self.dtype)  # indexing: a CPU bf16 scatter_ copies all
        v_cache[self.rows, :, slots] = v.transpose(1, 2).to(self.dtype)
        return k_cache[:, :, :n_keys], v_cache[:, :, :n_keys]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.hs = config.n_head, config.n_kv_head, config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.hs, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout, self.layer_idx = config.dropout, layer_idx

    def forward(self, x: Tensor, pos: Positions, cache: KVCache | None = None) -> Tensor:
        B, T, C = x.size()
        qk, v = self.c_attn(x).split([C + self.n_kv_head * self.hs, self.n_kv_head * self.hs], dim=2)  # rows q, k, v
        qk = qk.view(B, T, self.n_head + self.n_kv_head, self.hs).transpose(1, 2)  # (B, nh + n_kv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, n_kv, T, hs)
        q, k = pos.rotate(qk, self.n_head)  # (B, nh, T, hs), (B, n_kv, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer_idx, pos.slots, k, v, pos.keys.numel())  # (B, n_kv, S, hs)
            k = pos.rotate_keys(k)
        # attention runs in the cache's dtype; y returns to the queries' (under autocast x is float32)
        y = attention(q.to(k.dtype), k, v, pos.mask, self.dropout if self.training else 0.0).to(q.dtype)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.approximate = ACTIVATIONS[config.activation]

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.parallel = config.parallel_residual

    def forward(self, x: Tensor, pos: Positions, cache: KVCache | None = None) -> Tensor:
        if self.parallel:  # GPT-NeoX: both branches read the block's input
            return x + self.attn(self.ln_1(x), pos, cache) + self.mlp(self.ln_2(x))
        x = x + self.attn(self.ln_1(x), pos, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
                wpe=POS_ENCODINGS[config.pos_encoding](config),  # the positional module, by GPT-2's name
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)
        if isinstance(module, (nn.Linear, nn.Embedding, Learned)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameters, less the position table by default (token embeddings count: they are tied)."""
        table = sum(p.numel() for p in self.transformer.wpe.parameters()) if non_embedding else 0
        return sum(p.numel() for p in self.parameters()) - table

    def forward(self, idx: Tensor, targets: Tensor | None = None, positions: Tensor | None = None, cache=None):
        """idx, targets: (B, T) token ids (targets −1 ignored); positions: (T,) or (B, T), by default 0..T−1,
        negative for padding. cache: a KVCache to extend and attend to, so that a prefill, a chunk and
        a decode step are one call. Returns (logits (B, T, vocab), loss or None)."""
        pos = self.transformer.wpe.attend(self.locate(idx, positions, cache))  # where tokens sit, what attention needs
        x = self.transformer.drop(self.transformer.wpe(self.transformer.wte(idx), pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, pos, cache)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)

    def locate(self, idx: Tensor, positions: Tensor | None, cache: KVCache | None) -> Positions:
        """The Positions of idx's tokens: given or 0..T−1, and with a cache the slots they fill."""
        B, T = idx.size()
        given = positions is not None
        positions = positions if given else torch.arange(T, device=idx.device)
        # read from the device once; not when compiled with given positions, so that shapes stay static
        last = T - 1 if not given else None if torch.compiler.is_compiling() else int(positions.max())
        if cache is None:
            return Positions(positions, last, given)
        if last is not None and last >= cache.max_len:
            raise ValueError(f"position {last} is past the KV cache's {cache.max_len} slots; valid: fewer tokens")
        positions = positions.expand(B, T)
        slots = torch.where(positions < 0, cache.max_len, positions)  # (B, T): padding to the spare slot
        # a key's position is its slot; read up to the last position (at least one), or all slots when compiled
        keys = torch.arange(cache.max_len + 1 if last is None else max(last + 1, 1), device=idx.device)  # (S,)
        return Positions(positions.clamp(min=0), last, given, slots, keys, cache.keys_rotated)
