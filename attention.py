"""Attention and what it reads: softmax(q·kᵀ/√hs)·v through SDPA, with grouped-query heads; the masks of
causal, sliding-window and chunked layers (visible), computed by blocks of queries on the CPU (local_attention)
and as FlexAttention block masks on CUDA; ALiBi's slopes and bias; and the KV cache of generation, whose window
layers keep ring buffers.
"""

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from rope import apply_rope

compiled_flex_attention = torch.compile(flex_attention)  # uncompiled, it runs an unfused reference
BLOCKS_FROM = 8  # windows a sequence spans before blocks of queries beat one dense-mask call (BENCHMARKS.md)
EMPTY = -(2**40)  # the position of an empty ring-buffer slot or of padding: never within a real query's window


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


def visible(q: Tensor, k: Tensor, window: int | None, chunk: int | None) -> Tensor:
    """Whether the query at position q sees the key at k (broadcast): k ≤ q, and q − k < window (the window
    holds the query itself) or both in one block of chunk positions, where those are set."""
    seen = k <= q
    if window:
        seen = seen & (q - k < window)
    if chunk:
        seen = seen & (q // chunk == k // chunk)
    return seen


@functools.lru_cache(maxsize=8)
def local_block_mask(window: int | None, chunk: int | None, T: int, device: str):
    """FlexAttention's block mask of `visible` for positions 0..T−1, built once per shape."""
    return create_block_mask(lambda b, h, q, k: visible(q, k, window, chunk), None, None, T, T, device=device)


@dataclass(frozen=True)
class LocalWindow:
    """The mask of positions 0..T−1 under a window or chunk: local_attention computes it by blocks."""

    window: int | None
    chunk: int | None


def local_attention(q, k, v, window: int | None, chunk: int | None, dropout_p: float = 0.0) -> Tensor:
    """Causal attention of positions 0..T−1 within a window or chunk of n keys, by blocks of n queries: block i
    reads key blocks i − 1 and i (a window) or block i alone (a chunk), so it costs T·2n products, not T²/2."""
    B, T, n, gqa = q.size(0), q.size(2), window or chunk, q.size(1) != k.size(1)
    q, k, v = (F.pad(t, (0, 0, 0, -T % n)).unflatten(2, (-1, n)).transpose(1, 2).flatten(0, 1) for t in (q, k, v))
    if chunk:  # (B·blocks, heads, n, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    else:  # each block's keys: the block before (rolled in: the first block's is masked out), then its own
        k, v = torch.cat((k.roll(1, 0), k), 2), torch.cat((v.roll(1, 0), v), 2)  # (B·blocks, heads, 2n, hs)
        i, j = torch.arange(n, device=q.device)[:, None] + n, torch.arange(2 * n, device=q.device)
        first = (torch.arange(q.size(0), device=q.device) % (q.size(0) // B) == 0).view(-1, 1, 1, 1)
        mask = visible(i, j, window, None) & ~(first & (j < n))  # (B·blocks, 1, n, 2n)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
    return y.unflatten(0, (B, -1)).transpose(1, 2).flatten(2, 3)[:, :, :T]


def attention(q, k, v, mask=None, dropout_p: float = 0.0) -> Tensor:
    """softmax(q·kᵀ/√hs + mask)·v, (B, nh, Tq, hs); k and v may have fewer heads, each shared by a group of
    queries (GQA). mask: None, causal over q and k alone (SDPA is_causal); a LocalWindow; a bool mask or bias
    (B|1, nh|1, Tq, Tk) (SDPA); or a (score_mod, block_mask) pair (FlexAttention, compiled, no dropout)."""
    gqa = q.size(1) != k.size(1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    if isinstance(mask, LocalWindow):
        return local_attention(q, k, v, mask.window, mask.chunk, dropout_p)
    if isinstance(mask, tuple):
        flex = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention
        return flex(q, k, v, score_mod=mask[0], block_mask=mask[1], enable_gqa=gqa)
    mask = mask if mask.dtype == torch.bool else mask.to(q.dtype)
    if gqa:
        return grouped_attention(q, k, v, mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def grouped_attention(q, k, v, mask: Tensor, dropout_p: float = 0.0) -> Tensor:
    """SDPA under a mask for k, v with fewer heads: the group of queries of each key/value head as one sequence
    of group·T queries, so that k and v are read as they are (enable_gqa repeats them on the CPU: BENCHMARKS.md)."""
    B, nh, T, hs = q.shape
    group = nh // k.size(1)
    mask = mask[(None,) * (4 - mask.dim())]  # (B|1, nh|1, Tq, Tk)
    mask = mask.unflatten(1, (-1, group) if mask.size(1) == nh else (1, 1))  # (B|1, n_kv|1, group|1, Tq, Tk)
    mask = mask.expand(*mask.shape[:2], group, *mask.shape[3:]).flatten(2, 3)  # (B|1, n_kv|1, group·Tq, Tk)
    y = F.scaled_dot_product_attention(q.reshape(B, -1, group * T, hs), k, v, attn_mask=mask, dropout_p=dropout_p)
    return y.view(B, nh, T, hs)


@dataclass
class Positions:
    """Where a forward's tokens sit (GPT.locate), then what attention needs (the positional module)."""

    query: Tensor  # the tokens' positions, (T,) or (B, T); against a cache (B, T), padding at 0
    last: int | None  # the largest; None under torch.compile, which never reads it, so shapes stay static
    given: bool  # whether the caller gave them (else 0..T−1)
    slots: Tensor | None = None  # against a cache: the slots the tokens' keys go to, (B, T)
    keys: Tensor | None = None  # against a cache: the positions of the keys attention reads, (S,) or a ring's (B, S)
    rings: dict | None = None  # against a cache, per ring size: (slots, query positions, key positions), EMPTY marked
    keys_rotated: bool = True  # whether the cache keeps RoPE keys rotated (else they are turned as read)
    mask: Tensor | tuple | None = None  # as attention() takes it
    rotation: tuple[Tensor, Tensor] | None = None  # RoPE's (cos, sin) at the queries' positions
    key_rotation: tuple[Tensor, Tensor] | None = None  # and at the keys', when the cache keeps them unrotated
    layout: str = "half"
    query_scale: Tensor | None = None  # Llama 4's temperature, broadcastable to the queries (B, nh, T, hs)

    def rotate(self, qk: Tensor, n_query: int) -> tuple[Tensor, Tensor]:
        """The first n_query heads of qk (B, heads, T, hs) are queries, the rest new keys: (q, k), turned and scaled."""
        if self.rotation is not None and self.key_rotation is None:  # queries and keys in one apply: fewer small ops
            qk = apply_rope(qk, *self.rotation, self.layout)
        q, k = qk.split(n_query, dim=1)
        if self.rotation is not None and self.key_rotation is not None:
            q = apply_rope(q, *self.rotation, self.layout)
        return (q if self.query_scale is None else q * self.query_scale.to(q.dtype)), k

    def rotate_keys(self, k: Tensor) -> Tensor:
        return k if self.key_rotation is None else apply_rope(k, *self.key_rotation, self.layout)


def local_mask(pos: Positions, window: int | None, chunk: int | None, flex: bool) -> Tensor | tuple | LocalWindow:
    """The mask of a window or chunk layer without a cache: FlexAttention's block mask where flex; a LocalWindow
    (blocks of queries) once positions 0..T−1 span BLOCKS_FROM windows; else, or for given positions (perhaps
    padded, perhaps per row), a dense one."""
    if flex and not pos.given:
        return None, local_block_mask(window, chunk, pos.query.numel(), str(pos.query.device))
    if not pos.given and pos.query.numel() >= BLOCKS_FROM * (window or chunk):
        return LocalWindow(window, chunk)
    q = pos.query if pos.query.dim() == 1 else pos.query[:, None]  # (T,) or (B, 1, T)
    return visible(q.unsqueeze(-1), q.unsqueeze(-2), window, chunk)  # (T, T) or (B, 1, T, T)


class KVCache:
    """Static keys and values of every layer (gpt-fast's): the token at position m of row b lives in slot m,
    padding in the spare slot max_len. A layer that sees at most n keys (a window or chunk) keeps a ring of n
    slots instead, position m in slot m mod n, so its memory is bounded by n. keys_rotated: RoPE keys kept
    rotated, or turned as read (sample.py's sinks move keys). One tensor a layer, static for CUDA graphs."""

    def __init__(self, config, batch_size: int, max_len: int, dtype=torch.float32, device=None, keys_rotated=True):
        self.spans = [config.span(layer_type) for _, layer_type in config.layers()]
        shapes = [
            (batch_size, config.n_kv_head, (n or max_len) + 1, config.n_embd // config.n_head) for n in self.spans
        ]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.held = {
            n: torch.empty(batch_size, n + 1, dtype=torch.long, device=device) for n in set(self.spans) - {None}
        }
        for buf in self.k + self.v + list(self.held.values()):
            torch._dynamo.mark_static_address(buf)
        self.rows = torch.arange(batch_size, device=device)[:, None]  # (B, 1)
        self.max_len, self.keys_rotated, self.dtype = max_len, keys_rotated, dtype
        self.reset()

    def reset(self) -> None:
        """Forget the rings' positions, for a prefill from the start (full layers read slots up to the last)."""
        for held in self.held.values():
            held.fill_(EMPTY)

    def place(self, positions: Tensor, last: int | None) -> tuple[Tensor, Tensor, dict]:
        """Where tokens at positions (B, T) (< 0: padding) go: (their slots (B, T), the positions of the keys full
        layers read (S,), and per ring size n (slots, query positions, key positions (B, n + 1 + T))). A full layer
        reads slots up to the last position, or all when compiled (last None). A ring layer reads the ring as it
        was, then the new tokens; each row's last n real ones take slot m mod n, the rest the spare slot n."""
        slots = torch.where(positions < 0, self.max_len, positions)  # padding to the spare slot
        keys = torch.arange(self.max_len + 1 if last is None else max(last + 1, 1), device=positions.device)
        rings = {}
        if self.held:  # ring layers only: nothing more on a model without windows
            real = positions >= 0
            marked = torch.where(real, positions, EMPTY)
        for n, held in self.held.items():
            kept = real & (positions > positions.amax(1, keepdim=True) - n)
            ring_slots = torch.where(kept, positions % n, n)
            rings[n] = ring_slots, marked, torch.cat((held, marked), 1)  # the copy is read before the write below
            held[self.rows, ring_slots] = torch.where(kept, positions, EMPTY)
        return slots, keys, rings

    def update(self, layer: int, slots: Tensor, k: Tensor, v: Tensor, n_keys: int):
        """Write k, v (B, n_kv, T, hs) at slots (B, T); return what the layer attends to: its first n_keys slots,
        or for a ring the ring as it was, then k and v (a prefill's early queries need keys it overwrites)."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        if self.spans[layer] is not None:
            read = torch.cat((k_cache, k.to(self.dtype)), 2), torch.cat((v_cache, v.to(self.dtype)), 2)
        k_cache[self.rows, :, slots] = k.transpose(1, 2).to(self.dtype)  # indexing: a CPU bf16 scatter_ copies all
        v_cache[self.rows, :, slots] = v.transpose(1, 2).to(self.dtype)
        return read if self.spans[layer] is not None else (k_cache[:, :, :n_keys], v_cache[:, :, :n_keys])
