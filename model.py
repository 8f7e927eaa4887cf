"""The whole GPT in one file: a decoder-only transformer whose positional encoding is one switch.

pos_encoding names a positional module: "learned" (GPT-2's table: nanoGPT checkpoints load as
they are), "sinusoidal" (Vaswani et al. 2017), "rope" (rope.py), "alibi" (Press et al. 2021) or
"none" (NoPE). Each keeps one contract, PositionalEncoding: handed the tokens' Positions, it adds
its signal to the embeddings and fills in what attention needs (rotations, a bias or mask).
Adding an encoding is one subclass and one entry in POS_ENCODINGS.

Layouts per layer: pos_encoding and layer_types may be comma-separated patterns, cycled over the
layers ("rope,rope,rope,none" is Llama 4's iRoPE). Each distinct (encoding, layer type) is one
module, and a LayerPlan hands every layer its kind's Positions.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn import functional as F

from attention import KVCache, Positions, alibi_bias, alibi_slopes, attention, flex_alibi, local_mask, visible
from rope import ROPE_LAYOUTS, RotaryEmbedding, rot_dim_for

ACTIVATIONS = {  # the MLP's; relu2 is Primer's max(x, 0)^2 (So et al. 2021), modded-nanogpt's
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu2": lambda x: F.relu(x).square(),
}
LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")  # Hugging Face's names


def cycled(pattern: str, n: int) -> list[str]:
    """A comma-separated pattern repeated over n layers: "rope,none" gives rope, none, rope, none, ..."""
    names = [name.strip() for name in pattern.split(",")]
    return [names[i % len(names)] for i in range(n)]


def is_per_layer_type(rope_scaling) -> bool:
    """Whether rope_scaling is Hugging Face's per-layer-type rope_parameters, {layer_type: {...}}."""
    return isinstance(rope_scaling, dict) and bool(rope_scaling) and set(rope_scaling) <= set(LAYER_TYPES)


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
    activation: str = "gelu"  # the MLP's: "gelu" (exact), "gelu_tanh" (GPT-2's approximation) or "relu2"
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
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_kv_head", "floor_scale"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)!r} is not valid; valid: a whole number of at least 1")
        for name in ("pos_encoding", "layer_types"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} {getattr(self, name)!r} is not valid; valid: a comma-separated string")
        layers = self.layers()
        encodings, types = {e for e, _ in layers}, {t for _, t in layers}
        pe, mixed = repr(self.pos_encoding), "one encoding, or a pattern of rope, none and alibi"
        used = f"per-layer-type keys among the layer_types {', '.join(sorted(types))}"
        for name, ok, valid in (
            ("pos_encoding", encodings <= set(POS_ENCODINGS), f"{', '.join(POS_ENCODINGS)}, or a pattern of them"),
            ("pos_encoding", len(encodings) == 1 or encodings <= {"rope", "none", "alibi"}, mixed),
            ("layer_types", types <= set(LAYER_TYPES), f"{', '.join(LAYER_TYPES)}, or a pattern of them"),
            ("layer_types", all(t == "full_attention" for e, t in layers if e == "alibi"), "full_attention for alibi"),
            ("layer_types", len(types) == 1 or not encodings & {"learned", "sinusoidal"}, f"one type for {pe}"),
            ("attn_temperature_tuning", not self.attn_temperature_tuning or "none" in encodings, "False: no NoPE"),
            ("dropout", 0.0 <= self.dropout < 1.0, "a probability in [0, 1)"),
            ("n_embd", self.n_embd % self.n_head == 0, f"a multiple of n_head {self.n_head}"),
            ("n_kv_head", self.n_head % self.n_kv_head == 0, f"a divisor of n_head {self.n_head}"),
            ("activation", self.activation in ACTIVATIONS, ", ".join(ACTIVATIONS)),
            ("rope_layout", self.rope_layout in ROPE_LAYOUTS, ", ".join(ROPE_LAYOUTS)),
            ("rope_fraction", 0.0 < self.rope_fraction <= 1.0, "the share of each head that RoPE turns, in (0, 1]"),
            ("rope_scaling", self.rope_scaling is None or "rope" in encodings, f"None (pos_encoding is {pe})"),
            ("rope_scaling", not is_per_layer_type(self.rope_scaling) or set(self.rope_scaling) <= types, used),
        ):
            if not ok:
                raise ValueError(f"{name} {getattr(self, name)!r} is not valid; valid: {valid}")
        for name, kind in (("sliding_window", "sliding_attention"), ("attention_chunk_size", "chunked_attention")):
            if kind in types and not (type(n := getattr(self, name)) is int and n >= 1):
                raise ValueError(f"{name} {n!r} is not valid; valid: a whole number of at least 1 (for {kind})")
        positional_module(self)  # each encoding checks its own settings (RoPE's: rope.py)

    def layers(self) -> list[tuple[str, str]]:
        """Each layer's (encoding, layer type): pos_encoding and layer_types cycled over n_layer."""
        return list(zip(cycled(self.pos_encoding, self.n_layer), cycled(self.layer_types, self.n_layer)))

    def span(self, layer_type: str) -> int | None:
        """The most keys a query of this layer type sees (a ring buffer's slots in generation); None: all."""
        spans = {"sliding_attention": self.sliding_window, "chunked_attention": self.attention_chunk_size}
        return spans.get(layer_type)

    def rope_for(self, layer_type: str) -> tuple[float, dict | None]:
        """(base, rope_scaling) of a layer type. rope_scaling may be Hugging Face's per-layer-type rope_parameters,
        {layer_type: {"rope_type": ..., "rope_theta": base, ...}} (Gemma 3: 10,000 local, 1,000,000 global)."""
        if not is_per_layer_type(self.rope_scaling):
            return self.rope_base, self.rope_scaling
        params = dict(self.rope_scaling.get(layer_type, {"rope_type": "default"}))
        return params.pop("rope_theta", self.rope_base), params


class PositionalEncoding(nn.Module):
    """The contract: forward(x, pos) is the embeddings x (B, T, C) with the encoding added, attend(pos) is pos
    with what attention needs; for sample.py, max_positions, relative (distances only: a window keeps its
    meaning), length_dependent and changes_between (RoPE variants that follow the length). As it is: no signal,
    the causal mask within the layer type's window or chunk."""

    max_positions: int | None = None
    relative: bool = False
    length_dependent: bool = False
    flex_devices = ("cuda",)  # where masks run on FlexAttention: not the CPU, which has no backward for it

    def __init__(self, config: GPTConfig, layer_type: str = "full_attention"):
        super().__init__()
        self.n_layer, self.dropout = config.n_layer, config.dropout
        self.span = config.span(layer_type)
        self.window, self.chunk = (self.span, None) if layer_type == "sliding_attention" else (None, self.span)

    def forward(self, x: Tensor, pos: Positions) -> Tensor:
        return x

    def attend(self, pos: Positions) -> Positions:
        """pos with its causal mask: within the window or chunk, if any; against a cache by slot, or over the ring."""
        if pos.slots is None:
            flex = self.on_flex(pos.query.device)
            return pos if self.span is None else replace(pos, mask=local_mask(pos, self.window, self.chunk, flex))
        if self.span is None:  # causal by slot (is_causal aligns top-left: pytorch/pytorch#108108); padding sees all
            return replace(pos, mask=pos.keys <= pos.slots[:, None, :, None])  # (B, 1, T, S)
        slots, queries, keys = pos.rings[self.span]  # padding and empty slots EMPTY: they see each other alone
        mask = visible(queries[:, None, :, None], keys[:, None, None, :], self.window, self.chunk)  # (B, 1, T, S)
        return replace(pos, slots=slots, keys=keys, mask=mask)

    def on_flex(self, device: torch.device) -> bool:
        """On flex_devices, unless training with dropout, which FlexAttention lacks."""
        return device.type in self.flex_devices and not (self.training and self.dropout > 0)

    def attend_layers(self, pos: Positions) -> list[Positions]:
        """Every layer's Positions: one encoding, so the same for all."""
        return [self.attend(pos)] * self.n_layer

    def changes_between(self, old_len: int, new_len: int) -> bool:
        return False


class NoPE(PositionalEncoding):
    """No positional signal (Kazemnejad et al. 2023): the causal mask alone tells positions apart. With
    attn_temperature_tuning, Llama 4's query scale at position m: 1 + attn_scale · ln(⌊(m + 1)/floor_scale⌋ + 1),
    so that attention stays sharp over long contexts (HF's Llama4TextAttention)."""

    def __init__(self, config: GPTConfig, layer_type: str = "full_attention"):
        super().__init__(config, layer_type)
        self.temperature = (config.floor_scale, config.attn_scale) if config.attn_temperature_tuning else None

    def attend(self, pos: Positions) -> Positions:
        if self.temperature is None:
            return super().attend(pos)
        floor_scale, attn_scale = self.temperature
        scale = (torch.log1p(torch.floor((pos.query.double() + 1) / floor_scale)) * attn_scale + 1).unsqueeze(-1)
        scale = scale.unsqueeze(1) if scale.dim() == 3 else scale  # (T, 1) or (B, 1, T, 1)
        return replace(super().attend(pos), query_scale=scale.to(torch.float32))


class Learned(PositionalEncoding):
    """A trained table of block_size position vectors (GPT-2), saved as transformer.wpe.weight."""

    def __init__(self, config: GPTConfig, layer_type: str = "full_attention"):
        super().__init__(config, layer_type)
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

    def __init__(self, config: GPTConfig, layer_type: str = "full_attention"):
        super().__init__(config, layer_type)
        rot_dim = rot_dim_for(config.n_embd // config.n_head, config.rope_fraction)
        self.rotary = RotaryEmbedding(rot_dim, *config.rope_for(layer_type), config.block_size)
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

    def __init__(self, config: GPTConfig, layer_type: str = "full_attention"):
        super().__init__(config, layer_type)
        self.n_head = config.n_head
        self.register_buffer("slopes", alibi_slopes(config.n_head), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.slopes = alibi_slopes(self.n_head).to(self.slopes.device)  # exact again after model.half()
        return self

    def attend(self, pos: Positions) -> Positions:
        cached = pos.slots is not None  # then by slot: a padding query sees every slot
        q_pos, k_pos = (pos.slots, pos.keys) if cached else (pos.query, pos.query)
        if not self.on_flex(q_pos.device):
            return replace(pos, mask=alibi_bias(self.slopes, q_pos, k_pos))  # (B|1, nh, T, S)
        if cached or not pos.given:  # a length n stands for positions 0..n−1: no lookups in the kernel
            q_pos, k_pos = q_pos if cached else q_pos.numel(), k_pos.numel()
        return replace(pos, mask=flex_alibi(self.slopes, q_pos, k_pos))


POS_ENCODINGS = {"learned": Learned, "sinusoidal": Sinusoidal, "rope": RoPE, "alibi": ALiBi, "none": NoPE}


class LayerPlan(PositionalEncoding):
    """Several kinds of layer (encoding, layer type), one module each: iRoPE, RNoPE-SWA, Gemma's local/global.
    It adds nothing to the embeddings; each kind fills in its layers' Positions once per forward."""

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.plan = [f"{encoding}_{layer_type}" for encoding, layer_type in config.layers()]  # each layer's kind
        kinds = dict(zip(self.plan, config.layers()))
        self.kinds = nn.ModuleDict({name: POS_ENCODINGS[e](config, t) for name, (e, t) in kinds.items()})
        self.relative = all(kind.relative for kind in self.kinds.values())
        self.length_dependent = any(kind.length_dependent for kind in self.kinds.values())

    def attend_layers(self, pos: Positions) -> list[Positions]:
        attended = {name: kind.attend(pos) for name, kind in self.kinds.items()}
        return [attended[name] for name in self.plan]

    def changes_between(self, old_len: int, new_len: int) -> bool:
        return any(kind.changes_between(old_len, new_len) for kind in self.kinds.values())


def positional_module(config: GPTConfig) -> PositionalEncoding:
    """The model's positional module: its one encoding's, or a LayerPlan of several kinds."""
    kinds = set(config.layers())
    if len(kinds) > 1:
        return LayerPlan(config)
    encoding, layer_type = kinds.pop()
    return POS_ENCODINGS[encoding](config, layer_type)


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
            k, v = cache.update(self.layer_idx, pos.slots, k, v, pos.keys.size(-1))  # (B, n_kv, S, hs)
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
        self.activation = ACTIVATIONS[config.activation]

    def forward(self, x):
        return self.dropout(self.c_proj(self.activation(self.c_fc(x))))


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
                wpe=positional_module(config),  # by GPT-2's name
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
        pos = self.locate(idx, positions, cache)  # where the tokens sit
        x = self.transformer.drop(self.transformer.wpe(self.transformer.wte(idx), pos))  # (B, T, C)
        for block, layer_pos in zip(self.transformer.h, self.transformer.wpe.attend_layers(pos)):
            x = block(x, layer_pos, cache)  # layer_pos: with what this layer's attention needs
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
        return Positions(positions.clamp(min=0), last, given, *cache.place(positions, last), cache.keys_rotated)
